"""Avg@K and unbiased pass@K per data source, from verl validation dumps or a table of responses.

Usage::

    python -m verl_ext.evaluate GENERATIONS [GENERATIONS ...] [--out DIR] [--step latest|all|N]
        [--data VAL.parquet ...] [--use-dumped-score] [--workers N] [--timeout S] [--no-plot]

``GENERATIONS`` are files or directories:

- verl's validation dumps (``trainer.validation_data_dir``): one ``<step>.jsonl`` per validation pass, one
  line per sample with ``input``, ``output``, ``gts``, ``score``, ``step``, ``reward``, ``uid``
  (``<prompt uid>_<session>_<index>``) and the reward function's extra keys (``acc``, ``pred``, ``reason``,
  ``source`` with :mod:`verl_ext.reward`). By default the latest step of a directory is evaluated.
- any JSONL/JSON/parquet table with a response column (``response``/``output``/``responses``; a list of
  responses per row is expanded), a ground-truth column (``ground_truth``/``gts``/``answer`` or
  ``reward_model.ground_truth``), a prompt column (``prompt``/``input``/``question``/``problem``) and a
  ``data_source`` column.

Samples are grouped per prompt (the uid of verl dumps, else the prompt text) within each data source. Rows
without a data source get one from ``--data`` (verl validation parquet files, matched by problem text) or
``unknown``. Every response is re-graded with :func:`verl_ext.reward.compute_score` unless
``--use-dumped-score`` is given.

Reported per data source (values in percent): Avg@K = mean over problems of the fraction of the K samples
that are correct (the paper's metric, K = samples per problem), and the unbiased pass@k =
1 - C(n-c, k) / C(n, k) for k = 1, 2, 4, ... <= n and k = n, averaged over problems (Chen et al., 2021).
Written to ``--out`` (default ``<first input>/report``): ``results.md``, ``results.csv`` and
``pass_at_k.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_ANSWER_REASONS = frozenset({"no_box", "empty_box", "unclosed_box", "answer_too_long"})
RESPONSE_KEYS = ("output", "response", "responses", "generation", "completion")
GROUND_TRUTH_KEYS = ("gts", "ground_truth", "answer", "final_answer")
PROMPT_KEYS = ("input", "prompt", "question", "problem")
SOURCE_KEYS = ("data_source", "source")


class EvalError(ValueError):
    """Unreadable generations or missing columns."""


@dataclass
class Sample:
    """One graded (or to be graded) response."""

    data_source: str
    group: str
    response: Any
    ground_truth: Any
    prompt_text: str = ""
    dumped_correct: bool | None = None
    correct: bool | None = None
    reason: str | None = None


# ---------------------------------------------------------------------------------------------------------
# pass@k
# ---------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``.

    Computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)``, which never forms large binomials.

    Raises:
        ValueError: Unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def k_values(n: int) -> list[int]:
    """``1, 2, 4, ... <= n`` plus ``n`` itself."""
    if n < 1:
        return []
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


# ---------------------------------------------------------------------------------------------------------
# Reading generations
# ---------------------------------------------------------------------------------------------------------


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise EvalError(f"{path}:{lineno}: not JSON ({e})") from None
        return rows
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):  # column-oriented
            keys = list(data)
            return [dict(zip(keys, values)) for values in zip(*(data[k] for k in keys))]
        return list(data)
    raise EvalError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")


def find_generation_files(paths: Sequence[str | Path], step: str = "latest") -> list[Path]:
    """Resolve inputs to files; in directories of verl dumps (``<step>.jsonl``) pick the step(s).

    Args:
        paths: Files and/or directories.
        step: ``latest``, ``all`` or a step number (for directories of ``<step>.jsonl`` files).
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
            continue
        if not p.is_dir():
            raise EvalError(f"{p} does not exist")
        found = sorted(
            f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".jsonl", ".json", ".parquet")
        )
        if not found:
            raise EvalError(f"no .jsonl/.json/.parquet generation files in {p}")
        stepped = {int(f.stem): f for f in found if f.stem.isdigit()}
        if stepped:
            if step == "all":
                found = [stepped[s] for s in sorted(stepped)]
            elif step == "latest":
                found = [stepped[max(stepped)]]
            else:
                try:
                    found = [stepped[int(step)]]
                except (ValueError, KeyError):
                    raise EvalError(f"{p}: no dump for step {step!r}; steps are {sorted(stepped)}") from None
        files.extend(found)
    return files


def _first_key(row: Mapping[str, Any], keys: Iterable[str]) -> str | None:
    for k in keys:
        if k in row and row[k] is not None:
            return k
    return None


def _prompt_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list):  # chat messages
        return "\n".join(str(m.get("content", "")) if isinstance(m, Mapping) else str(m) for m in value)
    return json.dumps(value, sort_keys=True, default=str)


def _uid_group(uid: Any) -> str | None:
    """Prompt uid of a verl dump key ``<uid>_<session>_<index>`` (or the uid itself)."""
    if not isinstance(uid, str) or not uid:
        return None
    parts = uid.rsplit("_", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return parts[0]
    return uid


def _ground_truth(row: Mapping[str, Any]) -> Any:
    k = _first_key(row, GROUND_TRUTH_KEYS)
    if k is not None:
        return row[k]
    rm = row.get("reward_model")
    if isinstance(rm, Mapping):
        return rm.get("ground_truth")
    return None


def _dumped_correct(row: Mapping[str, Any]) -> bool | None:
    if row.get("acc") is not None:
        return bool(row["acc"])
    for k in ("score", "reward"):
        if row.get(k) is not None:
            try:
                return float(row[k]) > 0.5
            except (TypeError, ValueError):
                return None
    return None


def rows_to_samples(rows: Sequence[Mapping[str, Any]], where: str = "") -> list[Sample]:
    """Turn generation rows into samples, expanding list-valued response columns.

    Raises:
        EvalError: If a row lacks a response or ground-truth column, or every prompt/uid column.
    """
    samples: list[Sample] = []
    for i, row in enumerate(rows):
        rk = _first_key(row, RESPONSE_KEYS)
        if rk is None:
            raise EvalError(
                f"{where}row {i}: no response column (looked for {list(RESPONSE_KEYS)}); keys {sorted(row)}"
            )
        gt = _ground_truth(row)
        if gt is None:
            raise EvalError(
                f"{where}row {i}: no ground truth (looked for {list(GROUND_TRUTH_KEYS)} and "
                f"reward_model.ground_truth); keys {sorted(row)}"
            )
        pk = _first_key(row, PROMPT_KEYS)
        prompt_text = _prompt_text(row[pk]) if pk is not None else ""
        group = _uid_group(row.get("uid")) or (prompt_text if pk is not None else None)
        if group is None:
            raise EvalError(f"{where}row {i}: no uid or prompt column (looked for uid, {list(PROMPT_KEYS)})")
        sk = _first_key(row, SOURCE_KEYS)
        source = str(row[sk]) if sk is not None else ""
        responses = row[rk]
        if hasattr(responses, "tolist"):
            responses = responses.tolist()
        if not isinstance(responses, list):
            responses = [responses]
        dumped = _dumped_correct(row) if len(responses) == 1 else None
        for r in responses:
            samples.append(Sample(source, group, r, gt, prompt_text, dumped))
    return samples


def load_samples(paths: Sequence[str | Path], step: str = "latest") -> list[Sample]:
    """Read generation files (see :func:`find_generation_files`) into samples."""
    samples: list[Sample] = []
    for f in find_generation_files(paths, step):
        rows = _read_table(f)
        if not rows:
            raise EvalError(f"{f}: no rows")
        samples.extend(rows_to_samples(rows, where=f"{f}: "))
        print(f"[verl_ext.evaluate] read {len(rows)} rows from {f}")
    return samples


def assign_data_sources(samples: Sequence[Sample], data_files: Sequence[str | Path] = ()) -> None:
    """Fill missing data sources from verl validation parquet files, matching problem text in the prompt.

    Samples that match nothing get ``unknown``.
    """
    from verl_ext.data import problem_of, read_rows

    problems: list[tuple[str, str]] = []
    for f in data_files:
        for row in read_rows(f):
            try:
                problems.append((problem_of(row).strip(), str(row.get("data_source", Path(f).stem))))
            except ValueError:
                continue
    problems.sort(key=lambda p: -len(p[0]))
    cache: dict[str, str] = {}
    for s in samples:
        if s.data_source:
            continue
        text = s.prompt_text
        if text not in cache:
            cache[text] = next((src for prob, src in problems if prob and prob in text), "unknown")
        s.data_source = cache[text]


# ---------------------------------------------------------------------------------------------------------
# Grading and metrics
# ---------------------------------------------------------------------------------------------------------


def grade(
    samples: Sequence[Sample],
    use_dumped_score: bool = False,
    workers: int | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
) -> None:
    """Set ``correct`` (and ``reason``) on every sample, re-grading with the reward unless told not to.

    Raises:
        EvalError: With ``use_dumped_score`` when a sample has no dumped score.
    """
    if use_dumped_score:
        for s in samples:
            if s.dumped_correct is None:
                raise EvalError("--use-dumped-score: a sample has no acc/score/reward field")
            s.correct = s.dumped_correct
        return
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from verl_ext import reward

    workers = workers or min(8, os.cpu_count() or 1)
    reward.configure(max_workers=workers)
    kwargs = {} if timeout_s is None else {"timeout_s": timeout_s}

    def run(s: Sample) -> None:
        out = reward.compute_score(s.data_source, s.response, s.ground_truth, **kwargs)
        s.correct = bool(out["acc"])
        s.reason = str(out["reason"])

    with (
        ThreadPoolExecutor(max_workers=workers) as ex,
        tqdm(total=len(samples), desc="grading", disable=not progress) as bar,
    ):
        for _ in ex.map(run, samples):
            bar.update(1)


@dataclass
class SourceResult:
    """Metrics of one data source (fractions in [0, 1])."""

    data_source: str
    num_problems: int
    num_samples: int
    n_min: int
    n_max: int
    avg: float
    pass_at: dict[int, float] = field(default_factory=dict)
    no_answer: float | None = None


def summarize(samples: Sequence[Sample]) -> list[SourceResult]:
    """Per data source: Avg@K and pass@k from the graded samples (sources sorted by name)."""
    by_source: dict[str, OrderedDict[str, list[bool]]] = defaultdict(OrderedDict)
    reasons: dict[str, list[str | None]] = defaultdict(list)
    for s in samples:
        if s.correct is None:
            raise EvalError("summarize() needs graded samples; call grade() first")
        by_source[s.data_source].setdefault(s.group, []).append(bool(s.correct))
        reasons[s.data_source].append(s.reason)
    results = []
    for source in sorted(by_source):
        groups = list(by_source[source].values())
        ns = [len(g) for g in groups]
        n_min = min(ns)
        res = SourceResult(
            data_source=source,
            num_problems=len(groups),
            num_samples=sum(ns),
            n_min=n_min,
            n_max=max(ns),
            avg=sum(sum(g) / len(g) for g in groups) / len(groups),
        )
        for k in k_values(n_min):
            res.pass_at[k] = sum(pass_at_k(len(g), sum(g), k) for g in groups) / len(groups)
        rs = reasons[source]
        if all(r is not None for r in rs):
            res.no_answer = sum(r in NO_ANSWER_REASONS for r in rs) / len(rs)
        results.append(res)
    return results


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.2f}"


def report_table(results: Sequence[SourceResult]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (percentages as strings) shared by the Markdown and CSV outputs.

    The last row, ``average``, is the unweighted mean over data sources (the paper's "avg"); its pass@k
    is given for the k that every source has.
    """
    ks = sorted({k for r in results for k in r.pass_at})
    show_no_answer = any(r.no_answer is not None for r in results)
    header = ["data_source", "problems", "samples", "K", "Avg@K"] + [f"pass@{k}" for k in ks]
    if show_no_answer:
        header.append("no_answer")
    rows = []
    for r in results:
        k_str = str(r.n_min) if r.n_min == r.n_max else f"{r.n_min}-{r.n_max}"
        row = [r.data_source, str(r.num_problems), str(r.num_samples), k_str, _pct(r.avg)]
        row += [_pct(r.pass_at.get(k)) for k in ks]
        if show_no_answer:
            row.append(_pct(r.no_answer))
        rows.append(row)
    if len(results) > 1:
        common = set.intersection(*(set(r.pass_at) for r in results))
        avg_row = [
            "average",
            str(sum(r.num_problems for r in results)),
            str(sum(r.num_samples for r in results)),
            "",
        ]
        avg_row.append(_pct(sum(r.avg for r in results) / len(results)))
        avg_row += [
            _pct(sum(r.pass_at[k] for r in results) / len(results)) if k in common else "" for k in ks
        ]
        if show_no_answer:
            vals = [r.no_answer for r in results if r.no_answer is not None]
            avg_row.append(_pct(sum(vals) / len(vals)) if vals else "")
        rows.append(avg_row)
    return header, rows


def to_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def plot_pass_at_k(results: Sequence[SourceResult], path: str | Path) -> Path:
    """pass@k against k (log2 axis), one line per data source, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ks = sorted(r.pass_at)
        ax.plot(
            ks,
            [100 * r.pass_at[k] for k in ks],
            marker="o",
            label=f"{r.data_source} (Avg@{r.n_min}={100 * r.avg:.1f})",
        )
    ax.set_xscale("log", base=2)
    all_ks = sorted({k for r in results for k in r.pass_at})
    if all_ks:
        ax.set_xticks(all_ks)
        ax.set_xticklabels([str(k) for k in all_ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Unbiased pass@k")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    results: Sequence[SourceResult], out: str | Path, plot: bool = True, title: str = ""
) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` and (with ``plot``) ``pass_at_k.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = report_table(results)
    md = to_markdown(header, rows)
    paths = {"md": out / "results.md", "csv": out / "results.csv"}
    intro = f"# {title}\n\n" if title else ""
    note = (
        "\nValues in percent. Avg@K: mean over problems of the fraction of correct samples (K samples per "
        "problem); pass@k: unbiased estimate 1 - C(n-c,k)/C(n,k); average: unweighted mean over data "
        "sources.\n"
    )
    paths["md"].write_text(intro + md + note, encoding="utf-8")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    if plot:
        paths["png"] = plot_pass_at_k(results, out / "pass_at_k.png")
    return paths


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def evaluate(
    inputs: Sequence[str | Path],
    out: str | Path | None = None,
    step: str = "latest",
    data_files: Sequence[str | Path] = (),
    use_dumped_score: bool = False,
    workers: int | None = None,
    timeout_s: float | None = None,
    plot: bool = True,
    progress: bool = True,
) -> tuple[list[SourceResult], dict[str, Path]]:
    """Read, grade, summarise and write the report (see the module docstring).

    Returns:
        The per-source results and the written files.
    """
    if not inputs:
        raise EvalError("no generations given")
    if step == "all":
        raise EvalError("evaluate one validation step at a time: --step latest or --step N")
    samples = load_samples(inputs, step)
    if any(not s.data_source for s in samples):
        assign_data_sources(samples, data_files)
    grade(samples, use_dumped_score=use_dumped_score, workers=workers, timeout_s=timeout_s, progress=progress)
    results = summarize(samples)
    if out is None:
        first = Path(inputs[0])
        out = (first if first.is_dir() else first.parent) / "report"
    files = find_generation_files(inputs, step)
    title = "Evaluation of " + ", ".join(str(f) for f in files)
    return results, write_report(results, out, plot=plot, title=title)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m verl_ext.evaluate", description=__doc__.split("\n")[0])
    p.add_argument(
        "generations", nargs="+", help="verl validation dump directories/files, or JSONL/parquet tables"
    )
    p.add_argument("--out", default=None, help="report directory (default: <first input>/report)")
    p.add_argument(
        "--step", default="latest", help="which <step>.jsonl of a dump directory: latest (default) or N"
    )
    p.add_argument(
        "--data", nargs="+", default=[], help="validation parquet files to map prompts to data sources"
    )
    p.add_argument(
        "--use-dumped-score", action="store_true", help="trust the dumped acc/score instead of re-grading"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="grader processes and threads (default min(8, CPUs))"
    )
    p.add_argument("--timeout", type=float, default=None, help="seconds per math-verify grading (default 5)")
    p.add_argument("--no-plot", action="store_true", help="skip pass_at_k.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m verl_ext.evaluate``)."""
    args = _parser().parse_args(argv)
    try:
        _, paths = evaluate(
            args.generations,
            out=args.out,
            step=args.step,
            data_files=args.data,
            use_dumped_score=args.use_dumped_score,
            workers=args.workers,
            timeout_s=args.timeout,
            plot=not args.no_plot,
            progress=not args.no_progress,
        )
    except (EvalError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paths["md"].read_text(encoding="utf-8"))
    print("[verl_ext.evaluate] wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
