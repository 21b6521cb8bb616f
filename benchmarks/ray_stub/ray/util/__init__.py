"""``ray.util`` of the GPU-check stub: every function raises :class:`ray.RayStubError`."""

from ray import _refuse
from ray.util import scheduling_strategies  # noqa: F401
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table

get_node_ip_address = _refuse("util.get_node_ip_address")
list_named_actors = _refuse("util.list_named_actors")
get_current_placement_group = _refuse("util.get_current_placement_group")
remove_placement_group = _refuse("util.remove_placement_group")

__all__ = [
    "PlacementGroup",
    "get_current_placement_group",
    "get_node_ip_address",
    "list_named_actors",
    "placement_group",
    "placement_group_table",
    "remove_placement_group",
    "scheduling_strategies",
]
