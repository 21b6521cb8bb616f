#!/usr/bin/env bash
# BuPO on OctoThinker-8B-Long-Base: pi^31 (0-based layer 30) for 20 steps, then GRPO; plain-text prompt, 3072-token responses.
#
#   bash examples/run_octothinker_8b_bupo.sh [hydra overrides...]      # e.g. trainer.total_training_steps=10
#   bash examples/run_octothinker_8b_bupo.sh --cfg job                  # print the composed config, start nothing
#
# Paper settings (spec section 3): 8 GPUs, lr 1e-6, 128 prompts x 8 samples, mini-batch 32,
# 300 steps, validation with sampling (Avg@16). Paths: see examples/_common.sh.
source "$(dirname "$0")/_common.sh"
run_recipe octothinker_8b octothinker  "$@"
