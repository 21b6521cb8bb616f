"""A ``bupo_sync`` trainer without Ray or workers (verl's own practice): ``__new__`` plus a hand-built config.

verl's old-log-prob, reference and update methods are replaced by recorders, so a test sees the
``extra_info`` each call carried (``trainer._seen``) and what BuPO's overrides do around them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf
from verl.trainer.ppo.v1.trainer_base import PPOTrainer

from verl_ext.bupo.config import BuPOConfig
from verl_ext.bupo.trainer import BuPOTrainerSync

RECORDED = ("_compute_old_log_prob", "_compute_ref_log_prob", "_update_actor")


def stub_trainer(
    monkeypatch,
    *,
    bupo: dict,
    worker_group,
    ckpt_dir: str | Path,
    n_gpus: int = 1,
    temperature: float = 1.0,
    model_path: str | None = None,
    on_call: Callable[[str, object, dict], None] | None = None,
) -> BuPOTrainerSync:
    """A trainer with the ``bupo`` block ``bupo`` whose verl calls only record (and call ``on_call``).

    Args:
        monkeypatch: pytest's, to replace verl's methods for the test only.
        bupo: the ``bupo:`` block.
        worker_group: stands in for ``actor_rollout_wg`` (the BuPO diagnostics RPCs).
        ckpt_dir: ``trainer.default_local_dir``.
        n_gpus: ``trainer.n_gpus_per_node`` (one node).
        temperature: the rollout temperature.
        model_path: ``actor_rollout_ref.model.path`` (omitted when None).
        on_call: ``on_call(name, batch, metrics)`` after each recorded verl call.
    """
    seen: list[tuple[str, dict]] = []

    def record(name):
        def fn(self, batch, metrics):
            seen.append((name, dict(batch.extra_info)))
            if on_call is not None:
                on_call(name, batch, metrics)
            return batch

        return fn

    for name in RECORDED:
        monkeypatch.setattr(PPOTrainer, name, record(name))
    model = {} if model_path is None else {"model": {"path": model_path}}
    t = BuPOTrainerSync.__new__(BuPOTrainerSync)
    t.config = OmegaConf.create(
        {
            "trainer": {
                "n_gpus_per_node": n_gpus,
                "nnodes": 1,
                "resume_mode": "resume_path",
                "resume_from_path": None,
                "del_local_ckpt_after_load": False,
                "default_local_dir": str(ckpt_dir),
            },
            "actor_rollout_ref": {"rollout": {"temperature": temperature}, **model},
        }
    )
    t.bupo = BuPOConfig.from_dict(bupo)
    t._bupo_last_layer = None
    t.actor_rollout_wg = worker_group
    t.use_critic = False
    t.trainer_mode = "sync"
    t.train_dataloader = None
    t._seen = seen
    return t
