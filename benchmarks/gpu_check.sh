#!/usr/bin/env bash
# GPU check of the internal-policy path (project issue 6): one prepared script, < 8 minutes on one
# H100, everything written under the output folder it is given.
#
# What it does, cheapest first, each step in its own process under `timeout` (one failing or slow
# step does not stop the others; a global deadline keeps the whole run under GPU_CHECK_BUDGET_S):
#   install   the carried wheels (.whl/) into $GPU_CHECK_SITE, then PYTHONPATH = that folder,
#             benchmarks/ray_stub (Ray stand-in: see docs/benchmarks.md), the repository
#   env       versions, the device line (nvidia-smi), ray = the stub, Triton head usable
#   exact_tiny, triton, exact_4b
#             bf16 exactness of internal_log_probs (tiny and Qwen3-4B-sized random models) and the
#             Triton head vs the chunked head, values and gradients (benchmarks/gpu_check.py)
#   bench_qwen3-4b, bench_qwen3-4b_32k
#             benchmarks/internal_forward.py --shape qwen3-4b (8192 tokens, every variant) and the
#             32768-token micro-batch (fused variants, update), against the core issue's targets
#   engine    one phase-1 and one phase-2 update through verl's FSDP2 engine, random Qwen3-4B-sized
#             model, one GPU, no Ray: layers above k unchanged after phase 1, all changed after
#             phase 2, peak memory and time of both
#   bench_qwen3-8b
#             benchmarks/internal_forward.py --shape qwen3-8b
#   summary   <out>/summary.json (overall pass / fail / incomplete)
#
# Output (at most 8 files, as a device call returns): log.txt (everything printed), results.jsonl
# (one JSON line per check, sub-step and step exit status), bench_qwen3-4b.jsonl,
# bench_qwen3-4b_32k.jsonl, bench_qwen3-8b.jsonl, summary.json.
#
# The exact commands:
#   here, once (PyPI reachable):   bash benchmarks/fetch_gpu_wheels.sh
#   on the device machine:         bash benchmarks/gpu_check.sh "$OUT"      (carry: [".whl"], timeout_s 540)
#   here, the whole driver on CPU with tiny shapes (what the tests do, minus the driver):
#                                  GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh /tmp/gpu_check_smoke
#
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 450), GPU_CHECK_SITE (default
# /tmp/bupo_gpu_site), GPU_CHECK_SMOKE=1 (CPU, tiny shapes: proves the driver and the code paths),
# GPU_CHECK_STEPS="engine bench_qwen3-8b" (a subset, e.g. to rerun what failed into the same OUT:
# results.jsonl is appended to and the summary keeps each check's latest record).
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SITE=${GPU_CHECK_SITE:-/tmp/bupo_gpu_site}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
SMOKE=${GPU_CHECK_SMOKE:-0}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO" || exit 1
exec > >(tee -a "$OUT/log.txt") 2>&1
TEE_PID=$!

START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=15 # seconds kept for the summary

step_record() { # name rc elapsed budget
  local timed_out=false
  if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then timed_out=true; fi
  printf '{"step": "%s", "rc": %d, "elapsed_s": %d, "budget_s": %d, "timed_out": %s}\n' \
    "$1" "$2" "$3" "$4" "$timed_out" >>"$OUT/results.jsonl"
}

ALL_STEPS="env exact_tiny triton exact_4b bench_qwen3-4b bench_qwen3-4b_32k engine bench_qwen3-8b"
STEPS=" ${GPU_CHECK_STEPS:-$ALL_STEPS} "

run_step() { # name budget_s command...
  local name=$1 budget=$2
  shift 2
  local now left t rc t0
  [[ $STEPS == *" $name "* ]] || return 0
  now=$(date +%s)
  left=$((DEADLINE - RESERVE - now))
  t=$((budget < left ? budget : left))
  if [ "$t" -lt 20 ]; then
    echo "### $name: skipped (${left}s left of the ${BUDGET}s budget)"
    printf '{"step": "%s", "rc": -1, "elapsed_s": 0, "budget_s": 0, "timed_out": true, "skipped": "no time left"}\n' \
      "$name" >>"$OUT/results.jsonl"
    return 0
  fi
  echo "### $name (budget ${t}s, $((now - START))s elapsed) $(date -u +%H:%M:%S)"
  t0=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$t" "$@"
  rc=$?
  step_record "$name" "$rc" $(($(date +%s) - t0)) "$t"
  echo "### $name: rc=$rc in $(($(date +%s) - t0))s"
  return 0
}

# internal_forward.py ARGS..., its JSON lines also into $OUT/FILE (a command that `timeout` can run)
export PY OUT
BENCH=(bash -c 'set -o pipefail; "$PY" benchmarks/internal_forward.py "${@:2}" | tee "$OUT/$1"' bench)

echo "### gpu_check.sh: repo $REPO, out $OUT, python $PY, budget ${BUDGET}s, smoke=$SMOKE, steps:$STEPS"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# ---- install the carried wheels (no network there: --no-index)
if compgen -G ".whl/*.whl" >/dev/null; then
  t0=$(date +%s)
  rm -rf "$SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  rc=$?
  step_record install "$rc" $(($(date +%s) - t0)) 120
  echo "### install: rc=$rc ($(ls .whl/*.whl | wc -l) wheels into $SITE)"
  if [ "$rc" -eq 0 ]; then
    export PYTHONPATH="$SITE:$REPO/benchmarks/ray_stub:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  else # the wheels are for CPython 3.12 x86-64 (the GPU machine); go on with what is installed
    echo "### install FAILED: continuing with the installed packages"
    export PYTHONPATH="$REPO/benchmarks/ray_stub:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "### install: no .whl/ here (run benchmarks/fetch_gpu_wheels.sh first); using the installed packages"
  export PYTHONPATH="$REPO/benchmarks/ray_stub:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false

if [ "$SMOKE" = "1" ]; then
  CHECK=("$PY" benchmarks/gpu_check.py --cpu-smoke --out "$OUT")
  B4=(--shape tiny --device cpu --dtype float32 --tokens 128 --repeats 1)
  B4_32K=(--shape tiny --device cpu --dtype float32 --tokens 256 --repeats 1 --variants sliced_fused sliced_fused_ckpt --modes update)
  B8=(--shape tiny --device cpu --dtype float32 --tokens 128 --repeats 1 --layer 1)
else
  CHECK=("$PY" benchmarks/gpu_check.py --device cuda --out "$OUT")
  B4=(--shape qwen3-4b --device cuda --dtype bfloat16 --repeats 3)
  B4_32K=(--shape qwen3-4b --device cuda --dtype bfloat16 --repeats 3 --tokens 32768 --variants sliced_fused sliced_fused_ckpt --modes update)
  B8=(--shape qwen3-8b --device cuda --dtype bfloat16 --repeats 3)
fi

run_step env 60 "${CHECK[@]}" --checks env
run_step exact_tiny 60 "${CHECK[@]}" --checks exact_tiny
run_step triton 90 "${CHECK[@]}" --checks triton
run_step exact_4b 90 "${CHECK[@]}" --checks exact_4b
run_step bench_qwen3-4b 150 "${BENCH[@]}" bench_qwen3-4b.jsonl "${B4[@]}"
run_step bench_qwen3-4b_32k 90 "${BENCH[@]}" bench_qwen3-4b_32k.jsonl "${B4_32K[@]}"
run_step engine 210 "${CHECK[@]}" --checks engine
run_step bench_qwen3-8b 150 "${BENCH[@]}" bench_qwen3-8b.jsonl "${B8[@]}"

"$PY" benchmarks/gpu_check.py --summarize --out "$OUT"
rc=$?
echo "### gpu_check.sh done in $(($(date +%s) - START))s; summary rc=$rc; files: $(ls "$OUT" | tr '\n' ' ')"
exec 1>&- 2>&- # let tee finish writing log.txt
wait "$TEE_PID" 2>/dev/null
exit "$rc"
