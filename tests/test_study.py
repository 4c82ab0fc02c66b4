"""`pretrain study`: grid expansion and cell names, launch commands, an end-to-end micro-study
(parallel cells, resume of an interrupted cell, skip of finished ones), divergence, the report and
its statistics (recomputed here from the cells' raw files with numpy)."""

import itertools
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pretrain.cli import build_parser
from pretrain.config import OptimConfig, load_config
from pretrain.errors import UserError
from pretrain.metrics import load_rotation
from pretrain.study import format_value, load_study
from pretrain.study_stats import paired_difference, t_quantile
from pretrain.study_summary import count_spikes, early_peak, half_settled, is_diverged
from pretrain.train import train
from tests.train_utils import REPO, TINY_OVERRIDES

STUDIES = REPO / "configs" / "study"
CPU_STUDY = STUDIES / "warmup-free-cpu.yaml"
STEPS = 4  # of each micro-study cell
WARMUP = 2  # steps, the micro-study's warmup setting
# Two-sided 95% quantiles of Student's t (textbook tables), by degrees of freedom.
T_975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 9: 2.2622, 30: 2.0423}


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
    """`pretrain study ARGV` through the real CLI parser, with errors raised rather than printed."""
    args = build_parser().parse_args(["study", *argv])
    args.func(args)


def markdown_rows(report: str, first_column: str = "cell") -> dict[str, dict[str, str]]:
    """First cell -> {column: text} of the report table whose header starts with `first_column`."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table[2:]]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


def raw_records(cell) -> list[dict]:
    return [json.loads(line) for line in (cell.run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- grid and names


def test_cpu_study_has_seeds_and_a_wide_lr_grid_per_optimizer():
    study = load_study(CPU_STUDY)
    names = [c.name for c in study.cells]
    assert len(names) == len(set(names)) == 4 * 4 * 2 * 3  # optimizers x lrs x warmup x seeds
    assert "rv-adamw_wu0_lr1e-1_s0" in names and "lion_wu20_lr3.16e-3_s2" in names
    for cell in study.cells:
        cfg = cell.config
        assert cfg.schedule.warmup_steps in (0, round(0.2 * cfg.train.steps))
        assert cfg.optim.rotational_embeddings  # the default, as in the paper's code
        assert cell.name == (f"{cfg.optim.name}_wu{cfg.schedule.warmup_steps}_lr{format_value(cfg.optim.lr)}"
                             f"_s{cfg.train.seed}")
        assert cfg.train.out_dir == str(study.out_dir / "cells" / cell.name)
    for optimizer in ("adamw", "rv-adamw", "lion", "rv-lion"):
        cells = [c for c in study.cells if c.config.optim.name == optimizer]
        lrs = sorted({c.config.optim.lr for c in cells})
        # 1.5 decades in half-decade steps written to 3 significant digits (10^0.5 ~ 3.16)
        assert math.log10(lrs[-1] / lrs[0]) == pytest.approx(1.5, abs=1e-3), (optimizer, lrs)
        assert len(lrs) == 4
        settings = {c.label(("train.seed",)) for c in cells}
        assert all(sum(c.label(("train.seed",)) == s for c in cells) >= 3 for s in settings)


def test_embeddings_ablation_mirrors_the_main_studys_top_lr_cells():
    main = {c.name: c.config for c in load_study(CPU_STUDY).cells}
    ablation = load_study(STUDIES / "rv-embeddings-cpu.yaml").cells
    assert len(ablation) == 6
    for cell in ablation:
        cfg = cell.config
        twin = main[f"{cfg.optim.name}_wu0_lr{format_value(cfg.optim.lr)}_s{cfg.train.seed}"]
        assert not cfg.optim.rotational_embeddings and twin.optim.rotational_embeddings
        assert twin.optim.lr == max(c.optim.lr for c in main.values() if c.optim.name == cfg.optim.name)
        cfg.optim.rotational_embeddings, cfg.train.out_dir = True, twin.train.out_dir
        assert cfg == twin  # the same recipe, seed and lr: only the embedding rule differs


def test_gpt2_study_is_the_papers_owt_setting():
    study = load_study(STUDIES / "warmup-free-gpt2-124m.yaml")
    assert len(study.cells) == 2 * 2 * 7 * 3
    for cell in study.cells:
        cfg = cell.config
        assert (cfg.model.arch, cfg.model.preset) == ("gpt2", "gpt2-124m")
        assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0.1 and cfg.train.grad_clip == 1.0
        assert cfg.train.steps == 5000 and cfg.schedule.name == "cosine" and cfg.schedule.min_lr_ratio == 0.0
        assert cfg.global_batch_size * cfg.data.seq_len == 12 * 40 * 1024  # the paper's 491,520 tokens per step
        assert cfg.optim.rotational_embeddings  # wte and wpe rotate too, per token / position row
        assert cfg.model.linear_gains == cfg.optim.name.startswith("rv-")  # the RV runs' learnable gains
    assert {c.config.schedule.warmup_steps for c in study.cells} == {0, 250}
    assert sorted({round(c.config.optim.lr / 6e-4, 6) for c in study.cells}) == [0.5, 1, 2, 4, 8, 16, 32]
    assert sorted({c.config.train.seed for c in study.cells}) == [42, 43, 44]


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
    study_cli(str(CPU_STUDY), "--out-dir", str(tmp_path / "s"), "--print-commands")
    lines = capsys.readouterr().out.strip().splitlines()
    study = load_study(CPU_STUDY, out_dir=tmp_path / "s")
    assert len(lines) == len(study.cells)
    for line, cell in zip(lines, study.cells, strict=True):
        argv = shlex.split(line)
        assert argv[:2] == ["pretrain", "train"]
        args = build_parser().parse_args(argv[1:])  # the `pretrain train` CLI accepts it as is
        assert args.resume == "auto"
        assert load_config(args.config, args.overrides) == cell.config
    assert not (tmp_path / "s").exists()  # nothing run, nothing written


def test_print_commands_with_a_launcher_for_a_scheduler_array(tmp_path, capsys):
    path = STUDIES / "warmup-free-gpt2-124m.yaml"
    study_cli(str(path), "data.dir=/scratch/owt gpt2", "train.grad_accum=5", "--print-commands",
              "--launcher", "bash launch/slurm/node.sh")
    lines = capsys.readouterr().out.strip().splitlines()
    study = load_study(path, ["data.dir=/scratch/owt gpt2", "train.grad_accum=5"])
    assert len(lines) == len(study.cells)
    for line, cell in zip(lines, study.cells, strict=True):  # line i is task i of the array
        argv = shlex.split(line)
        assert argv[:2] == ["bash", "launch/slurm/node.sh"] and argv[-2:] == ["--resume", "auto"]
        # node.sh hands its arguments to `torchrun -m pretrain train`: the train CLI must take them
        args = build_parser().parse_args(["train", *argv[2:]])
        cfg = load_config(args.config, args.overrides)
        assert cfg == cell.config and cfg.data.dir == "/scratch/owt gpt2" and cfg.train.grad_accum == 5
    with pytest.raises(UserError, match="--launcher is empty"):
        study_cli(str(path), "--print-commands", "--launcher", " ")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def micro_study(tiny_data_dir, tmp_path_factory):
    """A 2-seed x 2-warmup RV-AdamW study run with --jobs 2, one cell of which was interrupted at step 2."""
    tmp = tmp_path_factory.mktemp("micro")
    path = write_study(tmp, tiny_data_dir, {"optim.name": ["rv-adamw"], "schedule.warmup_steps": [0, WARMUP],
                                            "train.seed": [0, 1]},
                       overrides=(f"train.steps={STEPS}", "train.eval_every=2", "checkpoint.every=100",
                                  "optim.lr=1e-2"))
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
    for name in ("report.md", "lr_sensitivity.png", "early_loss.png", "loss_curves.png", "transient.png",
                 "rotation.png"):
        assert (study.out_dir / (name if name.endswith(".md") else f"figures/{name}")).is_file(), name


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


def test_paired_warmup_differences_recomputed_from_the_raw_metrics(micro_study):
    study, _, _ = micro_study
    report = (study.out_dir / "report.md").read_text()
    final_val, peak = {}, {}
    for cell in study.cells:  # numbers straight from metrics.jsonl, independently of pretrain.study_*
        records = raw_records(cell)
        losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
        window = max(1, math.ceil(0.1 * STEPS))
        key = (cell.config.schedule.warmup_steps, cell.config.train.seed)
        final_val[key] = [r["val/loss"] for r in records if "val/loss" in r][-1]
        peak[key] = max(loss for step, loss in losses if step <= window) / losses[0][1]
    row = markdown_rows(report, "optimizer and lr")["rv-adamw"]
    assert row["warmup"] == str(WARMUP) and row["seeds"] == "2"
    for values, column, interval, digits in (
            (final_val, "final val loss, no warmup − warmup", "95% interval of the loss", 4),
            (peak, "early peak, no warmup − warmup", "95% interval of the early peak", 3)):
        d = np.array([values[(0, seed)] - values[(WARMUP, seed)] for seed in (0, 1)])
        half = T_975[1] * d.std(ddof=1) / np.sqrt(len(d))
        low, high = (float(x) for x in row[interval].strip("[]").split(","))
        tolerance = 0.6 * 10 ** -digits + 1e-4 * half  # printed digits; the t quantile to 5 significant digits
        assert float(row[column]) == pytest.approx(d.mean(), abs=0.6 * 10 ** -digits)
        assert (low, high) == (pytest.approx(d.mean() - half, abs=tolerance), pytest.approx(d.mean() + half,
                                                                                              abs=tolerance))
        if column.startswith("final"):
            expected = ("no difference" if d.mean() - half <= 0 <= d.mean() + half else
                        "warmup better" if d.mean() > 0 else "no warmup better")
            assert row["reading"] == expected
    settings = markdown_rows(report, "setting")
    for warmup in (0, WARMUP):
        vals = np.array([final_val[(warmup, seed)] for seed in (0, 1)])
        mean, std = (float(x) for x in settings[f"rv-adamw_wu{warmup}"]["final val loss"].split(" ± "))
        assert (mean, std) == (pytest.approx(vals.mean(), abs=6e-5), pytest.approx(vals.std(ddof=1), abs=6e-5))


def test_rv_adamw_rotates_the_embedding_at_the_equilibrium_rate_from_step_1(micro_study):
    study, _, _ = micro_study
    assert OptimConfig().rotational_embeddings  # the default: embeddings rotate per token row
    for cell in study.cells:
        summary = load_rotation(cell.run_dir / "checkpoints" / f"step_{STEPS:06d}" / "rotation").summary
        embeddings = [layer["name"] for layer in summary["layers"] if layer["kind"] == "embedding"]
        assert embeddings and all(layer["rotational"] for layer in summary["layers"] if layer["kind"] == "embedding")
        step1 = next(r for r in raw_records(cell) if r["step"] == 1)
        for name in embeddings:
            assert step1[f"rotation/ratio/{name}"] == pytest.approx(1.0, abs=1e-3), (cell.name, name)


def test_study_modules_import_without_pyplot_torch_or_a_cycle():
    code = ("import sys, matplotlib\n"
            "import pretrain.cli, pretrain.study\n"
            "assert 'torch' not in sys.modules  # `pretrain --help` stays instant\n"
            "assert not [m for m in sys.modules if m.startswith('pretrain.study_')]\n"
            "import pretrain.study_report\n"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
            "print(matplotlib.get_backend())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={"MPLBACKEND": "svg", "PATH": "", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"  # the process-wide backend is left alone


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


def test_early_peak_is_the_first_tenth_over_the_initial_loss():
    points = [(1, 9.0), (2, 16.2), (3, 12.0), (11, 20.0), (20, 5.0)]
    assert early_peak(points, steps=100) == pytest.approx(16.2 / 9.0)  # steps 1..10 only
    assert early_peak(points, steps=200) == pytest.approx(20.0 / 9.0)  # steps 1..20
    assert early_peak([(1, 9.0), (2, None)], steps=20) == math.inf
    assert early_peak([], steps=20) is None


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=1e-4)


def test_paired_difference_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(5.0, 0.1, 4), rng.normal(4.9, 0.1, 4)
    diff = paired_difference(dict(enumerate(a)), {**dict(enumerate(b)), 7: 1.0})  # seed 7 has no partner
    d = a - b
    half = T_975[3] * d.std(ddof=1) / 2.0
    assert diff.seeds == 4 and diff.mean == pytest.approx(d.mean(), rel=1e-12)
    assert (diff.low, diff.high) == (pytest.approx(d.mean() - half, rel=1e-4), pytest.approx(d.mean() + half,
                                                                                             rel=1e-4))
    one = paired_difference({0: 2.0}, {0: 1.5, 1: 3.0})
    assert (one.seeds, one.mean, one.low, one.significant) == (1, 0.5, None, False)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_half_settled_is_the_median_layers_time():
    assert half_settled([10, None, 30, 20]) == 20  # 2 of 4 layers stay in equilibrium from step 20 on
    assert half_settled([None, None, 5]) is None
    assert half_settled([]) is None


def test_divergence_rule():
    assert not is_diverged([5.0, 3.0, 2.0], stopped_non_finite=False)
    assert is_diverged([5.0, 3.0, 6.0], stopped_non_finite=False)  # ended above its start
    assert is_diverged([5.0, None, 2.0], stopped_non_finite=False)
    assert is_diverged([5.0, 3.0], stopped_non_finite=True)
