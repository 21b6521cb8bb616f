"""``internal_log_probs`` against a plain PyTorch reference built from ``output_hidden_states``.

The reference for the internal policy pi^{k+1} (0-based k) is ``log_softmax(lm_head(H^{k+1}) / T)``
in float64, with H^{k+1} = ``hidden_states[k+1]`` of the full model for k < L-1 and the output of
``model.model.layers[L-1]`` (a forward hook) for k = L-1, because Hugging Face's last
``hidden_states`` entry is already final-normed. Values and gradients (w.r.t. every parameter) are
compared over Qwen3, Qwen2 and Llama, tied and untied, every k, with and without the final norm, on
left-padded batches with odd lengths.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tests.conftest import TOL, left_padded_batch
from verl_ext.internal_policy import internal_log_probs, lm_head_weight, position_ids_from_mask
from verl_ext.random_models import make_model

N_LAYERS = 4  # of the conftest tiny models
LENGTHS = [9, 5, 1, 7]  # left-padded, odd lengths, one single-token row


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Independent of position_ids_from_mask: count the real tokens before each position."""
    pos = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        count = 0
        for t in range(mask.shape[1]):
            pos[b, t] = count if mask[b, t] else 0
            count += int(mask[b, t])
    return pos


def _decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def reference(model, ids, mask, layer, temperature=1.0, final_norm=False, head_dtype=None):
    """Reference ``(log_probs, entropy)`` ``[B, T-1]`` (float64) of pi^{layer+1}, or the full policy."""
    decoder = _decoder_layers(model)
    n = len(decoder.layers)
    captured = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = decoder.layers[n - 1].register_forward_hook(hook)
    kwargs = {"use_cache": False, "output_hidden_states": True}
    if mask is not None:
        kwargs.update(attention_mask=mask, position_ids=_positions(mask))
    try:
        out = model(input_ids=ids, **kwargs)
    finally:
        handle.remove()
    assert len(out.hidden_states) == n + 1
    if layer is None:
        logits = out.logits.double()
    else:
        h = out.hidden_states[layer + 1] if layer < n - 1 else captured["h"]
        if final_norm:
            h = decoder.norm(h)
        if head_dtype is None:
            logits = model.get_output_embeddings()(h).double()
        else:  # the head itself in higher precision, on the same hidden states
            weight = model.get_output_embeddings().weight
            logits = h.to(head_dtype) @ weight.to(head_dtype).T
    logp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    if mask is not None:
        valid = (mask[:, :-1] * mask[:, 1:]).bool()
        lp, ent = lp * valid, ent * valid
    return lp, ent


def _loss(lp, ent, seed=0):
    g = torch.Generator().manual_seed(seed)
    c1 = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    c2 = torch.randn(lp.shape, generator=g, dtype=torch.float64)
    return (lp.double() * c1).sum() + (ent.double() * c2).sum()


def _param_grads(model, loss) -> dict[str, torch.Tensor | None]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return dict(zip(names, grads))


def _assert_grads_close(got: dict, want: dict, atol: float, rtol: float) -> None:
    assert set(got) == set(want)
    got_none = sorted(n for n, g in got.items() if g is None)
    want_none = sorted(n for n, g in want.items() if g is None)
    assert got_none == want_none, "different parameters received gradients"
    for name, g in want.items():
        if g is not None:
            torch.testing.assert_close(
                got[name], g, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
            )


def _upper(name: str, layer: int | None) -> bool:
    return layer is not None and any(f"layers.{i}." in name for i in range(layer + 1, N_LAYERS))


@pytest.mark.parametrize("final_norm", [False, True], ids=["raw", "normed"])
@pytest.mark.parametrize("layer", range(N_LAYERS))
def test_matches_hidden_states_reference(tiny_model, layer, final_norm):
    """Every k: values and gradients equal lm_head(H^{k+1}) (raw) / lm_head(norm(H^{k+1})) (normed)."""
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS, seed=layer)
    lp, ent = internal_log_probs(tiny_model, ids, layer, attention_mask=mask, final_norm=final_norm)
    rlp, rent = reference(tiny_model, ids, mask, layer, final_norm=final_norm)
    assert lp.shape == ent.shape == (len(LENGTHS), max(LENGTHS) - 1)
    assert lp.dtype == ent.dtype == torch.float32
    tol = TOL[torch.float32]
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)

    got = _param_grads(tiny_model, _loss(lp, ent))
    want = _param_grads(tiny_model, _loss(rlp, rent))
    _assert_grads_close(got, want, atol=1e-5, rtol=1e-4)
    # Upper layers get nothing; layers <= k, the embedding and the head do; the norm only if used.
    with_grad = {n for n, g in got.items() if g is not None}
    assert not any(_upper(n, layer) for n in with_grad)
    assert all(f"layers.{i}.mlp.down_proj.weight" in " ".join(with_grad) for i in range(layer + 1))
    assert "model.embed_tokens.weight" in with_grad
    assert ("model.norm.weight" in with_grad) == final_norm


def test_last_hidden_state_entry_is_normed(tiny_model):
    """The trap the reference avoids: HF's hidden_states[L] is norm(H^L), not the raw H^L."""
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, [6, 3])
    captured = {}
    handle = tiny_model.model.layers[-1].register_forward_hook(lambda m, a, o: captured.update(h=o))
    with torch.no_grad():
        out = tiny_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    handle.remove()
    raw = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
    torch.testing.assert_close(out.hidden_states[-1], tiny_model.model.norm(raw))
    assert (out.hidden_states[-1] - raw).abs().max() > 1e-2


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature(arch, temperature):
    model = make_model(arch, init_std=0.1)
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=3)
    lp, ent = internal_log_probs(model, ids, 1, attention_mask=mask, temperature=temperature)
    rlp, rent = reference(model, ids, mask, 1, temperature=temperature)
    tol = TOL[torch.float32]
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    _assert_grads_close(
        _param_grads(model, _loss(lp, ent)), _param_grads(model, _loss(rlp, rent)), atol=1e-5, rtol=1e-4
    )
    # and the temperature really matters
    lp1, _ = internal_log_probs(model, ids, 1, attention_mask=mask)
    assert (lp1 - lp).abs().max() > 1e-3


def test_final_layer_with_norm_is_the_model_policy(tiny_model):
    """layer=L-1, final_norm=True and layer=None both equal the model's own log-probs (its logits)."""
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS, seed=5)
    with torch.no_grad():
        logits = tiny_model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    want_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * valid
    want_ent = -(logp.exp() * logp).sum(-1) * valid
    tol = TOL[torch.float32]
    for kwargs in (
        {"layer": N_LAYERS - 1, "final_norm": True},
        {"layer": None},
        {"layer": None, "final_norm": True},
    ):
        with torch.no_grad():
            lp, ent = internal_log_probs(tiny_model, ids, attention_mask=mask, **kwargs)
        torch.testing.assert_close(lp.double(), want_lp, atol=tol, rtol=tol)
        torch.testing.assert_close(ent.double(), want_ent, atol=tol, rtol=tol)
    # the raw last layer (the paper's pi^L) is a different policy
    with torch.no_grad():
        raw_lp, _ = internal_log_probs(tiny_model, ids, N_LAYERS - 1, attention_mask=mask)
    assert (raw_lp.double() - want_lp).abs().max() > 1e-3


def test_layer_none_gradients_match_full_model(arch):
    model = make_model(arch, init_std=0.1)
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=6)
    lp, ent = internal_log_probs(model, ids, None, attention_mask=mask)
    rlp, rent = reference(model, ids, mask, None)
    got, want = _param_grads(model, _loss(lp, ent)), _param_grads(model, _loss(rlp, rent))
    _assert_grads_close(got, want, atol=1e-5, rtol=1e-4)
    assert all(g is not None for g in got.values())


@pytest.mark.parametrize("layer", [0, 2, None])
def test_position_t_predicts_token_t_plus_1(arch, layer):
    """Position t holds log pi(ids[t+1] | ids[:t+1]): run each prefix alone and read its last position."""
    model = make_model(arch, init_std=0.1)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(2, model.config.vocab_size, (1, 8), generator=g)
    with torch.no_grad():
        lp, ent = internal_log_probs(model, ids, layer)
        for t in range(ids.shape[1] - 1):
            prefix = ids[:, : t + 1]
            out = model(input_ids=prefix, output_hidden_states=True, use_cache=False)
            if layer is None:
                logits = out.logits[0, -1]
            else:
                logits = model.lm_head(out.hidden_states[layer + 1][0, -1])
            logp = torch.log_softmax(logits.double(), dim=-1)
            assert lp[0, t].item() == pytest.approx(logp[ids[0, t + 1]].item(), abs=1e-5)
            assert ent[0, t].item() == pytest.approx(-(logp.exp() * logp).sum().item(), abs=1e-5)


@pytest.mark.parametrize("layer", [1, N_LAYERS - 1, None])
def test_padding_does_not_change_real_positions(tiny_model, layer):
    vocab = tiny_model.config.vocab_size
    ids, mask = left_padded_batch(vocab, LENGTHS, seed=9)
    T = ids.shape[1]
    with torch.no_grad():
        lp, ent = internal_log_probs(tiny_model, ids, layer, attention_mask=mask)
        # other pad token ids: nothing changes
        noisy = torch.where(mask.bool(), ids, torch.randint(2, vocab, ids.shape))
        lp2, ent2 = internal_log_probs(tiny_model, noisy, layer, attention_mask=mask)
        torch.testing.assert_close(lp2, lp, atol=1e-6, rtol=0)
        torch.testing.assert_close(ent2, ent, atol=1e-6, rtol=0)
        for b, n in enumerate(LENGTHS):
            alone = ids[b : b + 1, T - n :]
            if n > 1:
                lp_a, ent_a = internal_log_probs(tiny_model, alone, layer)
                torch.testing.assert_close(lp[b, T - n :], lp_a[0], atol=TOL[torch.float32], rtol=1e-5)
                torch.testing.assert_close(ent[b, T - n :], ent_a[0], atol=TOL[torch.float32], rtol=1e-5)
            # positions whose context or target is padding hold 0
            assert (lp[b, : T - n] == 0).all() and (ent[b, : T - n] == 0).all()
        # right padding works too
        right = torch.zeros_like(ids)
        right_mask = torch.zeros_like(mask)
        for b, n in enumerate(LENGTHS):
            right[b, :n], right_mask[b, :n] = ids[b, T - n :], 1
        lp_r, ent_r = internal_log_probs(tiny_model, right, layer, attention_mask=right_mask)
        for b, n in enumerate(LENGTHS):
            torch.testing.assert_close(lp_r[b, : n - 1], lp[b, T - n :], atol=TOL[torch.float32], rtol=1e-5)
            torch.testing.assert_close(ent_r[b, : n - 1], ent[b, T - n :], atol=TOL[torch.float32], rtol=1e-5)


def test_bounds(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS, seed=10)
    with torch.no_grad():
        for layer in [*range(N_LAYERS), None]:
            lp, ent = internal_log_probs(tiny_model, ids, layer, attention_mask=mask, temperature=0.5)
            assert (lp <= 0).all()
            assert (ent >= 0).all()
            assert (ent <= math.log(tiny_model.config.vocab_size) + 1e-5).all()


def test_bfloat16_model():
    """bf16 weights: float32 outputs; the head accumulates in fp32 (1e-4 from a float64 head on the
    same bf16 hidden states) and the whole policy stays within TOL[bf16] of the float32 model."""
    model32 = make_model("qwen3", init_std=0.1)
    model = make_model("qwen3", init_std=0.1, dtype=torch.bfloat16)
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS, seed=11)
    for layer in (1, N_LAYERS - 1):
        with torch.no_grad():
            lp, ent = internal_log_probs(model, ids, layer, attention_mask=mask)
            assert lp.dtype == ent.dtype == torch.float32
            same_lp, same_ent = reference(model, ids, mask, layer, head_dtype=torch.float64)
            torch.testing.assert_close(lp.double(), same_lp, atol=1e-4, rtol=0)
            torch.testing.assert_close(ent.double(), same_ent, atol=1e-4, rtol=0)
            fp32_lp, fp32_ent = reference(model32, ids, mask, layer)
            torch.testing.assert_close(lp.double(), fp32_lp, atol=TOL[torch.bfloat16], rtol=0)
            torch.testing.assert_close(ent.double(), fp32_ent, atol=TOL[torch.bfloat16], rtol=0)
    lp, ent = internal_log_probs(model, ids, 1, attention_mask=mask)
    grads = _param_grads(model, _loss(lp, ent))
    assert grads["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert grads["model.layers.2.mlp.up_proj.weight"] is None


def test_small_chunks_give_the_same_result(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS, seed=12)
    lp, ent = internal_log_probs(tiny_model, ids, 2, attention_mask=mask, chunk_size=5)
    rlp, rent = internal_log_probs(tiny_model, ids, 2, attention_mask=mask)
    torch.testing.assert_close(lp, rlp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ent, rent, atol=1e-6, rtol=1e-6)
    _assert_grads_close(
        _param_grads(tiny_model, _loss(lp, ent)),
        _param_grads(tiny_model, _loss(rlp, rent)),
        atol=1e-5,
        rtol=1e-4,
    )


@pytest.mark.parametrize("layer", [0, 2])
def test_upper_layers_do_not_run(arch, layer):
    model = make_model(arch, init_std=0.1)
    calls = [0] * N_LAYERS
    for i, lay in enumerate(model.model.layers):
        lay.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    ids, mask = left_padded_batch(model.config.vocab_size, LENGTHS)
    lp, ent = internal_log_probs(model, ids, layer, attention_mask=mask)
    assert calls == [1] * (layer + 1) + [0] * (N_LAYERS - layer - 1)
    (lp.sum() + ent.sum()).backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (_upper(name, layer) or name == "model.norm.weight"), name
    assert model.config.num_hidden_layers == N_LAYERS
    assert "forward" not in model.model.norm.__dict__


def test_model_intact_after_an_exception_in_the_forward(tiny_model):
    ids, mask = left_padded_batch(tiny_model.config.vocab_size, LENGTHS)
    with torch.no_grad():
        before = tiny_model(input_ids=ids, attention_mask=mask).logits

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = tiny_model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        internal_log_probs(tiny_model, ids, 2, attention_mask=mask)
    handle.remove()
    assert tiny_model.config.num_hidden_layers == N_LAYERS
    assert "forward" not in tiny_model.model.norm.__dict__
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model(input_ids=ids, attention_mask=mask).logits, before, atol=0, rtol=0
        )
        lp, _ = internal_log_probs(tiny_model, ids, 2, attention_mask=mask)  # not left "active"
    torch.testing.assert_close(lp.double(), reference(tiny_model, ids, mask, 2)[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bad", [-1, N_LAYERS, 100, True, 1.0, "2"])
def test_bad_layer_names_the_valid_range(bad):
    model = make_model("qwen3")
    ids, mask = left_padded_batch(model.config.vocab_size, [4, 2])
    with pytest.raises(ValueError, match=rf"0\.\.{N_LAYERS - 1}|must be an int"):
        internal_log_probs(model, ids, bad, attention_mask=mask)
    if isinstance(bad, int) and not isinstance(bad, bool):
        with pytest.raises(ValueError, match=rf"valid values are 0\.\.{N_LAYERS - 1}"):
            internal_log_probs(model, ids, bad)
    assert model.config.num_hidden_layers == N_LAYERS


def test_input_ids_must_be_2d():
    model = make_model("qwen3")
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\]"):
        internal_log_probs(model, torch.arange(2, 7), 1)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 1]])
    pos = position_ids_from_mask(mask)
    real = mask.bool()
    torch.testing.assert_close(pos[real], _positions(mask)[real])  # padding positions are free
    assert pos[0].tolist() == [0, 0, 0, 1, 2]
    assert (pos >= 0).all()


def test_lm_head_weight(arch, tied):
    model = make_model(arch, tie_word_embeddings=tied)
    w = lm_head_weight(model)
    assert w is model.lm_head.weight
    assert (w is model.model.embed_tokens.weight) == tied
    assert tuple(w.shape) == (model.config.vocab_size, model.config.hidden_size)


def _lora(model):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("layer", [1, N_LAYERS - 1])
def test_peft_model(arch, layer):
    """LoRA-wrapped model: same values as the reference on the PEFT model; only trainable LoRA weights of
    layers <= k get gradients, equal to the reference's."""
    peft_model = _lora(make_model(arch, init_std=0.1))
    ids, mask = left_padded_batch(peft_model.config.vocab_size, LENGTHS, seed=13)
    lp, ent = internal_log_probs(peft_model, ids, layer, attention_mask=mask, temperature=0.9)
    rlp, rent = reference(peft_model, ids, mask, layer, temperature=0.9)
    tol = TOL[torch.float32]
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    got, want = _param_grads(peft_model, _loss(lp, ent)), _param_grads(peft_model, _loss(rlp, rent))
    _assert_grads_close(got, want, atol=1e-5, rtol=1e-4)
    with_grad = sorted(n for n, g in got.items() if g is not None)
    assert with_grad and all("lora_" in n for n in with_grad)
    assert not any(_upper(n, layer) for n in with_grad)
    # control: the adapter is active (the base model gives other values)
    with torch.no_grad(), peft_model.disable_adapter():
        base_lp, _ = internal_log_probs(peft_model, ids, layer, attention_mask=mask, temperature=0.9)
    assert (base_lp - lp.detach()).abs().max() > 1e-4
