"""Workers: the actor's TrainingWorker gets the BuPO engine; the hybrid worker adds diagnostics RPCs.

Importing this module registers the ``bupo`` policy loss (so it happens inside each Ray worker).
:class:`BuPOActorRolloutRefWorker` is a drop-in for verl's ``ActorRolloutRefWorker``: its
``actor_worker_cls`` builds the actor engine, turns it into the BuPO engine and runs the slicing
self-test on the real (sharded) model; the reference model and the rollout are untouched.
"""

from __future__ import annotations

import copy
import functools
from contextlib import nullcontext

import torch
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.utils.device import get_device_name
from verl.utils.flops_counter import FlopsCounter
from verl.workers.engine_workers import ActorRolloutRefWorker, TrainingWorker

import verl_ext.bupo.loss  # noqa: F401  (registers the "bupo" policy loss in this process)
from verl_ext.bupo.engine import DIAGNOSE_KEY, EXIT_LAYER_KEY, bupoify
from verl_ext.bupo.schedule import FULL_POLICY
from verl_ext.log import get_logger
from verl_ext.slicing import check_slicing, num_layers, validate_layer

logger = get_logger(__name__)


def _numbers(value) -> list[float]:
    """Flatten a metric value (number, verl ``Metric``, or nested lists of them) to floats."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _numbers(v)]
    if hasattr(value, "values") and hasattr(value, "aggregate"):  # verl Metric
        return _numbers(list(value.values))
    return [float(value)]


class BuPOTrainingWorker(TrainingWorker):
    """verl's TrainingWorker whose engine runs pi^k when the batch asks for it.

    Class attributes (set per run by :func:`actor_rollout_ref_worker_cls`): ``bupo_layers``, the
    0-based exit layers the schedule will use (checked against the real model when it is built),
    and ``bupo_run_self_test``.
    """

    bupo_layers: tuple[int, ...] = ()
    bupo_run_self_test: bool = True

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def reset(self):
        super().reset()
        bupoify(self.engine)
        self._flops_cache: dict[int, FlopsCounter] = {}
        n_layers = num_layers(self.engine.module)
        for layer in self.bupo_layers:
            validate_layer(layer, n_layers, name="bupo.internal_layer")
        if self.bupo_run_self_test:
            self.bupo_self_test()

    def bupo_self_test(self) -> None:
        """Run :func:`~verl_ext.slicing.check_slicing` on the engine's real module (all ranks)."""
        dtype = getattr(self.engine, "_autocast_dtype", torch.float32)
        device = self.device_name if isinstance(self.device_name, str) else "cuda"
        autocast = (
            nullcontext() if dtype == torch.float32 else torch.autocast(device_type=device, dtype=dtype)
        )
        with self.engine.eval_mode(), autocast:
            check_slicing(self.engine.module, atol=1e-4 if dtype == torch.float32 else 5e-2)
        logger.info("BuPO: slicing self-test passed on the actor model")

    def _internal_flops_ratio(self, layer: int, global_token_num) -> float:
        """FLOPs of layers 0..layer + head over the full model's, by verl's own FlopsCounter."""
        hf_config = getattr(self.model_config, "hf_config", None)
        if hf_config is None or not global_token_num:
            return float("nan")
        if layer not in self._flops_cache:
            cfg = copy.deepcopy(hf_config)
            cfg.num_hidden_layers = layer + 1
            self._flops_cache[layer] = FlopsCounter(cfg)
        full, _ = self.flops_counter.estimate_flops(global_token_num, 1.0)
        part, _ = self._flops_cache[layer].estimate_flops(global_token_num, 1.0)
        return part / full if full else float("nan")

    def _postprocess_output(self, output, *, global_token_num, delta_time, forward_only, images_seqlens):
        layers = _numbers(output.get("metrics", {}).get("bupo/exit_layer"))
        final = super()._postprocess_output(
            output,
            global_token_num=global_token_num,
            delta_time=delta_time,
            forward_only=forward_only,
            images_seqlens=images_seqlens,
        )
        layer = int(max(layers)) if layers else FULL_POLICY
        metrics = tu.get(final, "metrics")
        if global_token_num and delta_time:
            metrics["bupo/tokens_per_s"] = float(sum(global_token_num)) / float(delta_time)
        if layer != FULL_POLICY and metrics.get("mfu"):
            # verl's MFU assumes all L layers ran; phase 1 ran k+1 of them. No MFU where verl has
            # none (e.g. on CPU it reports 0 for want of a peak-FLOPs figure): nothing, not a false 0.
            metrics["bupo/mfu"] = metrics["mfu"] * self._internal_flops_ratio(layer, global_token_num)
        return final


class BuPOActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker with the BuPO actor engine and diagnostics RPCs."""

    actor_worker_cls = BuPOTrainingWorker

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def bupo_policy_diagnostics(self, data):
        """Full-policy entropy and KL(pi^k || pi) over the response tokens of ``data`` (no update).

        ``data`` carries the non-tensor ``bupo_diagnose_layer`` (0-based k) and the usual
        ``temperature``. Returns only scalar metrics (nothing is written back to the batch), averaged
        over all response tokens of all data-parallel ranks.
        """
        return _reduce_response_means(
            self.actor, data, {"log_probs": "kl_internal_full", "entropy": "full_entropy"}
        )

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def bupo_layer_entropy(self, data):
        """Per-layer entropy profile of the responses in ``data`` (metrics ``bupo/layer_entropy/<l>``)."""
        from verl_ext.bupo.telemetry import layer_entropy_metrics

        return layer_entropy_metrics(self.actor, data)


@functools.cache
def actor_rollout_ref_worker_cls(layers: tuple[int, ...] = (), self_test: bool = True) -> type:
    """The hybrid worker class for one run: its actor checks ``layers`` and runs the self-test or not."""
    if not layers and self_test:
        return BuPOActorRolloutRefWorker
    actor_cls = type(
        "BuPOTrainingWorker",
        (BuPOTrainingWorker,),
        {"bupo_layers": tuple(layers), "bupo_run_self_test": self_test},
    )
    return type("BuPOActorRolloutRefWorker", (BuPOActorRolloutRefWorker,), {"actor_worker_cls": actor_cls})


def _reduce_response_means(training_worker: TrainingWorker, data, fields: dict[str, str]):
    """Run ``infer_batch`` and average the named per-token outputs over response tokens, DP-wide."""
    from verl.workers.utils.padding import no_padding_2_padding

    if tu.get_non_tensor_data(data=data, key=DIAGNOSE_KEY, default=None) is None:
        raise ValueError(f"{DIAGNOSE_KEY} must be set for a diagnostics call")
    tu.assign_non_tensor(
        data, **{EXIT_LAYER_KEY: FULL_POLICY, "calculate_entropy": True, "compute_loss": False}
    )
    response_mask = data["response_mask"]
    mask = (response_mask.to_padded_tensor(0) if response_mask.is_nested else response_mask).double()
    out = training_worker.infer_batch(data)
    engine = training_worker.engine
    sums = torch.zeros(len(fields) + 1, dtype=torch.float64)
    if out is not None:
        for i, key in enumerate(fields):
            vals = no_padding_2_padding(out[key], data).double()[:, : mask.shape[1]]
            sums[i] = (vals * mask[:, : vals.shape[1]]).sum()
        sums[-1] = mask.sum()
    if torch.distributed.is_initialized():
        sums = sums.to(get_device_name())
        torch.distributed.all_reduce(sums, group=engine.get_data_parallel_group())
    count = max(float(sums[-1]), 1.0)
    metrics = {f"bupo/{name}": float(sums[i]) / count for i, name in enumerate(fields.values())}
    return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": metrics})
