"""The registered ``bupo`` policy loss equals verl's vanilla loss (values and gradients) and reports the phase."""

from __future__ import annotations

import pytest
import torch
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn
from verl.workers.config import ActorConfig

import verl_ext.bupo.loss as bupo_loss


def _config(agg: str):
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=2,
        ppo_mini_batch_size=8,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=10.0,
        loss_agg_mode=agg,
    )
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=None, global_batch_size=None)
    return cfg


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
@pytest.mark.parametrize("shape", [(3, 7), (5, 1), (1, 13)])
def test_equals_vanilla(agg, shape):
    g = torch.Generator().manual_seed(sum(shape))
    old = -torch.rand(shape, generator=g) * 3
    new = (old + torch.randn(shape, generator=g) * 0.6).requires_grad_()
    adv = torch.randn(shape[0], 1, generator=g).expand(shape).contiguous()
    mask = (torch.rand(shape, generator=g) > 0.2).float()
    mask[:, 0] = 1
    cfg = _config(agg)
    fn = get_policy_loss_fn("bupo")
    assert fn is bupo_loss.compute_policy_loss_bupo
    with bupo_loss.active_exit_layer(-1):
        loss, metrics = fn(old, new, adv, mask, agg, cfg)
    (grad,) = torch.autograd.grad(loss, new)
    ref, ref_metrics = compute_policy_loss_vanilla(old, new, adv, mask, agg, cfg)
    (ref_grad,) = torch.autograd.grad(ref, new)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-6)
    assert metrics["bupo/phase"] == 2.0


def test_dual_clip_bounds_negative_advantage_loss():
    """A huge ratio with A < 0 is capped at -A * c (hand-worked: A=-1, c=10 -> loss 10)."""
    cfg = _config("token-mean")
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), 5.0)  # ratio e^5 ~ 148
    with bupo_loss.active_exit_layer(-1):
        loss, metrics = bupo_loss.compute_policy_loss_bupo(
            old, new, -torch.ones(1, 1), torch.ones(1, 1), "token-mean", cfg
        )
    assert loss.item() == pytest.approx(10.0)
    assert metrics["actor/pg_clipfrac_lower"] == 1.0


def test_phase_metric_and_rollout_weights_rejected_in_phase1():
    cfg = _config("token-mean")
    x = torch.zeros(2, 3)
    with bupo_loss.active_exit_layer(5):
        _, metrics = bupo_loss.compute_policy_loss_bupo(x, x, x, torch.ones(2, 3), "token-mean", cfg)
        assert metrics["bupo/phase"] == 1.0
        with pytest.raises(ValueError, match="rollout_is"):
            bupo_loss.compute_policy_loss_bupo(x, x, x, torch.ones(2, 3), "token-mean", cfg, torch.ones(2, 3))
    assert bupo_loss.current_exit_layer() is None


def test_loss_outside_the_bupo_engine_is_an_error_with_the_fix():
    """loss_mode=bupo under verl's stock trainer (no bupo_sync) would silently train plain GRPO."""
    cfg = _config("token-mean")
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="trainer.v1.trainer_mode=bupo_sync"):
        bupo_loss.compute_policy_loss_bupo(x, x, x, torch.ones(2, 3), "token-mean", cfg)
