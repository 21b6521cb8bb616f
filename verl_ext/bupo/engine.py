"""Actor-engine mixin: in phase 1 the log-prob forward runs layers 0..k and the fused head on H^{k+1}.

:func:`bupoify` turns one engine *instance* (the actor's ``FSDPEngineWithLMHead``) into a cached
subclass ``BuPO<Engine>`` whose ``forward_step`` reads the per-micro-batch non-tensor entry
``bupo_exit_layer`` sent by the trainer (-1 or absent: full policy, the stock path). When it is a
layer k >= 0, the whole stock ``forward_step`` (padding removal, Ulysses slicing, dynamic batch
size, temperature, the loss) runs inside :func:`verl_ext.internal_policy.internal_policy_forward`,
which slices the decoder and answers with verl's fused-head output contract, so verl's own
``prepare_model_outputs`` reads pi^k log-probs and entropies without a [tokens x vocab] tensor.
Nothing global is patched: the reference engine and the critic keep the stock class.
"""

from __future__ import annotations

import torch
from verl.utils import tensordict_utils as tu

from verl_ext.bupo.loss import active_exit_layer
from verl_ext.bupo.schedule import FULL_POLICY
from verl_ext.internal_policy import internal_policy_forward, policy_divergence_forward

EXIT_LAYER_KEY = "bupo_exit_layer"
FINAL_NORM_KEY = "bupo_final_norm"
CHUNK_KEY = "bupo_head_chunk_size"
"""Rows per fused-head chunk; 0 = the device's default (:func:`verl_ext.fused_head.default_chunk_size`)."""
DIAGNOSE_KEY = "bupo_diagnose_layer"


def exit_layer_of(micro_batch) -> int:
    """The exit layer a micro-batch asks for (0-based), or -1 for the full policy."""
    layer = tu.get_non_tensor_data(data=micro_batch, key=EXIT_LAYER_KEY, default=FULL_POLICY)
    return FULL_POLICY if layer is None else int(layer)


class BuPOEngineMixin:
    """Overrides ``forward_step`` only; everything else is the engine's own code."""

    def forward_step(self, micro_batch, loss_function, forward_only):
        layer = exit_layer_of(micro_batch)
        diagnose = tu.get_non_tensor_data(data=micro_batch, key=DIAGNOSE_KEY, default=FULL_POLICY)
        diagnose = FULL_POLICY if diagnose is None else int(diagnose)
        if layer == FULL_POLICY and diagnose == FULL_POLICY:
            with active_exit_layer(FULL_POLICY):
                return super().forward_step(
                    micro_batch, loss_function=loss_function, forward_only=forward_only
                )
        if self.engine_config.forward_only:
            raise RuntimeError(
                "bupo_exit_layer reached a forward-only (reference) engine; the reference must use the full policy"
            )
        if isinstance(micro_batch["temperature"], torch.Tensor):
            raise ValueError("BuPO phase 1 needs one scalar rollout temperature, not per-sample temperatures")
        final_norm = bool(tu.get_non_tensor_data(data=micro_batch, key=FINAL_NORM_KEY, default=False))
        # 0 (bupo.head_chunk_size: null) -> None: the fused head takes its device's default
        chunk = int(tu.get_non_tensor_data(data=micro_batch, key=CHUNK_KEY, default=0)) or None
        # Both contexts answer with log_probs/entropy: verl's fused-kernel output contract.
        tu.assign_non_tensor(micro_batch, use_fused_kernels=True)
        if layer == FULL_POLICY:  # diagnostics: log_probs <- KL(pi^k || pi), entropy <- H(pi)
            if not forward_only:
                raise RuntimeError("bupo_diagnose_layer is for forward-only calls")
            ctx = policy_divergence_forward(self.module, diagnose, final_norm=final_norm, chunk_size=chunk)
        else:
            ctx = internal_policy_forward(self.module, layer, final_norm=final_norm, chunk_size=chunk)
        with active_exit_layer(layer), ctx:
            loss, output = super().forward_step(
                micro_batch, loss_function=loss_function, forward_only=forward_only
            )
        output.setdefault("metrics", {})["bupo/exit_layer"] = float(layer)
        return loss, output


_CLASS_CACHE: dict[type, type] = {}


def bupo_engine_class(engine_cls: type) -> type:
    """The cached ``BuPO<engine_cls>`` subclass (mixin first in the MRO)."""
    if issubclass(engine_cls, BuPOEngineMixin):
        return engine_cls
    if engine_cls not in _CLASS_CACHE:
        _CLASS_CACHE[engine_cls] = type(f"BuPO{engine_cls.__name__}", (BuPOEngineMixin, engine_cls), {})
    return _CLASS_CACHE[engine_cls]


def bupoify(engine) -> None:
    """Swap one engine instance's class for its BuPO subclass (instance-local, idempotent).

    Raises:
        TypeError: the engine is not an LM-head engine with ``forward_step`` (e.g. a critic).
    """
    if not hasattr(engine, "forward_step") or not hasattr(engine, "prepare_model_outputs"):
        raise TypeError(f"{type(engine).__name__} is not an LM-head engine; BuPO cannot slice it")
    engine.__class__ = bupo_engine_class(type(engine))
