"""Internal policy entropies per layer and module (spec section 2) from one captured forward, as a tidy table.

Definitions (1-based paper layer l, E_u the LM head, H(p) = -sum_j p_j log p_j over the full
vocabulary, no temperature), per selected token:

* layer:  H_Layer^l = H(softmax(H^l E_u^T)),  baseline H_Layer^{l-1} (l = 1 uses the embedding H^0),
  delta dH_Layer^l, cosine cos(H^l - H^{l-1}, H^{l-1}) (the whole layer update vs its residual input).
* attn:   H(softmax(A^l E_u^T)), baseline H(softmax(LN_in^l(H^{l-1}) E_u^T)), delta dH_ATTN^l,
  cosine cos(A^l, H^{l-1}).
* ffn:    H(softmax(F^l E_u^T)), baseline H(softmax(LN_post^l(H^{l-1/2}) E_u^T)), delta dH_FFN^l,
  cosine cos(F^l, H^{l-1/2}) with H^{l-1/2} = H^{l-1} + A^l.

Norm conventions:

* ``raw`` (default, the paper): every stream goes to the head as is: H^l and the module outputs
  without any norm, the baselines normed only by their own layer norm (LN_in^l / LN_post^l).
* ``final_norm`` (logit lens): the head is replaced by ``E_u o norm_f`` (the model's final norm) for
  **every** stream, baselines included: H(softmax(norm_f(x) E_u^T)) for x in H^l, A^l, F^l,
  LN_in^l(H^{l-1}), LN_post^l(H^{l-1/2}). The RMS norm is scale invariant, so this compares
  directions under the final gain; the layer-norm baselines keep their own gain before norm_f.
  Cosines are always computed on the raw vectors.

Averaging: every number is a token-mean over the selected (response) tokens, pooled over all
sequences and batches (verl's token-mean), accumulated in float64. Each delta is the token-mean of
the per-token difference, which equals the difference of the two token-means because both are over
the same tokens; ``frac_positive`` is the fraction of tokens whose own difference is > 0.

Entropies go through :func:`verl_ext.fused_head.fused_log_probs_entropy` with ``labels=None``, one
stream at a time, so no tensor larger than ``chunk_size x vocab`` is ever held.
"""

from __future__ import annotations

import inspect
import math

import pandas as pd
import torch
from torch import nn

from verl_ext.analysis.capture import LayerCapture, check_supported
from verl_ext.fused_head import DEFAULT_CHUNK_SIZE, fused_log_probs_entropy
from verl_ext.internal_policy import lm_head_weight, position_ids_from_mask
from verl_ext.slicing import unwrap_model

MODULES: tuple[str, ...] = ("layer", "attn", "ffn")
CONVENTIONS: tuple[str, ...] = ("raw", "final_norm")
COLUMNS: list[str] = [
    "layer",
    "layer_index",
    "module",
    "entropy",
    "baseline_entropy",
    "delta",
    "frac_positive",
    "cosine",
    "n_tokens",
    "convention",
]
_STATS = ("entropy", "baseline", "delta", "positive", "cosine")


def _no_autocast(t: torch.Tensor):
    """Disable autocast (e.g. the actor's bf16 autocast) so the head and cosines keep their dtypes."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = torch.promote_types(torch.float32, a.dtype)
    with _no_autocast(a):
        return torch.nn.functional.cosine_similarity(a.to(dtype), b.to(dtype), dim=-1, eps=1e-12)


class ProfileAccumulator:
    """Consumes captured streams (a :class:`LayerCapture` sink) and accumulates token-mean statistics.

    Streams must arrive in forward order (``hidden`` 0, then per layer l = 1..L: ``attn_in``,
    ``attn``, ``ffn_in``, ``ffn``, ``hidden`` l), as a streaming capture or
    :meth:`LayerCapture.replay` delivers them. Several forwards (batches) can be fed in sequence;
    statistics are pooled over all their tokens.

    Args:
        n_layers: L, the number of decoder layers.
        head_weight: the full LM head E_u ``[V, H]``.
        final_norm: None for the ``raw`` convention, else the model's final norm module (applied to
            every stream before the head: ``final_norm`` convention, see the module docstring).
        chunk_size: token rows per chunk of the fused head.
        backend: fused-head backend (``auto``, ``chunked``, ``triton``).
    """

    def __init__(
        self,
        n_layers: int,
        head_weight: torch.Tensor,
        final_norm: nn.Module | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        backend: str = "auto",
    ):
        self.n_layers = int(n_layers)
        self.head_weight = head_weight
        self.final_norm = final_norm
        self.chunk_size = int(chunk_size)
        self.backend = backend
        self.convention = "raw" if final_norm is None else "final_norm"
        # sums[module] : float64 [L, len(_STATS)], counts[module]: int [L]
        self._sums = {m: torch.zeros(self.n_layers, len(_STATS), dtype=torch.float64) for m in MODULES}
        self._counts = {m: torch.zeros(self.n_layers, dtype=torch.long) for m in MODULES}
        self._embed_sum = 0.0
        self._embed_count = 0
        self._state: dict[str, torch.Tensor] = {}
        self._wide_weight: torch.Tensor | None = None

    # -- per-stream work --------------------------------------------------------------------------
    @torch.no_grad()
    def entropy(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row entropy (nats) of softmax(x E_u^T), x = rows or norm_f(rows); float32 (float64 in).

        Rows and weight are brought to the wider of their two dtypes and autocast is disabled, so an
        fp32 head is never rounded and bf16 rows are accumulated in fp32 (as the fused head does).
        """
        if rows.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32, device=rows.device)
        x = self.final_norm(rows) if self.final_norm is not None else rows
        w = self.head_weight
        if x.device != w.device:
            x = x.to(w.device)
        if x.dtype != w.dtype:  # one dtype for both (the Triton kernel needs it); never round down the rows
            wide = torch.promote_types(x.dtype, w.dtype)
            if w.dtype != wide:
                if self._wide_weight is None or self._wide_weight.dtype != wide:
                    self._wide_weight = w.to(wide)
                w = self._wide_weight
            x = x.to(wide)
        with _no_autocast(x):  # under autocast the chunked head's matmul would round the logits to bf16
            _, ent = fused_log_probs_entropy(x, w, None, chunk_size=self.chunk_size, backend=self.backend)
        return ent

    def _record(self, module: str, l: int, ent, base, cos) -> None:  # noqa: E741
        d = ent.double() - base.double()
        stats = torch.stack(
            [ent.double().sum(), base.double().sum(), d.sum(), (d > 0).double().sum(), cos.double().sum()]
        )
        if self._sums[module].device != stats.device:  # keep the sums where the entropies are (no sync)
            self._sums[module] = self._sums[module].to(stats.device)
        self._sums[module][l - 1] += stats
        self._counts[module][l - 1] += ent.shape[0]

    @torch.no_grad()
    def __call__(self, stream: str, l: int, rows: torch.Tensor) -> None:  # noqa: E741
        """Sink interface: consume stream ``stream`` of paper layer ``l`` (rows ``[n, H]``)."""
        st = self._state
        if stream == "hidden" and l == 0:
            st.clear()
            ent = self.entropy(rows)
            self._embed_sum += float(ent.double().sum())
            self._embed_count += int(ent.shape[0])
            st["h"], st["h_ent"] = rows, ent
            return
        if "h" not in st:
            raise RuntimeError(f"stream {stream} of layer {l} arrived before the embedding H^0")
        if rows.shape[0] != st["h"].shape[0]:
            raise RuntimeError(
                f"stream {stream} of layer {l} has {rows.shape[0]} rows, expected {st['h'].shape[0]}"
            )
        if stream in ("attn_in", "ffn_in"):
            st[stream + "_ent"] = self.entropy(rows)
        elif stream == "attn":
            self._record("attn", l, self.entropy(rows), st.pop("attn_in_ent"), _cosine(rows, st["h"]))
            st["a"] = rows
        elif stream == "ffn":
            mid = st["h"].to(torch.promote_types(torch.float32, rows.dtype)) + st.pop("a")
            self._record("ffn", l, self.entropy(rows), st.pop("ffn_in_ent"), _cosine(rows, mid))
        elif stream == "hidden":
            ent = self.entropy(rows)
            prev = st["h"]
            update = rows.to(torch.promote_types(torch.float32, rows.dtype)) - prev
            self._record("layer", l, ent, st["h_ent"], _cosine(update, prev))
            st["h"], st["h_ent"] = rows, ent
            if l == self.n_layers:
                st.clear()
        else:
            raise ValueError(f"unknown stream {stream!r}")

    # -- results ------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Number of selected tokens consumed so far."""
        return self._embed_count

    @property
    def embedding_entropy(self) -> float:
        """Token-mean entropy of the embedding policy softmax(H^0 E_u^T) (the baseline of layer 1)."""
        return self._embed_sum / self._embed_count if self._embed_count else math.nan

    def table(self) -> pd.DataFrame:
        """Tidy table: one row per (module, layer), columns :data:`COLUMNS`.

        ``layer`` is the 1-based paper index l, ``layer_index`` the 0-based decoder index k = l - 1,
        ``module`` one of ``layer``, ``attn``, ``ffn``; ``convention`` is ``raw`` or ``final_norm``.
        Means over zero tokens are NaN.
        """
        rows = []
        for m in MODULES:
            sums, counts = self._sums[m].cpu(), self._counts[m]
            for k in range(self.n_layers):
                n = int(counts[k])
                mean = (sums[k] / n).tolist() if n else [math.nan] * len(_STATS)
                rows.append(
                    dict(
                        layer=k + 1,
                        layer_index=k,
                        module=m,
                        entropy=mean[0],
                        baseline_entropy=mean[1],
                        delta=mean[2],
                        frac_positive=mean[3],
                        cosine=mean[4],
                        n_tokens=n,
                        convention=self.convention,
                    )
                )
        df = pd.DataFrame(rows, columns=COLUMNS)
        df.attrs["embedding_entropy"] = self.embedding_entropy
        df.attrs["convention"] = self.convention
        return df

    def metrics(self, prefix: str = "bupo") -> dict[str, float]:
        """Flat metrics ``{prefix}/layer_entropy/<l>``, ``attn_entropy``, ``ffn_entropy``, ``delta_attn``,
        ``delta_ffn`` (l 1-based paper index); empty when no token was consumed."""
        if not self.n_tokens:
            return {}
        out: dict[str, float] = {}
        names = {
            "layer": [("layer_entropy", 0)],
            "attn": [("attn_entropy", 0), ("delta_attn", 2)],
            "ffn": [("ffn_entropy", 0), ("delta_ffn", 2)],
        }
        for m, items in names.items():
            means = (self._sums[m].cpu() / self._counts[m].clamp(min=1).unsqueeze(-1).double()).tolist()
            for name, col in items:
                for k in range(self.n_layers):
                    out[f"{prefix}/{name}/{k + 1}"] = float(means[k][col])
        return out


def full_head_weight(model: nn.Module) -> torch.Tensor:
    """The model's LM head E_u ``[V, H]``, detached; an FSDP2 (DTensor) weight is all-gathered.

    Gathering is a collective: under FSDP2 every rank must call this (as it must run the forward).
    FSDP1 keeps flat, sharded parameters outside its forward: pass ``head_weight`` explicitly there
    (e.g. gathered under ``summon_full_params``).
    """
    w = lm_head_weight(model).detach()
    if hasattr(w, "full_tensor"):  # torch.distributed.tensor.DTensor
        w = w.full_tensor()
    return w


def subsample_mask(token_mask: torch.Tensor, max_tokens: int | None, seed: int = 0) -> torch.Tensor:
    """Keep at most ``max_tokens`` of the True entries of ``token_mask``, chosen uniformly at random
    (a fixed ``seed``, so every call with the same mask keeps the same tokens)."""
    if max_tokens is None:
        return token_mask
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    flat = token_mask.reshape(-1).bool()
    idx = flat.nonzero().squeeze(-1)
    if idx.numel() <= max_tokens:
        return token_mask.bool()
    g = torch.Generator().manual_seed(seed)
    keep = idx[torch.randperm(idx.numel(), generator=g)[:max_tokens].to(idx.device)]
    out = torch.zeros_like(flat)
    out[keep] = True
    return out.reshape(token_mask.shape)


def _forward_kwargs(model: nn.Module, attention_mask, position_ids, extra: dict | None) -> dict:
    kwargs: dict = dict(use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
        kwargs["position_ids"] = (
            position_ids if position_ids is not None else position_ids_from_mask(attention_mask)
        )
    elif position_ids is not None:
        kwargs["position_ids"] = position_ids
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "logits_to_keep" in params:  # the analysis never needs the final [B, T, V] logits
        kwargs["logits_to_keep"] = 1
    kwargs.update(extra or {})
    return kwargs


@torch.no_grad()
def profile_batch(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    *,
    position_ids: torch.Tensor | None = None,
    final_norm: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    head_weight: torch.Tensor | None = None,
    accumulator: ProfileAccumulator | None = None,
    forward_kwargs: dict | None = None,
) -> ProfileAccumulator:
    """One forward of ``model`` with streaming capture; entropies are computed inside the hooks.

    Nothing of size O(L x tokens x H) is kept: each stream's selected rows are turned into per-token
    entropies (and cosines) as soon as they exist, and only the residual stream H^{l-1} and A^l of
    the current layer are held.

    Args:
        model: Qwen2 / Qwen3 / Llama causal LM, possibly wrapped (FSDP1/2, PEFT); its top-level forward
            runs once, with ``logits_to_keep=1`` when supported.
        input_ids: ``[B, T]`` token ids (left or right padding).
        attention_mask: ``[B, T]``, 0 at padding; position ids are derived from it unless given.
        token_mask: ``[B, T]`` bool, the rows to analyse (see :func:`.capture.prediction_mask` and
            :func:`.capture.response_token_mask`); None = every row with ``attention_mask`` 1.
        position_ids: explicit position ids (default: from ``attention_mask``).
        final_norm: False = ``raw`` convention (paper), True = ``final_norm`` (logit lens).
        chunk_size: token rows per chunk of the fused head.
        backend: fused-head backend.
        head_weight: the full LM head ``[V, H]``; default the model's (pass a gathered copy when the
            weight is sharded outside the forward, e.g. FSDP2).
        accumulator: accumulate into this one (several batches); a new one by default.
        forward_kwargs: extra keyword arguments for the top-level forward.

    Returns:
        The accumulator (call ``.table()`` or ``.metrics()``).
    """
    decoder = check_supported(model)
    if token_mask is None and attention_mask is not None:
        token_mask = attention_mask.bool()
    if accumulator is None:
        accumulator = ProfileAccumulator(
            len(decoder.layers),
            head_weight if head_weight is not None else full_head_weight(model),
            final_norm=decoder.norm if final_norm else None,
            chunk_size=chunk_size,
            backend=backend,
        )
    kwargs = _forward_kwargs(model, attention_mask, position_ids, forward_kwargs)
    with LayerCapture(model, token_mask, sink=accumulator) as cap:
        model(input_ids=input_ids, **kwargs)
    cap.check_complete()
    return accumulator


def entropy_profile(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    token_mask: torch.Tensor | None = None,
    **kwargs,
) -> pd.DataFrame:
    """The tidy entropy table of one batch (see :func:`profile_batch` for the arguments)."""
    return profile_batch(model, input_ids, attention_mask, token_mask, **kwargs).table()


@torch.no_grad()
def decompose_capture(
    capture: LayerCapture,
    head_weight: torch.Tensor,
    *,
    final_norm: nn.Module | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> pd.DataFrame:
    """The tidy entropy table from a stored (non-streaming) :class:`LayerCapture`.

    Args:
        capture: a capture that ran one forward without a sink.
        head_weight: LM head ``[V, H]``.
        final_norm: None (``raw``) or the final norm module (``final_norm`` convention); it is called
            outside the forward here, so its weight must be a plain (unsharded) tensor.
        chunk_size: token rows per chunk of the fused head.
        backend: fused-head backend.
    """
    acc = ProfileAccumulator(capture.n_layers, head_weight, final_norm, chunk_size, backend)
    capture.replay(acc)
    return acc.table()


def layer_entropy_profile(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    token_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    final_norm: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    head_weight: torch.Tensor | None = None,
    backend: str = "auto",
    prefix: str = "bupo",
    forward_kwargs: dict | None = None,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """Per-layer internal policy entropy metrics for training telemetry (one no-grad forward).

    Runs the model's top-level forward once under ``torch.no_grad()`` with streaming capture hooks
    (no extra rollout, no ``output_hidden_states``, no [tokens x vocab] tensor beyond one chunk) and
    returns token-means over the rows selected by ``token_mask``.

    Args:
        model: the actor (Qwen2 / Qwen3 / Llama, possibly FSDP/PEFT-wrapped). Every rank that shares
            FSDP shards must call this together (it is a forward).
        input_ids: ``[B, T]`` ids, e.g. verl's ``input_ids`` (prompt | response) of a sub-sample.
        attention_mask: ``[B, T]`` (0 at padding), or None.
        token_mask: ``[B, T]`` bool, the rows to average over; for verl's layout use
            ``response_token_mask(response_mask, T)`` (rows that predict response tokens).
        position_ids: default derived from ``attention_mask``.
        final_norm: False = paper convention (raw streams); True = logit lens.
        chunk_size: token rows per fused-head chunk.
        head_weight: full LM head ``[V, H]``; default the model's, all-gathered when it is an FSDP2
            DTensor (see :func:`full_head_weight`); pass it under FSDP1.
        backend: fused-head backend.
        prefix: metric name prefix.
        forward_kwargs: extra keyword arguments for the top-level forward.
        max_tokens: average over at most this many of the selected rows (a fixed random subset,
            :func:`subsample_mask`); the forward still runs over the whole batch given.

    Cost: one no-grad forward over ``input_ids`` plus 5L+1 head projections of the selected rows,
    about ``(5L + 1) * 2 * H * V`` FLOPs per selected token (for Qwen3-4B about 18 forward passes'
    worth per token): size the sub-sample (``max_tokens``) to the step.

    Returns:
        ``{f"{prefix}/layer_entropy/<l>", f"{prefix}/attn_entropy/<l>", f"{prefix}/ffn_entropy/<l>",
        f"{prefix}/delta_attn/<l>", f"{prefix}/delta_ffn/<l>"}`` for l = 1..L (1-based paper index,
        decoder module ``layers[l-1]``), floats in nats; empty if ``token_mask`` selects nothing.
    """
    acc = profile_batch(
        model,
        input_ids,
        attention_mask,
        subsample_mask(token_mask, max_tokens),
        position_ids=position_ids,
        final_norm=final_norm,
        chunk_size=chunk_size,
        backend=backend,
        head_weight=head_weight,
        forward_kwargs=forward_kwargs,
    )
    return acc.metrics(prefix)
