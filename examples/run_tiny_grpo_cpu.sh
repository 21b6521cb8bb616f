#!/usr/bin/env bash
# The GRPO twin of run_tiny_bupo_cpu.sh: same tiny model, task, seed and settings, full policy at every
# step (bupo.enable=false). Outputs go to $OUT_DIR (default outputs/tiny_cpu/grpo).
#
#   bash examples/run_tiny_grpo_cpu.sh [hydra overrides...]
set -euo pipefail
source "$(dirname "$0")/_cpu_common.sh"
run_tiny_cpu grpo bupo.enable=false trainer.experiment_name=tiny_cpu_grpo "$@"
