"""Optimizer studies: a grid of ordinary training runs ("cells") over config keys, then a report.

A study file (YAML, under configs/study/) names a base recipe and a grid:

  base: ../tiny-cpu.yaml           # run recipe, relative to the study file
  out_dir: runs/study/NAME         # cells go to OUT/cells/<cell>/, the report to OUT/report.md
                                   # (default runs/study/<file stem>; relative to the working dir)
  overrides: [train.steps=150]     # dotted overrides applied to every cell
  grid:                            # dotted key -> list of values; cells are the cross product
    optim.name: [adamw, rv-adamw]
    schedule.warmup_steps: [0, 0.05]   # a float in (0, 1) means that fraction of train.steps
    train.seed: [0]
  per_optimizer:                   # extra grid axes for the cells of one optimizer only
    adamw: {optim.lr: [1.0e-3, 3.0e-3]}

Every cell is a normal run directory written by `pretrain.train.train`, so it has checkpoints,
a metrics log and rotation metrics. A cell is finished when its final checkpoint exists (or
when it stopped on a non-finite loss); finished cells are skipped and interrupted ones
continue from their newest checkpoint, whether they were run here or by `--print-commands`.

The CLI imports this module to build its parser, so torch-heavy modules (checkpoint, train,
data, the report) are imported inside the functions that need them: `pretrain --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import shlex
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
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
NAME_PREFIX = {"optim.name": "", WARMUP_KEY: "wu", "optim.lr": "lr"}
SEED_KEY, SEED_PREFIX = "train.seed", "s"
DIVERGED_FILE = "study-diverged.json"
LOG_FILE = "train.log"


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
    spec = read_yaml_mapping(path, "study file", "a file such as configs/study/warmup-free-tiny.yaml",
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


# ----------------------------------------------------------------------------- cell state


def cell_status(cell: Cell) -> str:
    """'done' (final checkpoint written), 'diverged' (stopped on a non-finite loss), 'partial' (has a
    checkpoint, resumable) or 'pending'."""
    from pretrain.checkpoint import find_latest, step_dir_name

    if (cell.run_dir / DIVERGED_FILE).is_file():
        return "diverged"
    latest = find_latest(cell.run_dir)
    if latest is None:
        return "pending"
    return "done" if latest.name == step_dir_name(cell.config.train.steps) else "partial"


@dataclass(frozen=True)
class CellOutcome:
    name: str
    status: str  # done | diverged | failed
    seconds: float
    message: str = ""


def run_cell(cell: Cell) -> CellOutcome:
    """Train (or continue) one cell, its output going to `<cell>/train.log`."""
    from pretrain.train import TrainingDiverged, train  # the loop pulls in torch, data and optim

    cell.run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (cell.run_dir / LOG_FILE).open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            result = train(cell.config, resume="auto")
        except TrainingDiverged as exc:
            # Deterministic: re-running would diverge again, so the cell counts as finished.
            (cell.run_dir / DIVERGED_FILE).write_text(json.dumps({"message": str(exc)}) + "\n")
            return CellOutcome(cell.name, "diverged", time.perf_counter() - start, str(exc))
        except Exception as exc:  # one broken cell must not stop the others; the traceback is in its log
            traceback.print_exc()
            reason = str(exc).partition("\n")[0]
            return CellOutcome(cell.name, "failed", time.perf_counter() - start, f"{type(exc).__name__}: {reason}")
    val = f"val loss {result.val_loss:.4f}" if result.val_loss is not None else "no val loss"
    return CellOutcome(cell.name, "done", time.perf_counter() - start, val)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def run_study(study: Study, jobs: int = 1) -> list[CellOutcome]:
    """Run every unfinished cell, `jobs` at a time in separate processes (in this process when 1)."""
    from pretrain.checkpoint import check_compatible

    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    todo = []
    for cell in study.cells:
        if (cell.run_dir / "config.yaml").is_file():  # a cell changed since it ran must not be mixed up
            check_compatible(cell.run_dir, cell.config)
        status = cell_status(cell)
        if status in ("done", "diverged"):
            print(f"skip {cell.name}: {status}")
        else:
            todo.append(cell)
    _check_data(todo)
    print(f"study {study.name}: {len(study.cells)} cells, {len(study.cells) - len(todo)} finished, "
          f"{len(todo)} to run with {jobs} job(s); logs in <cell>/{LOG_FILE}")
    outcomes = []

    def report(outcome: CellOutcome) -> None:
        outcomes.append(outcome)
        print(f"[{len(outcomes)}/{len(todo)}] {outcome.name}: {outcome.status} in {outcome.seconds:.0f} s"
              f" ({outcome.message})", flush=True)

    if jobs == 1:
        for cell in todo:
            report(run_cell(cell))
    else:
        # Split the cores between the workers instead of letting each grab them all.
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")  # fork would copy this process's torch threads
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
            for future in as_completed([pool.submit(run_cell, cell) for cell in todo]):
                report(future.result())
    return outcomes


def _check_data(cells: list[Cell]) -> None:
    """Fail before any cell starts when a cell's data has not been prepared."""
    from pretrain.data import load_index

    for data_dir in sorted({c.config.data.dir for c in cells}):
        load_index(Path(data_dir))


# ----------------------------------------------------------------------------- commands


def launch_commands(study: Study) -> list[str]:
    """One `pretrain train` command line per cell, for a cluster scheduler or a shell loop."""
    return [shlex.join(["pretrain", "train", str(study.base), *cell.overrides, "--resume", "auto"])
            for cell in study.cells]


def study_command(args: argparse.Namespace) -> None:
    from pretrain.study_report import write_report

    study = load_study(args.file, args.overrides, args.out_dir)
    if args.print_commands:
        print("\n".join(launch_commands(study)))
        return
    failed: list[CellOutcome] = []
    if not args.report_only:
        failed = [o for o in run_study(study, args.jobs) if o.status == "failed"]
    print(f"report: {write_report(study)}")
    if failed:
        raise UserError(f"{len(failed)} of {len(study.cells)} cells failed ({', '.join(o.name for o in failed[:3])}"
                        f"{', ...' if len(failed) > 3 else ''}); read <cell>/{LOG_FILE}, fix, and re-run to resume")


def add_study_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "study", help="run a grid of training runs (optimizer x warmup x lr x seed) and write a report",
        description="Expand the grid of a study file into training runs (\"cells\"), run the unfinished ones\n"
                    "(finished cells are skipped, interrupted ones resume from their newest checkpoint), then\n"
                    "write report.md and figures/ into the study folder. The file format is described at the\n"
                    "top of configs/study/warmup-free-tiny.yaml.",
        epilog="Examples: pretrain study configs/study/warmup-free-tiny.yaml --jobs 2\n"
               "  pretrain study configs/study/warmup-free-gpt2-124m.yaml --print-commands > cells.txt\n"
               "  pretrain study configs/study/warmup-free-gpt2-124m.yaml --report-only",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="study file, e.g. configs/study/warmup-free-tiny.yaml")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides for every cell, applied after the study's own, e.g. train.device=cuda")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="cells run at once, each in its own process with cores/N threads (default 1: one "
                        "after another in this process)")
    p.add_argument("--out-dir", metavar="DIR", help="study folder (default: the file's out_dir:)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true",
                      help="print one `pretrain train ... --resume auto` line per cell instead of running them")
    mode.add_argument("--report-only", action="store_true",
                      help="only (re)write report.md and figures from the cells' files")
    p.set_defaults(func=study_command)

