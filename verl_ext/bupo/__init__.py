"""BuPO inside verl 0.9.1: config validation, phase schedule, policy loss, actor engine, worker, trainer.

This sub-package is the only part of ``verl_ext`` that knows verl's internals. Importing it is
cheap; the verl-heavy modules (``engine``, ``worker``, ``trainer``, ``runner``) are imported
explicitly where needed (inside Ray workers, so that their registrations happen in that process).
"""
