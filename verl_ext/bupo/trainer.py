"""The ``bupo_sync`` trainer: verl's V1 sync trainer that tells the actor which policy to train.

Registered as ``trainer.v1.trainer_mode=bupo_sync``. The phase is a pure function of verl's
``global_steps`` (counted from 1, restored on resume) through the :class:`Schedule`: at step s the
old-log-prob and update calls carry ``bupo_exit_layer = schedule.layer_at(s)`` (-1 = full policy);
reference calls always carry -1 (``extra_info`` is sticky across calls on one batch).
"""

from __future__ import annotations

import logging
import math

import ray
from omegaconf import open_dict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.metric import reduce_metrics

from verl_ext.bupo.config import TRAINER_NAME, validate_config
from verl_ext.bupo.engine import CHUNK_KEY, DIAGNOSE_KEY, EXIT_LAYER_KEY, FINAL_NORM_KEY
from verl_ext.bupo.schedule import FULL_POLICY
from verl_ext.bupo.worker import actor_rollout_ref_worker_cls

logger = logging.getLogger(__name__)

_ACTOR_ROLES = (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef)
# calculate_debug_metrics compares the full-policy rollout with the actor: meaningless in phase 1.
_ROLLOUT_DIFF_PREFIX = "training/rollout_"


@register_trainer(TRAINER_NAME)
class BuPOTrainerSync(PPOTrainerSync):
    """V1 sync trainer with BuPO's internal-policy phase (see module docstring)."""

    def __init__(self, config):
        # The driver (main_bupo) already ran every check; the actor self-tests the real model.
        self.bupo = validate_config(config, self_test=False)
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # verl's code paths test for the exact string
        super().__init__(config)
        self._bupo_last_layer: int | None = None
        logger.info("BuPO schedule: %s", self.bupo.schedule_obj.describe())

    def bupo_exit_layer(self) -> int:
        """0-based exit layer for the current global step, or -1 (full policy)."""
        return self.bupo.schedule_obj.layer_at(max(int(self.global_steps), 1))

    def _bupo_mark(self, batch, layer: int) -> None:
        batch.extra_info.update(
            {
                EXIT_LAYER_KEY: layer,
                FINAL_NORM_KEY: self.bupo.final_norm,
                CHUNK_KEY: self.bupo.head_chunk_size or 0,
                DIAGNOSE_KEY: FULL_POLICY,
            }
        )

    def _bupo_step_metrics(self, layer: int) -> dict:
        """``bupo/phase`` (1 or 2) and ``bupo/exit_layer`` (0-based k, -1 = full policy)."""
        return {"bupo/phase": 1.0 if layer != FULL_POLICY else 2.0, "bupo/exit_layer": float(layer)}

    def _every(self, freq: int) -> bool:
        return freq > 0 and (self.global_steps == 1 or self.global_steps % freq == 0)

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        layers = tuple(sorted({st.layer for st in self.bupo.schedule_obj.stages}))
        worker_cls = actor_rollout_ref_worker_cls(layers, self.bupo.self_test and self.bupo.phase1_active)
        for role in list(self.role_worker_mapping):
            if role in _ACTOR_ROLES:
                self.role_worker_mapping[role] = ray.remote(worker_cls)

    def _compute_old_log_prob(self, batch, metrics: dict):
        layer = self.bupo_exit_layer()
        if layer != self._bupo_last_layer:
            logger.warning(
                "BuPO: step %d trains %s",
                self.global_steps,
                "the full policy" if layer < 0 else f"layer {layer}",
            )
            self._bupo_last_layer = layer
        if layer != FULL_POLICY and self._every(self.bupo.full_policy_metrics_freq):
            metrics.update(self._bupo_policy_diagnostics(batch, layer))
        if self._every(self.bupo.layer_entropy_freq):
            metrics.update(self._bupo_layer_entropy(batch))
        self._bupo_mark(batch, layer)
        batch = super()._compute_old_log_prob(batch, metrics)
        metrics.update(self._bupo_step_metrics(layer))
        if layer != FULL_POLICY:
            metrics["bupo/internal_entropy"] = metrics.get("actor/entropy", float("nan"))
            for key in [k for k in metrics if k.startswith(_ROLLOUT_DIFF_PREFIX)]:
                metrics[f"bupo/phase1_{key.split('/', 1)[1]}"] = metrics.pop(key)
        return batch

    def _compute_ref_log_prob(self, batch, metrics: dict):
        self._bupo_mark(batch, FULL_POLICY)
        return super()._compute_ref_log_prob(batch, metrics)

    def _update_actor(self, batch, metrics: dict):
        layer = self.bupo_exit_layer()
        self._bupo_mark(batch, layer)
        batch = super()._update_actor(batch, metrics)
        self._bupo_mark(batch, FULL_POLICY)
        return batch

    # ----------------------------------------------------------------- sub-sampled diagnostics
    def _subsample(self, batch, n: int):
        world = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
        n = min(len(batch), max(world, int(math.ceil(n / world)) * world))
        n -= n % world
        if n == 0:
            return None
        return KVBatchMeta(
            partition_id=batch.partition_id,
            keys=list(batch.keys[:n]),
            tags=list(batch.tags[:n]),
            extra_info=dict(batch.extra_info),
        )

    def _bupo_policy_diagnostics(self, batch, layer: int) -> dict:
        sub = self._subsample(batch, self.bupo.full_policy_metrics_samples)
        if sub is None:
            return {}
        sub.extra_info.update(
            {
                DIAGNOSE_KEY: layer,
                EXIT_LAYER_KEY: FULL_POLICY,
                FINAL_NORM_KEY: self.bupo.final_norm,
                CHUNK_KEY: self.bupo.head_chunk_size or 0,
                "temperature": self.config.actor_rollout_ref.rollout.temperature,
            }
        )
        return reduce_metrics(dict(self.actor_rollout_wg.bupo_policy_diagnostics(sub)["metrics"]))

    def _bupo_layer_entropy(self, batch) -> dict:
        sub = self._subsample(batch, self.bupo.layer_entropy_samples)
        if sub is None:
            return {}
        sub.extra_info.update(
            {FINAL_NORM_KEY: self.bupo.final_norm, CHUNK_KEY: self.bupo.head_chunk_size or 0}
        )
        return reduce_metrics(dict(self.actor_rollout_wg.bupo_layer_entropy(sub)["metrics"]))
