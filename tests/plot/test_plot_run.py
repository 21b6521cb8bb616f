"""Run logs: resume-safe file names, merging segments by step, the plot and CSV."""

from __future__ import annotations

import json

import pytest

from verl_ext.plot_run import load_runs, main, resume_safe_log_path, run_name, select_metrics


def _write(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in records))


def test_resume_safe_path_never_reuses_a_file(tmp_path):
    first = resume_safe_log_path(tmp_path, "bupo", "exp")
    assert first == tmp_path / "bupo" / "exp.jsonl"
    _write(first, [(1, {"a": 1})])
    second = resume_safe_log_path(tmp_path, "bupo", "exp")
    assert second == tmp_path / "bupo" / "exp.1.jsonl"
    _write(second, [(1, {"a": 1})])
    assert resume_safe_log_path(tmp_path, "bupo", "exp").name == "exp.2.jsonl"
    assert run_name(second) == "exp" and run_name(first) == "exp"


def test_segments_merge_by_step_later_wins(tmp_path):
    a = tmp_path / "exp.jsonl"
    b = tmp_path / "exp.1.jsonl"  # resumed from step 2: step 2 logged again
    _write(
        a,
        [
            (0, {"val-core/x/acc/mean@16": 0.1}),
            (1, {"bupo/phase": 1, "actor/entropy": 2.0}),
            (2, {"bupo/phase": 1, "actor/entropy": 1.5}),
        ],
    )
    _write(b, [(2, {"bupo/phase": 1, "actor/entropy": 1.4}), (3, {"bupo/phase": 2, "actor/entropy": 1.0})])
    df = load_runs([b, a])
    assert list(df["step"]) == [0, 1, 2, 3] and set(df["run"]) == {"exp"}
    assert df.set_index("step").loc[2, "actor/entropy"] == 1.4
    assert select_metrics(df.columns) == ["val-core/x/acc/mean@16", "actor/entropy"]


def test_cli_writes_png_and_csv(tmp_path, capsys):
    _write(
        tmp_path / "bupo.jsonl",
        [(s, {"bupo/phase": 1 if s <= 3 else 2, "actor/entropy": 1.0 / s}) for s in range(1, 8)],
    )
    _write(tmp_path / "grpo.jsonl", [(s, {"bupo/phase": 2, "actor/entropy": 0.5 / s}) for s in range(1, 8)])
    out = tmp_path / "plots"
    assert main([str(tmp_path / "bupo.jsonl"), str(tmp_path / "grpo.jsonl"), "--out", str(out)]) == 0
    assert (out / "metrics.png").stat().st_size > 5000
    csv = (out / "metrics.csv").read_text().splitlines()
    assert len(csv) == 1 + 14 and csv[0].startswith("run,step")
    assert "2 run(s), 1 metric(s)" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.jsonl")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no metric lines"):
        main([str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "o")])
