#!/usr/bin/env bash
# BuPO and its GRPO twin on the toy CPU task, same model, data and seed, one after the other; then the
# reward curves side by side and one JSON line per run (steps, phases, reward and validation first vs
# last, wall time). Evidence that the loop learns, not a claim about the paper.
#
#   bash scripts/install_cpu.sh && . .venv/bin/activate
#   bash benchmarks/tiny_cpu_twins.sh [hydra overrides for both runs...]    # ~9 minutes on 2 cores
#
# Outputs: outputs/tiny_cpu_twins/{bupo,grpo}/ and outputs/tiny_cpu_twins/compare/metrics.png.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${TWINS_DIR:-outputs/tiny_cpu_twins}
rm -rf "$root/bupo" "$root/grpo"
for name in bupo grpo; do
  start=$(date +%s)
  OUT_DIR=$root/$name TOY_DIR=$root/toy bash "examples/run_tiny_${name}_cpu.sh" "$@" >"$root.$name.log" 2>&1 ||
    { tail -50 "$root.$name.log"; exit 1; }
  echo "$(($(date +%s) - start))" >"$root/$name/wall_s"
done
python -m verl_ext.plot_run "$root"/bupo/logs/*/*.jsonl "$root"/grpo/logs/*/*.jsonl --out "$root/compare" >&2
for name in bupo grpo; do
  python - "$root/$name" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
s = json.loads((out / "summary.json").read_text())
val = s["validation"].get("val-core/toy/digits/acc/mean@2") or {}
print(json.dumps({"run": s["run"], "steps": len(s["steps"]),
                  "phase1_steps": [k for k, v in s["phase_per_step"].items() if v.startswith("pi^")],
                  "reward_first": s["reward"]["first"], "reward_last": s["reward"]["last"],
                  "val_acc_first": val.get("first"), "val_acc_last": val.get("last"),
                  "wall_s": int((out / "wall_s").read_text())}))
PY
done
