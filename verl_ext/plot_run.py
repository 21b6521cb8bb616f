"""Plot training runs from verl's JSONL metric files (``trainer.logger=[...,file]``), BuPO phases shaded.

    python -m verl_ext.plot_run outputs/logs/bupo/qwen3_4b_bupo_l5_s30*.jsonl \\
        outputs/logs/bupo/qwen3_4b_grpo*.jsonl --out outputs/plots

Each file holds lines ``{"step": s, "data": {metric: value}}``. Files of one run (the same name up to a
``.N`` resume suffix, see :func:`resume_safe_log_path`) are merged by step, later files winning.
Writes ``metrics.csv`` (one row per run and step) and ``metrics.png`` (one panel per metric, runs
overlaid, steps of BuPO phase 1 shaded per run).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import pandas as pd

DEFAULT_METRICS = (
    r"val-core/.*/acc/mean@\d+",
    r"critic/score/mean",
    r"actor/entropy",
    r"response_length/mean",
    r"bupo/kl_internal_full",
    r"bupo/full_entropy",
)


def resume_safe_log_path(root: str | os.PathLike, project: str, experiment: str) -> Path:
    """The first free ``<root>/<project>/<experiment>[.N].jsonl``.

    verl's file logger opens its file with ``"wb"``: a resumed run would erase the log of the run it
    resumes. Pointing ``VERL_FILE_LOGGER_PATH`` here keeps every segment; :func:`load_runs` merges them.
    """
    folder = Path(root).expanduser() / project
    path, n = folder / f"{experiment}.jsonl", 1
    while path.exists():
        path, n = folder / f"{experiment}.{n}.jsonl", n + 1
    return path


def run_name(path: str | os.PathLike) -> str:
    """The run a log file belongs to: its file name without ``.jsonl`` and a ``.N`` resume suffix."""
    return re.sub(r"\.\d+$", "", Path(path).name.removesuffix(".jsonl"))


def load_runs(paths: list[str | os.PathLike]) -> pd.DataFrame:
    """All metrics of all files as one table: columns ``run``, ``step`` and one per metric.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file holds no metric line.
    """
    frames = []
    for order, path in enumerate(sorted(paths, key=lambda p: (run_name(p), _segment(p)))):
        rows = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    rows.append({"step": rec["step"], **rec.get("data", {})})
        if not rows:
            raise ValueError(f"{path}: no metric lines")
        df = pd.DataFrame(rows)
        df.insert(0, "run", run_name(path))
        df["_order"] = order
        frames.append(df)
    df = pd.concat(frames, ignore_index=True).sort_values(["run", "step", "_order"])
    # the same step logged twice (e.g. validation and training lines, or a resumed segment): merge, last wins
    df = df.groupby(["run", "step"], as_index=False).last()
    return df.drop(columns="_order")


def _segment(path) -> int:
    m = re.search(r"\.(\d+)\.jsonl$", str(path))
    return int(m.group(1)) if m else 0


def select_metrics(columns, patterns=DEFAULT_METRICS) -> list[str]:
    """Metric columns matching any of the regular expressions (whole-name match), in pattern order."""
    out = []
    for pat in patterns:
        rx = re.compile(pat)
        out += sorted(c for c in columns if rx.fullmatch(c) and c not in out)
    return out


def plot_runs(df: pd.DataFrame, metrics: list[str], path: str | os.PathLike) -> str:
    """One panel per metric, runs overlaid; BuPO phase-1 steps (``bupo/phase == 1``) shaded per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics:
        raise ValueError("no metric to plot (check --metrics against the file's keys)")
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        for i, (run, g) in enumerate(df.groupby("run", sort=True)):
            color = colors[i % len(colors)]
            if "bupo/phase" in g:
                phase1 = g.loc[g["bupo/phase"] == 1, "step"]
                if len(phase1):
                    ax.axvspan(phase1.min() - 0.5, phase1.max() + 0.5, color=color, alpha=0.08, lw=0)
            series = g[["step", metric]].dropna() if metric in g else g.iloc[0:0]
            if len(series):
                ax.plot(
                    series["step"],
                    series[metric],
                    marker="." if len(series) < 40 else None,
                    color=color,
                    label=run,
                )
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m verl_ext.plot_run", description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+", help="verl JSONL metric files (trainer.logger=file)")
    parser.add_argument("--out", default="outputs/plots", help="output folder")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="regular expressions")
    args = parser.parse_args(argv)
    for p in args.logs:
        if not Path(p).is_file():
            parser.error(f"no such log file: {p}")
    df = load_runs(args.logs)
    metrics = select_metrics(df.columns, args.metrics)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "metrics.csv", index=False)
    png = plot_runs(df, metrics, out / "metrics.png")
    print(f"{df['run'].nunique()} run(s), {len(metrics)} metric(s): {out / 'metrics.csv'}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
