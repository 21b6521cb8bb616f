"""GPU proof of the internal-policy path: bf16 exactness, the Triton head, and phase-1/phase-2 updates in verl.

Checks, each isolated (an exception is recorded and the next check runs), each printing JSON lines
to stdout and appending them to ``<out>/results.jsonl`` as it goes (a timeout still leaves data):

* ``env``: Python, torch, CUDA, GPU (the device line), triton, transformers, verl and where ``ray``
  comes from (the stub on the GPU machine), and whether verl's Triton head is usable.
* ``exact_tiny`` / ``exact_4b``: :func:`verl_ext.internal_policy.internal_log_probs` (layers 0..k
  only, fused head; ``backend=auto``, i.e. Triton on CUDA, and ``backend=chunked``) against the plain
  reference: the full-depth Hugging Face forward with ``output_hidden_states`` and a float32
  full-vocabulary head on ``H^{k+1}``, for a tiny and a Qwen3-4B-sized random model in bf16.
* ``triton``: verl's Triton head against the chunked head and a float32 reference at Qwen3-4B head
  sizes, values and gradients (hidden and weight), two logit scales. Without CUDA: "skipped" (the
  chunked-vs-reference half still runs and is reported).
* ``engine``: verl 0.9.1's real ``FSDPEngineWithLMHead`` (FSDP2, one device, no Ray) with the BuPO
  worker on a random Qwen3-4B-sized model saved to disk: one phase-1 update (exit layer k) and one
  phase-2 update (full policy), each preceded by its old-log-prob pass as the trainer does; checks
  that layers above k (and the final norm) are unchanged after phase 1 and every parameter changed
  after phase 2; time and peak memory of each call.

``--summarize`` reads ``results.jsonl`` and the benchmark outputs (``bench_*.jsonl`` written by
``benchmarks/gpu_check.sh``) and writes ``<out>/summary.json``.

Tolerances (justified in ``docs/benchmarks.md``): bf16 model, float32-accumulating heads, compared
with a float32 head on the same bf16 hidden states: |d log-prob|, |d entropy| <= 2e-2 nats required
(the bf16 noise floor), <= 1e-3 reported as ``tight_ok`` (what fp32 accumulation should give); head
gradients: relative Frobenius error <= 1e-2 against float32 gradients (2e-2 Triton vs chunked).

Commands::

    python benchmarks/gpu_check.py --out outputs/gpu_check                 # all checks (CUDA if present)
    python benchmarks/gpu_check.py --out OUT --checks engine               # one check
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke            # every check, tiny shapes, CPU
    python benchmarks/gpu_check.py --summarize --out OUT                   # summary.json

On the GPU machine run it through ``benchmarks/gpu_check.sh`` (it installs the carried wheels and
puts ``benchmarks/ray_stub`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from _bench_utils import MiB, peak_rss_bytes  # noqa: E402

from verl_ext.random_models import SHAPES, make_model, make_model_from_shape, save_model_and_tokenizer  # noqa: E402

CHECKS = ("env", "exact_tiny", "triton", "exact_4b", "engine")
RECIPE_CONFIG = REPO / "recipe" / "bupo" / "config"

# Tolerances (see docs/benchmarks.md for the reasoning).
TOL_VALUES = 2e-2  # nats: log-probs and entropies of a bf16 model, fp32-accumulating head vs fp32 head
TOL_TIGHT = 1e-3  # reported, not required: fp32 accumulation-order noise on identical bf16 inputs
TOL_GRAD_REL = 1e-2  # relative Frobenius error of bf16 head gradients vs float32 gradients
TOL_GRAD_REL_PAIR = 2e-2  # Triton vs chunked gradients (both carry bf16 rounding)

_OUT: Path | None = None


# ------------------------------------------------------------------------------------------ output
def emit(record: dict) -> dict:
    """Print one JSON line and append it to ``<out>/results.jsonl`` (flushed at once)."""
    line = json.dumps(record, default=_json_default)
    print(line, flush=True)
    if _OUT is not None:
        with open(_OUT / "results.jsonl", "a") as f:
            f.write(line + "\n")
    return record


def _json_default(obj):
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return repr(obj)


def _r(x: float, digits: int = 6) -> float:
    """Round for the record (keeps tiny differences readable)."""
    x = float(x)
    return x if not math.isfinite(x) or x == 0 else float(f"{x:.{digits}g}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Peak:
    """Peak memory of a block: the CUDA allocator's ``max_memory_allocated``, or process RSS on CPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.peak_mib = self.base_mib = None
        self.seconds = 0.0

    def __enter__(self) -> Peak:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mib = torch.cuda.memory_allocated() / MiB
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._t0
        if self.cuda:
            self.peak_mib = torch.cuda.max_memory_allocated() / MiB
        else:
            self.peak_mib = peak_rss_bytes() / MiB

    def record(self, prefix: str) -> dict:
        out = {f"{prefix}_s": round(self.seconds, 3), f"{prefix}_peak_mib": _r(self.peak_mib or 0, 7)}
        if self.base_mib is not None:
            out[f"{prefix}_base_mib"] = _r(self.base_mib, 7)
        out[f"{prefix}_mem_basis"] = "cuda_max_allocated" if self.cuda else "process_peak_rss"
        return out


# ------------------------------------------------------------------------------------ CPU platform
def install_cpu_shim() -> None:
    """CPU mode only: register the tests' CPU platform for verl (never on a GPU run)."""
    sys.path.insert(0, str(REPO / "tests" / "bupo"))
    import _verl_cpu  # noqa: F401  (registers the "cpu" platform and sets VERL_PLATFORM=cpu)


# ---------------------------------------------------------------------------------------------- env
def _version(name: str) -> str | None:
    try:
        module = __import__(name)
    except Exception as exc:  # noqa: BLE001  (report, do not fail)
        return f"import failed: {type(exc).__name__}: {exc}"[:300]
    return getattr(module, "__version__", "?")


def _device_line() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or out.stderr.strip()
    except Exception as exc:  # noqa: BLE001
        return f"nvidia-smi failed: {exc}"


def check_env(args: argparse.Namespace) -> dict:
    """Versions, device, where ``ray`` comes from, whether the Triton head is usable."""
    import transformers

    rec: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": args.device,
        "dtype": args.dtype,
        "transformers": transformers.__version__,
        "transformers_file": transformers.__file__,
        "triton": _version("triton"),
        "tensordict": _version("tensordict"),
        "hydra": _version("hydra"),
        "peft": _version("peft"),
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rec.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
            gpu_sm=f"{props.major}.{props.minor}",
            nvidia_smi=_device_line(),
        )
    import ray
    import verl

    rec["verl"] = getattr(verl, "__version__", "?")
    rec["ray_file"] = ray.__file__
    rec["ray_is_stub"] = bool(getattr(ray, "IS_BUPO_RAY_STUB", False))
    import verl.workers.engine_workers  # noqa: F401  (the engine path imports)

    import verl_ext.bupo.worker  # noqa: F401
    from verl_ext.fused_head import triton_available

    rec["triton_head_available"] = triton_available()
    rec["status"] = "pass"
    return rec


# -------------------------------------------------------------------------------------------- exact
def _reference(model, ids, mask, layers):
    """Plain reference: full-depth HF forward, fp32 head on H^{k+1} (or the final-normed output)."""
    from verl_ext.fused_head import reference_log_probs_entropy
    from verl_ext.internal_policy import lm_head_weight, position_ids_from_mask
    from verl_ext.slicing import find_decoder

    decoder = find_decoder(model)
    n = len(decoder.layers)
    captured = {}
    handle = decoder.layers[n - 1].register_forward_hook(
        lambda m, a, o: captured.__setitem__("last", o[0] if isinstance(o, (tuple, list)) else o)
    )
    try:
        with torch.no_grad():
            out = decoder(
                input_ids=ids,
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask),
                output_hidden_states=True,
                use_cache=False,
            )
    finally:
        handle.remove()
    weight = lm_head_weight(model)
    refs = {}
    for layer in layers:
        if layer is None:
            h = out.last_hidden_state  # final-normed: the model's own policy
        elif layer < n - 1:
            h = out.hidden_states[layer + 1]
        else:
            h = captured["last"]
        lps, ents, max_logit = [], [], 0.0
        with torch.no_grad():
            for b in range(ids.shape[0]):  # row by row: [T, V] fp32 at a time
                lp, ent = reference_log_probs_entropy(h[b, :-1], weight, ids[b, 1:])
                lps.append(lp)
                ents.append(ent)
                real = h[b, :-1][mask[b, :-1].bool()].float()  # padded rows are not compared
                max_logit = max(max_logit, float((real @ weight.float().T).abs().max()))
        refs[layer] = (h, torch.stack(lps), torch.stack(ents), max_logit)
    return refs


def _backend_used(backend: str, hidden: torch.Tensor) -> str:
    from verl_ext.fused_head import resolve_backend

    return resolve_backend(backend, hidden)


def _exact(args: argparse.Namespace, shape: str, layers: list, batch: int, seq: int, init_std) -> dict:
    from verl_ext.internal_policy import internal_log_probs, position_ids_from_mask
    from verl_ext.slicing import exit_after_layer, find_decoder

    device, dtype = args.device, getattr(torch, args.dtype)
    t0 = time.perf_counter()
    model = make_model_from_shape(
        shape, dtype=dtype, device=device, attn_implementation="sdpa", init_std=init_std
    )
    build_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:  # left padding on the second row: positions and masks must not shift real tokens
        pad = seq // 4
        ids[1, :pad] = 0
        mask[1, :pad] = 0
    ids, mask = ids.to(device), mask.to(device)
    valid = (mask[:, :-1] * mask[:, 1:]).bool()
    refs = _reference(model, ids, mask, layers)
    decoder = find_decoder(model)
    cases, ok = [], True
    for layer in layers:
        h_ref, lp_ref, ent_ref, max_logit = refs[layer]
        h_diff = None
        if layer is not None:
            with torch.no_grad(), exit_after_layer(model, layer):
                h = decoder(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=position_ids_from_mask(mask),
                    use_cache=False,
                ).last_hidden_state
            h_diff = float((h.float() - h_ref.float())[mask.bool()].abs().max())
        for backend in ("auto", "chunked"):
            case = {
                "layer": "full" if layer is None else layer,
                "backend": backend,
                "backend_used": _backend_used(backend, h_ref),
                "max_abs_hidden_vs_full_forward": None if h_diff is None else _r(h_diff),
                "ref_max_abs_logit": _r(max_logit, 4),
                "ref_entropy_mean": _r(ent_ref[valid].mean(), 5),
            }
            try:
                with torch.no_grad():
                    lp, ent = internal_log_probs(model, ids, layer, mask, backend=backend)
                d_lp = (lp.float() - lp_ref.float())[valid].abs()
                d_ent = (ent.float() - ent_ref.float())[valid].abs()
                case.update(
                    max_abs_logprob=_r(d_lp.max()),
                    mean_abs_logprob=_r(d_lp.mean()),
                    max_abs_entropy=_r(d_ent.max()),
                    ok=bool(d_lp.max() <= TOL_VALUES and d_ent.max() <= TOL_VALUES),
                    tight_ok=bool(d_lp.max() <= TOL_TIGHT and d_ent.max() <= TOL_TIGHT),
                )
            except Exception as exc:  # noqa: BLE001  (one failing case must not hide the others)
                case.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
            ok &= case["ok"]
            cases.append(case)
    del model, refs
    return {
        "shape": shape,
        **{
            k: v
            for k, v in SHAPES[shape].__dict__.items()
            if k in ("num_hidden_layers", "hidden_size", "vocab_size")
        },
        "init_std": init_std,
        "tokens": batch * seq,
        "build_s": round(build_s, 2),
        "tolerance": TOL_VALUES,
        "tight_band": TOL_TIGHT,
        "tight_ok": all(c.get("tight_ok", False) for c in cases),
        "max_abs_logprob_all": max((c.get("max_abs_logprob", math.inf) for c in cases), default=None),
        "max_abs_entropy_all": max((c.get("max_abs_entropy", math.inf) for c in cases), default=None),
        "cases": cases,
        "status": "pass" if ok else "fail",
    }


def check_exact_tiny(args: argparse.Namespace) -> dict:
    """Tiny random Qwen3 (4 layers, hidden 64): every layer and the full policy."""
    return _exact(args, "tiny", [0, 1, 2, 3, None], batch=2, seq=64, init_std=0.1)


def check_exact_4b(args: argparse.Namespace) -> dict:
    """Qwen3-4B-sized random model (``--small``: the tiny shape with default init stands in)."""
    if args.small:  # bf16 on a CPU is slow; the code path is the same
        return _exact(args, "tiny", [1, 3, None], batch=2, seq=32, init_std=None)
    return _exact(args, "qwen3-4b", [0, 5, 17, 35, None], batch=2, seq=1024, init_std=None)


# ------------------------------------------------------------------------------------------- triton
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _head_run(hidden, weight, labels, g_lp, g_ent, temperature, backend, dtype):
    """Values and (hidden, weight) gradients of sum(g_lp * lp + g_ent * ent) through one head."""
    from verl_ext.fused_head import fused_log_probs_entropy

    h = hidden.detach().to(dtype).requires_grad_(True)
    w = weight.detach().to(dtype).requires_grad_(True)
    device = str(hidden.device)
    with Peak(device) as mem:
        lp, ent = fused_log_probs_entropy(h, w, labels, temperature=temperature, backend=backend)
        ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach().float(), ent.detach().float(), h.grad.float(), w.grad.float(), mem


def check_triton(args: argparse.Namespace) -> dict:
    """Triton head vs chunked head vs float32 reference: values and gradients, two logit scales."""
    from verl_ext.fused_head import reference_log_probs_entropy, triton_available

    device = args.device
    n, hsz, vocab = (64, 128, 1000) if args.small else (4096, 2560, 151936)
    have_triton = device.startswith("cuda") and triton_available()
    cases, ok = [], True
    for scale, temperature in ((1.0, 1.0), (10.0, 0.7)):
        g = torch.Generator().manual_seed(int(scale))
        # fp32 originals; logit std ~ scale (the head weight std 0.02 as in Qwen3's init)
        hidden = (torch.randn(n, hsz, generator=g) * scale / (0.02 * math.sqrt(hsz))).to(device)
        weight = (torch.randn(vocab, hsz, generator=g) * 0.02).to(device)
        labels = torch.randint(0, vocab, (n,), generator=g).to(device)
        g_lp = torch.randn(n, generator=g).to(device)
        g_ent = torch.randn(n, generator=g).to(device)
        h16, w16 = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
        case: dict = {
            "tokens": n,
            "hidden": hsz,
            "vocab": vocab,
            "logit_scale": scale,
            "temperature": temperature,
        }
        with torch.no_grad():
            lp32, ent32 = reference_log_probs_entropy(hidden, weight, labels, temperature)  # fp32 inputs
            lp_same, ent_same = reference_log_probs_entropy(
                h16, w16, labels, temperature
            )  # bf16 inputs, fp32 head
        # float32 gradients on the bf16-rounded inputs (the chunked head in fp32)
        _, _, gh32, gw32, _ = _head_run(
            h16.float(), w16.float(), labels, g_lp, g_ent, temperature, "chunked", torch.float32
        )
        lp_c, ent_c, gh_c, gw_c, mem_c = _head_run(
            h16, w16, labels, g_lp, g_ent, temperature, "chunked", torch.bfloat16
        )
        case["chunked"] = {
            "max_abs_logprob_vs_ref": _r((lp_c - lp_same).abs().max()),
            "max_abs_entropy_vs_ref": _r((ent_c - ent_same).abs().max()),
            "max_abs_logprob_vs_fp32_inputs": _r((lp_c - lp32).abs().max()),
            "grad_hidden_rel_vs_fp32": _r(_rel(gh_c, gh32)),
            "grad_weight_rel_vs_fp32": _r(_rel(gw_c, gw32)),
            **mem_c.record("fwd_bwd"),
        }
        c = case["chunked"]
        chunk_ok = (
            c["max_abs_logprob_vs_ref"] <= TOL_VALUES
            and c["max_abs_entropy_vs_ref"] <= TOL_VALUES
            and c["grad_hidden_rel_vs_fp32"] <= TOL_GRAD_REL
            and c["grad_weight_rel_vs_fp32"] <= TOL_GRAD_REL
        )
        case["chunked"]["ok"] = chunk_ok
        c["tight_ok"] = c["max_abs_logprob_vs_ref"] <= TOL_TIGHT and c["max_abs_entropy_vs_ref"] <= TOL_TIGHT
        ok &= chunk_ok
        if have_triton:
            try:
                _head_run(
                    h16, w16, labels, g_lp, g_ent, temperature, "triton", torch.bfloat16
                )  # compile/autotune
                lp_t, ent_t, gh_t, gw_t, mem_t = _head_run(
                    h16, w16, labels, g_lp, g_ent, temperature, "triton", torch.bfloat16
                )
                t = {
                    "max_abs_logprob_vs_ref": _r((lp_t - lp_same).abs().max()),
                    "max_abs_entropy_vs_ref": _r((ent_t - ent_same).abs().max()),
                    "max_abs_logprob_vs_fp32_inputs": _r((lp_t - lp32).abs().max()),
                    "max_abs_logprob_vs_chunked": _r((lp_t - lp_c).abs().max()),
                    "max_abs_entropy_vs_chunked": _r((ent_t - ent_c).abs().max()),
                    "grad_hidden_rel_vs_fp32": _r(_rel(gh_t, gh32)),
                    "grad_weight_rel_vs_fp32": _r(_rel(gw_t, gw32)),
                    "grad_hidden_rel_vs_chunked": _r(_rel(gh_t, gh_c)),
                    "grad_weight_rel_vs_chunked": _r(_rel(gw_t, gw_c)),
                    **mem_t.record("fwd_bwd"),
                }
                t["ok"] = (
                    t["max_abs_logprob_vs_ref"] <= TOL_VALUES
                    and t["max_abs_entropy_vs_ref"] <= TOL_VALUES
                    and t["max_abs_logprob_vs_chunked"] <= TOL_VALUES
                    and t["max_abs_entropy_vs_chunked"] <= TOL_VALUES
                    and t["grad_hidden_rel_vs_fp32"] <= TOL_GRAD_REL
                    and t["grad_weight_rel_vs_fp32"] <= TOL_GRAD_REL
                    and t["grad_hidden_rel_vs_chunked"] <= TOL_GRAD_REL_PAIR
                    and t["grad_weight_rel_vs_chunked"] <= TOL_GRAD_REL_PAIR
                )
                t["tight_ok"] = all(
                    t[k] <= TOL_TIGHT
                    for k in (
                        "max_abs_logprob_vs_ref",
                        "max_abs_entropy_vs_ref",
                        "max_abs_logprob_vs_chunked",
                        "max_abs_entropy_vs_chunked",
                    )
                )
            except Exception as exc:  # noqa: BLE001
                t = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            case["triton"] = t
            ok &= t["ok"]
        else:
            case["triton"] = (
                "skipped: no CUDA" if not device.startswith("cuda") else "skipped: Triton head unavailable"
            )
        cases.append(case)
        del hidden, weight, h16, w16, gh32, gw32, gh_c, gw_c
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    rec = {
        "tolerance_values": TOL_VALUES,
        "tight_band": TOL_TIGHT,
        "tolerance_grad_rel": TOL_GRAD_REL,
        "tolerance_grad_rel_triton_vs_chunked": TOL_GRAD_REL_PAIR,
        "cases": cases,
    }
    if not have_triton:
        rec["chunked_ok"] = ok
        if device.startswith("cuda"):  # on a GPU the Triton head must be there
            rec.update(status="fail", reason="Triton head unavailable (verl or triton did not import)")
        else:
            rec.update(status="skipped" if ok else "fail", reason="skipped: no CUDA (the chunked half ran)")
        return rec
    rec["status"] = "pass" if ok else "fail"
    return rec


# ------------------------------------------------------------------------------------------- engine
def init_process_group(device: str) -> None:
    """World size 1: the env vars verl's Worker reads, then the process group (NCCL on CUDA)."""
    import socket

    if torch.distributed.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        WORLD_SIZE="1",
        RANK="0",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def compose_config(model_path: str, args: argparse.Namespace):
    """The BuPO recipe config for the actor of this check (bf16 autocast, fp32 master, FSDP2, sdpa)."""
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.model.enable_gradient_checkpointing=true",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.use_torch_compile=false",
        # verl compiles entropy_from_logits once per run; a one-step check would time the compiler.
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
        f"actor_rollout_ref.actor.ppo_max_token_len_per_gpu={args.engine_train_tokens}",
        f"actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu={args.engine_infer_tokens}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.engine_seqs}",
        "actor_rollout_ref.rollout.n=1",
        f"actor_rollout_ref.actor.optim.lr={args.engine_lr}",
        # foreach AdamW holds one more fp32 copy of every parameter during the step: a 4B model's full
        # fp32 Adam state on one 80 GB GPU only fits without it (see docs/benchmarks.md).
        f"actor_rollout_ref.actor.optim.override_optimizer_config={{foreach:{str(args.engine_foreach).lower()}}}",
        "trainer.n_gpus_per_node=1",
    ]
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        return compose("bupo_trainer", overrides=overrides)


def build_actor(config):
    """The actor TrainingWorker as ``ActorRolloutRefWorker.init_model`` builds it (no Ray, BuPO worker)."""
    from functools import partial

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import TrainingWorkerConfig
    from verl.workers.utils.losses import ppo_loss

    from verl_ext.bupo.worker import BuPOTrainingWorker

    aref = config.actor_rollout_ref
    model_config = omega_conf_to_dataclass(aref.model)
    actor_config = omega_conf_to_dataclass(aref.actor)
    actor_config.model_config = model_config
    cfg = TrainingWorkerConfig(
        model_type="language_model",
        model_config=model_config,
        engine_config=actor_config.engine,
        optimizer_config=actor_config.optim,
        checkpoint_config=actor_config.checkpoint,
    )
    cfg.engine_config.use_dynamic_bsz = aref.actor.use_dynamic_bsz
    cfg.engine_config.infer_max_token_len_per_gpu = aref.rollout.log_prob_max_token_len_per_gpu
    cfg.engine_config.infer_micro_batch_size_per_gpu = aref.rollout.log_prob_micro_batch_size_per_gpu
    cfg.engine_config.max_token_len_per_gpu = aref.actor.ppo_max_token_len_per_gpu
    cfg.engine_config.micro_batch_size_per_gpu = aref.actor.ppo_micro_batch_size_per_gpu
    cfg.engine_config.use_remove_padding = model_config.get("use_remove_padding", False)
    worker = BuPOTrainingWorker(config=cfg)
    worker.reset()  # builds the FSDP2 engine, installs the BuPO engine, runs the slicing self-test
    worker.set_loss_fn(partial(ppo_loss, config=actor_config))
    return worker


def make_batch(n_seqs: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """A verl left/right-padded batch (random ids), varied lengths, as a TensorDict on CPU."""
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    total = prompt_len + response_len
    input_ids = torch.zeros(n_seqs, total, dtype=torch.long)
    attention = torch.zeros(n_seqs, total, dtype=torch.long)
    response_mask = torch.zeros(n_seqs, response_len, dtype=torch.long)
    for i in range(n_seqs):
        p = prompt_len - (i * prompt_len) // (4 * n_seqs)
        r = response_len - (i * response_len) // (4 * n_seqs)
        input_ids[i, prompt_len - p : prompt_len] = torch.randint(2, vocab, (p,), generator=g)
        input_ids[i, prompt_len : prompt_len + r] = torch.randint(2, vocab, (r,), generator=g)
        attention[i, prompt_len - p : prompt_len + r] = 1
        response_mask[i, :r] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return TensorDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": position_ids,
            "prompts": input_ids[:, :prompt_len],
            "responses": input_ids[:, prompt_len:],
            "response_mask": response_mask,
        },
        batch_size=[n_seqs],
    )


def _snapshot(worker, max_elems: int) -> dict[str, torch.Tensor]:
    """The first ``max_elems`` entries of every parameter (all of small ones), float32 on CPU."""
    snap = {}
    for name, p in worker.engine.module.named_parameters():
        full = p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
        snap[name] = full.reshape(-1)[:max_elems].float().cpu().clone()
        del full
    return snap


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _engine_call(worker, td, *, train: bool, device: str, label: str) -> tuple[dict, dict]:
    with Peak(device) as mem:
        out = worker.train_mini_batch(td) if train else worker.infer_batch(td)
    from verl.utils import tensordict_utils as tu

    from verl_ext.bupo.worker import _numbers

    metrics = {}
    if out is not None:
        for key, value in (tu.get(out, "metrics", default=None) or {}).items():
            vals = _numbers(value)
            if vals:
                metrics[key] = _r(sum(vals) / len(vals))
    return out, {**mem.record(label), f"{label}_metrics": metrics}


def check_engine(args: argparse.Namespace) -> dict:
    """One phase-1 and one phase-2 update through verl's FSDP2 engine (old log-probs first, as the trainer)."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    device, layer = args.device, args.engine_layer
    shape = args.engine_shape
    n_layers = SHAPES[shape].num_hidden_layers
    rec: dict = {
        "shape": shape,
        "layers": n_layers,
        "exit_layer": layer,
        "seqs": args.engine_seqs,
        "prompt_len": args.engine_prompt_len,
        "response_len": args.engine_response_len,
        "lr": args.engine_lr,
    }
    init_process_group(device)
    # ---- a random model on disk (bf16 safetensors; verl loads it as fp32 master weights)
    model_root = Path(args.model_dir or _model_dir_for(shape))
    model_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"bupo_{shape}_", dir=model_root))
    try:
        t0 = time.perf_counter()
        fields = {k: v for k, v in SHAPES[shape].__dict__.items() if k != "arch"}
        if args.small:  # tie the tiny model's head to its embedding, as Qwen3-4B's (verl loads tied models
            fields["tie_word_embeddings"] = True  # without meta-device init: the GPU run's path)
        model = make_model(
            SHAPES[shape].arch, **fields, dtype=torch.bfloat16, device=device, attn_implementation="sdpa"
        )
        rec["tied_embeddings"] = bool(model.config.tie_word_embeddings)
        vocab = model.config.vocab_size
        _sync(device)
        rec["model_build_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        save_model_and_tokenizer(model, tmp)
        rec["model_save_s"] = round(time.perf_counter() - t0, 2)
        rec["model_dir"] = str(tmp)
        rec["model_params"] = sum(p.numel() for p in model.parameters())
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        emit({"check": "engine.model", **rec})

        t0 = time.perf_counter()
        config = compose_config(str(tmp), args)
        worker = build_actor(config)
        _sync(device)
        rec["engine_build_s"] = round(time.perf_counter() - t0, 2)
        if device.startswith("cuda"):
            rec["engine_built_mem_mib"] = _r(torch.cuda.memory_allocated() / MiB, 7)
        opt = getattr(worker.engine, "optimizer", None)
        if opt is not None:
            rec["optimizer"] = {
                "class": type(opt).__name__,
                **{k: opt.defaults.get(k) for k in ("lr", "weight_decay", "foreach", "fused")},
            }
        emit(
            {
                "check": "engine.build",
                "engine_build_s": rec["engine_build_s"],
                "optimizer": rec.get("optimizer"),
            }
        )

        batch = make_batch(args.engine_seqs, args.engine_prompt_len, args.engine_response_len, vocab)
        rec["tokens"] = int(batch["attention_mask"].sum())
        rec["response_tokens"] = int(batch["response_mask"].sum())
        snap0 = _snapshot(worker, args.snapshot_elems)

        def run_phase(exit_layer: int, label: str) -> dict:
            td = left_right_2_no_padding(batch.clone())
            tu.assign_non_tensor(
                td, temperature=1.0, calculate_entropy=True, compute_loss=False, bupo_exit_layer=exit_layer
            )
            out, info = _engine_call(worker, td, train=False, device=device, label=f"{label}_old_log_prob")
            old = no_padding_2_padding(out["log_probs"], td).float().cpu()
            upd = batch.clone()
            upd["old_log_probs"] = old
            g = torch.Generator().manual_seed(7)
            adv = (torch.randint(0, 2, (args.engine_seqs, 1), generator=g).float() * 2 - 1).expand_as(old)
            upd["advantages"] = adv.contiguous() * batch["response_mask"]
            td = left_right_2_no_padding(upd)
            tu.assign_non_tensor(
                td,
                temperature=1.0,
                calculate_entropy=True,
                global_batch_size=args.engine_seqs,
                mini_batch_size=args.engine_seqs,
                epochs=1,
                seed=1,
                dataloader_kwargs={"shuffle": False},
                bupo_exit_layer=exit_layer,
            )
            _, upd_info = _engine_call(worker, td, train=True, device=device, label=f"{label}_update")
            info.update(upd_info)
            info[f"{label}_update_tokens_per_s"] = _r(rec["tokens"] / max(info[f"{label}_update_s"], 1e-9), 5)
            return info

        # ---- phase 1: pi^k, only layers <= k, the embedding and the head may change
        rec.update(run_phase(layer, "phase1"))
        snap1 = _snapshot(worker, args.snapshot_elems)
        changed1 = {k for k in snap0 if not torch.equal(snap0[k], snap1[k])}
        bad_changed = sorted(
            k
            for k in changed1
            if (_layer_of(k) is not None and _layer_of(k) > layer) or k.endswith("model.norm.weight")
        )
        bad_unchanged = sorted(
            k
            for k in snap0
            if k not in changed1
            and ((_layer_of(k) is not None and _layer_of(k) <= layer) or "embed_tokens" in k)
        )
        rec.update(
            phase1_params_checked=len(snap0),
            phase1_changed=len(changed1),
            phase1_upper_changed=bad_changed[:20],
            phase1_lower_unchanged=bad_unchanged[:20],
            phase1_ok=not bad_changed and not bad_unchanged,
        )
        emit({"check": "engine.phase1", **{k: v for k, v in rec.items() if k.startswith("phase1")}})

        # ---- phase 2: the full policy, every parameter changes
        rec.update(run_phase(-1, "phase2"))
        snap2 = _snapshot(worker, args.snapshot_elems)
        unchanged2 = sorted(k for k in snap1 if torch.equal(snap1[k], snap2[k]))
        rec.update(phase2_unchanged=unchanged2[:20], phase2_ok=not unchanged2)
        emit({"check": "engine.phase2", **{k: v for k, v in rec.items() if k.startswith("phase2")}})
        if device.startswith("cuda"):
            rec["phase1_vs_phase2_update_peak"] = _r(
                rec["phase1_update_peak_mib"] / rec["phase2_update_peak_mib"], 4
            )
            rec["phase1_vs_phase2_update_time"] = _r(rec["phase1_update_s"] / rec["phase2_update_s"], 4)
        rec["status"] = "pass" if rec["phase1_ok"] and rec["phase2_ok"] else "fail"
        return rec
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _model_dir_for(shape: str) -> str:
    """Where to save the random model: /dev/shm when it has room (fast, RAM-backed), else the temp dir."""
    shm = Path("/dev/shm")
    need = 2**30 if shape == "tiny" else 32 * 2**30  # a bf16 Qwen3-8B is 16 GB; keep room for the rest
    with contextlib.suppress(OSError):
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need:
            return str(shm)
    return tempfile.gettempdir()


# ------------------------------------------------------------------------------------------ summary
def summarize(out: Path) -> dict:
    """Fold ``results.jsonl`` and ``bench_*.jsonl`` into ``summary.json`` (overall pass/fail/incomplete)."""
    records = []
    results = out / "results.jsonl"
    if results.exists():
        for line in results.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    checks: dict = {}
    steps: dict = {}
    device = None
    on_cpu = False  # the CPU smoke: benchmark targets on tiny shapes are reported, not judged
    for r in records:
        if "step" in r:
            steps[r["step"]] = r
        elif r.get("check") in CHECKS:
            checks[r["check"]] = {k: r.get(k) for k in ("status", "reason", "error", "elapsed_s") if k in r}
            if r["check"] == "env":
                device = r.get("nvidia_smi") or r.get("gpu") or r.get("device")
                on_cpu = r.get("device") == "cpu"

    def why(step: dict) -> str:
        if step.get("skipped"):
            return f"skipped: {step['skipped']}"
        if step.get("timed_out"):
            return f"timed out after {step.get('elapsed_s')} s"
        return f"exited {step.get('rc')} without a result"

    for name, step in steps.items():
        if name in CHECKS and name not in checks:
            checks[name] = {"status": "incomplete", "reason": why(step)}
    benches: dict = {}
    for path in sorted(out.glob("bench_*.jsonl")):
        name = path.stem
        target = None
        errors = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                if r.get("targets") is True:
                    target = r
                elif "error" in r:
                    errors.append(f"{r.get('variant')}/{r.get('mode')}: {r['error'][:120]}")
        if target is None:
            step = steps.get(name)
            benches[name] = {"status": "incomplete", "reason": why(step) if step else "no targets line"}
            continue
        oks = target.get("target_ok", {})
        if name.endswith("_32k"):  # only the 32k target applies (no fork run at 32768 tokens)
            oks = {k: v for k, v in oks.items() if "32k" in k} or oks
        status = "pass" if oks and all(v is True for v in oks.values()) else "fail"
        if any(v is None for v in oks.values()):
            status = "incomplete"
        if on_cpu:
            status = "not judged (CPU smoke, tiny shapes)"
        benches[name] = {"status": status, "target_ok": oks, "ratios": target.get("ratios"), "errors": errors}
    for name, step in steps.items():
        if name.startswith("bench_") and name not in benches:
            benches[name] = {"status": "incomplete", "reason": why(step)}
    statuses = [c["status"] for c in checks.values()]
    statuses += [b["status"] for b in benches.values() if not b["status"].startswith("not judged")]
    if any(s in ("fail", "error") for s in statuses):
        overall = "fail"
    elif any(s == "incomplete" for s in statuses) or not statuses:
        overall = "incomplete"
    elif any(s == "skipped" for s in statuses):
        overall = "pass (with skipped checks)"
    else:
        overall = "pass"
    summary = {"overall": overall, "device": device, "checks": checks, "benchmarks": benches}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    print(json.dumps({"summary": summary}, default=_json_default), flush=True)
    return summary


# --------------------------------------------------------------------------------------------- main
RUNNERS = {
    "env": check_env,
    "exact_tiny": check_exact_tiny,
    "triton": check_triton,
    "exact_4b": check_exact_4b,
    "engine": check_engine,
}


def run_check(name: str, args: argparse.Namespace) -> dict:
    """Run one check; any exception becomes an ``error`` record (the next check still runs)."""
    t0 = time.perf_counter()
    try:
        rec = RUNNERS[name](args)
    except Exception as exc:  # noqa: BLE001
        rec = {
            "status": "error",
            "error": f"{type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
        if args.device.startswith("cuda") and isinstance(exc, torch.OutOfMemoryError):
            rec["cuda_max_allocated_mib"] = _r(torch.cuda.max_memory_allocated() / MiB, 7)
    rec = {"check": name, "device": args.device, **rec, "elapsed_s": round(time.perf_counter() - t0, 2)}
    gc.collect()
    if args.device.startswith("cuda"):
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    return emit(rec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--cpu-smoke`` = ``--device cpu --small``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/gpu_check", help="folder for results.jsonl / summary.json")
    p.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--small", action="store_true", help="tiny shapes everywhere (the CPU smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="--device cpu --small")
    p.add_argument("--summarize", action="store_true", help="only write summary.json from the out folder")
    p.add_argument("--engine-shape", default=None, help="model shape (default qwen3-4b; tiny with --small)")
    p.add_argument("--engine-layer", type=int, default=None, help="0-based exit layer k (default 5; 1 small)")
    p.add_argument("--engine-seqs", type=int, default=4)
    p.add_argument("--engine-prompt-len", type=int, default=None, help="default 256 (8 small)")
    p.add_argument("--engine-response-len", type=int, default=None, help="default 768 (16 small)")
    p.add_argument("--engine-train-tokens", type=int, default=None, help="ppo_max_token_len_per_gpu (2048)")
    p.add_argument(
        "--engine-infer-tokens", type=int, default=None, help="log_prob_max_token_len_per_gpu (4096)"
    )
    p.add_argument("--engine-lr", type=float, default=1e-6, help="the paper's learning rate")
    p.add_argument(
        "--engine-foreach", action=argparse.BooleanOptionalAction, default=False, help="foreach AdamW (off)"
    )
    p.add_argument("--snapshot-elems", type=int, default=65536, help="entries of each parameter compared")
    p.add_argument(
        "--model-dir", default=None, help="where the random model is saved (default /dev/shm or tmp)"
    )
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.small = "cpu", True
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small
    args.engine_shape = args.engine_shape or ("tiny" if small else "qwen3-4b")
    args.engine_layer = args.engine_layer if args.engine_layer is not None else (1 if small else 5)
    args.engine_prompt_len = args.engine_prompt_len or (8 if small else 256)
    args.engine_response_len = args.engine_response_len or (16 if small else 768)
    args.engine_train_tokens = args.engine_train_tokens or (64 if small else 2048)
    args.engine_infer_tokens = args.engine_infer_tokens or (128 if small else 4096)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the requested checks (or the summary); exit status 0 unless a check failed or errored."""
    global _OUT
    args = parse_args(argv)
    _OUT = Path(args.out)
    _OUT.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        summary = summarize(_OUT)
        return 0 if summary["overall"].startswith("pass") else 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":
        install_cpu_shim()
    statuses = [run_check(name, args)["status"] for name in args.checks]
    return 1 if any(s in ("fail", "error") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
