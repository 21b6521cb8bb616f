"""A short summary of a finished (or resumed) run from verl's JSONL log: phases, reward and validation.

    python -m verl_ext.run_summary outputs/tiny_cpu/bupo/logs/bupo_tiny_cpu/tiny_cpu_bupo_l1_s3*.jsonl

Prints the steps, the policy each step trained (``bupo/phase``, ``bupo/exit_layer``; a run without
them is plain GRPO), the mean training reward (``critic/score/mean``) and the validation metrics
(``val-core/...``) at their first and last logged steps, and writes the same as JSON with ``--json``.
Resumed runs' log segments (``<exp>.N.jsonl``) are merged as :mod:`verl_ext.plot_run` does.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from verl_ext.plot_run import load_runs

REWARD = "critic/score/mean"


def _phase_label(row: pd.Series) -> str:
    phase = row.get("bupo/phase")
    if phase is None or (isinstance(phase, float) and math.isnan(phase)):
        return "full policy (GRPO)"
    layer = int(row.get("bupo/exit_layer", -1))
    return f"pi^{layer + 1} (layer {layer})" if int(phase) == 1 else "full policy"


def _first_last(df: pd.DataFrame, col: str) -> dict[str, Any] | None:
    s = df[["step", col]].dropna() if col in df else df.iloc[0:0]
    if s.empty:
        return None
    first, last = s.iloc[0], s.iloc[-1]
    return {
        "first_step": int(first["step"]),
        "first": float(first[col]),
        "last_step": int(last["step"]),
        "last": float(last[col]),
    }


def summarize(paths: list[str | Path]) -> dict[str, Any]:
    """The summary of one run's log files (see module docstring) as a JSON-ready dict.

    Raises:
        ValueError: the files hold more than one run.
    """
    df = load_runs([str(p) for p in paths])
    if df["run"].nunique() != 1:
        raise ValueError(f"expected the log files of one run, got {sorted(df['run'].unique())}")
    train = df[df[REWARD].notna()] if REWARD in df else df.iloc[0:0]
    phases = {int(r["step"]): _phase_label(r) for _, r in train.iterrows()}
    val_cols = sorted(c for c in df.columns if c.startswith("val-core/"))
    return {
        "run": str(df["run"].iloc[0]),
        "steps": sorted(phases),
        "phase_per_step": phases,
        "reward": _first_last(df, REWARD),
        "validation": {c: _first_last(df, c) for c in val_cols},
        "logs": [str(p) for p in paths],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable lines for :func:`summarize`'s result."""
    lines = [f"run {summary['run']}: {len(summary['steps'])} training step(s)"]
    spans: list[tuple[int, int, str]] = []
    for step, label in sorted(summary["phase_per_step"].items()):
        if spans and spans[-1][2] == label and spans[-1][1] == step - 1:
            spans[-1] = (spans[-1][0], step, label)
        else:
            spans.append((step, step, label))
    for a, b, label in spans:
        lines.append(f"  steps {a}-{b}: {label}" if a != b else f"  step {a}: {label}")
    for name, fl in [("train reward", summary["reward"])] + list(summary["validation"].items()):
        if fl:
            lines.append(
                f"  {name}: {fl['first']:.4f} (step {fl['first_step']}) -> {fl['last']:.4f} (step {fl['last_step']})"
            )
    lines.append("  logs: " + ", ".join(summary["logs"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m verl_ext.run_summary", description=__doc__.splitlines()[0])
    ap.add_argument("logs", nargs="+", help="the run's verl JSONL log file(s)")
    ap.add_argument("--json", help="also write the summary to this JSON file")
    args = ap.parse_args(argv)
    summary = summarize(args.logs)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
