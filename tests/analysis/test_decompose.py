"""Entropy tables and telemetry metrics equal a plain full-log-softmax computation; masks and padding respected."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from verl_ext.analysis import (
    COLUMNS,
    LayerCapture,
    ProfileAccumulator,
    decompose_capture,
    entropy_profile,
    layer_entropy_profile,
    prediction_mask,
    profile_batch,
    response_token_mask,
)
from verl_ext.internal_policy import lm_head_weight, position_ids_from_mask
from verl_ext.random_models import make_model

FIELDS = ("entropy", "baseline_entropy", "delta", "cosine", "n_tokens")


def _prompt_response_batch(padded_batch, vocab, seed=1):
    """Left-padded [prompt | response] batch; token_mask = rows predicting the response tokens."""
    lengths, resp_lens = [10, 7, 12], [4, 3, 6]
    ids, mask = padded_batch(vocab, lengths, seed=seed)
    T = ids.shape[1]
    resp = torch.zeros_like(mask, dtype=torch.bool)
    for b, r in enumerate(resp_lens):
        resp[b, T - r :] = True
    return ids, mask, prediction_mask(resp)


def _assert_table(df: pd.DataFrame, ref: dict, convention: str, L: int, atol=5e-5):
    assert list(df.columns) == COLUMNS
    assert len(df) == 3 * L
    assert (df["convention"] == convention).all()
    for row in df.itertuples():
        assert row.layer_index == row.layer - 1
        want = ref[(row.module, row.layer)]
        for f in FIELDS:
            assert getattr(row, f) == pytest.approx(want[f], abs=atol, rel=1e-5), (row.module, row.layer, f)
        # fractions can flip on exact ties only; none here
        assert row.frac_positive == pytest.approx(want["frac_positive"], abs=1e-9)


@pytest.mark.parametrize("final_norm", [False, True], ids=["raw", "final_norm"])
def test_table_matches_reference(tiny_model, padded_batch, reference, final_norm):
    ids, mask, tm = _prompt_response_batch(padded_batch, tiny_model.config.vocab_size)
    df = entropy_profile(tiny_model, ids, mask, tm, final_norm=final_norm, chunk_size=5, backend="chunked")
    ref = reference(tiny_model, ids, mask, tm, final_norm=final_norm)
    _assert_table(df, ref, "final_norm" if final_norm else "raw", len(tiny_model.model.layers))
    # the profile is not degenerate on these tiny models
    assert df["entropy"].std() > 1e-3 and (df["delta"].abs() > 1e-4).any()


def test_stored_replay_equals_streaming(padded_batch):
    model = make_model("qwen3", init_std=0.1, num_hidden_layers=3)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    streamed = entropy_profile(model, ids, mask, tm, final_norm=True)
    with LayerCapture(model, tm) as cap:
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    stored = decompose_capture(cap, lm_head_weight(model), final_norm=model.model.norm)
    pd.testing.assert_frame_equal(streamed, stored)


def test_padding_and_excluded_tokens_do_not_matter(padded_batch):
    model = make_model("llama", init_std=0.1)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    base = entropy_profile(model, ids, mask, tm)
    # more left padding, with garbage ids in the padding
    extra = 5
    ids2 = torch.cat([torch.randint(2, 300, (ids.shape[0], extra)), ids], dim=1)
    ids2[:, extra:][mask == 0] = 7
    mask2 = torch.cat([torch.zeros(ids.shape[0], extra, dtype=mask.dtype), mask], dim=1)
    tm2 = torch.cat([torch.zeros(ids.shape[0], extra, dtype=torch.bool), tm], dim=1)
    padded = entropy_profile(model, ids2, mask2, tm2)
    pd.testing.assert_frame_equal(base, padded, atol=2e-5, rtol=1e-5)
    # the last token's row is excluded and nothing selected sees it as context: changing it changes nothing
    ids3 = ids.clone()
    ids3[:, -1] = (ids3[:, -1] + 11) % 300 + 2
    pd.testing.assert_frame_equal(base, entropy_profile(model, ids3, mask, tm))
    # changing a prompt token changes the response rows only through context: equal to the reference
    ids4 = ids.clone()
    ids4[:, -8] = (ids4[:, -8] + 5) % 300 + 2
    other = entropy_profile(model, ids4, mask, tm)
    assert not math.isclose(other["entropy"].iloc[-1], base["entropy"].iloc[-1], rel_tol=1e-9)


def test_mask_pooling_and_multi_batch(padded_batch, reference):
    model = make_model("qwen2", init_std=0.1, tie_word_embeddings=True)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    # a sub-mask: excluding tokens changes the averages to exactly those of the remaining tokens
    sub = tm.clone()
    sub[2] = False
    rest = tm & ~sub
    full_df = entropy_profile(model, ids, mask, tm)
    sub_df = entropy_profile(model, ids, mask, sub)
    rest_df = entropy_profile(model, ids, mask, rest)
    _assert_table(sub_df, reference(model, ids, mask, sub), "raw", 4)
    n1, n2 = int(sub.sum()), int(rest.sum())
    for f in ("entropy", "baseline_entropy", "delta", "cosine", "frac_positive"):
        pooled = (sub_df[f] * n1 + rest_df[f] * n2) / (n1 + n2)
        assert (pooled - full_df[f]).abs().max() < 1e-5, f
    # two batches fed into one accumulator pool their tokens like one batch
    acc = ProfileAccumulator(4, lm_head_weight(model))
    profile_batch(model, ids[:2], mask[:2], tm[:2], accumulator=acc)
    profile_batch(model, ids[2:], mask[2:], tm[2:], accumulator=acc)
    multi = acc.table()
    assert (multi["n_tokens"] == int(tm.sum())).all()
    pd.testing.assert_frame_equal(multi, full_df, atol=2e-5, rtol=1e-5)


def test_layer_entropy_profile_metrics(padded_batch):
    model = make_model("qwen3", init_std=0.1)
    ids, mask, _ = _prompt_response_batch(padded_batch, model.config.vocab_size)
    # verl layout: P prompt columns then R response columns
    R = 5
    response_mask = torch.ones(ids.shape[0], R, dtype=torch.long)
    response_mask[0, 3:] = 0
    tm = response_token_mask(response_mask, ids.shape[1])
    metrics = layer_entropy_profile(model, ids, mask, tm, head_weight=lm_head_weight(model).detach().clone())
    L = 4
    names = ("layer_entropy", "attn_entropy", "ffn_entropy", "delta_attn", "delta_ffn")
    assert set(metrics) == {f"bupo/{n}/{k + 1}" for n in names for k in range(L)}
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    df = entropy_profile(model, ids, mask, tm)
    for row in df.itertuples():
        if row.module == "layer":
            assert metrics[f"bupo/layer_entropy/{row.layer}"] == pytest.approx(row.entropy, abs=1e-9)
        else:
            assert metrics[f"bupo/{row.module}_entropy/{row.layer}"] == pytest.approx(row.entropy, abs=1e-9)
            assert metrics[f"bupo/delta_{row.module}/{row.layer}"] == pytest.approx(row.delta, abs=1e-9)
    # nothing selected: no metrics, NaN table
    none = torch.zeros_like(tm)
    assert layer_entropy_profile(model, ids, mask, none) == {}
    assert entropy_profile(model, ids, mask, none)["entropy"].isna().all()


def test_bfloat16_close_to_float32(padded_batch):
    model = make_model("qwen3", init_std=0.1)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    ref = entropy_profile(model, ids, mask, tm)
    got = entropy_profile(model.to(torch.bfloat16), ids, mask, tm)
    assert (got["entropy"] - ref["entropy"]).abs().max() < 0.05


def test_sharp_model_matches_reference(padded_batch, reference):
    """Larger weights: low, widely varying entropies (large raw logits at deep layers)."""
    model = make_model("qwen3", init_std=0.15, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    df = entropy_profile(model, ids, mask, tm, chunk_size=7)
    assert df["entropy"].min() < 4.0 and df["entropy"].max() - df["entropy"].min() > 0.5
    _assert_table(df, reference(model, ids, mask, tm), "raw", 4, atol=2e-4)


def test_subsample_and_mixed_dtypes(padded_batch):
    from verl_ext.analysis import subsample_mask

    model = make_model("qwen3", init_std=0.1)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    sub = subsample_mask(tm, 5)
    assert int(sub.sum()) == 5 and not (sub & ~tm).any()
    assert torch.equal(sub, subsample_mask(tm, 5)) and torch.equal(subsample_mask(tm, 10**6), tm)
    with pytest.raises(ValueError):
        subsample_mask(tm, 0)
    m = layer_entropy_profile(model, ids, mask, tm, max_tokens=5)
    ref = entropy_profile(model, ids, mask, sub)
    assert m["bupo/delta_ffn/2"] == pytest.approx(
        ref[(ref.module == "ffn") & (ref.layer == 2)]["delta"].item()
    )
    # bf16 model with a float32 head weight (e.g. gathered from fp32 FSDP shards): rows are upcast
    w32 = lm_head_weight(model).detach().clone()
    model16 = model.to(torch.bfloat16)
    a = entropy_profile(model16, ids, mask, tm, head_weight=w32)
    b = entropy_profile(model16, ids, mask, tm)
    assert (a["entropy"] - b["entropy"]).abs().max() < 0.05


def test_autocast_does_not_round_the_head(padded_batch):
    """The trainer runs the profile under bf16 autocast: the head must still accumulate in fp32."""
    model = make_model("qwen3", init_std=0.15, hidden_size=96, num_attention_heads=6, num_key_value_heads=2)
    ids, mask, tm = _prompt_response_batch(padded_batch, model.config.vocab_size)
    from verl_ext.analysis import ProfileAccumulator

    acc = ProfileAccumulator(4, lm_head_weight(model), backend="chunked")
    x = torch.randn(20, 96) * 3
    ref = acc.entropy(x)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = acc.entropy(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        df = entropy_profile(model, ids, mask, tm)
    assert df["entropy"].notna().all()
