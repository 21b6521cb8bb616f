"""Next-token log-probs and entropies of an internal layer policy pi^k, exact and differentiable.

``internal_log_probs(model, input_ids, layer)`` runs only decoder layers 0..layer of the model (see
:mod:`verl_ext.slicing`) and the fused LM head (see :mod:`verl_ext.fused_head`) on the residual
stream after that layer; no [tokens x vocab] tensor is ever held and layers above ``layer`` neither
run nor receive gradients.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from verl_ext.fused_head import DEFAULT_CHUNK_SIZE, fused_log_probs_entropy
from verl_ext.slicing import exit_after_layer, find_decoder, unwrap_model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The unembedding matrix E_u ``[V, H]`` of a causal LM (tied or untied)."""
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(inner).__name__} has no output embedding (LM head)")
    return head.weight


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so left padding does not shift positions."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def internal_log_probs(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer: int | None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    final_norm: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the internal layer policy pi^{layer+1} (or the full policy).

    Convention: ``layer`` is the 0-based decoder index k; the policy is
    ``softmax(H E_u^T / temperature)`` with H the raw residual stream after ``model.layers[k]``
    (``final_norm=False``, the paper's definition) or ``norm(H)`` (``final_norm=True``, logit lens).
    ``layer=None`` is the model's full policy (all layers and the final norm).

    Args:
        model: a Hugging Face causal LM (bare or PEFT-wrapped); Qwen2, Qwen3, Llama and any
            architecture whose decoder loops over ``layers[: config.num_hidden_layers]``.
        input_ids: ``[B, T]`` token ids.
        layer: 0-based decoder index k, or None for the full policy.
        attention_mask: ``[B, T]`` with 0 at padding (left or right); position ids are derived
            from it so that padding does not change the values at real positions.
        temperature: the logits are divided by it (the rollout temperature).
        final_norm: apply the model's final norm to H^{k+1} (ignored when ``layer`` is None).
        chunk_size: token rows per chunk of the fused head.
        backend: fused-head backend (``auto``, ``chunked``, ``triton``).

    Returns:
        ``(log_probs, entropy)``, float32, both ``[B, T-1]``: position t holds
        ``log pi(input_ids[:, t+1] | input_ids[:, :t+1])`` and the entropy of that distribution.
        Positions whose context token or target token is padding hold 0.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    decoder = find_decoder(model)
    kwargs = dict(use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    ctx = (
        exit_after_layer(model, layer, final_norm=final_norm) if layer is not None else contextlib.nullcontext()
    )
    with ctx:
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
    log_probs, entropy = fused_log_probs_entropy(
        hidden[:, :-1],
        lm_head_weight(model),
        input_ids[:, 1:],
        temperature=temperature,
        chunk_size=chunk_size,
        backend=backend,
    )
    if attention_mask is not None:
        valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
        log_probs = log_probs.masked_fill(~valid, 0.0)
        entropy = entropy.masked_fill(~valid, 0.0)
    return log_probs, entropy
