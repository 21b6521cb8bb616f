"""Which internal layer trains at which global step: the paper's one stage, or a bottom-up schedule.

Steps are counted from 1 (verl's ``global_steps``). A schedule is a list of stages
``(layer, steps)``: stage 1 covers steps ``1..steps_1``, stage 2 the next ``steps_2`` steps, and so
on; after the last stage the full policy trains (ordinary GRPO). ``layer`` is the 0-based decoder
index k (paper layer k+1). The paper's BuPO is the one-stage schedule ``[(k, s_inter)]``.

One stage may have ``layer = AUTO`` (``"auto"``): the trainer picks that layer from the model's own
entropy profile before the first update (:mod:`verl_ext.bupo.auto_layer`) and :meth:`Schedule.resolve`
replaces it; until then :meth:`Schedule.layer_at` refuses to answer for that stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

FULL_POLICY = -1
"""Value of the per-batch exit-layer flag meaning "full policy" (no slicing)."""

AUTO = "auto"
"""``layer`` of the stage whose layer is chosen from the entropy profile at start (``bupo.internal_layer: auto``)."""


@dataclass(frozen=True)
class Stage:
    """One stage of internal-policy training: ``layer`` (0-based, or :data:`AUTO`) for ``steps`` global steps."""

    layer: int | str
    steps: int


class Schedule:
    """An ordered list of :class:`Stage`; maps a global step (1-based) to the exit layer or the full policy."""

    def __init__(self, stages: Iterable[Stage]):
        self.stages: tuple[Stage, ...] = tuple(stages)
        for i, st in enumerate(self.stages):
            if st.layer == AUTO:
                if st.steps == 0:
                    raise ValueError(
                        f"stage {i}: layer {AUTO} needs steps > 0 (it picks the layer phase 1 trains)"
                    )
            elif isinstance(st.layer, bool) or not isinstance(st.layer, int) or st.layer < 0:
                raise ValueError(
                    f"stage {i}: layer must be a 0-based decoder index >= 0 or {AUTO!r}, got {st.layer!r}"
                )
            if isinstance(st.steps, bool) or not isinstance(st.steps, int) or st.steps < 0:
                raise ValueError(f"stage {i}: steps must be an int >= 0, got {st.steps!r}")
        if sum(st.layer == AUTO for st in self.stages) > 1:
            raise ValueError(f"at most one stage may have layer {AUTO}: the boundary rule gives one layer")

    @classmethod
    def from_config(
        cls, internal_layer: int | None, internal_steps: int | None, stages: Sequence | None = None
    ) -> Schedule:
        """Build from the ``bupo`` config: an explicit ``schedule`` list wins over layer/steps.

        Args:
            internal_layer: 0-based decoder index k of the one-stage schedule, or :data:`AUTO`.
            internal_steps: s_inter, the number of phase-1 steps.
            stages: optional list of ``{layer, steps}`` mappings or ``[layer, steps]`` pairs (one
                ``layer`` may be :data:`AUTO`).
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
        if internal_layer == AUTO and not internal_steps:
            raise ValueError(
                f"internal_layer={AUTO} needs phase 1 (it picks the layer phase 1 trains): set internal_steps > 0"
            )
        if internal_steps is None or internal_steps == 0:
            return cls([])
        if internal_layer is None:
            raise ValueError("internal_steps > 0 needs internal_layer (a 0-based decoder index)")
        return cls([Stage(internal_layer, internal_steps)])

    @property
    def has_auto(self) -> bool:
        """True while a stage's layer is :data:`AUTO` (not yet chosen)."""
        return any(st.layer == AUTO for st in self.stages)

    @property
    def fixed_layers(self) -> tuple[int, ...]:
        """The distinct 0-based layers known from the config (an :data:`AUTO` stage excluded), sorted."""
        return tuple(sorted({st.layer for st in self.stages if st.layer != AUTO}))

    def resolve(self, layer: int) -> Schedule:
        """A copy with the :data:`AUTO` stage's layer set to ``layer`` (0-based); same steps."""
        return Schedule(Stage(layer, st.steps) if st.layer == AUTO else st for st in self.stages)

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
        """The 0-based exit layer at 1-based ``step``, or :data:`FULL_POLICY` (-1).

        Raises:
            RuntimeError: the step falls in the :data:`AUTO` stage and :meth:`resolve` was not called.
        """
        st = self.stage_at(step)
        if st is not None and st.layer == AUTO:
            raise RuntimeError(
                f"step {step} trains the {AUTO} layer, which is not chosen yet (Schedule.resolve)"
            )
        return FULL_POLICY if st is None else st.layer

    def describe(self) -> str:
        """A one-line human description, paper layer numbers included."""
        if not self.stages:
            return "full policy at every step (plain GRPO)"
        parts, start = [], 1
        for st in self.stages:
            if st.steps and st.layer == AUTO:
                parts.append(
                    f"steps {start}-{start + st.steps - 1}: layer {AUTO} (the boundary layer of the entropy "
                    "profile, measured before step 1)"
                )
            elif st.steps:
                parts.append(
                    f"steps {start}-{start + st.steps - 1}: layer {st.layer} (paper pi^{st.layer + 1})"
                )
            start += st.steps
        parts.append(f"steps {start}+: full policy")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Schedule({list(self.stages)})"
