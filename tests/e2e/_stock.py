"""Runs of verl's stock ``python -m verl.trainer.main_ppo`` with BuPO added by overrides only."""

from __future__ import annotations

import sys

from _e2e import cpu_env, run_cmd

# The tiny CPU run (recipe/bupo/config/preset/tiny_cpu.yaml) as overrides of verl's own ppo_trainer;
# the `+` keys are not in verl's YAML. This is what a team adds to its existing launch.
TINY_CPU = [
    "algorithm.adv_estimator=grpo",
    "data.train_batch_size=8",
    "data.max_prompt_length=48",
    "data.max_response_length=16",
    "data.dataloader_num_workers=0",
    "actor_rollout_ref.model.use_remove_padding=true",
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "actor_rollout_ref.actor.strategy=fsdp2",
    "actor_rollout_ref.actor.optim.lr=0.02",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "actor_rollout_ref.actor.use_dynamic_bsz=true",
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
    "actor_rollout_ref.actor.use_torch_compile=false",
    "actor_rollout_ref.actor.fsdp_config.model_dtype=fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
    "actor_rollout_ref.rollout.name=vllm",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.rollout.dtype=float32",
    "actor_rollout_ref.rollout.enforce_eager=true",
    "actor_rollout_ref.rollout.load_format=auto",
    "actor_rollout_ref.rollout.max_model_len=64",
    "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
    "+actor_rollout_ref.rollout.enable_sleep_mode=false",
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "reward.num_workers=1",
    "reward.custom_reward_function.path=pkg://verl_ext.toy_task",
    "reward.custom_reward_function.name=compute_score",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "ray_kwargs.ray_init.num_cpus=16",
    "+ray_kwargs.ray_init.num_gpus=1",
    "trainer.n_gpus_per_node=1",
    "trainer.nnodes=1",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
    "trainer.save_freq=-1",
    "trainer.logger=[console,file]",
    "trainer.project_name=bupo_stock",
]
BUPO = [
    "trainer.v1.trainer_mode=bupo_sync",
    "actor_rollout_ref.actor.policy_loss.loss_mode=bupo",
    "actor_rollout_ref.actor.clip_ratio_c=10.0",
]


def stock_run(out, toy, *overrides, timeout=900, log_name="log.jsonl"):
    cmd = [
        sys.executable, "-m", "verl_ext.cpu.supervise", "--",
        sys.executable, "-m", "verl.trainer.main_ppo",
        f"actor_rollout_ref.model.path={toy}/model",
        f"data.train_files={toy}/train.parquet",
        f"data.val_files={toy}/val.parquet",
        f"trainer.default_local_dir={out}/ckpt",
        *TINY_CPU, *overrides,
    ]  # fmt: skip
    env = cpu_env(VERL_PLATFORM="cpu", VLLM_CPU_KVCACHE_SPACE="1", RAY_AUTH_MODE="disabled")
    env["VERL_FILE_LOGGER_PATH"] = str(out / log_name)
    return run_cmd(cmd, env, out, timeout=timeout)
