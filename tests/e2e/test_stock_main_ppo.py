"""BuPO from verl's stock ``python -m verl.trainer.main_ppo``: no entry point of ours, only overrides."""

from __future__ import annotations

import json

from _stock import BUPO, stock_run


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
