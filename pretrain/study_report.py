"""The study report: one table row per cell and figures, computed from the cells' own files.

Everything here reads what training wrote (`metrics.jsonl`, the newest checkpoint's
`rotation/`), so the report can be regenerated at any time, also for cells that ran on a
cluster from `pretrain study --print-commands`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pretrain.checkpoint import find_latest  # noqa: E402
from pretrain.logger import read_metrics  # noqa: E402
from pretrain.metrics import EQUILIBRIUM_TOLERANCE, RotationHistory, equilibrium_layers, load_rotation  # noqa: E402
from pretrain.study import Cell, Study, cell_status  # noqa: E402

# A spike: a run of consecutive logged steps whose train loss exceeds this multiple of the
# lowest train loss logged before it (a non-finite loss counts as exceeding).
SPIKE_FACTOR = 1.5
# Train-loss curves are drawn as a moving average over this many logged steps.
SMOOTH_WINDOW = 10
# Grid keys that the figures put on axes or average over; the remaining keys form "variants".
AXIS_KEYS = ("optim.name", "optim.lr", "train.seed")


@dataclass
class CellSummary:
    cell: Cell
    status: str
    last_step: int | None = None
    final_train: float | None = None
    final_val: float | None = None
    best_val: float | None = None
    spikes: int = 0
    diverged: bool = False
    time_to_equilibrium: int | None = None  # every rotational-eligible layer with an eta_r
    half_equilibrium: int | None = None  # half of those layers
    layers_in_equilibrium: tuple[int, int] | None = None  # (in the band at the end, layers with an eta_r)
    tokens_per_s: float | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    rotation: RotationHistory | None = None  # the newest checkpoint's per-layer history

    @property
    def optimizer(self) -> str:
        return self.cell.config.optim.name

    @property
    def lr(self) -> float:
        return self.cell.config.optim.lr

    @property
    def variant(self) -> str:
        return self.cell.label(AXIS_KEYS) or "all"


# ----------------------------------------------------------------------------- numbers


def count_spikes(losses: Sequence[float | None], factor: float = SPIKE_FACTOR) -> int:
    """Number of loss spikes (see SPIKE_FACTOR) in a sequence of logged train losses."""
    spikes, lowest, inside = 0, math.inf, False
    for loss in losses:
        finite = loss is not None and math.isfinite(loss)
        high = not finite or loss > factor * lowest
        spikes += high and not inside
        inside = high
        if finite:
            lowest = min(lowest, loss)
    return spikes


def is_diverged(losses: Sequence[float | None], stopped_non_finite: bool) -> bool:
    """Diverged: stopped on or logged a non-finite loss, or ended above its first logged loss."""
    if stopped_non_finite or any(loss is None or not math.isfinite(loss) for loss in losses):
        return True
    return len(losses) > 1 and losses[-1] > losses[0]


def half_settled(times: list[int | None]) -> int | None:
    """The first step from which at least half of the layers stay in equilibrium, from each layer's
    time to equilibrium (None: not settled by the end); None if half never settle."""
    settled = sorted(t for t in times if t is not None)
    needed = math.ceil(len(times) / 2)
    return settled[needed - 1] if needed and len(settled) >= needed else None


def summarize_cell(cell: Cell, status: str) -> CellSummary:
    """The report's numbers for one cell, from its metrics log and newest checkpoint."""
    records = read_metrics(cell.run_dir)
    summary = CellSummary(cell, status)
    if not records:
        return summary
    train_points = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    losses = [loss for _, loss in train_points]
    vals = [r["val/loss"] for r in records if r.get("val/loss") is not None]
    speeds = [r["perf/tokens_per_s"] for r in records if r.get("perf/tokens_per_s") is not None]
    summary.last_step = records[-1]["step"]
    summary.final_train = losses[-1] if losses else None
    summary.final_val = vals[-1] if vals else None
    summary.best_val = min(vals) if vals else None
    summary.spikes = count_spikes(losses)
    summary.diverged = is_diverged(losses, status == "diverged")
    summary.tokens_per_s = statistics.median(speeds) if speeds else None
    summary.train_curve = [(s, loss) for s, loss in train_points if loss is not None]
    checkpoint = find_latest(cell.run_dir)
    if checkpoint is not None:
        rotation = load_rotation(checkpoint / "rotation")
        layers = [layer for layer in rotation.summary["layers"] if layer["weight_decay"]]  # those with an eta_r
        # Recomputed from the history, so reports of older checkpoints use today's definition.
        summary.time_to_equilibrium = rotation.history.overall_time_to_equilibrium(
            equilibrium_layers(rotation.summary["layers"]))
        summary.half_equilibrium = half_settled([layer["time_to_equilibrium"] for layer in layers])
        summary.layers_in_equilibrium = (sum(layer["in_equilibrium"] for layer in layers), len(layers))
        summary.rotation = rotation.history
    return summary


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _step(value: int | None) -> str:
    return "–" if value is None else str(value)


def _mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _finite(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


# ----------------------------------------------------------------------------- tables


def cell_table(summaries: list[CellSummary]) -> str:
    """Markdown table, one row per cell."""
    rows = ["| cell | status | last step | final train loss | final val loss | best val loss | spikes | diverged "
            "| time to equilibrium (step) | half the layers in equilibrium (step) | layers in equilibrium at the end "
            "| tokens/s |",
            "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for s in summaries:
        layers = "–" if s.layers_in_equilibrium is None else "{}/{}".format(*s.layers_in_equilibrium)
        speed = "–" if s.tokens_per_s is None else f"{s.tokens_per_s:,.0f}"
        ran = s.last_step is not None
        rows.append(f"| {s.cell.name} | {s.status} | {_step(s.last_step)} "
                    f"| {_fmt(s.final_train)} | {_fmt(s.final_val)} | {_fmt(s.best_val)} | {s.spikes if ran else '–'} "
                    f"| {('yes' if s.diverged else 'no') if ran else '–'} | {_step(s.time_to_equilibrium)} "
                    f"| {_step(s.half_equilibrium)} | {layers} | {speed} |")
    return "\n".join(rows)


def seed_table(summaries: list[CellSummary]) -> str:
    """Markdown table over seeds: mean ± sample standard deviation per cell without its seed."""
    groups = _group(summaries, lambda s: s.cell.label(("train.seed",)))
    rows = ["| cell (all seeds) | seeds | final val loss | best val loss | spikes | diverged | time to equilibrium "
            "| half the layers in equilibrium |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, members in groups.items():
        steps = [_finite([s.time_to_equilibrium for s in members]), _finite([s.half_equilibrium for s in members])]
        rows.append(f"| {label} | {len(members)} | {_mean_std(_finite([s.final_val for s in members]))} "
                    f"| {_mean_std(_finite([s.best_val for s in members]))} "
                    f"| {_mean_std([float(s.spikes) for s in members], 1)} "
                    f"| {sum(s.diverged for s in members)}/{len(members)} "
                    f"| {_mean_std(steps[0], 0)} | {_mean_std(steps[1], 0)} |")
    return "\n".join(rows)


def _group(summaries: list[CellSummary], key: Callable[[CellSummary], Any]) -> dict[Any, list[CellSummary]]:
    groups: dict[Any, list[CellSummary]] = {}
    for s in summaries:
        groups.setdefault(key(s), []).append(s)
    return groups


# ----------------------------------------------------------------------------- figures


def plot_lr_sensitivity(summaries: list[CellSummary], path: Path) -> None:
    """Final val loss against lr (log x), one panel per optimizer, one line per variant (e.g. warmup)."""
    by_optimizer = _group(summaries, lambda s: s.optimizer)
    fig, axes = _panels(len(by_optimizer), sharey=True)
    for ax, (optimizer, members) in zip(axes, by_optimizer.items(), strict=False):
        for variant, cells in _group(members, lambda s: s.variant).items():
            points = []
            for lr, seeds in sorted(_group(cells, lambda s: s.lr).items()):
                vals = _finite([s.final_val for s in seeds if not s.diverged])
                if vals:
                    points.append((lr, statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0))
                elif any(s.diverged for s in seeds):  # diverged: an x on the top edge
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


def plot_loss_curves(summaries: list[CellSummary], path: Path) -> None:
    """Train loss (moving average) against step, one panel per optimizer; colour = lr, style = variant."""
    by_optimizer = _group(summaries, lambda s: s.optimizer)
    fig, axes = _panels(len(by_optimizer), sharey=True)
    first_losses = [s.train_curve[0][1] for s in summaries if s.train_curve]
    for ax, (optimizer, members) in zip(axes, by_optimizer.items(), strict=False):
        lrs = sorted({s.lr for s in members})
        variants = list(_group(members, lambda s: s.variant))
        for s in members:
            if not s.train_curve:
                continue
            steps, losses = zip(*s.train_curve, strict=True)
            colour = plt.cm.viridis(lrs.index(s.lr) / max(1, len(lrs) - 1))
            style = ("-", "--", ":", "-.")[variants.index(s.variant) % 4]
            ax.plot(steps, _moving_average(losses, SMOOTH_WINDOW), style, color=colour, linewidth=1,
                    label=s.cell.label(("optim.name",)))
        ax.set_title(optimizer)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=6)
    if first_losses:  # keep diverging curves from flattening the others
        axes[0].set_ylim(top=1.05 * statistics.median(first_losses))
    axes[0].set_ylabel(f"train loss ({SMOOTH_WINDOW}-point moving average)")
    _save(fig, path)


def representative_cells(summaries: list[CellSummary]) -> list[CellSummary]:
    """Per optimizer and variant, the cell at the optimizer's middle grid lr (lowest seed)."""
    chosen = []
    for members in _group(summaries, lambda s: s.optimizer).values():
        lrs = sorted({s.lr for s in members})
        middle = lrs[(len(lrs) - 1) // 2]
        for cells in _group([s for s in members if s.lr == middle], lambda s: s.variant).values():
            chosen.append(min(cells, key=lambda s: s.cell.config.train.seed))
    return chosen


def plot_rotation(summaries: list[CellSummary], path: Path) -> None:
    """theta/eta_r of every layer that has an eta_r against step (log x: the first steps get room)."""
    chosen = [s for s in representative_cells(summaries) if s.rotation is not None and len(s.rotation)]
    fig, axes = _panels(max(1, len(chosen)), sharey=True)
    for ax, s in zip(axes, chosen, strict=False):
        ratios = s.rotation.column("ratio")
        for i in range(ratios.shape[1]):
            ax.plot(s.rotation.steps, ratios[:, i], color=plt.cm.viridis(i / max(1, ratios.shape[1] - 1)),
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


def _panels(count: int, sharey: bool) -> tuple[Any, list[Any]]:
    columns = min(count, 4)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 3.4 * rows), dpi=90, squeeze=False,
                             sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- report

# File name -> (title, caption, plot function) of each report figure.
FIGURES: dict[str, tuple[str, str, Callable[[list[CellSummary], Path], None]]] = {
    "lr_sensitivity.png": (
        "Final validation loss against peak learning rate",
        "Mean over seeds (bars: standard deviation), log-scale lr axis, one panel per optimizer and one line per "
        "setting of the other grid keys (e.g. warmup). A red x on the top edge marks an lr whose run diverged.",
        plot_lr_sensitivity),
    "loss_curves.png": (
        "Training loss",
        f"{SMOOTH_WINDOW}-step moving average of the logged train loss; colour: lr (dark = lowest), line style: "
        "the other grid keys (e.g. warmup).",
        plot_loss_curves),
    "rotation.png": (
        "θ/η_r per layer",
        "Each optimizer at its middle grid lr, one panel per setting of the other grid keys: θ/η_r of every layer "
        f"that has an η_r (colour: depth order) against step, log-log; grey band: ±{EQUILIBRIUM_TOLERANCE:.0%} "
        "around equilibrium.",
        plot_rotation),
}


def write_report(study: Study) -> Path:
    """Write `<study>/report.md` and `<study>/figures/*.png` from the cells' files; return the report path."""
    summaries = [summarize_cell(cell, cell_status(cell)) for cell in study.cells]
    figures = study.out_dir / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name, (_, _, plot) in FIGURES.items():
        plot(summaries, figures / name)
    counts = {status: sum(s.status == status for s in summaries) for status in ("done", "diverged", "partial",
                                                                               "pending")}
    seeds = _group(summaries, lambda s: s.cell.label(("train.seed",)))
    lines = [
        f"# Study `{study.name}`", "",
        f"Study file `{study.path}`, base recipe `{study.base}`, {len(summaries)} cells: "
        + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + ".",
        f"Regenerate with `pretrain study {study.path} --report-only`.", "",
        "Definitions. Losses are cross-entropy in nats per token. *Final train loss* is the last logged "
        "single-batch loss; *final val loss* the last evaluation, *best val loss* the lowest. "
        f"A *spike* is a run of consecutive logged steps whose train loss exceeds {SPIKE_FACTOR}x the lowest "
        "train loss logged before it (non-finite counts). *Diverged*: the run stopped on or logged a "
        "non-finite loss, or its last logged train loss is above its first. *Time to equilibrium*: the "
        "first measured step after which θ/η_r (mean angular update per step over the equilibrium value η_r "
        f"expected for the scheduled lr) stays within ±{EQUILIBRIUM_TOLERANCE:.0%} of 1 in every rotational-eligible "
        "layer (the decayed linear layers, the same set for a plain optimizer and its RV), from the newest "
        "checkpoint's rotation history; "
        "– means not reached by the end. *Half the layers in equilibrium*: the same for at least half of those "
        "layers. The next column counts the layers inside the band at the end. Means over seeds leave out the "
        "seeds that never got there. "
        "*tokens/s*: median over logging windows.", "",
        cell_table(summaries), "",
    ]
    if any(len(members) > 1 for members in seeds.values()):
        lines += ["## Over seeds", "", "Mean ± sample standard deviation over the seeds of each setting.", "",
                  seed_table(summaries), ""]
    for name, (title, caption, _) in FIGURES.items():
        lines += [f"## {title}", "", f"![{title}](figures/{name})", "", caption, ""]
    path = study.out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
