"""Shared fixtures: tiny random models over several architectures, a local tokenizer, data paths.

``tests/`` is deliberately not a package (the verl wheel installs a top-level ``tests``); pytest runs
with ``--import-mode=importlib``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

from verl_ext.random_models import make_model, make_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_MATH = REPO_ROOT.parent / "shared" / "data" / "math"

# Tests that start Ray clusters and vLLM servers (many processes, about 8 GB each run). Under
# ``pytest -n 2`` (the README's command) one worker runs them all, first and one after another, sharing
# the session's runs; the other worker takes the unit tests meanwhile.
TRAINING_RUN_TESTS = ("tests/e2e/", "tests/bupo/test_entry_point.py::")

ARCHS = ["qwen3", "qwen2", "llama"]
# Tolerances per dtype for comparisons against a float32/float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's ``load`` scheduling, except that the training-run tests form one unit of work.

    (``--dist loadgroup`` would do this with marks, but pytest-xdist 3.8 cannot rename the tests'
    node ids under pytest 9.2, so its groups are silently ignored.)
    """
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class TrainingRunsTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "training runs" if nodeid.startswith(TRAINING_RUN_TESTS) else nodeid

    return TrainingRunsTogether(config, log)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread (no OpenMP hand-offs on a shared, busy CPU)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def tied(request) -> bool:
    return request.param


@pytest.fixture
def tiny_model(arch, tied):
    """A 4-layer random model of each architecture, tied and untied, float32, eval mode."""
    return make_model(arch, tie_word_embeddings=tied, init_std=0.1)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def shared_math() -> Path:
    if not SHARED_MATH.is_dir():
        pytest.skip(f"shared data not found at {SHARED_MATH}")
    return SHARED_MATH


def left_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids left-padded to the longest length (pad id 0) and the matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n :] = torch.randint(2, vocab, (n,), generator=g)
        mask[i, T - n :] = 1
    return ids, mask


@pytest.fixture
def padded_batch():
    return left_padded_batch
