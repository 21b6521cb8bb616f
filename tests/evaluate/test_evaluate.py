"""Avg@K / pass@K evaluation (``verl_ext.evaluate``) on small hand-made generation files."""

from __future__ import annotations

import csv
import itertools
import json
import math
from fractions import Fraction

import pandas as pd
import pytest

from verl_ext import evaluate as E
from verl_ext.data import build_prompt, write_rows

# --------------------------------------------------------------------------------------------------------
# pass@k against brute force
# --------------------------------------------------------------------------------------------------------


def _brute_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (c of them correct) that contain a correct one."""
    items = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(items[i] for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert E.pass_at_k(n, c, k) == pytest.approx(float(_brute_pass_at_k(n, c, k)), abs=1e-12), (
                n,
                c,
                k,
            )


def test_pass_at_k_large_n_is_stable():
    assert E.pass_at_k(1000, 1, 500) == pytest.approx(0.5, abs=1e-12)
    exact = 1 - Fraction(math.comb(300 - 7, 64), math.comb(300, 64))
    assert E.pass_at_k(300, 7, 64) == pytest.approx(float(exact), rel=1e-12)
    assert E.pass_at_k(32, 0, 32) == 0.0 and E.pass_at_k(32, 1, 32) == 1.0
    with pytest.raises(ValueError):
        E.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        E.pass_at_k(4, 1, 5)


@pytest.mark.parametrize(
    ("n", "ks"), [(1, [1]), (4, [1, 2, 4]), (12, [1, 2, 4, 8, 12]), (16, [1, 2, 4, 8, 16])]
)
def test_k_values(n, ks):
    assert E.k_values(n) == ks


# --------------------------------------------------------------------------------------------------------
# Hand-made generations with hand-computed metrics
# --------------------------------------------------------------------------------------------------------

# (source, prompt uid, ground truth, responses, dumped scores)
PROBLEMS = [
    (
        "qwen_aime_2024",
        "uid-p1",
        "204",
        ["... so \\boxed{204}", "\\boxed{205}", "thus $\\boxed{204}$.", "I give up"],
        [1, 0, 1, 0],
    ),
    (
        "qwen_aime_2024",
        "uid-p2",
        "25",
        ["\\boxed{24}", "\\boxed{26}", "\\boxed{2", "\\boxed{0}"],
        [0, 1, 0, 0],  # one wrong dumped score: only --use-dumped-score sees it
    ),
    (
        "qwen_math500",
        "uid-p3",
        "\\frac{1}{2}",
        ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{\\dfrac12}", "\\boxed{2}"],
        [1, 1, 1, 0],
    ),
]
# Hand-computed (percent): AIME: c = 2 and 0 of 4; MATH: c = 3 of 4.
#   AIME Avg@4 = (2/4 + 0)/2 = 25; pass@2 = (1 - C(2,2)/C(4,2) + 0)/2 = (5/6)/2 = 41.67; pass@4 = 50
#   MATH Avg@4 = 75; pass@2 = 1 - C(1,2)/C(4,2) = 100; pass@4 = 100
#   no answer: AIME 2 of 8 (no box, unclosed box) = 25; MATH 0
EXPECTED_ROWS = [
    ["qwen_aime_2024", "2", "8", "4", "25.00", "25.00", "41.67", "50.00", "25.00"],
    ["qwen_math500", "1", "4", "4", "75.00", "75.00", "100.00", "100.00", "0.00"],
    ["average", "3", "12", "", "50.00", "50.00", "70.83", "75.00", "12.50"],
]
HEADER = ["data_source", "problems", "samples", "K", "Avg@K", "pass@1", "pass@2", "pass@4", "no_answer"]


def _dump_lines(with_source: bool = True) -> list[dict]:
    """Lines as verl 0.9.1's ``_write_generations`` writes them (samples of a prompt interleaved here)."""
    lines = []
    for session in range(4):
        for source, uid, gt, responses, scores in PROBLEMS:
            line = {
                "input": f"system\nPlease reason step by step.\nuser\nproblem {uid}\nassistant\n",
                "output": responses[session],
                "gts": gt,
                "score": float(scores[session]),
                "step": 0,
                "reward": float(scores[session]),
                "acc": bool(scores[session]),
                "uid": f"{uid}_{session}_0",
            }
            if with_source:
                line["source"] = source
            lines.append(line)
    return lines


def _write_jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def test_evaluate_verl_dump_dir(tmp_path, capsys):
    gens = tmp_path / "val"
    _write_jsonl(gens / "0.jsonl", [{**x, "output": "\\boxed{999}"} for x in _dump_lines()])  # an older step
    _write_jsonl(gens / "10.jsonl", _dump_lines())
    out = tmp_path / "report"
    assert E.main([str(gens), "--out", str(out), "--workers", "2"]) == 0
    captured = capsys.readouterr()
    assert "grading" in captured.err  # the progress bar
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == HEADER and rows[1:] == EXPECTED_ROWS
    md = (out / "results.md").read_text()
    assert "| " + " | ".join(HEADER) + " |" in md
    for row in EXPECTED_ROWS:
        assert "| " + " | ".join(row) + " |" in md
    assert "10.jsonl" in md and "0.jsonl," not in md
    assert (out / "pass_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| qwen_math500 |" in captured.out


def test_step_selection_and_dumped_scores(tmp_path):
    gens = tmp_path / "val"
    _write_jsonl(gens / "0.jsonl", _dump_lines())
    _write_jsonl(gens / "10.jsonl", [{**x, "output": "\\boxed{999}"} for x in _dump_lines()])
    results, _ = E.evaluate([gens], out=tmp_path / "r0", step="0", plot=False, progress=False, workers=2)
    assert [round(100 * r.avg, 2) for r in results] == [25.0, 75.0]
    results, _ = E.evaluate([gens], out=tmp_path / "r10", plot=False, progress=False, workers=2)
    assert [r.avg for r in results] == [0.0, 0.0]
    results, _ = E.evaluate(
        [gens], out=tmp_path / "rd", step="0", use_dumped_score=True, plot=False, progress=False
    )
    aime = results[0]
    assert aime.avg == pytest.approx((2 / 4 + 1 / 4) / 2) and aime.no_answer is None
    with pytest.raises(E.EvalError, match="no dump for step"):
        E.evaluate([gens], step="5", plot=False, progress=False)


def test_evaluate_response_table_parquet(tmp_path):
    """A parquet of responses (a list per prompt) gives the same numbers as the dump."""
    rows = [
        {
            "data_source": source,
            "prompt": build_prompt(f"problem {uid}", "qwen3"),
            "responses": responses,
            "reward_model": {"ground_truth": gt, "style": "rule"},
        }
        for source, uid, gt, responses, _ in PROBLEMS
    ]
    path = write_rows(rows, tmp_path / "gens.parquet")
    results, paths = E.evaluate([path], out=tmp_path / "rep", plot=False, progress=False, workers=2)
    header, table = E.report_table(results)
    assert header == HEADER and table == EXPECTED_ROWS
    assert set(paths) == {"md", "csv"}
    # the same table as JSONL with one response per line and plain column names
    lines = [
        {"data_source": s, "prompt": f"problem {u}", "response": r, "ground_truth": g}
        for s, u, g, rs, _ in PROBLEMS
        for r in rs
    ]
    results2, _ = E.evaluate(
        [_write_jsonl(tmp_path / "g.jsonl", lines)], out=tmp_path / "rep2", plot=False, progress=False
    )
    assert E.report_table(results2) == (header, table)


def test_data_sources_from_validation_files(tmp_path, shared_math):
    """Dumps without a source column are mapped to data sources through the validation parquet files."""
    aime = pd.read_parquet(shared_math / "aime_2024.parquet")
    m500 = pd.read_parquet(shared_math / "math500.parquet")
    picks = [
        (aime.prompt[0][1]["content"], "540"),
        (m500.prompt[3][1]["content"], "9"),
        ("not a known problem", "1"),
    ]
    lines = [
        {
            "input": f"system\nPlease reason.\nuser\n{problem}\nassistant\n",
            "output": f"\\boxed{{{gt}}}",
            "gts": gt,
            "uid": f"u{i}_0_0",
        }
        for i, (problem, gt) in enumerate(picks)
    ]
    path = _write_jsonl(tmp_path / "3.jsonl", lines)
    samples = E.load_samples([path])
    E.assign_data_sources(samples, [shared_math / "aime_2024.parquet", shared_math / "math500.parquet"])
    assert [s.data_source for s in samples] == ["qwen_aime_2024", "qwen_math500", "unknown"]
    results, _ = E.evaluate(
        [path],
        out=tmp_path / "rep",
        data_files=[shared_math / "aime_2024.parquet"],
        plot=False,
        progress=False,
    )
    assert {r.data_source: r.num_problems for r in results} == {"qwen_aime_2024": 1, "unknown": 2}


def test_clear_errors(tmp_path):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"input": "q", "output": "\\boxed{1}"}])
    with pytest.raises(E.EvalError, match="no ground truth"):
        E.load_samples([bad])
    bad2 = _write_jsonl(tmp_path / "bad2.jsonl", [{"input": "q", "gts": "1"}])
    with pytest.raises(E.EvalError, match="no response column"):
        E.load_samples([bad2])
    with pytest.raises(E.EvalError, match="does not exist"):
        E.load_samples([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(E.EvalError, match="no .jsonl/.json/.parquet"):
        E.load_samples([tmp_path / "empty"])
    assert E.main([str(tmp_path / "missing")]) == 2


def test_dump_written_by_verl(tmp_path):
    """A dump written by verl 0.9.1's own writer, with this project's reward extras, is read as intended."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from verl_ext.reward import compute_score

    inputs, outputs, gts, keys, extras = [], [], [], [], {}
    for source, uid, gt, responses, _ in PROBLEMS:
        for session, response in enumerate(responses):
            out = compute_score(source, response, gt)
            inputs.append(f"problem {uid}")
            outputs.append(response)
            gts.append(gt)
            keys.append(f"{uid}_{session}_0")
            for k, v in out.items():
                extras.setdefault(k, []).append(v)
    scores = extras["score"]
    infos = {"reward": scores, **extras, "uid": keys}  # what PPOTrainer._validate hands to the writer
    PPOTrainer._write_generations(inputs, outputs, gts, scores, infos, str(tmp_path / "val"), 7)
    first = json.loads((tmp_path / "val" / "7.jsonl").read_text().splitlines()[0])
    assert {"input", "output", "gts", "score", "step", "acc", "pred", "reason", "source", "uid"} <= set(first)
    results, _ = E.evaluate([tmp_path / "val"], plot=False, progress=False)
    assert E.report_table(results) == (HEADER, EXPECTED_ROWS)
    results, _ = E.evaluate([tmp_path / "val"], use_dumped_score=True, plot=False, progress=False)
    assert E.report_table(results) == (HEADER[:-1], [row[:-1] for row in EXPECTED_ROWS])
