"""Shared helpers for the benchmarks: timing, peak memory (CUDA allocator or process RSS), child runs.

Memory on CPU is measured per process: a benchmark re-invokes itself in a fresh child per variant
(:func:`run_child`), the child records its resident set after building the model
(:func:`current_rss_bytes`), resets the kernel's high-water mark (:func:`reset_peak_rss`) and reads it
back after the work (:func:`peak_rss_bytes`). On CUDA, :class:`CudaPeak` wraps the allocator's
counters. Results are printed as one JSON object per line (:func:`emit`).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

MiB = 2**20
GiB = 2**30


def emit(record: dict) -> None:
    """Print one JSON line (flushed, so a parent process or a log sees it at once)."""
    print(json.dumps(record, sort_keys=False), flush=True)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    fn: Callable[[], object], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> list[float]:
    """Wall-clock milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    Args:
        fn: the work to time (its result is discarded before the next call).
        repeats: timed calls.
        warmup: untimed calls first (allocator, kernel selection, caches).
        device: synchronised before and after each timed call when it is a CUDA device.

    Returns:
        One duration per timed call, in milliseconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    return float(statistics.median(values))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size of this process now (``VmRSS``; falls back to ``psutil``)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # only where /proc is missing

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0: ``clear_refs`` value 5).

    Returns:
        True when the mark was reset; False when :func:`peak_rss_bytes` still includes everything
        since the process started (then subtracting a baseline over-counts earlier transients).
    """
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (``VmHWM``, else ``getrusage``'s ``ru_maxrss``)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024


class CudaPeak:
    """Peak CUDA memory of a block of work, over a baseline taken at entry.

    Usage::

        with CudaPeak(device) as mem:
            work()
        mem.peak, mem.extra, mem.base  # bytes: max allocated, peak - base, allocated at entry
    """

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.base = self.peak = self.extra = 0

    def __enter__(self) -> CudaPeak:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)
        self.extra = self.peak - self.base


def run_child(argv: list[str], timeout: float | None = None, env: dict | None = None) -> list[dict]:
    """Run ``python argv...`` in a fresh process and return the JSON objects it printed, one per line.

    Non-JSON lines are ignored; stderr is passed through when the child fails.

    Raises:
        RuntimeError: the child exited with a non-zero status.
    """
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env or dict(os.environ)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
