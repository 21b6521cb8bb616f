"""The ``bupo_sync`` trainer: verl's V1 sync trainer that tells the actor which policy to train.

Registered as ``trainer.v1.trainer_mode=bupo_sync``. The phase is a pure function of verl's
``global_steps`` (counted from 1, restored on resume) through the :class:`Schedule`: at step s the
old-log-prob and update calls carry ``bupo_exit_layer = schedule.layer_at(s)`` (-1 = full policy);
reference calls always carry -1 (``extra_info`` is sticky across calls on one batch).
With ``bupo.internal_layer: auto`` the layer is chosen here, on the driver, before the first update
(:mod:`verl_ext.bupo.auto_layer`), and reaches every rank in the same ``extra_info``.
"""

from __future__ import annotations

import math

import ray
from omegaconf import OmegaConf, open_dict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.metric import reduce_metrics

from verl_ext.bupo import auto_layer
from verl_ext.bupo.config import TRAINER_NAME, BuPOConfigError, validate_config
from verl_ext.bupo.engine import CHUNK_KEY, DIAGNOSE_KEY, EXIT_LAYER_KEY, FINAL_NORM_KEY
from verl_ext.bupo.schedule import FULL_POLICY
from verl_ext.bupo.worker import actor_rollout_ref_worker_cls
from verl_ext.log import get_logger

logger = get_logger(__name__)

_ACTOR_ROLES = (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef)
# Metrics that compare the full-policy rollout with the actor's log-probs (verl's
# calculate_debug_metrics and rollout-correction diagnostics): in phase 1 they compare it with
# pi^k, so they move under bupo/phase1_* where no dashboard reads them as an off-policy alarm.
PHASE1_RELABELLED = ("training/rollout_", "rollout_corr/")
# Worker-side BuPO metrics arrive under verl's "actor/" prefix; they are logged as bupo/*.
_ACTOR_PREFIX = "actor/bupo/"


def relabel_phase1(metrics: dict) -> None:
    """Move rollout-vs-actor comparisons to ``bupo/phase1_*`` (in place; phase 1 only).

    ``training/rollout_probs_diff_mean`` becomes ``bupo/phase1_rollout_probs_diff_mean`` and
    ``rollout_corr/kl`` becomes ``bupo/phase1_rollout_corr/kl``.
    """
    for key in [k for k in metrics if k.startswith(PHASE1_RELABELLED)]:
        new = key.split("/", 1)[1] if key.startswith("training/") else key
        metrics[f"bupo/phase1_{new}"] = metrics.pop(key)


def unprefix_actor_metrics(metrics: dict) -> None:
    """Log the worker's ``actor/bupo/<name>`` metrics as ``bupo/<name>`` (in place).

    Where the trainer already logs ``bupo/<name>`` (phase, exit layer) the worker's copy is dropped.
    """
    for key in [k for k in metrics if k.startswith(_ACTOR_PREFIX)]:
        value = metrics.pop(key)
        metrics.setdefault("bupo/" + key[len(_ACTOR_PREFIX) :], value)


@register_trainer(TRAINER_NAME)
class BuPOTrainerSync(PPOTrainerSync):
    """V1 sync trainer with BuPO's internal-policy phase (see module docstring)."""

    _bupo_auto_log: dict | None = None  # a resumed run logs its stored auto layer once

    def __init__(self, config):
        # Every start-up check, again: under verl's stock main_ppo (the drop-in path) this is the first
        # BuPO code that sees the config. It runs in the task runner before any worker or model is
        # built (the self-test uses a tiny CPU copy of the architecture); the actor then self-tests
        # the real model.
        self.bupo = validate_config(config)
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"  # verl's code paths test for the exact string
        super().__init__(config)
        self._bupo_last_layer: int | None = None
        logger.info("BuPO schedule: %s", self.bupo.schedule_obj.describe())

    @property
    def _bupo_chunk(self) -> int:
        """``bupo.head_chunk_size`` as sent to the workers: 0 = the device's default (null in the config)."""
        return self.bupo.head_chunk_size or 0

    def bupo_exit_layer(self) -> int:
        """0-based exit layer for the current global step, or -1 (full policy)."""
        return self.bupo.schedule_obj.layer_at(max(int(self.global_steps), 1))

    def _bupo_mark(self, batch, layer: int) -> None:
        batch.extra_info.update(
            {
                EXIT_LAYER_KEY: layer,
                FINAL_NORM_KEY: self.bupo.final_norm,
                CHUNK_KEY: self._bupo_chunk,
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
        layers = self.bupo.schedule_obj.fixed_layers  # an auto layer is chosen later, from the real model
        worker_cls = actor_rollout_ref_worker_cls(layers, self.bupo.self_test and self.bupo.phase1_active)
        for role in list(self.role_worker_mapping):
            if role in _ACTOR_ROLES:
                self.role_worker_mapping[role] = ray.remote(worker_cls)

    def _compute_old_log_prob(self, batch, metrics: dict):
        auto_measured = self._bupo_auto_layer(batch, metrics)
        layer = self.bupo_exit_layer()
        if layer != self._bupo_last_layer:
            logger.info(
                "BuPO: step %d trains %s",
                self.global_steps,
                "the full policy" if layer < 0 else f"layer {layer}",
            )
            self._bupo_last_layer = layer
        if layer != FULL_POLICY and self._every(self.bupo.full_policy_metrics_freq):
            metrics.update(self._bupo_policy_diagnostics(batch, layer))
        # At the step the auto layer is measured, its profile stands in for the periodic one.
        if self._every(self.bupo.layer_entropy_freq) and not auto_measured:
            metrics.update(self._bupo_layer_entropy(batch))
        self._bupo_mark(batch, layer)
        batch = super()._compute_old_log_prob(batch, metrics)
        metrics.update(self._bupo_step_metrics(layer))
        unprefix_actor_metrics(metrics)
        if layer != FULL_POLICY:
            metrics["bupo/internal_entropy"] = metrics.get("actor/entropy", float("nan"))
            relabel_phase1(metrics)
        return batch

    def _compute_ref_log_prob(self, batch, metrics: dict):
        self._bupo_mark(batch, FULL_POLICY)
        return super()._compute_ref_log_prob(batch, metrics)

    def _compute_advantage(self, batch, metrics: dict):
        batch = super()._compute_advantage(batch, metrics)
        if self.bupo_exit_layer() != FULL_POLICY:
            relabel_phase1(metrics)  # rollout-correction diagnostics are computed here
        return batch

    def _update_actor(self, batch, metrics: dict):
        layer = self.bupo_exit_layer()
        self._bupo_mark(batch, layer)
        batch = super()._update_actor(batch, metrics)
        self._bupo_mark(batch, FULL_POLICY)
        unprefix_actor_metrics(metrics)
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
                CHUNK_KEY: self._bupo_chunk,
                "temperature": self.config.actor_rollout_ref.rollout.temperature,
            }
        )
        return reduce_metrics(dict(self.actor_rollout_wg.bupo_policy_diagnostics(sub)["metrics"]))

    def _bupo_layer_entropy(self, batch) -> dict:
        sub = self._subsample(batch, self.bupo.layer_entropy_samples)
        if sub is None:
            return {}
        sub.extra_info.update({FINAL_NORM_KEY: self.bupo.final_norm, CHUNK_KEY: self._bupo_chunk})
        return reduce_metrics(dict(self.actor_rollout_wg.bupo_layer_entropy(sub)["metrics"]))

    # ----------------------------------------------------------------- bupo.internal_layer: auto
    def _load_checkpoint(self):
        super()._load_checkpoint()
        if self.bupo.schedule_obj.has_auto and self.global_steps > 0:
            found = auto_layer.load_record(auto_layer.record_dirs(self.config.trainer))
            if found is None:
                raise BuPOConfigError(
                    f"bupo.internal_layer=auto: resuming at step {self.global_steps} but no "
                    f"{auto_layer.RECORD_NAME} in {auto_layer.record_dirs(self.config.trainer)} (written by the "
                    "first step); the layer is never re-measured. Fix: set bupo.internal_layer to the layer the "
                    "run trained (metric bupo/auto_layer, console line 'BuPO auto layer')"
                )
            choice, path = found
            layer = choice.checked_layer(path)
            self.bupo = auto_layer.resolve_config(self.bupo, layer)
            self._bupo_auto_log = {auto_layer.METRIC: float(layer)}
            print(
                f"BuPO auto layer: resuming with layer {layer} (paper pi^{layer + 1}) chosen before step "
                f"{choice.step} ({path}); not re-measured",
                flush=True,
            )

    def _bupo_auto_layer(self, batch, metrics: dict) -> bool:
        """Choose the ``auto`` layer once, before the first update; True when a profile was measured now."""
        if self._bupo_auto_log:
            metrics.update(self._bupo_auto_log)
            self._bupo_auto_log = None
        if not self.bupo.schedule_obj.has_auto:
            return False
        if self.global_steps > 1:
            raise RuntimeError(f"bupo.internal_layer=auto is still undecided at step {self.global_steps}")
        world = int(self.config.trainer.n_gpus_per_node) * int(self.config.trainer.nnodes)
        idx = auto_layer.subsample_indices(batch.tags, self.bupo.auto_layer_samples, world)
        if not idx:
            raise RuntimeError(f"bupo.internal_layer=auto: the first batch has fewer than {world} responses")
        sub = KVBatchMeta(
            partition_id=batch.partition_id,
            keys=[batch.keys[i] for i in idx],
            tags=[batch.tags[i] for i in idx],
            extra_info={
                **batch.extra_info,
                FINAL_NORM_KEY: self.bupo.final_norm,
                CHUNK_KEY: self._bupo_chunk,
            },
        )
        profile = reduce_metrics(dict(self.actor_rollout_wg.bupo_layer_entropy(sub)["metrics"]))
        choice = auto_layer.choose_layer(
            profile,
            step=max(int(self.global_steps), 1),
            n_responses=len(idx),
            final_norm=self.bupo.final_norm,
            model=OmegaConf.select(self.config, "actor_rollout_ref.model.path"),
        )
        path = auto_layer.save_record(choice, self.config.trainer.default_local_dir)
        layer = choice.checked_layer(path)  # no boundary: stops here with the profile and the fix
        self.bupo = auto_layer.resolve_config(self.bupo, layer)
        print(choice.explanation(path), flush=True)
        logger.info("BuPO schedule: %s", self.bupo.schedule_obj.describe())
        metrics.update(choice.metrics())
        return True
