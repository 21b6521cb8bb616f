"""BuPO's log lines reach stderr in a fresh process where verl configured logging its own way."""

from __future__ import annotations

import subprocess
import sys


def test_info_reaches_stderr_after_import_verl():
    code = (
        "import logging, verl\n"
        "from verl_ext.log import get_logger\n"
        "get_logger('verl_ext.bupo.worker').info('BuPO: slicing self-test passed')\n"
        "logging.getLogger('verl_ext.bupo.trainer').info('a module logger of ours, fetched plainly')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "INFO [verl_ext.bupo.worker] BuPO: slicing self-test passed" in proc.stderr
    assert "a module logger of ours, fetched plainly" in proc.stderr
    assert proc.stderr.count("BuPO: slicing self-test passed") == 1  # one handler, no duplicate via root


def test_level_from_environment():
    code = "from verl_ext.log import get_logger\nget_logger('x').info('hidden')\nget_logger('x').warning('shown')\n"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"BUPO_LOG_LEVEL": "WARNING"},
    )
    assert "shown" in proc.stderr and "hidden" not in proc.stderr
    assert "[verl_ext.x]" in proc.stderr
