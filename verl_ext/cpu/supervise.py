"""Run a training command so that nothing of it outlives it: processes, Ray session, sockets, /dev/shm.

    python -m verl_ext.cpu.supervise [--timeout S] -- python -m recipe.bupo.main_bupo ...

The command runs in a new session with a private, short temporary folder (``TMPDIR`` and
``RAY_TMPDIR``: Ray's session, vLLM's ZMQ sockets, ``pymp-*``, gloo files) and a run id in its
environment, which every process it starts inherits (Ray's daemons and workers, vLLM's engine
processes). When it ends (exit, failure, timeout, Ctrl-C or SIGTERM to this process), every process
carrying that run id is terminated (SIGTERM, then SIGKILL), the folder is deleted, and the
``/dev/shm`` entries created meanwhile that no live process still holds are removed (vLLM's
``psm_*`` broadcast buffers, ``sem.mp-*``, verl's ``verl_weights_*`` after a failed sync). The exit
status is the command's (124 on timeout, 130 on interrupt). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import psutil

RUN_ID_ENV = "BUPO_RUN_ID"
SHM = Path("/dev/shm")


def processes_of_run(run_id: str) -> list[psutil.Process]:
    """Live processes whose environment carries ``BUPO_RUN_ID=run_id`` (this process excluded)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(RUN_ID_ENV) == run_id:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def terminate(procs: Iterable[psutil.Process], grace_s: float = 10.0) -> int:
    """SIGTERM, wait up to ``grace_s``, then SIGKILL what is left. Returns how many were signalled."""
    procs = list(procs)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(procs)


def shm_entries() -> set[str]:
    """Names in ``/dev/shm`` now (empty where there is none)."""
    try:
        return set(os.listdir(SHM))
    except OSError:
        return set()


def shm_holders() -> dict[str, set[int]]:
    """``/dev/shm`` entry name -> PIDs of the live processes that map it or hold it open.

    An entry unlinked while held counts under its name (``/proc`` shows it with `` (deleted)``
    appended), so a file created again under that name counts as held too.
    """
    held: dict[str, set[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                paths = {line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line}
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            with contextlib.suppress(OSError):  # closed meanwhile (listdir's own, for one)
                paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        for path in paths:
            if path.startswith(f"{SHM}/"):
                name = path[len(f"{SHM}/") :].removesuffix(" (deleted)")
                held.setdefault(name, set()).add(int(pid))
    return held


def remove_new_shm(before: set[str]) -> list[str]:
    """Delete ``/dev/shm`` entries absent from ``before`` and held by no live process; return their names."""
    held = shm_holders()
    removed = []
    for name in sorted(shm_entries() - before):
        if name in held:
            continue
        try:
            (SHM / name).unlink()
            removed.append(name)
        except OSError:
            pass
    return removed


def supervise(cmd: list[str], timeout_s: float | None = None, grace_s: float = 10.0) -> int:
    """Run ``cmd`` as described in the module docstring and return its exit status."""
    run_id = uuid.uuid4().hex[:12]
    tmp = tempfile.mkdtemp(prefix=f"bupo-{run_id[:6]}-", dir="/tmp")  # short: AF_UNIX paths <= 107
    env = dict(os.environ, **{RUN_ID_ENV: run_id, "TMPDIR": tmp, "RAY_TMPDIR": tmp})
    shm_before = shm_entries()
    print(f"supervise: run id {run_id}, temporary folder {tmp}", flush=True)
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    stop = {"signal": None}

    def _forward(signum, _frame):
        stop["signal"] = signum
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    old = {s: signal.signal(s, _forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            rc = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"supervise: {cmd[0]} ran past {timeout_s:.0f} s; stopping it", file=sys.stderr, flush=True)
            rc = 124
        if stop["signal"] is not None:
            rc = 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        leftover = processes_of_run(run_id)
        if leftover:
            names = sorted({p.name() for p in leftover if p.is_running()})
            print(f"supervise: stopping {len(leftover)} leftover process(es): {', '.join(names)}", flush=True)
            terminate(leftover, grace_s)
        shutil.rmtree(tmp, ignore_errors=True)
        removed = remove_new_shm(shm_before)
        if removed:
            print(
                f"supervise: removed {len(removed)} /dev/shm entr(ies) left by the run: {removed}", flush=True
            )
    return rc


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=None, help="wall-clock limit in seconds (exit 124)")
    ap.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    ap.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command and arguments")
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given (put it after --)")
    started = time.monotonic()
    rc = supervise(cmd, args.timeout, args.grace)
    print(f"supervise: exit status {rc} after {time.monotonic() - started:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
