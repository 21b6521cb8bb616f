"""A CPU platform for verl 0.9.1 (which ships cuda, npu and rocm only), selected with ``VERL_PLATFORM=cpu``.

verl resolves its platform lazily (``verl.plugin.platform.get_platform``), so registering this class
when ``import verl`` loads our ``verl.plugins`` entry point is early enough in every process, Ray
workers and vLLM workers included. Device ``cpu``, backend ``gloo``, no CUDA IPC (verl then moves
weights to vLLM through shared memory), and a device module that answers the ``torch.cuda`` calls
verl makes (memory statistics, RNG, events) harmlessly on top of ``torch.cpu``.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
from verl.plugin.platform import PlatformRegistry
from verl.plugin.platform.platform_cuda import PlatformCUDA

PLATFORM_NAME = "cpu"


def _cpu_device_module() -> types.SimpleNamespace:
    """``torch.cpu`` plus no-op versions of the ``torch.cuda`` calls verl makes on its device module."""
    mod = types.SimpleNamespace(
        **{k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")}
    )
    for name in ("max_memory_allocated", "max_memory_reserved", "memory_allocated", "memory_reserved"):
        setattr(mod, name, lambda *a, **k: 0)
    for name in ("empty_cache", "reset_peak_memory_stats", "ipc_collect", "synchronize"):
        setattr(mod, name, lambda *a, **k: None)
    mod.manual_seed = mod.manual_seed_all = lambda seed: torch.manual_seed(seed)
    mod.mem_get_info = lambda *a, **k: (0, 0)
    mod.is_available = lambda: True
    mod.current_device = lambda: PLATFORM_NAME
    mod.device_count = lambda: 1
    mod.get_device_name = lambda *a, **k: "CPU"
    mod.get_rng_state = lambda *a, **k: torch.get_rng_state()
    mod.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    return mod


_DEVICE_MODULE = _cpu_device_module()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformCUDA):
    """verl's CUDA platform with every device answer replaced by the CPU's (see module docstring).

    ``current_device()`` is the string ``"cpu"``, never 0: verl both formats
    ``f"{device_name}:{device_id}"`` and calls ``module.to(device=get_device_id())``, and an integer
    0 means ``cuda:0`` to torch. Ray's resource name stays ``"GPU"``: a CPU run asks Ray for logical
    GPUs (``ray_kwargs.ray_init.num_gpus``), one per rank, so verl's placement logic is unchanged.
    """

    device_name = property(lambda self: PLATFORM_NAME)
    vendor_name = property(lambda self: PLATFORM_NAME)
    device_module = property(lambda self: _DEVICE_MODULE)

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return True

    def current_device(self) -> str:  # type: ignore[override]
        return PLATFORM_NAME

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: Any) -> None:
        pass

    def synchronize(self, device_index: Any = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        return {}

    def get_collective_module(self) -> None:
        return None

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def get_device_uuid(self, device_id: Any) -> str:
        return PLATFORM_NAME

    def cudart(self) -> None:
        return None
