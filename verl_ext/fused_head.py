"""Fused LM head: next-token log-probs and entropies from hidden states, never holding [tokens x vocab].

``fused_log_probs_entropy(hidden, weight, labels)`` computes, for every token row h,
``log softmax(z / T)[label]`` and the entropy of ``softmax(z / T)`` with ``z = h W^T`` (or the
model's fixed logit map of it, ``softcap(scale * h W^T)``, see :mod:`verl_ext.heads`), with float32
(or wider) accumulation and float32 outputs, differentiable with respect to ``hidden`` and
``weight`` through both outputs. No norm is applied: pass normed hidden states for the model's
final policy, raw ones for an internal layer policy.

Two backends:

* ``chunked`` (CPU, any device; the reference): an autograd Function that walks the tokens in chunks
  of ``chunk_size`` rows, keeps only the per-token log-sum-exp for backward and recomputes each
  chunk's logits there. Extra memory is O(chunk_size x vocab).
* ``triton`` (CUDA): verl's ``linear_cross_entropy`` kernel (fp32 accumulation, no [T, V] tensor).
  Its backward asserts contiguous incoming gradients; :class:`_ContiguousGrad` makes them so (the
  expanded gradient of ``entropy.sum()`` is a stride-0 view). With bf16 inputs its log-probs differ
  from an fp32 reference by up to about 1.5e-2 nats at Qwen3-4B sizes (measured on an H200), the
  bf16 rounding of the inputs themselves; the chunked path, given the same bf16 inputs, accumulates
  the same way.

``backend="auto"`` uses Triton for CUDA tensors whose hidden size is a multiple of 128 when verl and
Triton import (every Qwen2/Qwen3/Llama size), the chunked path otherwise. A logit scale folds into
the temperature (both backends); a soft cap (Gemma2) needs the chunked path.
"""

from __future__ import annotations

import functools

import torch

DEFAULT_CHUNK_SIZE = 1024
"""Rows per chunk of the chunked path on devices without a measured default (CUDA included: not
measured on a GPU, where ``auto`` normally runs the Triton head, which has no chunks)."""
CHUNK_SIZE_BY_DEVICE = {"cpu": 256}
"""Measured defaults per device type (``benchmarks/internal_forward.py --sweep-chunks``, figures there).

CPU: 256 rows were the fastest of 128..2048 for the phase-1 forward and update at the benchmark's
small shape (V = 32000): forward 1.27x faster than 1024 rows by median wall time on one thread (1.19x
by CPU time), update 1.13x (1.09x); on two threads the fastest by minimum as well. The chunk's
float32 logits are chunk x vocab x 4 bytes (256 x 151936 x 4 = 148 MiB at Qwen3 size)."""
TRITON_HIDDEN_MULTIPLE = 128
"""verl's Triton head kernel asserts ``hidden_size % 128 == 0``; ``auto`` falls back to chunked otherwise."""


def default_chunk_size(device: torch.device | str) -> int:
    """The chunk size used when none is given: measured per device type, :data:`DEFAULT_CHUNK_SIZE` otherwise.

    Args:
        device: where the head runs (a device or its name, e.g. ``"cpu"``, ``"cuda:0"``).

    Returns:
        Token rows per chunk.
    """
    return CHUNK_SIZE_BY_DEVICE.get(torch.device(device).type, DEFAULT_CHUNK_SIZE)


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _capped_logits(logits: torch.Tensor, softcap: float | None, temperature: float):
    """In place: ``logits <- softcap(logits) / T``; returns ``(logits, tanh)`` (tanh None without cap)."""
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh.mul(softcap)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits, tanh


class _ChunkedLinearLogProbEntropy(torch.autograd.Function):
    """Chunked log-prob + entropy of softmax(softcap(hidden @ weight.T) / T); recomputes logits in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, need_entropy, softcap=None):
        acc = _acc_dtype(hidden, weight)
        w = weight.to(acc)
        n = hidden.shape[0]
        log_probs = hidden.new_empty(n, dtype=acc)
        entropy = hidden.new_empty(n, dtype=acc)
        lse_all = hidden.new_empty(n, dtype=acc)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits, _ = _capped_logits(hidden[start:end].to(acc) @ w.T, softcap, temperature)
            lse = torch.logsumexp(logits, dim=-1)
            lse_all[start:end] = lse
            log_probs[start:end] = logits.gather(-1, labels[start:end, None]).squeeze(-1) - lse
            if need_entropy:
                # H = lse - sum_j p_j z_j  (p = softmax(z))
                logits.sub_(lse[:, None])
                p = logits.exp()
                entropy[start:end] = -(p * logits).sum(-1)
            del logits
        if not need_entropy:
            entropy.zero_()
        ctx.save_for_backward(hidden, weight, labels, lse_all, entropy)
        ctx.temperature = temperature
        ctx.softcap = softcap
        ctx.chunk_size = chunk_size
        # A skipped entropy is constant zeros: no (wrong) gradient through it. One call: a second
        # mark_non_differentiable would replace the first.
        ctx.mark_non_differentiable(lse_all, *(() if need_entropy else (entropy,)))
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, weight, labels, lse_all, entropy = ctx.saved_tensors
        acc = lse_all.dtype
        temperature, chunk_size, softcap = ctx.temperature, ctx.chunk_size, ctx.softcap
        w = weight.to(acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(w) if need_w else None
        n = hidden.shape[0]
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end].to(acc)
            logp, tanh = _capped_logits(h @ w.T, softcap, temperature)
            logp.sub_(lse_all[start:end, None])  # log p
            p = logp.exp()
            # d logprob / dz = onehot(y) - p ;  d H / dz = -p * (log p + H)
            g_lp = grad_log_probs[start:end, None].to(acc)
            g_ent = grad_entropy[start:end, None].to(acc)
            dz = logp.add_(entropy[start:end, None]).mul_(p).mul_(-g_ent)  # reuse the buffer
            dz.sub_(p * g_lp)
            dz.scatter_add_(-1, labels[start:end, None], g_lp)
            if temperature != 1.0:
                dz.div_(temperature)
            if tanh is not None:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
                dz.mul_(tanh.square_().neg_().add_(1.0))
            del tanh
            if need_h:
                grad_hidden[start:end] = (dz @ w).to(hidden.dtype)
            if need_w:
                grad_weight.addmm_(dz.T, h)
            del dz, p, logp
        if need_w:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (for Triton kernels)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@functools.lru_cache(maxsize=1)
def _triton_kernel():
    """verl's Triton linear-cross-entropy, or None when it cannot run here."""
    try:
        import triton  # noqa: F401
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy
    except Exception:
        return None
    return linear_cross_entropy


def triton_available() -> bool:
    """True when verl's Triton head kernel can be used (CUDA present, verl and Triton importable)."""
    return torch.cuda.is_available() and _triton_kernel() is not None


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """The head implementation ``backend`` selects for ``hidden``: ``"triton"`` or ``"chunked"``.

    ``auto`` picks verl's Triton kernel for CUDA tensors (not float64) whose hidden size is a
    multiple of :data:`TRITON_HIDDEN_MULTIPLE` when verl and Triton import, the chunked path otherwise.

    Raises:
        ValueError: unknown backend, or ``triton`` on a hidden size the kernel does not support.
        RuntimeError: ``triton`` without CUDA tensors or without verl's kernel.
    """
    if backend not in ("auto", "chunked", "triton"):
        raise ValueError(f"backend must be 'auto', 'chunked' or 'triton', got {backend!r}")
    if backend == "chunked":
        return "chunked"
    usable = hidden.is_cuda and _triton_kernel() is not None
    if backend == "triton":
        if not usable:
            raise RuntimeError("backend='triton' needs CUDA tensors and verl's Triton kernel")
        if hidden.shape[-1] % TRITON_HIDDEN_MULTIPLE:
            raise ValueError(f"backend='triton' needs a hidden size divisible by {TRITON_HIDDEN_MULTIPLE}")
        return "triton"
    ok = usable and hidden.dtype != torch.float64 and hidden.shape[-1] % TRITON_HIDDEN_MULTIPLE == 0
    return "triton" if ok else "chunked"


def fused_log_probs_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    backend: str = "auto",
    compute_entropy: bool = True,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``labels`` and entropy under softmax(softcap(logit_scale * hidden @ weight.T) / T), fused.

    Args:
        hidden: ``[..., H]`` hidden states (raw or normed: no norm is applied here).
        weight: ``[V, H]`` LM head / unembedding matrix.
        labels: ``[...]`` token ids (same leading shape as ``hidden``); ``None`` computes entropy
            only (the returned log-probs are zeros).
        temperature: logits are divided by it (verl's convention: the rollout temperature).
        chunk_size: token rows per chunk on the chunked path (memory O(chunk_size x V)); None takes
            :func:`default_chunk_size` of ``hidden``'s device.
        backend: ``"auto"``, ``"chunked"`` or ``"triton"``.
        compute_entropy: chunked path only: skip the entropy (returned as zeros) when False.
        logit_scale: multiplies ``hidden @ weight.T`` (a head's fixed scale; folded into the temperature).
        softcap: if set, ``softcap * tanh(z / softcap)`` before the temperature (Gemma2's final logit
            soft-capping); chunked path only (``auto`` picks it).

    Returns:
        ``(log_probs, entropy)``, both float32 (float64 for float64 inputs), shaped like ``labels``
        (``hidden.shape[:-1]``). Gradients flow to ``hidden`` and ``weight`` through both.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logit_scale <= 0 or (softcap is not None and softcap <= 0):
        raise ValueError(f"logit_scale and softcap must be > 0, got {logit_scale} and {softcap}")
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.device)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the head's {weight.shape[-1]}")
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    if labels is None:
        flat_y = torch.zeros(flat_h.shape[0], dtype=torch.long, device=hidden.device)
    else:
        if labels.shape != lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match hidden {tuple(lead)}")
        flat_y = labels.reshape(-1).long()
    if softcap is not None:
        if backend == "triton":
            raise ValueError("backend='triton' cannot apply a logit soft cap; use 'auto' or 'chunked'")
        backend = "chunked"
        hidden = hidden * logit_scale if logit_scale != 1.0 else hidden
        flat_h = hidden.reshape(-1, hidden.shape[-1])
    else:
        temperature = temperature / logit_scale  # softmax(s z / T) = softmax(z / (T / s))
    if resolve_backend(backend, hidden) == "triton":
        kernel = _triton_kernel()
        log_probs, entropy = kernel(
            flat_h.contiguous(), weight.contiguous(), flat_y, float(temperature), "none"
        )
        log_probs, entropy = _ContiguousGrad.apply(log_probs.float()), _ContiguousGrad.apply(entropy.float())
    else:
        log_probs, entropy = _ChunkedLinearLogProbEntropy.apply(
            flat_h,
            weight,
            flat_y,
            float(temperature),
            int(chunk_size),
            bool(compute_entropy),
            None if softcap is None else float(softcap),
        )
    if labels is None:
        log_probs = torch.zeros_like(log_probs)
    return log_probs.reshape(lead), entropy.reshape(lead)


def reference_log_probs_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain full-vocabulary float32 head (materialises [tokens x vocab]); the test reference."""
    acc = _acc_dtype(hidden, weight)
    logits = (hidden.to(acc) @ weight.to(acc).T) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def fused_policy_divergence(
    hidden_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token KL(p || q), entropy of p and entropy of q for two heads on the same tokens (no grad).

    ``p = softmax(g(hidden_p W^T) / T)`` and ``q = softmax(g(hidden_q W^T) / T)`` with the head's
    fixed map ``g(z) = softcap(logit_scale * z)`` (see :func:`fused_log_probs_entropy`); e.g.
    ``hidden_p`` the raw H^{k+1} (internal policy) and ``hidden_q`` the final-normed last layer (full
    policy). Chunked over tokens with float32 accumulation; memory O(chunk_size x vocab);
    ``chunk_size=None`` takes :func:`default_chunk_size` of the device.

    Returns:
        ``(kl_pq, entropy_p, entropy_q)``, float32, shaped ``hidden_p.shape[:-1]``.
    """
    if hidden_p.shape != hidden_q.shape:
        raise ValueError(f"hidden shapes differ: {tuple(hidden_p.shape)} vs {tuple(hidden_q.shape)}")
    chunk_size = default_chunk_size(hidden_p.device) if chunk_size is None else chunk_size
    lead = hidden_p.shape[:-1]
    hp = hidden_p.reshape(-1, hidden_p.shape[-1])
    hq = hidden_q.reshape(-1, hidden_q.shape[-1])
    acc = _acc_dtype(hidden_p, weight)
    w = weight.to(acc)
    outs = [torch.empty(hp.shape[0], dtype=acc, device=hp.device) for _ in range(3)]
    for start in range(0, hp.shape[0], chunk_size):
        end = min(start + chunk_size, hp.shape[0])
        zp, _ = _capped_logits(hp[start:end].to(acc) @ w.T * logit_scale, softcap, temperature)
        zq, _ = _capped_logits(hq[start:end].to(acc) @ w.T * logit_scale, softcap, temperature)
        logp = torch.log_softmax(zp, dim=-1)
        logq = torch.log_softmax(zq, dim=-1)
        p = logp.exp()
        outs[0][start:end] = (p * (logp - logq)).sum(-1)
        outs[1][start:end] = -(p * logp).sum(-1)
        outs[2][start:end] = -(logq.exp() * logq).sum(-1)
    return tuple(o.float().reshape(lead) for o in outs)
