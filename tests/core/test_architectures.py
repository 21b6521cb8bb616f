"""The support matrix, core side: every verified architecture against an independent reference.

For each entry of ``verl_ext.architectures.VERIFIED`` (tiny random model, 4 layers, left-padded odd
lengths), the reference of pi^{k+1} is the *model's own* head applied to the raw output of
``layers[k]`` captured by a hook in an ordinary full forward: the decoder is stubbed to return that
tensor and the causal LM's forward does the rest (Granite's logit scaling, Gemma2's soft cap, tied
heads), so the reference does not use ``verl_ext.heads``. Checked: log-probs, entropies and every
parameter's gradient; layers above k neither run nor get gradients; padding; pi^L with the final
norm is the model's policy; the KL(pi^k || pi) diagnostics; MoE routers; the lists match the READMEs.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers.modeling_outputs import MoeModelOutputWithPast

from tests.conftest import REPO_ROOT, TOL, left_padded_batch
from verl_ext.architectures import REJECTED, VERIFIED, matrix_block, matrix_markdown
from verl_ext.heads import HEAD_RULES, head_spec
from verl_ext.internal_policy import internal_log_probs, policy_divergence_forward
from verl_ext.random_models import make_model
from verl_ext.slicing import check_slicing, exit_after_layer, override_forward

N_LAYERS = 4
LENGTHS = [9, 5, 1, 7]
TEMPERATURE = 0.7
ARCHS = [v.model_type for v in VERIFIED]
MOE = [v.model_type for v in VERIFIED if v.moe]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return make_model(request.param, init_std=0.1)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0) * mask


def _counters(model) -> list[int]:
    calls = [0] * N_LAYERS
    for i, lay in enumerate(model.model.layers):
        lay.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


def _own_head(model, hidden: torch.Tensor, ids, mask) -> torch.Tensor:
    """The causal LM's own forward with a decoder that returns ``hidden``: its head's logits on it."""
    stub = lambda *a, **k: MoeModelOutputWithPast(last_hidden_state=hidden)  # noqa: E731
    with override_forward(model.model, stub):
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def reference(model, ids, mask, layer: int, final_norm: bool = False):
    """``(log_probs, entropy)`` float64 ``[B, T-1]`` of pi^{layer+1}: hook on ``layers[layer]``, full run."""
    captured = {}
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
    )
    try:
        model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    finally:
        handle.remove()
    h = model.model.norm(captured["h"]) if final_norm else captured["h"]
    logits = _own_head(model, h, ids, mask).double()
    logp = torch.log_softmax(logits[:, :-1] / TEMPERATURE, dim=-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    return lp * valid, ent * valid


def _grads(model, lp, ent) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(0)
    loss = (lp.double() * torch.randn(lp.shape, generator=g, dtype=torch.float64)).sum()
    loss = loss + (ent.double() * torch.randn(ent.shape, generator=g, dtype=torch.float64)).sum()
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


def _upper(name: str, layer: int) -> bool:
    return any(f"layers.{i}." in name for i in range(layer + 1, N_LAYERS))


@pytest.mark.parametrize(("layer", "final_norm"), [(1, False), (N_LAYERS - 1, False), (0, True)])
def test_values_and_gradients_match_the_model_head_on_layer_k(model, layer, final_norm):
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=layer)
    calls = _counters(model)
    lp, ent = internal_log_probs(model, ids, layer, mask, temperature=TEMPERATURE, final_norm=final_norm)
    assert calls == [1] * (layer + 1) + [0] * (N_LAYERS - layer - 1), "layers above k ran"
    rlp, rent = reference(model, ids, mask, layer, final_norm)
    tol = TOL[torch.float32]
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)

    got, want = _grads(model, lp, ent), _grads(model, rlp, rent)
    assert sorted(n for n, g in got.items() if g is None) == sorted(n for n, g in want.items() if g is None)
    for name, g in want.items():
        if g is not None:
            torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    with_grad = {n for n, g in got.items() if g is not None}
    assert not any(_upper(n, layer) for n in with_grad), "layers above k got gradients"
    assert any(f"layers.{layer}." in n for n in with_grad) and "model.embed_tokens.weight" in with_grad
    assert ("model.norm.weight" in with_grad) == final_norm


def test_head_map_is_kept_and_matters(model):
    """pi^k applies the head's fixed map; for the architectures that have one, dropping it is visible."""
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=5)
    with torch.no_grad():
        lp, _ = internal_log_probs(model, ids, 1, mask, temperature=TEMPERATURE)
        rlp, _ = reference(model, ids, mask, 1)
        h = {}
        handle = model.model.layers[1].register_forward_hook(
            lambda m, a, o: h.update(h=o[0] if isinstance(o, tuple) else o)
        )
        model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask))
        handle.remove()
        plain = torch.log_softmax(
            (h["h"] @ model.get_output_embeddings().weight.T).double()[:, :-1] / TEMPERATURE, -1
        )
    plain = plain.gather(-1, ids[:, 1:, None]).squeeze(-1) * (mask[:, :-1] * mask[:, 1:])
    torch.testing.assert_close(lp.double(), rlp, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    has_map = model.config.model_type in HEAD_RULES and not head_spec(model).is_identity
    assert has_map == ((plain - rlp).abs().max().item() > 1e-3)


def test_padding_does_not_change_real_positions(model):
    vocab = model.config.vocab_size
    ids, mask = left_padded_batch(vocab, LENGTHS, seed=9)
    T = ids.shape[1]
    with torch.no_grad():
        lp, ent = internal_log_probs(model, ids, 1, mask, temperature=TEMPERATURE)
        noisy = torch.where(mask.bool(), ids, torch.randint(2, vocab, ids.shape))
        lp2, ent2 = internal_log_probs(model, noisy, 1, mask, temperature=TEMPERATURE)
        # (MoE experts batch the tokens routed to them: other pad ids move the rounding, nothing more)
        torch.testing.assert_close(lp2, lp, atol=TOL[torch.float32], rtol=0)
        torch.testing.assert_close(ent2, ent, atol=TOL[torch.float32], rtol=0)
        for b, n in enumerate(LENGTHS):
            assert (lp[b, : T - n] == 0).all() and (ent[b, : T - n] == 0).all()
            if n > 1:
                alone_lp, alone_ent = internal_log_probs(
                    model, ids[b : b + 1, T - n :], 1, temperature=TEMPERATURE
                )
                torch.testing.assert_close(lp[b, T - n :], alone_lp[0], atol=TOL[torch.float32], rtol=1e-5)
                torch.testing.assert_close(ent[b, T - n :], alone_ent[0], atol=TOL[torch.float32], rtol=1e-5)


def test_last_layer_with_final_norm_is_the_model_policy(model):
    """pi^L with the final norm == softmax(model logits / T), head map included; pi^L raw differs."""
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=3)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
        logp = torch.log_softmax(logits[:, :-1].double() / TEMPERATURE, -1)
        valid = mask[:, :-1] * mask[:, 1:]
        want = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * valid
        for layer in (N_LAYERS - 1, None):
            lp, _ = internal_log_probs(model, ids, layer, mask, temperature=TEMPERATURE, final_norm=True)
            torch.testing.assert_close(lp.double(), want, atol=TOL[torch.float32], rtol=TOL[torch.float32])
        raw, _ = internal_log_probs(model, ids, N_LAYERS - 1, mask, temperature=TEMPERATURE)
    assert (raw.double() - want).abs().max() > 1e-3


def test_policy_divergence_uses_the_model_head(model):
    """The phase-1 diagnostics forward: KL(pi^k || pi) and H(pi), both through the model's own head."""
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=7)
    pos = _positions(mask)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        captured = {}
        handle = model.model.layers[1].register_forward_hook(
            lambda m, a, o: captured.update(h=o[0] if isinstance(o, tuple) else o)
        )
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
        handle.remove()
        inner = _own_head(model, captured["h"], ids, mask)
        with policy_divergence_forward(model, 1):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, temperature=TEMPERATURE)
    logp = torch.log_softmax(inner.double() / TEMPERATURE, -1)
    logq = torch.log_softmax(full.double() / TEMPERATURE, -1)
    valid = mask.bool()
    kl = (logp.exp() * (logp - logq)).sum(-1)
    tol = TOL[torch.float32]
    torch.testing.assert_close(out.log_probs.double()[valid], kl[valid], atol=tol, rtol=tol)
    torch.testing.assert_close(
        out.entropy.double()[valid], -(logq.exp() * logq).sum(-1)[valid], atol=tol, rtol=tol
    )


def test_check_slicing_passes(model):
    check_slicing(model, layers=list(range(N_LAYERS)))


@pytest.mark.parametrize("arch", MOE)
def test_moe_router_outputs_cover_the_layers_that_ran(arch):
    """Sliced at k, an MoE model reports router logits of layers 0..k only, equal to the full run's, and
    the auxiliary loss Hugging Face computes from them (where it has one) covers exactly those layers.
    (verl's FSDP actor never adds that loss to its objective: see tests/bupo/test_engine.py.)"""
    model = make_model(arch, init_std=0.1, output_router_logits=True, router_aux_loss_coef=1.0)
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), use_cache=False)
    layer = 1
    with torch.no_grad():
        full = model(**kwargs)
        with exit_after_layer(model, layer):
            sliced = model(**kwargs)
    balance = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
    if balance is None:  # DeepSeek-V3: bias-balanced routing, no auxiliary loss in transformers
        assert getattr(full, "aux_loss", None) is None and getattr(sliced, "aux_loss", None) is None
        return
    if full.router_logits is None:  # GraniteMoE (transformers 5.x) records no router logits at all
        assert sliced.router_logits is None and full.aux_loss == sliced.aux_loss == 0
        return
    assert len(full.router_logits) == N_LAYERS and len(sliced.router_logits) == layer + 1
    for a, b in zip(sliced.router_logits, full.router_logits):
        torch.testing.assert_close(a, b, atol=TOL[torch.float32], rtol=TOL[torch.float32])
    top_k = model.config.num_experts_per_tok
    n_exp = getattr(model.config, "num_experts", None) or model.config.num_local_experts
    want = balance(full.router_logits[: layer + 1], n_exp, top_k, mask)
    torch.testing.assert_close(sliced.aux_loss, want)
    assert (full.aux_loss - want).abs() > 1e-6, "control: the full run's loss covers more layers"


def _readme_blocks():
    return {p: matrix_block((REPO_ROOT / p).read_text()) for p in ("README.md", "recipe/bupo/README.md")}


@pytest.mark.parametrize("path", ["README.md", "recipe/bupo/README.md"])
def test_readmes_carry_the_generated_matrix(path):
    """Regenerate with ``python -m verl_ext.architectures README.md recipe/bupo/README.md``."""
    block = _readme_blocks()[path]
    assert block is not None, f"{path} has no support-matrix block"
    assert block == matrix_markdown(), f"{path}: the support matrix is stale; regenerate it"


def test_matrix_lists_every_architecture_once():
    table = matrix_markdown()
    for entry in (*VERIFIED, *REJECTED):
        assert table.count(f"| `{entry.model_type}` |") == 1, entry.model_type
    assert not {v.model_type for v in VERIFIED} & {r.model_type for r in REJECTED}
    required = {"qwen2", "qwen3", "llama", "mistral", "qwen3_moe", "mixtral", "gemma2", "gemma3_text"}
    assert required | {"phi3", "olmo2", "granite"} <= set(ARCHS)
