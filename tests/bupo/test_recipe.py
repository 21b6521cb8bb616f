"""Every preset composes with the paper's settings; every example script prints its config with --cfg job."""

from __future__ import annotations

from pathlib import Path

import pytest
from _scripts import composed_config
from _verl_cpu import RECIPE_CONFIG
from hydra import compose, initialize_config_dir

REPO = RECIPE_CONFIG.parents[2]
# preset: (model id, 0-based layer, s_inter, max response) from the paper (spec section 3 table).
PRESETS = {
    "qwen3_4b": ("Qwen/Qwen3-4B", 5, 30, 8192),
    "qwen3_8b": ("Qwen/Qwen3-8B", 5, 20, 8192),
    "octothinker_3b": ("OctoThinker/OctoThinker-3B-Long-Base", 26, 20, 3072),
    "octothinker_8b": ("OctoThinker/OctoThinker-8B-Long-Base", 30, 20, 3072),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_with_paper_settings(preset):
    model, layer, steps, resp = PRESETS[preset]
    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        cfg = compose("bupo_trainer", overrides=[f"preset={preset}"])
    assert cfg.actor_rollout_ref.model.path == model
    assert (cfg.bupo.internal_layer, cfg.bupo.internal_steps, cfg.bupo.final_norm) == (layer, steps, False)
    assert cfg.data.max_response_length == resp
    a = cfg.actor_rollout_ref.actor
    assert (a.optim.lr, a.ppo_mini_batch_size, a.clip_ratio_c, a.policy_loss.loss_mode) == (
        1e-6,
        32,
        10.0,
        "bupo",
    )
    assert (cfg.data.train_batch_size, cfg.actor_rollout_ref.rollout.n, cfg.trainer.total_training_steps) == (
        128,
        8,
        300,
    )
    assert (
        cfg.trainer.v1.trainer_mode == "bupo_sync"
        and cfg.reward.custom_reward_function.path == "pkg://verl_ext.reward"
    )
    assert "file" in cfg.trainer.logger
    if preset.startswith("octothinker"):
        from verl_ext.data import OCTOTHINKER_CHAT_TEMPLATE

        # one BOS, then the paper's plain-text prompt verbatim (see tests/data)
        assert cfg.actor_rollout_ref.model.custom_chat_template == OCTOTHINKER_CHAT_TEMPLATE
    else:
        assert cfg.data.apply_chat_template_kwargs.enable_thinking is False


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_passes_verls_own_validation(preset):
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    with initialize_config_dir(config_dir=str(RECIPE_CONFIG), version_base=None):
        cfg = compose("bupo_trainer", overrides=[f"preset={preset}"])
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


SCRIPTS = sorted(p.name for p in (REPO / "examples").glob("run_*.sh") if not p.name.startswith("run_tiny_"))
TINY_SCRIPTS = sorted(p.name for p in (REPO / "examples").glob("run_tiny_*_cpu.sh"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_prints_config(script, tmp_path):
    cfg = composed_config(
        script, "trainer.total_training_steps=7", DATA_DIR=str(tmp_path / "data"), N_GPUS="4"
    )
    assert cfg["trainer"]["total_training_steps"] == 7  # extra arguments reach Hydra
    assert cfg["trainer"]["n_gpus_per_node"] == 4
    assert cfg["data"]["train_files"] == str(tmp_path / "data" / "train.parquet")
    assert len(cfg["data"]["val_files"]) == 4
    assert not (tmp_path / "data").exists()  # --cfg job starts nothing, builds nothing
    grpo = "_grpo" in script
    assert cfg["bupo"]["enable"] is (not grpo)
    if "schedule" in script:
        assert cfg["bupo"]["schedule"] == [{"layer": 5, "steps": 20}, {"layer": 17, "steps": 10}]


@pytest.mark.parametrize("script", TINY_SCRIPTS)
def test_tiny_cpu_script_prints_config(script, tmp_path):
    """The tiny CPU scripts compose the tiny_cpu preset, take Hydra overrides, and with --cfg build nothing."""
    cfg = composed_config(
        script, "trainer.total_training_steps=5", OUT_DIR=str(tmp_path / "out"), TOY_DIR=str(tmp_path / "toy")
    )
    assert cfg["trainer"]["total_training_steps"] == 5
    assert cfg["actor_rollout_ref"]["model"]["path"] == str(tmp_path / "toy" / "model")
    assert cfg["trainer"]["default_local_dir"] == str(tmp_path / "out" / "ckpt")
    assert cfg["bupo"]["enable"] is ("grpo" not in script)
    assert (
        cfg["ray_kwargs"]["ray_init"]["num_gpus"] == 1
        and cfg["actor_rollout_ref"]["rollout"]["name"] == "vllm"
    )
    assert not (tmp_path / "toy").exists() and not (tmp_path / "out").exists()


def test_every_bupo_script_has_a_grpo_twin():
    bupo = {s.replace("_bupo", "") for s in SCRIPTS if s.endswith("_bupo.sh")}
    grpo = {s.replace("_grpo", "") for s in SCRIPTS if s.endswith("_grpo.sh")}
    assert bupo == grpo and len(bupo) == 4
    for name in bupo:
        a = (REPO / "examples" / name.replace(".sh", "_bupo.sh")).read_text().splitlines()
        b = (REPO / "examples" / name.replace(".sh", "_grpo.sh")).read_text().splitlines()
        assert a[-1].split()[:3] == b[-1].split()[:3]  # same preset and prompt style


def test_recipe_package_is_thin():
    files = [p for p in (REPO / "recipe").rglob("*.py")]
    assert sum(len(p.read_text().splitlines()) for p in files) < 80
    assert Path(REPO / "recipe/bupo/README.md").exists()
