"""The Ray task runner of the BuPO recipe: verl's V1 runner with the BuPO modules imported in its process."""

from __future__ import annotations

import ray
from verl.trainer.main_ppo import TaskRunnerV1


@ray.remote(num_cpus=1)
class BuPOTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """Imports :mod:`verl_ext.bupo.trainer` (registering ``bupo_sync``) before verl's own ``run``."""

    def run(self, config):
        import verl_ext.bupo.trainer  # noqa: F401  (registers the trainer in this process)

        return super().run(config)
