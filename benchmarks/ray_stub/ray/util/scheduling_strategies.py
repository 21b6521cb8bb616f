"""``ray.util.scheduling_strategies`` of the GPU-check stub."""

from ray import _refuse


class NodeAffinitySchedulingStrategy:
    """Never constructed under the stub."""

    def __init__(self, *args, **kwargs) -> None:
        _refuse("util.scheduling_strategies.NodeAffinitySchedulingStrategy")()


class PlacementGroupSchedulingStrategy:
    """Never constructed under the stub."""

    def __init__(self, *args, **kwargs) -> None:
        _refuse("util.scheduling_strategies.PlacementGroupSchedulingStrategy")()
