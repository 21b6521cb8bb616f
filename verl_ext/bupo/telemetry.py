"""Per-layer entropy profile of a sub-sample of the step's responses, computed on the actor (no rollout).

Called by :meth:`BuPOActorRolloutRefWorker.bupo_layer_entropy` on every actor rank. The sub-sample
arrives in verl's no-padding layout (nested ``input_ids``/``position_ids``, response lengths from
``response_mask``); it is laid out right-padded, run through the actor's own (sharded) module once
under ``torch.no_grad`` with the streaming capture of :mod:`verl_ext.analysis`, and the per-layer
means are combined over data-parallel ranks weighted by token counts. Metric names are 1-based paper
layers: ``bupo/layer_entropy/<l>``, ``bupo/attn_entropy/<l>``, ``bupo/ffn_entropy/<l>``,
``bupo/delta_attn/<l>``, ``bupo/delta_ffn/<l>``.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name

from verl_ext.analysis import layer_entropy_profile
from verl_ext.analysis.decompose import full_head_weight
from verl_ext.bupo.engine import CHUNK_KEY, FINAL_NORM_KEY
from verl_ext.fused_head import default_chunk_size
from verl_ext.slicing import num_layers

METRIC_NAMES = ("layer_entropy", "attn_entropy", "ffn_entropy", "delta_attn", "delta_ffn")


def dense_batch(data) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, position_ids, token_mask)`` from a no-padding batch.

    ``token_mask`` marks the rows that predict response tokens (the last ``R_i`` tokens of sequence
    i are its response, so rows ``len_i - R_i - 1 .. len_i - 2``).
    """
    ids = data["input_ids"]
    lengths = ids.offsets().diff().tolist()
    resp = data["response_mask"]
    if resp.is_nested:
        resp_lens = [int(r.sum()) for r in resp.unbind()]
    else:
        resp_lens = resp.sum(-1).tolist()
    B, T = len(lengths), max(lengths)
    input_ids = ids.to_padded_tensor(0, output_size=(B, T))
    position_ids = data["position_ids"].to_padded_tensor(0, output_size=(B, T))
    attention = torch.zeros(B, T, dtype=torch.long, device=input_ids.device)
    token_mask = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    for i, (n, r) in enumerate(zip(lengths, resp_lens)):
        attention[i, :n] = 1
        token_mask[i, n - int(r) - 1 : n - 1] = True
    return input_ids, attention, position_ids, token_mask


def layer_entropy_metrics(training_worker, data):
    """Run the profile on ``data`` with the actor engine's module; return DP-averaged scalar metrics."""
    engine = training_worker.engine
    final_norm = bool(tu.get_non_tensor_data(data=data, key=FINAL_NORM_KEY, default=False))
    device = get_device_name()
    chunk = int(tu.get_non_tensor_data(data=data, key=CHUNK_KEY, default=0)) or default_chunk_size(device)
    dtype = getattr(engine, "_autocast_dtype", torch.float32)
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device, dtype=dtype)
    with engine.eval_mode(), torch.no_grad():
        input_ids, attention, position_ids, token_mask = (t.to(device) for t in dense_batch(data))
        weight = full_head_weight(engine.module)
        with autocast:
            metrics = layer_entropy_profile(
                engine.module,
                input_ids,
                attention,
                token_mask,
                position_ids=position_ids,
                final_norm=final_norm,
                chunk_size=chunk,
                head_weight=weight,
            )
    count = float(token_mask.sum()) if metrics else 0.0
    # The same keys on every rank (a rank without response tokens gets {} from the profile).
    n_layers = num_layers(engine.module)
    keys = [f"bupo/{name}/{layer}" for name in METRIC_NAMES for layer in range(1, n_layers + 1)]
    if torch.distributed.is_initialized():
        buf = torch.tensor(
            [metrics.get(k, 0.0) * count for k in keys] + [count], dtype=torch.float64, device=device
        )
        torch.distributed.all_reduce(buf, group=engine.get_data_parallel_group())
        total = max(float(buf[-1]), 1.0)
        metrics = {k: float(v) / total for k, v in zip(keys, buf[:-1].tolist())}
    return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics})
