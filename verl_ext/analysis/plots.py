"""Paper-style PNG plots of entropy profiles (matplotlib Agg), several models or checkpoints overlaid.

X axes use the 1-based paper layer l (0 = the embedding H^0 on the layer-entropy plot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from verl_ext.analysis.boundary import BoundaryResult  # noqa: E402

Profiles = Mapping[str, pd.DataFrame] | pd.DataFrame
Boundaries = Mapping[str, BoundaryResult | int | None] | None


def _split(profiles: Profiles) -> dict[str, pd.DataFrame]:
    if isinstance(profiles, pd.DataFrame):
        if "label" in profiles.columns:
            return {str(k): g for k, g in profiles.groupby("label", sort=False)}
        return {"model": profiles}
    if not profiles:
        raise ValueError("no profile to plot")
    return dict(profiles)


def _boundary_layer(boundaries: Boundaries, label: str) -> int | None:
    if not boundaries:
        return None
    b = boundaries.get(label)
    return b.layer if isinstance(b, BoundaryResult) else b


def _module(df: pd.DataFrame, module: str) -> pd.DataFrame:
    return df[df["module"] == module].sort_values("layer")


def _convention(profiles: dict[str, pd.DataFrame]) -> str:
    conv = sorted({c for df in profiles.values() for c in df.get("convention", pd.Series(["raw"])).unique()})
    return "/".join(conv)


def _finish(fig, axes, path: str | os.PathLike) -> str:
    """Integer layer ticks, grid and legend on every panel; write the PNG and close the figure."""
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return os.fspath(path)


def plot_layer_entropy(profiles: Profiles, path: str | os.PathLike, boundaries: Boundaries = None) -> str:
    """Internal layer policy entropy H_Layer^l across depth, one line per label (l = 0 is H^0).

    Args:
        profiles: ``{label: table}`` or one table (with an optional ``label`` column).
        path: PNG file to write.
        boundaries: ``{label: BoundaryResult | paper layer | None}``; marked with a dashed line.

    Returns:
        The path written.
    """
    profiles = _split(profiles)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, df) in enumerate(profiles.items()):
        c = colors[i % len(colors)]
        lay = _module(df, "layer")
        xs = [0, *lay["layer"].tolist()]
        ys = [float(lay["baseline_entropy"].iloc[0]), *lay["entropy"].tolist()]
        axes[0].plot(xs, ys, marker="o", ms=3, color=c, label=label)
        for mod, style in (("attn", "-"), ("ffn", "--")):
            m = _module(df, mod)
            axes[1].plot(
                m["layer"], m["entropy"], style, marker=".", ms=3, color=c, label=f"{label} {mod.upper()}"
            )
        bl = _boundary_layer(boundaries, label)
        if bl is not None:
            for ax in axes:
                ax.axvline(bl, color=c, ls=":", lw=1.2)
    conv = _convention(profiles)
    axes[0].set_title(f"Internal layer policy entropy ({conv})")
    axes[0].set_xlabel("layer l (0 = embedding)")
    axes[0].set_ylabel("entropy (nats)")
    axes[1].set_title(f"Internal modular policy entropy ({conv})")
    axes[1].set_xlabel("layer l")
    return _finish(fig, axes, path)


def plot_delta_entropy(profiles: Profiles, path: str | os.PathLike, boundaries: Boundaries = None) -> str:
    """Entropy change dH_ATTN^l and dH_FFN^l per layer (two panels), boundary layers marked.

    Args:
        profiles: ``{label: table}`` or one table (with an optional ``label`` column).
        path: PNG file to write.
        boundaries: ``{label: BoundaryResult | paper layer | None}``; marked with a dotted line.

    Returns:
        The path written.
    """
    profiles = _split(profiles)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, df) in enumerate(profiles.items()):
        c = colors[i % len(colors)]
        bl = _boundary_layer(boundaries, label)
        for ax, mod in zip(axes, ("attn", "ffn")):
            m = _module(df, mod)
            ax.plot(m["layer"], m["delta"], marker="o", ms=3, color=c, label=label)
            if bl is not None:
                ax.axvline(bl, color=c, ls=":", lw=1.2, label=f"{label} boundary l={bl}")
    conv = _convention(profiles)
    for ax, name in zip(axes, ("ATTN", "FFN")):
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_title(f"dH_{name} per layer ({conv})")
        ax.set_xlabel("layer l")
        ax.set_ylabel("entropy change (nats)")
    return _finish(fig, axes, path)
