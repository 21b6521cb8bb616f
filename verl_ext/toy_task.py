"""A toy task a random tiny model can visibly learn in a few RL steps, with its model, data and reward.

The task: "write digits". The reward is dense and rule-based, the fraction of the response's
characters that are decimal digits (0 for an empty response), so a random model's GRPO groups
already have spread and the policy can climb from about 0.05 towards 1 within minutes on a CPU.
:func:`build` writes a random-weight Qwen3 (byte-level BPE tokenizer with a ChatML template, so
``"\\n"`` is one token; head_dim 32, which vLLM's CPU attention accepts) and train/validation
parquet files in verl's schema. ``python -m verl_ext.toy_task OUT_DIR`` does it from the shell.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

DATA_SOURCE = "toy/digits"
INSTRUCTIONS = (
    "Write digits.",
    "Reply with numbers only.",
    "Count something.",
    "Give me a number.",
    "Digits, please.",
    "Say a long number.",
)
# The tiny model (see build): 4 decoder layers, so valid 0-based internal layers are 0..3.
MODEL_KWARGS: dict[str, Any] = dict(
    num_hidden_layers=4,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=384,
)


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any = None, extra_info: Any = None, **_: Any
) -> dict[str, float]:
    """verl reward contract: the fraction of ``solution_str``'s characters that are ASCII digits.

    Args:
        data_source: the row's data source (any; the rule is the same).
        solution_str: the decoded response.
        ground_truth: unused (the rule needs none).
        extra_info: unused.

    Returns:
        ``{"score": fraction in [0, 1], "acc": 1.0 if at least half the characters are digits}``.
    """
    text = solution_str.strip()
    if not text:
        return {"score": 0.0, "acc": 0.0}
    frac = sum(ch in "0123456789" for ch in text) / len(text)
    return {"score": float(frac), "acc": float(frac >= 0.5)}


def rows(n: int, split: str, seed: int) -> list[dict[str, Any]]:
    """``n`` prompts in verl's RL parquet schema (chat-format prompt, rule reward, no ground truth)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = f"{rng.choice(INSTRUCTIONS)} #{rng.randrange(1000)}"
        out.append(
            {
                "data_source": DATA_SOURCE,
                "prompt": [{"role": "user", "content": text}],
                "ability": "toy",
                "reward_model": {"style": "rule", "ground_truth": "digits"},
                "extra_info": {"index": i, "split": split},
            }
        )
    return out


def build(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 64,
    n_val: int = 16,
    arch: str = "qwen3",
    force: bool = False,
) -> Path:
    """Write ``model/`` (random tiny model + tokenizer), ``train.parquet`` and ``val.parquet``.

    Args:
        out_dir: target folder (created).
        seed: seed of the weights and the prompts.
        arch: a ``model_type`` :func:`verl_ext.random_models.make_model` builds (default Qwen3; e.g.
            ``qwen3_moe`` for a tiny mixture of experts with the same dimensions).
        n_train: training prompts.
        n_val: validation prompts.
        force: rebuild even if ``out_dir/manifest.json`` already describes the same build.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    manifest = {"seed": seed, "n_train": n_train, "n_val": n_val, "arch": arch, "model": MODEL_KWARGS}
    marker = out / "manifest.json"
    if not force and marker.is_file() and json.loads(marker.read_text()) == manifest:
        return out  # already built: decided before importing torch (each tiny run asks)

    import pandas as pd

    from verl_ext.random_models import make_model, make_tokenizer, save_model_and_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model = make_model(arch, seed=seed, **MODEL_KWARGS)
    save_model_and_tokenizer(model, out / "model", tokenizer=make_tokenizer(MODEL_KWARGS["vocab_size"]))
    pd.DataFrame(rows(n_train, "train", seed)).to_parquet(out / "train.parquet")
    pd.DataFrame(rows(n_val, "test", seed + 1)).to_parquet(out / "val.parquet")
    marker.write_text(json.dumps(manifest, indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m verl_ext.toy_task OUT_DIR [--seed N] [--arch qwen3_moe] [--force]``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="qwen3", help="model_type of the tiny model (default qwen3)")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    print(build(args.out_dir, seed=args.seed, arch=args.arch, force=args.force))


if __name__ == "__main__":
    main()
