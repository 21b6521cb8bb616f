"""The ``cpu`` platform exists only when selected, and then answers as a CPU device on gloo."""

from __future__ import annotations

from _subprocess import run_py


def test_not_registered_unless_selected():
    """Without VERL_PLATFORM=cpu nothing is registered: a GPU deployment's auto-detection is untouched."""
    out = run_py(
        """
        import json, verl
        from verl.plugin.platform import PlatformRegistry
        import verl.trainer.ppo.core_algos  # fires the plugin's other hooks too
        print(json.dumps({"names": list(PlatformRegistry.registered_names()),
                          "verl_ext_cpu": "verl_ext.cpu.platform" in __import__("sys").modules}))
        """,
        drop=("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "VERL_ENGINE_VENDOR"),
    )
    assert "cpu" not in out["names"]
    assert not out["verl_ext_cpu"]


def test_selected_platform_is_cpu():
    out = run_py(
        """
        import json, torch, verl
        from verl.utils.device import get_device_name, get_device_id, get_nccl_backend, get_torch_device
        from verl.plugin.platform import get_platform
        p = get_platform()
        t = torch.ones(2).to(device=get_device_id())   # an int 0 here would mean cuda:0
        dev = get_torch_device()
        print(json.dumps({"name": get_device_name(), "id": get_device_id(), "backend": get_nccl_backend(),
                          "tensor_device": str(t.device), "ipc": p.is_ipc_supported(),
                          "mem": dev.memory_allocated(), "cls": type(p).__name__}))
        """,
        env={"VERL_PLATFORM": "cpu"},
        drop=("VERL_ENGINE_DEVICE", "VERL_ENGINE_VENDOR"),
    )
    assert out["cls"] == "PlatformCPU"
    assert out["name"] == "cpu" and out["id"] == "cpu" and out["backend"] == "gloo"
    assert out["tensor_device"] == "cpu"
    assert out["ipc"] is False and out["mem"] == 0
