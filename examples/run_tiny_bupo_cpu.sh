#!/usr/bin/env bash
# BuPO end to end on a CPU machine, in a few minutes: a tiny random Qwen3 (4 layers) learns the toy
# "write digits" task through verl 0.9.1's own trainer, vLLM's CPU build for rollouts. Phase 1 trains
# the internal policy pi^2 (0-based layer 1) for steps 1-3, then the full policy up to step 8;
# validation before and after, checkpoints every 2 steps, the JSONL log, a plot and a summary.
#
#   bash scripts/install_cpu.sh && . .venv/bin/activate     # once: the CPU environment
#   bash examples/run_tiny_bupo_cpu.sh [hydra overrides...]  # e.g. trainer.total_training_steps=12
#
# Outputs go to $OUT_DIR (default outputs/tiny_cpu/bupo): ckpt/, logs/, plots/, summary.json.
# Runs that find a checkpoint there resume from it (trainer.resume_mode=auto). See docs/cpu.md.
set -euo pipefail
source "$(dirname "$0")/_cpu_common.sh"
run_tiny_cpu bupo "$@"
