"""Start-up validation: every setting that would make phase 1 wrong fails with the key and the fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from _verl_cpu import RECIPE_CONFIG  # noqa: I001
from hydra import compose, initialize_config_dir
from transformers import AutoConfig, GPT2Config

from verl_ext.architectures import REJECTED, VERIFIED
from verl_ext.bupo.config import (
    BuPOConfig,
    BuPOConfigError,
    architecture_self_test,
    tiny_config,
    validate_config,
)
from verl_ext.random_models import make_config

QWEN3_4B = make_config("qwen3", num_hidden_layers=36, vocab_size=128)  # Qwen3-4B depth, tiny width


def _cfg(*overrides: str, preset: str = "qwen3_4b"):
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        return compose("bupo_trainer", overrides=[f"preset={preset}", *overrides])


def test_paper_preset_is_valid():
    bupo = validate_config(_cfg(), hf_config=QWEN3_4B)
    assert (bupo.internal_layer, bupo.internal_steps, bupo.final_norm) == (5, 30, False)
    assert bupo.schedule_obj.layer_at(30) == 5 and bupo.schedule_obj.layer_at(31) == -1


@pytest.mark.parametrize(
    "override, key",
    [
        ("bupo.internal_layer=36", "bupo.internal_layer=36 is outside the model's range"),
        ("bupo.internal_steps=-1", "bupo.internal_steps must be an integer >= 0"),
        ("bupo.internal_layer=-2", "bupo.internal_layer must be a 0-based"),
        ("+bupo.internal_layr=3", "unknown key(s) bupo.internal_layr"),
        ("bupo.schedule=[{layer:5,steps:10},{layer:40,steps:5}]", "bupo.schedule[1].layer=40"),
        ("algorithm.rollout_correction.bypass_mode=true", "algorithm.rollout_correction.bypass_mode=true"),
        ("algorithm.rollout_correction.rollout_is=token", "Set algorithm.rollout_correction.rollout_is=null"),
        (
            "algorithm.rollout_correction.rollout_rs=token_k1",
            "Set algorithm.rollout_correction.rollout_rs=null",
        ),
        (
            "actor_rollout_ref.actor.use_kl_loss=true",
            "actor_rollout_ref.actor.use_kl_loss=true during phase 1",
        ),
        ("algorithm.use_kl_in_reward=true", "algorithm.use_kl_in_reward=true during phase 1"),
        ("actor_rollout_ref.actor.fsdp_config.forward_prefetch=true", "forward_prefetch=true"),
        ("actor_rollout_ref.model.enable_activation_offload=true", "enable_activation_offload=true"),
        ("trainer.use_v1=false", "trainer.use_v1=false"),
        ("trainer.v1.trainer_mode=separate_async", "trainer.v1.trainer_mode=separate_async"),
        ("actor_rollout_ref.rollout.n=1", "actor_rollout_ref.rollout.n < 2"),
        ("actor_rollout_ref.actor.strategy=megatron", "BuPO supports fsdp and fsdp2 only"),
        ("bupo.layer_entropy_freq=5 actor_rollout_ref.actor.strategy=fsdp", "use strategy=fsdp2"),
    ],
)
def test_rejections_name_key_and_fix(override, key):
    with pytest.raises(BuPOConfigError) as err:
        validate_config(_cfg(*override.split()), hf_config=QWEN3_4B)
    assert key in str(err.value)


def test_range_message_names_valid_range():
    with pytest.raises(BuPOConfigError, match=r"valid values are 0\.\.35"):
        validate_config(_cfg("bupo.internal_layer=36"), hf_config=QWEN3_4B)


def test_kl_and_rollout_correction_allowed_without_phase1():
    cfg = _cfg(
        "bupo.enable=false",
        "actor_rollout_ref.actor.use_kl_loss=true",
        "algorithm.rollout_correction.rollout_is=token",
    )
    assert not validate_config(cfg, hf_config=QWEN3_4B).phase1_active


def test_unsupported_architecture_fails_self_test():
    gpt2 = GPT2Config(n_layer=36, n_embd=64, n_head=4, vocab_size=128)
    gpt2.num_hidden_layers = 36
    with pytest.raises(BuPOConfigError, match="slicing self-test"):
        validate_config(_cfg(), hf_config=gpt2)


@pytest.mark.parametrize(
    "cfg",
    [
        QWEN3_4B,
        make_config("llama", num_hidden_layers=36, vocab_size=128),
    ],
)
def test_supported_architectures_pass_self_test(cfg):
    validate_config(_cfg(), hf_config=cfg)


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("arch", [v.model_type for v in VERIFIED])
def test_self_test_on_shallow_models(arch, n_layers):
    """Issue 15: 1- and 2-layer models (what a CPU run uses) pass; the tiny copy used to keep the
    original's per-layer ``layer_types`` while growing to 3 layers (an index error in Qwen3)."""
    architecture_self_test(make_config(arch, num_hidden_layers=n_layers))


def test_start_up_accepts_a_two_layer_qwen3():
    bupo = validate_config(_cfg("bupo.internal_layer=1"), hf_config=make_config("qwen3", num_hidden_layers=2))
    assert bupo.internal_layer == 1


@pytest.mark.parametrize("arch", [v.model_type for v in VERIFIED])
def test_self_test_on_real_size_default_configs(arch):
    """The architecture's default (real-size) config: token ids past the tiny vocabulary (Phi-3), MLA
    and expert widths (DeepSeek-V3) and 5:1 layer patterns (Gemma 3) all shrink consistently."""
    architecture_self_test(AutoConfig.for_model(arch))


def test_tiny_config_keeps_every_kind_of_layer_and_valid_token_ids():
    gemma3 = AutoConfig.for_model("gemma3_text", num_hidden_layers=34)  # 5 sliding : 1 full
    tiny = tiny_config(gemma3)
    assert tiny.num_hidden_layers == 3
    assert tiny.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert gemma3.num_hidden_layers == 34 and len(gemma3.layer_types) == 34  # the original is untouched
    grown = tiny_config(make_config("qwen3", num_hidden_layers=1))
    assert grown.num_hidden_layers == 3 and grown.layer_types == ["full_attention"] * 3
    phi3 = tiny_config(AutoConfig.for_model("phi3"))  # pad = eos = 32000, vocabulary shrunk to 128
    assert phi3.pad_token_id is None and phi3.eos_token_id is None and phi3.bos_token_id == 1
    glm = tiny_config(make_config("qwen3", eos_token_id=[1, 500, 7]))
    assert glm.eos_token_id == [1, 7]
    mla = tiny_config(AutoConfig.for_model("deepseek_v3"))  # multi-head: KV heads follow the heads
    assert mla.num_key_value_heads == mla.num_attention_heads == 4 and mla.n_routed_experts == 4


@pytest.mark.parametrize("entry", REJECTED, ids=lambda r: r.model_type)
def test_rejected_architectures_fail_at_start_up(entry):
    """Every architecture the README lists as rejected fails validate_config with the matrix's reason."""
    hf_config = AutoConfig.for_model(entry.model_type)
    hf_config.num_hidden_layers = 36
    with pytest.raises(
        BuPOConfigError, match="actor_rollout_ref.model.path: .* fails the slicing self-test"
    ) as err:
        validate_config(_cfg(), hf_config=hf_config)
    assert entry.error in str(err.value)
    assert "verified architectures" in str(err.value) and "Qwen3-MoE" in str(err.value)


def test_bupo_block_defaults():
    assert BuPOConfig.from_dict(None).final_norm is False
    assert not BuPOConfig.from_dict({"internal_layer": 3}).phase1_active


def test_entry_point_fails_before_ray(tiny_model_dir, tmp_path):
    """main_bupo reads the local model's config.json and stops with the key before starting Ray."""
    path, _ = tiny_model_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe.bupo.main_bupo",
            "preset=qwen3_4b",
            f"actor_rollout_ref.model.path={path}",
            "bupo.internal_layer=4",
            f"hydra.run.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=RECIPE_CONFIG.parents[2],
        env=env,
    )
    assert proc.returncode != 0
    assert "bupo.internal_layer=4 is outside the model's range" in proc.stderr
    assert "valid values are 0..3" in proc.stderr
    assert "ray init" not in proc.stdout


# --------------------------------------------------------------------------------------------------------
# Layers are checked whether phase 1 is on or not; enable=true needs a phase-1 step
# --------------------------------------------------------------------------------------------------------

PRESET_DEPTHS = {"qwen3_4b": 36, "qwen3_8b": 36, "octothinker_3b": 28, "octothinker_8b": 32}


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["bupo.enable=false", "bupo.internal_layer=99"], "bupo.internal_layer=99 is outside"),
        (["bupo.internal_steps=0", "bupo.enable=false", "bupo.internal_layer=36"], "bupo.internal_layer=36"),
        (
            ["bupo.enable=false", "bupo.schedule=[{layer:5,steps:0},{layer:40,steps:3}]"],
            "bupo.schedule[1].layer=40 is outside",
        ),
    ],
)
def test_set_layer_is_checked_with_phase1_off(overrides, key):
    with pytest.raises(BuPOConfigError, match=r"valid values are 0\.\.35") as err:
        validate_config(_cfg(*overrides), hf_config=QWEN3_4B)
    assert key in str(err.value)


def test_enable_without_a_phase1_step_names_both_ways_out():
    with pytest.raises(BuPOConfigError) as err:
        validate_config(_cfg("bupo.internal_steps=0"), hf_config=QWEN3_4B)
    msg = str(err.value)
    assert "bupo.enable=true" in msg and "bupo.internal_steps=N" in msg and "bupo.enable=false" in msg
    with pytest.raises(BuPOConfigError, match="no step trains an internal policy"):
        validate_config(_cfg("bupo.schedule=[{layer:5,steps:0}]"), hf_config=QWEN3_4B)


def test_issue_case_base_config_with_out_of_range_layer_fails(tiny_model_dir):
    """No preset, ``internal_steps`` forgotten, layer 99 on a 4-layer model: rejected, model config read."""
    path, _ = tiny_model_dir
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        base = compose("bupo_trainer", overrides=[f"actor_rollout_ref.model.path={path}"])
        cfg = compose(
            "bupo_trainer", overrides=[f"actor_rollout_ref.model.path={path}", "bupo.internal_layer=99"]
        )
        grpo = compose(
            "bupo_trainer",
            overrides=[f"actor_rollout_ref.model.path={path}", "bupo.internal_layer=99", "bupo.enable=false"],
        )
    for c in (base, cfg):
        with pytest.raises(BuPOConfigError, match="bupo.enable=false for the GRPO baseline"):
            validate_config(c, self_test=False)
    with pytest.raises(BuPOConfigError, match=r"bupo.internal_layer=99 is outside.*valid values are 0\.\.3"):
        validate_config(grpo, self_test=False)  # reads the 4-layer model's config.json


@pytest.mark.parametrize("enable", [True, False], ids=["bupo", "grpo_twin"])
@pytest.mark.parametrize("preset", sorted(PRESET_DEPTHS))
def test_every_preset_and_its_grpo_twin_are_valid(preset, enable):
    hf = make_config("llama", num_hidden_layers=PRESET_DEPTHS[preset], vocab_size=128)
    bupo = validate_config(
        _cfg(f"bupo.enable={str(enable).lower()}", preset=preset), hf_config=hf, self_test=False
    )
    assert bupo.phase1_active is enable
    assert bupo.head_chunk_size is None  # the device's default


def test_head_chunk_size_accepts_rows_null_and_auto():
    assert BuPOConfig.from_dict({"head_chunk_size": 256}).head_chunk_size == 256
    assert BuPOConfig.from_dict({"head_chunk_size": None}).head_chunk_size is None
    assert BuPOConfig.from_dict({"head_chunk_size": "auto"}).head_chunk_size is None
    for bad in (0, -4, 2.5, "big", True):
        with pytest.raises(BuPOConfigError, match="bupo.head_chunk_size must be an integer > 0 or null"):
            BuPOConfig.from_dict({"head_chunk_size": bad})


# --------------------------------------------------------------------------------------------------------
# The entropy profile (telemetry, `auto`) runs on the analysis' architectures only: checked at start-up
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["bupo.layer_entropy_freq=5"], "bupo.layer_entropy_freq=5 (set it to 0)"),
        (["bupo.internal_layer=auto"], "bupo.internal_layer=auto (set bupo.internal_layer=K by hand)"),
        (
            ["bupo.enable=false", "bupo.internal_steps=0", "bupo.layer_entropy_freq=1"],
            "bupo.layer_entropy_freq=1",
        ),
    ],
    ids=["telemetry", "auto", "grpo-telemetry"],
)
def test_profile_on_an_unsupported_architecture_fails_at_start_up(overrides, key):
    mistral = AutoConfig.for_model("mistral", num_hidden_layers=36)
    with pytest.raises(BuPOConfigError) as err:
        validate_config(_cfg(*overrides), hf_config=mistral, self_test=False)
    assert key in str(err.value)
    assert "supports model_type qwen2, qwen3, llama only" in str(err.value) and "'mistral'" in str(err.value)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_profile_on_a_supported_architecture_passes(arch):
    hf_config = AutoConfig.for_model(arch, num_hidden_layers=36)
    bupo = validate_config(_cfg("bupo.layer_entropy_freq=5"), hf_config=hf_config, self_test=False)
    assert bupo.layer_entropy_freq == 5
    validate_config(
        _cfg("bupo.layer_entropy_freq=0"), hf_config=AutoConfig.for_model("mistral"), self_test=False
    )
