"""Run an ``examples/`` script with ``--cfg job`` and read the config it composes (nothing starts)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def composed_config(script: str, *args: str, **env: str) -> dict:
    """The config ``bash examples/<script> *args --cfg job`` prints, in an environment without VERL_*.

    Raises:
        AssertionError: the script failed (its stderr is in the message).
    """
    full = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    full.update(env)
    proc = subprocess.run(
        ["bash", f"examples/{script}", *args, "--cfg", "job"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=full,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)
