"""Two-process gloo run of the BuPO actor: one phase-1 update, then one phase-2 update.

Run by test_two_rank_update.py as ``python _two_rank_update.py MODEL_DIR OUT_JSON LAYER``; each rank
builds verl's real FSDP2 engine on CPU (the layers are sharded over both ranks), updates on its own
half of the batch, and rank 0 writes which parameters each update changed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def _full(worker) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in worker.engine.module.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def _run(rank: int, model_dir: str, out_json: str, layer: int, init_file: str) -> None:
    import _verl_cpu as vc

    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = "29611"
    vc.init_gloo(rank=rank, world_size=2, init_file=init_file)
    cfg = vc.compose(model_dir, ["actor_rollout_ref.actor.ppo_mini_batch_size=4"])
    worker, _ = vc.build_actor(cfg)

    prompts = [[5, 6, 7], [8, 9]] if rank == 0 else [[20, 21], [22, 23, 24]]
    responses = [[10, 11, 12], [14, 15]] if rank == 0 else [[30, 31, 32, 33], [34]]

    def batch(phase_layer: int):
        return vc.make_update_batch(prompts, responses, phase_layer, global_batch_size=4)

    before = _full(worker)
    worker.train_mini_batch(batch(layer))
    after1 = _full(worker)
    worker.train_mini_batch(batch(-1))
    after2 = _full(worker)
    if rank == 0:
        result = {
            "params": sorted(before),
            "changed_phase1": sorted(k for k in before if not torch.equal(before[k], after1[k])),
            "changed_phase2": sorted(k for k in before if not torch.equal(after1[k], after2[k])),
        }
        Path(out_json).write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    model_dir, out_json, layer = sys.argv[1], sys.argv[2], int(sys.argv[3])
    init_file = tempfile.mktemp(prefix="gloo2_")
    mp.spawn(_run, args=(model_dir, out_json, layer, init_file), nprocs=2, join=True)
