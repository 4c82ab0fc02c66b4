"""The checkpoint `rotation/` folder: writing and reading it (format: docs/rotation-metrics.md).

    summary.json          format_version, step, optimizer, layer table, latest per-layer numbers,
                          equilibrium status and time to equilibrium
    history.parquet       one row per (measured step, layer): step, lr, eta_r, layer, LAYER_METRICS
    snapshot.safetensors  latest per-neuron tensors, keys '<layer>/<metric>' (NEURON_METRICS), float32
    heatmap.png, layers.png
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from pretrain.metrics.history import EQUILIBRIUM_TOLERANCE, LAYER_METRICS, RotationHistory
from pretrain.metrics.plots import write_figures

FORMAT_VERSION = 1
SUMMARY, HISTORY, SNAPSHOT = "summary.json", "history.parquet", "snapshot.safetensors"


@dataclass
class RotationData:
    """A `rotation/` folder read back: `summary` is summary.json as written."""

    path: Path
    summary: dict[str, Any]
    history: RotationHistory
    snapshot: dict[str, dict[str, torch.Tensor]]  # layer -> metric -> per-neuron values

    @property
    def step(self) -> int | None:
        return self.summary["step"]


def write_rotation(directory: Path, layers: list[dict], optimizer: dict, every: int, history: RotationHistory,
                   snapshot: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write all files of a `rotation/` folder; `snapshot` is from the history's latest step.
    Figures are drawn only once something was measured.

    Files are written in place: the checkpoint writer builds the whole checkpoint in a temp
    folder and renames it, which makes the folder appear atomically.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _write_history(directory / HISTORY, history)
    flat = {f"{layer}/{metric}": values.detach().float().cpu().contiguous()
            for layer, metrics in snapshot.items() for metric, values in metrics.items()}
    metadata = {"format_version": str(FORMAT_VERSION)}
    if len(history):
        metadata["step"] = str(history.steps[-1])
    save_file(flat, str(directory / SNAPSHOT), metadata=metadata)
    summary = _summary(layers, optimizer, every, history)
    (directory / SUMMARY).write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    if len(history):
        write_figures(history, directory)


def load_rotation(directory: str | Path) -> RotationData:
    """Read a `rotation/` folder written by `write_rotation` (any FORMAT_VERSION up to ours)."""
    directory = Path(directory)
    summary = json.loads((directory / SUMMARY).read_text())
    if summary.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{directory} has rotation format {summary['format_version']}; this version reads "
                         f"up to {FORMAT_VERSION}, upgrade rotational-pretrain")
    layers = [layer["name"] for layer in summary["layers"]]
    history = _read_history(directory / HISTORY, layers)
    snapshot: dict[str, dict[str, torch.Tensor]] = {}
    for key, values in load_file(str(directory / SNAPSHOT)).items():
        layer, metric = key.rsplit("/", 1)
        snapshot.setdefault(layer, {})[metric] = values
    return RotationData(directory, summary, history, snapshot)


def _write_history(path: Path, history: RotationHistory) -> None:
    """Long format, step-major then layer in table order."""
    n, layers = len(history), len(history.layers)
    columns: dict[str, Any] = {
        "step": np.repeat(history.steps, layers), "lr": np.repeat(history.lr, layers),
        "eta_r": np.repeat(history.eta_r, layers), "layer": pa.array(history.layers * n, pa.string())}
    flat = history.values.reshape(n * layers, len(LAYER_METRICS))
    columns.update({metric: flat[:, j] for j, metric in enumerate(LAYER_METRICS)})
    pq.write_table(pa.table(columns), path)


def _read_history(path: Path, layers: list[str]) -> RotationHistory:
    table = pq.read_table(path).to_pydict()
    rows, width = len(table["step"]), len(layers)
    n = rows // width if width else 0
    if rows != n * width or table["layer"] != layers * n:
        raise ValueError(f"{path}: rows are not step-major over the {width} layers of summary.json")
    values = np.stack([np.asarray(table[m], np.float64) for m in LAYER_METRICS], axis=1)
    every_layer = slice(None, None, width or 1)
    return RotationHistory.from_arrays(layers, np.asarray(table["step"][every_layer], np.int64),
                                       np.asarray(table["lr"][every_layer]), np.asarray(table["eta_r"][every_layer]),
                                       values.reshape(n, width, len(LAYER_METRICS)))


def _summary(layers: list[dict], optimizer: dict, every: int, history: RotationHistory) -> dict[str, Any]:
    measured = len(history) > 0
    times = history.time_to_equilibrium() if measured else [None] * len(layers)
    rows = []
    for i, (layer, t_eq) in enumerate(zip(layers, times, strict=True)):
        latest = {m: _finite(history.column(m)[-1, i]) for m in LAYER_METRICS} if measured else None
        in_eq = t_eq is not None  # t_eq is set exactly while the latest ratio is inside the band
        rows.append({**layer, "latest": latest, "in_equilibrium": in_eq, "time_to_equilibrium": t_eq})
    return {
        "format_version": FORMAT_VERSION,
        "step": int(history.steps[-1]) if measured else None,
        "measurements": len(history),
        "every": every,
        "tolerance": EQUILIBRIUM_TOLERANCE,
        "optimizer": optimizer,
        "lr": _finite(history.lr[-1]) if measured else None,
        "eta_r": _finite(history.eta_r[-1]) if measured else None,
        "ratio_mean": _finite(history.ratio_mean()[-1]) if measured else None,
        "balance": _finite(history.balance()[-1]) if measured else None,
        "time_to_equilibrium": history.overall_time_to_equilibrium(equilibrium_layers(layers)) if measured else None,
        "layers": rows,
    }


def equilibrium_layers(layers: list[dict]) -> list[bool]:
    """The layers the overall time to equilibrium is judged on: the rotational-eligible ones, if any."""
    rotational = [bool(layer["rotational"]) for layer in layers]
    return rotational if any(rotational) else [True] * len(layers)


def _finite(x: float) -> float | None:
    """JSON has no NaN/inf: undefined numbers are written as null."""
    x = float(x)
    return x if math.isfinite(x) else None
