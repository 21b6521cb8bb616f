"""A stand-in ``ray`` package for the GPU check: importable, and every call into it raises.

The GPU machine has no Ray and the Ray 2.60 wheel (79 MB) is over what one device call can carry
(64 MiB). verl 0.9.1 imports Ray at module level on the engine path (``verl.protocol``,
``verl.single_controller``, ``verl.utils.distributed``, ``verl.workers.rollout``,
``verl.checkpoint_engine``) to define Ray actors and type annotations, but the engine itself
(``TrainingWorker`` -> ``FSDPEngineWithLMHead``, built in-process without a Ray cluster) never calls
Ray at run time. This package provides the names those imports need (plus a few common calls, all
refusing):

* ``ray.remote(...)`` (bare or with options) returns a :class:`_RemoteStub`; using it
  (``.remote()``, ``.options()``, calling it) raises :class:`RayStubError`.
* ``ray.init``, ``ray.get``, ``ray.put``, ``ray.wait``, ``ray.kill``, ``ray.nodes``, ``ray.get_actor``,
  ``ray.get_runtime_context``, ... raise :class:`RayStubError`.
* ``ray.is_initialized()`` returns False, the true answer in a process that never started Ray (verl
  asks it to decide whether to read the local rank from Ray or from ``LOCAL_RANK``).
* ``ray.ObjectRef`` and ``ray.actor.ActorHandle`` are classes nothing is an instance of.

So a check that completes under this stub ran without Ray; a code path that needs Ray fails loudly
with a message naming the call. Put the folder *containing* this package first on ``PYTHONPATH``
(``benchmarks/ray_stub``): it then shadows any installed Ray in that process. Never install it into
site-packages.
"""

from __future__ import annotations

__version__ = "0.0.0+bupo.stub"
IS_BUPO_RAY_STUB = True


class RayStubError(RuntimeError):
    """A Ray API was used under the GPU-check stub: the code path is not Ray-free."""


def _refuse(name: str):
    def call(*args, **kwargs):
        raise RayStubError(
            f"ray.{name}() was called, but `ray` is the BuPO GPU-check stub ({__file__}): "
            "this code path needs a real Ray, which the GPU check does not carry"
        )

    call.__name__ = call.__qualname__ = name.rsplit(".", 1)[-1]
    return call


class _RemoteStub:
    """What ``ray.remote`` returns: keeps the wrapped class/function, refuses to run it remotely."""

    def __init__(self, target, options: dict | None = None) -> None:
        self._target = target
        self._options = dict(options or {})
        self.__name__ = getattr(target, "__name__", "remote")
        self.__qualname__ = getattr(target, "__qualname__", self.__name__)
        self.__doc__ = getattr(target, "__doc__", None)
        self.__wrapped__ = target
        # verl subclasses Ray actor classes via ``__ray_actor_class__``.
        self.__ray_actor_class__ = target

    def remote(self, *args, **kwargs):
        _refuse(f"remote({self.__name__}).remote")()

    def options(self, *args, **kwargs):
        _refuse(f"remote({self.__name__}).options")()

    def bind(self, *args, **kwargs):
        _refuse(f"remote({self.__name__}).bind")()

    def __call__(self, *args, **kwargs):
        _refuse(f"remote({self.__name__})")()

    def __repr__(self) -> str:
        return f"<ray stub remote {self.__qualname__}>"


def remote(*args, **kwargs):
    """``@ray.remote`` / ``@ray.remote(num_cpus=...)`` / ``ray.remote(cls)``: a :class:`_RemoteStub`."""
    if len(args) == 1 and not kwargs and callable(args[0]):
        return _RemoteStub(args[0])
    return lambda target: _RemoteStub(target, kwargs)


def is_initialized() -> bool:
    """Ray is never initialised in a process that uses the stub."""
    return False


class ObjectRef:
    """Nothing is a Ray object reference here (``isinstance`` checks are False)."""

    def __init__(self, *args, **kwargs) -> None:
        _refuse("ObjectRef")()


class ObjectRefGenerator(ObjectRef):
    """As :class:`ObjectRef`."""


init = _refuse("init")
shutdown = _refuse("shutdown")
get = _refuse("get")
put = _refuse("put")
wait = _refuse("wait")
kill = _refuse("kill")
cancel = _refuse("cancel")
nodes = _refuse("nodes")
get_actor = _refuse("get_actor")
get_runtime_context = _refuse("get_runtime_context")
get_gpu_ids = _refuse("get_gpu_ids")
cluster_resources = _refuse("cluster_resources")
available_resources = _refuse("available_resources")
method = _refuse("method")

from ray import actor, util  # noqa: E402  (submodules verl reaches as attributes)

__all__ = [
    "IS_BUPO_RAY_STUB",
    "ObjectRef",
    "ObjectRefGenerator",
    "RayStubError",
    "actor",
    "available_resources",
    "cancel",
    "cluster_resources",
    "get",
    "get_actor",
    "get_gpu_ids",
    "get_runtime_context",
    "init",
    "is_initialized",
    "kill",
    "method",
    "nodes",
    "put",
    "remote",
    "shutdown",
    "util",
    "wait",
]
