"""The Ray task runner of the BuPO recipe: verl's V1 runner with the BuPO modules imported in its process."""

from __future__ import annotations

import os

import ray
from verl.trainer.main_ppo import TaskRunnerV1

from verl_ext.plot_run import resume_safe_log_path


def keep_resumed_file_logs(config) -> None:
    """Point verl's file logger at a fresh ``<experiment>[.N].jsonl`` (it truncates its file on open).

    Sets ``VERL_FILE_LOGGER_PATH`` in this (driver) process before Ray starts, so the task runner
    inherits it; a path the user already set wins. ``python -m verl_ext.plot_run`` merges the segments.
    """
    if "VERL_FILE_LOGGER_PATH" in os.environ:
        return
    root = os.getenv("VERL_FILE_LOGGER_ROOT", ".")
    path = resume_safe_log_path(root, config.trainer.project_name, config.trainer.experiment_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.environ["VERL_FILE_LOGGER_PATH"] = str(path)


@ray.remote(num_cpus=1)
class BuPOTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """Imports :mod:`verl_ext.bupo.trainer` (registering ``bupo_sync``) before verl's own ``run``."""

    def run(self, config):
        import verl_ext.bupo.trainer  # noqa: F401  (registers the trainer in this process)

        return super().run(config)
