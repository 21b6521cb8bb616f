"""Run verl 0.9.1's real FSDP engine on CPU (gloo, FSDP2) in the test process, and builders for it.

The package's CPU platform (:mod:`verl_ext.cpu.platform`, selected with ``VERL_PLATFORM=cpu``), a
gloo process group initialised first, the engine lookup pinned to the CUDA FSDP engine class, fp32
params. Test code only: never imported by the package.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import torch

RECIPE_CONFIG = Path(__file__).resolve().parents[2] / "recipe" / "bupo" / "config"

os.environ["VERL_PLATFORM"] = "cpu"
os.environ["VERL_ENGINE_DEVICE"] = "cuda"
os.environ["VERL_ENGINE_VENDOR"] = "nvidia"
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from verl_ext.cpu.workarounds import register_cpu_platform  # noqa: E402

register_cpu_platform()  # the package's own CPU platform (what VERL_PLATFORM=cpu selects in real runs)


def init_gloo(rank: int = 0, world_size: int = 1, init_file: str | None = None) -> None:
    """Initialise a gloo process group (verl then skips its own NCCL initialisation)."""
    import tempfile

    if torch.distributed.is_initialized():
        return
    # verl's Worker reads these even when the process group already exists.
    os.environ.update(
        WORLD_SIZE=str(world_size),
        RANK=str(rank),
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT", "29599"),
    )
    init_file = init_file or tempfile.mktemp(prefix="gloo_")
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )


def compose(model_path: str, overrides: list[str] = ()):
    """Compose the BuPO recipe config for a tiny local model on CPU (fp32, FSDP2, sdpa)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    base = [
        f"actor_rollout_ref.model.path={model_path}",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
        "actor_rollout_ref.actor.use_torch_compile=false",
        "actor_rollout_ref.actor.use_dynamic_bsz=false",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=false",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.optim.lr=1e-2",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        "actor_rollout_ref.model.enable_gradient_checkpointing=false",
        "trainer.n_gpus_per_node=1",
    ]
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        return hydra_compose("bupo_trainer", overrides=base + list(overrides))


def build_actor(config, worker_cls=None):
    """Build the actor TrainingWorker as ``ActorRolloutRefWorker.init_model`` does (no Ray)."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import TrainingWorkerConfig
    from verl.workers.utils.losses import ppo_loss

    if worker_cls is None:
        from verl_ext.bupo.worker import BuPOTrainingWorker as worker_cls

    model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    actor_config.model_config = model_config
    cfg = TrainingWorkerConfig(
        model_type="language_model",
        model_config=model_config,
        engine_config=actor_config.engine,
        optimizer_config=actor_config.optim,
        checkpoint_config=actor_config.checkpoint,
    )
    cfg.engine_config.use_dynamic_bsz = False
    cfg.engine_config.infer_micro_batch_size_per_gpu = 2
    cfg.engine_config.micro_batch_size_per_gpu = 2
    cfg.engine_config.use_remove_padding = model_config.get("use_remove_padding", False)
    worker = worker_cls(config=cfg)
    worker.reset()
    worker.set_loss_fn(partial(ppo_loss, config=actor_config))
    return worker, actor_config


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int = 0):
    """A verl left/right-padded batch (prompts left-padded, responses right-padded) as a TensorDict."""
    from tensordict import TensorDict

    P = max(len(p) for p in prompts)
    R = max(len(r) for r in responses)
    B = len(prompts)
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros(B, P + R, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        input_ids[i, P - len(p) : P] = torch.tensor(p)
        input_ids[i, P : P + len(r)] = torch.tensor(r)
        attention[i, P - len(p) : P + len(r)] = 1
        response_mask[i, : len(r)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return TensorDict(
        {
            "input_ids": input_ids,
            "attention_mask": attention,
            "position_ids": position_ids,
            "prompts": input_ids[:, :P],
            "responses": input_ids[:, P:],
            "response_mask": response_mask,
        },
        batch_size=[B],
    )


def make_update_batch(prompts, responses, layer: int, global_batch_size: int):
    """A no-padding PPO update batch (advantage +1 for the first row, -1 for the others) for ``layer``."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    batch = make_batch(prompts, responses)
    B, R = batch["responses"].shape
    batch["old_log_probs"] = torch.full((B, R), -3.0)
    batch["advantages"] = torch.tensor([[1.0] * R] + [[-1.0] * R] * (B - 1))
    td = left_right_2_no_padding(batch)
    tu.assign_non_tensor(
        td,
        temperature=1.0,
        calculate_entropy=True,
        global_batch_size=global_batch_size,
        mini_batch_size=global_batch_size,
        epochs=1,
        seed=1,
        dataloader_kwargs={"shuffle": False},
        bupo_exit_layer=layer,
    )
    return td
