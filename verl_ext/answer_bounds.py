"""Whether sympy can grade an answer in bounded time: cheap size estimates of what a LaTeX answer denotes.

math-verify hands answers to sympy, which evaluates exact numbers and expands powers eagerly:
``9^{9^{9}}`` (a 370-million-digit integer), ``(10^{6})!``, ``2^{-10^{9}}``, ``(x+1)^{1000}`` or a
product of a hundred factors keep it busy for minutes. In a grader process that is harmless (the
process is killed at its deadline), but in a thread it is not (a thread cannot be stopped), so the
reward's thread path asks :func:`unbounded_reason` first and refuses such answers.

The estimate walks the tokens once (linear time, no sympy): every number gets an upper bound of its
size in decimal digits (of numerator and denominator together), combined through ``+ - \\cdot \\frac``
(sizes add), powers (``a^b``: ``|b|`` times the size of ``a``), factorials (``n!``: ``n log10 n``),
binomials and ``\\sum``/``\\prod`` bounds. Symbols have size 0. The limits below are far above any
answer a math data set expects; an answer above one of them is refused, whatever its value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MAX_CHARS = 400
"""Longest answer graded in a thread (a product of 90 linear factors, about 500 characters, takes seconds)."""
MAX_DIGITS = 100_000
"""Largest exact number (decimal digits) an answer may denote."""
MAX_SUM_EXPONENT = 32
"""Largest power of a non-numeric sum such as ``(x+y)^{n}`` (sympy expands it)."""
MAX_SYMBOL_EXPONENT = 100_000
"""Largest power of any other non-numeric base such as ``x^{n}``."""
MAX_SERIES_BOUND = 1000
"""Largest numeric bound of a ``\\sum`` or ``\\prod``."""
MAX_NESTING = 32
"""Deepest bracket nesting."""

_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|\d+(?:\.\d*)?|\.\d+|\*\*|\S", re.DOTALL)
_OPEN = {"{": "}", "(": ")", "[": "]", "\\{": "\\}", "\\lbrace": "\\rbrace", "\\langle": "\\rangle"}
_CLOSE = frozenset(_OPEN.values())
_ADDITIVE = frozenset({"+", "-", "\\pm", "\\mp"})
_NEUTRAL = frozenset(
    {"*", "/", ",", ";", ":", "=", "<", ">", "|", "&", "'", "\\\\", "\\left", "\\right", "\\middle"}
    | {"\\cdot", "\\times", "\\div", "\\le", "\\leq", "\\ge", "\\geq", "\\neq", "\\ne", "\\approx", "\\in"}
    | {"\\,", "\\;", "\\!", "\\:", "\\ ", "\\quad", "\\qquad", "\\displaystyle", "\\cup", "\\cap", "\\|"}
)
_FRACTIONS = frozenset({"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"})
_BINOMIALS = frozenset({"\\binom", "\\dbinom", "\\tbinom"})
_SERIES = frozenset({"\\sum", "\\prod"})


class _Refuse(Exception):
    """Raised inside the walk with the reason the answer cannot be bounded."""


@dataclass(frozen=True)
class _Size:
    """Upper bound of an expression's size: ``digits`` (log10 of its integers), exact number or not."""

    digits: float = 0.0
    numeric: bool = False
    is_sum: bool = False


def _exp10(digits: float) -> float:
    """10 ** digits without OverflowError (inf above float range)."""
    return math.inf if digits > 300 else 10.0**digits


def _number(token: str) -> _Size:
    body = token.replace(".", "").lstrip("0") or "0"
    digits = float(len(body)) if len(body) > 15 else math.log10(max(1, int(body)))
    return _Size(digits, numeric=True)


class _Walk:
    """One left-to-right pass over the tokens of an answer."""

    def __init__(self, text: str) -> None:
        self.tokens = _TOKEN.findall(text)
        self.i = 0

    def _peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _check(self, size: _Size, what: str) -> _Size:
        if size.digits > MAX_DIGITS:
            raise _Refuse(f"{what} with more than {MAX_DIGITS} digits")
        return size

    def sequence(self, depth: int) -> _Size:
        """Atoms up to the next closing bracket (not consumed) or the end; their sizes add."""
        if depth > MAX_NESTING:
            raise _Refuse(f"brackets nested deeper than {MAX_NESTING}")
        digits, numeric, is_sum, atoms = 0.0, True, False, 0
        while (tok := self._peek()) is not None and tok not in _CLOSE:
            if tok in _ADDITIVE or tok in _NEUTRAL:
                is_sum = is_sum or (tok in _ADDITIVE and atoms > 0)
                self.i += 1
                continue
            size = self.atom(depth)
            digits += size.digits
            numeric = numeric and size.numeric
            atoms += 1
        return self._check(_Size(digits, numeric and atoms > 0, is_sum), "a number")

    def atom(self, depth: int, postfix: bool = True) -> _Size:
        """One operand, with its postfix operators (``^``, ``**``, ``!``, ``_``) unless ``postfix`` is False."""
        if depth > MAX_NESTING:
            raise _Refuse(f"operators nested deeper than {MAX_NESTING}")
        tok = self.tokens[self.i]
        self.i += 1
        if tok[0].isdigit() or tok[0] == ".":
            size = _number(tok)
        elif tok in _OPEN:
            size = self.sequence(depth + 1)
            if self._peek() in _CLOSE:
                self.i += 1
        elif tok in _FRACTIONS:
            a, b = self._operand(depth), self._operand(depth)
            size = self._check(_Size(a.digits + b.digits, a.numeric and b.numeric), "a fraction")
        elif tok in _BINOMIALS:
            size = self._binomial(self._operand(depth), self._operand(depth))
        elif tok == "\\sqrt":
            if self._peek() == "[":
                self.atom(depth + 1)
            size = self._operand(depth)
        elif tok in _SERIES:
            size = self._series(tok, depth)
        else:  # a letter, a constant, a function name, an unknown command: a symbol
            size = _Size()
        return self._postfix(size, depth) if postfix else size

    def _operand(self, depth: int, postfix: bool = True) -> _Size:
        return self.atom(depth + 1, postfix) if self._peek() not in (None, *_CLOSE) else _Size()

    def _postfix(self, size: _Size, depth: int) -> _Size:
        while (tok := self._peek()) in ("^", "**", "!", "_"):
            self.i += 1
            if tok == "!":
                size = self._factorial(size)
            elif tok == "_":  # a subscript: x_{1}^{2} is (x_1)^2
                self._operand(depth, postfix=False)
            else:
                size = self._power(size, self._operand(depth))
        return size

    def _power(self, base: _Size, exponent: _Size) -> _Size:
        if not exponent.numeric:
            return _Size(base.digits, numeric=False)
        bound = _exp10(exponent.digits)  # |exponent| <= bound
        if base.numeric:
            digits = 0.0 if base.digits == 0 else bound * base.digits
            return self._check(_Size(digits, numeric=True), "a power")
        limit, what = (MAX_SUM_EXPONENT, "a sum") if base.is_sum else (MAX_SYMBOL_EXPONENT, "a symbol")
        if bound > limit:
            raise _Refuse(f"{what} raised to a power up to {bound:.3g} (limit {limit})")
        return _Size(bound * base.digits, numeric=False)

    def _factorial(self, n: _Size) -> _Size:
        if not n.numeric:
            return _Size(n.digits, numeric=False)
        bound = _exp10(n.digits)
        digits = bound * math.log10(bound) if bound > 1 else 0.0
        return self._check(_Size(digits, numeric=True), "a factorial")

    def _binomial(self, n: _Size, k: _Size) -> _Size:
        if not (n.numeric and k.numeric):
            return _Size(n.digits + k.digits, numeric=False)
        digits = min(_exp10(n.digits) * math.log10(2), _exp10(k.digits) * n.digits)
        return self._check(_Size(digits, numeric=True), "a binomial coefficient")

    def _series(self, name: str, depth: int) -> _Size:
        for _ in range(2):  # \sum_{k=1}^{n} or \sum^{n}_{k=1}
            if self._peek() not in ("_", "^"):
                break
            self.i += 1
            bound = self._operand(depth, postfix=False)
            if bound.numeric and _exp10(bound.digits) > MAX_SERIES_BOUND:
                raise _Refuse(
                    f"{name} with a bound up to {_exp10(bound.digits):.3g} (limit {MAX_SERIES_BOUND})"
                )
        return _Size()


def unbounded_reason(answer: str) -> str | None:
    """Why sympy may not finish grading ``answer`` in bounded time, or None when it will.

    Args:
        answer: A normalised answer (box content).

    Returns:
        None for an answer within every limit of this module; otherwise a short reason, e.g.
        ``"a power with more than 100000 digits"``.
    """
    if len(answer) > MAX_CHARS:
        return f"longer than {MAX_CHARS} characters"
    walk = _Walk(answer)
    try:
        while walk.i < len(walk.tokens):
            walk.sequence(0)
            walk.i += 1  # an unmatched closing bracket
    except _Refuse as e:
        return str(e)
    return None
