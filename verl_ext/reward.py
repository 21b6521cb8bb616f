"""Math reward: the last ``\\boxed{}`` answer against the ground truth, graded by math-verify in bounded time.

:func:`compute_score` is the function verl's reward workers call (``reward.custom_reward_function.path`` =
``pkg://verl_ext.reward``, ``.name`` = ``compute_score``). It never raises and always returns the same keys
(verl builds arrays from the first result's keys):

- ``score`` (float, 0.0 or 1.0) and ``acc`` (bool): the verdict.
- ``pred`` (str): the extracted answer ("" when there is none).
- ``reason`` (str): ``match``, ``mismatch`` or why nothing could be graded: ``no_box``, ``empty_box``,
  ``unclosed_box``, ``answer_too_long``, ``no_ground_truth``, ``invalid_input``, ``timeout``,
  ``grader_error``, ``unbounded_answer`` (refused on the thread path, see 4.).
- ``method`` (str): how the verdict was reached: ``text``, ``exact``, ``number``, ``math_verify`` or
  ``none``.
- ``source`` (str): the data source, echoed so that verl's validation dumps (which carry the reward's extra
  keys but not the data source) can be split by data set. It is not called ``data_source`` because verl
  writes reward extra keys back into the batch under their own names.

Grading, in order:

1. The answer is the content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces, escaped
   ``\\{``/``\\}``, ``\\boxed 5`` without braces; empty boxes are skipped). The scan is a backwards
   ``str.rfind`` plus a brace walk capped at :data:`MAX_ANSWER_CHARS`, so megabyte inputs cost milliseconds.
   A last box that never closes scores 0 (a truncated answer is not an answer).
2. Text answers: when the ground truth is a word (Yes/No/True/False, names such as ``\\text{Evelyn}``),
   answers are compared as text, case-, ``\\text{}``- and punctuation-insensitively. math-verify would
   parse ``Yes`` as the product ``y*e*s`` and accept any anagram.
3. Identical strings after whitespace/``\\left``/``\\dfrac`` normalisation, and plain numbers (thousands
   separators allowed) are decided without math-verify.
4. Everything else goes to math-verify (``parse`` + ``verify`` with their signal-based timeouts off) through
   :mod:`verl_ext.graders`: a ``pebble`` pool of spawned grader processes (``BUPO_REWARD_WORKERS``, default
   ``min(4, cpu_count)``). A call waits at most :data:`DEFAULT_QUEUE_WAIT_S` for a free grader and
   ``timeout_s`` for the verdict; a grader that overruns is killed and replaced, so no input can hang the
   caller, in any thread. With ``BUPO_REWARD_WORKERS=0``, or for a while after grader processes failed to
   start (logged once), math-verify runs in at most two threads of the calling process, still bounded
   per call; as a thread cannot be stopped, answers sympy cannot bound (exponent towers, huge factorials,
   very long expressions, :mod:`verl_ext.answer_bounds`) are refused there: score 0, reason
   ``unbounded_answer``. Verdicts are cached per (ground truth, answer).

Percent signs are dropped before grading (``50\\%`` equals ``50``); ``^\\circ``, ``\\text{ cm}`` units and
``\\$`` are handled by math-verify.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from verl_ext import graders
from verl_ext.answer_bounds import unbounded_reason

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
"""Default wall-clock limit (seconds) for one math-verify grading."""
DEFAULT_QUEUE_WAIT_S = 30.0
"""How long a call may wait for a free grader process before it gives up (score 0, reason ``timeout``)."""
MAX_ANSWER_CHARS = 1000
"""Longest box content that is graded; longer contents score 0 with reason ``answer_too_long``."""
MAX_EMPTY_BOXES_SKIPPED = 100
TEXT_ANSWERS = frozenset({"yes", "no", "true", "false"})

REASONS = (
    "match",
    "mismatch",
    "no_box",
    "empty_box",
    "unclosed_box",
    "answer_too_long",
    "no_ground_truth",
    "invalid_input",
    "timeout",
    "grader_error",
    "unbounded_answer",
)
METHODS = ("text", "exact", "number", "math_verify", "none")

# ---------------------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)


def _parse_box_at(text: str, start: int, max_chars: int) -> tuple[str | None, str]:
    """Parse the argument of a box command whose name ends at ``start``.

    Returns ``(content, status)`` with status ``ok``, ``empty_box``, ``unclosed_box`` or ``answer_too_long``.
    """
    j = start
    limit = min(len(text), start + 16)
    while j < limit and text[j] in " \t\n":
        j += 1
    if j >= len(text):
        return None, "unclosed_box"
    if text[j] != "{":
        # ``\boxed 5``: the argument runs to the next whitespace or ``$``.
        m = re.match(r"[^\s$]+", text[j : j + max_chars + 1])
        if m is None:
            return None, "empty_box"
        if len(m.group(0)) > max_chars:
            return None, "answer_too_long"
        return m.group(0), "ok"
    window_end = min(len(text), j + 1 + max_chars + 1)
    depth = 0
    for tok in _BRACE_TOKEN.finditer(text, j, window_end):
        t = tok.group(0)
        if t == "{":
            depth += 1
        elif t == "}":
            depth -= 1
            if depth == 0:
                content = text[j + 1 : tok.start()]
                if not content.strip():
                    return None, "empty_box"
                return content, "ok"
    if window_end < len(text) or window_end - (j + 1) > max_chars:
        return None, "answer_too_long"
    return None, "unclosed_box"


def last_boxed(text: str, max_chars: int = MAX_ANSWER_CHARS) -> tuple[str | None, str]:
    """Content of the last non-empty ``\\boxed{}`` / ``\\fbox{}`` in ``text``.

    Args:
        text: The model response.
        max_chars: Longest box content accepted.

    Returns:
        ``(content, status)``: ``content`` is None unless ``status == "ok"``; otherwise status is
        ``no_box``, ``empty_box`` (only empty boxes found), ``unclosed_box`` or ``answer_too_long``.
    """
    end = len(text)
    saw_empty = False
    for _ in range(MAX_EMPTY_BOXES_SKIPPED + 1):
        best, best_end = -1, -1
        for cmd in _BOX_COMMANDS:
            pos = end
            while pos > 0:
                i = text.rfind(cmd, 0, pos)
                if i < 0:
                    break
                k = i + len(cmd)
                if k < len(text) and text[k].isalpha():  # another command, e.g. \boxedanswer
                    pos = i
                    continue
                if i > best:
                    best, best_end = i, k
                break
        if best < 0:
            return None, "empty_box" if saw_empty else "no_box"
        content, status = _parse_box_at(text, best_end, max_chars)
        if status != "empty_box":
            return content, status
        saw_empty = True
        end = best
    return None, "empty_box"


# ---------------------------------------------------------------------------------------------------------
# Normalisation and the fast paths
# ---------------------------------------------------------------------------------------------------------

_TEXT_WRAPPERS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mbox|operatorname)\s*\{"
)
_THOUSANDS_SPACING = re.compile(r"(?<=\d)(?:\\[,!;: ]|\{,\}|~)(?=\d{3}(?!\d))")
_LATEX_SPACING = re.compile(r"\\[,!;: ]|\\quad|\\qquad")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WORDS = re.compile(r"[a-z]+(?: [a-z]+)*")


def _unwrap_text(s: str) -> str:
    """Replace ``\\text{x}``-like wrappers by their content (any nesting depth, linear time)."""
    out = []
    pos = 0
    stack: list[bool] = []  # for each open brace: was it opened by a text wrapper?
    for m in re.finditer(
        r"\\(?:text|textbf|textit|textrm|textsf|texttt|mathrm|mathbf|mbox|operatorname)\s*\{|\\.|[{}]", s
    ):
        t = m.group(0)
        if t.endswith("{") and t.startswith("\\") and len(t) > 2:
            out.append(s[pos : m.start()])
            pos = m.end()
            stack.append(True)
        elif t == "{":
            stack.append(False)
        elif t == "}" and stack and stack.pop():
            out.append(s[pos : m.start()])
            pos = m.end()
    out.append(s[pos:])
    return "".join(out)


def normalize_answer(s: str) -> str:
    """Light normalisation applied to both answers before any comparison.

    Strips surrounding ``$`` and whitespace, ``\\displaystyle``, trailing full stops, percent signs and
    thousands-separator spacing (``1\\,000``, ``1{,}000``), and turns ``\\dfrac``/``\\tfrac`` into ``\\frac``.
    """
    s = s.strip()
    s = s.strip("$").strip()
    s = s.replace("\\displaystyle", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\%", "").replace("%", "")
    s = _THOUSANDS_SPACING.sub("", s)
    s = s.strip()
    while s.endswith(".") and not _PLAIN_NUMBER.fullmatch(s):
        s = s[:-1].rstrip()
    return s


def _as_text(s: str) -> str:
    """Word-level view of an answer: text wrappers, braces, ``$`` and end punctuation removed, lower case."""
    s = _unwrap_text(s)
    s = _LATEX_SPACING.sub(" ", s)
    s = s.replace("$", "").replace("{", "").replace("}", "")
    s = " ".join(s.split())
    return s.strip(" .,;:!").lower()


def _squash(s: str) -> str:
    """Whitespace-free form for exact comparison."""
    s = s.replace("\\left", "").replace("\\right", "")
    s = _LATEX_SPACING.sub("", s)
    return "".join(s.split())


def _as_number(s: str) -> Decimal | None:
    s = _squash(s)
    if _THOUSANDS_NUMBER.fullmatch(s):
        s = s.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def _is_text_answer(gold: str) -> bool:
    """Whether the ground truth is a word answer, to be compared as text rather than as mathematics."""
    text = _as_text(gold)
    if not _WORDS.fullmatch(text):
        return False
    wrapped = _TEXT_WRAPPERS.search(gold) is not None
    return text in TEXT_ANSWERS or wrapped or len(text.replace(" ", "")) >= 3


def quick_verdict(gold: str, pred: str) -> tuple[bool | None, str]:
    """Decide the easy cases without math-verify.

    Args:
        gold: Normalised ground truth.
        pred: Normalised prediction.

    Returns:
        ``(verdict, method)``; ``verdict`` is None when math-verify has to decide.
    """
    if _is_text_answer(gold):
        return _as_text(pred) == _as_text(gold), "text"
    if _squash(gold) == _squash(pred):
        return True, "exact"
    g, p = _as_number(gold), _as_number(pred)
    if g is not None and p is not None:
        if g == p:
            return True, "number"
        if g == g.to_integral_value() and p == p.to_integral_value():
            return False, "number"
    return None, "math_verify"


# ---------------------------------------------------------------------------------------------------------
# math-verify, in grader processes (verl_ext.graders)
# ---------------------------------------------------------------------------------------------------------


def math_verify_equal(gold: str, pred: str) -> bool:
    """math-verify's verdict on two answer strings, with its own (signal-based) timeouts off.

    Unbounded in time: call it through :func:`verify_bounded`.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    gold_parsed = _parse_gold(gold)
    pred_parsed = parse(
        "\\boxed{" + pred + "}",
        [LatexExtractionConfig(), ExprExtractionConfig()],
        parsing_timeout=None,
    )
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


_GOLD_CACHE: OrderedDict[str, Any] = OrderedDict()
_GOLD_CACHE_LOCK = threading.Lock()


def _parse_gold(gold: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    with _GOLD_CACHE_LOCK:
        if gold in _GOLD_CACHE:
            _GOLD_CACHE.move_to_end(gold)
            return _GOLD_CACHE[gold]
    parsed = parse("\\boxed{" + gold + "}", [LatexExtractionConfig()], parsing_timeout=None)
    if not parsed:
        parsed = parse(gold, [LatexExtractionConfig(), ExprExtractionConfig()], parsing_timeout=None)
    with _GOLD_CACHE_LOCK:
        _GOLD_CACHE[gold] = parsed
        if len(_GOLD_CACHE) > 4096:
            _GOLD_CACHE.popitem(last=False)
    return parsed


_VERDICT_CACHE: OrderedDict[tuple[str, str], bool] = OrderedDict()
_VERDICT_CACHE_LOCK = threading.Lock()
_VERDICT_CACHE_SIZE = 65536

configure = graders.configure
shutdown = graders.shutdown
grading_mode = graders.mode


def verify_bounded(
    gold: str, pred: str, timeout_s: float = DEFAULT_TIMEOUT_S, wait_s: float = DEFAULT_QUEUE_WAIT_S
) -> tuple[str, bool | str | None]:
    """math-verify's verdict within ``wait_s + timeout_s`` (plus about half a second), from any thread.

    Args:
        gold: Normalised ground truth.
        pred: Normalised prediction.
        timeout_s: Limit for the grading itself.
        wait_s: Limit for waiting for a free grader process.

    Returns:
        ``("ok", verdict)``, ``("timeout", None)``, ``("error", message)``, or, when grading in threads,
        ``("refused", why)`` for an answer sympy cannot bound (:func:`verl_ext.answer_bounds.unbounded_reason`).
    """
    key = (gold, pred)
    with _VERDICT_CACHE_LOCK:
        if key in _VERDICT_CACHE:
            _VERDICT_CACHE.move_to_end(key)
            return "ok", _VERDICT_CACHE[key]
    out = graders.run(
        math_verify_equal, (gold, pred), timeout_s, wait_s, refuse=lambda: unbounded_reason(pred)
    )
    if out[0] == "ok":
        with _VERDICT_CACHE_LOCK:
            _VERDICT_CACHE[key] = bool(out[1])
            if len(_VERDICT_CACHE) > _VERDICT_CACHE_SIZE:
                _VERDICT_CACHE.popitem(last=False)
        return "ok", bool(out[1])
    return out


# ---------------------------------------------------------------------------------------------------------
# The reward function
# ---------------------------------------------------------------------------------------------------------


def _result(
    score: bool, pred: str | None, reason: str, method: str, source: Any
) -> dict[str, float | bool | str]:
    return {
        "score": 1.0 if score else 0.0,
        "acc": bool(score),
        "pred": pred or "",
        "reason": reason,
        "method": method,
        "source": source if isinstance(source, str) else str(source),
    }


def _gold_candidates(ground_truth: Any) -> list[str]:
    """The acceptable answers as strings (a list/tuple/array of answers accepts any of them)."""
    if ground_truth is None:
        return []
    if isinstance(ground_truth, bytes):
        ground_truth = ground_truth.decode("utf-8", errors="replace")
    if isinstance(ground_truth, str):
        items: Sequence[Any] = [ground_truth]
    elif isinstance(ground_truth, bool):
        items = ["True" if ground_truth else "False"]
    elif isinstance(ground_truth, (int, float)):
        items = [str(int(ground_truth)) if float(ground_truth).is_integer() else repr(float(ground_truth))]
    elif hasattr(ground_truth, "tolist") or isinstance(ground_truth, (list, tuple)):
        values = ground_truth.tolist() if hasattr(ground_truth, "tolist") else list(ground_truth)
        if not isinstance(values, list):
            values = [values]
        out: list[str] = []
        for v in values:
            out.extend(_gold_candidates(v))
        return out
    else:
        return []
    golds = []
    for g in items:
        g = str(g)
        if "\\boxed" in g or "\\fbox" in g:
            content, status = last_boxed(g)
            if status == "ok" and content is not None:
                g = content
        g = normalize_answer(g)
        if g:
            golds.append(g)
    return golds


_FAILURES = {"timeout": ("timeout", "math_verify"), "refused": ("unbounded_answer", "none")}


def grade_answer(pred: str, ground_truth: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[bool, str, str]:
    """Grade an already extracted answer against the ground truth.

    Args:
        pred: The answer (box content).
        ground_truth: The reference answer (or a list of acceptable answers).
        timeout_s: Wall-clock limit for a math-verify comparison.

    Returns:
        ``(correct, reason, method)`` as in :func:`compute_score`.
    """
    golds = _gold_candidates(ground_truth)
    if not golds:
        return False, "no_ground_truth", "none"
    p = normalize_answer(pred)
    if not p:
        return False, "empty_box", "none"
    failure: tuple[str, str] | None = None
    method = "none"
    for g in golds:
        verdict, method = quick_verdict(g, p)
        if verdict is None:
            status, payload = verify_bounded(g, p, timeout_s=timeout_s)
            if status != "ok":
                failure = _FAILURES.get(status, ("grader_error", "math_verify"))
                continue
            verdict = bool(payload)
        if verdict:
            return True, "match", method
    if failure is not None:
        return False, failure[0], failure[1]
    return False, "mismatch", method


def compute_score(
    data_source: Any,
    solution_str: Any,
    ground_truth: Any,
    extra_info: dict | None = None,
    **kwargs: Any,
) -> dict[str, float | bool | str]:
    """verl reward function: 1.0 when the last ``\\boxed{}`` answer equals the ground truth, else 0.0.

    Args:
        data_source: The row's ``data_source`` (echoed as ``source``).
        solution_str: The decoded model response.
        ground_truth: ``reward_model.ground_truth`` of the row (a string; a list accepts any element).
        extra_info: The row's ``extra_info`` (unused).
        **kwargs: ``timeout_s`` (float) overrides :data:`DEFAULT_TIMEOUT_S`; other keys verl passes are
            ignored.

    Returns:
        ``{"score", "acc", "pred", "reason", "method", "source"}``; see the module docstring.
    """
    try:
        timeout_s = float(kwargs.get("timeout_s", DEFAULT_TIMEOUT_S))
        if isinstance(solution_str, bytes):
            solution_str = solution_str.decode("utf-8", errors="replace")
        if not isinstance(solution_str, str):
            return _result(False, None, "invalid_input", "none", data_source)
        pred, status = last_boxed(solution_str)
        if status != "ok" or pred is None:
            return _result(False, None, status, "none", data_source)
        correct, reason, method = grade_answer(pred, ground_truth, timeout_s=timeout_s)
        return _result(correct, pred, reason, method, data_source)
    except Exception as e:  # never raise inside a reward worker
        logger.warning("compute_score failed: %r", e)
        return _result(False, None, "grader_error", "none", data_source)
