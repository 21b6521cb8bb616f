"""``benchmarks/internal_forward.py --sweep-chunks``: one timed record per chunk size and mode, then the fastest."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "internal_forward.py"


def test_sweep_reports_every_size_and_the_fastest(capsys):
    spec = importlib.util.spec_from_file_location("internal_forward_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--shape", "tiny", "--layer", "1", "--tokens", "64", "--device", "cpu", "--repeats", "2"]
    records = bench.main([*argv, "--warmup", "0", "--sweep-chunks", "8", "32", "1024"])
    *rows, summary = records
    assert [(r["mode"], r["chunk_size"]) for r in rows] == [
        (m, c) for m in ("forward", "update") for c in (8, 32, 1024)
    ]
    for r in rows:
        assert len(r["times_ms"]) == 2 and r["min_ms"] <= r["median_ms"]
        assert r["chunk_logits_mib"] == round(r["chunk_size"] * 320 * 4 / 2**20, 1)  # tiny vocab: 320
    for mode in ("forward", "update"):
        by_mode = {r["chunk_size"]: r["median_ms"] for r in rows if r["mode"] == mode}
        # The script picks on unrounded medians; the printed ones are rounded to 0.1 ms and can tie.
        assert by_mode[summary["fastest"][mode]] == min(by_mode.values())
        winner = next(r for r in rows if r["mode"] == mode and r["chunk_size"] == summary["fastest"][mode])
        assert winner["time_vs_fastest"] == 1.0
    assert summary["current_default"] == 256
    assert len(capsys.readouterr().out.strip().splitlines()) == 1 + len(records)  # JSON lines, header first
