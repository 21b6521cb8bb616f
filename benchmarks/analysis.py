"""Benchmark: one-pass entropy profile (verl_ext.analysis) vs the naive way, time and peak memory.

Variants, each run in a fresh subprocess (so peak RSS is its own):

* ``onepass``: :func:`verl_ext.analysis.profile_batch`: one forward with streaming capture hooks,
  response rows only, fused chunked head (no [tokens x vocab] beyond one chunk), ``logits_to_keep=1``.
* ``naive``: ``output_hidden_states=True`` (plus hooks for A^l, F^l, the normed inputs and the raw
  H^L, all over the whole padded batch) and, per layer and module, a full-vocabulary
  ``log_softmax(h @ E_u^T)`` over every position, then masked means (one stream at a time; the final
  [B, T, V] logits of the forward are kept as a plain forward returns them).

Both compute the same table (layer/attn/ffn entropies and their baselines); the parent checks that they
agree. Peak memory = ``ru_maxrss`` at the end minus the RSS after the model and inputs were built.
Both variants use the same attention implementation (``--attn``, default ``sdpa``, the HF default).

Defaults: 1 torch thread per child (``--threads``; wall times on a shared box are otherwise noise),
chunk 128 rows (``--chunk-size``; on CPU small chunks are also the fastest, being cache resident).
glibc's malloc keeps freed blocks of up to 32 MiB in its heap once its dynamic mmap threshold has
grown, so the one-pass peak RSS (many ~16 MB chunk temporaries) includes some fragmentation and
varies by +-10% between runs; ``--chunk-size 32`` avoids most of it (smaller blocks reuse well).
``--malloc fixed`` runs both children with ``MALLOC_MMAP_THRESHOLD_=65536``: large tensors are then
returned to the OS when freed and peak RSS tracks the memory in use, at the price of page faults on
every chunk (slower one-pass times); ``--malloc glibc`` (default) keeps the default allocator.
Each variant runs ``--repeats`` times, each time in a fresh process, interleaved with the other variant
(load drift hits both alike). Prints one JSON line per variant (median time and peak MB over the
repeats) and one with the ratios (and the largest difference between the two tables, in nats).

    python benchmarks/analysis.py --shape small --batch 2 \
        --prompt-len 128 --response-len 512 --repeats 2

Measured (2-core shared CPU box, 1 thread, small shape, 2 x (128 + 512) tokens, 1024 response tokens):
chunk 128: one-pass 26.9 s / 229 MB, naive 38.6 s / 945 MB (4.1x less memory, 0.70x the time);
chunk 32: one-pass 34.4 s / 82 MB, naive 38.2 s / 897 MB (11x less memory, 0.90x the time);
``--malloc fixed`` (2 threads): one-pass 80 MB vs naive 844 MB.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inputs(vocab: int, batch: int, prompt_len: int, response_len: int, device: str):
    g = torch.Generator().manual_seed(0)
    T = prompt_len + response_len
    ids = torch.randint(2, vocab, (batch, T), generator=g)
    mask = torch.ones(batch, T, dtype=torch.long)
    # left padding on all but the longest prompt
    for b in range(1, batch):
        pad = min(prompt_len // 4 * b, prompt_len - 1)
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    from verl_ext.analysis import response_token_mask

    resp = torch.ones(batch, response_len, dtype=torch.long)
    tm = response_token_mask(resp, T)
    return ids.to(device), mask.to(device), tm.to(device)


@torch.no_grad()
def run_onepass(model, ids, mask, tm, chunk_size: int) -> list[float]:
    from verl_ext.analysis import profile_batch

    df = profile_batch(model, ids, mask, tm, chunk_size=chunk_size, backend="chunked").table()
    return df["entropy"].tolist() + df["baseline_entropy"].tolist()


@torch.no_grad()
def run_naive(model, ids, mask, tm) -> list[float]:
    from verl_ext.internal_policy import lm_head_weight, position_ids_from_mask

    dec = model.model
    L = len(dec.layers)
    store: dict = {}
    handles = []
    for k, lay in enumerate(dec.layers):
        for name, mod in (
            ("attn_in", lay.input_layernorm),
            ("attn", lay.self_attn),
            ("ffn_in", lay.post_attention_layernorm),
            ("ffn", lay.mlp),
        ):
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, o, key=(name, k): store.__setitem__(key, o[0] if isinstance(o, tuple) else o)
                )
            )
    handles.append(dec.layers[L - 1].register_forward_hook(lambda m, a, o: store.__setitem__("last", o)))
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids_from_mask(mask),
        output_hidden_states=True,
    )
    for h in handles:
        h.remove()
    hs = list(out.hidden_states[:L]) + [store["last"]]
    W = lm_head_weight(model)
    m = tm.bool()

    def ent_mean(h):
        logp = torch.log_softmax((h.float() @ W.float().T), dim=-1)  # [B, T, V]
        ent = -(logp.exp() * logp).sum(-1)
        return ent[m].double().mean().item()

    layer = [ent_mean(hs[l]) for l in range(L + 1)]  # noqa: E741
    attn = [ent_mean(store[("attn", k)]) for k in range(L)]
    ffn = [ent_mean(store[("ffn", k)]) for k in range(L)]
    attn_in = [ent_mean(store[("attn_in", k)]) for k in range(L)]
    ffn_in = [ent_mean(store[("ffn_in", k)]) for k in range(L)]
    del out
    return layer[1:] + attn + ffn + layer[:-1] + attn_in + ffn_in


def child(args) -> None:
    """Build the model and inputs, run one variant once, print one JSON line (time, peak RSS, values)."""
    from verl_ext.random_models import SHAPES, make_model_from_shape

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = make_model_from_shape(
        args.shape, init_std=0.02, device=args.device, attn_implementation=args.attn
    )
    ids, mask, tm = _inputs(
        SHAPES[args.shape].vocab_size, args.batch, args.prompt_len, args.response_len, args.device
    )
    gc.collect()
    base = _rss_mb()
    load_peak = _peak_rss_mb()  # must not exceed base + the variant's peak, or the peak is masked
    t0 = time.perf_counter()
    if args.variant == "onepass":
        result = run_onepass(model, ids, mask, tm, args.chunk_size)
    else:
        result = run_naive(model, ids, mask, tm)
    elapsed = time.perf_counter() - t0
    peak = _peak_rss_mb()
    print(
        json.dumps(
            dict(
                time_s=elapsed,
                peak_mb=peak - base,
                load_peak_above_base_mb=load_peak - base,
                response_tokens=int(tm.sum()),
                threads=torch.get_num_threads(),
                values=result,
            )
        )
    )


def _spawn(args, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant]
    for k in (
        "shape",
        "batch",
        "prompt_len",
        "response_len",
        "chunk_size",
        "device",
        "attn",
        "malloc",
        "threads",
    ):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ)
    if args.malloc == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--response-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant, interleaved")
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa", help="attention implementation for both variants")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per child (1: stable on shared boxes)"
    )
    p.add_argument("--malloc", choices=["fixed", "glibc"], default="glibc", help="see the module docstring")
    p.add_argument("--variant", choices=["onepass", "naive"], default=None, help="internal: run one variant")
    args = p.parse_args()
    if args.variant:
        child(args)
        return
    runs: dict[str, list[dict]] = {"onepass": [], "naive": []}
    for r in range(args.repeats):  # interleaved (alternating order) so that load drift hits both alike
        for variant in ("onepass", "naive") if r % 2 == 0 else ("naive", "onepass"):
            runs[variant].append(_spawn(args, variant))
    summary = {}
    for variant, rs in runs.items():
        summary[variant] = dict(
            variant=variant,
            shape=args.shape,
            batch=args.batch,
            prompt_len=args.prompt_len,
            response_len=args.response_len,
            response_tokens=rs[0]["response_tokens"],
            chunk_size=args.chunk_size if variant == "onepass" else None,
            attn=args.attn,
            malloc=args.malloc,
            threads=rs[0]["threads"],
            median_s=round(statistics.median(x["time_s"] for x in rs), 3),
            times_s=[round(x["time_s"], 3) for x in rs],
            peak_mb=round(statistics.median(x["peak_mb"] for x in rs), 1),
            peaks_mb=[round(x["peak_mb"], 1) for x in rs],
            load_peak_above_base_mb=round(max(x["load_peak_above_base_mb"] for x in rs), 1),
        )
        print(json.dumps(summary[variant]))
    a, b = summary["onepass"], summary["naive"]
    diff = max(abs(x - y) for x, y in zip(runs["onepass"][0]["values"], runs["naive"][0]["values"]))
    paired = [x["time_s"] / y["time_s"] for x, y in zip(runs["onepass"], runs["naive"])]
    print(
        json.dumps(
            dict(
                peak_memory_ratio_naive_over_onepass=round(b["peak_mb"] / max(a["peak_mb"], 1e-9), 2),
                time_ratio_onepass_over_naive=round(a["median_s"] / b["median_s"], 3),
                paired_time_ratios=[round(x, 3) for x in paired],
                max_abs_diff_nats=diff,
            )
        )
    )


if __name__ == "__main__":
    main()
