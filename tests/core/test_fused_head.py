"""The fused LM head (``verl_ext.fused_head``) against a plain full-vocabulary log-softmax.

References are computed independently here (float64 ``log_softmax`` of ``hidden @ weight.T / T``) and
also via ``reference_log_probs_entropy``; values and gradients (through both outputs) must agree for
odd shapes, chunk sizes that do not divide the token count, several temperatures and dtypes.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import TOL
from verl_ext.fused_head import (
    _ContiguousGrad,
    fused_log_probs_entropy,
    fused_policy_divergence,
    reference_log_probs_entropy,
    triton_available,
)


def _inputs(n: int, v: int, h: int = 16, dtype=torch.float32, seed: int = 0, scale: float = 1.0, lead=None):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g, dtype=torch.float64) / math.sqrt(h)).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    if lead is not None:
        hidden, labels = hidden.reshape(*lead, h), labels.reshape(lead)
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _plain(hidden, weight, labels, temperature=1.0):
    """Independent float64 reference: materialised logits, log_softmax, gather, entropy."""
    logits = hidden.double() @ weight.double().T / temperature
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    lp = logp.gather(-1, labels[..., None]).squeeze(-1) if labels is not None else torch.zeros_like(ent)
    return lp, ent


def _grads(fn, hidden, weight, labels, temperature, c_lp, c_ent):
    """Values and gradients w.r.t. hidden and weight of sum(c_lp * lp + c_ent * ent)."""
    lp, ent = fn(hidden, weight, labels, temperature)
    loss = (lp.double() * c_lp).sum() + (ent.double() * c_ent).sum()
    gh, gw = torch.autograd.grad(loss, (hidden, weight))
    return lp.detach(), ent.detach(), gh, gw


@pytest.mark.parametrize(
    ("n", "v", "chunk"),
    [(47, 123, 16), (47, 123, 1), (47, 123, 47), (47, 123, 4096), (64, 320, 10), (5, 7, 3)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_grads_match_plain_log_softmax(n, v, chunk, temperature, dtype):
    hidden, weight, labels = _inputs(n, v, dtype=dtype, seed=n + v)
    g = torch.Generator().manual_seed(7)
    c_lp, c_ent = (
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
    )

    def fused(h, w, y, t):
        return fused_log_probs_entropy(h, w, y, temperature=t, chunk_size=chunk, backend="chunked")

    lp, ent, gh, gw = _grads(fused, hidden, weight, labels, temperature, c_lp, c_ent)
    rlp, rent, rgh, rgw = _grads(_plain, hidden, weight, labels, temperature, c_lp, c_ent)
    tol = TOL[dtype]
    assert lp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert lp.shape == ent.shape == (n,)
    torch.testing.assert_close(lp.double(), rlp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), rent, atol=tol, rtol=tol)
    assert gh.dtype == dtype and gw.dtype == dtype
    torch.testing.assert_close(gh.double(), rgh.double(), atol=tol, rtol=tol)
    torch.testing.assert_close(gw.double(), rgw.double(), atol=tol, rtol=tol)


def test_matches_reference_helper_with_leading_dims():
    """``[B, T, H]`` inputs keep their leading shape; the module's own reference agrees."""
    hidden, weight, labels = _inputs(3 * 11, 123, lead=(3, 11), seed=3)
    lp, ent = fused_log_probs_entropy(
        hidden, weight, labels, temperature=0.9, chunk_size=8, backend="chunked"
    )
    rlp, rent = reference_log_probs_entropy(hidden, weight, labels, temperature=0.9)
    assert lp.shape == ent.shape == (3, 11)
    torch.testing.assert_close(lp, rlp, atol=TOL[torch.float32], rtol=0)
    torch.testing.assert_close(ent, rent, atol=TOL[torch.float32], rtol=0)
    # and the helper itself against the independent float64 reference
    plp, pent = _plain(hidden, weight, labels, 0.9)
    torch.testing.assert_close(rlp.double(), plp, atol=TOL[torch.float32], rtol=0)
    torch.testing.assert_close(rent.double(), pent, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize(("n", "v", "h", "chunk"), [(47, 123, 4, 16), (6, 5, 3, 4)])
def test_gradcheck_float64(n, v, h, chunk):
    """Analytic gradients of both outputs against finite differences (odd 47 x 123 and a tiny shape)."""
    hidden, weight, labels = _inputs(n, v, h=h, dtype=torch.float64, seed=11)

    def fn(hd, w):
        return fused_log_probs_entropy(hd, w, labels, temperature=0.8, chunk_size=chunk, backend="chunked")

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


def _mapped(scale: float, cap: float | None):
    """Independent float64 reference of the head map: softmax(cap * tanh(scale * z / cap) / T)."""

    def fn(hidden, weight, labels, temperature):
        z = hidden.double() @ weight.double().T * scale
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        logp = torch.log_softmax(z / temperature, dim=-1)
        return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)

    return fn


@pytest.mark.parametrize(("scale", "cap"), [(0.25, None), (3.0, None), (1.0, 2.0), (0.5, 1.5)])
@pytest.mark.parametrize(("n", "v", "chunk"), [(47, 123, 16), (5, 7, 3)])
def test_head_map_values_and_grads(scale, cap, n, v, chunk):
    """Granite/Cohere-style scale and Gemma2-style soft cap: values and gradients vs float64 logits."""
    hidden, weight, labels = _inputs(n, v, seed=n, scale=4.0 if cap else 1.5)  # with a cap: it saturates
    g = torch.Generator().manual_seed(3)
    c_lp, c_ent = (
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.randn(n, generator=g, dtype=torch.float64),
    )

    def fused(h, w, y, t):
        return fused_log_probs_entropy(
            h, w, y, t, chunk_size=chunk, backend="auto", logit_scale=scale, softcap=cap
        )

    lp, ent, gh, gw = _grads(fused, hidden, weight, labels, 0.7, c_lp, c_ent)
    rlp, rent, rgh, rgw = _grads(_mapped(scale, cap), hidden, weight, labels, 0.7, c_lp, c_ent)
    tol = TOL[torch.float32]
    for got, want in ((lp, rlp), (ent, rent), (gh, rgh), (gw, rgw)):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)
    plain_lp, _ = _plain(hidden, weight, labels, 0.7)
    assert (plain_lp - rlp).abs().max() > 1e-2, "control: the map must change the policy"


def test_gradcheck_softcap_float64():
    hidden, weight, labels = _inputs(9, 11, h=4, dtype=torch.float64, seed=13, scale=3.0)

    def fn(hd, w):
        return fused_log_probs_entropy(hd, w, labels, 0.8, chunk_size=4, logit_scale=0.7, softcap=1.5)

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(("scale", "cap"), [(1.0, None), (0.25, None), (0.5, 1.5)])
def test_policy_divergence_with_head_map(scale, cap):
    hp, weight, _ = _inputs(13, 17, seed=4, scale=3.0)
    hq, _, _ = _inputs(13, 17, seed=5, scale=3.0)
    kl, ent_p, ent_q = fused_policy_divergence(
        hp, hq, weight, 0.9, chunk_size=5, logit_scale=scale, softcap=cap
    )
    ref = _mapped(scale, cap)
    logs = []
    for h in (hp, hq):
        z = h.detach().double() @ weight.detach().double().T * scale
        logs.append(torch.log_softmax((cap * torch.tanh(z / cap) if cap else z) / 0.9, -1))
    logp, logq = logs
    tol = TOL[torch.float32]
    torch.testing.assert_close(kl.double(), (logp.exp() * (logp - logq)).sum(-1), atol=tol, rtol=tol)
    torch.testing.assert_close(
        ent_p.double(),
        ref(hp.detach(), weight.detach(), torch.zeros(13, dtype=torch.long), 0.9)[1],
        atol=tol,
        rtol=tol,
    )
    torch.testing.assert_close(ent_q.double(), -(logq.exp() * logq).sum(-1), atol=tol, rtol=tol)


def test_gradcheck_entropy_only_float64():
    hidden, weight, _ = _inputs(7, 9, h=3, dtype=torch.float64, seed=12)

    def fn(hd, w):
        return fused_log_probs_entropy(hd, w, None, chunk_size=3, backend="chunked")[1]

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bf16_inputs_against_fp32_reference():
    """bf16 hidden/weight: float32 outputs, exact w.r.t. the rounded inputs, close to the fp32 ones.

    Documented tolerance: against the float64 head of the *same bf16 values* the fused head is within
    float32 accumulation error (1e-4); against the unrounded float32 inputs the difference is the bf16
    rounding of the inputs themselves, bounded here by ``TOL[bfloat16]`` (3e-2 nats) at H=64.
    """
    hidden32, weight32, labels = _inputs(47, 123, h=64, seed=5, scale=2.0)
    hidden = hidden32.detach().bfloat16().requires_grad_()
    weight = weight32.detach().bfloat16().requires_grad_()
    lp, ent = fused_log_probs_entropy(hidden, weight, labels, chunk_size=16, backend="chunked")
    assert lp.dtype == ent.dtype == torch.float32
    same_lp, same_ent = _plain(hidden, weight, labels)
    torch.testing.assert_close(lp.double(), same_lp, atol=1e-4, rtol=0)
    torch.testing.assert_close(ent.double(), same_ent, atol=1e-4, rtol=0)
    fp32_lp, fp32_ent = _plain(hidden32, weight32, labels)
    tol = TOL[torch.bfloat16]
    torch.testing.assert_close(lp.double(), fp32_lp, atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), fp32_ent, atol=tol, rtol=0)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    h_ref, w_ref = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    rlp, rent = _plain(h_ref, w_ref, labels)
    (rlp.sum() + rent.sum()).backward()
    torch.testing.assert_close(hidden.grad.double(), h_ref.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(weight.grad.double(), w_ref.grad, atol=2e-2, rtol=2e-2)


def test_labels_none_gives_entropy_only():
    hidden, weight, labels = _inputs(47, 123, seed=2)
    lp, ent = fused_log_probs_entropy(hidden, weight, None, temperature=1.3, chunk_size=10, backend="chunked")
    assert torch.equal(lp, torch.zeros(47))
    _, rent = _plain(hidden, weight, labels, 1.3)
    torch.testing.assert_close(ent.double(), rent, atol=TOL[torch.float32], rtol=0)
    gh, gw = torch.autograd.grad(ent.sum(), (hidden, weight))
    rgh, rgw = torch.autograd.grad(rent.sum(), (hidden, weight))
    torch.testing.assert_close(gh.double(), rgh.double(), atol=TOL[torch.float32], rtol=1e-4)
    torch.testing.assert_close(gw.double(), rgw.double(), atol=TOL[torch.float32], rtol=1e-4)


def test_compute_entropy_false_keeps_log_probs_and_grads():
    hidden, weight, labels = _inputs(47, 123, seed=4)
    lp, ent = fused_log_probs_entropy(hidden, weight, labels, chunk_size=13, compute_entropy=False)
    assert torch.equal(ent, torch.zeros(47))
    assert not ent.requires_grad  # the skipped entropy is a constant, not a differentiable zero
    rlp, _ = _plain(hidden, weight, labels)
    torch.testing.assert_close(lp.double(), rlp, atol=TOL[torch.float32], rtol=0)
    gh, gw = torch.autograd.grad(lp.sum(), (hidden, weight))
    rgh, rgw = torch.autograd.grad(rlp.sum(), (hidden, weight))
    torch.testing.assert_close(gh.double(), rgh.double(), atol=TOL[torch.float32], rtol=1e-4)
    torch.testing.assert_close(gw.double(), rgw.double(), atol=TOL[torch.float32], rtol=1e-4)


@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0, 1000.0])
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_bounds(scale, temperature):
    """log_probs <= 0 and 0 <= entropy <= log V, from uniform (scale 0) to one-hot-like (huge logits)."""
    v = 123
    hidden, weight, labels = _inputs(47, v, seed=6, scale=scale)
    lp, ent = fused_log_probs_entropy(hidden, weight, labels, temperature=temperature, chunk_size=16)
    assert torch.isfinite(lp).all() and torch.isfinite(ent).all()
    assert (lp <= 0).all()
    assert (ent >= 0).all()
    assert (ent <= math.log(v) + 1e-5).all()
    if scale == 0.0:  # uniform distribution: the bounds are attained
        torch.testing.assert_close(ent, torch.full_like(ent, math.log(v)))
        torch.testing.assert_close(lp, torch.full_like(lp, -math.log(v)))
    rlp, rent = _plain(hidden, weight, labels, temperature)
    # float32 logits of magnitude M carry an absolute rounding error of about M * 1e-7
    magnitude = ((hidden.double() @ weight.double().T).abs().max() / temperature).item()
    atol = 1e-5 + 2e-7 * magnitude
    torch.testing.assert_close(lp.double(), rlp, atol=atol, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=atol, rtol=1e-5)


def test_saves_no_tokens_by_vocab_tensor():
    """Only O(tokens) tensors (plus the inputs) are kept for backward: no [N x V] logits."""
    n, v = 47, 123
    hidden, weight, labels = _inputs(n, v, seed=8)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = fused_log_probs_entropy(hidden, weight, labels, chunk_size=16, backend="chunked")
    assert saved, "the chunked head should save its inputs and per-token statistics"
    assert max(t.numel() for t in saved) <= max(hidden.numel(), weight.numel())
    assert all(t.numel() < n * v for t in saved)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"backend": "cuda"}, ValueError, "backend must be"),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0"),
        ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be > 0"),
        ({"logit_scale": 0.0}, ValueError, "logit_scale and softcap must be > 0"),
        ({"softcap": -1.0}, ValueError, "logit_scale and softcap must be > 0"),
        ({"softcap": 30.0, "backend": "triton"}, ValueError, "cannot apply a logit soft cap"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    hidden, weight, labels = _inputs(5, 7)
    with pytest.raises(exc, match=match):
        fused_log_probs_entropy(hidden, weight, labels, **kwargs)


def test_shape_mismatch_errors():
    hidden, weight, labels = _inputs(5, 7, h=16)
    with pytest.raises(ValueError, match="hidden size 16 does not match the head's 8"):
        fused_log_probs_entropy(hidden, weight[:, :8], labels)
    with pytest.raises(ValueError, match=r"labels shape \(4,\) does not match hidden \(5,\)"):
        fused_log_probs_entropy(hidden, weight, labels[:4])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of the Triton backend")
def test_triton_backend_refused_on_cpu():
    hidden, weight, labels = _inputs(5, 7)
    assert not triton_available()
    with pytest.raises(RuntimeError, match="triton"):
        fused_log_probs_entropy(hidden, weight, labels, backend="triton")
    # "auto" falls back to the chunked path on CPU
    lp, _ = fused_log_probs_entropy(hidden, weight, labels, backend="auto")
    torch.testing.assert_close(
        lp.double(), _plain(hidden, weight, labels)[0], atol=TOL[torch.float32], rtol=0
    )


def _grad_contiguity(through_contiguous_grad: bool) -> tuple[bool, torch.Tensor]:
    x = torch.randn(4, 6, requires_grad=True)
    a = x * 2.0  # non-leaf: its hook sees the gradient exactly as passed to it
    seen = {}
    a.register_hook(lambda g: seen.update(contiguous=g.is_contiguous()))
    b = _ContiguousGrad.apply(a) if through_contiguous_grad else a
    assert torch.equal(b, a)
    b.sum().backward()  # the gradient of sum() arrives as an expanded (stride-0) view
    return seen["contiguous"], x.grad


def test_contiguous_grad():
    plain_contiguous, plain_grad = _grad_contiguity(False)
    fixed_contiguous, fixed_grad = _grad_contiguity(True)
    assert not plain_contiguous, "control: sum() should hand back a non-contiguous gradient"
    assert fixed_contiguous
    assert torch.equal(fixed_grad, plain_grad)
    assert torch.equal(fixed_grad, torch.full((4, 6), 2.0))


@pytest.mark.skipif(not triton_available(), reason="needs CUDA and verl's Triton kernel")
def test_triton_backend_matches_reference_cuda():  # pragma: no cover - GPU only
    hidden, weight, labels = _inputs(1000, 4096, h=256, seed=9)
    hidden, weight = hidden.detach().cuda().requires_grad_(), weight.detach().cuda().requires_grad_()
    labels = labels.cuda()
    lp, ent = fused_log_probs_entropy(hidden, weight, labels, temperature=0.8, backend="triton")
    rlp, rent = reference_log_probs_entropy(hidden, weight, labels, temperature=0.8)
    torch.testing.assert_close(lp, rlp, atol=1e-3, rtol=0)
    torch.testing.assert_close(ent, rent, atol=1e-3, rtol=0)
    gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    rgh, rgw = torch.autograd.grad(rlp.sum() + rent.sum(), (hidden, weight))
    torch.testing.assert_close(gh, rgh, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(gw, rgw, atol=1e-3, rtol=1e-3)


def test_default_chunk_size_is_chosen_per_device(monkeypatch):
    """No chunk size given: the device's measured default (CPU), 1024 rows where none was measured."""
    from verl_ext import fused_head

    assert fused_head.default_chunk_size("cpu") == fused_head.CHUNK_SIZE_BY_DEVICE["cpu"] == 256
    assert fused_head.default_chunk_size(torch.device("cuda", 0)) == fused_head.DEFAULT_CHUNK_SIZE == 1024
    seen = []
    apply = fused_head._ChunkedLinearLogProbEntropy.apply

    def spy(*args):
        seen.append(args[4])  # (hidden, weight, labels, temperature, chunk_size, need_entropy)
        return apply(*args)

    monkeypatch.setattr(fused_head._ChunkedLinearLogProbEntropy, "apply", spy)
    hidden, weight, labels = _inputs(600, 11)
    lp, ent = fused_log_probs_entropy(hidden, weight, labels)
    ref_lp, ref_ent = reference_log_probs_entropy(hidden.double(), weight.double(), labels)
    assert seen == [256]
    tol = TOL[torch.float32]
    torch.testing.assert_close(lp.double(), ref_lp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol, rtol=tol)
