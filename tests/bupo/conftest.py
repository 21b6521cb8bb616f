"""Fixtures for the verl-facing tests: the CPU shim, a tiny model on disk, the real actor engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests' conftest (REPO_ROOT)

import _verl_cpu  # noqa: E402  (registers the CPU platform before verl picks one)


@pytest.fixture(scope="session")
def verl_cpu():
    """The CPU shim module with a world-size-1 gloo process group initialised."""
    _verl_cpu.init_gloo()
    return _verl_cpu


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 4-layer random Qwen3 (untied) and a local tokenizer saved with ``save_pretrained``."""
    from verl_ext.random_models import make_model, save_model_and_tokenizer

    path = tmp_path_factory.mktemp("tiny_qwen3")
    model = make_model("qwen3", init_std=0.1, num_hidden_layers=4)
    save_model_and_tokenizer(model, path)
    return path, model
