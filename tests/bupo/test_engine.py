"""verl's real FSDPEngineWithLMHead (FSDP2, gloo, CPU) with the BuPO mixin: pi^k when flagged, pi otherwise.

The Qwen3 tests run with and without padding removal; the support-matrix tests at the end run every
verified architecture (``verl_ext.architectures.VERIFIED``; MoE ones with the router auxiliary loss
enabled) through the same engine: log-probs, and a phase-1 then a phase-2 update.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from verl_ext.architectures import VERIFIED
from verl_ext.internal_policy import internal_log_probs

LAYER = 1
PROMPTS = [[5, 6, 7], [8, 9], [20, 21, 22]]
RESPONSES = [[10, 11, 12, 13], [14, 15], [30, 31, 32, 33]]


def _packed(verl_cpu, extra: dict):
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch = verl_cpu.make_batch(PROMPTS[:2], RESPONSES[:2])
    td = left_right_2_no_padding(batch.clone())
    tu.assign_non_tensor(td, temperature=0.7, calculate_entropy=True, compute_loss=False, **extra)
    return batch, td


def _reference(model, batch, layer, final_norm=False):
    """Plain internal_log_probs on the HF model, cut to the response window [B, R]."""
    lp, ent = internal_log_probs(
        model, batch["input_ids"], layer, batch["attention_mask"], temperature=0.7, final_norm=final_norm
    )
    P = batch["prompts"].shape[1]
    return lp[:, P - 1 :], ent[:, P - 1 :]


@pytest.fixture(scope="module", params=[True, False], ids=["rmpad", "padded"])
def actor(request, verl_cpu, tiny_model_dir):
    path, model = tiny_model_dir
    cfg = verl_cpu.compose(str(path), [f"actor_rollout_ref.model.use_remove_padding={request.param}"])
    worker, actor_cfg = verl_cpu.build_actor(cfg)
    return worker, model


@pytest.mark.parametrize("layer", [LAYER, -1, 3])
@pytest.mark.parametrize("final_norm", [False, True])
def test_engine_log_probs_match_internal_policy(verl_cpu, actor, layer, final_norm):
    from verl.workers.utils.padding import no_padding_2_padding

    worker, model = actor
    batch, td = _packed(verl_cpu, {"bupo_exit_layer": layer, "bupo_final_norm": final_norm})
    out = worker.infer_batch(td)
    lp = no_padding_2_padding(out["log_probs"], td)
    ent = no_padding_2_padding(out["entropy"], td)
    ref_lp, ref_ent = _reference(model, batch, None if layer < 0 else layer, final_norm)
    mask = batch["response_mask"].bool()
    torch.testing.assert_close(lp[mask], ref_lp[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent[mask], ref_ent[mask], atol=2e-5, rtol=1e-5)
    if layer >= 0:
        assert out["metrics"]["bupo/exit_layer"] == [[float(layer)]]
        full, _ = _reference(model, batch, None)
        if layer == 3 and final_norm:  # pi^L with the final norm is the model's own policy
            torch.testing.assert_close(lp[mask], full[mask], atol=2e-5, rtol=1e-5)
        else:  # really a different policy
            assert (lp[mask] - full[mask]).abs().max() > 1e-3


def test_model_restored_after_phase1_call(verl_cpu, actor):
    from verl_ext.slicing import find_decoder, unwrap_model

    worker, _ = actor
    _, td = _packed(verl_cpu, {"bupo_exit_layer": LAYER})
    worker.infer_batch(td)
    module = worker.engine.module
    assert find_decoder(module).config.num_hidden_layers == 4
    assert "forward" not in unwrap_model(module).__dict__
    assert "forward" not in find_decoder(module).norm.__dict__


def test_reference_engine_refuses_phase1_flag(verl_cpu, actor):
    worker, _ = actor
    engine = worker.engine
    saved = engine.engine_config
    fake = copy.copy(saved)
    object.__setattr__(fake, "forward_only", True)
    engine.engine_config = fake
    try:
        _, td = _packed(verl_cpu, {"bupo_exit_layer": LAYER})
        with pytest.raises(RuntimeError, match="reference"):
            worker.engine.forward_step(td, loss_function=None, forward_only=True)
    finally:
        engine.engine_config = saved


def test_policy_diagnostics_match_plain_kl(verl_cpu, actor):
    """The diagnostics RPC body: KL(pi^k || pi) and H(pi) over response tokens vs a full-softmax reference."""
    from verl_ext.bupo.worker import _reduce_response_means

    worker, model = actor
    batch, td = _packed(verl_cpu, {"bupo_diagnose_layer": LAYER})
    out = _reduce_response_means(worker, td, {"log_probs": "kl_internal_full", "entropy": "full_entropy"})
    metrics = out["metrics"]

    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        logq = torch.log_softmax(o.logits.double() / 0.7, -1)
        logp = torch.log_softmax(model.lm_head(o.hidden_states[LAYER + 1]).double() / 0.7, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    ent = -(logq.exp() * logq).sum(-1)
    P = batch["prompts"].shape[1]
    resp = batch["response_mask"].bool()
    kl_ref = kl[:, P - 1 : -1][resp].mean().item()
    ent_ref = ent[:, P - 1 : -1][resp].mean().item()
    assert metrics["bupo/kl_internal_full"] == pytest.approx(kl_ref, rel=1e-4, abs=1e-5)
    assert metrics["bupo/full_entropy"] == pytest.approx(ent_ref, rel=1e-4, abs=1e-5)
    assert kl_ref > 0


def _snapshot(worker) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().full_tensor().clone() if hasattr(v, "full_tensor") else v.detach().clone()
        for k, v in worker.engine.module.named_parameters()
    }


def test_phase1_update_changes_only_lower_layers_then_phase2_changes_all(verl_cpu, tiny_model_dir):
    path, _ = tiny_model_dir
    cfg = verl_cpu.compose(str(path))
    worker, _ = verl_cpu.build_actor(cfg)
    before = _snapshot(worker)
    out = worker.train_mini_batch(verl_cpu.make_update_batch(PROMPTS[:2], RESPONSES[:2], LAYER, 2))
    metrics = out["metrics"]
    assert metrics["bupo/phase"] == [1.0] and metrics["bupo/exit_layer"] == [1.0]
    assert metrics["bupo/tokens_per_s"][0] > 0
    # verl's MFU assumes all 4 layers ran; the corrected one counts layers 0..1 and the head.
    assert 0 < metrics["bupo/mfu"][0] < metrics["mfu"][0]
    after1 = _snapshot(worker)
    changed = {k for k in before if not torch.equal(before[k], after1[k])}
    for k in before:
        upper = any(f"layers.{i}." in k for i in range(LAYER + 1, 4))
        if upper or k == "model.norm.weight":
            assert k not in changed, f"{k} changed in phase 1"
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert any(f"layers.{LAYER}." in k for k in changed) and any("layers.0." in k for k in changed)

    worker.train_mini_batch(verl_cpu.make_update_batch(PROMPTS[:2], RESPONSES[:2], -1, 2))
    after2 = _snapshot(worker)
    unchanged = [k for k in before if torch.equal(after1[k], after2[k])]
    assert not unchanged, f"phase 2 left {unchanged} unchanged"


def test_layer_entropy_telemetry_matches_analysis_on_plain_model(verl_cpu, actor):
    """The worker-side profile (sharded module, no-padding batch) equals the library on the HF model."""
    from verl_ext.analysis import layer_entropy_profile, response_token_mask
    from verl_ext.bupo.telemetry import layer_entropy_metrics

    worker, model = actor
    batch, td = _packed(verl_cpu, {})
    metrics = layer_entropy_metrics(worker, td)["metrics"]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = response_token_mask(batch["response_mask"], ids.shape[1])
    ref = layer_entropy_profile(model, ids, mask, rows)
    assert set(metrics) == set(ref) and len(ref) == 5 * 4
    for key in ref:
        assert metrics[key] == pytest.approx(ref[key], abs=2e-5), key


def test_worker_rejects_schedule_layer_outside_real_model(verl_cpu, tiny_model_dir):
    """The actor checks the schedule's layers against the model it built (before any rollout)."""
    from verl_ext.bupo.worker import BuPOActorRolloutRefWorker, actor_rollout_ref_worker_cls

    assert actor_rollout_ref_worker_cls((), True) is BuPOActorRolloutRefWorker
    worker_cls = actor_rollout_ref_worker_cls((1, 7), False).actor_worker_cls
    assert worker_cls.bupo_layers == (1, 7) and worker_cls.bupo_run_self_test is False
    path, _ = tiny_model_dir
    with pytest.raises(ValueError, match=r"bupo.internal_layer=7 .* valid values are 0\.\.3"):
        verl_cpu.build_actor(verl_cpu.compose(str(path)), worker_cls=worker_cls)


# -- the support matrix: every verified architecture through verl's engine ----------------------------
MATRIX_LAYERS = 4


@pytest.fixture(scope="module", params=[v.model_type for v in VERIFIED])
def arch_actor(request, verl_cpu, tmp_path_factory):
    """(worker, HF model, entry) for one architecture; MoE models have the router aux loss enabled."""
    from verl_ext.random_models import make_model, save_model_and_tokenizer

    entry = next(v for v in VERIFIED if v.model_type == request.param)
    aux = dict(output_router_logits=True, router_aux_loss_coef=1.0) if entry.moe else {}
    model = make_model(entry.model_type, init_std=0.1, num_hidden_layers=MATRIX_LAYERS, **aux)
    path = tmp_path_factory.mktemp(entry.model_type)
    save_model_and_tokenizer(model, path)
    cfg = verl_cpu.compose(str(path), ["actor_rollout_ref.model.use_remove_padding=true"])
    worker, _ = verl_cpu.build_actor(cfg)  # runs the slicing self-test on the FSDP2 module
    return worker, model, entry


@pytest.mark.parametrize(("layer", "final_norm"), [(LAYER, False), (-1, False), (MATRIX_LAYERS - 1, True)])
def test_matrix_engine_log_probs(verl_cpu, arch_actor, layer, final_norm):
    from verl.workers.utils.padding import no_padding_2_padding

    from verl_ext.slicing import find_decoder

    worker, model, _ = arch_actor
    batch, td = _packed(verl_cpu, {"bupo_exit_layer": layer, "bupo_final_norm": final_norm})
    out = worker.infer_batch(td)
    lp = no_padding_2_padding(out["log_probs"], td)
    ent = no_padding_2_padding(out["entropy"], td)
    mask = batch["response_mask"].bool()
    ref_lp, ref_ent = _reference(model, batch, None if layer < 0 else layer, final_norm)
    torch.testing.assert_close(lp[mask], ref_lp[mask], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent[mask], ref_ent[mask], atol=2e-5, rtol=1e-5)
    assert find_decoder(worker.engine.module).config.num_hidden_layers == MATRIX_LAYERS
    if layer >= 0:
        full, _ = _reference(model, batch, None)
        gap = (lp[mask] - full[mask]).abs().max().item()
        assert gap < 2e-5 if final_norm else gap > 1e-3  # pi^L with the norm is pi; pi^2 is not


def test_matrix_phase1_then_phase2_update(verl_cpu, arch_actor, monkeypatch):
    """Phase 1 changes layers <= k, the embedding and the head only; phase 2 reaches the top layer.

    MoE, router auxiliary loss enabled: phase 1 never computes it (the internal-policy forward calls the
    decoder, not the causal LM); phase 2 (verl's own forward) computes it and verl 0.9.1's FSDP actor
    never backpropagates through it. Both phases train the same objective, without the aux loss. If a
    verl upgrade starts using it, the last assertion fails and the README's MoE note must be revisited.
    """
    worker, model, entry = arch_actor
    modeling = sys.modules[type(model).__module__]
    balance = getattr(modeling, "load_balancing_loss_func", None)
    calls, backprop = [], []
    if balance is not None:

        def spy(*args, **kwargs):
            aux = balance(*args, **kwargs)
            calls.append(aux)
            if isinstance(aux, torch.Tensor) and aux.requires_grad:
                aux.register_hook(lambda g: backprop.append(g))
            return aux

        monkeypatch.setattr(modeling, "load_balancing_loss_func", spy)

    before = _snapshot(worker)
    worker.train_mini_batch(verl_cpu.make_update_batch(PROMPTS[:2], RESPONSES[:2], LAYER, 2))
    after1 = _snapshot(worker)
    changed = {k for k in before if not torch.equal(before[k], after1[k])}
    upper = {k for k in before if any(f"layers.{i}." in k for i in range(LAYER + 1, MATRIX_LAYERS))}
    assert not changed & (upper | {"model.norm.weight"}), "phase 1 changed layers above k or the norm"
    assert "model.embed_tokens.weight" in changed and any(f"layers.{LAYER}." in k for k in changed)
    assert not calls, "phase 1 computed the router aux loss"

    worker.train_mini_batch(verl_cpu.make_update_batch(PROMPTS[:2], RESPONSES[:2], -1, 2))
    after2 = _snapshot(worker)
    top = f"layers.{MATRIX_LAYERS - 1}."
    assert any(top in k and not torch.equal(after1[k], after2[k]) for k in before), (
        "phase 2 left the top layer"
    )
    assert not torch.equal(after1["model.norm.weight"], after2["model.norm.weight"])
    if entry.moe and balance is not None:
        assert calls, "control: phase 2 runs the causal LM's forward, which computes the aux loss"
        assert not backprop, "verl now trains the router aux loss: revisit BuPO's MoE decision"
