"""The boundary layer (the layer BuPO trains) from the FFN entropy-change profile, with its evidence.

Rule (spec section 2, made precise). Let d_l be the token-mean dH_FFN^l of paper layer l = 1..L and
``eps >= 0`` a tolerance for "~0". Each layer is classified as

* exploration  if d_l >  eps,
* integration  if |d_l| <= eps,
* convergence  if d_l < -eps.

Scanning from layer 1 upwards, the boundary layer is the **last layer of the first contiguous run of
exploration layers** (the run may start after some non-exploring early layers); the run ends at the
first layer that integrates or converges. With ``eps = 0`` (default) this is literally "the last
layer whose mean dH_FFN > 0 before the FFN turns to integration/convergence". Edge cases:

* no layer explores: no boundary (``layer=None``), with the explanation;
* the run reaches layer L: the boundary is L, with a warning (the FFN never integrates/converges, so
  the "internal" policy is the whole network without the final norm; check the profile/convention).

The recipe's key ``bupo.internal_layer`` is the **0-based** decoder index k = l - 1. This is the one
implementation of the rule: the analysis CLI prints its suggestion and ``bupo.internal_layer: auto``
(:mod:`verl_ext.bupo.auto_layer`) trains it, both with ``eps =`` :data:`DEFAULT_EPS` unless told.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pandas as pd

CONFIG_KEY = "bupo.internal_layer"
DEFAULT_EPS = 0.0
"""The tolerance of the analysis CLI (``--eps``) and of ``bupo.internal_layer: auto``."""


@dataclass
class BoundaryResult:
    """The boundary layer and the evidence behind it.

    Attributes:
        layer: paper layer l (1-based), or None when no layer explores.
        layer_index: 0-based decoder index k = l - 1 (the recipe's ``bupo.internal_layer``), or None.
        eps: the tolerance used.
        delta_ffn: d_1..d_L, the mean dH_FFN per paper layer.
        phases: ``exploration`` / ``integration`` / ``convergence`` per paper layer.
        run: (first, last) paper layers of the exploration run, or None.
        explanation: a sentence stating how the layer was chosen.
        warning: set for the edge cases (run to the last layer, no exploration), else None.
    """

    layer: int | None
    layer_index: int | None
    eps: float
    delta_ffn: list[float]
    phases: list[str]
    run: tuple[int, int] | None
    explanation: str
    warning: str | None = None
    label: str | None = field(default=None)

    def config_line(self) -> str:
        """The recipe override, e.g. ``bupo.internal_layer=5  # 0-based decoder index (paper layer 6)``."""
        if self.layer_index is None:
            return f"# no boundary layer: {self.explanation}"
        return f"{CONFIG_KEY}={self.layer_index}  # 0-based decoder index (paper layer {self.layer})"

    def evidence(self) -> str:
        """Multi-line human-readable evidence: the rule's outcome and the per-layer dH_FFN and phase."""
        head = f"[{self.label}] " if self.label else ""
        lines = [f"{head}{self.explanation}"]
        if self.warning:
            lines.append(f"WARNING: {self.warning}")
        lines.append(f"eps = {self.eps:g} nats; per paper layer l (0-based k = l-1): mean dH_FFN, phase")
        for l, (d, ph) in enumerate(zip(self.delta_ffn, self.phases), start=1):  # noqa: E741
            mark = "  <- boundary" if l == self.layer else ""
            lines.append(f"  l={l:3d} (k={l - 1:3d})  dH_FFN={d:+.4f}  {ph}{mark}")
        lines.append(self.config_line())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return dict(
            label=self.label,
            layer=self.layer,
            layer_index=self.layer_index,
            config_line=self.config_line(),
            eps=self.eps,
            run=list(self.run) if self.run else None,
            explanation=self.explanation,
            warning=self.warning,
            delta_ffn=self.delta_ffn,
            phases=self.phases,
        )

    def __str__(self) -> str:
        return self.evidence()


def _delta_ffn_from_metrics(metrics: Mapping[str, float]) -> list[float]:
    """d_1..d_L from flat metrics ``<prefix>/delta_ffn/<l>`` (one prefix; l = 1..L once each)."""
    by_layer: dict[int, float] = {}
    prefixes = set()
    for key, val in metrics.items():
        parts = str(key).rsplit("/", 2)
        if len(parts) == 3 and parts[1] == "delta_ffn" and parts[2].isdigit():
            prefixes.add(parts[0])
            by_layer[int(parts[2])] = float(val)
    if len(prefixes) > 1:
        raise ValueError(f"the metrics hold several prefixes {sorted(prefixes)}; pass one")
    if not by_layer:
        raise ValueError("the metrics hold no '<prefix>/delta_ffn/<l>' entries (were any tokens selected?)")
    layers = sorted(by_layer)
    if layers != list(range(1, len(layers) + 1)):
        raise ValueError(f"the delta_ffn metrics must cover paper layers 1..L once each, got {layers}")
    return [by_layer[l] for l in layers]  # noqa: E741


def _delta_ffn_from(profile: pd.DataFrame | Mapping[str, float] | Sequence[float]) -> list[float]:
    if isinstance(profile, Mapping):
        return _delta_ffn_from_metrics(profile)
    if isinstance(profile, pd.DataFrame):
        df = profile[profile["module"] == "ffn"]
        for col in ("label", "convention"):
            if col in df.columns and df[col].nunique() > 1:
                raise ValueError(f"the profile holds several {col}s {sorted(df[col].unique())}; pass one")
        if df.empty:
            raise ValueError("the profile has no 'ffn' rows")
        df = df.sort_values("layer")
        layers = df["layer"].tolist()
        if layers != list(range(1, len(layers) + 1)):
            raise ValueError(f"the ffn rows must cover paper layers 1..L once each, got {layers}")
        return [float(x) for x in df["delta"]]
    return [float(x) for x in profile]


def find_boundary_layer(
    profile: pd.DataFrame | Mapping[str, float] | Sequence[float],
    eps: float = DEFAULT_EPS,
    label: str | None = None,
) -> BoundaryResult:
    """Apply the boundary-layer rule (see the module docstring) to a dH_FFN profile.

    Args:
        profile: the tidy table of :mod:`.decompose` (its ``ffn`` rows' ``delta`` are used; one label
            and convention only), the flat metrics of :meth:`.decompose.ProfileAccumulator.metrics`
            (``<prefix>/delta_ffn/<l>``, as the training telemetry returns them), or the sequence
            d_1..d_L of mean dH_FFN per **1-based** paper layer.
        eps: tolerance in nats: |d| <= eps counts as integration (~0), not exploration.
        label: optional name carried into the evidence.

    Returns:
        A :class:`BoundaryResult`; ``layer`` is the 1-based paper layer, ``layer_index`` the 0-based k
        for ``bupo.internal_layer``.

    Raises:
        ValueError: empty profile, NaN values, negative eps, metrics without a complete
            ``delta_ffn`` set.
    """
    if eps < 0 or math.isnan(eps):
        raise ValueError(f"eps must be >= 0, got {eps}")
    d = _delta_ffn_from(profile)
    if not d:
        raise ValueError("empty dH_FFN profile")
    if any(math.isnan(x) for x in d):
        raise ValueError("the dH_FFN profile contains NaN (were any tokens selected?)")
    n = len(d)
    phases = ["exploration" if x > eps else "convergence" if x < -eps else "integration" for x in d]
    start = next((i for i, ph in enumerate(phases) if ph == "exploration"), None)
    if start is None:
        return BoundaryResult(
            None,
            None,
            eps,
            d,
            phases,
            None,
            f"no layer has mean dH_FFN > {eps:g}: the FFN never explores, so the rule gives no boundary layer",
            warning="no exploration phase; choose the layer by hand or check the data/convention",
            label=label,
        )
    end = start
    while end + 1 < n and phases[end + 1] == "exploration":
        end += 1
    l_first, l_last = start + 1, end + 1
    warning = None
    if l_last == n:
        warning = (
            f"dH_FFN stays > {eps:g} up to the last layer L={n}: the FFN never turns to integration or "
            "convergence, so the boundary is the last layer (BuPO would train the full depth without the "
            "final norm)"
        )
        explanation = f"FFN explores from layer {l_first} to the last layer {n}; boundary layer l={n}"
    else:
        nxt = phases[end + 1]
        explanation = (
            f"FFN explores (mean dH_FFN > {eps:g}) in layers {l_first}..{l_last}; layer {l_last + 1} turns to "
            f"{nxt} (dH_FFN={d[end + 1]:+.4f}); boundary layer l={l_last}"
        )
    return BoundaryResult(l_last, l_last - 1, eps, d, phases, (l_first, l_last), explanation, warning, label)
