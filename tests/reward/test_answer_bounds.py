"""``unbounded_reason``: refuses what sympy cannot bound, never a real answer; its size bounds are upper bounds."""

from __future__ import annotations

import math
import multiprocessing
from unittest import mock

import pytest
from _answers import PATHOLOGICAL
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reward import CASES

from verl_ext import answer_bounds, reward
from verl_ext.answer_bounds import unbounded_reason


@pytest.mark.parametrize("answer", PATHOLOGICAL)
def test_pathological_answers_are_refused(answer):
    assert unbounded_reason(answer) is not None


@pytest.mark.parametrize(
    "answer",
    ["(x+1)^{1000}", "(x+y+z)^{200}", "\\binom{10^{9}}{10^{5}}", "\\prod_{k=1}^{10^{6}} k"],
    ids=["sum-power", "trinomial-power", "binomial", "product"],
)
def test_refused_answers_really_run_away(answer):
    """Independent evidence: unbounded math-verify is still busy on them after 3 s (spawned, then killed).

    Each ran past 8 s on the 2-core development machine.
    """
    assert unbounded_reason(answer) is not None
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=reward.math_verify_equal, args=("2", answer), daemon=True)
    p.start()
    p.join(3.0 + 2.0)  # about 1-2 s of the budget go to the child's start-up and imports
    still_running = p.is_alive()
    if still_running:
        p.kill()
        p.join()
    assert still_running, f"math-verify finished {answer!r}"


def test_no_answer_of_the_grading_table_is_refused():
    """Every box of the hand-written grading table (real answers) stays gradable in a thread."""
    checked = 0
    for _, solution, *_ in CASES:
        if not isinstance(solution, (str, bytes)):
            continue
        text = solution.decode() if isinstance(solution, bytes) else solution
        content, status = reward.last_boxed(text)
        if status == "ok":
            assert unbounded_reason(reward.normalize_answer(content)) is None, content
            checked += 1
    assert checked >= 60


@pytest.mark.parametrize(
    "answer",
    ["2^{2024}", "(x+1)^{10}", "x^{100}", "100!", "\\binom{10}{3}", "\\sum_{k=1}^{100} k^{2}", "x_{1}^{2}"],
)
def test_ordinary_large_looking_answers_pass(answer):
    assert unbounded_reason(answer) is None


def test_long_and_deep_answers_are_refused():
    assert "longer than" in unbounded_reason("1+" * 200 + "1")
    assert "nested" in unbounded_reason("{" * 40 + "1" + "}" * 40)
    assert "nested" in unbounded_reason("2" + "^" * 100 + "2")


LIMIT = 1000  # a digit limit small enough for Python ints to check exactly


@settings(max_examples=200, deadline=None)
@given(base=st.integers(2, 99), exponent=st.integers(1, 2000))  # < 4300 digits: str() works
def test_power_bound_matches_the_exact_digit_count(base, exponent):
    """``a^{b}`` is refused exactly when a**b (computed with Python ints) has more digits than the limit."""
    digits = len(str(base**exponent))
    with mock.patch.object(answer_bounds, "MAX_DIGITS", LIMIT):
        refused = unbounded_reason(f"{base}^{{{exponent}}}") is not None
    if digits > LIMIT + 1:
        assert refused
    elif digits < LIMIT:
        assert not refused


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 800))
def test_factorial_bound_is_an_upper_bound(n):
    """``n!`` is refused whenever n! really has more digits than the limit (never too lenient)."""
    digits = len(str(math.factorial(n)))
    with mock.patch.object(answer_bounds, "MAX_DIGITS", LIMIT):
        refused = unbounded_reason(f"{n}!") is not None
    if digits > LIMIT:
        assert refused
    if n * math.log10(n) < LIMIT:  # the estimate is within the limit
        assert not refused


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789^{}()[]!+-*/_ x\\frac\\sum\\binom", max_size=120))
def test_any_text_gets_an_answer_quickly(text):
    """Never raises, whatever the input (the walk is linear and its recursion is capped)."""
    out = unbounded_reason(text)
    assert out is None or isinstance(out, str)
