"""The analysis CLI end to end on tiny models saved to disk, with MATH-500 rows; and its clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from verl_ext.analysis.cli import load_examples, main
from verl_ext.random_models import make_model, save_model_and_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
L = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    a = save_model_and_tokenizer(make_model("qwen3", init_std=0.1), root / "qwen3")
    b = save_model_and_tokenizer(make_model("llama", init_std=0.1, seed=1), root / "llama")
    return a, b


@pytest.fixture(scope="module")
def math_rows(shared_math, tmp_path_factory):
    df = pd.read_parquet(shared_math / "math500.parquet").head(4)
    path = tmp_path_factory.mktemp("data") / "math4.parquet"
    df.to_parquet(path)
    return path


def _check_outputs(out, labels):
    for name in ("layer_entropy.png", "delta_entropy.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    df = pd.read_csv(out / "profile.csv")
    assert sorted(df["label"].unique()) == sorted(labels)
    for _label, g in df.groupby("label"):
        assert g.groupby("module").size().to_dict() == {"attn": L, "ffn": L, "layer": L}
        assert g["n_tokens"].min() > 0 and g["entropy"].notna().all()
    records = json.loads((out / "profile.json").read_text())
    assert len(records) == len(df) and {"layer", "layer_index", "module", "delta", "cosine"} <= set(
        records[0]
    )
    text = (out / "boundary.txt").read_text()
    assert "bupo.internal_layer=" in text or "no boundary layer" in text
    return df


def test_cli_generate_two_models_overlaid(models, math_rows, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", models[0], "--model", models[1], "--label", "before", "--label", "after"]
    argv += ["--data", str(math_rows), "--out", str(out), "--generate", "--max-new-tokens", "8"]
    argv += ["--batch-size", "2", "--limit", "4", "--chat-template-kwargs", '{"enable_thinking": false}']
    assert main(argv) == 0
    df = _check_outputs(out, ["before", "after"])
    assert df[df.label == "before"]["n_tokens"].max() <= 4 * 8
    printed = capsys.readouterr().out
    assert printed.count("bupo.internal_layer=") + printed.count("no boundary layer") == 2
    b = json.loads((out / "boundary.json").read_text())
    assert set(b) == {"before", "after"} and b["before"]["n_sequences"] == 4


def test_cli_validation_dump_jsonl(models, tmp_path):
    dump = tmp_path / "val"
    dump.mkdir()
    rows = [
        {
            "input": "system\nPlease reason step by step.\nuser\nWhat is 1 + 1?\nassistant\n",
            "output": "The answer is \\boxed{2}.",
            "gts": "2",
            "score": 1.0,
            "step": 10,
        },
        {
            "input": "user\nLet x = 3. What is 2x + 1?\nassistant\n",
            "output": "2x + 1 = 7, so \\boxed{7}",
            "gts": "7",
            "score": 1.0,
            "step": 10,
        },
    ]
    (dump / "5.jsonl").write_text("{}\n".format(json.dumps({"input": "x", "output": "y"})))
    (dump / "10.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert (
        main(
            [
                "--model",
                models[0],
                "--data",
                str(dump),
                "--out",
                str(out),
                "--final-norm",
                "--batch-size",
                "3",
            ]
        )
        == 0
    )
    df = _check_outputs(out, ["qwen3"])
    assert (df["convention"] == "final_norm").all()
    assert load_examples(dump)[0].prompt == rows[0]["input"]  # the latest step's file


def test_cli_errors(models, math_rows, tmp_path, capsys):
    out = str(tmp_path / "out")
    # missing response column (and no --generate)
    assert main(["--model", models[0], "--data", str(math_rows), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "no response column" in err and "--generate" in err
    assert (
        main(["--model", models[0], "--data", str(math_rows), "--out", out, "--response-column", "nope"]) == 2
    )
    assert "missing response column 'nope'" in capsys.readouterr().err
    # empty dataset
    empty = tmp_path / "empty.parquet"
    pd.read_parquet(math_rows).head(0).to_parquet(empty)
    assert main(["--model", models[0], "--data", str(empty), "--out", out, "--generate"]) == 2
    assert "is empty" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "missing.parquet")
    # unsupported architecture
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=320,
    )
    bad = save_model_and_tokenizer(MistralForCausalLM(cfg), tmp_path / "mistral")
    assert main(["--model", bad, "--data", str(math_rows), "--out", out, "--generate"]) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture MistralForCausalLM" in err and "qwen2, qwen3, llama" in err
