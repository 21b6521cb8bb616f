"""math-verify in bounded time: a pebble pool of spawned grader processes, or bounded threads where none start.

:func:`run` calls ``fn(*args)`` and returns within ``wait_s + timeout_s`` (plus :data:`GRACE_S`) from any
thread, whatever ``fn`` does:

- **Processes** (the normal path): a ``pebble.ProcessPool`` of ``BUPO_REWARD_WORKERS`` spawned grader
  processes (default ``min(4, cpu_count)``) that import math-verify at start-up. A call waits at most
  ``wait_s`` for a free grader and ``timeout_s`` for the answer; a grader that overruns is killed and
  replaced (pebble), so nothing keeps running after its call returned. A grader killed from outside
  under a call is retried once within the call's bound; a pool that pebble gave up on is replaced.
- **Threads**: with ``BUPO_REWARD_WORKERS=0``, and for :data:`PROCESS_RETRY_S` seconds after grader
  processes failed to start (e.g. inside a daemonic process, without fork/spawn resources, or in a
  script that grades without an ``if __name__ == "__main__":`` guard: each spawned child re-runs the
  script, and then refuses to become a grader), in which case the failure is logged once. A thread
  cannot be killed, so the thread path first asks the caller's ``refuse`` check (the reward refuses
  answers sympy cannot bound, see :mod:`verl_ext.answer_bounds`) and runs at most :data:`THREADS`
  computations at once; when every slot is held by a computation past its deadline, calls return
  ``timeout`` at once instead of adding another thread.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from pebble import ProcessExpired, ProcessPool

logger = logging.getLogger(__name__)

WORKER_STARTUP_TIMEOUT_S = 20.0
"""How long a new pool may take until a grader process takes its first answer (about 1 s when idle)."""
PROCESS_RETRY_S = 600.0
"""After grader processes failed to start, how long calls grade in threads before processes are tried again."""
THREADS = 2
"""Most computations alive at once on the thread path (running or past their deadline)."""
GRACE_S = 0.5
"""Slack over ``timeout_s`` for pebble to report a finished answer before the call gives up on it."""
_POLL_S = 0.05
_REENTERED_MAIN = False  # set in a spawned child whose re-run of the parent's main script graded answers

Outcome = tuple[str, Any]
"""``("ok", value)``, ``("timeout", None)``, ``("error", message)`` or ``("refused", reason)``."""


def quiet_math_verify() -> None:
    """Silence math-verify's per-call warnings (its own timeouts are off on purpose)."""
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _init_grader() -> None:
    """Grader process start-up: math-verify imported before the first answer's clock starts.

    SIGTERM gets its default action back: pebble stops an overrunning grader with SIGTERM and waits 3 s
    before SIGKILL, holding up its pool manager; a grader inside one long C-level sympy computation
    (a huge integer power) would never run pebble's Python-level handler.
    """
    if _REENTERED_MAIN:
        raise RuntimeError(
            "this grader process re-ran the main script, which grades at import time; put the grading under "
            "`if __name__ == '__main__':` (spawned processes re-run the unguarded part of the script)"
        )
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    quiet_math_verify()
    import math_verify  # noqa: F401


def default_workers() -> int:
    """``BUPO_REWARD_WORKERS`` when set, else ``min(4, cpu_count)``."""
    env = os.environ.get("BUPO_REWARD_WORKERS")
    if env is not None and env.strip() != "":
        return int(env)
    return min(4, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Pool:
    """The current pebble pool and what is known about it."""

    pool: ProcessPool
    pid: int  # the process that started it
    created: float  # time.monotonic()
    proven: bool = False  # a grader process has taken an answer


_LOCK = threading.Lock()
_POOL: _Pool | None = None
_WORKERS: int | None = None  # set by configure(); None = default_workers()
_NO_PROCESSES_UNTIL = 0.0  # time.monotonic() before which no grader process is started
_STOPPERS: list[threading.Thread] = []
_WARNED = False


def _stop(pool: ProcessPool) -> None:
    try:
        pool.stop()
        pool.join()
    except Exception as e:  # pragma: no cover - pebble's own teardown failing must not reach a caller
        logger.debug("reward: stopping a grader pool failed: %r", e)


def _mark_proven(entry: _Pool, future) -> None:
    if not future.cancelled() and not isinstance(future.exception(), (BrokenProcessPool, ProcessExpired)):
        entry.proven = True


def _pool() -> _Pool | None:
    """The pool to grade in (started on first use), or None: grade in a thread."""
    global _POOL
    with _LOCK:
        workers = default_workers() if _WORKERS is None else _WORKERS
        if workers <= 0 or time.monotonic() < _NO_PROCESSES_UNTIL:
            return None
        if _POOL is not None and _POOL.pid == os.getpid():
            return _POOL
        ctx = multiprocessing.get_context("spawn")
        entry = _Pool(
            ProcessPool(workers, initializer=_init_grader, context=ctx), os.getpid(), time.monotonic()
        )
        _POOL = entry
        try:  # starts the processes now, under the lock: one attempt, however many threads call
            entry.pool.schedule(_init_grader).add_done_callback(lambda f: _mark_proven(entry, f))
        except Exception as e:  # e.g. AssertionError in a daemonic process, RuntimeError while bootstrapping
            _retire_locked(entry, e)
            return None
        return entry


def _retire_locked(entry: _Pool, start_error: BaseException | None) -> None:
    """Drop ``entry`` (its processes stop in the background); with ``start_error``, stop trying for a while."""
    global _POOL, _NO_PROCESSES_UNTIL, _WARNED
    if _POOL is not entry:
        return  # another call already retired it
    _POOL = None
    if start_error is not None:
        _NO_PROCESSES_UNTIL = time.monotonic() + PROCESS_RETRY_S
        log, _WARNED = (logger.info if _WARNED else logger.warning), True  # a warning once per process
        log(
            "reward: grader processes could not start here (%s); math-verify runs in threads of this process "
            "for the next %.0f s (each call still bounded; answers sympy cannot bound are refused). In a script, "
            "grade under `if __name__ == '__main__':`, which spawned processes do not re-run",
            f"{type(start_error).__name__}: {start_error}"[:300],
            PROCESS_RETRY_S,
        )
    if entry.pid == os.getpid():
        stopper = threading.Thread(target=_stop, args=(entry.pool,), daemon=True, name="bupo-reward-stop")
        stopper.start()
        _STOPPERS.append(stopper)


def _retire(entry: _Pool, start_error: BaseException | None) -> None:
    with _LOCK:
        _retire_locked(entry, start_error)


def _await(future, entry: _Pool, queue_end: float, end: float, timeout_s: float) -> tuple[str, Any]:
    """Wait for a scheduled call within its bounds.

    Returns:
        ``(state, payload)``: ``("ok", value)``, ``("timeout", None)``, ``("error", message)``,
        ``("died", error)`` (the grader died under the call), ``("broken", error)`` (pebble gave up on the
        pool) or ``("no_start", error)`` (no grader took an answer within the start-up window).
    """
    while not (future.running() or future.done()):
        now = time.monotonic()
        startup_end = entry.created + WORKER_STARTUP_TIMEOUT_S
        limit = queue_end if entry.proven else min(queue_end, startup_end)
        if not entry.pool.active:  # every grader died while idle: pebble stopped the pool
            future.cancel()
            return "broken", RuntimeError("the grader pool stopped (its processes died)")
        if now >= limit:
            if future.running() or future.done():
                break
            future.cancel()
            if not entry.proven and now >= startup_end:
                return "no_start", TimeoutError(
                    f"no grader took an answer within {WORKER_STARTUP_TIMEOUT_S} s"
                )
            return "timeout", None
        wait([future], timeout=min(_POLL_S, limit - now))
    if not future.done():
        entry.proven = True
        run_end = min(time.monotonic() + timeout_s, end) + GRACE_S
        wait([future], timeout=max(0.0, run_end - time.monotonic()))
        if not future.done():
            future.cancel()  # pebble stops the grader process
            return "timeout", None
    try:
        value = future.result(timeout=0)
    except (TimeoutError, CancelledError):  # pebble's own per-call timeout
        return "timeout", None
    except ProcessExpired as e:  # killed from outside, out of memory, ...
        return "died", e
    except BrokenProcessPool as e:
        return "broken", e
    except Exception as e:  # fn raised in the grader
        return "error", f"{type(e).__name__}: {e}"[:200]
    entry.proven = True
    return "ok", value


def _run_in_processes(fn: Callable, args: tuple, timeout_s: float, wait_s: float) -> Outcome | None:
    """Grade in a grader process; None when there is none to grade in (the caller uses a thread)."""
    start = time.monotonic()
    end = start + wait_s + timeout_s
    queue_end = start + wait_s
    retried = False
    while True:
        entry = _pool()
        if entry is None:
            return None
        try:
            future = entry.pool.schedule(fn, args, timeout=timeout_s)
        except Exception as e:  # pebble gave up on this pool
            state, payload = "broken", e
        else:
            state, payload = _await(future, entry, queue_end, end, timeout_s)
        if state in ("ok", "timeout", "error"):
            return state, payload
        if state in ("broken", "no_start"):
            if not entry.proven:  # the processes never worked here: threads for a while
                _retire(entry, payload)
                return None
            _retire(entry, None)  # it worked before: the next attempt starts a new pool
        if retried or time.monotonic() >= end:
            return "error", f"grader process died: {payload!r}"[:200]
        retried, queue_end = True, end  # once more, within the call's bound


# ---------------------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------------------

_THREADS_CV = threading.Condition()
_THREAD_DEADLINES: dict[int, float] = {}  # slot token -> deadline of the computation holding it
_TOKENS = itertools.count()


def _run_in_thread(
    fn: Callable, args: tuple, timeout_s: float, wait_s: float, refuse: Callable[[], str | None] | None
) -> Outcome:
    """Run in a daemon thread (at most :data:`THREADS` at once) and wait at most ``timeout_s`` for it."""
    reason = refuse() if refuse is not None else None
    if reason is not None:
        return "refused", reason
    token = next(_TOKENS)
    give_up = time.monotonic() + min(wait_s, timeout_s)
    with _THREADS_CV:
        while len(_THREAD_DEADLINES) >= THREADS:
            now = time.monotonic()
            if now >= give_up or all(d <= now for d in _THREAD_DEADLINES.values()):
                return "timeout", None  # every slot is busy past its deadline: add no thread
            nearest = min(d for d in _THREAD_DEADLINES.values() if d > now)
            _THREADS_CV.wait(min(give_up, nearest) - now)
        _THREAD_DEADLINES[token] = time.monotonic() + timeout_s
    result: list[Outcome] = []

    def body() -> None:
        try:
            quiet_math_verify()
            result.append(("ok", fn(*args)))
        except Exception as e:
            result.append(("error", f"{type(e).__name__}: {e}"[:200]))
        finally:
            with _THREADS_CV:
                _THREAD_DEADLINES.pop(token, None)
                _THREADS_CV.notify_all()

    thread = threading.Thread(target=body, daemon=True, name="bupo-reward-thread")
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else ("timeout", None)


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def run(
    fn: Callable,
    args: tuple,
    timeout_s: float,
    wait_s: float,
    refuse: Callable[[], str | None] | None = None,
) -> Outcome:
    """``fn(*args)`` in a grader process (or a bounded thread), within ``wait_s + timeout_s`` + :data:`GRACE_S`.

    Args:
        fn: A module-level function (pickled by reference into the grader process).
        args: Its arguments (picklable).
        timeout_s: Limit for the computation itself.
        wait_s: Limit for waiting for a free grader (and for new grader processes to start).
        refuse: Thread path only: returns a reason not to run ``fn`` in a thread (it could not be
            stopped), or None.

    Returns:
        ``("ok", value)``, ``("timeout", None)``, ``("error", message)`` or ``("refused", reason)``.
    """
    global _REENTERED_MAIN
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        _REENTERED_MAIN = True  # see _init_grader: this child will refuse to become a grader
    start = time.monotonic()
    out = _run_in_processes(fn, args, timeout_s, wait_s)
    if out is None:
        spent = time.monotonic() - start
        out = _run_in_thread(fn, args, timeout_s, max(0.0, wait_s - spent), refuse)
    return out


def mode() -> str:
    """Where the next call runs: ``"processes"`` or ``"threads"``."""
    workers = default_workers() if _WORKERS is None else _WORKERS
    return "threads" if workers <= 0 or time.monotonic() < _NO_PROCESSES_UNTIL else "processes"


def configure(max_workers: int | None = None) -> None:
    """Set the number of grader processes (0 = threads), stop the current ones and forget past start failures.

    Args:
        max_workers: Pool size; None reads ``BUPO_REWARD_WORKERS`` again (default ``min(4, cpu_count)``).
    """
    global _WORKERS, _NO_PROCESSES_UNTIL
    shutdown()
    with _LOCK:
        _WORKERS = max_workers
        _NO_PROCESSES_UNTIL = 0.0


def shutdown(timeout_s: float = 30.0) -> None:
    """Stop every grader process of this process (running calls return ``timeout`` or ``error``).

    Args:
        timeout_s: How long to wait for pools that are being stopped in the background.
    """
    global _POOL
    with _LOCK:
        entry, _POOL = _POOL, None
        stoppers = list(_STOPPERS)
        _STOPPERS.clear()
    if entry is not None and entry.pid == os.getpid():
        _stop(entry.pool)
    deadline = time.monotonic() + timeout_s
    for stopper in stoppers:
        stopper.join(max(0.0, deadline - time.monotonic()))


def _after_fork_in_child() -> None:
    """A forked child inherits neither the parent's grader processes nor its threads."""
    global _POOL, _LOCK, _THREADS_CV
    _POOL = None
    _LOCK = threading.Lock()
    _THREADS_CV = threading.Condition()
    _THREAD_DEADLINES.clear()
    _STOPPERS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown)
