"""Rotation figures: a layers x steps heatmap of theta/eta_r and per-layer curves.

Drawn with matplotlib's object API on an Agg canvas, never pyplot, so nothing here touches
the process-wide backend of a notebook or a training script that imports us.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

from pretrain.metrics.history import EQUILIBRIUM_TOLERANCE, RotationHistory

HEATMAP, LAYERS = "heatmap.png", "layers.png"
_DPI = 110
# Colour range of the ratio heatmap: [1/k, k] on a log scale, k clamped to this interval, so
# equilibrium (1) is always the neutral centre and a single outlier step cannot wash it out.
_RATIO_SPAN = (1.25, 100.0)


def write_figures(history: RotationHistory, directory: Path) -> None:
    """(Re)write heatmap.png and layers.png of a non-empty history into `directory`."""
    _save(heatmap_figure(history), directory / HEATMAP)
    _save(layers_figure(history), directory / LAYERS)


def _quantity(history: RotationHistory) -> tuple[np.ndarray, str, bool]:
    """(values, label, is_ratio): theta/eta_r where defined; runs without weight decay have no
    eta_r, so their figures show theta itself."""
    ratio = history.column("ratio")
    if not np.isnan(ratio).all():
        return ratio, "θ / η_r", True
    return history.column("theta_mean"), "mean θ (rad), no η_r: weight decay is 0", False


def heatmap_figure(history: RotationHistory) -> Figure:
    """Layers (rows, table order) x measured steps; diverging log colours centred at ratio 1."""
    values, label, is_ratio = _quantity(history)
    finite = values[np.isfinite(values) & (values > 0)]
    if is_ratio:
        span = float(np.clip(np.max(np.maximum(finite, 1.0 / finite)), *_RATIO_SPAN)) if finite.size else 2.0
        norm, cmap = LogNorm(1.0 / span, span), colormaps["RdBu_r"]
        ticks = np.geomspace(1.0 / span, span, 5)
    else:
        norm = LogNorm(finite.min(), finite.max()) if finite.size else Normalize()
        cmap, ticks = colormaps["viridis"], None
    n_layers = len(history.layers)
    fig = Figure(figsize=(10, min(24.0, 1.8 + 0.14 * n_layers)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Non-positive values cannot go on a log scale: masked, they show in the "bad" grey.
    mesh = ax.pcolormesh(_edges(history.steps), np.arange(n_layers + 1) - 0.5,
                         np.ma.masked_where(~(values > 0), values).T,
                         norm=norm, cmap=cmap.with_extremes(bad="lightgrey"), shading="flat")
    ax.set_ylim(n_layers - 0.5, -0.5)  # first layer on top
    stride = max(1, int(np.ceil(n_layers / 64)))
    ax.set_yticks(np.arange(0, n_layers, stride), history.layers[::stride], fontsize=6)
    ax.set_xlabel("optimizer step")
    ax.set_title(f"{label} per layer (grey: undefined)", fontsize=10)
    bar = fig.colorbar(mesh, ax=ax, label=label)
    if ticks is not None:
        bar.set_ticks(ticks, labels=[f"{t:.3g}" for t in ticks])
        bar.minorticks_off()
    return fig


def layers_figure(history: RotationHistory) -> Figure:
    """One panel per layer role (q_proj, up_proj, ...), one line per depth, log y, ±10% band."""
    values, label, is_ratio = _quantity(history)
    roles: dict[str, list[int]] = {}
    for i, name in enumerate(history.layers):
        roles.setdefault(re.sub(r"\.\d+(?=\.|$)", "", name), []).append(i)
    depths = [_depth(name) for name in history.layers]
    deepest = max([d for d in depths if d is not None], default=0) or 1
    cols = min(3, len(roles)) or 1
    rows = -(-len(roles) // cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows + 0.6), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    marker = "." if len(history) <= 30 else None
    for ax, (role, members) in zip(axes, roles.items(), strict=False):
        if is_ratio:
            ax.axhspan(1 - EQUILIBRIUM_TOLERANCE, 1 + EQUILIBRIUM_TOLERANCE, color="0.9", zorder=0)
            ax.axhline(1.0, color="0.4", lw=0.8, ls="--")
        for i in members:
            color = colormaps["viridis"](depths[i] / deepest) if depths[i] is not None else "black"
            ax.plot(history.steps, np.where(values[:, i] > 0, values[:, i], np.nan), color=color, lw=1.0,
                    marker=marker, ms=3)
        ax.set_yscale("log")
        ax.set_title(role, fontsize=9)
    for ax in axes[len(roles):]:
        ax.set_visible(False)
    fig.supxlabel("optimizer step")
    fig.supylabel(label)
    fig.suptitle("per-layer rotation (colour: depth, dark = first block)", fontsize=10)
    return fig


def _depth(name: str) -> int | None:
    match = re.search(r"\.(\d+)(?=\.|$)", name)
    return int(match.group(1)) if match else None


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges halfway between measured steps, so irregular spacing (step 1, 10, 20...) is drawn true."""
    s = steps.astype(np.float64)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[2 * s[0] - mid[0]], mid, [2 * s[-1] - mid[-1]]])


def _save(fig: Figure, path: Path) -> None:
    """Via a temp file and rename: `pretrain metrics` refreshes figures that others may be reading."""
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
