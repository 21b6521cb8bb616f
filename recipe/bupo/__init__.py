"""BuPO recipe: Hydra entry point and YAML configs; all logic lives in verl_ext."""
