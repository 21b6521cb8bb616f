"""Which internal layer trains at which global step: the paper's one stage, or a bottom-up schedule.

Steps are counted from 1 (verl's ``global_steps``). A schedule is a list of stages
``(layer, steps)``: stage 1 covers steps ``1..steps_1``, stage 2 the next ``steps_2`` steps, and so
on; after the last stage the full policy trains (ordinary GRPO). ``layer`` is the 0-based decoder
index k (paper layer k+1). The paper's BuPO is the one-stage schedule ``[(k, s_inter)]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FULL_POLICY = -1
"""Value of the per-batch exit-layer flag meaning "full policy" (no slicing)."""


@dataclass(frozen=True)
class Stage:
    """One stage of internal-policy training: ``layer`` (0-based) for ``steps`` global steps."""

    layer: int
    steps: int


class Schedule:
    """An ordered list of :class:`Stage`; maps a global step (1-based) to the exit layer or the full policy."""

    def __init__(self, stages: Iterable[Stage]):
        self.stages: tuple[Stage, ...] = tuple(stages)
        for i, st in enumerate(self.stages):
            if isinstance(st.layer, bool) or not isinstance(st.layer, int) or st.layer < 0:
                raise ValueError(f"stage {i}: layer must be a 0-based decoder index >= 0, got {st.layer!r}")
            if isinstance(st.steps, bool) or not isinstance(st.steps, int) or st.steps < 0:
                raise ValueError(f"stage {i}: steps must be an int >= 0, got {st.steps!r}")

    @classmethod
    def from_config(
        cls, internal_layer: int | None, internal_steps: int | None, stages: Sequence | None = None
    ) -> Schedule:
        """Build from the ``bupo`` config: an explicit ``schedule`` list wins over layer/steps.

        Args:
            internal_layer: 0-based decoder index k of the one-stage schedule.
            internal_steps: s_inter, the number of phase-1 steps.
            stages: optional list of ``{layer, steps}`` mappings or ``[layer, steps]`` pairs.
        """
        if stages:
            parsed = []
            for i, st in enumerate(stages):
                if isinstance(st, Stage):
                    parsed.append(st)
                elif hasattr(st, "get") and hasattr(st, "keys"):
                    unknown = set(st.keys()) - {"layer", "steps"}
                    if unknown or "layer" not in st or "steps" not in st:
                        raise ValueError(
                            f"schedule[{i}] must have exactly the keys layer and steps, got {dict(st)}"
                        )
                    parsed.append(Stage(st["layer"], st["steps"]))
                elif isinstance(st, (list, tuple)) or hasattr(st, "__len__"):
                    st = list(st)
                    if len(st) != 2:
                        raise ValueError(f"schedule[{i}] must be [layer, steps], got {st}")
                    parsed.append(Stage(st[0], st[1]))
                else:
                    raise ValueError(f"schedule[{i}] must be {{layer, steps}} or [layer, steps], got {st!r}")
            return cls(parsed)
        if internal_steps is None or internal_steps == 0:
            return cls([])
        if internal_layer is None:
            raise ValueError("internal_steps > 0 needs internal_layer (a 0-based decoder index)")
        return cls([Stage(internal_layer, internal_steps)])

    @property
    def total_steps(self) -> int:
        """Number of internal-policy steps (the last step of phase 1)."""
        return sum(st.steps for st in self.stages)

    def stage_at(self, step: int) -> Stage | None:
        """The stage active at 1-based global ``step``, or None when the full policy trains."""
        if step < 1:
            raise ValueError(f"global steps count from 1, got {step}")
        end = 0
        for st in self.stages:
            end += st.steps
            if step <= end:
                return st
        return None

    def layer_at(self, step: int) -> int:
        """The 0-based exit layer at 1-based ``step``, or :data:`FULL_POLICY` (-1)."""
        st = self.stage_at(step)
        return FULL_POLICY if st is None else st.layer

    def describe(self) -> str:
        """A one-line human description, paper layer numbers included."""
        if not self.stages:
            return "full policy at every step (plain GRPO)"
        parts, start = [], 1
        for st in self.stages:
            if st.steps:
                parts.append(
                    f"steps {start}-{start + st.steps - 1}: layer {st.layer} (paper pi^{st.layer + 1})"
                )
            start += st.steps
        parts.append(f"steps {start}+: full policy")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Schedule({list(self.stages)})"
