"""Data building, re-templating and prompt rendering (``verl_ext.data``)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from verl_ext import data as D
from verl_ext.random_models import make_tokenizer

PROBLEM = "What is $1 + 1$?"
# Written out by hand from spec section 4 (not built from the module's constants).
EXPECTED_OCTO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "User: You must put your answer inside \\boxed{} and Your final answer will be extracted automatically by "
    "the \\boxed{} tag.\nWhat is $1 + 1$?\nAssistant:"
)
EXPECTED_QWEN3 = (
    "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\nWhat is $1 + 1$?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
SHARED_ROWS = {
    "train.parquet": (5000, "math_dapo"),
    "math500.parquet": (500, "qwen_math500"),
    "amc2023.parquet": (40, "qwen_amc2023"),
    "aime_2024.parquet": (30, "qwen_aime_2024"),
    "aime_2025.parquet": (30, "qwen_aime_2025"),
}


# --------------------------------------------------------------------------------------------------------
# Prompt rendering, through the code paths verl uses
# --------------------------------------------------------------------------------------------------------


def _rollout_ids(tokenizer, messages, model_type):
    """Token ids the agent loop sends to the rollout server (verl's Continuous Token builder)."""
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder

    builder = create_continuous_token_builder(
        tokenizer, hf_model_type=model_type, chat_template_kwargs={"enable_thinking": False}
    )
    return builder.build_initial_tokens(messages)


def test_qwen3_prompt_renders_exactly(tokenizer):
    messages = D.build_prompt(PROBLEM, "qwen3")
    from verl.utils.tokenizer.chat_template import apply_chat_template

    text = apply_chat_template(
        tokenizer, messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == EXPECTED_QWEN3
    ids = _rollout_ids(tokenizer, messages, "qwen3")
    assert ids == tokenizer.encode(EXPECTED_QWEN3, add_special_tokens=False)
    assert tokenizer.decode(ids) == EXPECTED_QWEN3


def test_octothinker_prompt_renders_exactly():
    assert D.octothinker_prompt(PROBLEM) == EXPECTED_OCTO
    assert D.OCTOTHINKER_PROMPT_TEMPLATE.replace("{problem}", PROBLEM) == EXPECTED_OCTO
    tok = make_tokenizer(chat_template=D.OCTOTHINKER_CHAT_TEMPLATE)  # no BOS token, like ours
    messages = D.build_prompt(PROBLEM, "octothinker")
    assert messages == [{"role": "user", "content": EXPECTED_OCTO}]
    text = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == EXPECTED_OCTO
    ids = _rollout_ids(tok, messages, "llama")
    assert tok.decode(ids) == EXPECTED_OCTO


def test_octothinker_template_adds_exactly_one_bos():
    tok = make_tokenizer(chat_template=D.OCTOTHINKER_CHAT_TEMPLATE)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>"})
    bos = tok.bos_token_id
    ids = _rollout_ids(tok, D.build_prompt(PROBLEM, "octothinker"), "llama")
    assert ids == [bos] + tok.encode(EXPECTED_OCTO, add_special_tokens=False)
    assert ids.count(bos) == 1


def test_custom_chat_template_reaches_the_model_tokenizer(tmp_path):
    """``actor_rollout_ref.model.custom_chat_template`` replaces a base model's (missing) template."""
    from verl.workers.config.model import HFModelConfig

    from verl_ext.random_models import make_model, save_model_and_tokenizer

    save_model_and_tokenizer(make_model("llama"), tmp_path, tokenizer=make_tokenizer(chat_template=None))
    cfg = HFModelConfig(path=str(tmp_path), custom_chat_template=D.OCTOTHINKER_CHAT_TEMPLATE)
    assert cfg.processor is None and cfg.tokenizer.chat_template == D.OCTOTHINKER_CHAT_TEMPLATE
    ids = _rollout_ids(cfg.tokenizer, D.build_prompt(PROBLEM, "octothinker"), "llama")
    assert cfg.tokenizer.decode(ids) == EXPECTED_OCTO


def test_detect_style_and_problem_roundtrip():
    for style in D.STYLES:
        prompt = D.build_prompt(PROBLEM, style)
        assert D.detect_style(prompt) == style
        assert D.problem_of({"prompt": prompt}) == PROBLEM
    assert D.detect_style([{"role": "user", "content": PROBLEM}]) is None
    with pytest.raises(D.DataError, match="unknown prompt style"):
        D.build_prompt(PROBLEM, "llama")


# --------------------------------------------------------------------------------------------------------
# Re-templating the shared parquet files
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retemplated(tmp_path_factory, shared_math):
    out = {}
    for style in D.STYLES:
        d = tmp_path_factory.mktemp(style)
        D.retemplate(shared_math, d, style)
        out[style] = d
    return out


def test_retemplate_shared_files(retemplated, shared_math):
    for style, d in retemplated.items():
        assert sorted(p.name for p in d.glob("*.parquet")) == sorted(SHARED_ROWS)
        for name, (n, source) in SHARED_ROWS.items():
            df = pd.read_parquet(d / name)
            src = pd.read_parquet(shared_math / ("deepmath-5k.parquet" if name == "train.parquet" else name))
            assert len(df) == n and set(df.data_source) == {source}
            assert [r["ground_truth"] for r in df.reward_model] == [
                r["ground_truth"] for r in src.reward_model
            ]
            problems = [p[-1]["content"] for p in src.prompt]  # the shared files are Qwen-style
            assert [e["problem"] for e in df.extra_info] == problems
            for prompt, problem in zip(df.prompt.head(50), problems[:50]):
                assert D.detect_style(prompt) == style
                if style == "octothinker":
                    assert len(prompt) == 1 and prompt[0]["role"] == "user"
                    assert prompt[0]["content"] == D.OCTOTHINKER_PROMPT_PREFIX + problem + "\nAssistant:"
                else:
                    assert [m["role"] for m in prompt] == ["system", "user"] and prompt[1][
                        "content"
                    ] == problem


def test_qwen3_retemplate_reproduces_the_shared_prompts(retemplated, shared_math, tmp_path):
    """octothinker -> qwen3 gives back the shared (Qwen-style) prompts exactly."""
    D.retemplate(retemplated["octothinker"] / "math500.parquet", tmp_path, "qwen3")
    a = pd.read_parquet(tmp_path / "math500.parquet")
    b = pd.read_parquet(shared_math / "math500.parquet")
    norm = [[(m["role"], m["content"]) for m in p] for p in a.prompt]
    ref = [[(m["role"], m["content"]) for m in p] for p in b.prompt]
    assert norm == ref
    assert list(a.columns[: len(b.columns)]) == list(b.columns)


def test_rendered_shared_prompt_through_verl_dataset(retemplated, tokenizer):
    """verl's RLHFDataset loads the octothinker files and its length filter renders the custom template."""
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    tok = make_tokenizer(chat_template=D.OCTOTHINKER_CHAT_TEMPLATE)
    cfg = OmegaConf.create(
        {
            "max_prompt_length": 4096,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "apply_chat_template_kwargs": {"enable_thinking": False},
        }
    )
    path = retemplated["octothinker"] / "aime_2025.parquet"
    ds = RLHFDataset(data_files=[str(path)], tokenizer=tok, config=cfg)
    assert len(ds) == 30
    item = ds[0]
    problem = pd.read_parquet(path).extra_info[0]["problem"]
    text = tok.apply_chat_template(list(item["raw_prompt"]), tokenize=False, add_generation_prompt=True)
    assert text == D.octothinker_prompt(problem)
    assert item["data_source"] == "qwen_aime_2025"


def test_val_n_column_only_on_validation_files(retemplated, tmp_path):
    D.retemplate(retemplated["qwen3"], tmp_path, "qwen3", val_n="paper")
    assert D.ROLLOUT_N_COLUMN not in pd.read_parquet(tmp_path / "train.parquet").columns
    expect = {"math500": 16, "amc2023": 16, "aime_2024": 32, "aime_2025": 32}
    for stem, n in expect.items():
        assert set(pd.read_parquet(tmp_path / f"{stem}.parquet")[D.ROLLOUT_N_COLUMN]) == {n}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("paper", {"qwen_aime_2024": 32, "qwen_aime_2025": 32, "*": 16}),
        ("8", {"*": 8}),
        ("qwen_aime_2024=32,4", {"qwen_aime_2024": 32, "*": 4}),
        (None, None),
    ],
)
def test_parse_val_n(spec, expected):
    assert D.parse_val_n(spec) == expected


def test_parse_val_n_rejects_garbage():
    with pytest.raises(D.DataError, match="--val-n"):
        D.parse_val_n("a=b")
    with pytest.raises(D.DataError, match=">= 1"):
        D.parse_val_n("0")


# --------------------------------------------------------------------------------------------------------
# Building from (fake) Hub datasets with the public column layouts
# --------------------------------------------------------------------------------------------------------


def _fake_hub(n_train=50):
    rng = np.random.default_rng(0)
    tables = {
        ("zwhe99/DeepMath-103K", None, "train"): pd.DataFrame(
            {
                "question": [f"Deep problem {i}?" for i in range(n_train)],
                "final_answer": [str(i) if i % 5 else "Yes" for i in range(n_train)],
                "difficulty": rng.uniform(1, 9, n_train),
                "topic": ["Algebra"] * n_train,
                "r1_solution_1": ["long solution"] * n_train,
            }
        ),
        ("HuggingFaceH4/MATH-500", None, "test"): pd.DataFrame(
            {
                "problem": ["M1", "M2", ""],
                "solution": ["s", "s", "s"],
                "answer": ["\\frac{1}{2}", "3", "4"],
                "subject": ["Algebra"] * 3,
                "level": [1, 2, 3],
                "unique_id": ["a", "b", "c"],
            }
        ),
        ("math-ai/amc23", None, "test"): pd.DataFrame(
            {"id": [0, 1], "question": ["A1", "A2"], "answer": [27.0, 3.5]}
        ),
        ("HuggingFaceH4/aime_2024", None, "train"): pd.DataFrame(
            {
                "id": [60, 61],
                "problem": ["I1", "I2"],
                "solution": ["", ""],
                "answer": ["204", "25"],
                "url": ["", ""],
            }
        ),
        ("opencompass/AIME2025", "AIME2025-I", "test"): [{"question": "J1", "answer": "70"}],
        ("opencompass/AIME2025", "AIME2025-II", "test"): [{"question": "J2", "answer": "588"}],
    }
    calls = []

    def load(repo, config, split):
        calls.append((repo, config, split))
        return tables[(repo, config, split)]

    return load, calls


def test_build_from_hub_layouts(tmp_path):
    load, calls = _fake_hub()
    D.build(tmp_path, "octothinker", train_size=20, seed=7, load_fn=load, val_n="paper")
    assert sorted(calls) == sorted(
        [
            ("zwhe99/DeepMath-103K", None, "train"),
            ("HuggingFaceH4/MATH-500", None, "test"),
            ("math-ai/amc23", None, "test"),
            ("HuggingFaceH4/aime_2024", None, "train"),
            ("opencompass/AIME2025", "AIME2025-I", "test"),
            ("opencompass/AIME2025", "AIME2025-II", "test"),
        ]
    )
    train = pd.read_parquet(tmp_path / "train.parquet")
    idx = list(np.random.default_rng(7).choice(50, size=20, replace=False))
    assert [e["index"] for e in train.extra_info] == idx
    assert [e["problem"] for e in train.extra_info] == [f"Deep problem {i}?" for i in idx]
    assert [r["ground_truth"] for r in train.reward_model] == [str(i) if i % 5 else "Yes" for i in idx]
    assert set(train.data_source) == {"math_dapo"} and set(train.ability) == {"MATH"}
    assert D.ROLLOUT_N_COLUMN not in train.columns
    assert "r1_solution_1" not in train.extra_info[0] and train.extra_info[0]["topic"] == "Algebra"
    m500 = pd.read_parquet(tmp_path / "math500.parquet")
    assert len(m500) == 2  # the row without a problem is dropped
    assert [r["ground_truth"] for r in m500.reward_model] == ["\\frac{1}{2}", "3"]
    assert list(m500[D.ROLLOUT_N_COLUMN]) == [16, 16]
    amc = pd.read_parquet(tmp_path / "amc2023.parquet")
    assert [r["ground_truth"] for r in amc.reward_model] == ["27", "3.5"]
    aime25 = pd.read_parquet(tmp_path / "aime_2025.parquet")
    assert [e["problem"] for e in aime25.extra_info] == ["J1", "J2"]
    assert list(aime25[D.ROLLOUT_N_COLUMN]) == [32, 32] and set(aime25.data_source) == {"qwen_aime_2025"}
    assert aime25.prompt[0][0]["content"] == D.octothinker_prompt("J1")


def test_build_is_reproducible_and_seeded(tmp_path):
    load, _ = _fake_hub()
    D.build(tmp_path / "a", "qwen3", train_size=10, seed=1, load_fn=load, only=["train"])
    D.build(tmp_path / "b", "qwen3", train_size=10, seed=1, load_fn=load, only=["train"])
    D.build(tmp_path / "c", "qwen3", train_size=10, seed=2, load_fn=load, only=["train"])
    a, b, c = (pd.read_parquet(tmp_path / x / "train.parquet") for x in "abc")
    assert a.equals(b)
    assert [e["index"] for e in a.extra_info] != [e["index"] for e in c.extra_info]


def test_build_missing_column_is_a_clear_error(tmp_path):
    def load(repo, config, split):
        return pd.DataFrame({"prompt_text": ["x"], "answer": ["1"]})

    with pytest.raises(D.DataError, match=r"no problem column.*columns are \['answer', 'prompt_text'\]"):
        D.build(tmp_path, "qwen3", load_fn=load, only=["math500"])
    assert not list(tmp_path.glob("*.parquet"))


def test_source_override_and_case_insensitive_columns(tmp_path):
    name, fields = D.parse_source_override("aime_2024=Maxwell-Jia/AIME_2024@train")
    src = D.replace(D.HUB_SOURCES[name], **fields)
    rows = [{"ID": "2024-I-1", "Problem": "P", "Solution": "s", "Answer": 204}]
    recs = D.load_source(src, lambda repo, config, split: rows)
    assert recs == [{"problem": "P", "answer": "204", "index": 0}]
    assert src.repo == "Maxwell-Jia/AIME_2024" and src.configs == (None,)
    with pytest.raises(D.DataError, match="bad --source"):
        D.parse_source_override("nonsense")


# --------------------------------------------------------------------------------------------------------
# ensure, errors, CLI
# --------------------------------------------------------------------------------------------------------


def test_ensure(tmp_path, shared_math):
    out = tmp_path / "octo"
    partial = [shared_math / "math500.parquet", shared_math / "amc2023.parquet"]
    with pytest.raises(D.DataError, match="lacks"):
        D.ensure(out, "octothinker", src=partial)
    assert not out.exists()
    assert D.ensure(out, "octothinker", src=shared_math) == "retemplated"
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted(SHARED_ROWS)
    assert D.ensure(out, "octothinker", src=shared_math) == "present"
    assert D.ensure(out, "octothinker") == "present"
    with pytest.raises(D.DataError, match="not in style 'qwen3'"):
        D.ensure(out, "qwen3")
    load, _ = _fake_hub()
    assert D.ensure(tmp_path / "hub", "qwen3", train_size=5, load_fn=load) == "built"
    assert len(pd.read_parquet(tmp_path / "hub" / "train.parquet")) == 5


def test_clear_errors_for_bad_inputs(tmp_path):
    with pytest.raises(D.DataError, match="does not exist"):
        D.retemplate(tmp_path / "nope", tmp_path / "out", "qwen3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match="no parquet files"):
        D.retemplate(tmp_path / "empty", tmp_path / "out", "qwen3")
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"data_source": ["x"], "prompt_text": ["q"]}).to_parquet(bad)
    with pytest.raises(D.DataError, match=r"missing column\(s\) \['reward_model'\]"):
        D.retemplate(bad, tmp_path / "out", "qwen3")
    no_problem = tmp_path / "no_problem.parquet"
    D.write_rows(
        [{"data_source": "x", "reward_model": {"ground_truth": "1"}, "extra_info": {"index": 0}}], no_problem
    )
    with pytest.raises(D.DataError, match="row 0: row has no problem text"):
        D.retemplate(no_problem, tmp_path / "out", "qwen3")
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, shared_math, capsys):
    assert (
        D.main(
            [
                "retemplate",
                "--src",
                str(shared_math / "aime_2025.parquet"),
                "--out",
                str(tmp_path),
                "--style",
                "qwen3",
            ]
        )
        == 0
    )
    assert (tmp_path / "aime_2025.parquet").is_file()
    assert (
        D.main(["retemplate", "--src", str(tmp_path / "missing"), "--out", str(tmp_path), "--style", "qwen3"])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    # the module runs as ``python -m verl_ext.data``
    proc = subprocess.run(
        [sys.executable, "-m", "verl_ext.data", "ensure", "--out", str(tmp_path / "e"), "--style", "octothinker",
         "--src", str(shared_math)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "re-templating" in proc.stdout and (tmp_path / "e" / "train.parquet").is_file()
