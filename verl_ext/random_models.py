"""Random-weight causal LMs and a locally trained tokenizer, for tests, benchmarks and smoke runs.

Nothing here downloads anything: models are built from a ``transformers`` config with random
weights and the tokenizer is a byte-level BPE trained in memory on a few sentences. Every
architecture of the support matrix (:data:`verl_ext.architectures.VERIFIED`) can be built, plus
``ARCHITECTURES`` by name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from verl_ext.architectures import VERIFIED, verified

ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}
"""Architectures with their classes named here; :func:`make_config` also builds every verified one."""

BUILDABLE = tuple(dict.fromkeys([*ARCHITECTURES, *(v.model_type for v in VERIFIED)]))
"""Every ``arch`` :func:`make_config` and :func:`make_model` accept."""


@dataclass(frozen=True)
class Shape:
    """Dimensions of a decoder-only model (real model sizes use random weights)."""

    arch: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False


SHAPES: dict[str, Shape] = {
    "tiny": Shape("qwen3", 4, 64, 128, 4, 2, 16, 320),
    "small": Shape("qwen3", 12, 512, 1408, 8, 4, 64, 32000),
    # Real dimensions (random weights): Qwen3-4B ties its embeddings, Qwen3-8B does not.
    "qwen3-4b": Shape("qwen3", 36, 2560, 9728, 32, 8, 128, 151936, tie_word_embeddings=True),
    "qwen3-8b": Shape("qwen3", 36, 4096, 12288, 32, 8, 128, 151936),
}


def make_config(
    arch: str = "qwen3",
    *,
    num_hidden_layers: int = 4,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    vocab_size: int = 320,
    tie_word_embeddings: bool = False,
    attn_implementation: str = "eager",
    **extra,
) -> PretrainedConfig:
    """Build a small config of ``arch`` (a ``model_type`` of :data:`BUILDABLE`).

    A verified architecture gets its matrix entry's ``tiny`` keys (expert counts, non-trivial head
    and window parameters) under the explicit arguments; ``extra`` overrides both.
    """
    if arch not in BUILDABLE:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(BUILDABLE)}")
    kwargs = dict(
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        tie_word_embeddings=tie_word_embeddings,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    if arch != "qwen2":
        kwargs["head_dim"] = head_dim
    if arch not in ARCHITECTURES:
        kwargs.update(verified(arch).tiny)
    kwargs.update(extra)
    if arch in ARCHITECTURES:
        config = ARCHITECTURES[arch][0](**kwargs)
    else:
        config = AutoConfig.for_model(arch, **kwargs)
    config._attn_implementation = attn_implementation
    return config


def make_model(
    arch: str = "qwen3",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    init_std: float | None = None,
    **config_kwargs,
) -> PreTrainedModel:
    """A causal LM with random weights, in eval mode.

    Args:
        arch: a ``model_type`` of :data:`BUILDABLE` (``qwen3``, ``qwen2``, ``llama``, ``gemma2``, ...).
        seed: torch seed for the weights.
        dtype: parameter dtype.
        device: where to build it.
        init_std: std of the normal initialisation; ``None`` keeps the architecture default. A larger
            value gives sharper, more varied internal policies in tiny models.
        **config_kwargs: passed to :func:`make_config`.
    """
    config = make_config(arch, **config_kwargs)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    with torch.device(device):
        if arch in ARCHITECTURES:
            model = ARCHITECTURES[arch][1](config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def make_model_from_shape(name: str, **kwargs) -> PreTrainedModel:
    """A random-weight model with the dimensions of :data:`SHAPES` ``[name]``."""
    shape = SHAPES[name]
    fields = {k: v for k, v in shape.__dict__.items() if k != "arch"}
    return make_model(shape.arch, **fields, **kwargs)


QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
    "What is 1 + 1? The answer is \\boxed{2}. Let x = 3, then 2x + 1 = 7, so \\frac{1}{2} of 14 is 7.",
    "Find all real numbers such that the sum of the roots is 0. Therefore the answer is Yes.",
    "0123456789 +-*/=()[]{}^_ abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]


def make_tokenizer(vocab_size: int = 320, chat_template: str | None = QWEN3_STYLE_CHAT_TEMPLATE):
    """A byte-level BPE tokenizer trained locally, Qwen3-like specials and chat template.

    Token ids: ``<|endoftext|>`` = 0 (pad), ``<|im_end|>`` = 1 (eos), matching :func:`make_config`.
    ``vocab_size`` must leave room for the 256 byte symbols plus the specials (>= 261); smaller values
    are raised to that minimum.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(SPECIAL_TOKENS)),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def save_model_and_tokenizer(model: PreTrainedModel, path: str | os.PathLike, tokenizer=None) -> str:
    """Save a model (and a tokenizer sized to it) where ``from_pretrained`` can load both."""
    path = os.fspath(path)
    model.save_pretrained(path)
    tokenizer = tokenizer if tokenizer is not None else make_tokenizer(model.config.vocab_size)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}"
        )
    tokenizer.save_pretrained(path)
    return path
