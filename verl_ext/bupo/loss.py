"""The ``bupo`` policy loss: clipped PPO with dual clip (the paper's code), phase-aware metrics.

Registered with verl's ``register_policy_loss("bupo")`` on import (the worker module imports it, so
the registration happens inside every Ray worker). Select it with
``actor_rollout_ref.actor.policy_loss.loss_mode=bupo``. The objective is the same in both phases:
in phase 1 ``log_prob``/``old_log_prob`` are pi^k log-probs (the engine slices the model), in phase
2 the full policy's. Aggregation uses verl's ``agg_loss`` with ``config.global_batch_info``, so the
gradient scale is right under gradient accumulation and data parallelism.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch
from verl.trainer.ppo.core_algos import agg_loss, register_policy_loss
from verl.utils import torch_functional as verl_F

from verl_ext.bupo.config import LOSS_NAME
from verl_ext.bupo.schedule import FULL_POLICY

# None = not inside the BuPO actor engine's forward (the loss then refuses to run, see below).
_EXIT_LAYER: contextvars.ContextVar[int | None] = contextvars.ContextVar("bupo_exit_layer", default=None)

WITHOUT_TRAINER = (
    "actor_rollout_ref.actor.policy_loss.loss_mode=bupo ran outside the BuPO actor engine, i.e. without "
    "trainer.v1.trainer_mode=bupo_sync: nothing would ever train an internal policy (plain GRPO under "
    "another name). Set trainer.v1.trainer_mode=bupo_sync (and the bupo.* keys), or loss_mode=vanilla "
    "for plain GRPO. If you did set bupo_sync, the verl-bupo plugin is not loaded in the actor workers: "
    "check `python -c \"import verl, verl.trainer.ppo.core_algos as c; print('bupo' in c.POLICY_LOSS_REGISTRY)\"` "
    "on every node and that VERL_USE_EXTERNAL_PLUGINS allows 'bupo'."
)


@contextlib.contextmanager
def active_exit_layer(layer: int) -> Iterator[None]:
    """Tell the loss which policy the current micro-batch trains (0-based layer, or -1 = full)."""
    token = _EXIT_LAYER.set(layer)
    try:
        yield
    finally:
        _EXIT_LAYER.reset(token)


def current_exit_layer() -> int | None:
    """The exit layer of the micro-batch being computed (-1 = full policy, None = outside the engine)."""
    return _EXIT_LAYER.get()


@register_policy_loss(LOSS_NAME)
def compute_policy_loss_bupo(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Clipped PPO objective with dual clip on the policy being trained (pi^k in phase 1).

    ``L = agg( where(A < 0, min(max(-r A, -clip(r, 1-e_lo, 1+e_hi) A), -c A), max(-r A, -clip(r) A)) )``
    with ``r = exp(log_prob - old_log_prob)`` (log-ratio clamped to [-20, 20]), ``e_lo/e_hi`` =
    ``config.clip_ratio_low/high`` and ``c = config.clip_ratio_c`` (paper code: 0.2/0.2, c=10).

    Args:
        old_log_prob: ``[B, R]`` log-probs of the sampled tokens under the old policy.
        log_prob: ``[B, R]`` log-probs under the current policy.
        advantages: ``[B, R]`` GRPO advantages.
        response_mask: ``[B, R]`` 1 on response tokens.
        loss_agg_mode: verl aggregation mode (``token-mean`` in the paper's code).
        config: the actor config (clip ratios, ``global_batch_info``).
        rollout_is_weights: rollout importance weights; rejected in phase 1.

    Returns:
        ``(loss, metrics)``; metrics include ``actor/pg_clipfrac``, ``actor/ppo_kl``,
        ``actor/pg_clipfrac_lower`` and ``bupo/phase`` (1 or 2; the engine adds ``bupo/exit_layer``).
    """
    if config is None:
        raise ValueError("the bupo policy loss needs the actor config")
    layer = current_exit_layer()
    if layer is None:
        raise RuntimeError(WITHOUT_TRAINER)
    if rollout_is_weights is not None and layer != FULL_POLICY:
        raise ValueError(
            "rollout importance weights reached the bupo loss in phase 1; set "
            "algorithm.rollout_correction.rollout_is=null (they compare with the full-policy rollout)"
        )
    eps = config.clip_ratio
    eps_low = config.clip_ratio_low if config.clip_ratio_low is not None else eps
    eps_high = config.clip_ratio_high if config.clip_ratio_high is not None else eps
    c = config.get("clip_ratio_c", 3.0)
    if not c > 1.0:
        raise ValueError(f"actor.clip_ratio_c must be > 1 for dual-clip PPO, got {c}")

    log_ratio = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    ppo_obj = torch.maximum(unclipped, clipped)
    dual = torch.minimum(ppo_obj, -advantages * c)
    negative = advantages < 0
    pg_losses = torch.where(negative, dual, ppo_obj)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    loss = agg_loss(
        loss_mat=pg_losses, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )

    metrics = {
        "actor/pg_clipfrac": verl_F.masked_mean((clipped > unclipped).float(), response_mask).item(),
        "actor/ppo_kl": verl_F.masked_mean(-log_ratio, response_mask).item(),
        "actor/pg_clipfrac_lower": verl_F.masked_mean(
            ((ppo_obj > -advantages * c) & negative).float(), response_mask
        ).item(),
        "bupo/phase": 1.0 if layer != FULL_POLICY else 2.0,
    }
    return loss, metrics
