"""One-forward capture of every layer's residual stream, module outputs and normed module inputs (hooks).

Index convention: streams are keyed by the **1-based paper layer** l (``l = k + 1`` for decoder module
``model.layers[k]``); the residual stream ``hidden`` also has l = 0, the embedding output H^0.

For layer l the forward hooks record, for the selected token rows only (a boolean ``token_mask``
given up front, e.g. the positions that predict response tokens):

============  ==========================================  ==========================================
stream        tensor                                      hook
============  ==========================================  ==========================================
``hidden``    H^l, raw residual stream, **no final norm**  output of ``layers[k]`` (l >= 1); input of
                                                          ``layers[0].input_layernorm`` (l = 0)
``attn_in``   LN_in^l(H^{l-1})                            output of ``layers[k].input_layernorm``
``attn``      A^l                                         ``output[0]`` of ``layers[k].self_attn``
``ffn_in``    LN_post^l(H^{l-1/2})                        output of ``layers[k].post_attention_layernorm``
``ffn``       F^l                                         output of ``layers[k].mlp``
============  ==========================================  ==========================================

H^0 is taken as the input of the first layer's ``input_layernorm``, which is the output of
``embed_tokens`` for Qwen2/Qwen3/Llama and also works when the caller passes ``inputs_embeds``.
Only submodules of :func:`verl_ext.slicing.find_decoder` are hooked, so FSDP1/FSDP2/PEFT wrappers are
fine: the model's own top-level forward runs (with its FSDP hooks) and the hooks only read outputs.
Rows are stored detached in the model's dtype, so memory is O(L x selected tokens x H); with a
``sink`` nothing is stored and every stream is handed over as soon as it exists (streaming).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from verl_ext.slicing import SlicingError, find_decoder, unwrap_model

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("qwen2", "qwen3", "llama")
"""``config.model_type`` values whose module names and outputs were checked (transformers 5.x)."""

STREAMS: tuple[str, ...] = ("hidden", "attn_in", "attn", "ffn_in", "ffn")
"""Captured stream names, in the order they appear within a layer (``hidden`` last, it is H^l)."""

_SUBMODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

Sink = Callable[[str, int, torch.Tensor], None]
"""``sink(stream, l, rows)``: receives each captured stream (1-based paper layer l) during the forward."""


def check_supported(model: nn.Module) -> nn.Module:
    """Check that the analysis supports the model's architecture and return its decoder stack.

    Raises:
        ValueError: naming the architecture and the supported ones (Qwen2, Qwen3, Llama), when
            ``config.model_type`` is not supported or the decoder layers lack the expected submodules.
    """
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = f"{type(inner).__name__} (model_type={model_type!r})"
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {arch} for the entropy analysis; supported: {supported}")
    try:
        decoder = find_decoder(model)
    except SlicingError as e:
        raise ValueError(f"unsupported architecture {arch}: {e}; supported: {supported}") from e
    for k, layer in enumerate(decoder.layers):
        missing = [name for name in _SUBMODULES if not isinstance(getattr(layer, name, None), nn.Module)]
        if missing:
            raise ValueError(
                f"unsupported architecture {arch}: decoder layer {k} has no {missing}; supported: {supported}"
            )
    return decoder


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


class LayerCapture:
    """Forward hooks that capture H^l, A^l, F^l and the normed module inputs of every layer in one pass.

    Use as a context manager around **one** forward of the model (its top-level forward, so that
    FSDP/PEFT wrappers do their work)::

        with LayerCapture(model, token_mask) as cap:
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        h3 = cap.hidden(3)  # H^3, [n_selected, H]

    Index convention: ``l`` is the 1-based paper layer (decoder module ``layers[l-1]``); ``hidden(0)``
    is the embedding output H^0. No norm convention applies here: everything is stored raw (module
    outputs as the model computes them); the final norm is a matter of :mod:`.decompose`.

    Args:
        model: a Qwen2 / Qwen3 / Llama causal LM, possibly wrapped (FSDP1/2, DDP, PEFT).
        token_mask: boolean mask over the leading dims of the hidden states (``[B, T]`` for a padded
            batch, ``[1, nnz]`` for a packed one); only rows where it is True are kept. ``None`` keeps
            every row.
        sink: if given, nothing is stored: ``sink(stream, l, rows)`` is called from the hooks as soon as
            a stream exists (streams of layer l arrive in the order ``attn_in, attn, ffn_in, ffn,
            hidden``, after ``hidden(l-1)``).

    Raises:
        ValueError: unsupported architecture (see :func:`check_supported`), or (during the forward) a
            ``token_mask`` whose shape does not match the hidden states.
    """

    def __init__(self, model: nn.Module, token_mask: torch.Tensor | None = None, sink: Sink | None = None):
        self.decoder = check_supported(model)
        self.n_layers = len(self.decoder.layers)
        self.token_mask = token_mask.bool() if token_mask is not None else None
        self._sink = sink
        self.streams: dict[tuple[str, int], torch.Tensor] = {}
        self.calls = [0] * self.n_layers
        self._handles: list = []

    # -- context management --------------------------------------------------------------------------
    def __enter__(self) -> LayerCapture:
        if self._handles:
            raise RuntimeError("LayerCapture is already active")
        self.streams.clear()
        self.calls = [0] * self.n_layers
        for k, layer in enumerate(self.decoder.layers):
            l = k + 1  # noqa: E741 (paper index)
            if k == 0:
                self._handles.append(
                    layer.input_layernorm.register_forward_hook(self._hook("hidden", 0, use_input=True))
                )
            self._handles.append(layer.input_layernorm.register_forward_hook(self._hook("attn_in", l)))
            self._handles.append(layer.self_attn.register_forward_hook(self._hook("attn", l)))
            self._handles.append(
                layer.post_attention_layernorm.register_forward_hook(self._hook("ffn_in", l))
            )
            self._handles.append(layer.mlp.register_forward_hook(self._hook("ffn", l)))
            self._handles.append(layer.register_forward_hook(self._hook("hidden", l, count=k)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, stream: str, l: int, use_input: bool = False, count: int | None = None):  # noqa: E741
        def hook(module, args, output):
            if count is not None:
                self.calls[count] += 1
            t = _first(args) if use_input else _first(output)
            self._emit(stream, l, t)

        return hook

    def _select(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.token_mask is None:
            return t.reshape(-1, t.shape[-1]).clone()
        mask = self.token_mask
        if tuple(mask.shape) != tuple(t.shape[:-1]):
            raise ValueError(
                f"token_mask has shape {tuple(mask.shape)} but the hidden states are {tuple(t.shape)}: it must "
                "cover their leading dims (e.g. [batch, seq])"
            )
        return t[mask.to(t.device)]

    def _emit(self, stream: str, l: int, t: torch.Tensor) -> None:  # noqa: E741
        rows = self._select(t)
        if self._sink is not None:
            self._sink(stream, l, rows)
        else:
            self.streams[(stream, l)] = rows

    # -- accessors (1-based paper index l) ---------------------------------------------------------
    def _get(self, stream: str, l: int) -> torch.Tensor:  # noqa: E741
        lo = 0 if stream == "hidden" else 1
        if not lo <= l <= self.n_layers:
            raise ValueError(
                f"layer l={l} out of range {lo}..{self.n_layers} (1-based paper index) for {stream}"
            )
        if self._sink is not None:
            raise RuntimeError("this capture streams to a sink and stores nothing")
        try:
            return self.streams[(stream, l)]
        except KeyError:
            raise RuntimeError(
                f"{stream} of layer {l} was not captured: did the forward run inside the context?"
            ) from None

    def hidden(self, l: int) -> torch.Tensor:  # noqa: E741
        """H^l (raw, no final norm) for l = 0..L; H^0 is the embedding output. Shape ``[n, H]``."""
        return self._get("hidden", l)

    def attn_input(self, l: int) -> torch.Tensor:  # noqa: E741
        """LN_in^l(H^{l-1}), the normed input of layer l's attention (l = 1..L)."""
        return self._get("attn_in", l)

    def attn(self, l: int) -> torch.Tensor:  # noqa: E741
        """A^l, the raw attention output of layer l (l = 1..L)."""
        return self._get("attn", l)

    def ffn_input(self, l: int) -> torch.Tensor:  # noqa: E741
        """LN_post^l(H^{l-1/2}), the normed input of layer l's FFN (l = 1..L)."""
        return self._get("ffn_in", l)

    def ffn(self, l: int) -> torch.Tensor:  # noqa: E741
        """F^l, the raw FFN (MLP) output of layer l (l = 1..L)."""
        return self._get("ffn", l)

    def check_complete(self) -> None:
        """Raise RuntimeError unless every decoder layer ran exactly once inside the context."""
        bad = [k for k, c in enumerate(self.calls) if c != 1]
        if bad:
            raise RuntimeError(
                f"decoder layers (0-based) {bad} ran {[self.calls[k] for k in bad]} times in the captured "
                "forward; exactly one full forward is expected (is a layer slice active?)"
            )

    def replay(self, sink: Sink) -> None:
        """Feed the stored streams to ``sink`` in forward order (as a streaming capture would have)."""
        sink("hidden", 0, self.hidden(0))
        for l in range(1, self.n_layers + 1):  # noqa: E741
            for stream in ("attn_in", "attn", "ffn_in", "ffn", "hidden"):
                sink(stream, l, self._get(stream, l))


@contextlib.contextmanager
def capture_layers(
    model: nn.Module, token_mask: torch.Tensor | None = None, sink: Sink | None = None
) -> Iterator[LayerCapture]:
    """Context-manager function form of :class:`LayerCapture` (same arguments)."""
    with LayerCapture(model, token_mask, sink) as cap:
        yield cap


def prediction_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """Rows whose next-token distribution generates a response token, from a full-sequence response mask.

    ``response_mask[b, t]`` is True where token t is a response token; the returned mask is True at
    t when token t+1 is one (the row that predicts it: the last prompt token up to the second-to-last
    response token), which is how verl scores response tokens (log-probs and entropy of
    pi(o_t | q, o_<t)).
    """
    out = torch.zeros_like(response_mask, dtype=torch.bool)
    out[..., :-1] = response_mask[..., 1:].bool()
    return out


def response_token_mask(response_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Row mask ``[B, seq_len]`` for verl's layout ``input_ids = [prompt (left-padded) | response]``.

    Args:
        response_mask: verl's ``[B, R]`` response mask (1 for generated tokens, 0 for padding after EOS).
        seq_len: total sequence length P + R of ``input_ids``.

    Returns:
        Bool ``[B, seq_len]``, True at the rows P-1 .. P+R-2 that predict the valid response tokens
        (same rows as verl's ``logits[:, -R-1:-1]``).
    """
    b, r = response_mask.shape
    if r >= seq_len:
        raise ValueError(f"response length {r} must be shorter than the sequence length {seq_len}")
    out = torch.zeros(b, seq_len, dtype=torch.bool, device=response_mask.device)
    out[:, seq_len - r - 1 : seq_len - 1] = response_mask.bool()
    return out
