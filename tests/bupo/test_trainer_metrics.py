"""The trainer's metric renaming: worker metrics as bupo/*, phase-1 rollout comparisons as bupo/phase1_*."""

from __future__ import annotations

from verl_ext.bupo.trainer import relabel_phase1, unprefix_actor_metrics


def test_actor_prefixed_bupo_metrics_are_unprefixed():
    metrics = {
        "actor/bupo/tokens_per_s": 10.0,
        "actor/bupo/phase": 1.0,
        "bupo/phase": 1.0,
        "actor/pg_loss": 0.5,
    }
    unprefix_actor_metrics(metrics)
    assert metrics == {"bupo/tokens_per_s": 10.0, "bupo/phase": 1.0, "actor/pg_loss": 0.5}


def test_phase1_relabels_both_families():
    metrics = {
        "training/rollout_probs_diff_mean": 0.1,
        "rollout_corr/kl": 0.011,
        "rollout_corr/ppl_ratio": 1.2,
        "actor/entropy": 3.0,
    }
    relabel_phase1(metrics)
    assert metrics == {
        "bupo/phase1_rollout_probs_diff_mean": 0.1,
        "bupo/phase1_rollout_corr/kl": 0.011,
        "bupo/phase1_rollout_corr/ppl_ratio": 1.2,
        "actor/entropy": 3.0,
    }
