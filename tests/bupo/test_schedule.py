"""The phase schedule: steps from 1, one-way switch, bottom-up stages, bad input."""

from __future__ import annotations

import pytest

from verl_ext.bupo.schedule import FULL_POLICY, Schedule, Stage


def test_paper_schedule_boundaries():
    s = Schedule.from_config(5, 30, None)
    assert [s.layer_at(t) for t in (1, 2, 29, 30, 31, 32, 300)] == [5, 5, 5, 5, -1, -1, -1]
    assert s.total_steps == 30
    assert "steps 1-30: layer 5 (paper pi^6)" in s.describe()


def test_bottom_up_schedule():
    s = Schedule.from_config(None, 0, [{"layer": 5, "steps": 20}, [17, 10]])
    assert s.stages == (Stage(5, 20), Stage(17, 10))
    got = {t: s.layer_at(t) for t in (1, 20, 21, 30, 31)}
    assert got == {1: 5, 20: 5, 21: 17, 30: 17, 31: FULL_POLICY}


def test_zero_steps_is_plain_grpo():
    assert Schedule.from_config(5, 0, None).layer_at(1) == FULL_POLICY
    assert Schedule.from_config(None, 0, None).describe().startswith("full policy")


@pytest.mark.parametrize(
    "stages, match",
    [
        ([{"layer": -1, "steps": 3}], "layer must be"),
        ([{"layer": 2, "steps": -3}], "steps must be"),
        ([{"layer": 2}], "exactly the keys"),
        ([[1, 2, 3]], r"\[layer, steps\]"),
    ],
)
def test_bad_stages(stages, match):
    with pytest.raises(ValueError, match=match):
        Schedule.from_config(None, 0, stages)


def test_steps_count_from_one():
    with pytest.raises(ValueError, match="count from 1"):
        Schedule.from_config(5, 30, None).layer_at(0)
