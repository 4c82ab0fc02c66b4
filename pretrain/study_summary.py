"""One study cell's numbers, read from the files its run wrote.

Everything here comes from what training wrote (`metrics.jsonl`, the newest checkpoint's
`rotation/`), so a report can be regenerated at any time, also for cells that ran on a cluster
from `pretrain study --print-commands`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pretrain.checkpoint import find_latest
from pretrain.logger import read_metrics
from pretrain.metrics import RotationHistory, equilibrium_layers, load_rotation
from pretrain.study import WARMUP_KEY, Cell

# A spike: a run of consecutive logged steps whose train loss exceeds this multiple of the
# lowest train loss logged before it (a non-finite loss counts as exceeding).
SPIKE_FACTOR = 1.5
# The early-instability window: the first this fraction of train.steps (at least step 1).
EARLY_FRACTION = 0.1
# Grid keys that tables and figures put on axes or average over; the remaining keys form "variants".
AXIS_KEYS = ("optim.name", "optim.lr", "train.seed")
# Layer groups the rotation transient is summarised over (kinds of the parameter table).
LAYER_GROUPS = {"matrices": ("linear", "conv1d"), "embedding": ("embedding",)}


@dataclass(frozen=True)
class RotationTrace:
    """Per measured step, over the decayed layers of one group: the median θ/η_r and the median of the
    layers' mean neuron weight norm."""

    steps: np.ndarray
    ratio: np.ndarray
    weight_norm: np.ndarray

    def at_fraction(self, fraction: float) -> tuple[int, float, float]:
        """(step, ratio, norm) of the first measurement at or after `fraction` of the last measured step that
        has a defined ratio, else the last one before it that has (a schedule that decays to 0 leaves the
        final step without an η_r)."""
        defined = np.flatnonzero(np.isfinite(self.ratio))
        if not len(defined):
            i = len(self.steps) - 1
        else:
            later = defined[self.steps[defined] >= fraction * self.steps[-1]]
            i = int(later[0]) if len(later) else int(defined[-1])
        return int(self.steps[i]), float(self.ratio[i]), float(self.weight_norm[i])


@dataclass
class CellSummary:
    cell: Cell
    status: str
    last_step: int | None = None
    initial_train: float | None = None  # the first logged train loss (step 1 when every step is logged)
    final_train: float | None = None
    final_val: float | None = None
    best_val: float | None = None
    early_peak: float | None = None  # the highest train loss of the early window / initial_train
    spikes: int = 0
    diverged: bool = False
    time_to_equilibrium: int | None = None  # every rotational-eligible layer with an eta_r
    half_equilibrium: int | None = None  # half of those layers
    layers_in_equilibrium: tuple[int, int] | None = None  # (in the band at the end, layers with an eta_r)
    tokens_per_s: float | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    rotation: RotationHistory | None = None  # the newest checkpoint's per-layer history
    traces: dict[str, RotationTrace] = field(default_factory=dict)  # LAYER_GROUPS name -> trace

    @property
    def optimizer(self) -> str:
        return self.cell.config.optim.name

    @property
    def lr(self) -> float:
        return self.cell.config.optim.lr

    @property
    def seed(self) -> int:
        return self.cell.config.train.seed

    @property
    def warmup(self) -> int:
        return self.cell.config.schedule.warmup_steps

    @property
    def variant(self) -> str:
        """The cell's grid values other than optimizer, lr and seed (e.g. `wu0`); 'all' when there are none."""
        return self.cell.label(AXIS_KEYS) or "all"

    @property
    def setting(self) -> str:
        """The cell name without its seed: the cells of one setting differ only in their seed."""
        return self.cell.label(("train.seed",))

    @property
    def pairing(self) -> str:
        """The cell name without seed and warmup: a with/without-warmup pair shares it."""
        return self.cell.label(("train.seed", WARMUP_KEY))

    def step1_ratio(self, group: str) -> float | None:
        """θ/η_r of the group's layers (median) at optimizer step 1, if measured there."""
        trace = self.traces.get(group)
        if trace is None or not len(trace.steps) or trace.steps[0] != 1 or not math.isfinite(trace.ratio[0]):
            return None
        return float(trace.ratio[0])


# ----------------------------------------------------------------------------- per-cell numbers


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


def early_peak(points: Sequence[tuple[int, float | None]], steps: int,
               fraction: float = EARLY_FRACTION) -> float | None:
    """Highest train loss logged at steps <= max(1, ceil(fraction * steps)) over the first logged loss;
    inf when the window holds a non-finite loss, None without a finite first loss."""
    if not points or points[0][1] is None or not math.isfinite(points[0][1]):
        return None
    window = [loss for step, loss in points if step <= max(1, math.ceil(fraction * steps))]
    if any(loss is None or not math.isfinite(loss) for loss in window):
        return math.inf
    return max(window) / points[0][1]


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


def rotation_trace(history: RotationHistory, chosen: Sequence[bool]) -> RotationTrace | None:
    """The group trace over the `chosen` layers (medians over layers, NaN-aware); None if none is chosen."""
    columns = np.flatnonzero(np.asarray(chosen, dtype=bool))
    if not len(columns) or not len(history):
        return None
    return RotationTrace(history.steps.copy(), _nanmedian(history.column("ratio")[:, columns]),
                         _nanmedian(history.column("weight_norm")[:, columns]))


def _nanmedian(a: np.ndarray) -> np.ndarray:
    """Row medians ignoring NaN; NaN for an all-NaN row (without numpy's warning)."""
    out = np.full(a.shape[0], np.nan)
    for i, row in enumerate(a):
        finite = row[~np.isnan(row)]
        if finite.size:
            out[i] = float(np.median(finite))
    return out


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
    summary.initial_train = losses[0] if losses else None
    summary.final_train = losses[-1] if losses else None
    summary.final_val = vals[-1] if vals else None
    summary.best_val = min(vals) if vals else None
    summary.early_peak = early_peak(train_points, cell.config.train.steps)
    summary.spikes = count_spikes(losses)
    summary.diverged = is_diverged(losses, status == "diverged")
    summary.tokens_per_s = statistics.median(speeds) if speeds else None
    summary.train_curve = [(s, loss) for s, loss in train_points if loss is not None]
    checkpoint = find_latest(cell.run_dir)
    if checkpoint is not None and (checkpoint / "rotation").is_dir():
        rotation = load_rotation(checkpoint / "rotation")
        table = rotation.summary["layers"]
        # Recomputed from the history, so reports of older checkpoints use today's definition.
        times = [t for t, layer in zip(rotation.history.time_to_equilibrium(), table, strict=True)
                 if layer["weight_decay"]]  # the layers with an eta_r; a time is set while inside the band
        summary.time_to_equilibrium = rotation.history.overall_time_to_equilibrium(equilibrium_layers(table))
        summary.half_equilibrium = half_settled(times)
        summary.layers_in_equilibrium = (sum(t is not None for t in times), len(times))
        summary.rotation = rotation.history
        for group, kinds in LAYER_GROUPS.items():
            trace = rotation_trace(rotation.history, [layer["weight_decay"] and layer["kind"] in kinds
                                                      for layer in table])
            if trace is not None:
                summary.traces[group] = trace
    return summary


def group_by(summaries: list[CellSummary], key: Callable[[CellSummary], Any]) -> dict[Any, list[CellSummary]]:
    """Summaries grouped by `key`, groups and members in first-appearance order."""
    groups: dict[Any, list[CellSummary]] = {}
    for s in summaries:
        groups.setdefault(key(s), []).append(s)
    return groups


def finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]
