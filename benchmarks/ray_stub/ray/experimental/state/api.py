"""``ray.experimental.state.api`` of the GPU-check stub."""

from ray import _refuse

get_actor = _refuse("experimental.state.api.get_actor")
list_actors = _refuse("experimental.state.api.list_actors")
