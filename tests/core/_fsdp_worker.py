"""Two-rank gloo worker for ``test_fsdp_slicing.py``: layer slicing inside FSDP2 and FSDP1 on CPU.

Usage: ``python tests/core/_fsdp_worker.py OUT.json [MODE ...]`` with MODE one of :data:`CASES`
(``fsdp2-qwen3``, ``fsdp1-qwen3``, ``fsdp2-llama``, ``fsdp1-qwen2``; default all). It forks two CPU processes (gloo on 127.0.0.1, a free port); on every rank and for
every mode it builds the same tiny random model twice from one seed, keeps one copy unwrapped as the
single-process reference and wraps the other (FSDP2: ``fully_shard`` on each decoder layer then the
root on a CPU device mesh; FSDP1: ``FullyShardedDataParallel`` with ``use_orig_params=True`` and one
unit per decoder layer), then

* runs :func:`verl_ext.slicing.check_slicing` on the wrapped model,
* runs a sliced forward through the wrapped model's own top-level forward under
  :func:`verl_ext.slicing.exit_after_layer`, a backward outside the context and an AdamW step,

and records, for the test to assert on: logits error against ``lm_head(hidden_states[k+1])`` of the
reference, per-layer forward-call counts, gradient errors against the reference's gradients, which
parameters got a gradient, and which parameters the optimizer changed. Both ranks feed the same
batch, so FSDP's averaged gradients equal the single-process ones. Rank 0 writes everything as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LAYER = 1  # 0-based exit layer (of 4)
SEED = 0
# mode -> (wrapper, architecture, tied embeddings); Qwen3-8B is untied, Qwen3-4B and Llama 3.2 tied.
CASES = {
    "fsdp2-qwen3": ("fsdp2", "qwen3", False),
    "fsdp1-qwen3": ("fsdp1", "qwen3", True),
    "fsdp2-llama": ("fsdp2", "llama", True),
    "fsdp1-qwen2": ("fsdp1", "qwen2", False),
}
MODES = tuple(CASES)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean(name: str) -> str:
    """Parameter name without FSDP1 / checkpoint wrapper prefixes."""
    for prefix in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(prefix, "")
    return name


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch of two rows (lengths 9 and 6), its mask and position ids."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3] = 0
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = (mask[:, :-1] * mask[:, 1:]).float()
    return -(logp * valid).sum() / valid.sum()


def _reference(arch: str, tied: bool) -> dict:
    """Single-process reference: logits of layer LAYER (raw H^{k+1}), loss and parameter gradients."""
    from verl_ext.random_models import make_model

    model = make_model(arch, seed=SEED, init_std=0.1, tie_word_embeddings=tied)
    ids, mask, pos = _batch(model.config.vocab_size)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, use_cache=False
    )
    logits = model.lm_head(out.hidden_states[LAYER + 1])
    loss = _loss(logits, ids, mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": logits.detach(), "loss": loss.item(), "grads": grads}


def _wrap(model: torch.nn.Module, wrapper: str, world_size: int) -> torch.nn.Module:
    if wrapper == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_cls = type(model.model.layers[0])
    return FullyShardedDataParallel(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=True,
        auto_wrap_policy=ModuleWrapPolicy({layer_cls}),
    )


def _full_params_and_grads(model: torch.nn.Module, wrapper: str) -> tuple[dict, dict]:
    """Full (unsharded) parameters and gradients by clean name; gradient None where there is none."""
    params, grads = {}, {}
    if wrapper == "fsdp2":
        from torch.distributed.tensor import DTensor

        model.reshard()  # the root keeps its parameters unsharded after forward by default

        def full(t: torch.Tensor) -> torch.Tensor:
            return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

        for name, p in model.named_parameters():
            params[name] = full(p)
            grads[name] = None if p.grad is None else full(p.grad)
        return params, grads
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
        for name, p in model.named_parameters():
            params[_clean(name)] = p.detach().clone()
            grads[_clean(name)] = None if p.grad is None else p.grad.detach().clone()
    return params, grads


def _run_mode(mode: str, rank: int, world_size: int) -> dict:
    from verl_ext.random_models import make_model
    from verl_ext.slicing import SlicingError, check_slicing, exit_after_layer, find_decoder

    wrapper, arch, tied = CASES[mode]
    ref = _reference(arch, tied)
    model = _wrap(make_model(arch, seed=SEED, init_std=0.1, tie_word_embeddings=tied), wrapper, world_size)
    decoder = find_decoder(model)
    n_layers = len(decoder.layers)
    result: dict = {
        "mode": mode,
        "rank": rank,
        "n_layers": n_layers,
        "layer": LAYER,
        "arch": arch,
        "tied": tied,
    }

    own_hooks = [len(lay._forward_hooks) + len(lay._forward_pre_hooks) for lay in decoder.layers]
    try:
        check_slicing(model)
        result["check_slicing"] = "ok"
    except SlicingError as exc:  # reported, asserted by the test
        result["check_slicing"] = f"SlicingError: {exc}"
    # FSDP registers hooks of its own: compare with the count before the self-test.
    result["hooks_left"] = [
        len(lay._forward_hooks) + len(lay._forward_pre_hooks) - n for lay, n in zip(decoder.layers, own_hooks)
    ]
    result["config_layers_after_check"] = decoder.config.num_hidden_layers

    before, _ = _full_params_and_grads(model, wrapper)
    calls = [0] * n_layers
    handles = [
        lay.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, lay in enumerate(decoder.layers)
    ]
    ids, mask, pos = _batch(decoder.config.vocab_size)
    model.train()
    with exit_after_layer(model, LAYER):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    for h in handles:
        h.remove()
    loss = _loss(logits, ids, mask)
    loss.backward()  # outside the context: backward needs no slicing state
    result["calls"] = calls
    result["config_layers_after_context"] = decoder.config.num_hidden_layers
    result["logits_err"] = (logits.detach() - ref["logits"]).abs().max().item()
    result["loss_err"] = abs(loss.item() - ref["loss"])

    params, grads = _full_params_and_grads(model, wrapper)
    # FSDP1 keeps one flat gradient per unit: a parameter of a unit that took part in backward but not in
    # the loss (the final norm here) shows a zero gradient instead of None. Record non-zero ones.
    result["with_grad"] = sorted(n for n, g in grads.items() if g is not None and bool(g.abs().sum() > 0))
    result["grad_none"] = sorted(n for n, g in grads.items() if g is None)
    result["param_names"] = sorted(grads)
    result["ref_with_grad"] = sorted(ref["grads"])
    errs = {n: (grads[n] - g).abs().max().item() for n, g in ref["grads"].items() if grads.get(n) is not None}
    result["grad_err"] = max(errs.values()) if errs else float("inf")
    result["grad_compared"] = len(errs)

    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    optim.step()
    after, _ = _full_params_and_grads(model, wrapper)
    result["changed"] = sorted(n for n in after if not torch.equal(after[n], before[n]))
    del params
    return result


def _worker(rank: int, world_size: int, port: int, out_path: str, modes: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = []
        for mode in modes:
            try:
                results.append(_run_mode(mode, rank, world_size))
            except Exception:
                results.append({"mode": mode, "rank": rank, "error": traceback.format_exc()})
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, results)
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump([r for rank_results in gathered for r in rank_results], f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str]) -> None:
    """Spawn two gloo ranks and write the results of the requested modes to ``argv[0]``."""
    out_path = argv[0]
    modes = argv[1:] or list(MODES)
    # Import the heavy modules once here and fork: the ranks start in a fraction of a second. No
    # OpenMP region has run in this process yet, so forking is safe.
    import verl_ext.random_models  # noqa: F401
    import verl_ext.slicing  # noqa: F401

    mp.start_processes(
        _worker, args=(2, _free_port(), out_path, modes), nprocs=2, join=True, start_method="fork"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
