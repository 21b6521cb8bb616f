#!/usr/bin/env bash
# Avg@K / pass@K of Qwen3-4B with verl's validation only (paper protocol: temperature 1.0, 32 samples per
# problem on AIME24/25, 16 on AMC23/MATH500), through examples/run_qwen3_4b_bupo.sh; report in $OUT/report.
#
#   bash examples/eval_qwen3_4b.sh [hydra overrides...]
#   = bash examples/eval_val_only.sh examples/run_qwen3_4b_bupo.sh qwen3 [hydra overrides...]
#
#   bash examples/eval_qwen3_4b.sh                                            # the base model
#   bash examples/eval_qwen3_4b.sh actor_rollout_ref.model.path=/path/to/hf   # another HF checkpoint
#   RESUME_MODE=auto bash examples/eval_qwen3_4b.sh                           # the run's latest checkpoint
#   N=16 OUT=outputs/eval/qwen3_4b-n16 bash examples/eval_qwen3_4b.sh  # 16 samples everywhere
#
# Environment variables: see examples/eval_val_only.sh.
exec bash "$(dirname "$0")/eval_val_only.sh" "$(dirname "$0")/run_qwen3_4b_bupo.sh" qwen3 "$@"
