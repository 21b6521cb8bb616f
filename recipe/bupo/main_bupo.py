"""Hydra entry point of the BuPO recipe: verl's ``run_ppo`` with the ``bupo_sync`` trainer.

Run ``python -m recipe.bupo.main_bupo preset=qwen3_4b [overrides]`` (the scripts in ``examples/`` do
this), or ``... --cfg job`` to print the composed config without starting anything.
"""

from __future__ import annotations

import hydra


@hydra.main(config_path="config", config_name="bupo_trainer", version_base=None)
def main(config) -> None:
    """Validate the BuPO block and verl's config at start-up, then run verl's PPO loop."""
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config as verl_validate_config
    from verl.utils.device import auto_set_device

    from verl_ext.bupo.config import validate_config
    from verl_ext.bupo.runner import BuPOTaskRunner, keep_resumed_file_logs

    bupo = validate_config(config)  # fails here, before Ray starts, with the key and the fix
    print(f"BuPO schedule: {bupo.schedule_obj.describe()}")
    auto_set_device(config)
    keep_resumed_file_logs(config)
    verl_validate_config(
        config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    run_ppo(config, task_runner_class=BuPOTaskRunner)


if __name__ == "__main__":
    main()
