"""Layer slicing inside FSDP2 (``fully_shard``) and FSDP1 (``FullyShardedDataParallel``) wrappers, on CPU.

Cases: FSDP2 with Qwen3 (untied) and Llama (tied), FSDP1 with Qwen3 (tied) and Qwen2 (untied).

The work runs in two gloo ranks launched by ``_fsdp_worker.py`` (one subprocess for the module, both
modes); this file asserts on what the ranks report against a single-process reference built from the
same seed: ``check_slicing`` passes and leaves no hook behind, the sliced top-level forward gives
``lm_head(hidden_states[k+1])``, layers above k neither run nor get a gradient nor change in an AdamW
step, and the gradients of everything below equal the reference's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_fsdp_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp") / "results.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"FSDP worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


def _upper(name: str, layer: int, n_layers: int) -> bool:
    return any(f"layers.{i}." in name for i in range(layer + 1, n_layers))


@pytest.mark.parametrize("mode", ["fsdp2-qwen3", "fsdp1-qwen3", "fsdp2-llama", "fsdp1-qwen2"])
def test_slicing_under_fsdp(fsdp_results, mode):
    results = [r for r in fsdp_results if r["mode"] == mode]
    assert len(results) == 2, f"expected one result per rank, got {results}"
    for r in results:
        assert "error" not in r, r.get("error")
        k, n = r["layer"], r["n_layers"]
        # The start-up self-test works through the wrapper and cleans up after itself.
        assert r["check_slicing"] == "ok"
        assert r["hooks_left"] == [0] * n
        assert r["config_layers_after_check"] == n
        # Sliced top-level forward: only layers 0..k ran, the config is restored, logits = lm_head(H^{k+1}).
        assert r["calls"] == [1] * (k + 1) + [0] * (n - k - 1)
        assert r["config_layers_after_context"] == n
        assert r["logits_err"] < 1e-5
        assert r["loss_err"] < 1e-5
        # Gradients: exactly the reference's set (layers <= k, embedding, head), same values.
        assert r["with_grad"] == r["ref_with_grad"]
        assert r["grad_compared"] == len(r["ref_with_grad"]) > 0
        assert r["grad_err"] < 1e-5
        assert not any(_upper(name, k, n) for name in r["with_grad"])
        upper = [name for name in r["param_names"] if _upper(name, k, n)]
        assert upper and set(upper) <= set(r["grad_none"]), "upper-layer parameters must have grad None"
        # AdamW changes exactly the parameters that had a gradient; upper layers keep their weights.
        assert r["changed"] == r["with_grad"]
