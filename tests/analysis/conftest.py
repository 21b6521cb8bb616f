"""Plain-PyTorch reference for the analysis tests: a manual forward through every layer and full log-softmax."""

from __future__ import annotations

import pytest
import torch

from verl_ext.internal_policy import lm_head_weight, position_ids_from_mask


@torch.no_grad()
def manual_streams(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> dict[str, list[torch.Tensor]]:
    """Run the decoder by hand, calling each submodule directly (eager attention, explicit 4D mask).

    Returns ``{"hidden": [H^0..H^L], "attn_in": [..], "attn": [..], "ffn_in": [..], "ffn": [..], "mid": [..]}``
    where the per-layer lists hold index l-1 for paper layer l, all ``[B, T, H]``.
    """
    dec = model.model
    B, T = input_ids.shape
    pos = position_ids_from_mask(attention_mask)
    x = dec.embed_tokens(input_ids)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & attention_mask.bool()[:, None, :]
    add = torch.zeros(B, 1, T, T, dtype=x.dtype).masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)
    pe = dec.rotary_emb(x, pos)
    out = {k: [] for k in ("attn_in", "attn", "mid", "ffn_in", "ffn")}
    out["hidden"] = [x]
    for layer in dec.layers:
        ln = layer.input_layernorm(x)
        a = layer.self_attn(hidden_states=ln, attention_mask=add, position_embeddings=pe, position_ids=pos)[0]
        mid = x + a
        ln2 = layer.post_attention_layernorm(mid)
        f = layer.mlp(ln2)
        x = mid + f
        for k, v in (("attn_in", ln), ("attn", a), ("mid", mid), ("ffn_in", ln2), ("ffn", f), ("hidden", x)):
            out[k].append(v)
    return out


def full_entropy(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(x W^T) with a full float64 log-softmax (materialises [rows x vocab])."""
    logp = torch.log_softmax(x.double() @ weight.double().T, dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def reference_table(model, input_ids, attention_mask, token_mask, final_norm: bool = False) -> dict:
    """``{(module, l): dict(entropy, baseline_entropy, delta, frac_positive, cosine, n_tokens)}`` by plain PyTorch."""
    s = manual_streams(model, input_ids, attention_mask)
    W = lm_head_weight(model)
    norm = model.model.norm
    m = token_mask.bool()

    def ent(t):
        t = norm(t) if final_norm else t
        return full_entropy(t[m], W)

    def cos(a, b):
        return torch.nn.functional.cosine_similarity(a[m].double(), b[m].double(), dim=-1)

    res = {}
    L = len(model.model.layers)
    for l in range(1, L + 1):  # noqa: E741
        h_prev = s["hidden"][l - 1]
        items = {
            "layer": (ent(s["hidden"][l]), ent(h_prev), cos(s["hidden"][l] - h_prev, h_prev)),
            "attn": (ent(s["attn"][l - 1]), ent(s["attn_in"][l - 1]), cos(s["attn"][l - 1], h_prev)),
            "ffn": (ent(s["ffn"][l - 1]), ent(s["ffn_in"][l - 1]), cos(s["ffn"][l - 1], s["mid"][l - 1])),
        }
        for mod, (e, b, c) in items.items():
            res[(mod, l)] = dict(
                entropy=e.mean().item(),
                baseline_entropy=b.mean().item(),
                delta=(e - b).mean().item(),
                frac_positive=((e - b) > 0).double().mean().item(),
                cosine=c.mean().item(),
                n_tokens=int(m.sum()),
            )
    return res


@pytest.fixture
def reference():
    return reference_table


@pytest.fixture
def streams():
    return manual_streams
