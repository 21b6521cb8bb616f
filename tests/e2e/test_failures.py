"""A failure inside a vLLM worker ends the run with its error, in bounded time, leaving nothing behind."""

from __future__ import annotations

import re
import time
from pathlib import Path

from _e2e import cpu_env, run_cmd, shm_left

from verl_ext.cpu.supervise import processes_of_run, shm_entries

HERE = Path(__file__).parent
LIMIT_S = 480  # the supervisor's own limit: a hang would end as exit 124, which the test rejects


def test_weight_sync_failure_in_vllm_worker_ends_the_run(e2e_root, toy_dir):
    out = e2e_root / "fault"
    env = cpu_env(
        OUT_DIR=str(out),
        TOY_DIR=str(toy_dir),
        RUN_TIMEOUT=str(LIMIT_S),
        VERL_USE_EXTERNAL_MODULES="_fault_vllm_sync",
        BUPO_WEIGHT_SYNC_TIMEOUT_S="15",  # the trainer side's bound (default 120 s)
        PYTHONPATH=f"{HERE}:{cpu_env().get('PYTHONPATH', '')}",
    )
    shm_before = shm_entries()
    started = time.monotonic()
    run = run_cmd(
        ["bash", "examples/run_tiny_bupo_cpu.sh", "trainer.total_training_steps=2"], env, out, LIMIT_S + 120
    )
    elapsed = time.monotonic() - started
    left_in_shm = shm_left(shm_before, run.output)
    assert run.rc not in (0, 124), f"exit {run.rc} after {elapsed:.0f} s"
    assert "injected fault: weight sync failed inside the vLLM worker" in run.output
    assert "weight sync to vLLM: no answer from the vLLM worker within" in run.output
    m = re.search(r"supervise: run id (\w+), temporary folder (\S+)", run.output)
    assert m and not Path(m.group(2)).exists()
    assert processes_of_run(m.group(1)) == [], "leftover processes"
    assert not left_in_shm, f"left in /dev/shm: {sorted(left_in_shm)}"
