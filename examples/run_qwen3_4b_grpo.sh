#!/usr/bin/env bash
# GRPO baseline on Qwen3-4B: identical to run_qwen3_4b_bupo.sh except BuPO is off.
#
#   bash examples/run_qwen3_4b_grpo.sh [hydra overrides...]      # e.g. trainer.total_training_steps=10
#   bash examples/run_qwen3_4b_grpo.sh --cfg job                  # print the composed config, start nothing
#
# Paper settings (spec section 3): 8 GPUs, lr 1e-6, 128 prompts x 8 samples, mini-batch 32,
# 300 steps, validation with sampling (Avg@16). Paths: see examples/_common.sh.
source "$(dirname "$0")/_common.sh"
run_recipe qwen3_4b qwen3 bupo.enable=false trainer.experiment_name=qwen3_4b_grpo "$@"
