"""``bupo.internal_layer: auto``: config, the rule on hand-built profiles, the trainer on verl's real engine, resume."""

from __future__ import annotations

import json
import types

import pytest
import torch
from _scripts import composed_config
from _stub_trainer import stub_trainer
from transfer_queue import KVBatchMeta

from verl_ext.bupo import auto_layer
from verl_ext.bupo.config import BuPOConfig, BuPOConfigError
from verl_ext.bupo.schedule import AUTO, FULL_POLICY, Schedule, Stage

L = 4
K_BOUNDARY = 1  # the model of `boundary_model_dir`: FFN explores in paper layers 1..2, converges in 3..4


def _profile(deltas: list[float], prefix: str = "bupo") -> dict[str, float]:
    """Telemetry-shaped metrics with the given dH_FFN per paper layer (other entries filler)."""
    out = {}
    for l, d in enumerate(deltas, start=1):  # noqa: E741
        out.update(
            {f"{prefix}/delta_ffn/{l}": d, f"{prefix}/ffn_entropy/{l}": 3.0, f"{prefix}/delta_attn/{l}": 0.5}
        )
    return out


# ------------------------------------------------------------------------------------------- config
def test_auto_parses_and_waits_for_a_layer():
    cfg = BuPOConfig.from_dict({"internal_layer": AUTO, "internal_steps": 3, "auto_layer_samples": 8})
    sched = cfg.schedule_obj
    assert sched.has_auto and sched.fixed_layers == () and cfg.phase1_active and sched.total_steps == 3
    assert "steps 1-3: layer auto" in sched.describe()
    with pytest.raises(RuntimeError, match="not chosen yet"):
        sched.layer_at(1)
    assert sched.layer_at(4) == FULL_POLICY  # phase 2 needs no layer
    resolved = auto_layer.resolve_config(cfg, 2).schedule_obj
    assert [resolved.layer_at(t) for t in (1, 3, 4)] == [2, 2, FULL_POLICY] and not resolved.has_auto
    assert sched.has_auto  # the original is untouched


def test_auto_stage_in_a_schedule():
    sched = Schedule.from_config(None, 0, [{"layer": AUTO, "steps": 2}, [17, 3]])
    assert sched.fixed_layers == (17,) and sched.stages[0] == Stage(AUTO, 2)
    assert [sched.resolve(4).layer_at(t) for t in (1, 2, 3, 5, 6)] == [4, 4, 17, 17, FULL_POLICY]


@pytest.mark.parametrize(
    "block, match",
    [
        ({"internal_layer": AUTO, "internal_steps": 0}, "needs phase 1"),
        ({"internal_layer": AUTO, "internal_steps": 5, "enable": False}, "bupo.enable=false"),
        ({"schedule": [{"layer": AUTO, "steps": 2}, [AUTO, 3]]}, "at most one stage"),
        ({"schedule": [{"layer": AUTO, "steps": 0}, [3, 3]]}, "needs steps > 0"),
        ({"internal_layer": "Auto", "internal_steps": 5}, "or auto"),
        ({"internal_layer": AUTO, "internal_steps": 5, "auto_layer_samples": 0}, "auto_layer_samples"),
    ],
)
def test_bad_auto_configs(block, match):
    with pytest.raises(BuPOConfigError, match=match):
        BuPOConfig.from_dict(block)


def test_recipe_validation_skips_the_auto_layer_and_rejects_fsdp1():
    from _verl_cpu import RECIPE_CONFIG
    from hydra import compose, initialize_config_dir

    from verl_ext.bupo.config import validate_config
    from verl_ext.random_models import make_config

    hf = make_config("qwen3", num_hidden_layers=36, vocab_size=128)
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        ok = compose("bupo_trainer", overrides=["preset=qwen3_4b", "bupo.internal_layer=auto"])
        fsdp1 = compose(
            "bupo_trainer",
            overrides=[
                "preset=qwen3_4b",
                "bupo.internal_layer=auto",
                "actor_rollout_ref.actor.strategy=fsdp",
            ],
        )
    bupo = validate_config(ok, hf_config=hf, self_test=False)
    assert bupo.schedule_obj.has_auto and bupo.auto_layer_samples == 64
    with pytest.raises(
        BuPOConfigError, match="bupo.internal_layer=auto with actor_rollout_ref.actor.strategy=fsdp"
    ):
        validate_config(fsdp1, hf_config=hf, self_test=False)


def test_run_script_composes_with_auto(tmp_path):
    """``bash examples/run_qwen3_4b_bupo.sh bupo.internal_layer=auto --cfg job`` composes and validates."""

    from verl_ext.bupo.config import validate_config
    from verl_ext.random_models import make_config

    cfg = composed_config(
        "run_qwen3_4b_bupo.sh", "bupo.internal_layer=auto", DATA_DIR=str(tmp_path / "data"), N_GPUS="8"
    )
    assert cfg["bupo"]["internal_layer"] == AUTO and cfg["bupo"]["auto_layer_samples"] == 64
    hf = make_config("qwen3", num_hidden_layers=36, vocab_size=128)
    bupo = validate_config(cfg, hf_config=hf, self_test=False)
    assert bupo.schedule_obj.describe().startswith("steps 1-30: layer auto")


# ------------------------------------------------------------------------- the rule (hand-built)
@pytest.mark.parametrize(
    "deltas, k, run",
    [
        ([0.3, 0.2, -0.1, -0.4], 1, (1, 2)),  # explores in 1..2, layer 3 converges: boundary l=2
        ([0.3, 0.0, 0.2, -0.4], 0, (1, 1)),  # boundary at the first layer: layer 2 integrates (0)
        ([-0.1, 0.4, 0.2, 0.1], 3, (2, 4)),  # boundary at the last layer (with a warning)
    ],
)
def test_rule_on_hand_built_profiles(deltas, k, run):
    choice = auto_layer.choose_layer(_profile(deltas), step=1, n_responses=8)
    assert choice.checked_layer() == k and choice.boundary.run == run
    assert choice.metrics()["bupo/auto_layer"] == float(k)
    assert choice.metrics()["bupo/delta_ffn/1"] == deltas[0]  # the profile it came from
    line = choice.explanation("/ckpt/bupo_auto_layer.json")
    assert f"phase 1 trains layer {k} (paper pi^{k + 1})" in line and "\n" not in line
    assert ("WARNING" in line) is (k == L - 1)


def test_no_boundary_fails_with_the_fix():
    choice = auto_layer.choose_layer(_profile([-0.2, 0.0, -0.1, -0.5]), step=1, n_responses=8)
    assert choice.layer_index is None
    with pytest.raises(BuPOConfigError) as err:
        choice.checked_layer("/ckpt/bupo_auto_layer.json")
    msg = str(err.value)
    assert "never explores" in msg and "-0.2000, +0.0000, -0.1000, -0.5000" in msg
    assert "set bupo.internal_layer=<k> by hand" in msg and "bupo.internal_steps=0" in msg
    assert "/ckpt/bupo_auto_layer.json" in msg


def test_record_round_trip_keeps_the_stored_layer(tmp_path):
    choice = auto_layer.choose_layer(_profile([0.3, 0.2, -0.1, -0.4]), step=1, n_responses=8, model="m")
    path = auto_layer.save_record(choice, tmp_path / "ckpt")
    data = json.loads(path.read_text())
    assert data["layer_index"] == 1 and data["config_line"].startswith("bupo.internal_layer=1")
    data["layer_index"] = 3  # a hand-edited record wins: the rule is not re-applied on resume
    path.write_text(json.dumps(data))
    back, where = auto_layer.load_record([tmp_path / "elsewhere", tmp_path / "ckpt"])
    assert where == path and back.checked_layer() == 3 and back.profile == choice.profile
    assert auto_layer.load_record([tmp_path / "elsewhere"]) is None


def test_subsample_spreads_over_real_responses():
    tags = [{}] * 10 + [{"is_padding": True}] * 2
    assert auto_layer.subsample_indices(tags, 4, 2) == [0, 2, 5, 7]
    assert auto_layer.subsample_indices(tags, 3, 2) == [0, 2, 5, 7]  # rounded up to the world size
    # capped at the 10 real ones, rounded down to 8, spread: floor(j * 10 / 8)
    assert auto_layer.subsample_indices(tags, 64, 4) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert auto_layer.subsample_indices([{}], 4, 2) == []


# ------------------------------------------------------------------------------ trainer (stubbed)
class ProfileWorkerGroup:
    """Answers ``bupo_layer_entropy`` with a fixed profile and records every call."""

    def __init__(self, profile: dict):
        self.profile, self.calls = profile, []

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.calls.append(("load_checkpoint", local_path))

    def bupo_layer_entropy(self, sub):
        self.calls.append(("layer_entropy", list(sub.keys), dict(sub.extra_info)))
        return {"metrics": {k: [v] for k, v in self.profile.items()}}


def _stub_trainer(monkeypatch, ckpt_dir, wg, *, layer=AUTO, steps=2, samples=4, update=None):
    def on_update(name, batch, metrics):
        if name == "_update_actor" and update is not None:
            update(batch.extra_info["bupo_exit_layer"])

    bupo = {
        "internal_layer": layer,
        "internal_steps": steps,
        "auto_layer_samples": samples,
        "full_policy_metrics_freq": 0,
    }
    return stub_trainer(
        monkeypatch, bupo=bupo, worker_group=wg, ckpt_dir=ckpt_dir, model_path="tiny", on_call=on_update
    )


def _step(t, step, n=4):
    t.global_steps = step
    t._seen.clear()
    batch, metrics = KVBatchMeta(keys=[f"k{i}" for i in range(n)], tags=[{}] * n, partition_id="train"), {}
    t._compute_old_log_prob(batch, metrics)
    t._compute_ref_log_prob(batch, metrics)
    t._update_actor(batch, metrics)
    return {name: info["bupo_exit_layer"] for name, info in t._seen}, metrics


def test_trainer_decides_once_before_the_first_update(monkeypatch, tmp_path, capsys):
    wg = ProfileWorkerGroup(_profile([0.5, 0.4, 0.1, -0.2]))  # boundary l=3, k=2
    t = _stub_trainer(monkeypatch, tmp_path, wg)
    layers, metrics = _step(t, 1)
    assert layers == {"_compute_old_log_prob": 2, "_compute_ref_log_prob": -1, "_update_actor": 2}
    assert metrics["bupo/auto_layer"] == 2.0 and metrics["bupo/delta_ffn/3"] == 0.1
    ((_, keys, extra),) = wg.calls
    assert keys == ["k0", "k1", "k2", "k3"] and extra["bupo_final_norm"] is False
    assert "BuPO auto layer: phase 1 trains layer 2 (paper pi^3)" in capsys.readouterr().out
    assert json.loads((tmp_path / auto_layer.RECORD_NAME).read_text())["layer_index"] == 2
    layers, metrics = _step(t, 2)
    assert layers["_update_actor"] == 2 and "bupo/auto_layer" not in metrics and len(wg.calls) == 1
    assert _step(t, 3)[0]["_update_actor"] == FULL_POLICY


def test_trainer_stops_without_a_boundary(monkeypatch, tmp_path):
    wg = ProfileWorkerGroup(_profile([-0.5, -0.4, -0.1, -0.2]))
    t = _stub_trainer(monkeypatch, tmp_path, wg)
    with pytest.raises(BuPOConfigError, match="by hand"):
        _step(t, 1)
    assert not t._seen  # nothing was computed, nothing updated
    assert json.loads((tmp_path / auto_layer.RECORD_NAME).read_text())["layer_index"] is None


@pytest.mark.parametrize("record_in", ["default_local_dir", "checkpoint_parent"])
def test_resume_reuses_the_stored_layer(monkeypatch, tmp_path, capsys, record_in):
    first = _stub_trainer(monkeypatch, tmp_path / "run", ProfileWorkerGroup(_profile([0.5, -0.4, 0.1, 0.2])))
    _step(first, 1)  # chooses k=0 and writes the record
    ckpt = tmp_path / "run" / "global_step_1"
    (ckpt / "actor").mkdir(parents=True)
    # The resumed run would measure k=3 from this profile: it must not measure at all.
    wg = ProfileWorkerGroup(_profile([0.5, 0.4, 0.1, 0.2]))
    local = tmp_path / "run" if record_in == "default_local_dir" else tmp_path / "moved"
    t = _stub_trainer(monkeypatch, local, wg)
    t.config.trainer.resume_from_path = str(ckpt)
    t._load_checkpoint()
    assert t.global_steps == 1 and "resuming with layer 0 (paper pi^1)" in capsys.readouterr().out
    layers, metrics = _step(t, 2)
    assert layers["_update_actor"] == 0 and metrics["bupo/auto_layer"] == 0.0
    assert [c[0] for c in wg.calls] == ["load_checkpoint"]  # never re-measured
    assert "bupo/auto_layer" not in _step(t, 3)[1]  # logged once per run segment


def test_resume_without_record_fails_with_the_fix(monkeypatch, tmp_path):
    ckpt = tmp_path / "global_step_5"
    (ckpt / "actor").mkdir(parents=True)
    t = _stub_trainer(monkeypatch, tmp_path, ProfileWorkerGroup({}))
    t.config.trainer.resume_from_path = str(ckpt)
    with pytest.raises(BuPOConfigError, match="set bupo.internal_layer to the layer the run trained"):
        t._load_checkpoint()


# ------------------------------------------------------------------- trainer on verl's real engine
PROMPTS = [
    "What is 1 + 1?",
    "Let x = 3. What is 2x + 1?",
    "Find all real numbers.",
    "Please reason step by step.",
]
RESPONSES = [
    "The answer is \\boxed{2}.",
    "2x + 1 = 7, so \\boxed{7}",
    "Therefore the answer is Yes.",
    "1 + 1 = 2",
]


@pytest.fixture(scope="module")
def boundary_model_dir(tmp_path_factory):
    """A 4-layer random Qwen3 whose upper two FFNs write 10x larger outputs: they converge (dH_FFN < 0)."""
    from verl_ext.random_models import make_model, save_model_and_tokenizer

    model = make_model("qwen3", init_std=0.1, num_hidden_layers=L)
    with torch.no_grad():
        for layer in model.model.layers[K_BOUNDARY + 1 :]:
            layer.mlp.down_proj.weight.mul_(10.0)
    return save_model_and_tokenizer(model, tmp_path_factory.mktemp("auto_model") / "boundary")


class EngineWorkerGroup:
    """The actor's real ``bupo_layer_entropy`` RPC and update on verl's FSDP2 engine (CPU), keyed like TQ."""

    def __init__(self, verl_cpu, worker, prompts, responses):
        self.verl_cpu, self.worker, self.prompts, self.responses = verl_cpu, worker, prompts, responses
        self.calls = []

    def bupo_layer_entropy(self, sub):
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import left_right_2_no_padding

        from verl_ext.bupo.worker import BuPOActorRolloutRefWorker

        self.calls.append(list(sub.keys))
        idx = [int(k[1:]) for k in sub.keys]
        batch = self.verl_cpu.make_batch([self.prompts[i] for i in idx], [self.responses[i] for i in idx])
        td = left_right_2_no_padding(batch)
        tu.assign_non_tensor(td, **sub.extra_info)
        return BuPOActorRolloutRefWorker.bupo_layer_entropy(types.SimpleNamespace(actor=self.worker), td)

    def update(self, layer):
        n = len(self.prompts)
        self.worker.train_mini_batch(self.verl_cpu.make_update_batch(self.prompts, self.responses, layer, n))


def _snapshot(worker):
    return {
        k: v.detach().full_tensor().clone() if hasattr(v, "full_tensor") else v.detach().clone()
        for k, v in worker.engine.module.named_parameters()
    }


def test_engine_run_trains_the_layer_the_cli_suggests(
    verl_cpu, boundary_model_dir, monkeypatch, tmp_path, capsys
):
    """Same model, same responses: the trainer's choice is the CLI's printed suggestion, and phase 1 trains it."""
    from transformers import AutoTokenizer

    from verl_ext.analysis.cli import encode_prompt, encode_response, main

    # The CLI's own input, tokenized by the CLI's own functions for the trainer's batch.
    dump = tmp_path / "val.jsonl"
    dump.write_text("".join(json.dumps({"input": p, "output": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    tok = AutoTokenizer.from_pretrained(boundary_model_dir)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    responses = [encode_response(tok, r) for r in RESPONSES]

    out = tmp_path / "analysis"
    argv = ["--model", boundary_model_dir, "--label", "tiny", "--data", str(dump), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    cli = json.loads((out / "boundary.json").read_text())["tiny"]

    worker, _ = verl_cpu.build_actor(verl_cpu.compose(boundary_model_dir))
    wg = EngineWorkerGroup(verl_cpu, worker, prompts, responses)
    t = _stub_trainer(monkeypatch, tmp_path / "ckpt", wg, samples=len(PROMPTS), update=wg.update)
    before = _snapshot(worker)
    layers, metrics = _step(t, 1, n=len(PROMPTS))

    assert cli["layer_index"] == K_BOUNDARY and f"bupo.internal_layer={K_BOUNDARY}  #" in printed
    assert metrics["bupo/auto_layer"] == float(cli["layer_index"])
    assert layers["_update_actor"] == cli["layer_index"] == layers["_compute_old_log_prob"]
    assert wg.calls == [["k0", "k1", "k2", "k3"]]
    for l, d in enumerate(cli["delta_ffn"], start=1):  # noqa: E741
        assert metrics[f"bupo/delta_ffn/{l}"] == pytest.approx(d, abs=1e-4)
    assert f"phase 1 trains layer {K_BOUNDARY} (paper pi^{K_BOUNDARY + 1})" in capsys.readouterr().out

    after = _snapshot(worker)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(f"layers.{K_BOUNDARY}." in k for k in changed)
    for k in before:
        if any(f"layers.{i}." in k for i in range(K_BOUNDARY + 1, L)) or k == "model.norm.weight":
            assert k not in changed, f"{k} changed in phase 1"
