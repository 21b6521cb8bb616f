"""``ray.actor`` of the GPU-check stub: type names only (nothing is an actor here)."""

from ray import _RemoteStub


class ActorHandle:
    """Nothing is a Ray actor handle under the stub."""


ActorClass = _RemoteStub
