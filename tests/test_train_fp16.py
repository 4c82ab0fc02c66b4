"""fp16 training on CPU: the loss scaler's overflows are skipped steps, not divergences.

torch's GradScaler finds its loss scale by overflowing now and then: the unscaled gradient is
non-finite, the update is skipped and the scale halves. These runs start it at a scale the tiny
model's fp16 gradients cannot hold, so the first steps overflow for real.
"""

import functools
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import verify_checkpoint
from pretrain.cli import main
from pretrain.parallel import World
from pretrain.train import StepOutcome, setup, train
from tests.train_utils import tiny_args, tiny_config

FP16 = "train.precision=fp16"
OVERFLOW = re.compile(r"^fp16 loss-scale overflow at step (\d+), update skipped, loss scale now (\S+) ")


def start_scale(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """Every GradScaler built from here on starts at `scale` (torch's default is 2**16)."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=scale))


def overflow_lines(out: str) -> list[tuple[int, float]]:
    return [(int(m[1]), float(m[2])) for m in map(OVERFLOW.match, out.splitlines()) if m]


@pytest.mark.parametrize(("loss", "grad_norm", "scaled", "applied", "overflowed"), [
    (2.0, 1.0, True, True, False),
    (2.0, math.inf, True, False, True),  # the scaler's overflow
    (2.0, math.nan, True, False, True),
    (math.nan, math.nan, True, False, False),  # a non-finite loss diverged, scaled or not
    (math.inf, math.nan, True, False, False),
    (2.0, math.inf, False, False, False),  # no loss scaling: a non-finite gradient diverged
])
def test_an_overflow_is_a_finite_loss_with_a_non_finite_scaled_gradient(loss, grad_norm, scaled, applied,
                                                                       overflowed):
    outcome = StepOutcome(1, 1e-3, loss, grad_norm, scaled)
    assert (outcome.applied, outcome.overflowed) == (applied, overflowed)


def test_fp16_overflows_skip_their_steps_lower_the_scale_and_the_run_goes_on(tiny_data_dir, tmp_path, monkeypatch,
                                                                               capsys):
    init = 2.0 ** 26
    start_scale(monkeypatch, init)
    cfg = tiny_config(tiny_data_dir, tmp_path / "run", FP16, "train.steps=20", "optim.lr=0.1", "checkpoint.every=2",
                      "checkpoint.keep_last=20", "train.eval_every=20")
    with setup(cfg, World(0, 1, 0), torch.device("cpu"), None, None) as fresh:  # the weights before any step
        initial = {k: v.detach().clone() for k, v in fresh.engine.raw_model.state_dict().items()}
    result = train(cfg)  # train.nan_policy=stop, the default
    overflows = overflow_lines(capsys.readouterr().out)
    steps = [step for step, _ in overflows]
    # The first steps overflow one after the other; every overflow halves the scale (torch raises it
    # only after 2000 clean steps).
    assert steps[:4] == [1, 2, 3, 4], overflows
    assert [scale for _, scale in overflows] == [init / 2 ** i for i in range(1, len(overflows) + 1)]
    assert result.step == 20 and sorted(result.losses) == [s for s in range(1, 21) if s not in steps]
    # An overflow step leaves the weights as they were: checkpoints written on the first overflow
    # steps hold the initial weights.
    root = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        saved = load_file(root / f"step_{step:06d}" / "state" / "model.safetensors")
        assert all(torch.equal(saved[k], initial[k]) for k in saved), step
    # The logged scale is the start scale halved once per overflow so far, and the run learns.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["train/loss_scale"] for r in records if "train/loss" in r}
    assert sorted(logged) == sorted(result.losses)
    for step, scale in logged.items():
        assert scale == init / 2 ** sum(1 for s in steps if s < step), step
    first, last = min(result.losses), max(result.losses)
    assert math.isfinite(result.losses[last]) and result.losses[last] < result.losses[first] - 0.05


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_overflowing_on_every_step_stops_after_max_skips_and_keeps_the_run(tiny_data_dir, tmp_path, monkeypatch,
                                                                            capsys, policy):
    start_scale(monkeypatch, 2.0 ** 100)  # still overflows after any number of halvings within the run
    args = tiny_args(tiny_data_dir, tmp_path / "run", FP16, f"train.nan_policy={policy}", "train.max_skips=3",
                     "checkpoint.every=2")
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the fp16 gradient overflowed on 4 steps in a row, up to "
                                               "step 4"), err
    assert "train.max_skips=3" in err[0] and "train.precision=bf16" in err[0]
    assert [step for step, _ in overflow_lines(captured.out)] == [1, 2, 3]  # the 4th stops the run
    # Everything written stays: the checkpoint that fell due on an overflow step (the initial weights) and the logs.
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002"]
    assert str(root / "step_000002") in err[0] and verify_checkpoint(root / "step_000002") is None
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_non_finite_loss_in_fp16_still_stops_under_nan_policy_stop(tiny_data_dir, tmp_path, capsys):
    # An absurd learning rate blows the weights up after the first update: the next loss is non-finite.
    args = tiny_args(tiny_data_dir, tmp_path / "run", FP16, "optim.name=adamw", "optim.lr=1e30",
                     "checkpoint.every=1", "train.grad_clip=0")
    assert main(["train", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "loss became" in err[0] and "train.nan_policy=stop" in err[0], err
    assert not overflow_lines(captured.out)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest in err[0]


def test_an_fp16_run_resumes_exactly_with_its_loss_scale(tiny_data_dir, tmp_path, monkeypatch, capsys):
    start_scale(monkeypatch, 2.0 ** 24)  # a fresh scaler would overflow again after the resume
    run = ["train.steps=12", "optim.lr=0.1", "checkpoint.every=5"]
    straight = train(tiny_config(tiny_data_dir, tmp_path / "a", FP16, *run))
    cfg = tiny_config(tiny_data_dir, tmp_path / "b", FP16, *run)
    first = train(cfg, stop_at=5)
    second = train(cfg, resume="auto")
    assert len(overflow_lines(capsys.readouterr().out)) >= 2  # the scale really moved
    assert {**first.losses, **second.losses} == straight.losses
    a = load_file(straight.checkpoint / "state" / "model.safetensors")
    b = load_file(second.checkpoint / "state" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    scaler = torch.load(second.checkpoint / "state" / "scaler.pt", weights_only=True)
    assert scaler["scale"] == torch.load(straight.checkpoint / "state" / "scaler.pt", weights_only=True)["scale"]
