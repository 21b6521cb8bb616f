"""End-to-end fixtures: real verl 0.9.1 training runs on CPU (vLLM's CPU build), shared per session.

The runs go through the README's own scripts (``examples/run_tiny_bupo_cpu.sh``) and verl's stock
entry point, each under :mod:`verl_ext.cpu.supervise`, into a session temp folder; the tests read
what the runs wrote (JSONL logs, checkpoints, plots, summaries), never mocks. Skipped only where
vLLM is not installed (the light unit-test environment); ``scripts/install_cpu.sh`` installs it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))

from _e2e import Run, cpu_env, read_steps, run_cmd, shm_left  # noqa: E402

try:
    import importlib.util

    HAVE_VLLM = importlib.util.find_spec("vllm") is not None
except Exception:  # pragma: no cover
    HAVE_VLLM = False


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM's CPU build is not installed (bash scripts/install_cpu.sh)")
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def toy_dir(e2e_root) -> Path:
    from verl_ext.toy_task import build

    return build(e2e_root / "toy")


@pytest.fixture(scope="session")
def shm_before() -> set[str]:
    from verl_ext.cpu.supervise import shm_entries

    return shm_entries()


@pytest.fixture(scope="session")
def bupo_resumed_run(e2e_root, toy_dir, shm_before) -> tuple[Run, Run]:
    """The README's tiny BuPO run, stopped after step 2 (a phase-1 checkpoint), then resumed to step 6.

    The first part validates before training; both parts validate at their last step.
    """
    out = e2e_root / "bupo"
    env = cpu_env(OUT_DIR=str(out), TOY_DIR=str(toy_dir))
    script = ["bash", "examples/run_tiny_bupo_cpu.sh"]
    first = run_cmd(script + ["trainer.total_training_steps=2"], env, out)
    assert first.rc == 0, first.output[-6000:]
    part2 = ["trainer.total_training_steps=6", "trainer.val_before_train=false", "bupo.layer_entropy_freq=3"]
    second = run_cmd(script + part2, env, out)
    assert second.rc == 0, second.output[-6000:]
    second.extra["shm_left"] = shm_left(shm_before, first.output + second.output)  # read at once
    return first, second


@pytest.fixture(scope="session")
def stock_auto_run(e2e_root, toy_dir) -> tuple[Run, dict[int, dict]]:
    """verl's stock main_ppo with BuPO by overrides: ``internal_layer=auto`` for 3 steps, then GRPO.

    Stopped after the step-2 checkpoint and resumed to step 4 (its own log segment each): the
    resumed part must train the recorded layer at step 3 without measuring again.
    """
    from _stock import BUPO, stock_run

    out = e2e_root / "stock"
    common = [
        *BUPO, "+bupo.internal_layer=auto", "+bupo.internal_steps=3", "+bupo.auto_layer_samples=8",
        "trainer.experiment_name=stock_auto", "trainer.save_freq=2",
    ]  # fmt: skip
    first = stock_run(out, toy_dir, *common, "trainer.total_training_steps=2", log_name="log.0.jsonl")
    assert first.rc == 0, first.output[-6000:]
    second = stock_run(out, toy_dir, *common, "trainer.total_training_steps=4", log_name="log.1.jsonl")
    assert second.rc == 0, second.output[-6000:]
    steps = read_steps(out / "log.0.jsonl")
    for step, data in read_steps(out / "log.1.jsonl").items():
        steps.setdefault(step, {}).update(data)
    run = Run(second.rc, first.output + second.output, out)
    return run, steps
