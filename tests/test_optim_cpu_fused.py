"""The fused C++ optimizer step on CPU (pretrain/optim/cpu_fused.py) against the eager one (issue 10).

The first test builds the extension: g++ with OpenMP, ~30 s once per machine, then cached.
The tolerances are those of the Triton kernel's tests: both paths compute in fp32 and sum in
different orders.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pretrain.logger import read_metrics
from pretrain.optim import cpu_fused
from tests.optim_pairs import (
    angle_history,
    assert_non_finite_gradient_spreads_alike,
    assert_rotation_sums_equal_a_float64_reference,
    assert_same,
    make_pair,
    run_steps,
    set_grads,
)
from tests.train_utils import REPO, tiny_args, tiny_config


@pytest.fixture(autouse=True)
def cpp_on_cpu(monkeypatch):
    """CPU tensors take the C++ kernel even where tests/conftest.py runs Triton in its interpreter."""
    try:
        import pretrain.optim.fused as triton_step
    except ImportError:
        return
    monkeypatch.setattr(triton_step, "interpreting", lambda: False)


def _assert_all_fused(opt) -> None:
    """Every launch went to the C++ kernel and no tensor was left to the eager path."""
    assert opt._plans, "no fused plan was made"
    for plan in opt._plans.values():
        assert plan.launches and not plan.rest
        assert all(isinstance(entry.launch, cpu_fused.Launch) for entry in plan.launches)


@pytest.mark.parametrize("rule", ["adamw", "lion", "sgdm"])
@pytest.mark.parametrize("rotational", [True, False], ids=["rv", "plain"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("zero_mean", [True, False], ids=["zero_mean", "no_mean"])
def test_cpu_kernel_matches_eager(rule, rotational, axis, zero_mean):
    pairs = make_pair(rule, rotational, axis, zero_mean, "cpu")
    run_steps(pairs)
    assert_same(*pairs)
    _assert_all_fused(pairs[1][0])


@pytest.mark.parametrize("axis", [0, 1])
def test_model_widths_match_eager(axis):
    """Real widths (768 to 3072, and a column block that is not a multiple of 16), plus a 3-d tensor."""
    shapes = [(3, 768), (2, 2048), (2, 3072), (4, 3, 5)] if axis == 0 else [(768, 9), (3072, 40)]
    pairs = make_pair("lion", True, axis, True, "cpu", shapes=shapes)
    run_steps(pairs, steps=2)
    assert_same(*pairs, rtol=1e-4)
    _assert_all_fused(pairs[1][0])


def test_tensors_the_kernel_does_not_cover_take_the_eager_step():
    """A non-contiguous parameter and a bf16 one: stepped eagerly, exactly as without the kernel."""
    base = torch.randn(24, 16, generator=torch.Generator().manual_seed(0)) * 0.1
    results = []
    for fused in (False, True):
        odd = torch.nn.Parameter(base.clone().t())  # [16, 24], not contiguous
        half = torch.nn.Parameter(base.clone().to(torch.bfloat16))
        dense = torch.nn.Parameter(base.clone())
        opt = cpu_fused_optimizer([odd, half, dense], fused)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in (odd, half, dense):
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.step()
        results.append((odd, half, dense, opt))
    for eager, fused in zip(results[0][:3], results[1][:3], strict=True):
        torch.testing.assert_close(fused.float(), eager.float(), rtol=0, atol=2e-6)
    for plan in results[1][3]._plans.values():
        assert [p.shape for p, _ in plan.rest] == [(16, 24), (24, 16)]  # odd and half
        assert [entry.params for entry in plan.launches] == [[results[1][2]]]


def cpu_fused_optimizer(params, fused: bool):
    from pretrain.optim import RotationalOptimizer

    return RotationalOptimizer([{"params": params, "rotational": True}], rule="adamw", lr=0.01, weight_decay=0.1,
                               fused=fused)


@pytest.mark.parametrize("optim", ["rv-adamw", "rv-lion", "rv-sgdm", "adamw-plain", "lion", "sgdm"])
def test_training_with_the_cpu_kernel_matches_eager(optim, tiny_data_dir, tmp_path, monkeypatch):
    """20 steps of the tiny recipe (fp32, rotational embeddings, rotation metrics every step): losses
    within 1e-5 relative, the same angles, and the kernel writes the metrics' sums itself."""
    import pretrain.train as train_module
    from pretrain.train import train

    sources = []
    build = train_module.FusedSource.build
    monkeypatch.setattr(train_module.FusedSource, "build", lambda *a: sources.append(build(*a)) or sources[-1])
    # At the recipe's lr (3e-2) plain AdamW's trajectory turns chaotic after ~13 steps: there torch's
    # own foreach and fused AdamW drift 1.4e-4 apart. At 3e-3 both pairs stay within 1e-7.
    lr = ["optim.lr=3e-3"] if optim == "adamw-plain" else []
    results = {}
    for fused in ("false", "true"):
        cfg = tiny_config(tiny_data_dir, tmp_path / fused, "train.steps=20", "checkpoint.every=100", *lr,
                          f"optim.name={optim}", "optim.rotational_embeddings=true", f"optim.fused={fused}")
        results[fused] = train(cfg)
    eager, fused = results["false"], results["true"]
    assert len(eager.losses) == 20
    for step, loss in eager.losses.items():
        assert fused.losses[step] == pytest.approx(loss, rel=1e-5), step
    fractions = [r.get("optim/fused_fraction") for r in read_metrics(fused.run_dir) if "train/loss" in r]
    assert fractions and set(fractions) == {1.0}  # every tensor took the kernel
    assert {r.get("optim/fused_fraction") for r in read_metrics(eager.run_dir) if "train/loss" in r} == {0.0}
    history = [angle_history(r.run_dir) for r in (eager, fused)]
    torch.testing.assert_close(history[1], history[0], rtol=1e-4, atol=1e-9)
    assert sources[0] is None and sources[-1] is not None  # eager: copy and compare; fused: the kernel's sums


def test_a_kernel_that_does_not_build_is_one_line(tiny_data_dir, tmp_path):
    """No compiler: `optim.fused=true` on CPU stops with one line and exit code 2, before any run folder."""
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "TRITON_INTERPRET": "0", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "pretrain", "train", *tiny_args(tiny_data_dir, out,
                                                                                   "optim.fused=true")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "optim.fused" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists() or not any(out.rglob("*.safetensors"))


@pytest.mark.parametrize("rule", ["adamw", "lion", "sgdm"])
def test_a_non_finite_gradient_spreads_as_in_the_eager_step(rule):
    assert_non_finite_gradient_spreads_alike(rule, "cpu")


@pytest.mark.parametrize("rotational", [True, False], ids=["rv", "plain"])
@pytest.mark.parametrize("axis", [0, 1])
def test_rotation_sums_equal_a_float64_reference(rotational, axis):
    assert_rotation_sums_equal_a_float64_reference("cpu", rotational, axis)


def test_measured_and_plain_steps_keep_their_plans_and_a_replaced_counter_replans():
    """Steps that alternate with and without rotation sums reuse both cached plans (their step counters
    are one tensor), and a counter replaced from outside (as a checkpoint restore does) is followed."""
    pairs = make_pair("adamw", True, 0, True, "cpu")
    (eager_opt, eager_params), (opt, params) = pairs
    plans = {}
    for step in range(6):
        for _, group_params in pairs:
            set_grads(group_params, step)
        eager_opt.step()
        if step % 2:
            opt.request_rotation_sums({id(p): (0, torch.zeros(p.shape[0], 4, dtype=torch.float64))
                                       for p in params[:-1]})
        opt.step()
        if step == 1:
            plans = {key: id(plan) for key, plan in opt._plans.items()}
    assert len(plans) == 4 and {key: id(plan) for key, plan in opt._plans.items()} == plans
    assert [float(opt.state[p]["step"]) for p in params] == [6.0] * len(params)
    assert_same(*pairs)

    for o, group_params in pairs:
        o.state[group_params[0]]["step"] = torch.tensor(2.0)
        set_grads(group_params, 6)
        o.step()
    assert [float(opt.state[p]["step"]) for p in params] == [3.0] + [7.0] * (len(params) - 1)
    assert opt.fused_fraction == 1.0  # the group's counters differ now: its launches split by count
    assert_same(*pairs)
