"""The README's commands and CI's script stay in sync (CI must run exactly what the README promises)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_block(title: str) -> str:
    text = (REPO / "README.md").read_text()
    after = text.split(f"**{title}**", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", after, re.S).group(1).strip()


def test_ci_runs_the_readme_install_and_test_command():
    test_cmd = _readme_block("Test")
    install, activate, run_tests = (part.strip() for part in test_cmd.split("&&", 2))
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install in ci and run_tests in ci
    assert activate.replace(". ", ". ", 1) in ci


def test_cpu_main_job_uses_the_same_install():
    job = _readme_block("Train on a machine without a GPU")
    assert job.startswith("bash scripts/install_cpu.sh && . .venv/bin/activate && ")
    assert job.endswith("bash examples/run_tiny_bupo_cpu.sh")
    assert (REPO / "examples" / "run_tiny_bupo_cpu.sh").is_file()
