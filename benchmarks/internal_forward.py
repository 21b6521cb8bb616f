"""Benchmark BuPO's internal-policy forward against the official fork's approach and the full policy.

One model (random weights, real dimensions) and one batch, several ways of getting the log-probs and
entropies that a PPO-style update needs, each in two modes:

* ``forward``: no grad, eval mode (the "old log-probs" recomputation before an update);
* ``update``: train mode, forward + backward of a PPO-like loss (clipped ratio term on ``log_prob``
  plus a small entropy term), gradients dropped after each step (no optimizer).

Variants:

* ``full_policy``: all L layers + final norm + fused head on the final policy (what plain GRPO costs).
* ``fork``: as the official BuPO code: all L layers with ``output_hidden_states=True``, the model's
  own full-vocabulary logits for the final layer (its entropy as a no-grad metric) and
  ``lm_head(hidden_states[k+1])`` in the model dtype, then a float32 ``log_softmax`` over the vocab.
* ``sliced_plain``: only layers 0..k run (:func:`verl_ext.slicing.exit_after_layer`) + a plain
  full-vocabulary float32 head.
* ``sliced_fused``: :func:`verl_ext.internal_policy.internal_log_probs` (layers 0..k + fused head).
* ``sliced_fused_ckpt``: the same with gradient checkpointing of the k+1 layers (``update`` only; its
  forward-only run is the same as ``sliced_fused``'s).

``--grad-ckpt`` (default on for CUDA, off on CPU) turns gradient checkpointing on for ``fork`` and
``full_policy`` (the reference numbers were taken with it). Peak memory: on CUDA the allocator's
``max_memory_allocated`` (absolute, and ``extra`` over what was allocated before the variant); on CPU
each variant+mode runs in a fresh child process (``--child VARIANT MODE``) that reports its peak RSS
minus its RSS after building the model (the kernel's high-water mark is reset after the build).
Time: on CUDA each variant runs ``--warmup`` + ``--repeats`` steps in turn; on CPU the parent times
all variants+modes on one model and batch round-robin (``--warmup`` rounds, then ``--repeats``), so
that the load swings of a shared machine hit every variant alike; the median is reported.

Output: one JSON line per variant+mode (median ms, memory, ratios vs ``fork`` in the same mode), then
one line with the targets of the project's issue as ratios and ``target_ok`` booleans (no asserts).

Commands::

    python benchmarks/internal_forward.py                       # CPU, --shape small (12 x 512, V=32000), layer 2
    python benchmarks/internal_forward.py --repeats 2 --variants fork sliced_fused
    python benchmarks/internal_forward.py --shape qwen3-4b --device cuda --dtype bfloat16   # layer 5, 8192 tokens
    python benchmarks/internal_forward.py --shape qwen3-4b --device cuda --dtype bfloat16 \\
        --tokens 32768 --variants sliced_fused sliced_fused_ckpt --modes update           # the 32k micro-batch
    python benchmarks/internal_forward.py --sweep-chunks 64 128 256 512 1024 2048 --repeats 5   # chunk sizes

``--chunk-size`` defaults to :func:`verl_ext.fused_head.default_chunk_size` of the device, the
package's own default.

Chunk sweep measured on the 2-core shared development CPU (torch 2.13 CPU, small shape, 2 x 1024
tokens, layer 2, 5 repeats, ``--threads 1``), median wall ms (median process CPU ms):

    rows      128            256            512            1024           2048
    forward   1939 (1396)    1359 (1354)    1602 (1511)    1732 (1612)    1895 (1642)
    update    4690 (4561)    4402 (4362)    4858 (4830)    4970 (4757)    5042 (4646)

256 rows is the fastest in both modes (forward 1.27x, update 1.13x faster than 1024), hence the CPU
default. With torch's two threads the same sweep ranked 256 first by the minimum (forward 660 vs
1025 ms for 1024 rows, update 2605 vs 5264 ms) while its medians were dominated by other load.
Not measured on a GPU: CUDA keeps 1024 (there ``auto`` runs verl's Triton head, which has no chunks).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_utils import (  # noqa: E402
    CudaPeak,
    GiB,
    MiB,
    current_rss_bytes,
    emit,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    run_child,
    time_calls,
)

from verl_ext.fused_head import default_chunk_size  # noqa: E402
from verl_ext.internal_policy import internal_log_probs  # noqa: E402
from verl_ext.random_models import SHAPES, make_model_from_shape  # noqa: E402
from verl_ext.slicing import exit_after_layer  # noqa: E402

VARIANTS = ("full_policy", "fork", "sliced_plain", "sliced_fused", "sliced_fused_ckpt")
MODES = ("forward", "update")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TEMPERATURE = 1.0
ENTROPY_COEF = 1e-3
CLIP = 0.2


# ----------------------------------------------------------------------------------------------- variants
def _plain_head(model, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary head as the fork does it: model-dtype matmul, then float32 log-softmax."""
    logits = model.lm_head(hidden).float()
    if TEMPERATURE != 1.0:
        logits = logits / TEMPERATURE
    logp = torch.log_softmax(logits, dim=-1)
    log_probs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return log_probs, entropy


def run_full_policy(
    model, ids: torch.Tensor, layer: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All layers + final norm + fused head (the ordinary policy)."""
    return internal_log_probs(model, ids, None, temperature=TEMPERATURE, chunk_size=chunk_size)


def run_fork(model, ids: torch.Tensor, layer: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official fork: every layer, all hidden states, [T x V] logits for the final layer and layer k."""
    out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    log_probs, entropy = _plain_head(model, out.hidden_states[layer + 1][:, :-1], ids[:, 1:])
    with torch.no_grad():  # the fork's "entropy" metric: the final policy's, over the full vocabulary
        final = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        _metric = -(final.exp() * final).sum(-1).mean()
    del out, final
    return log_probs, entropy


def run_sliced_plain(
    model, ids: torch.Tensor, layer: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers 0..k only, then a plain full-vocabulary float32 head on the raw H^{k+1}."""
    with exit_after_layer(model, layer):
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    return _plain_head(model, hidden[:, :-1], ids[:, 1:])


def run_sliced_fused(
    model, ids: torch.Tensor, layer: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layers 0..k only + the fused head (the package's entry point)."""
    return internal_log_probs(model, ids, layer, temperature=TEMPERATURE, chunk_size=chunk_size)


RUNNERS: dict[str, Callable] = {
    "full_policy": run_full_policy,
    "fork": run_fork,
    "sliced_plain": run_sliced_plain,
    "sliced_fused": run_sliced_fused,
    "sliced_fused_ckpt": run_sliced_fused,
}


def _uses_ckpt(variant: str, args: argparse.Namespace) -> bool:
    return variant == "sliced_fused_ckpt" or (args.grad_ckpt and variant in ("fork", "full_policy"))


def make_step(
    model, ids: torch.Tensor, variant: str, mode: str, args: argparse.Namespace
) -> Callable[[], None]:
    """The unit of work that is timed: one forward (no grad) or one forward + backward."""
    runner = RUNNERS[variant]
    g = torch.Generator(device="cpu").manual_seed(1)
    advantages = (torch.randint(0, 2, (ids.shape[0], ids.shape[1] - 1), generator=g) * 2 - 1).float()
    advantages = advantages.to(ids.device)

    if mode == "forward":

        def step() -> None:
            with torch.no_grad():
                runner(model, ids, args.layer, args.chunk_size)

        return step

    def step() -> None:
        log_probs, entropy = runner(model, ids, args.layer, args.chunk_size)
        ratio = torch.exp(log_probs - log_probs.detach())
        pg = -torch.minimum(ratio * advantages, ratio.clamp(1 - CLIP, 1 + CLIP) * advantages)
        loss = pg.mean() - ENTROPY_COEF * entropy.mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def prepare(model, variant: str, mode: str, args: argparse.Namespace) -> None:
    """Train/eval mode and gradient checkpointing for one variant+mode."""
    if mode == "update":
        model.train()
        if _uses_ckpt(variant, args):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    else:
        model.eval()
        model.gradient_checkpointing_disable()


# ------------------------------------------------------------------------------------------------ set-up
def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random weights) and the token batch, the same for every variant (fixed seeds)."""
    dtype = DTYPES[args.dtype]
    model = make_model_from_shape(
        args.shape, dtype=dtype, device=args.device, attn_implementation="sdpa", seed=0
    )
    seq = args.tokens // args.batch
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), generator=g).to(args.device)
    return model, ids


def _record_base(args: argparse.Namespace, variant: str, mode: str) -> dict:
    return {
        "variant": variant,
        "mode": mode,
        "shape": args.shape,
        "layer": args.layer,
        "batch": args.batch,
        "tokens": args.batch * (args.tokens // args.batch),
        "device": args.device,
        "dtype": args.dtype,
        "grad_ckpt": _uses_ckpt(variant, args) and mode == "update",
        "chunk_size": args.chunk_size,
    }


def measure_memory_cpu(args: argparse.Namespace, variant: str, mode: str) -> dict:
    """Child process body: build, reset the RSS high-water mark, run ``--mem-steps`` steps, read the peak."""
    model, ids = build(args)
    prepare(model, variant, mode, args)
    step = make_step(model, ids, variant, mode, args)
    gc.collect()
    base = current_rss_bytes()
    reset = reset_peak_rss()
    times = time_calls(step, repeats=args.mem_steps, warmup=0, device=args.device)
    peak = peak_rss_bytes()
    return {
        "variant": variant,
        "mode": mode,
        "peak_mem_mib": round(peak / MiB, 1),
        "extra_mem_mib": round((peak - base) / MiB, 1),
        "model_mem_mib": round(base / MiB, 1),
        "mem_basis": "peak_rss_minus_rss_after_build"
        if reset
        else "ru_maxrss_minus_rss_after_build(not reset)",
        "child_ms": [round(t, 1) for t in times],
    }


def time_interleaved_cpu(
    args: argparse.Namespace, jobs: list[tuple[str, str]]
) -> dict[tuple[str, str], list[float]]:
    """Time every variant+mode on one model and batch, round-robin, so load swings hit all alike."""
    model, ids = build(args)
    steps = {job: make_step(model, ids, *job, args) for job in jobs}
    times: dict[tuple[str, str], list[float]] = {job: [] for job in jobs}
    for round_ in range(args.warmup + args.repeats):
        for job in jobs:
            prepare(model, *job, args)
            (t,) = time_calls(steps[job], repeats=1, warmup=0, device=args.device)
            if round_ >= args.warmup:
                times[job].append(t)
        print(f"# round {round_ + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    return times


def measure_all_cpu(args: argparse.Namespace, jobs: list[tuple[str, str]]) -> list[dict]:
    """Memory: one fresh child process per variant+mode. Time: interleaved in this process."""
    memory = {}
    for variant, mode in jobs:
        (mem,) = run_child(_child_argv(args, variant, mode))
        memory[(variant, mode)] = mem
        print(f"# memory {variant}/{mode}: +{mem['extra_mem_mib']} MiB", file=sys.stderr, flush=True)
    times = time_interleaved_cpu(args, jobs)
    records = []
    for job in jobs:
        mem = {k: v for k, v in memory[job].items() if k not in ("variant", "mode")}
        records.append(
            {
                **_record_base(args, *job),
                "median_ms": round(median(times[job]), 1),
                "times_ms": [round(t, 1) for t in times[job]],
                **mem,
                "threads": torch.get_num_threads(),
            }
        )
    return records


def measure_all_cuda(args: argparse.Namespace, jobs: list[tuple[str, str]]) -> list[dict]:
    """One process: the model is built once, every variant+mode measured in turn."""
    model, ids = build(args)
    torch.cuda.synchronize()
    model_mem = torch.cuda.memory_allocated()
    records = []
    for variant, mode in jobs:
        prepare(model, variant, mode, args)
        step = make_step(model, ids, variant, mode, args)
        try:
            with CudaPeak(args.device) as mem:
                times = time_calls(step, repeats=args.repeats, warmup=args.warmup, device=args.device)
        except torch.OutOfMemoryError as exc:
            model.zero_grad(set_to_none=True)
            records.append({**_record_base(args, variant, mode), "error": f"OOM: {str(exc)[:200]}"})
            print(f"# {variant}/{mode}: OOM", file=sys.stderr, flush=True)
            continue
        records.append(
            {
                **_record_base(args, variant, mode),
                "median_ms": round(median(times), 1),
                "times_ms": [round(t, 1) for t in times],
                "peak_mem_mib": round(mem.peak / MiB, 1),
                "extra_mem_mib": round(mem.extra / MiB, 1),
                "model_mem_mib": round(model_mem / MiB, 1),
                "mem_basis": "cuda_max_allocated",
            }
        )
        print(f"# {variant}/{mode}: {records[-1]['median_ms']} ms", file=sys.stderr, flush=True)
    return records


# ------------------------------------------------------------------------------------------ ratios/targets
def add_ratios(records: list[dict]) -> None:
    """Ratios against ``fork`` in the same mode: time, peak memory and extra memory."""
    fork = {r["mode"]: r for r in records if r["variant"] == "fork" and "median_ms" in r}
    for r in records:
        ref = fork.get(r["mode"])
        if ref is None or "median_ms" not in r:
            continue
        r["time_vs_fork"] = round(r["median_ms"] / ref["median_ms"], 3)
        r["peak_mem_vs_fork"] = round(r["peak_mem_mib"] / ref["peak_mem_mib"], 3)
        if ref["extra_mem_mib"] > 0:
            r["extra_mem_vs_fork"] = round(r["extra_mem_mib"] / ref["extra_mem_mib"], 3)


def targets(records: list[dict], args: argparse.Namespace) -> dict:
    """The issue's targets, as ratios and booleans (``None`` where a needed run is missing)."""
    by = {(r["variant"], r["mode"]): r for r in records if "median_ms" in r}
    fused = [v for v in ("sliced_fused", "sliced_fused_ckpt") if (v, "update") in by]
    out: dict = {"targets": True, "device": args.device, "shape": args.shape, "tokens": args.tokens}
    ratios: dict = {}
    ok: dict = {}
    fwd = by.get(("sliced_fused", "forward"))
    if fwd and "time_vs_fork" in fwd:
        ratios["forward_time_vs_fork"] = fwd["time_vs_fork"]
    for v in fused:
        r = by[(v, "update")]
        if "time_vs_fork" in r:
            ratios[f"{v}_update_time_vs_fork"] = r["time_vs_fork"]
            ratios[f"{v}_update_peak_mem_vs_fork"] = r["peak_mem_vs_fork"]
            ratios[f"{v}_update_extra_mem_vs_fork"] = r.get("extra_mem_vs_fork")
    if args.device == "cpu":
        out["cpu_mem_basis"] = "extra = peak RSS - RSS after model build, one child process per variant"
        ok["cpu_forward_time<=0.45x_fork"] = (
            ratios["forward_time_vs_fork"] <= 0.45 if "forward_time_vs_fork" in ratios else None
        )
        met = [
            ratios[f"{v}_update_time_vs_fork"] <= 0.85
            and (ratios[f"{v}_update_extra_mem_vs_fork"] or 9) <= 0.5
            for v in fused
            if f"{v}_update_time_vs_fork" in ratios
        ]
        ok["cpu_update_time<=0.85x_and_extra_mem<=0.5x_fork"] = any(met) if met else None
    else:
        out["gpu_peak_mem_basis"] = "absolute torch.cuda.max_memory_allocated (weights included)"
        ok["gpu_forward_time<=0.25x_fork"] = (
            ratios["forward_time_vs_fork"] <= 0.25 if "forward_time_vs_fork" in ratios else None
        )
        met = [
            ratios[f"{v}_update_time_vs_fork"] <= 0.5 and ratios[f"{v}_update_peak_mem_vs_fork"] <= 0.6
            for v in fused
            if f"{v}_update_time_vs_fork" in ratios
        ]
        ok["gpu_update_time<=0.5x_and_peak_mem<=0.6x_fork"] = any(met) if met else None
        if args.tokens >= 32768 and fused:
            ok["gpu_32k_update_peak<25GiB"] = any(
                by[(v, "update")]["peak_mem_mib"] * MiB < 25 * GiB for v in fused
            )
    out["ratios"] = ratios
    out["target_ok"] = ok
    return out


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, with device-dependent defaults filled in."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "tiny"] + ["tiny"], default=None)
    p.add_argument("--layer", type=int, default=None, help="0-based exit layer k (default 2 small, 5 qwen3)")
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per micro-batch (default 2048 CPU, 8192 GPU)"
    )
    p.add_argument("--batch", type=int, default=None, help="rows of the micro-batch (default 2 CPU, 1 GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3 CPU, 5 GPU)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default float32 CPU, bfloat16 GPU")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="fused-head rows per chunk (default: the device's default)",
    )
    p.add_argument(
        "--sweep-chunks",
        type=int,
        nargs="+",
        default=None,
        metavar="ROWS",
        help="time sliced_fused at each chunk size instead of the variants (round-robin, --modes)",
    )
    p.add_argument(
        "--grad-ckpt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gradient checkpointing for fork and full_policy (default: on for CUDA, off on CPU)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--mem-steps", type=int, default=1, help="CPU: steps per memory child process")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = args.device.startswith("cuda")
    args.shape = args.shape or ("qwen3-4b" if gpu else "small")
    args.layer = args.layer if args.layer is not None else (5 if args.shape.startswith("qwen3") else 2)
    args.tokens = args.tokens or (8192 if gpu else 2048)
    args.batch = args.batch or (1 if gpu else 2)
    args.repeats = args.repeats or (5 if gpu else 3)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.grad_ckpt = gpu if args.grad_ckpt is None else args.grad_ckpt
    args.chunk_size = args.chunk_size or default_chunk_size(args.device)
    n_layers = SHAPES[args.shape].num_hidden_layers
    if not 0 <= args.layer < n_layers:
        p.error(f"--layer must be in 0..{n_layers - 1} for --shape {args.shape}")
    return args


def _jobs(args: argparse.Namespace) -> list[tuple[str, str]]:
    # fork first: every ratio refers to it
    ordered = sorted(args.variants, key=lambda v: (v != "fork", VARIANTS.index(v)))
    return [(v, m) for m in args.modes for v in ordered if not (v == "sliced_fused_ckpt" and m == "forward")]


def _child_argv(args: argparse.Namespace, variant: str, mode: str) -> list[str]:
    argv = [
        str(Path(__file__).resolve()),
        *("--shape", args.shape, "--layer", str(args.layer), "--tokens", str(args.tokens)),
        *("--batch", str(args.batch), "--mem-steps", str(args.mem_steps)),
        *("--device", args.device, "--dtype", args.dtype, "--chunk-size", str(args.chunk_size)),
        "--grad-ckpt" if args.grad_ckpt else "--no-grad-ckpt",
        *("--child", variant, mode),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    return argv


def sweep_chunks(args: argparse.Namespace) -> list[dict]:
    """Time ``sliced_fused`` (the phase-1 path) at every ``--sweep-chunks`` size on one model and batch.

    Chunk sizes and modes run round-robin (``--warmup`` rounds, then ``--repeats``) so that load swings
    hit all alike. One record per size and mode (median and minimum wall ms, median process CPU ms,
    median ratios to the fastest size and to 1024 rows, the chunk's float32 logits buffer), then one
    with the fastest size per mode by median, by minimum and by CPU time. On a shared, loaded CPU the
    wall-clock median is mostly other people's load; with ``--threads 1`` the process CPU time is the
    steady figure (it does not count time spent preempted).
    """
    model, ids = build(args)
    jobs = [(chunk, mode) for mode in args.modes for chunk in args.sweep_chunks]
    steps = {
        job: make_step(
            model, ids, "sliced_fused", job[1], argparse.Namespace(**{**vars(args), "chunk_size": job[0]})
        )
        for job in jobs
    }
    times: dict[tuple[int, str], list[float]] = {job: [] for job in jobs}
    cpu_times: dict[tuple[int, str], list[float]] = {job: [] for job in jobs}
    for round_ in range(args.warmup + args.repeats):
        for job in jobs:
            prepare(model, "sliced_fused", job[1], args)
            cpu0 = time.process_time()
            (t,) = time_calls(steps[job], repeats=1, warmup=0, device=args.device)
            if round_ >= args.warmup:
                times[job].append(t)
                cpu_times[job].append((time.process_time() - cpu0) * 1e3)
        print(f"# round {round_ + 1}/{args.warmup + args.repeats} done", file=sys.stderr, flush=True)
    vocab = model.config.vocab_size
    records = []
    best: dict[str, int] = {}
    for mode in args.modes:
        med = {chunk: median(times[(chunk, mode)]) for chunk in args.sweep_chunks}
        fastest = min(med, key=med.get)
        best[mode] = fastest
        for chunk in args.sweep_chunks:
            records.append(
                {
                    **_record_base(args, "sliced_fused", mode),
                    "chunk_size": chunk,
                    "median_ms": round(med[chunk], 1),
                    "min_ms": round(min(times[(chunk, mode)]), 1),
                    "median_cpu_ms": round(median(cpu_times[(chunk, mode)]), 1),
                    "times_ms": [round(t, 1) for t in times[(chunk, mode)]],
                    "time_vs_fastest": round(med[chunk] / med[fastest], 3),
                    "time_vs_1024": round(med[chunk] / med[1024], 3) if 1024 in med else None,
                    "chunk_logits_mib": round(chunk * vocab * 4 / MiB, 1),
                }
            )
    for r in records:
        emit(r)
    summary = {
        "sweep": "chunk_size",
        "device": args.device,
        "shape": args.shape,
        "tokens": args.tokens,
        "fastest": best,
        "fastest_by_min": {
            mode: min(args.sweep_chunks, key=lambda c, m=mode: min(times[(c, m)])) for mode in args.modes
        },
        "fastest_by_cpu": {
            mode: min(args.sweep_chunks, key=lambda c, m=mode: median(cpu_times[(c, m)]))
            for mode in args.modes
        },
        "current_default": default_chunk_size(args.device),
    }
    emit(summary)
    return [*records, summary]


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print and return the JSON records."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        record = measure_memory_cpu(args, *args.child)
        emit(record)
        return [record]
    jobs = _jobs(args)
    emit(
        {
            "benchmark": "internal_forward" if not args.sweep_chunks else "internal_forward_chunk_sweep",
            "shape": args.shape,
            **{k: v for k, v in SHAPES[args.shape].__dict__.items() if k != "arch"},
            "layer": args.layer,
            "tokens": args.tokens,
            "batch": args.batch,
            "device": args.device,
            "dtype": args.dtype,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        }
    )
    if args.sweep_chunks:
        return sweep_chunks(args)
    if args.device.startswith("cuda"):
        records = measure_all_cuda(args, jobs)
    else:
        records = measure_all_cpu(args, jobs)
    add_ratios(records)
    for r in records:
        emit(r)
    summary = targets(records, args)
    emit(summary)
    return [*records, summary]


if __name__ == "__main__":
    main()
