#!/usr/bin/env bash
# Evaluate a model with verl's validation only (no training), the paper's protocol: sampling at temperature
# 1.0, 32 samples per problem for AIME24/25 and 16 for AMC23/MATH500; then Avg@K and pass@K per data set.
#
#   bash examples/eval_val_only.sh RUN_SCRIPT STYLE [hydra overrides...]
#   bash examples/eval_val_only.sh examples/run_qwen3_4b_bupo.sh qwen3 actor_rollout_ref.model.path=/ckpt/hf
#
# Steps:
#   1. python -m verl_ext.data ensure --out $DATA_DIR --style STYLE [--src $DATA_SRC]
#   2. python -m verl_ext.data retemplate --src $DATA_DIR --out $OUT/val_data --style STYLE --val-only --val-n $VAL_N
#      (copies of the four validation files with a __rollout_n__ column = samples per problem)
#   3. bash RUN_SCRIPT trainer.val_only=True trainer.val_before_train=True data.val_files=[$OUT/val_data/...]
#        actor_rollout_ref.rollout.val_kwargs.{n=$N,do_sample=True,temperature=$TEMPERATURE}
#        trainer.validation_data_dir=$OUT/generations trainer.resume_mode=$RESUME_MODE trainer.logger=[console] "$@"
#   4. python -m verl_ext.evaluate $OUT/generations --out $OUT/report --data $OUT/val_data/*.parquet
#      -> $OUT/report/results.md, results.csv, pass_at_k.png
#
# Environment variables (all optional):
#   OUT          output folder (default ./outputs/eval/<run script name>)
#   VAL_N        samples per problem: paper (default; 32 AIME, 16 others), an integer, or data_source=n pairs
#   N            shorthand for VAL_N=N (same n everywhere); also verl's fallback val_kwargs.n (default 16)
#   TEMPERATURE  sampling temperature (default 1.0)
#   RESUME_MODE  disable (default: evaluate actor_rollout_ref.model.path) or auto (load the latest checkpoint
#                of the run's trainer.experiment_name, i.e. evaluate the trained model)
#   DATA_DIR, DATA_SRC, MODEL_PATH, N_GPUS, NNODES: as for the run scripts (examples/_common.sh)
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,12p' "$0" >&2
  exit 2
fi
RUN_SCRIPT=$1
STYLE=$2
shift 2

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$PWD/outputs/eval/$(basename "$RUN_SCRIPT" .sh)}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
DATA_DIR=${DATA_DIR:-$HOME/data/bupo/$STYLE}
VAL_N=${VAL_N:-${N:-paper}}
VAL="$OUT/val_data"

cd "$REPO_ROOT"
python -m verl_ext.data ensure --out "$DATA_DIR" --style "$STYLE" ${DATA_SRC:+--src "$DATA_SRC"}
python -m verl_ext.data retemplate --src "$DATA_DIR" --out "$VAL" --style "$STYLE" --val-only --val-n "$VAL_N"

DATA_DIR="$DATA_DIR" bash "$RUN_SCRIPT" \
  trainer.val_only=True \
  trainer.val_before_train=True \
  "data.val_files=[$VAL/math500.parquet,$VAL/amc2023.parquet,$VAL/aime_2024.parquet,$VAL/aime_2025.parquet]" \
  actor_rollout_ref.rollout.val_kwargs.n="${N:-16}" \
  actor_rollout_ref.rollout.val_kwargs.do_sample=True \
  actor_rollout_ref.rollout.val_kwargs.temperature="${TEMPERATURE:-1.0}" \
  trainer.validation_data_dir="$OUT/generations" \
  trainer.resume_mode="${RESUME_MODE:-disable}" \
  "trainer.logger=[console]" \
  "$@"

for arg in "$@"; do  # --cfg job / --help only print the composed config: nothing to evaluate
  case $arg in --cfg | --help | --hydra-help | -c) exit 0 ;; esac
done
python -m verl_ext.evaluate "$OUT/generations" --out "$OUT/report" --data "$VAL"/*.parquet
