"""The tiny BuPO run through verl's own trainer on CPU: phases, parameters, weight sync, resume, outputs."""

from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file

INTERNAL_LAYER, S_INTER, N_LAYERS = 1, 3, 4  # recipe/bupo/config/preset/tiny_cpu.yaml


def training_steps(run) -> dict[int, dict]:
    return {s: d for s, d in run.steps().items() if "critic/score/mean" in d}


def test_phase_per_step(bupo_resumed_run):
    """Steps 1..s_inter train pi^{k+1} (logged bupo/phase 1, bupo/exit_layer k), later steps the full policy."""
    _, run = bupo_resumed_run
    steps = training_steps(run)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for s, d in steps.items():
        if s <= S_INTER:
            assert (d["bupo/phase"], d["bupo/exit_layer"]) == (1.0, float(INTERNAL_LAYER)), s
        else:
            assert (d["bupo/phase"], d["bupo/exit_layer"]) == (2.0, -1.0), s


def _checkpoint_state(ckpt_dir) -> dict[str, torch.Tensor]:
    path = ckpt_dir / "actor" / "model_world_size_1_rank_0.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: (v.to_local() if hasattr(v, "to_local") else v).float() for k, v in state.items()}


def test_phase1_changes_only_layers_up_to_k(bupo_resumed_run, toy_dir):
    """At the step-2 checkpoint (phase 1): layers > k and the final norm are bit-identical to the initial
    model; layers <= k, the embedding and the head changed."""
    first, _ = bupo_resumed_run
    initial = {k: v.float() for k, v in load_file(toy_dir / "model" / "model.safetensors").items()}
    trained = _checkpoint_state(first.out_dir / "ckpt" / "global_step_2")
    assert set(trained) == set(initial)
    frozen = [k for k in initial if k == "model.norm.weight" or _layer(k) > INTERNAL_LAYER]
    moved = [k for k in initial if k not in frozen]
    assert len(frozen) > 0 and any("embed_tokens" in k for k in moved) and any("lm_head" in k for k in moved)
    for k in frozen:
        assert torch.equal(trained[k], initial[k]), f"{k} changed in phase 1"
    for layer in range(INTERNAL_LAYER + 1):
        keys = [k for k in moved if _layer(k) == layer and k.endswith("proj.weight")]
        assert keys and all(not torch.equal(trained[k], initial[k]) for k in keys), (
            f"layer {layer} did not train"
        )
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert not torch.equal(trained[k], initial[k]), f"{k} did not train"


def _layer(key: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


def test_vllm_serves_updated_weights(bupo_resumed_run):
    """After phase-1 and phase-2 updates, vLLM's rollout log-probs match the actor's full policy."""
    _, run = bupo_resumed_run
    steps = training_steps(run)
    for s in (4, 5, 6):
        d = steps[s]
        assert d["training/rollout_probs_diff_mean"] < 2e-3, (s, d["training/rollout_probs_diff_mean"])
        assert d["training/rollout_actor_probs_pearson_corr"] > 0.99, s
    # Step 4 rolls out with weights updated at steps 1-3 (phase 1 moved embedding, head, layers <= k):
    # stale weights in vLLM would show here as a large difference.
    assert steps[3]["bupo/kl_internal_full"] > 0


def test_phase1_rollout_comparisons_are_relabelled(bupo_resumed_run):
    """In phase 1 rollout-vs-actor comparisons compare with pi^k: logged as bupo/phase1_*, not under
    their usual names (which would read as an off-policy alarm)."""
    _, run = bupo_resumed_run
    steps = training_steps(run)
    for s in range(1, S_INTER + 1):
        usual = [k for k in steps[s] if k.startswith(("rollout_corr/", "training/rollout_"))]
        assert usual == [], (s, usual)
        assert "bupo/phase1_rollout_probs_diff_mean" in steps[s]
        assert any(k.startswith("bupo/phase1_rollout_corr/") for k in steps[s])
    assert any(k.startswith("rollout_corr/") for k in steps[S_INTER + 1])


def test_resume_lands_in_the_right_phase_and_keeps_the_log(bupo_resumed_run):
    """Stopped after the step-2 checkpoint (phase 1), the restarted run logs steps 3.. into a new
    segment, keeps the first segment, and step 3 is still phase 1."""
    _, second = bupo_resumed_run
    names = [p.name for p in second.log_files()]
    assert names == ["tiny_cpu_bupo_l1_s3.jsonl", "tiny_cpu_bupo_l1_s3.1.jsonl"]
    segments: dict[int, list[int]] = {}
    for rec in second.records():
        if "critic/score/mean" in rec["data"]:
            segments.setdefault(rec["segment"], []).append(rec["step"])
    assert segments == {0: [1, 2], 1: [3, 4, 5, 6]}
    assert training_steps(second)[3]["bupo/phase"] == 1.0, "step 3 <= s_inter must still be phase 1"


def test_validation_before_and_after(bupo_resumed_run):
    _, run = bupo_resumed_run
    steps = run.steps()
    key = "val-core/toy/digits/acc/mean@2"
    assert key in steps[0], "validation before training (step 0)"
    assert key in steps[2] and key in steps[6], "validation at the last step of each part"
    assert all(0.0 <= steps[s][key] <= 1.0 for s in (0, 2, 6))


def test_outputs_plot_and_summary(bupo_resumed_run):
    _, run = bupo_resumed_run
    assert (run.out_dir / "plots" / "metrics.png").stat().st_size > 10_000
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["steps"] == [1, 2, 3, 4, 5, 6]
    assert (
        summary["phase_per_step"]["1"].startswith("pi^2") and summary["phase_per_step"]["4"] == "full policy"
    )
    assert "train reward" in run.output and "steps 1-3: pi^2 (layer 1)" in run.output
    reward = summary["reward"]
    assert not math.isnan(reward["first"]) and not math.isnan(reward["last"])


def test_console_shows_bupo_progress(bupo_resumed_run):
    """BuPO's own log lines reach the driver's console from inside Ray (self-test, phase switch)."""
    first, second = bupo_resumed_run
    assert "BuPO: slicing self-test passed on the actor model" in first.output
    assert "BuPO: step 1 trains layer 1" in first.output
    assert "BuPO: step 4 trains the full policy" in second.output
    assert "Training Progress" in first.output


@pytest.mark.parametrize("part", [0, 1])
def test_nothing_left_behind(bupo_resumed_run, part):
    """No process, temporary folder (Ray session, sockets) or /dev/shm segment of the run outlives it."""
    from verl_ext.cpu.supervise import processes_of_run

    run = bupo_resumed_run[part]
    m = re.search(r"supervise: run id (\w+), temporary folder (\S+)", run.output)
    assert m and "supervise: exit status 0" in run.output
    run_id, tmp = m.group(1), m.group(2)
    assert not os.path.exists(tmp)
    assert processes_of_run(run_id) == [], "leftover processes"
    assert not bupo_resumed_run[1].extra["shm_left"], (
        f"left in /dev/shm: {bupo_resumed_run[1].extra['shm_left']}"
    )
