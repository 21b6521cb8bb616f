"""Next-token log-probs and entropies of an internal layer policy pi^k, exact and differentiable.

``internal_log_probs(model, input_ids, layer)`` runs only decoder layers 0..layer of the model (see
:mod:`verl_ext.slicing`) and the fused LM head (see :mod:`verl_ext.fused_head`) on the residual
stream after that layer; no [tokens x vocab] tensor is ever held and layers above ``layer`` neither
run nor receive gradients. Where the model's head applies a fixed map after ``H E_u^T`` (Granite's
logit scaling, Gemma2's soft cap; :mod:`verl_ext.heads`), pi^k applies it too: pi^k is the model's
own head on H^{k+1} without the final norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from verl_ext.fused_head import fused_log_probs_entropy
from verl_ext.heads import head_spec
from verl_ext.slicing import exit_after_layer, find_decoder, override_forward, unwrap_model


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
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of the internal layer policy pi^{layer+1} (or the full policy).

    Convention: ``layer`` is the 0-based decoder index k; the policy is
    ``softmax(g(H E_u^T) / temperature)`` with H the raw residual stream after ``model.layers[k]``
    (``final_norm=False``, the paper's definition) or ``norm(H)`` (``final_norm=True``, logit lens),
    and g the head's fixed logit map (identity for Qwen/Llama; :func:`verl_ext.heads.head_spec`).
    ``layer=None`` is the model's full policy (all layers and the final norm).

    Args:
        model: a Hugging Face causal LM (bare or PEFT-wrapped) of an architecture whose decoder
            loops over ``layers[: config.num_hidden_layers]`` (:mod:`verl_ext.architectures`).
        input_ids: ``[B, T]`` token ids.
        layer: 0-based decoder index k, or None for the full policy.
        attention_mask: ``[B, T]`` with 0 at padding (left or right); position ids are derived
            from it so that padding does not change the values at real positions.
        temperature: the logits are divided by it (the rollout temperature).
        final_norm: apply the model's final norm to H^{k+1} (ignored when ``layer`` is None).
        chunk_size: token rows per chunk of the fused head (None: the measured default of the device,
            :func:`verl_ext.fused_head.default_chunk_size`).
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
        exit_after_layer(model, layer, final_norm=final_norm)
        if layer is not None
        else contextlib.nullcontext()
    )
    with ctx:
        hidden = decoder(input_ids=input_ids, **kwargs).last_hidden_state
    spec = head_spec(unwrap_model(model))
    log_probs, entropy = fused_log_probs_entropy(
        hidden[:, :-1],
        lm_head_weight(model),
        input_ids[:, 1:],
        temperature=temperature,
        chunk_size=chunk_size,
        backend=backend,
        logit_scale=spec.scale,
        softcap=spec.softcap,
    )
    if attention_mask is not None:
        valid = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
        log_probs = log_probs.masked_fill(~valid, 0.0)
        entropy = entropy.masked_fill(~valid, 0.0)
    return log_probs, entropy


@dataclass
class InternalPolicyOutput(ModelOutput):
    """Output of a causal LM under :func:`internal_policy_forward` (the fields verl's fused path reads)."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def call_head(model: nn.Module, fn, hidden: torch.Tensor):
    """Call ``fn(hidden, weight)`` *as the forward of the LM head module*.

    Going through the head module's ``__call__`` lets an FSDP wrapper of the head unshard its weight
    for the call (and for backward), exactly as for the normal ``lm_head(hidden)``; ``fn`` sees the
    full ``[V, H]`` weight. The head module is restored afterwards. Outputs that are views are
    returned as their own tensors: FSDP2 hooks the head's outputs for backward, and an in-place op on
    a view would silently drop that hook.
    """
    head = unwrap_model(model).get_output_embeddings()

    def forward(h):
        out = fn(h, head.weight)
        return tuple(t.clone() if t._base is not None else t for t in out)

    with override_forward(head, forward):
        return head(hidden)


_HEAD_OR_GENERATION_KWARGS = (
    "shift_labels",
    "labels",
    "return_dict",
    "use_cache",
    "output_hidden_states",
    "output_attentions",
    "logits_to_keep",
    "cache_position",
)


def _decoder_hidden(
    decoder: nn.Module, input_ids, attention_mask, position_ids, kwargs: dict
) -> torch.Tensor:
    """The decoder's last hidden state for a causal-LM-style call (no KV cache).

    Keyword arguments meant for the LM head or for generation are dropped from ``kwargs``.
    """
    for key in _HEAD_OR_GENERATION_KWARGS:
        kwargs.pop(key, None)
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        **kwargs,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@contextlib.contextmanager
def internal_policy_forward(
    model: nn.Module,
    layer: int,
    final_norm: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Iterator[None]:
    """Make the model's own forward return pi^{layer+1} log-probs and entropies through the fused head.

    Inside the context, calling ``model(input_ids, attention_mask=None, position_ids=None,
    temperature=1.0, shift_labels=None, **kw)`` (the top-level module, possibly FSDP/PEFT wrapped)
    runs decoder layers ``0..layer`` only (:func:`~verl_ext.slicing.exit_after_layer`) and returns an
    :class:`InternalPolicyOutput` whose ``log_probs[..., t]`` is ``log pi^k(shift_labels[..., t])``
    (``shift_labels`` defaults to ``input_ids`` rolled left by one, as in verl's fused forward) and
    whose ``entropy`` is the entropy of ``softmax(g(H^{k+1} E_u^T) / temperature)`` (g: the head's
    fixed logit map, :func:`verl_ext.heads.head_spec`), both float32. This
    is the contract of verl's ``use_fused_kernels`` forward, so verl's engine reads the result
    unchanged. No [tokens x vocab] tensor is created.

    Args:
        model: the causal LM (the module verl's engine calls).
        layer: 0-based decoder index k (paper layer k+1).
        final_norm: apply the final norm to H^{k+1} (logit lens); False is the paper's pi^k.
        chunk_size: token rows per chunk of the fused head (None: the device's default).
        backend: fused-head backend (``auto`` uses verl's Triton kernel on CUDA).
    """
    decoder = find_decoder(model)
    spec = head_spec(unwrap_model(model))

    def forward(
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        temperature: float = 1.0,
        shift_labels=None,
        labels=None,
        return_dict=True,
        use_cache=False,
        **kwargs,
    ):
        if isinstance(temperature, torch.Tensor):
            raise ValueError("the internal-policy forward needs one scalar temperature per micro-batch")
        hidden = _decoder_hidden(decoder, input_ids, attention_mask, position_ids, kwargs)
        if shift_labels is None:
            source = labels if labels is not None else input_ids
            shift_labels = torch.roll(source, shifts=-1, dims=-1)
        log_probs, entropy = call_head(
            model,
            lambda h, w: fused_log_probs_entropy(
                h,
                w,
                shift_labels,
                temperature=float(temperature),
                chunk_size=chunk_size,
                backend=backend,
                logit_scale=spec.scale,
                softcap=spec.softcap,
            ),
            hidden,
        )
        return InternalPolicyOutput(log_probs=log_probs, entropy=entropy)

    with (
        exit_after_layer(model, layer, final_norm=final_norm),
        override_forward(unwrap_model(model), forward),
    ):
        yield


@contextlib.contextmanager
def policy_divergence_forward(
    model: nn.Module, layer: int, final_norm: bool = False, chunk_size: int | None = None
) -> Iterator[None]:
    """Make the model's forward return KL(pi^{layer+1} || pi) and the full policy's entropy per token.

    A diagnostic for phase 1: one full-depth forward, the raw output of ``model.layers[layer]``
    captured by a hook on the way, both heads evaluated chunk by chunk (no grad, no [tokens x vocab]).
    Inside the context ``model(input_ids, ..., temperature=T)`` returns an
    :class:`InternalPolicyOutput` whose ``log_probs`` field holds KL(pi^k || pi) and whose
    ``entropy`` field holds the full policy's entropy (verl's fused contract, so verl packs and
    unpads them like log-probs).

    Args:
        model: the causal LM (possibly wrapped).
        layer: 0-based decoder index k.
        final_norm: whether pi^k applies the final norm (as in training).
        chunk_size: token rows per chunk (None: the device's default).
    """
    from verl_ext.fused_head import fused_policy_divergence

    decoder = find_decoder(model)
    spec = head_spec(unwrap_model(model))
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    def forward(input_ids=None, attention_mask=None, position_ids=None, temperature=1.0, **kwargs):
        captured.clear()
        final = _decoder_hidden(decoder, input_ids, attention_mask, position_ids, kwargs)
        inner = captured[-1]
        if final_norm:
            inner = decoder.norm(inner)
        kl, _, ent_full = call_head(
            model,
            lambda h, w: fused_policy_divergence(
                inner,
                h,
                w,
                temperature=float(temperature),
                chunk_size=chunk_size,
                logit_scale=spec.scale,
                softcap=spec.softcap,
            ),
            final,
        )
        return InternalPolicyOutput(log_probs=kl, entropy=ent_full)

    handle = decoder.layers[layer].register_forward_hook(hook)
    try:
        with override_forward(unwrap_model(model), forward):
            yield
    finally:
        handle.remove()
