#!/usr/bin/env bash
# Bottom-up schedule beyond the paper on Qwen3-4B: layer 5 for 20 steps, layer 17 for 10, then the full policy.
#
#   bash examples/run_qwen3_4b_bupo_schedule.sh [hydra overrides...]      # e.g. trainer.total_training_steps=10
#   bash examples/run_qwen3_4b_bupo_schedule.sh --cfg job                  # print the composed config, start nothing
#
# Settings (spec section 3): 8 GPUs, lr 1e-6, 128 prompts x 8 samples, mini-batch 32,
# 300 steps, validation with sampling (Avg@16). Paths: see examples/_common.sh.
source "$(dirname "$0")/_common.sh"
run_recipe qwen3_4b qwen3 'bupo.schedule=[{layer:5,steps:20},{layer:17,steps:10}]' trainer.experiment_name=qwen3_4b_bupo_schedule "$@"
