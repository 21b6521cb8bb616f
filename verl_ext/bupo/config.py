"""The ``bupo:`` config block and the start-up checks that reject a run whose phase 1 would be wrong.

Every check names the offending key and the fix, and runs before Ray starts
(:func:`validate_config`, called by ``recipe/bupo/main_bupo.py``) and again in the trainer.
Layer indices are **0-based** decoder indices k (paper layer k+1) everywhere in this block.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from verl_ext.bupo.schedule import AUTO, Schedule

logger = logging.getLogger(__name__)

TRAINER_NAME = "bupo_sync"
LOSS_NAME = "bupo"


_INT_KEYS = {
    "internal_steps": 0,
    "full_policy_metrics_freq": 0,
    "full_policy_metrics_samples": 1,
    "layer_entropy_freq": 0,
    "layer_entropy_samples": 1,
}
"""Integer keys of the ``bupo:`` block and their smallest valid value."""


class BuPOConfigError(ValueError):
    """A configuration that would make BuPO's phase 1 wrong; the message names the key and the fix."""


@dataclass(frozen=True)
class BuPOConfig:
    """The ``bupo:`` block (see ``recipe/bupo/config/bupo_trainer.yaml`` for the documented YAML).

    Attributes:
        enable: train internal policies at all (False = plain GRPO through the same recipe).
        internal_layer: 0-based decoder index k of pi^{k+1} (paper layer = k+1), or ``"auto"``: the
            trainer picks it before the first update (see :mod:`verl_ext.bupo.auto_layer`).
        internal_steps: s_inter; phase 1 covers global steps 1..s_inter (steps count from 1).
        final_norm: apply the final norm to H^{k+1} (logit lens); False is the paper's definition.
        schedule: optional bottom-up schedule, a list of ``{layer, steps}`` replacing the two above.
        self_test: run the slicing self-test on the real model when the actor is built.
        head_chunk_size: token rows per chunk of the fused head (chunked backend); None = the measured
            default of the actor's device (:func:`verl_ext.fused_head.default_chunk_size`).
        full_policy_metrics_freq: every N steps of phase 1, log the full policy's entropy and
            KL(pi^k || pi) on a sub-sample (0 = never).
        full_policy_metrics_samples: sub-sample size (responses) for those metrics.
        layer_entropy_freq: every N steps log the per-layer entropy profile (0 = never).
        layer_entropy_samples: sub-sample size (responses) for the profile.
        auto_layer_samples: responses of the first batch whose entropy profile picks the ``auto`` layer.
    """

    enable: bool = True
    internal_layer: int | None = None
    internal_steps: int = 0
    final_norm: bool = False
    schedule: tuple = ()
    self_test: bool = True
    head_chunk_size: int | None = None
    full_policy_metrics_freq: int = 10
    full_policy_metrics_samples: int = 16
    layer_entropy_freq: int = 0
    layer_entropy_samples: int = 4
    auto_layer_samples: int = 64
    _schedule: Schedule = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls, block: Any) -> BuPOConfig:
        """Build from the ``bupo`` DictConfig/dict, rejecting unknown keys and bad values."""
        if block is None:
            block = {}
        data = _to_container(block)
        known = {f for f in cls.__dataclass_fields__ if not f.startswith("_")}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise BuPOConfigError(
                f"unknown key(s) bupo.{', bupo.'.join(map(str, unknown))}; valid keys: {sorted(known)}"
            )
        for key in ("enable", "final_norm", "self_test"):
            val = data.get(key, getattr(cls, key))
            if not isinstance(val, bool):
                raise BuPOConfigError(f"bupo.{key} must be true or false, got {val!r}"[:300])
        for key, low in _INT_KEYS.items():
            val = data.get(key, getattr(cls, key))
            if isinstance(val, bool) or not isinstance(val, int) or val < low:
                raise BuPOConfigError(f"bupo.{key} must be an integer >= {low}, got {val!r}")
        chunk = data.get("head_chunk_size")
        if chunk == "auto":
            data["head_chunk_size"] = chunk = None
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0):
            raise BuPOConfigError(
                f"bupo.head_chunk_size must be an integer > 0 or null (the device's default), got {chunk!r}"
            )
        layer = data.get("internal_layer")
        if (
            layer is not None
            and layer != AUTO
            and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0)
        ):
            raise BuPOConfigError(
                f"bupo.internal_layer must be a 0-based decoder index >= 0 (paper layer - 1) or {AUTO}, got {layer!r}"
            )
        stages = data.get("schedule") or ()
        if not isinstance(stages, (list, tuple)):
            raise BuPOConfigError(
                f"bupo.schedule must be a list of {{layer, steps}} stages (or null), got {stages!r}"[:300]
            )
        _check_auto_keys(data)
        data["schedule"] = tuple(stages)
        cfg = cls(**data)
        try:  # parsed even when disabled, so that a malformed schedule is reported either way
            sched = Schedule.from_config(cfg.internal_layer, cfg.internal_steps, cfg.schedule)
        except ValueError as e:
            raise BuPOConfigError(f"bupo.schedule / bupo.internal_*: {e}"[:500]) from e
        object.__setattr__(cfg, "_schedule", sched if cfg.enable else Schedule([]))
        return cfg

    @property
    def schedule_obj(self) -> Schedule:
        """The :class:`Schedule` this block describes (empty when ``enable`` is False)."""
        return self._schedule

    @property
    def phase1_active(self) -> bool:
        """True when at least one step trains an internal policy."""
        return self.schedule_obj.total_steps > 0


def _check_auto_keys(data: dict) -> None:
    """``bupo.internal_layer: auto`` needs phase 1, and its sub-sample size must be a positive count."""
    samples = data.get("auto_layer_samples", BuPOConfig.auto_layer_samples)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise BuPOConfigError(f"bupo.auto_layer_samples must be an integer >= 1 (responses), got {samples!r}")
    stages = data.get("schedule") or ()
    stage_layers = [
        st.get("layer") if hasattr(st, "get") else st[0] if isinstance(st, (list, tuple)) and st else None
        for st in (stages if isinstance(stages, (list, tuple)) else ())
    ]
    uses_auto = AUTO in [data.get("internal_layer"), *stage_layers]
    if uses_auto and not data.get("enable", True):
        raise BuPOConfigError(
            f"bupo.internal_layer={AUTO} needs phase 1, but bupo.enable=false trains the full policy only: "
            "set bupo.enable=true, or drop auto"
        )


def _to_container(block: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(block, DictConfig):
            return OmegaConf.to_container(block, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    except Exception as e:  # a missing value or a broken interpolation inside the block
        raise BuPOConfigError(f"the bupo block cannot be read ({e}); check its bupo.* keys") from e
    if not isinstance(block, Mapping):
        raise BuPOConfigError(
            f"the bupo block must be a mapping of bupo.* keys (bupo.enable, bupo.internal_layer, ...), got "
            f"{block!r}"[:300]
        )
    return dict(copy.deepcopy(dict(block)))


def _get(config: Any, dotted: str, default: Any = None) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
        except Exception:
            return default
    return default if node is None else node


def set_layers(bupo: BuPOConfig) -> list[tuple[str, int]]:
    """Every exit layer the block sets, with its key: ``internal_layer`` and each schedule stage, enabled or not."""
    layers = []
    if isinstance(bupo.internal_layer, int):
        layers.append(("bupo.internal_layer", bupo.internal_layer))
    if bupo.schedule:
        stages = Schedule.from_config(None, 0, bupo.schedule).stages  # parsed once in from_dict already
        # an `auto` stage is chosen from the real model's profile: in range by construction
        layers += [(f"bupo.schedule[{i}].layer", st.layer) for i, st in enumerate(stages) if st.layer != AUTO]
    return layers


def check_layers(bupo: BuPOConfig, num_layers: int) -> None:
    """Reject set layers outside ``0..num_layers-1`` (0-based), phase 1 or not, naming the key and the range."""
    for key, layer in set_layers(bupo):
        if not 0 <= layer < num_layers:
            raise BuPOConfigError(
                f"{key}={layer} is outside the model's range: it is a 0-based decoder index and this "
                f"model has {num_layers} layers, so valid values are 0..{num_layers - 1} (paper layer = "
                f"index + 1; e.g. the paper's pi^6 is internal_layer=5)"
            )


def needs_entropy_profile(bupo: BuPOConfig) -> bool:
    """Whether the run measures the layer/attention/FFN entropy profile (telemetry or ``auto``)."""
    return bool(bupo.layer_entropy_freq) or bupo.schedule_obj.has_auto


def check_profile_architecture(bupo: BuPOConfig, hf_config: Any) -> None:
    """Reject the entropy profile (``layer_entropy_freq > 0`` or ``internal_layer: auto``) on a model
    the analysis does not support, at start-up instead of at the first profiled step.

    Args:
        bupo: the parsed ``bupo`` block.
        hf_config: the model's Hugging Face config (its ``model_type`` is checked).
    """
    from verl_ext.analysis.capture import SUPPORTED_MODEL_TYPES

    model_type = getattr(hf_config, "model_type", None)
    if not needs_entropy_profile(bupo) or model_type in SUPPORTED_MODEL_TYPES:
        return
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    uses = []
    if bupo.layer_entropy_freq:
        uses.append(f"bupo.layer_entropy_freq={bupo.layer_entropy_freq} (set it to 0)")
    if bupo.schedule_obj.has_auto:
        uses.append(f"bupo.internal_layer={AUTO} (set bupo.internal_layer=K by hand)")
    raise BuPOConfigError(
        f"{' and '.join(uses)}: the entropy profile supports model_type {supported} only, and "
        f"actor_rollout_ref.model.path is model_type={model_type!r}"
    )


def check_enabled_has_phase1(bupo: BuPOConfig) -> None:
    """Reject ``enable: true`` without a single internal-policy step (it would silently train plain GRPO)."""
    if bupo.enable and not bupo.phase1_active:
        raise BuPOConfigError(
            "bupo.enable=true but no step trains an internal policy (bupo.internal_steps=0 and no "
            "bupo.schedule stage with steps > 0): set bupo.internal_layer=K bupo.internal_steps=N (or pick a preset=...) for BuPO, "
            "or bupo.enable=false for the GRPO baseline"
        )


def check_verl_config(config: Any, bupo: BuPOConfig) -> None:
    """Reject verl settings that would make phase 1 wrong (only when phase 1 is active).

    Args:
        config: the whole composed verl config (DictConfig or nested dicts).
        bupo: the parsed ``bupo`` block.
    """
    errors: list[str] = []
    if _get(config, "trainer.use_v1", True) is not True:
        errors.append("trainer.use_v1=false: BuPO plugs into verl's V1 trainer; set trainer.use_v1=true")
    mode = _get(config, "trainer.v1.trainer_mode")
    if mode not in (TRAINER_NAME, "sync"):
        errors.append(f"trainer.v1.trainer_mode={mode}: BuPO needs trainer.v1.trainer_mode={TRAINER_NAME}")
    strategy = _get(config, "actor_rollout_ref.actor.strategy")
    if strategy not in ("fsdp", "fsdp2"):
        errors.append(f"actor_rollout_ref.actor.strategy={strategy}: BuPO supports fsdp and fsdp2 only")
    if bupo.layer_entropy_freq and strategy == "fsdp":
        errors.append(
            "bupo.layer_entropy_freq > 0 with actor_rollout_ref.actor.strategy=fsdp: the telemetry gathers the "
            "LM head from FSDP2 shards; use strategy=fsdp2 or set bupo.layer_entropy_freq=0"
        )
    if bupo.schedule_obj.has_auto and strategy == "fsdp":
        errors.append(
            f"bupo.internal_layer={AUTO} with actor_rollout_ref.actor.strategy=fsdp: the entropy profile gathers the "
            "LM head from FSDP2 shards; use strategy=fsdp2 or set the layer by hand"
        )
    if _get(config, "algorithm.adv_estimator") == "grpo" and (
        _get(config, "actor_rollout_ref.rollout.n", 1) < 2
    ):
        errors.append(
            "actor_rollout_ref.rollout.n < 2 with GRPO: every advantage would be 0; use n >= 2 (paper: 8)"
        )
    if bupo.phase1_active:
        rc = "algorithm.rollout_correction"
        why = "phase 1 compares pi^k with pi^k_old; ratios against the full-policy rollout are meaningless"
        if _get(config, f"{rc}.bypass_mode", False):
            errors.append(f"{rc}.bypass_mode=true: {why}. Set {rc}.bypass_mode=false")
        for key in ("rollout_is", "rollout_rs"):
            if _get(config, f"{rc}.{key}") is not None:
                errors.append(f"{rc}.{key}={_get(config, f'{rc}.{key}')}: {why}. Set {rc}.{key}=null")
        kl_why = "it would mix pi^k with the full-depth reference (the paper trains without KL)"
        if _get(config, "actor_rollout_ref.actor.use_kl_loss", False):
            errors.append(
                f"actor_rollout_ref.actor.use_kl_loss=true during phase 1: {kl_why}. Set it to false"
            )
        if _get(config, "algorithm.use_kl_in_reward", False):
            errors.append(f"algorithm.use_kl_in_reward=true during phase 1: {kl_why}. Set it to false")
        for role in ("actor",):
            key = f"actor_rollout_ref.{role}.fsdp_config.forward_prefetch"
            if _get(config, key, False):
                errors.append(
                    f"{key}=true: it prefetches layer k+1, which never runs in phase 1. Set it to false"
                )
        if _get(config, "actor_rollout_ref.model.enable_activation_offload", False):
            errors.append(
                "actor_rollout_ref.model.enable_activation_offload=true: verl's offload assumes all layers run. "
                "Set it to false (gradient checkpointing is enough: only k+1 layers hold activations)"
            )
        if _get(config, "actor_rollout_ref.actor.calculate_sum_pi_squared", False):
            errors.append(
                "actor_rollout_ref.actor.calculate_sum_pi_squared=true: needs full logits; set it to false"
            )
    if errors:
        raise BuPOConfigError("BuPO config rejected:\n  - " + "\n  - ".join(errors))


SHRINK = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    num_hidden_layers=3,
    # MoE and multi-head-latent-attention widths (set only where the config has the key)
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    qk_head_dim=32,
    v_head_dim=16,
)
"""Sizes of the tiny random copy :func:`architecture_self_test` builds (at least 3 decoder layers)."""

PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "no_rope_layers", "sliding_windows")
"""Config lists with one entry per decoder layer (indexed by ``layer_idx`` in the modeling code)."""


def _per_layer(values: list, n: int) -> list:
    """``values`` cut or grown to ``n`` entries, every distinct value first (so each kind of layer runs)."""
    distinct = list(dict.fromkeys(values))
    return (distinct + [values[i % len(values)] for i in range(n)])[:n]


def tiny_config(hf_config: Any) -> Any:
    """A copy of ``hf_config`` shrunk to :data:`SHRINK` sizes, consistent for any depth of the original.

    The copy has ``max(3, kinds of layer)`` decoder layers; per-layer lists (:data:`PER_LAYER_KEYS`)
    are resized to that depth keeping every kind of layer of the original (e.g. sliding and full
    attention), multi-head attention stays multi-head (``num_key_value_heads == num_attention_heads``,
    as MLA needs), and token ids outside the shrunk vocabulary are dropped.
    """
    import contextlib

    tiny = copy.deepcopy(hf_config)
    per_layer = {
        key: list(val)
        for key in PER_LAYER_KEYS
        if isinstance(val := getattr(hf_config, key, None), (list, tuple)) and val
    }
    sizes = dict(SHRINK)
    sizes["num_hidden_layers"] = max(
        [SHRINK["num_hidden_layers"]] + [len(set(v)) for v in per_layer.values()]
    )
    heads, kv = (
        getattr(hf_config, "num_attention_heads", None),
        getattr(hf_config, "num_key_value_heads", None),
    )
    if isinstance(heads, int) and isinstance(kv, int) and kv >= heads:
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
    shrunk = {key: val for key, val in sizes.items() if hasattr(tiny, key)}
    shrunk.update({key: _per_layer(val, sizes["num_hidden_layers"]) for key, val in per_layer.items()})
    for key, val in shrunk.items():
        with contextlib.suppress(AttributeError):  # a derived, read-only property (computed from these)
            setattr(tiny, key, val)
    vocab = SHRINK["vocab_size"]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        val = getattr(tiny, key, None)
        if isinstance(val, int) and not 0 <= val < vocab:
            setattr(tiny, key, None)
        elif isinstance(val, (list, tuple)):
            setattr(tiny, key, [t for t in val if 0 <= t < vocab] or None)
    tiny._attn_implementation = "eager"
    return tiny


def architecture_self_test(hf_config: Any) -> None:
    """Build a tiny random model of ``hf_config``'s architecture and run the slicing self-test on it.

    Works for a model of any depth (1 layer included): the copy is :func:`tiny_config`.

    Raises:
        BuPOConfigError: the architecture's forward does not slice, its head does something pi^k
            does not reproduce, or the tiny copy cannot be built.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from verl_ext.slicing import SlicingError, check_slicing

    arch = getattr(hf_config, "model_type", type(hf_config).__name__)
    try:
        tiny = tiny_config(hf_config)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(tiny).float().eval()
    except Exception as e:
        raise BuPOConfigError(f"cannot build a tiny {arch} model for the slicing self-test: {e}") from e
    try:
        check_slicing(model)
    except SlicingError as e:
        raise BuPOConfigError(
            f"actor_rollout_ref.model.path: architecture {arch!r} fails the slicing self-test: {e}"
        ) from e


def load_hf_config(config: Any):
    """The Hugging Face config of ``actor_rollout_ref.model.path`` (config.json only, no weights)."""
    from transformers import AutoConfig

    path = _get(config, "actor_rollout_ref.model.path")
    trust = bool(_get(config, "actor_rollout_ref.model.trust_remote_code", False))
    return AutoConfig.from_pretrained(path, trust_remote_code=trust)


def validate_config(config: Any, hf_config: Any = None, self_test: bool = True) -> BuPOConfig:
    """All start-up checks for a BuPO run; returns the parsed ``bupo`` block.

    Args:
        config: the composed verl + bupo config.
        hf_config: the model's Hugging Face config; loaded from ``actor_rollout_ref.model.path``
            when None. If it cannot be loaded (e.g. offline), the layer-range check moves to the
            worker, which runs it on the real model before any rollout.
        self_test: run :func:`architecture_self_test` on a tiny copy of the architecture.
    """
    bupo = BuPOConfig.from_dict(_get(config, "bupo"))
    check_verl_config(config, bupo)
    check_enabled_has_phase1(bupo)
    if not set_layers(bupo) and not bupo.phase1_active and not needs_entropy_profile(bupo):
        return bupo  # nothing to check on the model
    if hf_config is None:
        try:
            hf_config = load_hf_config(config)
        except Exception as e:  # offline driver: the worker checks again on the real model
            logger.warning(
                "BuPO: could not read the model config at start-up (%s); checking in the worker", e
            )
            return bupo
    check_layers(bupo, int(hf_config.num_hidden_layers))
    check_profile_architecture(bupo, hf_config)
    if self_test and bupo.phase1_active:
        architecture_self_test(hf_config)
    return bupo
