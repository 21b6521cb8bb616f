"""Installing this package into an environment that already has verl 0.9.1 changes no installed package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _would_install(tmp_path: Path, *flags: str) -> dict[str, str]:
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index", "--no-build-isolation",
         "--report", str(report), *flags, str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    items = json.loads(report.read_text())["install"]
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}


@pytest.mark.parametrize("flags", [(), ("--no-deps",)], ids=["plain", "no-deps"])
def test_install_touches_nothing_but_itself(tmp_path, flags):
    """``--no-index``: every requirement must already be satisfied by what is installed (verl 0.9.1's
    environment); the report must list this package alone, nothing upgraded or downgraded."""
    assert _would_install(tmp_path, *flags) == {"verl-bupo": "0.1.0"}
