"""`pretrain metrics PATH [PATH2]` and the model-card section: rotation tables from `rotation/` folders."""

from __future__ import annotations

import sys
from pathlib import Path

from pretrain.checkpoint import candidates, checkpoint_root
from pretrain.errors import UserError
from pretrain.metrics.plots import HEATMAP, LAYERS, write_figures
from pretrain.metrics.store import SUMMARY, RotationData, load_rotation

_LAYER_HEADER = ["layer", "neurons", "mean θ", "η_r", "θ/η_r", "cv", "t_eq"]


def find_rotation_dir(path: str | Path) -> Path:
    """The `rotation/` folder of a rotation folder, a checkpoint, or a run's newest checkpoint that has one.

    In a run, `checkpoints/latest` names the newest complete checkpoint; if that one has no
    rotation metrics, the highest `step_*` checkpoint that has them is used.
    """
    path = Path(path)
    if (path / SUMMARY).is_file():
        return path
    if (path / "rotation" / SUMMARY).is_file():
        return path / "rotation"
    root = checkpoint_root(path)
    if not root.is_dir():
        raise UserError(f"{path} is neither a checkpoint (no rotation/{SUMMARY}) nor a run folder (no checkpoints/)")
    for ckpt in candidates(path):
        if (ckpt / "rotation" / SUMMARY).is_file():
            return ckpt / "rotation"
    raise UserError(f"no checkpoint in {root} has rotation metrics (rotation/{SUMMARY}); "
                    f"train until the first checkpoint is written")


def metrics_command(paths: list[str]) -> None:
    """Print the per-layer table of one run/checkpoint (or compare two) and refresh its figures."""
    if not 1 <= len(paths) <= 2:
        raise UserError(f"pretrain metrics takes one path, or two to compare; got {len(paths)}")
    runs = []
    for path in paths:
        directory = find_rotation_dir(path)
        try:
            runs.append(load_rotation(directory))
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read rotation metrics in {directory}: {exc}") from None
    for run in runs:
        _refresh_figures(run)
    print(_single_report(runs[0]) if len(runs) == 1 else _comparison(*runs))


def model_card_section(rotation_dir: str | Path, heatmap_ref: str = f"rotation/{HEATMAP}") -> str:
    """Markdown: model-level rotation numbers, the per-layer table, and the heatmap image."""
    data = load_rotation(rotation_dir)
    s = data.summary
    lines = ["## Rotation metrics", "",
             "Angular update θ per optimizer step of every neuron's weight vector, against the rotational-"
             "equilibrium value η_r expected for the scheduled learning rate (Kosson, Messmer, Jaggi, "
             f"\"Rotational Equilibrium\", ICML 2024); measured every {s['every']} steps; the series and "
             "per-neuron snapshots are in `rotation/` beside this card.", "",
             "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _model_facts(data)]
    lines += ["", "<details><summary>Per-layer table (latest measurement)</summary>", "",
              _markdown_table(_LAYER_HEADER, _layer_rows(data)), "", "</details>", ""]
    if data.step is not None:
        lines.append(f"![θ/η_r per layer over training]({heatmap_ref})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- internals


def _refresh_figures(run: RotationData) -> None:
    if not len(run.history):
        return
    try:
        write_figures(run.history, run.path)
    except OSError as exc:  # e.g. a read-only copy of a checkpoint: the tables still print
        print(f"note: figures in {run.path} not refreshed: {exc}", file=sys.stderr)


def _single_report(run: RotationData) -> str:
    facts = "; ".join(f"{key} {value}" for key, value in _model_facts(run))
    return "\n".join([f"{run.path}", _text_table(_LAYER_HEADER, _layer_rows(run)), facts,
                      f"figures: {run.path / HEATMAP}, {run.path / LAYERS}"])


def _comparison(a: RotationData, b: RotationData) -> str:
    rows_a = {row["name"]: row for row in a.summary["layers"]}
    rows_b = {row["name"]: row for row in b.summary["layers"]}
    names = list(rows_a) + [name for name in rows_b if name not in rows_a]
    rows = [[name, _ratio(rows_a.get(name)), _ratio(rows_b.get(name)), _t_eq(rows_a.get(name)),
             _t_eq(rows_b.get(name))] for name in names]
    lines = [f"A: {a.path}", f"B: {b.path}", _text_table(["layer", "θ/η_r A", "θ/η_r B", "t_eq A", "t_eq B"], rows)]
    facts = [[key, va, vb] for (key, va), (_, vb) in zip(_model_facts(a), _model_facts(b), strict=True)]
    lines += ["", _text_table(["model", "A", "B"], facts)]
    return "\n".join(lines)


def _model_facts(data: RotationData) -> list[tuple[str, str]]:
    s = data.summary
    opt = s["optimizer"]
    t_eq = s["time_to_equilibrium"]
    return [("step", str(s["step"]) if s["step"] is not None else "not measured yet"),
            ("optimizer", f"{opt['name']} (wd {opt['weight_decay']:g})"),
            ("η_r", _fmt(s["eta_r"], ".3e")),
            ("mean θ/η_r", _fmt(s["ratio_mean"], ".3f")),
            ("balance (max/min layer θ)", _fmt(s["balance"], ".3f")),
            (f"time to equilibrium (±{s['tolerance']:.0%}, all layers)",
             f"step {t_eq}" if t_eq is not None else "not reached")]


def _layer_rows(data: RotationData) -> list[list[str]]:
    rows = []
    for layer in data.summary["layers"]:
        latest = layer["latest"] or {}
        eta_r = data.summary["eta_r"] if layer["weight_decay"] else None
        rows.append([layer["name"], str(layer["neurons"]), _fmt(latest.get("theta_mean"), ".3e"),
                     _fmt(eta_r, ".3e"), _ratio(layer), _fmt(latest.get("theta_cv"), ".3f"), _t_eq(layer)])
    return rows


def _ratio(layer: dict | None) -> str:
    return _fmt((layer["latest"] or {}).get("ratio") if layer else None, ".3f")


def _t_eq(layer: dict | None) -> str:
    return str(layer["time_to_equilibrium"]) if layer and layer["time_to_equilibrium"] is not None else "-"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    """First column left-aligned (names), the others right-aligned (numbers)."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for cells in [header, *rows]:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        lines.append("  ".join(padded))
    return "\n".join(lines)


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])
