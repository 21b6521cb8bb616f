#!/usr/bin/env bash
# Avg@K / pass@K of OctoThinker-8B-Long-Base with verl's validation only (paper protocol: temperature 1.0, 32 samples per
# problem on AIME24/25, 16 on AMC23/MATH500), through examples/run_octothinker_8b_bupo.sh; report in $OUT/report.
#
#   bash examples/eval_octothinker_8b.sh [hydra overrides...]
#   = bash examples/eval_val_only.sh examples/run_octothinker_8b_bupo.sh octothinker [hydra overrides...]
#
#   bash examples/eval_octothinker_8b.sh                                            # the base model
#   bash examples/eval_octothinker_8b.sh actor_rollout_ref.model.path=/path/to/hf   # another HF checkpoint
#   RESUME_MODE=auto bash examples/eval_octothinker_8b.sh                           # the run's latest checkpoint
#   N=16 OUT=outputs/eval/octothinker_8b-n16 bash examples/eval_octothinker_8b.sh  # 16 samples everywhere
#
# Environment variables: see examples/eval_val_only.sh.
exec bash "$(dirname "$0")/eval_val_only.sh" "$(dirname "$0")/run_octothinker_8b_bupo.sh" octothinker "$@"
