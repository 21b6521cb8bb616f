"""``ray.util.placement_group`` of the GPU-check stub."""

from ray import _refuse


class PlacementGroup:
    """Never constructed under the stub."""

    def __init__(self, *args, **kwargs) -> None:
        _refuse("util.placement_group.PlacementGroup")()


placement_group = _refuse("util.placement_group.placement_group")
placement_group_table = _refuse("util.placement_group.placement_group_table")
get_current_placement_group = _refuse("util.placement_group.get_current_placement_group")
remove_placement_group = _refuse("util.placement_group.remove_placement_group")
