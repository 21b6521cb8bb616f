"""``verl_ext.cpu.supervise``: a supervised command leaves no process and no unheld /dev/shm entry behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from verl_ext.cpu.supervise import SHM, processes_of_run, shm_holders

pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm here")


@pytest.fixture
def tag():
    tag = f"bupo-test-{uuid.uuid4().hex[:8]}"
    yield tag
    for path in SHM.glob(f"{tag}-*"):
        path.unlink(missing_ok=True)


def _supervise(code: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "verl_ext.cpu.supervise", "--", sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_holders_name_the_processes_that_map_or_open_an_entry(tag):
    path = SHM / f"{tag}-held"
    with open(path, "w"):
        assert os.getpid() in shm_holders()[path.name]
        path.unlink()
        assert os.getpid() in shm_holders()[path.name]  # unlinked, still held
    assert path.name not in shm_holders()


def test_leftover_process_and_its_entries_are_removed(tag):
    """The command writes one entry and exits; a process it started outlives it holding another."""
    proc = _supervise(
        f"""
        import subprocess, sys, time
        from pathlib import Path
        Path("/dev/shm/{tag}-written").write_text("x")
        subprocess.Popen([sys.executable, "-c",
            "import time; f = open('/dev/shm/{tag}-kept-open', 'w'); time.sleep(600)"])
        while not Path("/dev/shm/{tag}-kept-open").exists():
            time.sleep(0.05)
        """
    )
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    run_id = out.split("supervise: run id ", 1)[1].split(",", 1)[0]
    assert "stopping 1 leftover process(es)" in out
    assert "removed 2 /dev/shm entr(ies)" in out and f"{tag}-written" in out and f"{tag}-kept-open" in out
    assert not list(SHM.glob(f"{tag}-*"))
    assert processes_of_run(run_id) == []


def test_an_entry_another_process_holds_is_kept(tag, tmp_path):
    """A new entry that a process outside the run still holds is not the run's to delete."""
    go = tmp_path / "go"
    proc = _supervise(
        f"""
        import time
        from pathlib import Path
        Path("/dev/shm/{tag}-shared").write_text("x")
        while not Path("{go}").exists():
            time.sleep(0.05)
        """
    )
    shared = SHM / f"{tag}-shared"
    deadline = time.monotonic() + 60
    while not shared.exists():
        assert time.monotonic() < deadline and proc.poll() is None, "the command did not start"
        time.sleep(0.05)
    with open(shared) as held:
        go.touch()
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert shared.exists() and held.read() == "x"
    assert "/dev/shm entr" not in out
