"""Two gloo ranks, verl's FSDP2 engine: a phase-1 update changes only layers <= k, embedding and head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LAYER = 1


def test_two_rank_phase1_then_phase2(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir
    out = tmp_path / "result.json"
    script = Path(__file__).with_name("_two_rank_update.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(out), str(LAYER)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    params, changed1, changed2 = (
        result["params"],
        set(result["changed_phase1"]),
        set(result["changed_phase2"]),
    )

    def upper(name: str) -> bool:
        return any(f"layers.{i}." in name for i in range(LAYER + 1, 4))

    assert not [p for p in changed1 if upper(p)], "layers above k changed in phase 1"
    assert "model.norm.weight" not in changed1  # the final norm does not run in pi^k
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed1
    lower = [p for p in params if not upper(p) and "layers." in p]
    assert set(lower) <= changed1, f"lower layers unchanged: {sorted(set(lower) - changed1)}"
    assert set(params) == changed2, f"phase 2 left {sorted(set(params) - changed2)} unchanged"
