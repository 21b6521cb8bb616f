"""What an architecture's LM head does after ``H E_u^T``: the fixed logit map pi^k shares with pi.

The paper's internal policy is pi^k = softmax(H^k E_u^T / T), the raw residual stream through the
unembedding, no final norm. For Qwen2/Qwen3/Llama (and most decoders) the model's head *is* E_u.
A few heads apply a fixed map to ``E_u h`` before the softmax; this project treats that map as part
of the unembedding, so that pi^k is **the model's own head on H^k, with only the final norm left
out**:

* Granite, GraniteMoE, GraniteMoEShared: ``logits / config.logits_scaling`` (muP output multiplier);
* Cohere: ``logits * config.logit_scale``;
* HyperCLOVA X: ``logits * config.logits_scaling``;
* Gemma2, Gemma3 (text), VaultGemma: ``cap * tanh(logits / cap)`` with
  ``cap = config.final_logit_softcapping`` (when set);

and the rollout temperature divides the result, as verl does with the model's logits. Consequence:
pi^L with the final norm is exactly the model's policy for every architecture, and the fixed map is
never dropped between the rollout (full model) and phase 1. Input-side multipliers (Gemma's
``sqrt(hidden_size)``, Granite's ``embedding_multiplier``) scale ``H^0`` only; a tied head multiplies
by the unscaled embedding matrix, exactly as the model's own head does.

:func:`verl_ext.slicing.check_slicing` checks on the real model that its logits equal
``HeadSpec.apply(lm_head(norm(H^L)))``, so an architecture whose head does something else is
rejected at start-up rather than trained with the wrong pi^k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class HeadSpec:
    """The fixed logit map ``z = softcap(scale * (h E_u^T))`` of a model's head (before ``/ T``).

    Attributes:
        scale: multiplies the raw head output (1.0 = none).
        softcap: ``cap * tanh(z / cap)`` after the scale; None = none.
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        """True when the head is plain ``h E_u^T`` (Qwen, Llama, ...)."""
        return self.scale == 1.0 and self.softcap is None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The map on materialised logits (reference implementation; differentiable)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _softcap(config) -> HeadSpec:
    cap = getattr(config, "final_logit_softcapping", None)
    return HeadSpec(softcap=float(cap) if cap else None)


def _divide_by(key: str) -> Callable[[Any], HeadSpec]:
    return lambda config: HeadSpec(scale=1.0 / float(getattr(config, key)))


def _multiply_by(key: str) -> Callable[[Any], HeadSpec]:
    return lambda config: HeadSpec(scale=float(getattr(config, key)))


HEAD_RULES: dict[str, tuple[str, Callable[[Any], HeadSpec]]] = {
    "granite": ("logits / logits_scaling", _divide_by("logits_scaling")),
    "granitemoe": ("logits / logits_scaling", _divide_by("logits_scaling")),
    "granitemoeshared": ("logits / logits_scaling", _divide_by("logits_scaling")),
    "cohere": ("logits * logit_scale", _multiply_by("logit_scale")),
    "hyperclovax": ("logits * logits_scaling", _multiply_by("logits_scaling")),
    "gemma2": ("cap * tanh(logits / cap), cap = final_logit_softcapping", _softcap),
    "gemma3_text": ("cap * tanh(logits / cap) if final_logit_softcapping is set", _softcap),
    "vaultgemma": ("cap * tanh(logits / cap), cap = final_logit_softcapping", _softcap),
}
"""model_type -> (what the head does after ``h E_u^T``, the :class:`HeadSpec` it implies)."""


def head_spec(config: Any) -> HeadSpec:
    """The :class:`HeadSpec` of a model (or its Hugging Face config); identity for unlisted types."""
    config = getattr(config, "config", config)
    rule = HEAD_RULES.get(getattr(config, "model_type", None))
    return rule[1](config) if rule else HeadSpec()


def head_description(model_type: str) -> str:
    """Human-readable head map for the support matrix (``"h E_u^T"`` when there is none)."""
    rule = HEAD_RULES.get(model_type)
    return rule[0] if rule else "none"
