"""Command line for the internal policy entropy analysis: data loading, tokenization, batching, outputs.

``python -m verl_ext.analysis --model PATH [--model PATH2 ...] --data FILE --out DIR`` (see ``--help``).
Inputs: a verl RL parquet (``prompt`` = chat messages, plus a response column, or ``--generate``),
or a verl validation dump JSONL (``trainer.validation_data_dir``: fields ``input``/``output``; a
directory picks its latest ``<step>.jsonl``). Outputs in DIR: ``profile.csv``, ``profile.json``,
``boundary.txt``, ``boundary.json``, ``layer_entropy.png``, ``delta_entropy.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from verl_ext.analysis.boundary import DEFAULT_EPS

PROMPT_COLUMNS = ("prompt", "input")
RESPONSE_COLUMNS = ("response", "responses", "output", "outputs")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Example:
    """One (prompt, response) pair: prompt = chat messages or plain text; response = text or None."""

    prompt: list[dict] | str
    response: str | None = None


def _resolve_data_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        dumps = sorted(
            p.glob("*.jsonl"), key=lambda f: (not f.stem.isdigit(), int(f.stem) if f.stem.isdigit() else 0)
        )
        numbered = [f for f in dumps if f.stem.isdigit()]
        if not dumps:
            raise FileNotFoundError(f"no *.jsonl validation dump in directory {p}")
        return numbered[-1] if numbered else dumps[-1]
    if not p.exists():
        raise FileNotFoundError(f"data file not found: {p}")
    return p


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        try:
            return pd.read_json(path, lines=True)
        except ValueError:
            return pd.read_json(path)
    raise ValueError(f"unsupported data format {suffix!r} for {path}: use a verl .parquet or a .jsonl dump")


def _as_prompt(value) -> list[dict] | str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        msgs = [dict(m) for m in value]
        if not all("role" in m and "content" in m for m in msgs):
            raise ValueError("a prompt given as a list must hold chat messages with 'role' and 'content'")
        return msgs
    raise ValueError(f"unsupported prompt value of type {type(value).__name__}")


def _as_responses(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [str(value)]


def _pick(columns, explicit: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str | None:
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(
                f"{path}: missing {what} column {explicit!r}; available columns: {list(columns)}"
            )
        return explicit
    return next((c for c in candidates if c in columns), None)


def load_examples(
    path: str | os.PathLike,
    *,
    prompt_column: str | None = None,
    response_column: str | None = None,
    need_response: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Read (prompt, response) examples from a verl parquet or a validation dump JSONL.

    Args:
        path: ``.parquet`` (verl RL format: ``prompt`` = list of chat messages), ``.jsonl`` (verl
            validation dump: ``input`` = decoded prompt text, ``output`` = response text), or a
            directory of ``<step>.jsonl`` dumps (the highest step is used).
        prompt_column: default the first of ``prompt``, ``input`` present.
        response_column: default the first of ``response``, ``responses``, ``output``, ``outputs``;
            a list-valued cell gives one example per response.
        need_response: False when responses will be generated (the response column is ignored).
        limit: keep at most this many examples (after expanding response lists).

    Raises:
        FileNotFoundError: missing file. ValueError: empty dataset, missing column, bad values.
    """
    p = _resolve_data_path(path)
    df = _read_table(p)
    if len(df) == 0:
        raise ValueError(f"dataset {p} is empty (0 rows)")
    pcol = _pick(df.columns, prompt_column, PROMPT_COLUMNS, "prompt", p)
    if pcol is None:
        raise ValueError(
            f"{p}: no prompt column (looked for {list(PROMPT_COLUMNS)}); available columns: {list(df.columns)}"
        )
    rcol = None
    if need_response:
        rcol = _pick(df.columns, response_column, RESPONSE_COLUMNS, "response", p)
        if rcol is None:
            raise ValueError(
                f"{p}: no response column (looked for {list(RESPONSE_COLUMNS)}); available columns: "
                f"{list(df.columns)}. Pass --response-column NAME, or --generate to sample responses"
            )
    out: list[Example] = []
    for _, row in df.iterrows():
        prompt = _as_prompt(row[pcol])
        if rcol is None:
            out.append(Example(prompt))
        else:
            out.extend(Example(prompt, r) for r in _as_responses(row[rcol]))
        if limit is not None and len(out) >= limit:
            break
    out = out[:limit] if limit is not None else out
    if not out:
        raise ValueError(f"dataset {p} yields no examples")
    return out


def encode_prompt(tokenizer, prompt: list[dict] | str, chat_template_kwargs: dict | None = None) -> list[int]:
    """Prompt token ids as verl builds them: chat template with ``add_generation_prompt=True``, rendered
    to text and tokenized without extra special tokens; a plain-text prompt is tokenized as is (with
    the tokenizer's own BOS, if any)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the prompt is a list of chat messages but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=False, **(chat_template_kwargs or {})
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_response(tokenizer, response: str) -> list[int]:
    """Response token ids (tokenized separately from the prompt, no special tokens added)."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


def make_batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids``/``attention_mask`` and the ``token_mask`` of rows predicting response tokens.

    ``pairs`` holds (prompt_ids, response_ids); sequence = prompt + response, so the response mask is
    exact. ``token_mask[b, t]`` is True when token t+1 is a response token.
    """
    T = max(len(p) + len(r) for p, r in pairs)
    B = len(pairs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    resp = torch.zeros(B, T, dtype=torch.bool)
    for b, (p, r) in enumerate(pairs):
        seq = list(p) + list(r)
        ids[b, T - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        attn[b, T - len(seq) :] = 1
        if r:
            resp[b, T - len(r) :] = True
    from verl_ext.analysis.capture import prediction_mask

    return dict(input_ids=ids, attention_mask=attn, token_mask=prediction_mask(resp))


def _eos_ids(model, tokenizer) -> set[int]:
    eos: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(v, int):
            eos.add(v)
        elif isinstance(v, (list, tuple)):
            eos.update(int(x) for x in v)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return eos


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    pad_id: int,
) -> list[list[int]]:
    """Sample responses with Hugging Face ``generate`` (left-padded batches); each response is cut after
    its first EOS token (EOS kept, as in verl's response mask)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    out: list[list[int]] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", file=sys.stderr):
        chunk = prompts[i : i + batch_size]
        P = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), P), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for b, p in enumerate(chunk):
            ids[b, P - len(p) :] = torch.tensor(p)
            attn[b, P - len(p) :] = 1
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        if eos:
            kwargs["eos_token_id"] = sorted(eos)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        for row in gen[:, P:].tolist():
            cut = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def load_model(path: str, dtype: torch.dtype, device: str, attn_implementation: str | None = None):
    """Load a causal LM and its tokenizer; check the architecture before loading the weights.

    Raises:
        ValueError: unsupported architecture (naming it and the supported ones).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from verl_ext.analysis.capture import SUPPORTED_MODEL_TYPES, check_supported

    config = AutoConfig.from_pretrained(path)
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        archs = getattr(config, "architectures", None) or [mt]
        raise ValueError(
            f"unsupported architecture {archs[0]} (model_type={mt!r}) at {path}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    kwargs = dict(dtype=dtype)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device).eval()
    check_supported(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def profile_model(
    model,
    tokenizer,
    examples: list[Example],
    *,
    batch_size: int,
    final_norm: bool,
    chunk_size: int,
    generate: bool,
    max_new_tokens: int,
    temperature: float,
    max_response_length: int | None,
    chat_template_kwargs: dict | None,
    desc: str = "profile",
) -> tuple[pd.DataFrame, dict]:
    """Profile one model on the examples; returns (tidy table, info dict with token/sequence counts)."""
    from tqdm import tqdm

    from verl_ext.analysis.capture import check_supported
    from verl_ext.analysis.decompose import ProfileAccumulator, full_head_weight, profile_batch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [encode_prompt(tokenizer, ex.prompt, chat_template_kwargs) for ex in examples]
    if generate:
        responses = generate_responses(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
            pad_id=pad_id,
        )
    else:
        responses = [encode_response(tokenizer, ex.response or "") for ex in examples]
    if max_response_length is not None:
        responses = [r[:max_response_length] for r in responses]
    pairs = [(p, r) for p, r in zip(prompts, responses) if r]
    skipped = len(prompts) - len(pairs)
    if not pairs:
        raise ValueError("every response is empty: nothing to analyse")
    pairs.sort(key=lambda pr: len(pr[0]) + len(pr[1]))
    decoder = check_supported(model)
    device = next(model.parameters()).device
    acc = ProfileAccumulator(
        len(decoder.layers),
        full_head_weight(model),
        final_norm=decoder.norm if final_norm else None,
        chunk_size=chunk_size,
    )
    for i in tqdm(range(0, len(pairs), batch_size), desc=desc, file=sys.stderr):
        batch = make_batch(pairs[i : i + batch_size], pad_id)
        profile_batch(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["token_mask"].to(device),
            accumulator=acc,
        )
    info = dict(n_sequences=len(pairs), n_skipped_empty=skipped, n_tokens=acc.n_tokens)
    info["embedding_entropy"] = acc.embedding_entropy
    return acc.table(), info


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m verl_ext.analysis",
        description="Internal policy entropy analysis (BuPO, spec section 2): per-layer entropy of the "
        "internal layer and module policies, their changes dH_ATTN/dH_FFN, plots and the boundary layer.",
    )
    p.add_argument("--model", action="append", required=True, help="HF model dir (repeat to overlay several)")
    p.add_argument(
        "--label", action="append", default=None, help="legend label per --model (default: dir name)"
    )
    p.add_argument("--data", required=True, help="verl parquet, validation dump .jsonl, or a dump directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1..."
    )
    p.add_argument("--limit", type=int, default=64, help="max number of (prompt, response) samples (0 = all)")
    p.add_argument(
        "--final-norm", action="store_true", help="logit-lens convention (default: raw, as the paper)"
    )
    p.add_argument(
        "--generate", action="store_true", help="sample the responses with each model (HF generate)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature for --generate (0 = greedy)"
    )
    p.add_argument(
        "--max-response-length", type=int, default=None, help="truncate responses to this many tokens"
    )
    p.add_argument("--prompt-column", default=None)
    p.add_argument("--response-column", default=None)
    p.add_argument(
        "--chat-template-kwargs",
        default=None,
        help="JSON passed to apply_chat_template, e.g. '{\"enable_thinking\": false}'",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="token rows per fused-head chunk (default 128 on CPU, where small chunks are fastest, else 1024)",
    )
    p.add_argument(
        "--eps", type=float, default=DEFAULT_EPS, help="boundary rule tolerance (nats) for dH_FFN ~ 0"
    )
    p.add_argument("--attn-implementation", default=None, help="e.g. eager, sdpa, flash_attention_2")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> dict:
    """Run the analysis for parsed arguments; returns ``{label: BoundaryResult}``."""
    from verl_ext.analysis.boundary import find_boundary_layer
    from verl_ext.analysis.plots import plot_delta_entropy, plot_layer_entropy

    labels = args.label or []
    if labels and len(labels) != len(args.model):
        raise ValueError(f"got {len(labels)} --label for {len(args.model)} --model")
    if not labels:
        labels = [Path(m).name or m for m in args.model]
        if len(set(labels)) != len(labels):
            labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    if args.batch_size <= 0:
        raise ValueError("--batch-size must be > 0")
    chat_kwargs = json.loads(args.chat_template_kwargs) if args.chat_template_kwargs else None
    limit = args.limit if args.limit and args.limit > 0 else None
    examples = load_examples(
        args.data,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        need_response=not args.generate,
        limit=limit,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    tables, boundaries, infos = [], {}, {}
    for path, label in zip(args.model, labels):
        torch.manual_seed(args.seed)
        model, tokenizer = load_model(path, dtype, args.device, args.attn_implementation)
        table, info = profile_model(
            model,
            tokenizer,
            examples,
            batch_size=args.batch_size,
            final_norm=args.final_norm,
            chunk_size=args.chunk_size or (128 if str(args.device).startswith("cpu") else 1024),
            generate=args.generate,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            max_response_length=args.max_response_length,
            chat_template_kwargs=chat_kwargs,
            desc=label,
        )
        del model
        table.insert(0, "model", path)
        table.insert(0, "label", label)
        tables.append(table)
        infos[label] = info
        boundaries[label] = find_boundary_layer(table, eps=args.eps, label=label)
    full = pd.concat(tables, ignore_index=True)
    full.to_csv(out / "profile.csv", index=False)
    full.to_json(out / "profile.json", orient="records", indent=1)
    text = []
    for label, b in boundaries.items():
        i = infos[label]
        text.append(
            f"{b.evidence()}\n({i['n_sequences']} sequences, {i['n_tokens']} response tokens, "
            f"{'final_norm' if args.final_norm else 'raw'} convention)\n"
        )
        print(f"[{label}] {b.config_line()}")
        if b.warning:
            print(f"[{label}] WARNING: {b.warning}", file=sys.stderr)
    (out / "boundary.txt").write_text("\n".join(text))
    (out / "boundary.json").write_text(
        json.dumps({lab: {**b.to_dict(), **infos[lab]} for lab, b in boundaries.items()}, indent=1)
    )
    profiles = {lab: t for lab, t in zip(labels, tables)}
    plot_layer_entropy(profiles, out / "layer_entropy.png", boundaries)
    plot_delta_entropy(profiles, out / "delta_entropy.png", boundaries)
    print(f"wrote {out}/profile.csv, profile.json, boundary.txt, layer_entropy.png, delta_entropy.png")
    return boundaries


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (2 with a one-line ``error:`` message on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
