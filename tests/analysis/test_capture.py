"""LayerCapture: one forward, every stream equal to a hand-run forward, only the selected rows kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from verl_ext.analysis import LayerCapture, check_supported, prediction_mask, response_token_mask
from verl_ext.internal_policy import position_ids_from_mask
from verl_ext.random_models import make_model
from verl_ext.slicing import exit_after_layer


@pytest.fixture
def batch(padded_batch):
    return lambda vocab: _batch(padded_batch, vocab)


def _batch(padded_batch, vocab: int):
    ids, mask = padded_batch(vocab, [9, 6, 11], seed=1)
    g = torch.Generator().manual_seed(3)
    token_mask = mask.bool() & (torch.rand(mask.shape, generator=g) < 0.6)
    return ids, mask, token_mask


def test_capture_matches_manual_forward(tiny_model, streams, batch):
    ids, mask, tm = batch(tiny_model.config.vocab_size)
    ref = streams(tiny_model, ids, mask)
    calls = {"n": 0}
    h = tiny_model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    with LayerCapture(tiny_model, tm) as cap:
        tiny_model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False
        )
    h.remove()
    assert calls["n"] == 1
    cap.check_complete()
    L = len(tiny_model.model.layers)
    n = int(tm.sum())
    assert cap.hidden(0).shape == (n, tiny_model.config.hidden_size)
    torch.testing.assert_close(cap.hidden(0), ref["hidden"][0][tm], atol=1e-6, rtol=0)
    for l in range(1, L + 1):  # noqa: E741
        for got, want in (
            (cap.hidden(l), ref["hidden"][l]),
            (cap.attn_input(l), ref["attn_in"][l - 1]),
            (cap.attn(l), ref["attn"][l - 1]),
            (cap.ffn_input(l), ref["ffn_in"][l - 1]),
            (cap.ffn(l), ref["ffn"][l - 1]),
        ):
            assert got.shape == (n, tiny_model.config.hidden_size)
            assert not got.requires_grad
            torch.testing.assert_close(got, want[tm], atol=2e-5, rtol=1e-5)
    # Residual identities of the spec: H^l = H^{l-1} + A^l + F^l.
    torch.testing.assert_close(
        cap.hidden(L), cap.hidden(L - 1) + cap.attn(L) + cap.ffn(L), atol=2e-5, rtol=1e-5
    )


def test_capture_agrees_with_output_hidden_states(arch, batch):
    model = make_model(arch, init_std=0.1)
    ids, mask, tm = batch(model.config.vocab_size)
    pos = position_ids_from_mask(mask)
    with LayerCapture(model, tm) as cap:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
    hs = out.hidden_states
    L = len(model.model.layers)
    for l in range(L):  # noqa: E741
        torch.testing.assert_close(cap.hidden(l), hs[l][tm], atol=1e-6, rtol=0)
    # hidden_states[L] is final-normed; the captured H^L is raw.
    torch.testing.assert_close(model.model.norm(cap.hidden(L)), hs[L][tm], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cap.hidden(L), hs[L][tm])


class _Wrapper(nn.Module):
    """Mimics an FSDP1 wrapper: the model sits in ``_fsdp_wrapped_module``."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner

    def forward(self, **kw):
        return self._fsdp_wrapped_module(**kw)


def test_capture_through_wrapper_and_no_mask(batch):
    model = make_model("qwen3", init_std=0.1)
    ids, mask, _ = batch(model.config.vocab_size)
    ids, mask = ids[:, -6:], mask[:, -6:].clone().fill_(1)
    wrapped = _Wrapper(model)
    n_hooks = [len(lay._forward_hooks) for lay in model.model.layers]
    with LayerCapture(wrapped, None) as cap:
        wrapped(input_ids=ids, attention_mask=mask)
    # hooks are gone after the context
    assert [len(lay._forward_hooks) for lay in model.model.layers] == n_hooks
    assert cap.hidden(4).shape == (ids.numel(), 64)
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.hidden(2), ref[2].reshape(-1, 64))


def test_streaming_sink_order_and_nothing_stored(batch):
    model = make_model("llama", init_std=0.1, num_hidden_layers=2)
    ids, mask, tm = batch(model.config.vocab_size)
    seen = []
    with LayerCapture(model, tm, sink=lambda s, lay, rows: seen.append((s, lay, rows.shape[0]))) as cap:
        model(input_ids=ids, attention_mask=mask)
    order = [(s, lay) for s, lay, _ in seen]
    assert order == [("hidden", 0)] + [
        (s, lay) for lay in (1, 2) for s in ("attn_in", "attn", "ffn_in", "ffn", "hidden")
    ]
    assert {n for *_, n in seen} == {int(tm.sum())}
    assert cap.streams == {}
    with pytest.raises(RuntimeError, match="sink"):
        cap.hidden(1)


def test_errors(batch):
    model = make_model("qwen2", init_std=0.1)
    ids, mask, tm = batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="token_mask has shape"), LayerCapture(model, tm[:, 1:]):
        model(input_ids=ids, attention_mask=mask)
    with LayerCapture(model, tm) as cap, exit_after_layer(model, 1):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="ran"):
        cap.check_complete()
    with pytest.raises(ValueError, match="out of range"):
        cap.hidden(5)


def test_unsupported_architecture():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    model = MistralForCausalLM(cfg)
    with pytest.raises(
        ValueError, match=r"unsupported architecture MistralForCausalLM.*mistral.*qwen2, qwen3, llama"
    ):
        check_supported(model)
    with pytest.raises(ValueError, match="unsupported"):
        LayerCapture(model)


def test_masks():
    resp = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])
    assert prediction_mask(resp).long().tolist() == [[0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    # verl layout: [prompt P=3 | response R=3], response_mask [B, R]
    rm = torch.tensor([[1, 1, 0], [1, 1, 1]])
    got = response_token_mask(rm, 6)
    full = torch.cat([torch.zeros(2, 3, dtype=torch.long), rm], dim=1)
    assert torch.equal(got, prediction_mask(full))
    with pytest.raises(ValueError):
        response_token_mask(rm, 3)
