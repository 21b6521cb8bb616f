"""Helpers of the end-to-end tests: run a command bounded, read what a run wrote."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from verl_ext.cpu.supervise import processes_of_run, shm_entries, shm_holders

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 900


@dataclass
class Run:
    """One finished run: its exit status, console output and output folder."""

    rc: int
    output: str
    out_dir: Path
    extra: dict = field(default_factory=dict)

    def log_files(self) -> list[Path]:
        """The run's log segments in resume order (``<exp>.jsonl``, ``<exp>.1.jsonl``, ...)."""
        from verl_ext.plot_run import _segment

        return sorted(self.out_dir.glob("logs/*/*.jsonl"), key=_segment)

    def records(self) -> list[dict]:
        """Every JSONL line of every log segment, in file order, with the segment index."""
        out = []
        for seg, path in enumerate(self.log_files()):
            for line in path.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    rec["segment"] = seg
                    out.append(rec)
        return out

    def steps(self) -> dict[int, dict]:
        """Merged metrics per step (later segments and lines win)."""
        merged: dict[int, dict] = {}
        for rec in self.records():
            merged.setdefault(rec["step"], {}).update(rec["data"])
        return merged


def cpu_env(**extra: str) -> dict[str, str]:
    """This interpreter's environment for a CPU run (its venv first on PATH)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    leaked = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    for key in (
        "VERL_ENGINE_DEVICE",
        "VERL_ENGINE_VENDOR",
        "VERL_PLATFORM",
        "VERL_FILE_LOGGER_PATH",
        *leaked,
    ):
        env.pop(key, None)  # the run scripts set what they need; other tests' settings must not leak in
    env.update(extra)
    return env


def run_cmd(cmd: list[str], env: dict[str, str], out_dir: Path, timeout: float = RUN_TIMEOUT_S) -> Run:
    """Run ``cmd`` to completion (bounded), keeping its output in ``out_dir/console.log``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout
    )
    (out_dir / f"console.{len(list(out_dir.glob('console.*.log')))}.log").write_text(proc.stdout)
    return Run(proc.returncode, proc.stdout, out_dir)


def read_steps(log) -> dict[int, dict]:
    """Merged metrics per step of one JSONL log file."""
    steps: dict[int, dict] = {}
    for line in Path(log).read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            steps.setdefault(rec["step"], {}).update(rec["data"])
    return steps


def shm_left(before: set[str], output: str) -> list[str]:
    """``/dev/shm`` entries new since ``before`` and still there, except those only other processes hold.

    ``output`` is the console output of the supervised run(s), which names their run ids. Under
    ``pytest -n 2`` the unit tests' worker may hold entries of its own meanwhile (multiprocessing
    semaphores, a weight-sync buffer); an entry the run leaked is held by nobody, or by a leftover
    process of the run (which the tests reject on their own too).
    """
    run_ids = re.findall(r"supervise: run id (\w+)", output)
    assert run_ids, "no supervised run in this output"
    ours = {p.pid for run_id in run_ids for p in processes_of_run(run_id)}
    holders = shm_holders()
    return [
        name
        for name in sorted(shm_entries() - before)
        if name not in holders or holders[name] & ours  # held only by others: another test's, in use
    ]
