"""Study files: a grid of ordinary training runs ("cells") over config keys (DESIGN section 8).

A study file (YAML, under configs/study/) names a base recipe and a grid:

  base: ../tiny-cpu.yaml           # run recipe, relative to the study file
  out_dir: runs/study/NAME         # cells go to OUT/cells/<cell>/, the report to OUT/report.md
                                   # (default runs/study/<file stem>; relative to the working dir)
  overrides: [train.steps=150]     # dotted overrides applied to every cell
  grid:                            # dotted key -> list of values; cells are the cross product
    optim.name: [adamw, rv-adamw]
    schedule.warmup_steps: [0, 0.05]   # a float in (0, 1) means that fraction of train.steps
    train.seed: [0, 1, 2]
  per_optimizer:                   # extra grid axes for the cells of one optimizer only
    adamw: {optim.lr: [1.0e-3, 3.0e-3]}

This module only reads the file and expands the grid into validated cells with stable names;
running them is `pretrain.study_run`, the report `pretrain.study_report`, the command line
`pretrain.cli`. Nothing here imports torch, so `pretrain --help` stays instant.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pretrain.config import Config, load_config, read_yaml_mapping
from pretrain.errors import UserError

STUDY_KEYS = ("base", "out_dir", "overrides", "grid", "per_optimizer")
WARMUP_KEY = "schedule.warmup_steps"
# Keys the study owns: every cell gets its own train.out_dir.
RESERVED_KEYS = ("train.out_dir",)
# Cell names join one part per grid key: these first, in this order, then the others in file
# order, and the seed last, so names read `<optimizer>_wu<steps>_lr<lr>_..._s<seed>`.
NAME_PREFIX = {"optim.name": "", WARMUP_KEY: "wu", "optim.lr": "lr", "model.linear_gains": "gains-",
               "optim.rotational_embeddings": "rotemb-"}
SEED_KEY, SEED_PREFIX = "train.seed", "s"


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its grid values (warmup resolved to steps) and resolved config."""

    values: tuple[tuple[str, Any], ...]  # (dotted key, value) in name order
    overrides: tuple[str, ...]  # what `pretrain train BASE ...` needs, train.out_dir included
    config: Config

    @property
    def name(self) -> str:
        return self.label()

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.out_dir)

    def label(self, without: Iterable[str] = ()) -> str:
        """The cell name, leaving out the parts of the keys in `without` (for grouping)."""
        skip = set(without)
        return "_".join(name_part(k, v) for k, v in self.values if k not in skip)


@dataclass(frozen=True)
class Study:
    path: Path
    base: Path
    out_dir: Path
    cells: tuple[Cell, ...]

    @property
    def name(self) -> str:
        return self.path.stem


# ----------------------------------------------------------------------------- loading


def load_study(path: str | Path, extra_overrides: Sequence[str] = (), out_dir: str | Path | None = None) -> Study:
    """Read a study file and expand its grid into validated cells (no data is touched)."""
    path = Path(path)
    spec = _read_spec(path)
    base = Path(os.path.normpath(path.parent / spec["base"]))
    overrides = [*spec["overrides"], *extra_overrides]
    grid, per_optimizer = spec["grid"], spec["per_optimizer"]
    _check_keys(overrides, grid, per_optimizer)
    root = Path(out_dir if out_dir is not None else spec.get("out_dir", f"runs/study/{path.stem}"))
    base_optimizer = load_config(base, overrides).optim.name
    cells = [_make_cell(base, overrides, values, root) for values in _expand(grid, per_optimizer, base_optimizer)]
    names = [c.name for c in cells]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"study {path} gives several cells the same name ({', '.join(duplicates[:3])}): two grid "
                        "values agree in 3 significant digits or two grid keys end in the same word; change them")
    return Study(path, base, root, tuple(cells))


def _read_spec(path: Path) -> dict[str, Any]:
    spec = read_yaml_mapping(path, "study file", "a file such as configs/study/warmup-free-cpu.yaml",
                             f"a mapping with keys {', '.join(STUDY_KEYS)}")
    unknown = sorted(set(spec) - set(STUDY_KEYS))
    if unknown:
        raise UserError(f"study file {path} has unknown key(s) {', '.join(unknown)}; valid keys: "
                        f"{', '.join(STUDY_KEYS)}")
    if not isinstance(spec.get("base"), str):
        raise UserError(f"study file {path} needs `base:`, the run recipe relative to it (e.g. ../tiny-cpu.yaml)")
    spec.setdefault("overrides", [])
    spec.setdefault("per_optimizer", {})
    if not isinstance(spec["overrides"], list) or not all(isinstance(o, str) for o in spec["overrides"]):
        raise UserError(f"study file {path}: `overrides:` must be a list of key=value strings")
    spec["grid"] = _check_grid(spec.get("grid"), f"{path}: grid")
    if not isinstance(spec["per_optimizer"], dict):
        raise UserError(f"study file {path}: `per_optimizer:` must map optimizer names to grids")
    spec["per_optimizer"] = {name: _check_grid(sub, f"{path}: per_optimizer.{name}")
                             for name, sub in spec["per_optimizer"].items()}
    return spec


def _check_grid(grid: Any, where: str) -> dict[str, list[Any]]:
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{where} must map dotted config keys to lists of values, e.g. optim.lr: [1.0e-3, 3.0e-3]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
    return grid


def _check_keys(overrides: list[str], grid: dict[str, list[Any]], per_optimizer: dict[str, dict]) -> None:
    override_keys = {o.partition("=")[0].strip() for o in overrides}
    axes = set(grid)
    for name, sub in per_optimizer.items():
        if "optim.name" in grid and name not in grid["optim.name"]:
            raise UserError(f"per_optimizer.{name} matches no optimizer of grid.optim.name "
                            f"({', '.join(map(str, grid['optim.name']))})")
        both = set(grid) & set(sub)
        if both:
            raise UserError(f"{', '.join(sorted(both))} is both a grid axis and in per_optimizer.{name}; keep one")
        axes |= set(sub)
    reserved = sorted((override_keys | axes) & set(RESERVED_KEYS))
    if reserved:
        raise UserError(f"{reserved[0]} is set by the study for each cell; choose the study's folder with "
                        "out_dir: or --out-dir instead")
    clash = sorted(override_keys & axes)
    if clash:
        raise UserError(f"{', '.join(clash)} is a grid axis of the study and cannot also be overridden; "
                        "edit the grid instead")


def _expand(grid: dict[str, list[Any]], per_optimizer: dict[str, dict[str, list[Any]]],
            base_optimizer: str) -> list[dict[str, Any]]:
    """The cross product of the grid, each combination extended by its optimizer's own axes."""
    out = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo, strict=True))
        extra = per_optimizer.get(values.get("optim.name", base_optimizer), {})
        for extra_combo in itertools.product(*extra.values()):
            out.append({**values, **dict(zip(extra, extra_combo, strict=True))})
    return out


def _make_cell(base: Path, overrides: list[str], values: dict[str, Any], root: Path) -> Cell:
    values = dict(values)
    if WARMUP_KEY in values:
        others = [f"{k}={_override_value(v)}" for k, v in values.items() if k != WARMUP_KEY]
        steps = load_config(base, [*overrides, *others]).train.steps
        values[WARMUP_KEY] = resolve_warmup(values[WARMUP_KEY], steps)
    ordered = tuple(sorted(values.items(), key=lambda kv: _name_rank(kv[0], list(values))))
    name = "_".join(name_part(k, v) for k, v in ordered)
    cell_overrides = (*overrides, *(f"{k}={_override_value(v)}" for k, v in ordered),
                      f"train.out_dir={root / 'cells' / name}")
    cfg = load_config(base, cell_overrides)
    if not cfg.checkpoint.save_final:
        raise UserError(f"cell {name} has checkpoint.save_final=false; a study needs every cell's final checkpoint")
    return Cell(ordered, cell_overrides, cfg)


def resolve_warmup(value: Any, steps: int) -> int:
    """Warmup as steps: an integer is a step count, a float in (0, 1) a fraction of `steps`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{WARMUP_KEY} values must be step counts or fractions of train.steps, got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        if not 0.0 < value < 1.0:
            raise UserError(f"{WARMUP_KEY}={value} is neither a whole number of steps nor a fraction in (0, 1)")
        return round(value * steps)
    return int(value)


def _name_rank(key: str, file_order: list[str]) -> tuple[int, int]:
    if key in NAME_PREFIX:
        return 0, list(NAME_PREFIX).index(key)
    if key == SEED_KEY:
        return 2, 0
    return 1, file_order.index(key)


def name_part(key: str, value: Any) -> str:
    """Short, filesystem-safe `<prefix><value>`, e.g. ('optim.lr', 0.003) -> 'lr3e-3'."""
    prefix = NAME_PREFIX.get(key, SEED_PREFIX if key == SEED_KEY else key.rsplit(".", 1)[-1])
    return prefix + "".join(c if c.isalnum() or c in ".+-" else "-" for c in format_value(value))


def format_value(value: Any) -> str:
    """Compact text for a grid value: floats other than small whole numbers in short scientific form (3e-3)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    if isinstance(value, float):
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    return str(value)


def _override_value(value: Any) -> str:
    """The text after `key=` that `load_config` reads back as `value` (YAML scalar or flow list)."""
    if isinstance(value, str) and yaml.safe_load(value) == value:
        return value
    return json.dumps(value)
