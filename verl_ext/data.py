"""Build and re-template the BuPO math data (DeepMath-5k train; MATH-500, AMC23, AIME24/25) as verl parquet.

Command line (``python -m verl_ext.data <command> --help`` for every option)::

    # from the public Hugging Face datasets (needs network; DeepMath-103K is a ~2 GB download)
    python -m verl_ext.data build --out data/math-qwen3 --style qwen3 [--train-size 5000 --seed 42]
    # offline, from existing verl parquet files (e.g. the shared copies), in either prompt style
    python -m verl_ext.data retemplate --src ../shared/data/math --out data/math-octo --style octothinker
    # what run scripts call: do nothing if the five files exist, else re-template --src, else build
    python -m verl_ext.data ensure --out data/math-qwen3 --style qwen3 [--src ../shared/data/math]

Output files and ``data_source`` values (the same as ``../shared/data/math``):

    train.parquet (math_dapo), math500.parquet (qwen_math500), amc2023.parquet (qwen_amc2023),
    aime_2024.parquet (qwen_aime_2024), aime_2025.parquet (qwen_aime_2025)

Rows: ``data_source``, ``prompt`` (chat messages), ``ability`` = "MATH", ``reward_model`` =
``{"ground_truth", "style": "rule"}``, ``extra_info`` = ``{"index", "split", "problem", ...}`` (the raw
problem is kept so that files can be re-templated later).

Prompt styles:

- ``qwen3``: ``[system: SYSTEM_PROMPT, user: problem]``; the model's own chat template renders it, with
  ``data.apply_chat_template_kwargs={enable_thinking: false}`` (an empty think block after the assistant
  header).
- ``octothinker``: one user message whose content is the paper's plain-text prompt
  (:data:`OCTOTHINKER_PROMPT_TEMPLATE` with the problem filled in). Base models have no chat template and verl
  always calls ``tokenizer.apply_chat_template``; set ``actor_rollout_ref.model.custom_chat_template`` to
  :data:`OCTOTHINKER_CHAT_TEMPLATE`, which emits the tokenizer's BOS token (if it has one) and the message
  content verbatim, so the model sees exactly the paper's text.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
"""System message of the Qwen3 prompt style (spec section 4)."""

OCTOTHINKER_PROMPT_PREFIX = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
    "answer. User: You must put your answer inside \\boxed{} and Your final answer will be extracted "
    "automatically by the \\boxed{} tag.\n"
)
OCTOTHINKER_PROMPT_SUFFIX = "\nAssistant:"
OCTOTHINKER_PROMPT_TEMPLATE = OCTOTHINKER_PROMPT_PREFIX + "{problem}" + OCTOTHINKER_PROMPT_SUFFIX
"""The paper's OctoThinker prompt; fill ``{problem}`` with ``str.replace`` (the text also has ``{}``)."""

OCTOTHINKER_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- message['content'] }}"
    "{%- endfor %}"
)
"""Jinja chat template for ``actor_rollout_ref.model.custom_chat_template`` with the ``octothinker`` style.

It renders ``BOS + content`` (BOS only if the tokenizer defines one). ``apply_chat_template(tokenize=True)``
encodes the rendered text without adding special tokens, so there is exactly one BOS, as when a base model
tokenizes plain text. ``add_generation_prompt`` adds nothing: the content already ends with "Assistant:".
"""

STYLES = ("qwen3", "octothinker")

TRAIN_FILE = "train.parquet"
# output file -> data_source, in the order of the shared copies
FILES: dict[str, str] = {
    TRAIN_FILE: "math_dapo",
    "math500.parquet": "qwen_math500",
    "amc2023.parquet": "qwen_amc2023",
    "aime_2024.parquet": "qwen_aime_2024",
    "aime_2025.parquet": "qwen_aime_2025",
}
VAL_FILES = tuple(name for name in FILES if name != TRAIN_FILE)
# input file names that are renamed when re-templating a directory
RENAMES = {"deepmath-5k.parquet": TRAIN_FILE}
# Avg@K protocol of the paper: K=32 for AIME24/25, K=16 for AMC23 and MATH500
PAPER_VAL_N: dict[str, int] = {"qwen_aime_2024": 32, "qwen_aime_2025": 32, "*": 16}
ROLLOUT_N_COLUMN = "__rollout_n__"
"""Per-row number of validation samples; verl 0.9.1's V1 trainer reads it instead of ``val_kwargs.n``."""


class DataError(ValueError):
    """Missing files or columns, or rows that cannot be turned into prompts."""


# ---------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------


def octothinker_prompt(problem: str) -> str:
    """The paper's OctoThinker plain-text prompt for one problem."""
    return OCTOTHINKER_PROMPT_PREFIX + problem + OCTOTHINKER_PROMPT_SUFFIX


def build_prompt(problem: str, style: str) -> list[dict[str, str]]:
    """Chat messages for one problem.

    Args:
        problem: The problem statement.
        style: ``qwen3`` or ``octothinker``.

    Returns:
        The ``prompt`` column value (a list of ``{"role", "content"}``).
    """
    if style == "qwen3":
        return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    if style == "octothinker":
        return [{"role": "user", "content": octothinker_prompt(problem)}]
    raise DataError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")


def detect_style(prompt: Any) -> str | None:
    """Which style a ``prompt`` value has (``qwen3``, ``octothinker`` or None)."""
    messages = _messages(prompt)
    if (
        len(messages) == 2
        and messages[0].get("role") == "system"
        and messages[0].get("content") == SYSTEM_PROMPT
    ):
        return "qwen3"
    if len(messages) == 1 and _strip_octothinker(str(messages[0].get("content", ""))) is not None:
        return "octothinker"
    return None


def _strip_octothinker(content: str) -> str | None:
    if content.startswith(OCTOTHINKER_PROMPT_PREFIX) and content.endswith(OCTOTHINKER_PROMPT_SUFFIX):
        return content[len(OCTOTHINKER_PROMPT_PREFIX) : len(content) - len(OCTOTHINKER_PROMPT_SUFFIX)]
    return None


def _messages(prompt: Any) -> list[dict]:
    if prompt is None:
        return []
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, dict):
        return [prompt]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def problem_of(row: Mapping[str, Any]) -> str:
    """Recover the raw problem of a verl row.

    Looks at ``extra_info.problem``, ``extra_info.raw_problem``, a ``problem`` or ``question`` column,
    then the last user message (with the OctoThinker wrapper removed).

    Raises:
        DataError: If none of them gives a non-empty string.
    """
    extra = row.get("extra_info")
    if isinstance(extra, Mapping):
        for key in ("problem", "raw_problem"):
            if isinstance(extra.get(key), str) and extra[key].strip():
                return extra[key]
    for key in ("problem", "question"):
        if isinstance(row.get(key), str) and row[key].strip():
            return row[key]
    messages = _messages(row.get("prompt"))
    users = [m for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    if users:
        content = users[-1]["content"]
        stripped = _strip_octothinker(content)
        return stripped if stripped is not None else content
    raise DataError(
        "row has no problem text (no extra_info.problem, problem/question column or user message)"
    )


def answer_str(value: Any) -> str:
    """A ground-truth answer as a string (``27.0`` -> ``"27"``, None -> "")."""
    if value is None:
        return ""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def make_row(
    problem: str,
    answer: str,
    data_source: str,
    style: str,
    index: int,
    split: str,
    extra_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One verl RL row."""
    info = {"index": int(index), "split": split, "problem": problem}
    info.update(extra_info or {})
    return {
        "data_source": data_source,
        "prompt": build_prompt(problem, style),
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": info,
    }


# ---------------------------------------------------------------------------------------------------------
# Per-source number of validation samples
# ---------------------------------------------------------------------------------------------------------


def parse_val_n(spec: str | int | Mapping[str, int] | None) -> dict[str, int] | None:
    """Parse ``--val-n``: ``paper``, an int for every file, or ``source=n,...[,default]``.

    Returns:
        A mapping data_source -> n with ``"*"`` as the default, or None for no column.
    """
    if spec is None or spec == "":
        return None
    if isinstance(spec, Mapping):
        return {str(k): int(v) for k, v in spec.items()}
    if isinstance(spec, int):
        return {"*": spec}
    if spec == "paper":
        return dict(PAPER_VAL_N)
    out: dict[str, int] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        key, _, value = part.rpartition("=")
        try:
            out[key.strip() or "*"] = int(value)
        except ValueError:
            raise DataError(
                f"bad --val-n entry {part!r}: use 'paper', an integer or source=n pairs"
            ) from None
    if any(n < 1 for n in out.values()):
        raise DataError(f"--val-n values must be >= 1, got {spec!r}")
    return out


def _n_for(val_n: Mapping[str, int], data_source: str) -> int | None:
    return val_n.get(data_source, val_n.get("*"))


# ---------------------------------------------------------------------------------------------------------
# Reading and writing parquet
# ---------------------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a verl parquet file into plain Python rows (lists and dicts, no numpy arrays)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise DataError(f"parquet file not found: {path}")
    return pq.read_table(path).to_pylist()


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as a parquet file (creating the directory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not rows:
        raise DataError(f"refusing to write an empty file: {path}")
    columns: dict[str, None] = {}
    for row in rows:  # pyarrow takes the columns of the first row only: use the union, in order
        columns.update(dict.fromkeys(row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), path)
    return path


def _check_verl_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    if not rows:
        raise DataError(f"{path}: no rows")
    columns = set(rows[0])
    missing = [c for c in ("data_source", "reward_model") if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; columns are {sorted(columns)}")
    for i, row in enumerate(rows):
        rm = row.get("reward_model")
        if not isinstance(rm, Mapping) or "ground_truth" not in rm:
            raise DataError(f"{path}: row {i} has no reward_model.ground_truth (got {rm!r})")


def retemplate_rows(
    rows: Sequence[Mapping[str, Any]],
    style: str,
    val_n: Mapping[str, int] | None = None,
    path: Path | None = None,
) -> list[dict[str, Any]]:
    """Give existing verl rows a new prompt style, keeping every other column.

    ``extra_info.problem`` is added (so the output can be re-templated again); with ``val_n`` a
    ``__rollout_n__`` column sets the number of validation samples per row.
    """
    build_prompt("", style)  # validates the style
    where = f"{path}: " if path is not None else ""
    out = []
    for i, row in enumerate(rows):
        try:
            problem = problem_of(row)
        except DataError as e:
            raise DataError(f"{where}row {i}: {e}") from None
        new = dict(row)
        extra = dict(row.get("extra_info") or {})
        extra["problem"] = problem
        new["extra_info"] = extra
        new["prompt"] = build_prompt(problem, style)
        if val_n is not None:
            n = _n_for(val_n, str(row["data_source"]))
            if n is None:
                raise DataError(f"{where}--val-n gives no value for data_source {row['data_source']!r}")
            new[ROLLOUT_N_COLUMN] = n
        out.append(new)
    return out


def _source_files(src: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(input file, output name) pairs for ``--src`` (directories contribute every ``*.parquet``)."""
    pairs: list[tuple[Path, str]] = []
    for s in src:
        p = Path(s)
        if p.is_dir():
            files = sorted(p.glob("*.parquet"))
            if not files:
                raise DataError(f"no parquet files in {p}")
            pairs.extend((f, RENAMES.get(f.name, f.name)) for f in files)
        elif p.is_file():
            pairs.append((p, RENAMES.get(p.name, p.name)))
        else:
            raise DataError(f"--src {p} does not exist")
    names = [name for _, name in pairs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"several inputs map to the same output file(s) {dupes}")
    return pairs


def retemplate(
    src: Sequence[str | Path] | str | Path,
    out: str | Path,
    style: str,
    val_n: str | int | Mapping[str, int] | None = None,
    val_only: bool = False,
    require_all: bool = False,
) -> list[Path]:
    """Re-template verl parquet files offline.

    Args:
        src: Directories and/or files (``deepmath-5k.parquet`` is written as ``train.parquet``).
        out: Output directory (may equal a source directory).
        style: ``qwen3`` or ``octothinker``.
        val_n: ``--val-n`` spec: adds ``__rollout_n__`` to the validation files (not to train).
        val_only: Skip ``train.parquet``.
        require_all: Fail unless the five standard files are produced.

    Returns:
        The written files.
    """
    if isinstance(src, (str, Path)):
        src = [src]
    n_spec = parse_val_n(val_n)
    pairs = _source_files(src)
    if val_only:
        pairs = [(p, name) for p, name in pairs if name != TRAIN_FILE]
    if require_all:
        missing = [
            name
            for name in FILES
            if name not in {n for _, n in pairs} and not (val_only and name == TRAIN_FILE)
        ]
        if missing:
            raise DataError(
                f"--src {', '.join(map(str, src))} lacks {missing} (have {[n for _, n in pairs]})"
            )
    written = []
    converted = []
    for path, name in pairs:  # convert everything first, so a bad file leaves the output untouched
        rows = read_rows(path)
        _check_verl_rows(rows, path)
        converted.append((name, retemplate_rows(rows, style, None if name == TRAIN_FILE else n_spec, path)))
    for name, rows in converted:
        written.append(write_rows(rows, Path(out) / name))
        print(f"[verl_ext.data] wrote {Path(out) / name} ({len(rows)} rows, style={style})")
    return written


# ---------------------------------------------------------------------------------------------------------
# Building from the Hugging Face Hub
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubSource:
    """Where one output file comes from on the Hugging Face Hub."""

    file: str
    data_source: str
    repo: str
    split: str
    problem_key: str
    answer_key: str
    configs: tuple[str | None, ...] = (None,)
    extra_keys: tuple[str, ...] = ()


HUB_SOURCES: dict[str, HubSource] = {
    "train": HubSource(
        TRAIN_FILE, "math_dapo", "zwhe99/DeepMath-103K", "train", "question", "final_answer",
        extra_keys=("difficulty", "topic"),
    ),
    "math500": HubSource(
        "math500.parquet", "qwen_math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer",
        extra_keys=("subject", "level", "unique_id"),
    ),
    "amc2023": HubSource("amc2023.parquet", "qwen_amc2023", "math-ai/amc23", "test", "question", "answer"),
    "aime_2024": HubSource(
        "aime_2024.parquet", "qwen_aime_2024", "HuggingFaceH4/aime_2024", "train", "problem", "answer"
    ),
    "aime_2025": HubSource(
        "aime_2025.parquet", "qwen_aime_2025", "opencompass/AIME2025", "test", "question", "answer",
        configs=("AIME2025-I", "AIME2025-II"),
    ),
}  # fmt: skip
PROBLEM_FALLBACKS = ("problem", "question")
ANSWER_FALLBACKS = ("answer", "final_answer", "ground_truth")

LoadFn = Callable[[str, "str | None", str], Any]
"""``load_fn(repo, config, split)`` -> a ``datasets.Dataset``, a pandas DataFrame or a list of dict rows."""


def parse_source_override(spec: str) -> tuple[str, dict[str, Any]]:
    """Parse ``--source NAME=REPO[:CONFIG[+CONFIG...]][@SPLIT]``."""
    name, eq, rest = spec.partition("=")
    if not eq or name not in HUB_SOURCES or not rest:
        raise DataError(
            f"bad --source {spec!r}: use NAME=REPO[:CONFIG[+CONFIG]][@SPLIT], NAME in {list(HUB_SOURCES)}"
        )
    fields: dict[str, Any] = {}
    rest, at, split = rest.partition("@")
    if at:
        fields["split"] = split
    repo, colon, configs = rest.partition(":")
    fields["repo"] = repo
    fields["configs"] = tuple(configs.split("+")) if colon else (None,)
    return name, fields


def _hub_load(repo: str, config: str | None, split: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DataError("building from the Hub needs the `datasets` package") from e
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as e:
        raise DataError(
            f"could not load {repo!r} (config={config!r}, split={split!r}) from the Hugging Face Hub: {e}\n"
            "Without network access use `retemplate --src DIR` on local verl parquet files."
        ) from e


def _to_records(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [dict(r) for r in data]
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas
        return data.to_dict("records")
    if hasattr(data, "to_list"):  # datasets.Dataset
        return data.to_list()
    return [dict(r) for r in data]


def _resolve_column(
    columns: Iterable[str], wanted: str, fallbacks: Sequence[str], what: str, where: str
) -> str:
    columns = list(columns)
    lower = {c.lower(): c for c in columns}
    for name in (wanted, *fallbacks):
        if name in columns:
            return name
        if name.lower() in lower:
            return lower[name.lower()]
    raise DataError(
        f"{where}: no {what} column (looked for {[wanted, *fallbacks]}); columns are {sorted(columns)}"
    )


def load_source(source: HubSource, load_fn: LoadFn = _hub_load) -> list[dict[str, Any]]:
    """Load one source and map it to ``{"problem", "answer", "index", **extras}`` records.

    Rows with an empty problem or answer are dropped (and counted in the printed summary).

    Raises:
        DataError: If a needed column is missing.
    """
    records: list[dict[str, Any]] = []
    for config in source.configs:
        where = source.repo + (f" ({config})" if config else "") + f" split {source.split}"
        rows = _to_records(load_fn(source.repo, config, source.split))
        if not rows:
            raise DataError(f"{where}: no rows")
        columns = rows[0].keys()
        pk = _resolve_column(columns, source.problem_key, PROBLEM_FALLBACKS, "problem", where)
        ak = _resolve_column(columns, source.answer_key, ANSWER_FALLBACKS, "answer", where)
        extras = [k for k in source.extra_keys if k in columns]
        dropped = 0
        for row in rows:
            problem = row.get(pk)
            answer = answer_str(row.get(ak))
            if not isinstance(problem, str) or not problem.strip() or not answer:
                dropped += 1
                continue
            rec = {"problem": problem.strip(), "answer": answer, "index": len(records) + dropped}
            rec.update({k: row[k] for k in extras})
            records.append(rec)
        if dropped:
            print(f"[verl_ext.data] {where}: dropped {dropped} rows without problem or answer")
    return records


def sample_indices(n_total: int, size: int, seed: int) -> list[int]:
    """Indices of a seeded sample without replacement (numpy ``default_rng(seed).choice``), unsorted."""
    import numpy as np

    if size >= n_total:
        return list(range(n_total))
    return [int(i) for i in np.random.default_rng(seed).choice(n_total, size=size, replace=False)]


def build(
    out: str | Path,
    style: str,
    train_size: int = 5000,
    seed: int = 42,
    load_fn: LoadFn = _hub_load,
    sources: Mapping[str, HubSource] | None = None,
    only: Sequence[str] | None = None,
    val_n: str | int | Mapping[str, int] | None = None,
) -> list[Path]:
    """Build the five parquet files from their Hugging Face datasets.

    Args:
        out: Output directory.
        style: ``qwen3`` or ``octothinker``.
        train_size: Number of DeepMath-103K problems sampled for training.
        seed: Sampling seed.
        load_fn: Loader (default: ``datasets.load_dataset``); tests pass an in-memory one.
        sources: Replacement for :data:`HUB_SOURCES`.
        only: Subset of source names to build.
        val_n: ``--val-n`` spec for the validation files.

    Returns:
        The written files.
    """
    build_prompt("", style)
    sources = dict(HUB_SOURCES if sources is None else sources)
    names = list(sources) if not only else list(only)
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise DataError(f"unknown source(s) {unknown}; choose from {list(sources)}")
    n_spec = parse_val_n(val_n)
    results: list[tuple[str, list[dict[str, Any]]]] = []
    for name in names:  # load everything before writing anything
        src = sources[name]
        records = load_source(src, load_fn)
        is_train = src.file == TRAIN_FILE
        if is_train:
            if len(records) < train_size:
                print(f"[verl_ext.data] {src.repo}: only {len(records)} usable rows, using all of them")
            records = [records[i] for i in sample_indices(len(records), train_size, seed)]
        split = "train" if is_train else "test"
        rows = []
        for rec in records:
            extra = {k: v for k, v in rec.items() if k not in ("problem", "answer", "index")}
            row = make_row(rec["problem"], rec["answer"], src.data_source, style, rec["index"], split, extra)
            if n_spec is not None and not is_train:
                n = _n_for(n_spec, src.data_source)
                if n is None:
                    raise DataError(f"--val-n gives no value for data_source {src.data_source!r}")
                row[ROLLOUT_N_COLUMN] = n
            rows.append(row)
        results.append((src.file, rows))
    written = []
    for file, rows in results:
        written.append(write_rows(rows, Path(out) / file))
        print(f"[verl_ext.data] wrote {Path(out) / file} ({len(rows)} rows, style={style})")
    return written


# ---------------------------------------------------------------------------------------------------------
# ensure
# ---------------------------------------------------------------------------------------------------------


def file_style(path: str | Path) -> str | None:
    """Prompt style of the first row of a parquet file."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "prompt" not in pf.schema_arrow.names:
        return None
    batch = next(pf.iter_batches(batch_size=1, columns=["prompt"]), None)
    if batch is None or batch.num_rows == 0:
        return None
    return detect_style(batch.to_pylist()[0]["prompt"])


def ensure(
    out: str | Path,
    style: str,
    src: Sequence[str | Path] | str | Path | None = None,
    train_size: int = 5000,
    seed: int = 42,
    load_fn: LoadFn = _hub_load,
) -> str:
    """Make sure ``out`` holds the five files in ``style``.

    Does nothing if they exist (and have that style); otherwise re-templates ``src`` if given, else builds
    from the Hub.

    Returns:
        What was done: ``present``, ``retemplated`` or ``built``.

    Raises:
        DataError: If the files exist in another style, or the source lacks files.
    """
    out = Path(out)
    build_prompt("", style)
    present = [name for name in FILES if (out / name).is_file()]
    if len(present) == len(FILES):
        wrong = {name: file_style(out / name) for name in present}
        wrong = {k: v for k, v in wrong.items() if v != style}
        if wrong:
            raise DataError(
                f"{out} already holds the data files, but {wrong} are not in style {style!r}; "
                "use another --out directory or `retemplate` them"
            )
        print(f"[verl_ext.data] {out}: all {len(FILES)} files present (style={style}), nothing to do")
        return "present"
    if present:
        print(f"[verl_ext.data] {out}: only {present} present, regenerating all files")
    if src is not None:
        print(f"[verl_ext.data] {out}: re-templating {src} (style={style})")
        retemplate(src, out, style, require_all=True)
        return "retemplated"
    print(f"[verl_ext.data] {out}: building from the Hugging Face Hub (style={style})")
    build(out, style, train_size=train_size, seed=seed, load_fn=load_fn)
    return "built"


# ---------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m verl_ext.data", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--out", required=True, help="output directory")
        sp.add_argument("--style", required=True, choices=STYLES, help="prompt style")

    val_n_help = (
        "add a __rollout_n__ column to validation files: 'paper' (32 for AIME24/25, 16 otherwise), "
        "an integer, or data_source=n pairs with an optional bare default, e.g. 'qwen_aime_2024=32,16'"
    )
    b = sub.add_parser("build", help="build from the public Hugging Face datasets")
    common(b)
    b.add_argument("--train-size", type=int, default=5000)
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--only", nargs="+", choices=list(HUB_SOURCES), help="build only these files")
    b.add_argument(
        "--source", action="append", default=[], metavar="NAME=REPO[:CONFIG[+CONFIG]][@SPLIT]",
        help="use another Hub dataset for NAME (columns are matched case-insensitively)",
    )  # fmt: skip
    b.add_argument("--val-n", default=None, help=val_n_help)

    r = sub.add_parser("retemplate", help="re-template existing verl parquet files (offline)")
    common(r)
    r.add_argument("--src", nargs="+", required=True, help="directories and/or parquet files")
    r.add_argument("--val-only", action="store_true", help="skip train.parquet")
    r.add_argument("--val-n", default=None, help=val_n_help)

    e = sub.add_parser("ensure", help="do nothing if the files exist, else retemplate --src, else build")
    common(e)
    e.add_argument("--src", nargs="+", default=None, help="local verl parquet files to re-template from")
    e.add_argument("--train-size", type=int, default=5000)
    e.add_argument("--seed", type=int, default=42)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (``python -m verl_ext.data``)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            sources = dict(HUB_SOURCES)
            for spec in args.source:
                name, fields = parse_source_override(spec)
                sources[name] = replace(sources[name], **fields)
            build(
                args.out,
                args.style,
                args.train_size,
                args.seed,
                sources=sources,
                only=args.only,
                val_n=args.val_n,
            )
        elif args.command == "retemplate":
            retemplate(args.src, args.out, args.style, val_n=args.val_n, val_only=args.val_only)
        else:
            ensure(args.out, args.style, src=args.src, train_size=args.train_size, seed=args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
