"""verl on a CPU-only machine: a ``cpu`` platform and the work-arounds verl 0.9.1 / vLLM 0.24.0 need.

Active only when ``VERL_PLATFORM=cpu`` (:func:`is_selected`); the ``verl.plugins`` entry point
(:mod:`verl_ext.plugin`) calls :func:`activate`. Nothing in the core or in ``verl_ext.bupo``
imports this package, so it can be deleted once verl grows a CPU platform of its own.
"""

from __future__ import annotations

import os

PLATFORM_ENV = "VERL_PLATFORM"


def is_selected() -> bool:
    """True when this process runs verl on the CPU platform (``VERL_PLATFORM=cpu``)."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == "cpu"


def activate() -> bool:
    """Register the CPU platform and apply the work-arounds, if the CPU platform is selected.

    Returns:
        True when it was selected (and everything is applied), False otherwise (nothing done).
    """
    if not is_selected():
        return False
    from verl_ext.cpu.workarounds import apply_all

    apply_all()
    return True
