"""``bupo.internal_layer: auto``: the boundary layer of the model's own entropy profile, recorded once, reused on resume.

The ``bupo_sync`` trainer measures the per-layer entropy profile (layer, attention and FFN internal
policies, the ``bupo_layer_entropy`` worker RPC of :mod:`verl_ext.bupo.telemetry`) on a sub-sample of
the first batch's responses before the first update, and :func:`choose_layer` applies the analysis
CLI's boundary rule (:func:`verl_ext.analysis.boundary.find_boundary_layer` with the CLI's default
``eps``) to it: the layer phase 1 trains is exactly what ``python -m verl_ext.analysis`` prints for
the same model and responses (with ``--final-norm`` when ``bupo.final_norm`` is true). The choice is
written to ``<trainer.default_local_dir>/bupo_auto_layer.json`` (:func:`save_record`), and a resumed
run reads it back (:func:`load_record`) instead of measuring again.

No boundary (the FFN never explores) is an error that names the fix: there is no principled layer to
fall back on, and the run stops before its first update. A boundary at the last layer is accepted
with the rule's warning (phase 1 then trains the full depth without the final norm).

Layer numbers: ``layer_index`` is the 0-based decoder index k (``bupo.internal_layer``); the paper
layer is k + 1; profile metric names use paper layers (``bupo/delta_ffn/<k+1>``).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_ext.analysis.boundary import BoundaryResult, find_boundary_layer
from verl_ext.bupo.config import BuPOConfig, BuPOConfigError
from verl_ext.bupo.schedule import AUTO
from verl_ext.slicing import validate_layer

RECORD_NAME = "bupo_auto_layer.json"
METRIC = "bupo/auto_layer"
_BOUNDARY_FIELDS = (
    "label",
    "layer",
    "layer_index",
    "eps",
    "delta_ffn",
    "phases",
    "run",
    "explanation",
    "warning",
)


@dataclass(frozen=True)
class AutoLayerChoice:
    """The outcome of the boundary rule on a measured profile, and what it was measured on.

    Attributes:
        boundary: the rule's result; ``boundary.layer_index`` is the 0-based k (None: no boundary).
        profile: the flat profile metrics (``bupo/layer_entropy/<l>``, ``bupo/attn_entropy/<l>``,
            ``bupo/ffn_entropy/<l>``, ``bupo/delta_attn/<l>``, ``bupo/delta_ffn/<l>``; l = k + 1).
        step: the global step (1-based) before whose update the profile was measured.
        n_responses: responses in the sub-sample.
        final_norm: the profile's convention (True = logit lens, as ``bupo.final_norm``).
        model: ``actor_rollout_ref.model.path`` of the run, for the record's reader.
    """

    boundary: BoundaryResult
    profile: dict[str, float]
    step: int
    n_responses: int
    final_norm: bool = False
    model: str | None = None

    @property
    def layer_index(self) -> int | None:
        """The 0-based decoder index k phase 1 trains (paper layer k + 1), or None (no boundary)."""
        return self.boundary.layer_index

    @property
    def convention(self) -> str:
        """``raw`` (the paper's internal policy) or ``final_norm`` (logit lens)."""
        return "final_norm" if self.final_norm else "raw"

    def checked_layer(self, record: str | os.PathLike | None = None) -> int:
        """The layer to train, checked against the profile's depth.

        Args:
            record: where the record was written (named in the error message).

        Raises:
            BuPOConfigError: the rule found no boundary layer; the message gives the profile and the fix.
        """
        b = self.boundary
        if b.layer_index is None:
            d = ", ".join(f"{x:+.4f}" for x in b.delta_ffn)
            where = f"; profile in {record}" if record else ""
            raise BuPOConfigError(
                f"bupo.internal_layer={AUTO}: {b.explanation} (mean dH_FFN per paper layer 1..{len(b.delta_ffn)}: "
                f"{d}; {self.n_responses} responses, {self.convention} convention{where}). Fix: set "
                "bupo.internal_layer=<k> by hand (0-based decoder index; inspect the profile with "
                "`python -m verl_ext.analysis`), or train without phase 1 (bupo.internal_steps=0)"
            )
        return validate_layer(b.layer_index, len(b.delta_ffn), name=f"bupo.internal_layer={AUTO} -> layer")

    def explanation(self, record: str | os.PathLike | None = None) -> str:
        """One line for the console: which layer phase 1 trains, and why."""
        b = self.boundary
        if b.layer_index is None:
            return f"BuPO auto layer: no boundary layer: {b.explanation}"
        line = (
            f"BuPO auto layer: phase 1 trains layer {b.layer_index} (paper pi^{b.layer}), the boundary "
            f"layer of the entropy profile of {self.n_responses} responses measured before step {self.step} "
            f"({self.convention} convention): {b.explanation}"
        )
        if b.warning:
            line += f"; WARNING: {b.warning}"
        return line + (f"; record {record}" if record else "")

    def metrics(self) -> dict[str, float]:
        """``bupo/auto_layer`` (0-based k, NaN without a boundary) and the profile it came from."""
        k = self.layer_index
        return {METRIC: float("nan") if k is None else float(k), **self.profile}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (the record's content)."""
        b = self.boundary
        return dict(
            layer_index=b.layer_index,
            paper_layer=b.layer,
            config_line=b.config_line(),
            step=self.step,
            n_responses=self.n_responses,
            convention=self.convention,
            model=self.model,
            explanation=b.explanation,
            warning=b.warning,
            boundary={name: getattr(b, name) for name in _BOUNDARY_FIELDS},
            profile=self.profile,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AutoLayerChoice:
        """Rebuild from :meth:`to_dict`; the stored ``layer_index`` wins (the rule is not re-applied)."""
        fields = dict(data["boundary"])
        fields["run"] = tuple(fields["run"]) if fields.get("run") else None
        fields["layer_index"] = data["layer_index"]
        fields["layer"] = None if data["layer_index"] is None else int(data["layer_index"]) + 1
        return cls(
            boundary=BoundaryResult(**{k: fields.get(k) for k in _BOUNDARY_FIELDS}),
            profile={k: float(v) for k, v in data["profile"].items()},
            step=int(data["step"]),
            n_responses=int(data["n_responses"]),
            final_norm=data.get("convention") == "final_norm",
            model=data.get("model"),
        )


def choose_layer(
    profile: Mapping[str, float],
    *,
    step: int,
    n_responses: int,
    final_norm: bool = False,
    model: str | None = None,
) -> AutoLayerChoice:
    """Apply the analysis CLI's boundary rule (its default ``eps``) to a measured profile.

    Args:
        profile: flat metrics with ``<prefix>/delta_ffn/<l>`` for l = 1..L (1-based paper layers), as
            the ``bupo_layer_entropy`` RPC returns them; other entries are kept as evidence.
        step: global step (1-based) of the measurement.
        n_responses: responses the profile was measured on.
        final_norm: the profile's convention (``bupo.final_norm``).
        model: the model path, stored for the reader.

    Returns:
        The choice; its ``layer_index`` is None when the rule finds no boundary (see
        :meth:`AutoLayerChoice.checked_layer`).

    Raises:
        ValueError: the profile has no complete ``delta_ffn`` set, or NaN values.
    """
    return AutoLayerChoice(
        boundary=find_boundary_layer(profile),
        profile={k: float(v) for k, v in profile.items()},
        step=int(step),
        n_responses=int(n_responses),
        final_norm=bool(final_norm),
        model=model,
    )


def subsample_indices(tags: Sequence[Mapping | None], n: int, world_size: int) -> list[int]:
    """Indices of up to ``n`` real responses spread evenly over the batch, a multiple of ``world_size``.

    Padding samples (``tags[i]["is_padding"]``, verl's synthetic no-op rows) are skipped; ``n`` is
    rounded up to a multiple of ``world_size`` (every data-parallel rank gets the same count) and
    capped at the real responses, rounded down. Returns ``[]`` when fewer than ``world_size`` exist.
    """
    real = [i for i, tag in enumerate(tags) if not (tag or {}).get("is_padding", False)]
    want = min(len(real), max(world_size, math.ceil(n / world_size) * world_size))
    want -= want % world_size
    stride = len(real) / want if want else 0
    return [real[int(j * stride)] for j in range(want)]


def record_path(directory: str | os.PathLike) -> Path:
    """``<directory>/bupo_auto_layer.json`` (``directory`` = ``trainer.default_local_dir``)."""
    return Path(directory) / RECORD_NAME


def save_record(choice: AutoLayerChoice, directory: str | os.PathLike) -> Path:
    """Write the choice next to the checkpoints (atomically: a temporary file, then a rename)."""
    path = record_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(choice.to_dict(), indent=1, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def record_dirs(trainer_config: Any) -> list[str]:
    """Where a resumed run looks for the record: ``default_local_dir``, then the parent of
    ``resume_from_path`` (``resume_mode=resume_path``: the checkpoint may have moved)."""
    dirs = [str(trainer_config.get("default_local_dir"))]
    resume = trainer_config.get("resume_from_path")
    if trainer_config.get("resume_mode") == "resume_path" and resume:
        dirs.append(str(Path(str(resume)).parent))
    return list(dict.fromkeys(dirs))


def load_record(directories: Iterable[str | os.PathLike]) -> tuple[AutoLayerChoice, Path] | None:
    """The first record found in ``directories`` and its path, or None."""
    for directory in directories:
        path = record_path(directory)
        if path.is_file():
            return AutoLayerChoice.from_dict(json.loads(path.read_text())), path
    return None


def resolve_config(bupo: BuPOConfig, layer: int) -> BuPOConfig:
    """A copy of ``bupo`` whose schedule trains ``layer`` (0-based) in the ``auto`` stage."""
    resolved = copy.copy(bupo)
    object.__setattr__(resolved, "_schedule", bupo.schedule_obj.resolve(layer))
    return resolved
