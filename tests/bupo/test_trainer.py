"""The bupo_sync trainer's phase logic on a stub (verl's own practice): steps 1, s_inter, s_inter+1, resume."""

from __future__ import annotations

import pytest
from _stub_trainer import stub_trainer
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import get_trainer_cls

from verl_ext.bupo.trainer import BuPOTrainerSync

S_INTER, LAYER = 30, 5


class FakeWorkerGroup:
    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def load_checkpoint(self, local_path, del_local_after_load=False):
        self.calls.append(("load_checkpoint", {"path": local_path}))

    def bupo_policy_diagnostics(self, batch):
        self.calls.append(("diagnostics", dict(batch.extra_info)))
        return {"metrics": {"bupo/kl_internal_full": [0.5], "bupo/full_entropy": [1.5]}}

    def bupo_layer_entropy(self, batch):
        self.calls.append(("layer_entropy", dict(batch.extra_info)))
        return {"metrics": {"bupo/layer_entropy/1": [2.0]}}


@pytest.fixture
def trainer(monkeypatch, tmp_path):
    def verl_reports(name, batch, metrics):  # what verl's old-log-prob method reports
        if name == "_compute_old_log_prob":
            metrics.update({"actor/entropy": 0.25, "training/rollout_probs_diff_max": 0.9})

    bupo = {
        "internal_layer": LAYER,
        "internal_steps": S_INTER,
        "full_policy_metrics_freq": 10,
        "layer_entropy_freq": 0,
    }
    return stub_trainer(
        monkeypatch,
        bupo=bupo,
        worker_group=FakeWorkerGroup(),
        ckpt_dir=tmp_path,
        n_gpus=2,
        temperature=0.9,
        on_call=verl_reports,
    )


def _batch(n=8):
    return KVBatchMeta(keys=[f"k{i}" for i in range(n)], tags=[{}] * n, partition_id="train")


def _step(t, step):
    t.global_steps = step
    t._seen.clear()
    t.actor_rollout_wg.calls.clear()
    batch, metrics = _batch(), {}
    t._compute_old_log_prob(batch, metrics)
    t._compute_ref_log_prob(batch, metrics)
    t._update_actor(batch, metrics)
    return {name: info["bupo_exit_layer"] for name, info in t._seen}, metrics, batch


def test_registered():
    assert get_trainer_cls("bupo_sync") is BuPOTrainerSync


@pytest.mark.parametrize("step, expected", [(1, LAYER), (S_INTER, LAYER), (S_INTER + 1, -1), (300, -1)])
def test_phase_by_step_and_ref_cleared(trainer, step, expected):
    layers, metrics, batch = _step(trainer, step)
    assert layers == {
        "_compute_old_log_prob": expected,
        "_compute_ref_log_prob": -1,
        "_update_actor": expected,
    }
    assert batch.extra_info["bupo_exit_layer"] == -1  # not left sticky after the update
    assert metrics["bupo/phase"] == (1.0 if expected >= 0 else 2.0)
    assert metrics["bupo/exit_layer"] == float(expected)
    if expected >= 0:
        assert metrics["bupo/internal_entropy"] == 0.25
        assert "training/rollout_probs_diff_max" not in metrics  # meaningless in phase 1: renamed
        assert metrics["bupo/phase1_rollout_probs_diff_max"] == 0.9
    else:
        assert "bupo/internal_entropy" not in metrics


def test_diagnostics_on_subsample_every_n_steps(trainer):
    _, metrics, _ = _step(trainer, 1)
    (call,) = [c for c in trainer.actor_rollout_wg.calls if c[0] == "diagnostics"]
    assert call[1]["bupo_diagnose_layer"] == LAYER and call[1]["bupo_exit_layer"] == -1
    assert metrics["bupo/kl_internal_full"] == 0.5
    _, metrics, _ = _step(trainer, 3)
    assert not trainer.actor_rollout_wg.calls and "bupo/kl_internal_full" not in metrics
    _step(trainer, 20)
    assert trainer.actor_rollout_wg.calls
    _step(trainer, 40)  # phase 2: no pi^k to compare
    assert not trainer.actor_rollout_wg.calls


def test_subsample_is_multiple_of_world_size(trainer):
    sub = trainer._subsample(_batch(8), 3)
    assert len(sub) == 4 and sub.keys == ["k0", "k1", "k2", "k3"]
    assert trainer._subsample(_batch(1), 3) is None


@pytest.mark.parametrize("saved_step, expected", [(S_INTER - 1, LAYER), (S_INTER, -1)])
def test_resume_lands_in_right_phase(trainer, tmp_path, saved_step, expected):
    folder = tmp_path / f"global_step_{saved_step}"
    (folder / "actor").mkdir(parents=True)
    trainer.config.trainer.resume_from_path = str(folder)
    trainer._load_checkpoint()  # verl's own resume logic restores global_steps
    assert trainer.global_steps == saved_step
    layers, _, _ = _step(trainer, trainer.global_steps + 1)  # fit() continues at the next step
    assert layers["_update_actor"] == expected
