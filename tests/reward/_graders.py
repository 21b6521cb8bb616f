"""The reward tests' view of grader processes: this process's spawned children."""

from __future__ import annotations

import psutil


def grader_processes() -> list[psutil.Process]:
    """This process's spawned children (pebble's grader processes; not multiprocessing's resource tracker)."""
    out = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out
