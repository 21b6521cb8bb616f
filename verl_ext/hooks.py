"""Run a function when a module is imported (now, if it already is): a post-import hook via ``wrapt``."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import wrapt


def when_imported(module_name: str, fn: Callable[[ModuleType], None]) -> None:
    """Call ``fn(module)`` once ``module_name`` has finished importing (at once if it already has).

    Args:
        module_name: dotted module name, e.g. ``"verl.trainer.ppo.core_algos"``.
        fn: called with the imported module; its exceptions propagate to the importer.
    """
    wrapt.register_post_import_hook(fn, module_name)
