"""The ``verl.plugins`` entry point: ``import verl`` registers BuPO's names in every process.

verl 0.9.1 loads each entry point of the group ``verl.plugins`` at the end of ``import verl`` (Ray
and vLLM worker processes included) and swallows their import errors at DEBUG level. This module
only registers names, through post-import hooks so that ``import verl`` stays cheap:

- the ``bupo`` policy loss, when ``verl.trainer.ppo.core_algos`` is imported;
- the ``bupo_sync`` trainer, when ``verl.trainer.ppo.v1`` is imported;
- with ``VERL_PLATFORM=cpu`` only, the CPU platform and its work-arounds (:mod:`verl_ext.cpu`).

It changes no existing verl behaviour, and logs its own failure loudly (ERROR, with the
traceback) instead of letting verl hide it.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from verl_ext.log import get_logger

logger = get_logger(__name__)

ENTRY_POINT = "bupo"
LOSS_MODULE = "verl_ext.bupo.loss"
TRAINER_MODULE = "verl_ext.bupo.trainer"
_registered = False


def _import_loss(_: ModuleType) -> None:
    importlib.import_module(LOSS_MODULE)


def _import_trainer(_: ModuleType) -> None:
    importlib.import_module(TRAINER_MODULE)


def register() -> bool:
    """Install the registrations (idempotent). Returns False, after logging why, if it failed."""
    global _registered
    if _registered:
        return True
    try:
        from verl_ext.cpu import activate
        from verl_ext.hooks import when_imported

        activate()  # the CPU platform, only with VERL_PLATFORM=cpu (delete verl_ext/cpu/ and this line once verl has one)
        when_imported("verl.trainer.ppo.core_algos", _import_loss)
        when_imported("verl.trainer.ppo.v1", _import_trainer)
    except Exception:
        logger.exception(
            "verl-bupo: the verl plugin failed to load; the 'bupo' loss and the 'bupo_sync' trainer are NOT "
            "registered in this process (python %s). Reinstall verl-bupo next to verl 0.9.1.",
            sys.executable,
        )
        return False
    _registered = True
    return True


register()
