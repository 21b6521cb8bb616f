"""Benchmark: answers per second through ``compute_score``, the old home-made grader pool vs pebble.

The old pool is ``verl_ext/reward.py`` as of commit ``cef89e3`` (``_Worker`` / ``_GraderPool``), read
with ``git show`` into a temporary module; the new one is the working tree's ``verl_ext.reward``
(``verl_ext.graders``, a ``pebble.ProcessPool``). Both get the same answers, every one of which needs
math-verify (no exact or plain-number shortcut) and none of which repeats (their verdict caches stay
cold), from ``--threads`` caller threads (verl calls the reward from a thread pool) with the same
number of grader processes (``BUPO_REWARD_WORKERS`` or ``min(4, cpu_count)``). Grader start-up is
excluded: each implementation grades one warm-up answer per grader process first. The implementations
run one after the other, ``--rounds`` times alternating, and each line reports one run.

Prints one JSON line per run and a summary line (median answers per second, pebble / old).

    python benchmarks/reward_throughput.py                       # 200 answers, 8 threads, 1 round
    python benchmarks/reward_throughput.py --answers 400 --threads 1 8 --rounds 2

Measured on the 2-core shared development machine (2 grader processes, 300 answers, 4 rounds per
setting, median answers/s, pebble vs old; load average 2.7-4.7 from other people's tests):

    caller threads   run 1 (load 2.7)       run 2 (load 3.4)       run 3 (load 4.7, 400 answers)
    1                204 vs 274 (0.74x)     183 vs 250 (0.73x)     -
    8                232 vs 371 (0.63x)     239 vs 236 (1.01x)     187 vs 122 (1.52x)

A single caller pays about 1 ms more per answer with pebble: every answer crosses two more threads
of the parent (pebble's task scheduler and message manager) and sends an acknowledgement message;
with 1 grader process the gap is similar (0.78x). With 8 callers, as verl calls the reward, pebble's
workers take the next answer straight from the shared pipe and the figures straddle parity under this
machine's load swings. Accepted: a step's math-verify answers cost seconds against minutes of
rollout, and the pool's code is pebble's, kept since 2013, instead of ours.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_COMMIT = "cef89e3"


def emit(record: dict) -> None:
    """Print one JSON line, flushed."""
    print(json.dumps(record), flush=True)


def answers(n: int, offset: int) -> list[tuple[str, str]]:
    """``n`` distinct (response, ground truth) pairs that all go to math-verify; half of them match."""
    out = []
    for i in range(offset, offset + n):
        k = i + 2
        if i % 2:
            out.append((f"so \\boxed{{\\frac{{{k}}}{{{2 * k}}}}}", "0.5"))  # match
        else:
            out.append((f"so \\boxed{{\\sqrt{{{k * k}}}}}", f"{k + 1}"))  # mismatch
    return out


def load_old(tmp: Path):
    """The reward module of :data:`OLD_COMMIT`, importable by name (its spawned graders import it too)."""
    source = subprocess.run(
        ["git", "show", f"{OLD_COMMIT}:verl_ext/reward.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = f"_reward_{OLD_COMMIT}"
    (tmp / f"{name}.py").write_text(source)
    sys.path.insert(0, str(tmp))  # spawned children get the parent's sys.path
    return importlib.import_module(name)


def run_once(module, items: list[tuple[str, str]], threads: int) -> float:
    """Seconds to grade ``items`` through ``module.compute_score`` from ``threads`` threads."""

    def grade(item):
        out = module.compute_score("bench", item[0], item[1])
        if out["method"] != "math_verify" or out["reason"] not in ("match", "mismatch"):
            raise RuntimeError(f"unexpected result {out}")
        return out["score"]

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        scores = list(ex.map(grade, items))
    elapsed = time.perf_counter() - start
    expected = [1.0 if "frac" in resp else 0.0 for resp, _ in items]
    if scores != expected:
        raise RuntimeError("verdicts differ from the expected ones")
    return elapsed


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmark; print and return the JSON records."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", type=int, default=200, help="answers per run")
    p.add_argument("--threads", type=int, nargs="+", default=[8], help="caller threads (one run each)")
    p.add_argument("--rounds", type=int, default=1, help="runs per implementation and thread count")
    args = p.parse_args(argv)

    from verl_ext import graders
    from verl_ext import reward as new

    workers = graders.default_workers()
    emit(
        {
            "benchmark": "reward_throughput",
            "answers": args.answers,
            "threads": args.threads,
            "rounds": args.rounds,
            "workers": workers,
            "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "old": f"verl_ext/reward.py@{OLD_COMMIT}",
        }
    )
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="reward_bench_") as tmp:
        impls = {"pebble": new}
        try:
            impls["old_pool"] = load_old(Path(tmp))
        except (OSError, subprocess.CalledProcessError, ImportError) as e:
            emit({"impl": "old_pool", "error": f"cannot load the old module: {e!r}"[:300]})
        offset = 0
        for module in impls.values():  # start-up (and math-verify's import) outside the timing
            run_once(module, answers(2 * workers, offset), threads=2 * workers)
            offset += 2 * workers
        for threads in args.threads:
            for round_ in range(args.rounds):
                items = answers(args.answers, offset)  # the same answers for each implementation
                offset += args.answers
                order = list(impls) if round_ % 2 == 0 else list(reversed(impls))
                for name in order:
                    seconds = run_once(impls[name], items, threads)
                    rec = {
                        "impl": name,
                        "threads": threads,
                        "round": round_,
                        "answers": len(items),
                        "seconds": round(seconds, 3),
                        "answers_per_s": round(len(items) / seconds, 1),
                    }
                    records.append(rec)
                    emit(rec)
        for module in impls.values():
            module.shutdown()
    summary: dict = {"summary": True}
    for threads in args.threads:
        rates = {
            name: statistics.median(
                r["answers_per_s"] for r in records if r["impl"] == name and r["threads"] == threads
            )
            for name in {r["impl"] for r in records}
        }
        summary[f"threads_{threads}"] = rates
        if "old_pool" in rates:
            summary[f"threads_{threads}_pebble_vs_old"] = round(rates["pebble"] / rates["old_pool"], 3)
    emit(summary)
    return [*records, summary]


if __name__ == "__main__":
    main()
