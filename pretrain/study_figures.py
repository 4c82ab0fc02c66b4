"""The study report's figures, drawn from the cells' summaries.

Drawn with matplotlib's object API on an Agg canvas, never pyplot, so nothing here touches the
process-wide backend of a notebook or script that imports us (as in pretrain/metrics/plots.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pretrain.metrics import EQUILIBRIUM_TOLERANCE
from pretrain.study_stats import mean_std
from pretrain.study_summary import EARLY_FRACTION, CellSummary, finite, group_by

# Train-loss curves are drawn as a moving average over this many logged steps.
SMOOTH_WINDOW = 10
# The early-loss figure shows this multiple of the early-instability window.
EARLY_VIEW = 2
_DPI = 90
_STYLES = ("-", "--", ":", "-.")


def plot_lr_sensitivity(summaries: list[CellSummary], path: Path) -> None:
    """Final val loss against lr (log x), one panel per optimizer, one line per variant (e.g. warmup)."""
    by_optimizer = group_by(summaries, lambda s: s.optimizer)
    fig, axes = _panels(len(by_optimizer), sharey=True)
    for ax, (optimizer, members) in zip(axes, by_optimizer.items(), strict=False):
        for variant, cells in group_by(members, lambda s: s.variant).items():
            points = []
            for lr, seeds in sorted(group_by(cells, lambda s: s.lr).items()):
                stats = mean_std(finite([s.final_val for s in seeds if not s.diverged]))
                if stats is not None:
                    points.append((lr, *stats))
                elif any(s.diverged for s in seeds):  # every seed diverged: an x on the top edge
                    ax.plot(lr, 1.0, "x", color="red", transform=ax.get_xaxis_transform(), clip_on=False)
            if points:
                lrs, means, stds = zip(*points, strict=True)
                ax.errorbar(lrs, means, yerr=stds, marker="o", capsize=3, label=variant)
        ax.set_xscale("log")
        ax.set_title(optimizer)
        ax.set_xlabel("peak learning rate")
        ax.grid(alpha=0.3, which="both")
        _legend(ax, fontsize=8)
    axes[0].set_ylabel("final val loss (mean ± std over seeds)")
    _save(fig, path)


def plot_early_loss(summaries: list[CellSummary], path: Path) -> None:
    """The first steps at each optimizer's highest grid lr: raw train loss of every seed, colour = variant."""
    by_optimizer = group_by(summaries, lambda s: s.optimizer)
    fig, axes = _panels(len(by_optimizer), sharey=True)
    colours = _colours(sorted({s.variant for s in summaries}))
    for ax, (optimizer, members) in zip(axes, by_optimizer.items(), strict=False):
        top = max(s.lr for s in members)
        shown: set[str] = set()
        for s in (m for m in members if m.lr == top and m.train_curve):
            last = max(2, math.ceil(EARLY_VIEW * EARLY_FRACTION * s.cell.config.train.steps))
            steps, losses = zip(*[(step, loss) for step, loss in s.train_curve if step <= last], strict=True)
            ax.plot(steps, losses, color=colours[s.variant], linewidth=0.9, alpha=0.8,
                    label=None if s.variant in shown else s.variant)
            shown.add(s.variant)
        ax.set_title(f"{optimizer}, lr {top:.3g}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7)
    axes[0].set_ylabel("train loss (every seed)")
    _save(fig, path)


def plot_loss_curves(summaries: list[CellSummary], path: Path) -> None:
    """Seed-averaged train loss (moving average) against step, one panel per optimizer;
    colour = lr, line style = variant."""
    by_optimizer = group_by(summaries, lambda s: s.optimizer)
    fig, axes = _panels(len(by_optimizer), sharey=True)
    first_losses = [s.train_curve[0][1] for s in summaries if s.train_curve]
    for ax, (optimizer, members) in zip(axes, by_optimizer.items(), strict=False):
        lrs = sorted({s.lr for s in members})
        variants = list(group_by(members, lambda s: s.variant))
        for (lr, variant), seeds in group_by(members, lambda s: (s.lr, s.variant)).items():
            curves = [dict(s.train_curve) for s in seeds if s.train_curve]
            steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if not steps:
                continue
            mean = [statistics.mean(c[step] for c in curves) for step in steps]
            ax.plot(steps, _moving_average(mean, SMOOTH_WINDOW), _STYLES[variants.index(variant) % len(_STYLES)],
                    color=colormaps["viridis"](lrs.index(lr) / max(1, len(lrs) - 1)), linewidth=1,
                    label=f"lr {lr:.3g} {variant}")
        ax.set_title(optimizer)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=6)
    if first_losses:  # keep diverging curves from flattening the others
        axes[0].set_ylim(top=1.05 * statistics.median(first_losses))
    axes[0].set_ylabel(f"train loss, mean over seeds ({SMOOTH_WINDOW}-step moving average)")
    _save(fig, path)


def least_warmup_groups(summaries: list[CellSummary]) -> dict[tuple[str, str], list[CellSummary]]:
    """(optimizer, variant) -> cells, over each optimizer's cells with its least warmup (none, in a warmup
    grid) that have rotation traces: the settings whose transient the report shows."""
    traced = [s for s in summaries if s.traces]
    least = {opt: min(s.warmup for s in cells) for opt, cells in group_by(traced, lambda s: s.optimizer).items()}
    return group_by([s for s in traced if s.warmup == least[s.optimizer]], lambda s: (s.optimizer, s.variant))


def plot_transient(summaries: list[CellSummary], path: Path) -> None:
    """Per optimizer and variant with the least warmup (columns), the lowest seed's cell at each lr: the
    median θ/η_r of the decayed matrices (top; embedding dashed) and their median neuron norm (bottom;
    embedding dashed), against step, log-log."""
    groups = least_warmup_groups(summaries)
    columns = max(1, len(groups))
    fig = Figure(figsize=(3.6 * columns, 6.4), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, columns, squeeze=False, sharex=True, sharey="row")
    for col, ((optimizer, variant), members) in enumerate(groups.items()):
        lrs = sorted({s.lr for s in members})
        for lr, seeds in sorted(group_by(members, lambda s: s.lr).items()):
            s = min(seeds, key=lambda m: m.seed)
            colour = colormaps["viridis"](lrs.index(lr) / max(1, len(lrs) - 1))
            for group, style in (("matrices", "-"), ("embedding", "--")):
                trace = s.traces.get(group)
                if trace is None:
                    continue
                label = f"lr {lr:.3g}" if group == "matrices" else None
                axes[0, col].plot(trace.steps, trace.ratio, style, color=colour, linewidth=1, label=label)
                axes[1, col].plot(trace.steps, trace.weight_norm, style, color=colour, linewidth=1)
        axes[0, col].axhspan(1 - EQUILIBRIUM_TOLERANCE, 1 + EQUILIBRIUM_TOLERANCE, color="grey", alpha=0.3)
        axes[0, col].set_title(f"{optimizer} {variant}", fontsize=9)
        axes[1, col].set_xlabel("optimizer step")
        for ax in axes[:, col]:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
        _legend(axes[0, col], fontsize=7)
    axes[0, 0].set_ylabel("θ / η_r, median over layers")
    axes[1, 0].set_ylabel("neuron weight norm, median over layers")
    _save(fig, path)


def representative_cells(summaries: list[CellSummary]) -> list[CellSummary]:
    """Per optimizer and variant, the cell at the optimizer's middle grid lr (lowest seed)."""
    chosen = []
    for members in group_by(summaries, lambda s: s.optimizer).values():
        lrs = sorted({s.lr for s in members})
        middle = lrs[(len(lrs) - 1) // 2]
        for cells in group_by([s for s in members if s.lr == middle], lambda s: s.variant).values():
            chosen.append(min(cells, key=lambda s: s.seed))
    return chosen


def plot_rotation(summaries: list[CellSummary], path: Path) -> None:
    """theta/eta_r of every layer that has an eta_r against step (log x: the first steps get room)."""
    chosen = [s for s in representative_cells(summaries) if s.rotation is not None and len(s.rotation)]
    fig, axes = _panels(max(1, len(chosen)), sharey=True)
    for ax, s in zip(axes, chosen, strict=False):
        ratios = s.rotation.column("ratio")
        for i in range(ratios.shape[1]):
            ax.plot(s.rotation.steps, ratios[:, i], color=colormaps["viridis"](i / max(1, ratios.shape[1] - 1)),
                    linewidth=0.7)
        ax.axhspan(1 - EQUILIBRIUM_TOLERANCE, 1 + EQUILIBRIUM_TOLERANCE, color="grey", alpha=0.3,
                   label=f"equilibrium ±{EQUILIBRIUM_TOLERANCE:.0%}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(s.cell.name, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("θ / η_r per layer (colour: layer order)")
    _legend(axes[0], fontsize=7)
    _save(fig, path)


# File name -> (title, caption, plot function) of each report figure, in report order.
FIGURES: dict[str, tuple[str, str, Callable[[list[CellSummary], Path], None]]] = {
    "lr_sensitivity.png": (
        "Final validation loss against peak learning rate",
        "Mean over seeds (bars: sample standard deviation), log-scale lr axis, one panel per optimizer and one "
        "line per setting of the other grid keys (e.g. warmup). A red x on the top edge marks an lr where every "
        "seed diverged.",
        plot_lr_sensitivity),
    "early_loss.png": (
        "The first steps at the highest learning rate",
        f"Raw train loss of every seed over the first {EARLY_VIEW * EARLY_FRACTION:.0%} of the steps, at each "
        "optimizer's highest grid lr; colour: the other grid keys (e.g. warmup).",
        plot_early_loss),
    "loss_curves.png": (
        "Training loss",
        f"Train loss averaged over seeds, then a {SMOOTH_WINDOW}-step moving average; colour: lr (dark = lowest), "
        "line style: the other grid keys (e.g. warmup).",
        plot_loss_curves),
    "transient.png": (
        "The rotational transient: angular updates and weight norms",
        "Per optimizer (and setting of the other grid keys) without warmup (the least warmup of the grid), the "
        "lowest seed at every grid lr (colour, dark = lowest): top, θ/η_r (median over the decayed linear "
        "layers; dashed: the embedding); bottom, the median over the same layers of the mean neuron weight norm. "
        "Log-log; grey band: ±"
        f"{EQUILIBRIUM_TOLERANCE:.0%} around equilibrium.",
        plot_transient),
    "rotation.png": (
        "θ/η_r per layer",
        "Each optimizer at its middle grid lr, one panel per setting of the other grid keys: θ/η_r of every layer "
        f"that has an η_r (colour: depth order) against step, log-log; grey band: ±{EQUILIBRIUM_TOLERANCE:.0%} "
        "around equilibrium.",
        plot_rotation),
}


def write_figures(summaries: list[CellSummary], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, (_, _, plot) in FIGURES.items():
        plot(summaries, directory / name)


def _colours(keys: Sequence[str]) -> dict[str, Any]:
    return {key: colormaps["tab10"](i % 10) for i, key in enumerate(keys)}


def _legend(ax: Any, fontsize: int) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty panel (every cell diverged) gets no empty legend
        ax.legend(fontsize=fontsize)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _panels(count: int, sharey: bool) -> tuple[Figure, list[Any]]:
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(4.0 * columns, 3.4 * rows), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    flat = list(fig.subplots(rows, columns, squeeze=False, sharey=sharey).flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png")
