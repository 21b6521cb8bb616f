"""Property-based fuzzing of the ``bupo:`` block: every input validates or raises BuPOConfigError naming a key."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verl_ext.bupo.config import BuPOConfig, BuPOConfigError, validate_config

KEYS = (
    "enable",
    "internal_layer",
    "internal_steps",
    "final_norm",
    "schedule",
    "self_test",
    "head_chunk_size",
    "full_policy_metrics_freq",
    "full_policy_metrics_samples",
    "layer_entropy_freq",
    "layer_entropy_samples",
)
# What check_verl_config reads, set to values it accepts: only the bupo block varies.
VERL = {
    "trainer": {"use_v1": True, "v1": {"trainer_mode": "bupo_sync"}},
    "actor_rollout_ref": {"actor": {"strategy": "fsdp2"}, "rollout": {"n": 8}},
    "algorithm": {"adv_estimator": "grpo"},
}

# Anything a YAML file or a Hydra override can hold.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70),
    st.integers(-(10**40), 10**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["auto", "5", "true", "null", ""]),
)
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
small_int = st.integers(-2, 70)
stage = st.one_of(
    st.fixed_dictionaries({"layer": small_int, "steps": st.integers(-1, 40)}),
    st.fixed_dictionaries({"layer": anything, "steps": anything}),
    st.fixed_dictionaries({"layer": small_int}, optional={"steps": small_int, "extra": anything}),
    st.lists(small_int, max_size=3),
    anything,
)
good_stages = st.lists(
    st.fixed_dictionaries({"layer": st.integers(0, 70), "steps": st.integers(0, 40)}), max_size=5
)
schedule = st.one_of(
    st.none(),
    st.just([]),
    st.lists(stage, max_size=5),
    good_stages,
    good_stages.map(lambda s: s + s),  # duplicate stages
    good_stages.map(lambda s: sorted(s, key=lambda x: -x["layer"])),  # top-down order
    anything,
)


def _value(key: str):
    if key in ("enable", "final_norm", "self_test"):
        return st.one_of(st.booleans(), anything)
    if key == "internal_layer":
        return st.one_of(st.none(), small_int, anything)
    if key == "schedule":
        return schedule
    if key == "head_chunk_size":
        return st.one_of(st.none(), st.just("auto"), st.integers(-3, 5000), anything)
    return st.one_of(small_int, st.integers(-(10**40), 10**40), anything)


PLAUSIBLE = {
    "enable": st.booleans(),
    "internal_layer": st.one_of(st.none(), st.integers(0, 70)),
    "internal_steps": st.integers(0, 40),
    "final_norm": st.booleans(),
    "schedule": schedule.filter(lambda s: s is None or isinstance(s, list)),
    "self_test": st.booleans(),
    "head_chunk_size": st.one_of(st.none(), st.just("auto"), st.integers(1, 5000)),
    "full_policy_metrics_freq": st.integers(0, 20),
    "full_policy_metrics_samples": st.integers(1, 20),
    "layer_entropy_freq": st.integers(0, 20),
    "layer_entropy_samples": st.integers(1, 20),
}
blocks = st.one_of(
    st.fixed_dictionaries({}, optional=PLAUSIBLE),  # mostly valid: exercises the accepting side
    st.builds(
        lambda known, unknown: {**unknown, **known},
        st.fixed_dictionaries({}, optional={k: _value(k) for k in KEYS}),
        st.dictionaries(st.one_of(st.text(min_size=1, max_size=8), st.integers()), anything, max_size=2),
    ),
    st.fixed_dictionaries({}, optional={k: _value(k) for k in KEYS}),
    anything,  # not a mapping at all (or an empty one)
)


def _names_a_key(err: BuPOConfigError, block) -> bool:
    msg = str(err)
    names = list(KEYS) + ([str(k) for k in block] if isinstance(block, dict) else [])
    return any(f"bupo.{name}" in msg for name in names)


def _stage_pairs(block: dict) -> list[tuple[int, int]]:
    """(layer, steps) of a schedule the validator accepted, read directly from the input."""
    return [
        (s["layer"], s["steps"]) if isinstance(s, dict) else (s[0], s[1]) for s in block.get("schedule") or []
    ]


def _check_accepted(cfg: BuPOConfig, block: dict, depth: int) -> None:
    """An accepted block, checked against an independent reading of the input."""
    for key in ("enable", "final_norm", "self_test"):
        assert isinstance(cfg.__getattribute__(key), bool) and cfg.__getattribute__(key) == block.get(
            key, getattr(BuPOConfig, key)
        )
    for key in ("internal_steps", "full_policy_metrics_freq", "layer_entropy_freq"):
        val = block.get(key, getattr(BuPOConfig, key))
        assert type(val) is int and val >= 0
    for key in ("full_policy_metrics_samples", "layer_entropy_samples"):
        val = block.get(key, getattr(BuPOConfig, key))
        assert type(val) is int and val >= 1
    chunk = block.get("head_chunk_size")
    assert chunk in (None, "auto") or (type(chunk) is int and chunk > 0)
    layer = block.get("internal_layer")
    assert layer is None or (type(layer) is int and 0 <= layer < depth)
    stages = _stage_pairs(block)
    assert all(type(a) is int and type(b) is int and 0 <= a < depth and b >= 0 for a, b in stages)
    if not stages:
        stages = [(layer, block.get("internal_steps", 0))] if block.get("internal_steps", 0) else []
    total = sum(steps for _, steps in stages)
    assert cfg.phase1_active == (cfg.enable and total > 0)
    assert total > 0 or not cfg.enable  # enable=true without a phase-1 step is rejected
    if cfg.enable:  # the schedule walks the stages in the given order, duplicates included
        step = 1
        for want, steps in stages:
            for _ in range(min(steps, 3)):
                assert cfg.schedule_obj.layer_at(step) == want
                step += 1
            step += max(steps - 3, 0)
        assert cfg.schedule_obj.layer_at(total + 1) == -1


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block=blocks, depth=st.integers(1, 64))
def test_bupo_block_validates_or_names_a_key(block, depth):
    try:
        BuPOConfig.from_dict(block)
    except BuPOConfigError as e:
        assert _names_a_key(e, block), str(e)
    try:
        cfg = validate_config(
            {**VERL, "bupo": block}, hf_config=SimpleNamespace(num_hidden_layers=depth), self_test=False
        )
    except BuPOConfigError as e:
        assert _names_a_key(e, block), str(e)
        return
    _check_accepted(cfg, block if isinstance(block, dict) else {}, depth)


@settings(max_examples=300, deadline=None)
@given(stages=good_stages, depth=st.integers(1, 64), enable=st.booleans())
def test_well_formed_schedules_are_judged_by_range_and_steps_only(stages, depth, enable):
    """Duplicates and any order are allowed; what decides is the layer range and whether any step trains."""
    block = {"enable": enable, "schedule": stages}
    in_range = all(s["layer"] < depth for s in stages)
    trains = sum(s["steps"] for s in stages) > 0
    try:
        cfg = validate_config(
            {**VERL, "bupo": block}, hf_config=SimpleNamespace(num_hidden_layers=depth), self_test=False
        )
    except BuPOConfigError as e:
        assert not in_range or (enable and not trains), str(e)
        return
    assert in_range and (trains or not enable)
    _check_accepted(cfg, block, depth)
