"""The checkpoint `rotation/` folder round trip, its figures, and `pretrain metrics` on run folders."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.config import OptimConfig
from pretrain.errors import UserError
from pretrain.metrics import (
    LAYER_METRICS,
    RotationTracker,
    find_rotation_dir,
    load_rotation,
    metrics_command,
    model_card_section,
)
from pretrain.metrics.rotation import LOG_GROUPS
from pretrain.parallel.host_copy import HostCopy
from pretrain.params import classify_parameters

STEPS = 6


def train_tiny(optim_name: str, seed: int) -> tuple[RotationTracker, dict[str, float]]:
    """A 1-layer llama trained a few steps with torch AdamW, measured at every step."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, tie_word_embeddings=False))
    cfg = OptimConfig(name=optim_name, lr=1e-2, weight_decay=0.1)
    tracker = RotationTracker(model, classify_parameters(model, rotational_embeddings=False), cfg, every=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    x = torch.randint(0, 64, (4, 16))
    for step in range(1, STEPS + 1):
        model(input_ids=x, labels=x).loss.backward()
        tracker.capture()
        optimizer.step()
        optimizer.zero_grad()
        scalars = tracker.measure(step, cfg.lr * step / STEPS)  # a warmup-like lr schedule
    return tracker, scalars


def save_run(tracker: RotationTracker, run: Path, step: int = 10) -> Path:
    """Lay out `run` like a training run: checkpoints/step_N/rotation and a `latest` pointer."""
    ckpt = run / "checkpoints" / f"step_{step:06d}"
    tracker.save(ckpt / "rotation")
    (run / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[RotationTracker, dict[str, float], Path]:
    tracker, scalars = train_tiny("adamw", seed=0)
    run = tmp_path_factory.mktemp("run")
    save_run(tracker, run)
    return tracker, scalars, run


def test_load_gives_back_what_measure_returned(trained):
    tracker, scalars, run = trained
    data = load_rotation(run / "checkpoints" / "step_000010" / "rotation")
    assert data.step == STEPS and data.history.layers == tracker.layers
    np.testing.assert_array_equal(data.history.steps, np.arange(1, STEPS + 1))
    np.testing.assert_array_equal(data.history.values, tracker.history.values)
    for j, metric in enumerate(LAYER_METRICS):
        for i, layer in enumerate(tracker.layers):
            key = f"rotation/{LOG_GROUPS[metric]}/{layer}"
            stored = data.history.values[-1, i, j]
            assert stored == scalars[key] if key in scalars else math.isnan(stored)
            assert data.summary["layers"][i]["latest"][metric] == scalars.get(key)  # JSON null for NaN
    assert data.summary["eta_r"] == scalars["rotation/eta_r"] == data.history.eta_r[-1]
    assert data.summary["ratio_mean"] == scalars["rotation/ratio_mean"]
    assert data.summary["balance"] == scalars["rotation/balance"]
    for layer, metrics in tracker.snapshot.items():
        for metric, values in metrics.items():
            torch.testing.assert_close(data.snapshot[layer][metric], values.float(), rtol=0, atol=0)
    row = data.summary["layers"][0]
    assert (row["name"], row["kind"], row["neuron_axis"], row["neurons"]) == ("embed_tokens", "embedding", 0, 64)


@pytest.mark.parametrize("name", ["heatmap.png", "layers.png"])
def test_figures_are_real_pngs(trained, name):
    _, _, run = trained
    path = run / "checkpoints" / "step_000010" / "rotation" / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] * pixels.shape[1] > 200 * 200
    colours = np.unique((pixels[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # a colour scale and lines, not a blank canvas


def test_tracker_state_round_trip(trained):
    tracker, _, _ = trained
    buffer = io.BytesIO()
    torch.save(tracker.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed, _ = train_tiny("adamw", seed=1)  # same architecture, other numbers
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(resumed.history.values, tracker.history.values)
    assert resumed.summary_line() == tracker.summary_line() != ""
    assert resumed.snapshot.keys() == tracker.snapshot.keys()
    torch.testing.assert_close(resumed.snapshot["lm_head"]["theta"], tracker.snapshot["lm_head"]["theta"])


def test_metrics_command_prints_one_row_per_layer(trained, capsys):
    tracker, _, run = trained
    metrics_command([str(run)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split() and line.split()[0] in tracker.layers]
    assert [r.split()[0] for r in rows] == tracker.layers
    assert all(len(r.split()) == 7 for r in rows)  # name, neurons, theta, eta_r, ratio, cv, t_eq
    assert "step_000010" in out and "time to equilibrium" in out


def test_metrics_command_compares_two_runs(trained, tmp_path, capsys):
    tracker, _, run_a = trained
    other, _ = train_tiny("rv-adamw", seed=1)
    ckpt_b = save_run(other, tmp_path / "run_b", step=20)
    metrics_command([str(run_a), str(ckpt_b)])
    out = capsys.readouterr().out
    assert "θ/η_r A" in out and "θ/η_r B" in out and "t_eq A" in out
    for i, layer in enumerate(tracker.layers):
        row = next(line for line in out.splitlines() if line.startswith(layer + " "))
        ratio_a, ratio_b = (float(x) for x in row.split()[1:3])
        assert ratio_a == pytest.approx(tracker.history.column("ratio")[-1, i], abs=1e-3)
        assert ratio_b == pytest.approx(other.history.column("ratio")[-1, i], abs=1e-3)


def test_run_folder_falls_back_to_highest_checkpoint_with_rotation(trained, tmp_path):
    tracker, _, _ = trained
    run = tmp_path / "run"
    save_run(tracker, run, step=20)
    save_run(tracker, run, step=30)
    shutil.rmtree(run / "checkpoints" / "step_000030" / "rotation")  # `latest` names one without metrics
    (run / "checkpoints" / "step_000040").mkdir()
    assert find_rotation_dir(run) == run / "checkpoints" / "step_000020" / "rotation"
    assert find_rotation_dir(run / "checkpoints" / "step_000020") == run / "checkpoints" / "step_000020" / "rotation"
    with pytest.raises(UserError, match="neither a checkpoint"):
        find_rotation_dir(tmp_path / "nowhere")
    shutil.rmtree(run / "checkpoints" / "step_000020")
    with pytest.raises(UserError, match="no checkpoint"):
        metrics_command([str(run)])


def test_model_card_section(trained):
    tracker, _, run = trained
    card = model_card_section(run / "checkpoints" / "step_000010" / "rotation")
    assert card.startswith("## Rotation metrics")
    assert "![θ/η_r per layer over training](rotation/heatmap.png)" in card
    assert all(f"| {layer} |" in card for layer in tracker.layers)


def test_save_before_any_measurement_writes_a_readable_folder(tmp_path):
    model = torch.nn.Linear(4, 3)
    tracker = RotationTracker(model, classify_parameters(model, rotational_embeddings=False), OptimConfig(), every=10)
    tracker.save(tmp_path / "rotation")
    data = load_rotation(tmp_path / "rotation")
    assert data.step is None and len(data.history) == 0 and data.snapshot == {}
    assert not (tmp_path / "rotation" / "heatmap.png").exists()
    assert "not measured yet" in model_card_section(tmp_path / "rotation")


def test_queued_measurements_record_what_measure_records_and_wait_only_when_read(monkeypatch):
    """The training loop's way (`queue_measure`, then `scalars` a step later) against `measure`.

    A read of one step must not wait for the copy of a later queued one: the loop reads step t-1's
    figures while step t's update may still be running."""
    arrivals = []  # one per measurement whose figures the host waited for
    wait = HostCopy.tensor
    monkeypatch.setattr(HostCopy, "tensor", lambda copy: arrivals.append(1) or wait(copy))

    def measured(queued: bool) -> tuple[RotationTracker, dict[int, dict[str, float]]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
        tracker = RotationTracker(model, classify_parameters(model, rotational_embeddings=False),
                                  OptimConfig(weight_decay=0.1), every=1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        scalars = {}
        for step in (1, 2, 3):
            model(torch.randn(5, 16)).square().sum().backward()
            tracker.capture()
            optimizer.step()
            optimizer.zero_grad()
            if not queued:
                scalars[step] = tracker.measure(step, 0.1)
                continue
            tracker.queue_measure(step, 0.1)
            assert len(arrivals) == step - 1
            if step > 1:
                scalars[step - 1] = tracker.scalars(step - 1)
                assert len(arrivals) == step - 1 and tracker.summary_line()  # step's own copy not waited for
        return tracker, scalars

    want, want_scalars = measured(queued=False)
    arrivals.clear()
    got, got_scalars = measured(queued=True)
    state = got.state_dict()  # records the last queued measurement
    assert len(arrivals) == 3 and state["history"]["step"].tolist() == [1, 2, 3]
    got_scalars[3] = got.scalars(3)
    assert got_scalars == want_scalars
    np.testing.assert_array_equal(got.history.values, want.history.values)
    with pytest.raises(KeyError, match="step 4 was not measured"):
        got.scalars(4)


def test_run_without_weight_decay_has_no_ratio_but_still_plots(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    table = classify_parameters(model, rotational_embeddings=False)
    tracker = RotationTracker(model, table, OptimConfig(weight_decay=0.0), every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in (1, 2, 3):
        model(torch.randn(5, 16)).square().sum().backward()
        tracker.capture()
        optimizer.step()
        optimizer.zero_grad()
        scalars = tracker.measure(step, 0.1)
    assert not any(key.startswith("rotation/ratio") for key in scalars) and scalars["rotation/eta_r"] == 0.0
    assert tracker.summary_line().startswith("θ ")
    tracker.save(tmp_path / "rotation")
    data = load_rotation(tmp_path / "rotation")
    assert data.summary["ratio_mean"] is None and data.summary["time_to_equilibrium"] is None
    assert imread(tmp_path / "rotation" / "heatmap.png").shape[0] > 100
