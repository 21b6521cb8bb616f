"""BuPO from verl's stock ``python -m verl.trainer.main_ppo``: no entry point of ours, only overrides."""

from __future__ import annotations

import json

import yaml
from _e2e import REPO
from _stock import BUPO, TINY_CPU, stock_run


def test_stock_main_ppo_trains_bupo_with_auto_layer(stock_auto_run):
    """Stock main_ppo + the plugin: phase 1 on the layer ``auto`` picks (logged, recorded, explained),
    kept after a resume without measuring again, then GRPO."""
    run, steps = stock_auto_run
    record = json.loads((run.out_dir / "ckpt" / "bupo_auto_layer.json").read_text())
    k = int(record["layer_index"])
    assert 0 <= k < 4
    assert steps[1]["bupo/auto_layer"] == k
    assert steps[3]["bupo/auto_layer"] == k, "the resumed run logs the stored layer at its first step"
    assert "bupo/layer_entropy/1" in steps[1] and "bupo/layer_entropy/1" not in steps[3], "measured once"
    assert [steps[s]["bupo/phase"] for s in (1, 2, 3, 4)] == [1.0, 1.0, 1.0, 2.0]
    assert [steps[s]["bupo/exit_layer"] for s in (1, 2, 3, 4)] == [float(k)] * 3 + [-1.0]
    assert run.output.count("BuPO auto layer: phase 1 trains layer") == 1
    assert f"layer {k}" in run.output


def test_stock_main_ppo_rejects_out_of_range_layer(e2e_root, toy_dir):
    """The same start-up check and message as the recipe, before any worker or model is built."""
    out = e2e_root / "stock_bad"
    run = stock_run(
        out, toy_dir, *BUPO, "+bupo.internal_layer=99", "+bupo.internal_steps=2", "trainer.total_training_steps=1",
        timeout=600,
    )  # fmt: skip
    assert run.rc != 0
    assert "bupo.internal_layer=99 is outside the model's range" in run.output
    assert "valid values are 0..3" in run.output
    assert "actor_rollout_init_model" not in run.output  # no worker built a model


def test_stock_overrides_are_the_tiny_cpu_preset():
    """``_stock.TINY_CPU`` writes the ``tiny_cpu`` preset out as overrides of verl's own config (what a
    team adds to its launch); apart from the run-control keys below, they must not drift from it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    run_control = {
        "trainer.val_before_train",
        "trainer.test_freq",
        "trainer.save_freq",
        "trainer.project_name",
    }
    with initialize_config_dir(config_dir=str(REPO / "recipe" / "bupo" / "config"), version_base=None):
        preset = compose("bupo_trainer", overrides=["preset=tiny_cpu"])
    drift = {}
    for override in TINY_CPU + BUPO:
        key, value = override.lstrip("+").split("=", 1)
        got = OmegaConf.select(preset, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        if key not in run_control and got != yaml.safe_load(value):
            drift[key] = (got, value)
    assert drift == {}, f"preset value vs override: {drift}"
    assert len(TINY_CPU) - len(run_control) > 25
