"""Grading table, time bounds and robustness of ``verl_ext.reward.compute_score``."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from _graders import grader_processes

from verl_ext import reward
from verl_ext.reward import compute_score, last_boxed

MB = 1_000_000

# (id, solution_str, ground_truth, expected score, expected reason or None). Verdicts are written by hand.
CASES = [
    # integers and plain numbers
    ("int", "So the answer is \\boxed{42}.", "42", 1.0, "match"),
    ("int-wrong", "So the answer is \\boxed{41}.", "42", 0.0, "mismatch"),
    ("int-gold-int", "\\boxed{42}", 42, 1.0, "match"),
    ("int-gold-float", "\\boxed{27}", 27.0, 1.0, "match"),
    ("space-after-boxed", "\\boxed {42}", "42", 1.0, "match"),
    ("boxed-no-braces", "the answer is $\\boxed 7$", "7", 1.0, "match"),
    ("displaystyle", "\\boxed{\\displaystyle 12}", "12", 1.0, "match"),
    # fractions and decimals
    ("dfrac-vs-decimal", "\\boxed{\\dfrac{1}{2}}", "0.5", 1.0, "match"),
    ("frac-vs-dfrac", "\\boxed{\\frac{3}{4}}", "\\dfrac{3}{4}", 1.0, "match"),
    ("frac-wrong", "\\boxed{\\frac{3}{5}}", "\\dfrac{3}{4}", 0.0, "mismatch"),
    ("decimal-vs-frac", "\\boxed{1.25}", "\\frac{5}{4}", 1.0, "match"),
    ("slash-frac", "\\boxed{5/4}", "\\dfrac{5}{4}", 1.0, "match"),
    ("decimal-too-coarse", "\\boxed{0.33}", "\\frac{1}{3}", 0.0, "mismatch"),
    ("dollar-math", "\\boxed{$\\frac12$}", "0.5", 1.0, "match"),
    ("nested-braces", "\\boxed{\\frac{\\sqrt{3}}{2}}", "\\dfrac{\\sqrt{3}}{2}", 1.0, "match"),
    ("frac-times-x", "\\boxed{\\frac{3x}{5}}", "\\dfrac{3}{5}x", 1.0, "match"),
    # thousands separators
    ("thousands-comma", "\\boxed{1,000}", "1000", 1.0, "match"),
    ("thousands-thin-space", "\\boxed{10\\,800}", "10800", 1.0, "match"),
    ("thousands-braced-comma", "\\boxed{1{,}234{,}567}", "1234567", 1.0, "match"),
    ("thousands-wrong", "\\boxed{1,001}", "1000", 0.0, "mismatch"),
    # intervals, tuples, sets
    ("interval", "\\boxed{[1, 2)}", "[1,2)", 1.0, "match"),
    ("interval-wrong-ends", "\\boxed{(1,2]}", "[1,2)", 0.0, "mismatch"),
    (
        "interval-union",
        "\\boxed{(-\\infty,-2)\\cup(0,1)\\cup(2,4)}",
        "(-\\infty, -2) \\cup (0, 1) \\cup (2, 4)",
        1.0,
        "match",
    ),
    ("tuple", "\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0, "match"),
    ("tuple-order", "\\boxed{(\\frac{\\pi}{2}, 3)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0, "mismatch"),
    ("list-any-order", "\\boxed{7,5,3}", "3, 5, 7", 1.0, "match"),
    ("escaped-brace-set", "\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0, "match"),
    (
        "matrix",
        "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
        "\\begin{pmatrix}1\\\\2\\end{pmatrix}",
        1.0,
        "match",
    ),
    # pi, roots, complex numbers, symbols
    ("pi-commuted", "\\boxed{\\pi \\cdot 2}", "2\\pi", 1.0, "match"),
    ("pi-approx", "\\boxed{3.14}", "\\pi", 0.0, "mismatch"),
    ("sqrt-braces", "\\boxed{11\\sqrt{2}}", "11\\sqrt2", 1.0, "match"),
    ("complex", "\\boxed{6-5i}", "6 - 5i", 1.0, "match"),
    ("symbolic", "\\boxed{-q + p}", "p - q", 1.0, "match"),
    ("infinity", "\\boxed{\\infty}", "\\infty", 1.0, "match"),
    ("minus-infinity", "\\boxed{-\\infty}", "\\infty", 0.0, "mismatch"),
    ("zero-vs-infinity", "\\boxed{0}", "\\infty", 0.0, "mismatch"),
    ("equation-vs-value", "\\boxed{x = 5}", "5", 1.0, "match"),
    # units
    ("degrees", "\\boxed{90^\\circ}", "90", 1.0, "match"),
    ("text-unit", "\\boxed{10 \\text{ cm}}", "10", 1.0, "match"),
    ("gold-unit", "\\boxed{18}", "18 \\text{ integers}", 1.0, "match"),
    ("dollar-sign", "\\boxed{\\$5}", "5", 1.0, "match"),
    ("percent", "\\boxed{50\\%}", "50", 1.0, "match"),
    # text answers
    ("name", "\\boxed{Evelyn}", "\\text{Evelyn}", 1.0, "match"),
    ("name-anagram", "\\boxed{Nevely}", "\\text{Evelyn}", 0.0, "mismatch"),
    ("yes", "\\boxed{Yes}", "Yes", 1.0, "match"),
    ("yes-lower", "\\boxed{yes}", "Yes", 1.0, "match"),
    ("yes-text", "\\boxed{\\text{Yes}}", "Yes", 1.0, "match"),
    ("yes-bold-upper-period", "\\boxed{\\textbf{YES}.}", "Yes", 1.0, "match"),
    ("yes-gold-lower", "\\boxed{\\text{Yes}}", "yes", 1.0, "match"),
    ("no-vs-yes", "\\boxed{No}", "Yes", 0.0, "mismatch"),
    ("yes-anagram", "\\boxed{sey}", "Yes", 0.0, "mismatch"),
    ("yes-with-words", "\\boxed{\\text{yes, it converges}}", "Yes", 0.0, "mismatch"),
    ("true-vs-yes", "\\boxed{True}", "Yes", 0.0, "mismatch"),
    ("true-vs-false", "\\boxed{\\text{True}}", "False", 0.0, "mismatch"),
    ("false-lower", "\\boxed{false}", "False", 1.0, "match"),
    ("no-mathrm", "\\boxed{\\mathrm{No}}", "No", 1.0, "match"),
    # multiple choice letters
    ("choice-parens", "\\boxed{(B)}", "B", 1.0, "match"),
    ("choice-text-gold", "\\boxed{C}", "\\text{(C)}", 1.0, "match"),
    ("choice-text-pred", "\\boxed{\\text{(B)}}", "B", 1.0, "match"),
    ("choice-wrong", "\\boxed{D}", "B", 0.0, "mismatch"),
    # several boxes, odd boxes
    ("last-box-correct", "First \\boxed{3}, then corrected: \\boxed{4}", "4", 1.0, "match"),
    ("last-box-wrong", "\\boxed{4} ... actually \\boxed{3}", "4", 0.0, "mismatch"),
    ("fbox", "\\fbox{7}", "7", 1.0, "match"),
    ("fbox-after-boxed", "\\boxed{6} no: \\fbox{7}", "7", 1.0, "match"),
    ("nested-box", "\\boxed{\\boxed{5}}", "5", 1.0, "match"),
    ("boxed-command-prefix", "\\boxed{5} \\boxedanswer{6}", "5", 1.0, "match"),
    ("gold-boxed", "\\boxed{5}", "\\boxed{5}", 1.0, "match"),
    ("empty-box-skipped", "\\boxed{42}. Format: \\boxed{}", "42", 1.0, "match"),
    # failures: no answer, malformed, empty, None
    ("no-box", "The answer is 42.", "42", 0.0, "no_box"),
    ("empty-string", "", "42", 0.0, "no_box"),
    ("none-solution", None, "42", 0.0, "invalid_input"),
    ("int-solution", 42, "42", 0.0, "invalid_input"),
    ("bytes-solution", b"\\boxed{42}", "42", 1.0, "match"),
    ("none-ground-truth", "\\boxed{42}", None, 0.0, "no_ground_truth"),
    ("empty-ground-truth", "\\boxed{42}", "  ", 0.0, "no_ground_truth"),
    ("only-empty-box", "\\boxed{}", "42", 0.0, "empty_box"),
    ("unclosed-last-box", "\\boxed{42} so \\boxed{4", "42", 0.0, "unclosed_box"),
    ("boxed-at-end", "the answer is \\boxed", "42", 0.0, "unclosed_box"),
    ("extra-closing-brace", "\\boxed{42}}", "42", 1.0, "match"),
    ("unbalanced-inside", "\\boxed{\\frac{1}{2}", "0.5", 0.0, "unclosed_box"),
    ("garbage-latex", "\\boxed{\\frac{{}}\\sqrt[}{}", "1", 0.0, None),
    # megabyte inputs
    ("1mb-then-box", "x" * MB + " \\boxed{42}", "42", 1.0, "match"),
    ("1mb-no-box", "x" * MB, "42", 0.0, "no_box"),
    ("1mb-in-box", "\\boxed{" + "1" * MB + "}", "42", 0.0, "answer_too_long"),
    ("1mb-open-braces", "\\boxed" + "{" * MB, "42", 0.0, "answer_too_long"),
    ("1mb-of-boxes", "\\boxed{}" * (MB // 8), "42", 0.0, "empty_box"),
]


@pytest.mark.parametrize(
    ("solution", "gold", "score", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_grading_table(solution, gold, score, reason):
    t0 = time.monotonic()
    out = compute_score("test", solution, gold)
    elapsed = time.monotonic() - t0
    assert out["score"] == score, out
    assert out["acc"] is (score == 1.0)
    if reason is not None:
        assert out["reason"] == reason, out
    assert elapsed < reward.DEFAULT_TIMEOUT_S + 2.0


def test_table_is_large_and_balanced():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
    scores = [c[3] for c in CASES]
    assert scores.count(1.0) >= 15 and scores.count(0.0) >= 15


def test_result_keys_are_constant_and_scalar():
    outs = [
        compute_score("a", "\\boxed{1}", "1"),
        compute_score("b", None, None),
        compute_score("c", "no box", "1"),
        compute_score(None, "\\boxed{x}", "\\frac{1}{2}"),
    ]
    keys = set(outs[0])
    assert {"score", "acc", "pred", "reason", "method", "source"} <= keys
    for out in outs:
        assert set(out) == keys
        assert isinstance(out["score"], float) and isinstance(out["acc"], bool)
        assert all(isinstance(out[k], str) for k in ("pred", "reason", "method", "source"))
        assert out["reason"] in reward.REASONS and out["method"] in reward.METHODS
    assert outs[0]["pred"] == "1" and outs[0]["source"] == "a"


@pytest.mark.parametrize(
    ("text", "content", "status"),
    [
        ("a \\boxed{1} b \\boxed{2} c", "2", "ok"),
        ("\\boxed{a{b}c}", "a{b}c", "ok"),
        ("\\boxed{\\}}", "\\}", "ok"),
        ("\\boxed{a\\\\}", "a\\\\", "ok"),
        ("\\fbox{x} then \\boxed{y}", "y", "ok"),
        ("\\boxed{y} then \\fbox{x}", "x", "ok"),
        ("nothing", None, "no_box"),
        ("\\boxed{ }", None, "empty_box"),
        ("\\boxed{1", None, "unclosed_box"),
    ],
)
def test_last_boxed(text, content, status):
    assert last_boxed(text) == (content, status)


def test_list_ground_truth_accepts_any():
    assert compute_score("s", "\\boxed{0.5}", ["1/3", "\\frac{1}{2}"])["score"] == 1.0
    assert compute_score("s", "\\boxed{0.25}", ["1/3", "\\frac{1}{2}"])["score"] == 0.0


# --------------------------------------------------------------------------------------------------------
# Time bounds
# --------------------------------------------------------------------------------------------------------

SLOW_PRED = "9^{9^{9^{9}}}"  # math-verify tries to evaluate a tower of powers against 2


def test_pathological_input_is_really_slow_without_the_bound():
    """The slow path is real: unbounded math-verify is still busy after several seconds."""
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=reward.math_verify_equal, args=("2", SLOW_PRED), daemon=True)
    p.start()
    p.join(6.0)
    still_running = p.is_alive()
    if still_running:
        p.kill()
        p.join()
    assert still_running, "math-verify finished the pathological input; pick a slower one"


def test_timeout_bounds_pathological_input_and_pool_recovers():
    compute_score("warm", "\\boxed{\\frac{1}{2}}", "0.5")  # start a grader process first
    t0 = time.monotonic()
    out = compute_score("s", f"\\boxed{{{SLOW_PRED}}}", "2", timeout_s=1.0)
    elapsed = time.monotonic() - t0
    assert out["score"] == 0.0 and out["reason"] == "timeout" and out["method"] == "math_verify"
    assert elapsed < 3.0
    # the overrunning worker was replaced; grading goes on
    assert compute_score("s", "\\boxed{\\sqrt{4}}", "2")["score"] == 1.0


def test_works_from_threads():
    """verl calls sync reward functions from a thread pool: no signal-based timeouts allowed."""
    items = [
        ("\\boxed{\\frac{2}{4}}", "0.5", 1.0),
        ("\\boxed{\\sqrt{9}}", "3", 1.0),
        ("\\boxed{x^2}", "x^3", 0.0),
    ]
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda it: compute_score("s", it[0], it[1]), items * 3))
    assert [o["score"] for o in outs] == [it[2] for it in items] * 3
    assert threading.current_thread() is threading.main_thread()


def test_inline_mode_is_bounded_too(monkeypatch):
    """``BUPO_REWARD_WORKERS=0`` grades in a daemon thread and still returns on time."""

    def slow_equal(gold, pred):
        time.sleep(3.0)
        return True

    reward.configure(max_workers=0)
    try:
        assert compute_score("s", "\\boxed{\\frac{6}{8}}", "0.75")["score"] == 1.0
        monkeypatch.setattr(reward, "math_verify_equal", slow_equal)
        t0 = time.monotonic()
        out = compute_score("s", "\\boxed{\\frac{5}{8}}", "0.6", timeout_s=0.5)
        assert out["reason"] == "timeout" and out["score"] == 0.0
        assert time.monotonic() - t0 < 1.5
    finally:
        reward.configure(max_workers=None)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dead_worker_is_replaced():
    compute_score("s", "\\boxed{\\frac{1}{7}}", "1/7")
    graders = grader_processes()
    assert graders
    for p in graders:
        p.kill()
        while _alive(p):  # dead (a zombie, or already reaped by the pool's own bookkeeping)
            time.sleep(0.01)
    assert compute_score("s", "\\boxed{\\frac{2}{7}}", "2/7")["score"] == 1.0


def test_through_verl_reward_manager(tokenizer):
    """verl loads ``pkg://verl_ext.reward`` and its naive reward manager calls it from an executor thread."""
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://verl_ext.reward",
                    "name": "compute_score",
                    "reward_kwargs": {"timeout_s": 2.0},
                }
            }
        }
    )
    manager = NaiveRewardManager(cfg, tokenizer, get_custom_reward_fn(cfg))

    def run(response: str, gold: str) -> dict:
        prompt = tokenizer.encode("What is 1 + 1?", add_special_tokens=False)
        resp = tokenizer.encode(response, add_special_tokens=False)
        pad = [tokenizer.pad_token_id] * 3
        data = DataProto.from_dict(
            tensors={
                "prompts": torch.tensor([prompt]),
                "responses": torch.tensor([resp + pad]),
                "attention_mask": torch.tensor([[1] * (len(prompt) + len(resp)) + [0] * len(pad)]),
            },
            non_tensors={
                "data_source": np.array(["qwen_math500"], dtype=object),
                "reward_model": np.array([{"ground_truth": gold, "style": "rule"}], dtype=object),
                "extra_info": np.array([{"index": 0}], dtype=object),
            },
        )
        return manager.loop.run_until_complete(manager.run_single(data))

    out = run("so 2/4 = \\boxed{\\frac{1}{2}}", "0.5")
    assert out["reward_score"] == 1.0
    assert out["reward_extra_info"]["acc"] is True and out["reward_extra_info"]["source"] == "qwen_math500"
    assert run(f"\\boxed{{{SLOW_PRED}}}", "2")["reward_extra_info"]["reason"] == "timeout"


def test_falls_back_to_threads_without_child_processes(monkeypatch):
    def no_children(process_obj):
        raise AssertionError("daemonic processes are not allowed to have children")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "_Popen", staticmethod(no_children))
    reward.configure(max_workers=1)
    try:
        out = compute_score("s", "\\boxed{\\frac{10}{4}}", "2.5")
        assert out["score"] == 1.0 and out["method"] == "math_verify"
        assert reward.grading_mode() == "threads"
    finally:
        monkeypatch.undo()
        reward.configure(max_workers=None)
    assert reward.grading_mode() == "processes"
