"""Run a decoder-only model's own forward through layers 0..k only (the internal-policy forward).

Convention: ``layer`` is the **0-based** decoder index k (paper layer k+1). Under
:func:`exit_after_layer` the decoder's output (``last_hidden_state``, and so whatever head the
model applies to it) is the raw residual stream H^{k+1} after ``model.layers[k]`` -- **no final
norm** unless ``final_norm=True`` (the "logit lens").

It works by setting ``config.num_hidden_layers = k + 1`` on the decoder for the duration of the
context: most decoders in transformers 5.x (Qwen2/3, Llama, Mistral, Gemma2/3, the MoE ones; the
verified list is :mod:`verl_ext.architectures`) loop over ``self.layers[: num_hidden_layers]``,
so everything around the forward (padding removal, sequence parallel, a fused or plain LM head,
temperature, FSDP hooks) stays untouched. :func:`check_slicing` verifies on a tiny input that an
architecture really slices and that its head is the one pi^k reproduces (:mod:`verl_ext.heads`),
and is run at start-up by the verl integration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from verl_ext.architectures import verified_names
from verl_ext.heads import HEAD_RULES, head_spec

_ACTIVE_ATTR = "_bupo_exit_after_layer_active"
_SUPPORTED = f"verified architectures (transformers 5.x): {verified_names()}"


class SlicingError(RuntimeError):
    """The model's forward does not honour the layer slice (unsupported architecture)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip FSDP1 / DDP / PEFT / torch.compile wrappers and return the causal LM inside.

    FSDP2 (``fully_shard``) does not wrap: the module is its own root and is returned as is.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "_fsdp_wrapped_module"):  # FSDP1
            model = model._fsdp_wrapped_module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif type(model).__name__ == "DistributedDataParallel":
            model = model.module
        elif hasattr(model, "get_base_model") and hasattr(model, "peft_config"):  # PEFT
            model = model.get_base_model()
        else:
            break
    return model


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with ``.layers``, ``.norm`` and ``.config``) of a causal LM.

    Raises:
        SlicingError: when no such module can be found.
    """
    inner = unwrap_model(model)
    candidates = []
    if hasattr(inner, "get_decoder"):
        with contextlib.suppress(Exception):
            candidates.append(inner.get_decoder())
    candidates += [getattr(inner, "model", None), inner]
    for cand in candidates:
        cand = unwrap_model(cand) if cand is not None else None
        if (
            cand is not None
            and isinstance(getattr(cand, "layers", None), nn.ModuleList)
            and isinstance(getattr(cand, "norm", None), nn.Module)
            and hasattr(getattr(cand, "config", None), "num_hidden_layers")
        ):
            return cand
    raise SlicingError(
        f"cannot find a decoder stack (.layers, .norm, .config.num_hidden_layers) in {type(inner).__name__}; "
        f"{_SUPPORTED}"
    )


def num_layers(model: nn.Module) -> int:
    """Number of decoder layers L of the model (the length of ``decoder.layers``)."""
    return len(find_decoder(model).layers)


def validate_layer(layer: int, n_layers: int, name: str = "layer") -> int:
    """Check a 0-based decoder index against the model's depth and return it.

    Raises:
        ValueError: naming the valid range when ``layer`` is outside ``[0, n_layers - 1]``.
    """
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{name} must be an int (0-based decoder index), got {layer!r}")
    if not 0 <= layer < n_layers:
        raise ValueError(
            f"{name}={layer} is outside the model's range: it is a 0-based decoder index, valid values "
            f"are 0..{n_layers - 1} for this {n_layers}-layer model (paper layer = {name} + 1)"
        )
    return layer


@contextlib.contextmanager
def override_forward(module: nn.Module, forward) -> Iterator[None]:
    """Set ``module.forward`` on this instance only, restoring whatever was there on exit."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


def _identity(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return hidden_states


@contextlib.contextmanager
def exit_after_layer(model: nn.Module, layer: int, final_norm: bool = False) -> Iterator[nn.Module]:
    """Run only decoder layers ``0..layer`` in the model's own forward, for the duration of the context.

    Args:
        model: a Hugging Face causal LM, possibly wrapped by FSDP1, FSDP2, DDP or PEFT.
        layer: 0-based index k of the last decoder layer to run (paper layer k+1).
        final_norm: if False (the paper's internal policy), the decoder returns the raw residual
            stream H^{k+1}; if True, the final norm is applied to it (logit lens).

    Yields:
        The decoder module that was sliced.

    Raises:
        ValueError: ``layer`` outside ``0..L-1``.
        RuntimeError: the context is already active on this model (nesting is refused).
    """
    decoder = find_decoder(model)
    n_layers = len(decoder.layers)
    validate_layer(layer, n_layers)
    if getattr(decoder, _ACTIVE_ATTR, False):
        raise RuntimeError("exit_after_layer is already active on this model; nesting is not supported")
    config = decoder.config
    saved_n = config.num_hidden_layers
    setattr(decoder, _ACTIVE_ATTR, True)
    try:
        config.num_hidden_layers = layer + 1
        with override_forward(decoder.norm, _identity) if not final_norm else contextlib.nullcontext():
            yield decoder
    finally:
        config.num_hidden_layers = saved_n
        setattr(decoder, _ACTIVE_ATTR, False)


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def check_slicing(
    model: nn.Module,
    layers: list[int] | None = None,
    atol: float | None = None,
    forward_kwargs: dict | None = None,
) -> None:
    """Self-test that the model's forward really slices; raise :class:`SlicingError` otherwise.

    Runs the model's own top-level forward on a tiny input, once at full depth and once under
    :func:`exit_after_layer` for each layer checked, and compares what the decoder returns with the
    output of ``model.layers[k]`` in the full run (that is ``hidden_states[k+1]`` for k < L-1), with
    and without the final norm, and checks that no layer above k ran. In the full run it also checks
    the head: the LM head module sees the final norm's output and the model's logits are
    :func:`verl_ext.heads.head_spec` applied to what the head module returns (so pi^k, the same
    head on H^{k+1}, is what the model's head would make of it). Safe under FSDP (every rank must
    call it, as every rank runs the same forwards).

    Args:
        model: the (possibly wrapped) causal LM.
        layers: 0-based layers to check; default: the first, a middle one and L-1.
        atol: tolerance; default 1e-4 for float32 parameters and 5e-2 otherwise (bf16 noise).
        forward_kwargs: extra keyword arguments for the top-level forward.
    """
    decoder = find_decoder(model)
    n = len(decoder.layers)
    layers = sorted({0, n // 2, n - 1}) if layers is None else layers
    param = next(decoder.parameters())
    dtype = getattr(param, "dtype", torch.float32)
    atol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 5e-2)
    vocab = getattr(decoder.config, "vocab_size", 8) or 8
    input_ids = (torch.arange(5, device=_device_of(decoder)) % max(vocab - 1, 1) + 1).unsqueeze(0)
    kwargs = dict(use_cache=False)
    kwargs.update(forward_kwargs or {})

    layer_out: dict[int, torch.Tensor] = {}
    calls = [0] * n
    seen: dict[str, torch.Tensor] = {}

    def layer_hook(idx):
        def hook(module, args, output):
            calls[idx] += 1
            layer_out[idx] = _first(output).detach().float().clone()

        return hook

    def decoder_hook(module, args, output):
        hidden = getattr(output, "last_hidden_state", None)
        seen["decoder_out"] = (hidden if hidden is not None else _first(output)).detach().float().clone()

    def norm_hook(module, args, output):
        seen["norm_in"] = _first(args).detach().float().clone()
        seen["norm_out"] = _first(output).detach().float().clone()

    handles = [lay.register_forward_hook(layer_hook(i)) for i, lay in enumerate(decoder.layers)]
    handles.append(decoder.register_forward_hook(decoder_hook))
    handles.append(decoder.norm.register_forward_hook(norm_hook))
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if isinstance(head, nn.Module):

        def head_hook(module, args, output):
            seen["head_in"] = _first(args).detach().float().clone()
            seen["head_out"] = _first(output).detach().float().clone()

        handles.append(head.register_forward_hook(head_hook))
    name = type(inner).__name__
    try:
        out = model(input_ids=input_ids, **kwargs)
        full = dict(layer_out)
        if len(full) != n:
            raise SlicingError(f"only {len(full)} of {n} decoder layers ran in a full forward of {name}")
        full_seen = dict(seen)
        for k in layers:
            for final_norm in (False, True):
                calls[:] = [0] * n
                seen.clear()
                with exit_after_layer(model, k, final_norm=final_norm):
                    model(input_ids=input_ids, **kwargs)
                ran_above = [i for i in range(k + 1, n) if calls[i]]
                if ran_above or "decoder_out" not in seen:
                    raise SlicingError(
                        f"{name}'s forward ignores config.num_hidden_layers: layers {ran_above} ran with "
                        f"layer={k}. This architecture cannot be sliced; {_SUPPORTED}."
                    )
                got = seen["decoder_out"]
                # Raw: the decoder returns layer k's output. Normed: the final norm saw layer k's output
                # and the decoder returns what the norm made of it.
                checks = [(got, full[k])]
                if final_norm:
                    checks = [(seen.get("norm_in", got), full[k]), (got, seen.get("norm_out", full[k]))]
                for a, b in checks:
                    err = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
                    if err > atol:
                        raise SlicingError(
                            f"{name}: sliced forward at layer={k} (final_norm={final_norm}) differs from the "
                            f"full model's layer output by {err:.3g} (> {atol}); it does not slice cleanly"
                        )
        _check_head(name, inner, getattr(out, "logits", None), full_seen, atol)
    finally:
        for h in handles:
            h.remove()


def _check_head(name: str, model: nn.Module, logits, seen: dict, atol: float) -> None:
    """The head check of :func:`check_slicing` (skipped when the forward returns no logits)."""
    if logits is None or "head_out" not in seen or "norm_out" not in seen:
        return
    spec = head_spec(model)
    want = spec.apply(seen["head_out"])
    logits = logits.detach().float()
    for what, a, b in (
        ("the LM head's input is not the final norm's output", seen["head_in"], seen["norm_out"]),
        ("the logits are not the LM head's output mapped by " + repr(spec), logits, want),
    ):
        scale = max(1.0, b.abs().max().item())  # bf16 values are off by a relative 1e-2
        err = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
        if err > atol * scale:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise SlicingError(
                f"{name} ({model_type}): {what} (max difference {err:.3g}). Its head does something "
                f"pi^k would not reproduce on H^(k+1); known head maps: {sorted(HEAD_RULES)}. {_SUPPORTED}."
            )


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
