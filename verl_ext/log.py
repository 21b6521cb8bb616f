"""The ``verl_ext`` logger: BuPO's messages reach the console in every process, Ray workers included.

verl configures its own ``verl`` logger only, and Ray's worker processes start without a root
handler, so a plain ``logging.getLogger(__name__).info(...)`` from our modules reached nothing in a
default run (issue: "BuPO: slicing self-test passed" never showed). :func:`get_logger` gives the
``verl_ext`` hierarchy one stderr handler of its own (Ray forwards actors' stderr to the driver's
console), at level ``BUPO_LOG_LEVEL`` (default INFO), and does not propagate to the root logger, so
nothing prints twice where a root handler exists.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "verl_ext"
LEVEL_ENV = "BUPO_LOG_LEVEL"
_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A logger under ``verl_ext`` whose records reach stderr (see module docstring).

    Args:
        name: the module's ``__name__`` (anything outside ``verl_ext`` is put under it).
    """
    root = logging.getLogger(ROOT)
    if not any(getattr(h, "_bupo", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._bupo = True
        root.addHandler(handler)
        root.setLevel(os.environ.get(LEVEL_ENV, "INFO").upper())
        root.propagate = False
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")
