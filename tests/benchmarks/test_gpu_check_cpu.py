"""The GPU check on CPU: every check of ``benchmarks/gpu_check.py`` with tiny shapes, and the Ray stub.

The GPU machine has no Ray; ``benchmarks/ray_stub`` stands in for it. These tests run everything in
subprocesses with the stub first on ``PYTHONPATH`` (so the real Ray installed here is hidden): the
engine path must import and run without ever calling Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUB = REPO / "benchmarks" / "ray_stub"
GPU_CHECK = REPO / "benchmarks" / "gpu_check.py"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(STUB), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="disabled",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def _records(out: Path) -> dict[str, dict]:
    recs = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r.get("check") or r.get("step")] = r
    return recs


@pytest.mark.slow
def test_cpu_smoke_runs_every_check(tmp_path):
    out = tmp_path / "out"
    proc = _run([str(GPU_CHECK), "--cpu-smoke", "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = _records(out)

    env = recs["env"]
    assert env["status"] == "pass"
    assert env["ray_is_stub"] is True and Path(env["ray_file"]).is_relative_to(STUB)

    for name in ("exact_tiny", "exact_4b"):
        rec = recs[name]
        assert rec["status"] == "pass", rec
        assert rec["cases"] and all(c["ok"] for c in rec["cases"])
        assert {c["backend_used"] for c in rec["cases"]} == {"chunked"}  # no CUDA here
        assert any(c["layer"] == "full" for c in rec["cases"])
        # the sliced forward's H^{k+1} equals the full forward's hidden_states[k+1] exactly
        assert all(c["max_abs_hidden_vs_full_forward"] in (None, 0.0) for c in rec["cases"])

    triton = recs["triton"]
    assert triton["status"] == "skipped" and triton["reason"].startswith("skipped: no CUDA")
    assert triton["chunked_ok"] is True
    assert all(case["triton"] == "skipped: no CUDA" for case in triton["cases"])

    engine = recs["engine"]
    assert engine["status"] == "pass", engine
    assert engine["phase1_ok"] and engine["phase2_ok"]
    assert engine["phase1_upper_changed"] == [] and engine["phase1_lower_unchanged"] == []
    assert engine["phase2_unchanged"] == []
    # tiny model tied like Qwen3-4B, k = 1: layers 0 and 1 (11 tensors each) and the embedding changed
    assert engine["tied_embeddings"] is True
    assert engine["phase1_changed"] == 23 and engine["phase1_params_checked"] == 46
    assert engine["phase1_update_metrics"]["bupo/phase"] == 1.0
    assert engine["phase2_update_metrics"]["bupo/phase"] == 2.0
    assert engine["optimizer"]["foreach"] is False
    for key in ("phase1_update_s", "phase2_update_s", "phase1_update_peak_mib", "phase2_update_peak_mib"):
        assert engine[key] > 0
    # the partial records written as the check goes
    assert {"engine.model", "engine.build", "engine.phase1", "engine.phase2"} <= set(recs)

    proc = _run([str(GPU_CHECK), "--summarize", "--out", str(out)], timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"] == "pass (with skipped checks)"
    assert summary["checks"]["triton"]["status"] == "skipped"


RAY_STUB_PROBE = r"""
import ray
from pathlib import Path
assert Path(ray.__file__).resolve().is_relative_to(Path(STUB).resolve()), ray.__file__
assert ray.IS_BUPO_RAY_STUB

# every module the engine path imports, and the plugin's worker
import verl.protocol
import verl.single_controller.base.decorator
import verl.single_controller.ray.base
import verl.utils.distributed
import verl.workers.engine_workers
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker
import verl_ext.bupo.worker
from verl_ext.bupo.worker import BuPOActorRolloutRefWorker, BuPOTrainingWorker
assert issubclass(BuPOTrainingWorker, TrainingWorker)

# the stub never pretends to work: every use raises, loudly
assert ray.is_initialized() is False
assert not isinstance(object(), ray.ObjectRef)
calls = [
    lambda: ray.init(),
    lambda: ray.get([]),
    lambda: ray.put(1),
    lambda: ray.nodes(),
    lambda: ray.get_runtime_context(),
    lambda: ray.util.get_node_ip_address(),
    lambda: ray.remote(type("A", (), {})).remote(),
    lambda: ray.remote(num_cpus=0)(lambda: 1).options(num_cpus=1),
    lambda: ray.util.PlacementGroup(),
    lambda: ray.util.placement_group([]),
]
for call in calls:
    try:
        call()
    except ray.RayStubError as exc:
        assert "BuPO GPU-check stub" in str(exc)
    else:
        raise AssertionError("a Ray call did not raise")
print("STUB_OK")
"""


def test_ray_stub_serves_the_engine_path_imports_and_refuses_calls():
    proc = _run(["-c", f"STUB = {str(STUB)!r}\n" + RAY_STUB_PROBE], timeout=120)
    assert proc.returncode == 0 and "STUB_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


def test_summary_marks_timeouts_and_bench_targets(tmp_path):
    lines = [
        {"check": "env", "status": "pass"},
        {"check": "exact_tiny", "status": "pass"},
        {"step": "engine", "rc": 124, "elapsed_s": 210, "budget_s": 210, "timed_out": True},
        {
            "step": "bench_qwen3-8b",
            "rc": -1,
            "elapsed_s": 0,
            "budget_s": 0,
            "timed_out": True,
            "skipped": "x",
        },
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ok = {"gpu_forward_time<=0.25x_fork": True, "gpu_update_time<=0.5x_and_peak_mem<=0.6x_fork": True}
    (tmp_path / "bench_qwen3-4b.jsonl").write_text(
        json.dumps({"variant": "fork", "mode": "update", "median_ms": 1.0})
        + "\n"
        + json.dumps({"targets": True, "target_ok": ok, "ratios": {}})
        + "\n"
    )
    k32 = {"gpu_forward_time<=0.25x_fork": None, "gpu_update_time<=0.5x_and_peak_mem<=0.6x_fork": None}
    k32["gpu_32k_update_peak<25GiB"] = False
    (tmp_path / "bench_qwen3-4b_32k.jsonl").write_text(json.dumps({"targets": True, "target_ok": k32}) + "\n")
    proc = _run([str(GPU_CHECK), "--summarize", "--out", str(tmp_path)], timeout=60)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["overall"] == "fail"
    assert summary["checks"]["engine"] == {"status": "incomplete", "reason": "timed out after 210 s"}
    assert summary["benchmarks"]["bench_qwen3-4b"]["status"] == "pass"
    assert summary["benchmarks"]["bench_qwen3-4b_32k"]["status"] == "fail"  # only the 32k target counts
    assert summary["benchmarks"]["bench_qwen3-4b_32k"]["target_ok"] == {"gpu_32k_update_peak<25GiB": False}
    assert summary["benchmarks"]["bench_qwen3-8b"] == {"status": "incomplete", "reason": "skipped: x"}


@pytest.mark.parametrize("script", ["gpu_check.sh", "fetch_gpu_wheels.sh"])
def test_shell_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)]).returncode == 0
