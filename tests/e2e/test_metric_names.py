"""The metric names recipe/bupo/README.md documents are the ones real runs log (and no stray prefix)."""

from __future__ import annotations

import re

from _e2e import REPO


def documented_names() -> list[str]:
    text = (REPO / "recipe" / "bupo" / "README.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return sorted(set(re.findall(r"`(bupo/[\w/<>]+)`", section)))


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace("<l>", r"\d+").replace("<name>", r"\w+") + "$")


def test_documented_bupo_metrics_are_logged(bupo_resumed_run, stock_auto_run):
    logged = set()
    for d in list(bupo_resumed_run[1].steps().values()) + list(stock_auto_run[1].values()):
        logged |= set(d)
    names = documented_names()
    assert len(names) >= 12
    missing = [n for n in names if not any(_pattern(n).match(k) for k in logged)]
    assert missing == [], f"documented but never logged: {missing}"
    assert not [k for k in logged if k.startswith("actor/bupo/")], "worker metrics must be logged as bupo/*"


def test_phase1_mfu_counts_layers_up_to_k(bupo_resumed_run):
    """bupo/mfu (phase 1 only) is verl's MFU scaled to layers 0..k + head: below it for k=1 of 4 layers."""
    steps = {s: d for s, d in bupo_resumed_run[1].steps().items() if "critic/score/mean" in d}
    for s, d in steps.items():
        if d["bupo/phase"] == 1.0 and d.get("perf/mfu/actor"):
            assert 0 < d["bupo/mfu"] < d["perf/mfu/actor"], s
        else:
            assert "bupo/mfu" not in d, s


def test_logged_bupo_metrics_are_documented(bupo_resumed_run, stock_auto_run):
    logged = set()
    for d in list(bupo_resumed_run[1].steps().values()) + list(stock_auto_run[1].values()):
        logged |= {k for k in d if k.startswith("bupo/")}
    patterns = [_pattern(n) for n in documented_names()]
    phase1_copies = re.compile(r"bupo/phase1_(rollout_\w+|rollout_corr/\w+)$")  # documented as a family
    undocumented = sorted(
        k for k in logged if not any(p.match(k) for p in patterns) and not phase1_copies.match(k)
    )
    assert undocumented == []
