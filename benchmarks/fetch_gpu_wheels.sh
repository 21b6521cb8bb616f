#!/usr/bin/env bash
# Fetch, here (where PyPI is reachable), the wheels that benchmarks/gpu_check.sh installs on the GPU
# machine, which has torch, triton and transformers but no verl and no network.
#
#   bash benchmarks/fetch_gpu_wheels.sh            # -> .whl/ (git-ignored), prints the total, fails > 60 MiB
#   bash benchmarks/fetch_gpu_wheels.sh DIR        # somewhere else
#
# The list is the minimal set found by experiment in a throwaway Python 3.12 venv that mimics the GPU
# machine (torch 2.11.0, transformers 5.17.0 and the other packages KINDS.md lists for it): with
# exactly these wheels installed with --no-deps and benchmarks/ray_stub first on PYTHONPATH,
# `import verl.workers.engine_workers, verl_ext.bupo.worker` works and `gpu_check.py --cpu-smoke`
# passes. Versions are the ones the project's CPU environment (requirements-cpu.txt) resolves.
#
# * verl 0.9.1 and what its engine-path imports need that the machine lacks: tensordict (+ pyvers,
#   orjson), hydra-core + omegaconf + antlr4-python3-runtime, codetiming, datasets (+ dill,
#   multiprocess; verl.utils.dataset is imported by verl.workers), fastapi + starlette + pydantic
#   (+ pydantic-core, annotated-types, typing-inspection) + opentelemetry-api, uvicorn
#   (verl.workers.rollout imports them at module level).
# * transformers 5.10.4: verl 0.9.1 requires >=5.5.3,<5.11 and the machine has 5.17.0; with it
#   tokenizers 0.22.2 (5.10.4 checks tokenizers<=0.23.0 at import; the machine has 0.23.2).
# * peft 0.21.2: on the machine in an unknown version; pinned to the one tested here.
# * Not carried: Ray (its 2.60 wheel alone is 79 MB; benchmarks/ray_stub stands in, see
#   docs/benchmarks.md), TransferQueue, wandb, torchdata, pylatexenc, cachetools (not imported on
#   the engine path), and everything the machine already has (torch, triton, numpy, pandas, pyarrow,
#   accelerate, safetensors, huggingface-hub, psutil, ...).
#
# antlr4-python3-runtime 4.9.3 (pinned by omegaconf 2.3) exists on PyPI only as an sdist: it is
# pure Python, so its wheel is built here with `pip wheel`.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${1:-.whl}
MAX_MIB=${MAX_MIB:-60}
PY=${PYTHON:-python3}

WHEELS=(
  verl==0.9.1
  tensordict==0.10.0
  pyvers==0.1.0
  orjson==3.13.0
  hydra-core==1.3.8
  omegaconf==2.3.1
  codetiming==1.4.0
  transformers==5.10.4
  tokenizers==0.22.2
  peft==0.21.2
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  fastapi==0.165.0
  starlette==1.10.0
  opentelemetry-api==1.45.2
  uvicorn==0.54.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
)
SDIST_WHEELS=(antlr4-python3-runtime==4.9.3)

mkdir -p "$DEST"
# One version of each package: drop any earlier wheel of the packages fetched here.
for spec in "${WHEELS[@]}" "${SDIST_WHEELS[@]}"; do
  name=${spec%%==*}
  norm=$(echo "$name" | tr '[:upper:]-.' '[:lower:]__')
  find "$DEST" -maxdepth 1 -iname "${norm}-*.whl" -delete
done

"$PY" -m pip download -q --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}"
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "${SDIST_WHEELS[@]}"

ls -l "$DEST"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
count=$(ls "$DEST"/*.whl | wc -l)
echo "$count wheels, total $((total / 1024)) KiB ($(awk "BEGIN {printf \"%.1f\", $total / 1048576}") MiB; limit ${MAX_MIB} MiB)"
if [ "$total" -gt $((MAX_MIB * 1024 * 1024)) ]; then
  echo "ERROR: the wheels exceed ${MAX_MIB} MiB; a device call carries 64 MiB at most" >&2
  exit 1
fi
