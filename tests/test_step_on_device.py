"""The optimizer step queued before the loss and norm are read (TorchEngine._step_on_device) against
the step that reads them first: same clipping, same skips, same training."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import pretrain.parallel.engine as engine_module
import pretrain.train
from pretrain.config import OptimConfig
from pretrain.logger import read_metrics
from pretrain.metrics import RotationTracker, fused_sums
from pretrain.metrics.history import LAYER_METRICS
from pretrain.metrics.sources import FusedSource, ModelSource
from pretrain.optim.builder import build_optimizer
from pretrain.optim.rotational import RotationalOptimizer
from pretrain.parallel.engine import SingleEngine
from pretrain.parallel.host_copy import HostCopy
from pretrain.parallel.world import World
from pretrain.params import classify_parameters
from pretrain.train import _tracker_source, train
from tests.test_metrics_training import tiny_gpt2
from tests.train_utils import tiny_config

# The on-device path divides the gradient by (norm + 1e-6) / max_norm where the synced one
# multiplies it by max_norm / (norm + 1e-6): equal to rounding.
LOSS_RTOL = 1e-5
WEIGHT_RTOL = 1e-5


# torch's fused AdamW, and ours (plain biases, rotational matrices) in its Triton kernel, which
# runs in Triton's interpreter without a GPU (tests/conftest.py).
OPTIMIZERS = ["torch-adamw", "rv-adamw", "rv-lion", "sgdm"]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _optimizer(name: str, params, fused: bool = True) -> torch.optim.Optimizer:
    if name == "torch-adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused, foreach=not fused)
    rule = name.removeprefix("rv-")
    rotational = name.startswith("rv-")
    return RotationalOptimizer([{"params": list(params), "rotational": None if rotational else False}], rule=rule,
                               lr=1e-2 if rule != "lion" else 1e-3, weight_decay=0.1, fused=fused)


def _engine(name: str = "torch-adamw", fused: bool = True, max_norm: float = 1.0) -> tuple[SingleEngine,
                                                                                           torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(DEVICE)
    return SingleEngine(model, _optimizer(name, model.parameters(), fused), World(0, 1, 0), torch.float32,
                        max_norm), model


def _count_queued_steps(monkeypatch) -> list[int]:
    """A list that grows by one each time an engine takes the queued step (`_step_on_device`)."""
    queued: list[int] = []
    step_on_device = SingleEngine._step_on_device
    monkeypatch.setattr(SingleEngine, "_step_on_device",
                        lambda engine, *args: queued.append(1) or step_on_device(engine, *args))
    return queued


def _backward(model: torch.nn.Module, scale: float = 1.0) -> torch.Tensor:
    x = torch.linspace(-1, 1, 32, device=DEVICE).view(4, 8)
    loss = (model(x) * scale).square().mean()
    loss.backward()
    return loss.detach()


def _state(engine: SingleEngine, model: torch.nn.Module) -> list[torch.Tensor]:
    """Weights and every optimizer state tensor (moments, step counts, per-neuron norms and averages)."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        state = engine.optimizer.state.get(p, {})
        tensors += [state[k].clone() for k in sorted(state)]
    return tensors


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("max_norm", [1e-3, 1.0, 0.0])  # clipped, not clipped, clipping off
def test_queued_step_equals_the_synced_step(name, max_norm):
    queued, model_q = _engine(name, max_norm=max_norm)
    synced, model_s = _engine(name, max_norm=max_norm)
    assert queued._decides_on_device and not _engine(name, fused=False)[0]._decides_on_device
    synced._decides_on_device = False  # the path that reads the loss and norm first
    for _ in range(5):
        loss_q, norm_q = queued.step(_backward(model_q, 30.0))
        loss_s, norm_s = synced.step(_backward(model_s, 30.0))
        assert loss_q == pytest.approx(loss_s, rel=LOSS_RTOL) and norm_q == pytest.approx(norm_s, rel=LOSS_RTOL)
        assert all(p.grad is None for p in model_q.parameters())
    for a, b in zip(_state(queued, model_q), _state(synced, model_s), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("bad", ["gradient", "loss"])
def test_a_non_finite_step_changes_nothing(name, bad):
    engine, model = _engine(name)
    engine.step(_backward(model))
    before = _state(engine, model)
    loss = _backward(model)
    if bad == "gradient":
        next(model.parameters()).grad[0, 0] = math.nan
    else:
        loss = torch.tensor(math.inf, device=DEVICE)
    value, norm = engine.step(loss)
    assert math.isnan(norm) and (math.isfinite(value) == (bad == "gradient"))
    for a, b in zip(before, _state(engine, model), strict=True):
        assert torch.equal(a, b)  # weights, moments and the step count
    assert all(p.grad is None for p in model.parameters())
    engine.step(_backward(model))  # and the next step is an ordinary one
    assert int(engine.optimizer.state[next(model.parameters())]["step"]) == 2


@pytest.mark.parametrize("rule", ["adamw", "lion"])
def test_eager_tensors_read_the_flags_on_the_host(rule):
    """Where a tensor does not take the Triton step, the optimizer reads the flags itself: skip, or divide."""
    flagged, model_f = _engine(f"rv-{rule}", fused=False)
    plain, model_p = _engine(f"rv-{rule}", fused=False)
    for skip in (0.0, 1.0, 0.0):
        _backward(model_f, 30.0)
        _backward(model_p, 30.0)
        before = _state(plain, model_p)
        flagged.optimizer.found_inf = torch.tensor(skip, device=DEVICE)
        flagged.optimizer.grad_scale = torch.tensor(4.0, device=DEVICE)
        flagged.optimizer.step()
        if not skip:
            for p in model_p.parameters():
                p.grad /= 4.0
            plain.optimizer.step()
        else:
            flagged.optimizer.rewind_step()
        for a, b in zip(_state(flagged, model_f), _state(plain, model_p), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
        if skip:
            assert all(torch.equal(a, b) for a, b in zip(before, _state(flagged, model_f), strict=True))
        flagged.optimizer.zero_grad()
        plain.optimizer.zero_grad()


# Measured every `every` steps: each run has measured steps that clip (norm > train.grad_clip=1), so its
# queued capture takes the divisor (torch's AdamW: ModelSource; ours: the kernel).
@pytest.mark.parametrize("optim, every", [("adamw", 3), ("rv-adamw", 5)])
def test_training_with_the_queued_step_equals_the_synced_one(tiny_data_dir, tmp_path, monkeypatch, optim, every):
    """20 steps of the tiny recipe with a fused step (torch's AdamW; ours in Triton's interpreter),
    rotation metrics measured (queued too): the same losses, weights and rotation metrics as with every
    step synced."""
    args = [f"optim.name={optim}", "optim.fused=true", "optim.lr=1e-2", "train.steps=20", "checkpoint.every=20",
            "train.eval_every=20", f"logging.rotation_every={every}"]
    queued_steps = _count_queued_steps(monkeypatch)
    queued = train(tiny_config(tiny_data_dir, tmp_path / "queued", *args))
    assert len(queued_steps) == 20  # the measured steps too
    monkeypatch.setattr(engine_module, "takes_device_flags", lambda optimizer: False)
    synced = train(tiny_config(tiny_data_dir, tmp_path / "synced", *args))
    assert sorted(queued.losses) == list(range(1, 21))
    records = {path: [r for r in read_metrics(tmp_path / path)] for path in ("queued", "synced")}
    norms = [r["train/grad_norm"] for r in records["queued"] if "train/grad_norm" in r]
    assert max(norms) > 1.0 > min(norms)  # steps with and without clipping (train.grad_clip=1)
    measured = [r["train/grad_norm"] for r in records["queued"] if any(k.startswith("rotation/") for k in r)]
    assert max(measured) > 1.0 > min(measured)  # measured steps with and without clipping too
    for step, value in synced.losses.items():
        assert queued.losses[step] == pytest.approx(value, rel=LOSS_RTOL), step
    rotation = {path: [{k: v for k, v in r.items() if k.startswith("rotation/")} for r in rows]
                for path, rows in records.items()}
    rotation = {path: [r for r in rows if r] for path, rows in rotation.items()}
    assert len(rotation["queued"]) == len(rotation["synced"]) == len(measured) == 1 + 20 // every  # and step 1
    for got, want in zip(rotation["queued"], rotation["synced"], strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    got = load_file(queued.checkpoint / "model" / "model.safetensors")
    want = load_file(synced.checkpoint / "model" / "model.safetensors")
    for name, w in want.items():
        assert ((got[name] - w).norm() / w.norm()).item() <= WEIGHT_RTOL, name


def test_training_discards_a_measured_step_it_drops_and_measuring_changes_no_weight(tiny_data_dir, tmp_path,
                                                                                     monkeypatch):
    """A NaN loss at a measured step (step 4, metrics every 2): the queued capture is discarded and
    nothing of step 4 is logged. Measuring queues its capture beside the same update, so the run
    that measures every 3 steps (not step 4) has the same weights, losses and step-6 metrics."""
    forward_backward = pretrain.train.forward_backward

    def nan_at_4(engine, loader, step, *args):
        loss = forward_backward(engine, loader, step, *args)
        return torch.full_like(loss, math.nan) if step == 4 else loss

    monkeypatch.setattr(pretrain.train, "forward_backward", nan_at_4)
    discarded = []
    discard = RotationTracker.discard
    monkeypatch.setattr(RotationTracker, "discard", lambda tracker: discarded.append(1) or discard(tracker))
    args = ["optim.name=adamw", "optim.fused=true", "train.nan_policy=skip", "train.steps=8", "checkpoint.every=8",
            "train.eval_every=8"]
    runs = {every: train(tiny_config(tiny_data_dir, tmp_path / f"every{every}", *args,
                                     f"logging.rotation_every={every}")) for every in (2, 3)}
    assert len(discarded) == 1  # step 4 of the run that measures every 2
    assert runs[2].losses == runs[3].losses and sorted(runs[2].losses) == [1, 2, 3, 5, 6, 7, 8]
    rotation = {every: {r["step"]: {k: v for k, v in r.items() if k.startswith("rotation/")}
                        for r in read_metrics(tmp_path / f"every{every}")} for every in (2, 3)}
    assert [s for s, r in rotation[2].items() if r] == [1, 2, 6, 8]  # 4 was dropped
    assert rotation[2][6] and rotation[2][6] == rotation[3][6]
    got = load_file(runs[2].checkpoint / "model" / "model.safetensors")
    want = load_file(runs[3].checkpoint / "model" / "model.safetensors")
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["torch-adamw", "rv-adamw"])
def test_a_queued_step_waits_for_nothing_before_its_read(name, monkeypatch):
    """Under CUDA's sync debug mode, a steady-state queued step makes no synchronizing call until it
    reads its numbers (which wait on their own copy's event only)."""
    engine, model = _engine(name)
    engine.step(_backward(model))  # the first step plans and compiles
    value, norm = _step_checking_syncs(engine, _backward(model), None, monkeypatch)
    assert math.isfinite(value) and math.isfinite(norm)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adamw", "rv-adamw"])
def test_a_measured_queued_step_waits_for_nothing_before_its_read(name, monkeypatch):
    """The same for a step the rotation tracker measures, as the loop takes it: its capture is queued
    with the update, and its measurement after the update (`queue_measure`), to be read a step later."""
    engine, tracker, forward_backward = _measured_setup(name, 1e-3, queued=True)
    engine.step(forward_backward(), tracker.capture)  # the first step plans and compiles
    tracker.measure(1, 1e-2)
    value, norm = _step_checking_syncs(engine, forward_backward(), tracker.capture, monkeypatch)
    assert math.isfinite(value) and math.isfinite(norm)
    with _syncs_refused():
        tracker.queue_measure(2, 1e-2)
    assert tracker.scalars(2)


@contextlib.contextmanager
def _syncs_refused() -> Iterator[None]:
    """CUDA's sync debug mode "error": a synchronizing call raises."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _step_checking_syncs(engine: SingleEngine, loss: torch.Tensor, before_update: Callable | None,
                         monkeypatch) -> tuple[float, float]:
    """`engine.step` under CUDA's sync debug mode "error" until it reads its numbers."""
    read = HostCopy.tolist

    def read_after_the_check(copy: HostCopy) -> list[float]:
        torch.cuda.set_sync_debug_mode(0)
        return read(copy)

    monkeypatch.setattr(HostCopy, "tolist", read_after_the_check)
    with _syncs_refused():
        return engine.step(loss, before_update)


def _odd_model(max_norm: float) -> tuple[SingleEngine, torch.nn.Module, torch.nn.Parameter]:
    """A model plus a non-contiguous weight, which takes the eager step outside the Triton kernel."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(DEVICE)
    odd = torch.nn.Parameter(torch.randn(16, 8, device=DEVICE).t())
    optimizer = RotationalOptimizer([{"params": [*model.parameters(), odd]}], rule="adamw", lr=1e-2,
                                    weight_decay=0.1, fused=True)
    return SingleEngine(model, optimizer, World(0, 1, 0), torch.float32, max_norm), model, odd


def _odd_step(engine: SingleEngine, model: torch.nn.Module, odd: torch.nn.Parameter, step: int) -> None:
    x = torch.linspace(-1, 1, 32, device=DEVICE).view(4, 8) * (1 + 0.1 * step)
    loss = (model(x).sum(1) + odd.square().sum() * 0.01 * (step + 1)).square().mean()
    loss.backward()
    engine.step(loss.detach())


def test_an_optimizer_with_a_tensor_outside_the_triton_step_is_read_first(monkeypatch):
    """A tensor outside the Triton step (here a non-contiguous one) would read the flags on the host: the
    engine takes the synced step, which costs no more, from the first step on."""
    engine, model, odd = _odd_model(1.0)
    assert not engine.optimizer.takes_device_flags
    queued = _count_queued_steps(monkeypatch)
    for step in range(3):
        before = odd.detach().clone()
        _odd_step(engine, model, odd, step)
        assert not torch.equal(odd, before)  # it stepped, eagerly
    assert not queued


def test_a_resume_with_a_tensor_outside_the_triton_step_is_exact():
    """With clipping active the two paths differ at rounding: a resumed run must take the same path at
    each step as the uninterrupted one (a path chosen from an earlier step of the process would not)."""
    whole = _odd_model(0.05)
    for step in range(4):
        _odd_step(*whole, step)
    first = _odd_model(0.05)
    for step in range(2):
        _odd_step(*first, step)
    resumed = _odd_model(0.05)
    resumed[1].load_state_dict(first[1].state_dict())
    resumed[2].data.copy_(first[2])
    resumed[0].optimizer.load_state_dict(first[0].optimizer.state_dict())
    for step in range(2, 4):
        _odd_step(*resumed, step)
    for a, b in zip([*whole[1].parameters(), whole[2]], [*resumed[1].parameters(), resumed[2]], strict=True):
        assert torch.equal(a, b)


def _measured_setup(name: str, max_norm: float, queued: bool) -> tuple[SingleEngine, RotationTracker, Callable]:
    """A tiny GPT-2 (Conv1D: column neurons) with `name` fused, its engine on one path, a tracker that
    measures every step, and its forward/backward (returns the loss)."""
    torch.manual_seed(0)
    model = tiny_gpt2().to(DEVICE)
    table = classify_parameters(model, rotational_embeddings=False)
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.1, fused=True)
    engine = SingleEngine(model, build_optimizer(model, table, cfg), World(0, 1, 0), torch.float32, max_norm)
    assert engine._decides_on_device
    engine._decides_on_device = queued
    tracker = RotationTracker(model, table, cfg, 1, _tracker_source(engine, table))
    x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(DEVICE)

    def forward_backward() -> torch.Tensor:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss.detach()

    return engine, tracker, forward_backward


def _measured_run(name: str, max_norm: float, queued: bool, bad_step: int | None = None) -> RotationTracker:
    """Three measured steps on one path, taken as the loop's `train_step` takes them; at `bad_step` the loss
    is non-finite (queued: the engine learns it after the capture; synced: before it) and the step's capture,
    if any, is discarded."""
    engine, tracker, forward_backward = _measured_setup(name, max_norm, queued)
    for step in range(1, 4):
        loss = forward_backward()
        value, norm = engine.step(torch.tensor(math.inf) if step == bad_step else loss, tracker.capture)
        if math.isfinite(value) and math.isfinite(norm):
            tracker.measure(step, 1e-2)
        else:
            tracker.discard()
            with pytest.raises(RuntimeError, match="needs capture"):  # nothing of the capture is left
                tracker.measure(step, 1e-2)
            tracker.discard()  # twice, or with nothing captured (the synced path), is harmless
    return tracker


def _assert_same_layers(got: RotationTracker, want: RotationTracker) -> None:
    """Per-layer metrics equal to rounding. theta_cv is compared absolutely: under an RV optimizer every
    neuron turns by the same angle, so its spread is ~1e-7, all of it rounding."""
    for metric in LAYER_METRICS:
        np.testing.assert_allclose(got.history.column(metric), want.history.column(metric),
                                   **({"atol": 1e-6} if metric == "theta_cv" else {"rtol": 1e-5}), err_msg=metric)


# torch's fused AdamW (ModelSource: it divides its sums) and ours (FusedSource: the kernel divides the
# gradient), rotational and plain; max_norm 1e-3 clips every step through the update's divisor, 0 never.
# `batched`: ModelSource's fp32 tensors in its batched Triton kernels (fused_sums.Batch, as on a GPU, where
# the capture kernel writes |g|^2 itself), run in the interpreter.
@pytest.mark.parametrize("name, max_norm, batched", [("adamw", 1e-3, False), ("adamw", 1e-3, True),
                                                     ("adamw", 0.0, False), ("rv-adamw", 1e-3, False),
                                                     ("sgdm", 1e-3, False)])
def test_a_measured_step_is_queued_and_records_what_the_synced_one_does(name, max_norm, batched, monkeypatch):
    if batched:
        monkeypatch.setattr(fused_sums, "RUN_ON_CPU", True)
    queued_steps = _count_queued_steps(monkeypatch)
    queued = _measured_run(name, max_norm, queued=True)
    assert len(queued_steps) == 3
    synced = _measured_run(name, max_norm, queued=False)
    assert isinstance(queued.source, ModelSource if name == "adamw" else FusedSource)
    if batched:
        assert queued.source._batches and all(queued.source._batches.values())
    assert list(queued.history.steps) == list(synced.history.steps) == [1, 2, 3]
    _assert_same_layers(queued, synced)
    for layer in synced.layers:  # per neuron, the gradient norm is the clipped gradient's on both paths
        for metric, want in synced.snapshot[layer].items():
            torch.testing.assert_close(queued.snapshot[layer][metric], want, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("name", ["adamw", "rv-adamw"])
def test_a_dropped_measured_step_records_nothing(name):
    """A non-finite loss is known to the queued path only after the capture: the capture is discarded
    (`_measured_run` checks that nothing of it is left), nothing is recorded, and the next measured step is
    the synced path's (which skipped the step)."""
    queued = _measured_run(name, 1e-3, queued=True, bad_step=2)
    synced = _measured_run(name, 1e-3, queued=False, bad_step=2)
    assert list(queued.history.steps) == list(synced.history.steps) == [1, 3]
    _assert_same_layers(queued, synced)
