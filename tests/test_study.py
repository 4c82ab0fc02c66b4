"""`pretrain study`: grid expansion and cell names, launch commands, an end-to-end micro-study
(parallel cells, resume of an interrupted cell, skip of finished ones), divergence, the report."""

import argparse
import itertools
import json
import math
import shlex
import statistics
from pathlib import Path

import pytest
import yaml

from pretrain.cli import build_parser
from pretrain.config import load_config
from pretrain.errors import UserError
from pretrain.study import add_study_parser, format_value, load_study
from pretrain.study_report import count_spikes, half_settled, is_diverged
from pretrain.train import train
from tests.train_utils import REPO, TINY_OVERRIDES

STUDIES = REPO / "configs" / "study"
STEPS = 4  # of each micro-study cell


def write_study(tmp_path: Path, data_dir: Path, grid: dict, per_optimizer: dict | None = None,
                overrides: tuple[str, ...] = (), name: str = "study") -> Path:
    """A study over the tiny test model; its folder is tmp_path/<name>-out."""
    spec = {"base": str(REPO / "configs" / "tiny-cpu.yaml"), "out_dir": str(tmp_path / f"{name}-out"),
            "overrides": [*TINY_OVERRIDES, f"data.dir={data_dir}", *overrides], "grid": grid}
    if per_optimizer:
        spec["per_optimizer"] = per_optimizer
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def study_cli(*argv: str) -> None:
    """`pretrain study ARGV`, through the subparser this module contributes to the CLI."""
    parser = argparse.ArgumentParser(prog="pretrain")
    add_study_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["study", *argv])
    args.func(args)


def markdown_rows(report: str) -> dict[str, dict[str, str]]:
    """Cell name -> {column: text} of the per-cell table of a report."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| cell |"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


# ----------------------------------------------------------------------------- grid and names


def test_tiny_study_is_24_cells_with_readable_stable_names():
    study = load_study(STUDIES / "warmup-free-tiny.yaml")
    names = [c.name for c in study.cells]
    assert len(names) == len(set(names)) == 24
    assert "rv-adamw_wu0_lr3e-3_s0" in names and "lion_wu8_lr3e-4_s0" in names
    for cell in study.cells:
        cfg = cell.config
        steps = cfg.train.steps
        assert cfg.schedule.warmup_steps in (0, round(0.05 * steps))
        assert cell.name == f"{cfg.optim.name}_wu{cfg.schedule.warmup_steps}_lr{format_value(cfg.optim.lr)}_s0"
        assert cfg.train.out_dir == str(study.out_dir / "cells" / cell.name)
    lrs = {opt: sorted({c.config.optim.lr for c in study.cells if c.config.optim.name == opt})
           for opt in ("adamw", "rv-adamw", "lion", "rv-lion")}
    assert lrs["adamw"] == lrs["rv-adamw"] == [1e-3, 3e-3, 1e-2]
    assert lrs["lion"] == lrs["rv-lion"] == [1e-4, 3e-4, 1e-3]


def test_gpt2_study_is_the_paper_grid():
    study = load_study(STUDIES / "warmup-free-gpt2-124m.yaml")
    assert len(study.cells) == 20
    for cell in study.cells:
        cfg = cell.config
        assert (cfg.model.arch, cfg.model.preset) == ("gpt2", "gpt2-124m")
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1
        assert cfg.train.steps == 5000 and cfg.schedule.name == "cosine" and cfg.schedule.min_lr_ratio == 0.0
        assert cfg.global_batch_size * cfg.data.seq_len == 512 * 1024  # ~0.5M tokens per step
    assert {c.config.schedule.warmup_steps for c in study.cells} == {0, 250}
    assert sorted({round(c.config.optim.lr / 6e-4, 6) for c in study.cells}) == [1, 2, 4, 8, 16]


def test_format_value_is_compact():
    values = (0.003, 3e-3, 1.5e-4, 0.0018000000000000002, 1e-2, 0.1, 250, 250.0, 1e30, True, "rv-adamw")
    assert [format_value(v) for v in values] == [
        "3e-3", "3e-3", "1.5e-4", "1.8e-3", "1e-2", "1e-1", "250", "250", "1e30", "true", "rv-adamw"]


def test_per_optimizer_axes_and_fractional_warmup(tmp_path):
    path = write_study(tmp_path, tmp_path / "data", {"optim.name": ["adamw", "rv-adamw"],
                                                     "schedule.warmup_steps": [0, 0.25], "train.seed": [0, 1]},
                       per_optimizer={"adamw": {"optim.lr": [1e-3, 3e-3]}})
    study = load_study(path)
    names = [c.name for c in study.cells]
    assert len(names) == 2 * 2 * 2 + 2 * 2  # adamw has the extra lr axis, rv-adamw keeps the base lr
    assert "adamw_wu2_lr3e-3_s1" in names and "rv-adamw_wu2_s0" in names  # 0.25 of train.steps=8 is 2 steps
    assert load_study(path).cells == study.cells  # stable


@pytest.mark.parametrize("change, message", [
    ({"grid": {"optim.lrr": [1e-3]}}, "did you mean optim.lr?"),
    ({"grid": {"optim.lr": 1e-3}}, "must be a non-empty list"),
    ({"grid": {"schedule.warmup_steps": [1.5]}}, "neither a whole number of steps nor a fraction"),
    ({"grid": {"train.out_dir": ["x"]}}, "set by the study for each cell"),
    ({"grid": {"train.steps": [4]}, "overrides": ["train.steps=6"]}, "is a grid axis"),
    ({"grid": {"optim.name": ["adamw"]}, "per_optimizer": {"lion": {"optim.lr": [1e-4]}}}, "matches no optimizer"),
    ({"gird": {}}, "unknown key(s) gird"),
    ({"base": None}, "needs `base:`"),
])
def test_bad_study_files_give_one_line_errors(tmp_path, change, message):
    spec = {"base": str(REPO / "configs" / "tiny-cpu.yaml"), "grid": {"optim.lr": [1e-3]}, **change}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError) as err:
        load_study(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_print_commands_gives_one_train_command_per_cell(tmp_path, capsys):
    path = STUDIES / "warmup-free-tiny.yaml"
    study_cli(str(path), "--out-dir", str(tmp_path / "s"), "--print-commands")
    lines = capsys.readouterr().out.strip().splitlines()
    study = load_study(path, out_dir=tmp_path / "s")
    assert len(lines) == len(study.cells) == 24
    for line, cell in zip(lines, study.cells, strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["pretrain", "train"]
        args = build_parser().parse_args(argv[1:])  # the `pretrain train` CLI accepts it as is
        assert args.resume == "auto"
        assert load_config(args.config, args.overrides) == cell.config
    assert not (tmp_path / "s").exists()  # nothing run, nothing written


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def micro_study(tiny_data_dir, tmp_path_factory):
    """A 2x2 study (optimizer x lr) run with --jobs 2, one cell of which was interrupted at step 2."""
    tmp = tmp_path_factory.mktemp("micro")
    path = write_study(tmp, tiny_data_dir, {"optim.name": ["adamw", "rv-adamw"], "optim.lr": [1e-3, 1e-2],
                                            "train.seed": [0]},
                       overrides=(f"train.steps={STEPS}", "train.eval_every=2", "checkpoint.every=100"))
    study = load_study(path)
    interrupted = study.cells[1]
    train(interrupted.config, stop_at=2)  # as if the study had been killed after that cell's step-2 checkpoint
    reference = train(load_config(study.base, [*interrupted.overrides, f"train.out_dir={tmp / 'reference'}"]))
    study_cli(str(path), "--jobs", "2")
    return study, interrupted, reference


def test_every_cell_is_a_complete_run(micro_study):
    study, _, _ = micro_study
    assert len(study.cells) == 4
    for cell in study.cells:
        latest = (cell.run_dir / "checkpoints" / "latest").read_text().strip()
        assert latest == f"step_{STEPS:06d}"
        ckpt = cell.run_dir / "checkpoints" / latest
        assert (ckpt / "model" / "model.safetensors").is_file()
        assert json.loads((ckpt / "rotation" / "summary.json").read_text())["step"] == STEPS
        assert (cell.run_dir / "metrics.jsonl").is_file()
    for name in ("report.md", "figures/lr_sensitivity.png", "figures/loss_curves.png", "figures/rotation.png"):
        assert (study.out_dir / name).is_file(), name


def test_interrupted_cell_resumes_to_the_uninterrupted_losses(micro_study):
    _, cell, reference = micro_study
    assert "resumed from" in (cell.run_dir / "train.log").read_text()
    records = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    assert losses == reference.losses


def test_rerun_skips_finished_cells(micro_study, capsys):
    study, _, _ = micro_study
    files = [p for c in study.cells for p in c.run_dir.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    study_cli(str(study.path))
    out = capsys.readouterr().out
    assert all(f"skip {c.name}: done" in out for c in study.cells), out
    assert "0 to run" in out
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_report_rows_come_from_each_cells_metrics(micro_study):
    study, _, _ = micro_study
    rows = markdown_rows((study.out_dir / "report.md").read_text())
    assert sorted(rows) == sorted(c.name for c in study.cells)
    for cell in study.cells:
        # Recomputed here from the raw files, independently of pretrain.study_report.
        records = [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]
        vals = [r["val/loss"] for r in records if "val/loss" in r]
        train_losses = [r["train/loss"] for r in records if "train/loss" in r]
        speeds = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r]
        summary = json.loads((cell.run_dir / "checkpoints" / f"step_{STEPS:06d}" / "rotation" / "summary.json")
                             .read_text())
        row = rows[cell.name]
        assert row["status"] == "done" and row["last step"] == str(STEPS)
        assert float(row["final val loss"]) == pytest.approx(vals[-1], abs=5e-5)
        assert float(row["best val loss"]) == pytest.approx(min(vals), abs=5e-5)
        assert float(row["final train loss"]) == pytest.approx(train_losses[-1], abs=5e-5)
        assert float(row["tokens/s"].replace(",", "")) == pytest.approx(statistics.median(speeds), abs=0.5)
        expected_eq = summary["time_to_equilibrium"]
        assert row["time to equilibrium (step)"] == ("–" if expected_eq is None else str(expected_eq))
        decayed = [layer for layer in summary["layers"] if layer["weight_decay"]]
        settled = sum(layer["in_equilibrium"] for layer in decayed)
        assert row["layers in equilibrium at the end"] == f"{settled}/{len(decayed)}"
        assert row["diverged"] == ("yes" if train_losses[-1] > train_losses[0] else "no")


def test_report_only_regenerates_the_same_report(micro_study):
    study, _, _ = micro_study
    report = study.out_dir / "report.md"
    text = report.read_text()
    report.unlink()
    study_cli(str(study.path), "--report-only")
    assert report.read_text() == text


def test_a_changed_cell_config_is_refused(micro_study):
    study, _, _ = micro_study
    with pytest.raises(UserError, match="incompatible config"):
        study_cli(str(study.path), "optim.weight_decay=0.2")


def test_diverged_cell_is_recorded_reported_and_skipped(tiny_data_dir, tmp_path, capsys):
    path = write_study(tmp_path, tiny_data_dir, {"optim.name": ["adamw"], "optim.lr": [1e30]},
                       overrides=("train.grad_clip=0",))
    study_cli(str(path))
    out = capsys.readouterr().out
    assert "adamw_lr1e30: diverged" in out
    row = markdown_rows((tmp_path / "study-out" / "report.md").read_text())["adamw_lr1e30"]
    assert row["status"] == "diverged" and row["diverged"] == "yes"
    study_cli(str(path))
    assert "skip adamw_lr1e30: diverged" in capsys.readouterr().out


# ----------------------------------------------------------------------------- definitions


@pytest.mark.parametrize("losses, spikes", [
    ([5.0, 4.0, 3.0, 2.0], 0),
    ([4.0, 2.0, 3.1, 2.0, 1.9], 1),  # 3.1 > 1.5 x 2.0
    ([4.0, 2.0, 3.1, 3.2, 1.9, 2.9, 1.8], 2),  # one run of two high steps, then another one
    ([4.0, 2.0, None, 2.0], 1),  # non-finite counts as high
    ([4.0, 2.0, math.nan], 1),
])
def test_spike_count(losses, spikes):
    assert count_spikes(losses) == spikes


def test_half_settled_is_the_median_layers_time():
    assert half_settled([10, None, 30, 20]) == 20  # 2 of 4 layers stay in equilibrium from step 20 on
    assert half_settled([None, None, 5]) is None
    assert half_settled([]) is None


def test_divergence_rule():
    assert not is_diverged([5.0, 3.0, 2.0], stopped_non_finite=False)
    assert is_diverged([5.0, 3.0, 6.0], stopped_non_finite=False)  # ended above its start
    assert is_diverged([5.0, None, 2.0], stopped_non_finite=False)
    assert is_diverged([5.0, 3.0], stopped_non_finite=True)
