#!/usr/bin/env bash
# Shared by the run scripts (source it, then call run_recipe). Not meant to be run on its own.
#
# Environment variables (all optional):
#   MODEL_PATH   model id or local path (default: the preset's Hugging Face id)
#   DATA_DIR     folder with train.parquet + the four validation files
#                (default ~/data/bupo/<style>; built on first use by `python -m verl_ext.data ensure`)
#   DATA_SRC     build DATA_DIR offline by re-templating existing verl parquet files from this folder
#   N_GPUS       GPUs per node (default 8), NNODES (default 1)
#   LOG_DIR      where the local JSONL metrics file goes (default ./outputs/logs)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# run_recipe PRESET STYLE [hydra overrides...]
run_recipe() {
  local preset=$1 style=$2
  shift 2
  local data_dir=${DATA_DIR:-$HOME/data/bupo/$style}
  local print_only=0
  for arg in "$@"; do
    case $arg in --cfg | --help | --hydra-help | -c) print_only=1 ;; esac
  done
  if [[ $print_only == 0 ]]; then
    python -m verl_ext.data ensure --out "$data_dir" --style "$style" ${DATA_SRC:+--src "$DATA_SRC"}
  fi
  export VERL_FILE_LOGGER_ROOT=${LOG_DIR:-$PWD/outputs/logs}
  cd "$REPO_ROOT"
  python -m recipe.bupo.main_bupo \
    preset="$preset" \
    data.train_files="$data_dir/train.parquet" \
    "data.val_files=[$data_dir/math500.parquet,$data_dir/amc2023.parquet,$data_dir/aime_2024.parquet,$data_dir/aime_2025.parquet]" \
    trainer.n_gpus_per_node="${N_GPUS:-8}" \
    trainer.nnodes="${NNODES:-1}" \
    ${MODEL_PATH:+actor_rollout_ref.model.path="$MODEL_PATH"} \
    "$@"
}
