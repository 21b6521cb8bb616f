"""The ``verl.plugins`` entry point: ``import verl`` registers BuPO; nothing else of verl changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REGISTERED = """
import json, sys
import verl
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
from verl.trainer.ppo.v1 import get_trainer_cls
try:
    trainer = get_trainer_cls("bupo_sync").__name__
except ValueError as e:
    trainer = str(e)
print(json.dumps({"loss": "bupo" in POLICY_LOSS_REGISTRY, "trainer": trainer,
                  "plugin": "verl_ext.plugin" in sys.modules}))
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_PLUGINS")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True, timeout=300
    )


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_verl_registers_loss_and_trainer():
    """A fresh interpreter, nothing of ours imported by hand: ``import verl`` is enough."""
    out = _json(_run(REGISTERED))
    assert out == {"loss": True, "trainer": "BuPOTrainerSync", "plugin": True}


def test_plugin_is_cheap():
    """``import verl`` imports the entry module and the CPU package's __init__ only: no model, no vLLM,
    no BuPO trainer until verl's trainer package itself is imported."""
    out = _json(
        _run(
            """
            import json, sys, verl
            print(json.dumps({m: m in sys.modules for m in
                  ("verl_ext.plugin", "verl_ext.bupo.trainer", "verl_ext.bupo.loss", "vllm", "transformers")}))
            """
        )
    )
    assert out["verl_ext.plugin"] and not out["verl_ext.bupo.trainer"] and not out["vllm"]


def test_without_the_plugin_verl_does_not_know_bupo():
    out = _json(_run(REGISTERED, VERL_USE_EXTERNAL_PLUGINS="none"))
    assert out["plugin"] is False and out["loss"] is False
    assert "Unknown trainer 'bupo_sync'" in out["trainer"]


def test_plugin_failure_is_logged_loudly():
    """verl logs plugin import errors at DEBUG; ours says so at ERROR, with the traceback."""
    proc = _run(
        """
        import verl_ext.cpu
        def broken():
            raise RuntimeError("simulated plugin failure")
        verl_ext.cpu.activate = broken
        import verl
        """
    )
    assert proc.returncode == 0
    assert "verl plugin failed to load" in proc.stderr and "simulated plugin failure" in proc.stderr
    assert "ERROR" in proc.stderr


VERL_CPU_TESTS = (
    "tests/trainer/ppo/test_core_algos_on_cpu.py",
    "tests/trainer/ppo/test_dynamic_policy_losses_on_cpu.py",
    "tests/trainer/ppo/test_loss_aggregation_on_cpu.py",
    "tests/test_protocol_on_cpu.py",
    "tests/test_base_config_on_cpu.py",
)


def _verl_tests_outcomes(tmp: Path, tag: str, **env: str) -> dict[str, str]:
    site = Path(sysconfig.get_paths()["purelib"])
    files = [str(site / f) for f in VERL_CPU_TESTS if (site / f).is_file()]
    if len(files) < 3:
        pytest.skip("verl's wheel does not ship its CPU tests here")
    xml = tmp / f"{tag}.xml"
    full = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_PLUGINS")}
    full.update(env, TORCH_COMPILE_DISABLE="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            "--rootdir",
            str(site),
            *files,
        ],
        cwd=tmp,
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
    )
    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kids = {c.tag for c in case}
        state = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = state
    return outcomes


@pytest.mark.slow
def test_verl_own_cpu_tests_unchanged_by_the_plugin(tmp_path):
    """verl 0.9.1's CPU tests of policy losses, core algorithms, loss aggregation, config and protocol
    give the same results with the plugin loaded as with ``VERL_USE_EXTERNAL_PLUGINS=none``."""
    with_plugin = _verl_tests_outcomes(tmp_path, "with")
    without = _verl_tests_outcomes(tmp_path, "without", VERL_USE_EXTERNAL_PLUGINS="none")
    assert len(with_plugin) > 50
    assert with_plugin == without
    assert sum(v == "passed" for v in with_plugin.values()) > 50
