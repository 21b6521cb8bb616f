"""Run a Python snippet in a fresh interpreter (a fresh ``import verl``) and return its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap


def run_py(code: str, env: dict[str, str] | None = None, drop: tuple[str, ...] = (), timeout: float = 300):
    """Run ``code`` in a new interpreter; it must print one JSON line last. Returns that value.

    Args:
        code: the snippet (dedented); its last stdout line must be JSON.
        env: variables to add to this process's environment.
        drop: variables to remove (e.g. ``VERL_PLATFORM`` for a GPU-like process).
        timeout: seconds.

    Raises:
        AssertionError: the snippet failed (its stderr is in the message).
    """
    full = {k: v for k, v in os.environ.items() if k not in drop}
    full.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"snippet failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
