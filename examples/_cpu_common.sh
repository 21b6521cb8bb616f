#!/usr/bin/env bash
# Shared by the tiny CPU run scripts (source it, then call run_tiny_cpu). Not meant to be run alone.
#
# Environment variables (all optional):
#   OUT_DIR   where the run writes (default outputs/tiny_cpu/<name>)
#   TOY_DIR   the toy model and data (default outputs/tiny_cpu/toy; built on first use)
#   TOY_ARCH  model_type of the toy model (default qwen3; e.g. qwen3_moe, with its own TOY_DIR)
#   RUN_TIMEOUT  wall-clock limit in seconds: past it the run and everything it started is stopped (exit 124)
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# run_tiny_cpu NAME [hydra overrides...]
run_tiny_cpu() {
  local name=$1
  shift
  cd "$REPO_ROOT"
  local out=${OUT_DIR:-$REPO_ROOT/outputs/tiny_cpu/$name}
  local toy=${TOY_DIR:-$REPO_ROOT/outputs/tiny_cpu/toy}
  export VERL_PLATFORM=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=${WANDB_MODE:-disabled}
  export RAY_AUTH_MODE=disabled TORCH_COMPILE_DISABLE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
  export VERL_FILE_LOGGER_ROOT=$out/logs
  local supervise=(python -m verl_ext.cpu.supervise ${RUN_TIMEOUT:+--timeout "$RUN_TIMEOUT"} --)
  local arg
  for arg in "$@"; do
    case $arg in --cfg | --help | --hydra-help | -c) supervise=() ;; esac  # print only: build nothing
  done
  [[ ${#supervise[@]} == 0 ]] || python -m verl_ext.toy_task "$toy" --arch "${TOY_ARCH:-qwen3}" >/dev/null
  "${supervise[@]}" \
    python -m recipe.bupo.main_bupo preset=tiny_cpu \
    actor_rollout_ref.model.path="$toy/model" \
    data.train_files="$toy/train.parquet" \
    data.val_files="$toy/val.parquet" \
    trainer.default_local_dir="$out/ckpt" \
    "$@"
  [[ ${#supervise[@]} != 0 ]] || return 0
  local logs=("$out"/logs/*/*.jsonl)
  [[ -e ${logs[0]} ]] || return 0
  python -m verl_ext.plot_run "${logs[@]}" --out "$out/plots"
  python -m verl_ext.run_summary "${logs[@]}" --json "$out/summary.json"
  echo "outputs: checkpoints $out/ckpt, logs $out/logs, plot $out/plots/metrics.png, summary $out/summary.json"
}
