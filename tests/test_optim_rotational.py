"""The rotational variants: invariants, angles, equilibrium, and an independent float64 re-derivation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy_reference import Reference, eta_r, to_neurons
from numpy_reference import Tensor as RefTensor

import pretrain.optim.rotational as rotational_module
from pretrain.optim import RotationalOptimizer

# Per rule: lr and weight decay of a plausible run, betas for the rules that use them.
HYPER = {
    "adamw": dict(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95)),
    "lion": dict(lr=1e-3, weight_decay=1.0, betas=(0.9, 0.99)),
    "sgdm": dict(lr=0.05, weight_decay=0.01, momentum=0.9),
}
RULES = tuple(HYPER)


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _rows(t: torch.Tensor, axis: int | None) -> np.ndarray:
    return to_neurons(t.detach().double().numpy(), axis)


def _angles(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Angle between matching rows, in the form that stays accurate for tiny angles."""
    a = before / np.linalg.norm(before, axis=1, keepdims=True)
    b = after / np.linalg.norm(after, axis=1, keepdims=True)
    return 2 * np.arctan2(np.linalg.norm(a - b, axis=1), np.linalg.norm(a + b, axis=1))


def _inner_direction(rule: str, opt: RotationalOptimizer, p: torch.Tensor, grad: torch.Tensor,
                     momentum_before: np.ndarray | None) -> np.ndarray:
    """u of step 2, recomputed from the optimizer's state after the step (and the momentum before it, for Lion)."""
    group = opt.param_groups[0]
    state = opt.state[p]
    if rule == "adamw":
        b1, b2 = group["betas"]
        t = float(state["step"])
        m_hat = state["exp_avg"].double().numpy() / (1 - b1 ** t)
        v_hat = state["exp_avg_sq"].double().numpy() / (1 - b2 ** t)
        return m_hat / (np.sqrt(v_hat) + group["eps"])
    if rule == "lion":
        b1 = group["betas"][0]
        return np.sign(b1 * momentum_before + (1 - b1) * grad.double().numpy())
    return state["momentum_buffer"].double().numpy()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape,axis", [((32, 48), 0), ((48, 32), 1)])
def test_each_step_keeps_norms_and_mean_and_rotates_by_the_expected_angle(rule: str, shape: tuple[int, int],
                                                                          axis: int) -> None:
    p = _randn(shape, 0) * 0.05
    norms0 = np.linalg.norm(_rows(p, axis), axis=1)
    opt = RotationalOptimizer([{"params": [p], "rotational": True, "neuron_axis": axis}], rule=rule,
                              **HYPER[rule])
    group = opt.param_groups[0]
    eta = eta_r(rule, group["lr"], group["weight_decay"], group["betas"], group["momentum"])
    for step in range(1, 16):
        grad = _randn(shape, step) * (1 + step % 3)  # update norms that vary from step to step
        p.grad = grad
        before = _rows(p, axis)
        state = opt.state[p]
        momentum_before = state["exp_avg"].double().numpy().copy() if "exp_avg" in state else np.zeros(shape)
        opt.step()
        after = _rows(p, axis)

        norms = np.linalg.norm(after, axis=1)
        np.testing.assert_allclose(norms, norms0, rtol=1e-5)
        np.testing.assert_allclose(opt.state[p]["neuron_norm"].double().numpy(), norms0, rtol=1e-6)
        assert np.all(np.abs(after.mean(axis=1)) < 1e-5 * norms / math.sqrt(after.shape[1]))

        u = to_neurons(_inner_direction(rule, opt, p, grad, momentum_before), axis)
        u = u - before * (np.sum(u * before, axis=1) / np.sum(before * before, axis=1))[:, None]
        u = u - u.mean(axis=1, keepdims=True)
        s_hat = opt.state[p]["update_norm_avg"].double().numpy() / (1 - group["update_norm_decay"] ** step)
        expected = np.arctan(eta * np.linalg.norm(u, axis=1) / (np.sqrt(s_hat) + group["rotational_eps"]))
        np.testing.assert_allclose(_angles(before, after), expected, rtol=1e-4)


@pytest.mark.parametrize("rule", RULES)
def test_steady_update_norms_give_the_equilibrium_angle(rule: str) -> None:
    """Gradients of constant norm per neuron: the angle per step settles at arctan(eta_r)."""
    shape = (64, 256)
    p = _randn(shape, 0) * 0.05
    opt = RotationalOptimizer([p], rule=rule, **HYPER[rule])
    group = opt.param_groups[0]
    eta = eta_r(rule, group["lr"], group["weight_decay"], group["betas"], group["momentum"])
    ratios = []
    for step in range(100):
        grad = _randn(shape, step + 1)
        p.grad = grad / grad.norm(dim=1, keepdim=True)
        before = _rows(p, 0)
        opt.step()
        ratios.append(_angles(before, _rows(p, 0)) / math.atan(eta))
    settled = np.mean(ratios[-10:], axis=0)  # per neuron, over the last 10 steps
    assert abs(settled.mean() - 1) < 0.02
    assert np.all(np.abs(settled - 1) < 0.1)


def _reference_case(rule: str, per_neuron: bool, zero_mean: bool = True, center_init: bool = True):
    """The same tensors in RotationalOptimizer and in the numpy reference.

    Rotational: a Linear-shaped [out, in] matrix (axis 0), a Conv1D-shaped [in, out] one (axis 1)
    and a 3-d tensor (axis 1); plain: an undecayed vector and a decayed matrix.
    """
    hyper = HYPER[rule]
    wd = hyper["weight_decay"]
    specs = [((16, 24), 0, True, wd), ((24, 16), 1, True, wd), ((4, 3, 5), 1, True, wd),
             ((8,), None, False, 0.0), ((5, 6), None, False, wd)]
    tensors = [_randn(shape, i) * 0.1 for i, (shape, *_) in enumerate(specs)]
    groups = [{"params": [t], "rotational": rot, "neuron_axis": axis or 0, "weight_decay": decay}
              for t, (_, axis, rot, decay) in zip(tensors, specs, strict=True)]
    ref = Reference([RefTensor(t.double().numpy(), rot, axis if per_neuron else None, decay)
                     for t, (_, axis, rot, decay) in zip(tensors, specs, strict=True)],
                    rule, betas=hyper.get("betas", (0.9, 0.999)), momentum=hyper.get("momentum", 0.9),
                    zero_mean=zero_mean, center_init=center_init)
    opt = RotationalOptimizer(groups, rule=rule, per_neuron=per_neuron, zero_mean=zero_mean,
                              center_init=center_init, **hyper)
    return tensors, opt, ref


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("per_neuron", [True, False])
def test_matches_the_numpy_reference(rule: str, per_neuron: bool) -> None:
    tensors, opt, ref = _reference_case(rule, per_neuron)
    for t, x in zip(tensors, ref.tensors, strict=True):  # centring at construction
        np.testing.assert_allclose(t.numpy(), x.w, rtol=1e-5, atol=1e-7)
    for step in range(20):
        grads = [_randn(t.shape, 100 + 10 * step + i) for i, t in enumerate(tensors)]
        for t, g in zip(tensors, grads, strict=True):
            t.grad = g
        lr = HYPER[rule]["lr"] * (0.5 + step / 20)  # a changing lr: eta_r follows it
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        ref.step([g.numpy() for g in grads], lr)
        for t, x in zip(tensors, ref.tensors, strict=True):
            np.testing.assert_allclose(t.numpy(), x.w, rtol=1e-5, atol=1e-6 * np.abs(x.w).max())


@pytest.mark.parametrize("zero_mean,center_init", [(False, True), (False, False), (True, False)])
def test_matches_the_numpy_reference_without_centring(zero_mean: bool, center_init: bool) -> None:
    tensors, opt, ref = _reference_case("adamw", per_neuron=True, zero_mean=zero_mean, center_init=center_init)
    for step in range(10):
        grads = [_randn(t.shape, 100 + 10 * step + i) for i, t in enumerate(tensors)]
        for t, g in zip(tensors, grads, strict=True):
            t.grad = g
        opt.step()
        ref.step([g.numpy() for g in grads], HYPER["adamw"]["lr"])
        for t, x in zip(tensors, ref.tensors, strict=True):
            np.testing.assert_allclose(t.numpy(), x.w, rtol=1e-5, atol=1e-6 * np.abs(x.w).max())


def test_cpu_tiling_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles hold whole neurons, so cutting tensors into cache-sized row blocks changes only rounding."""
    results = []
    for limit in (1 << 20, 40):
        monkeypatch.setattr(rotational_module, "_CPU_CHUNK_NUMEL", limit)
        tensors, opt, _ = _reference_case("adamw", per_neuron=True)
        for step in range(5):
            for i, t in enumerate(tensors):
                t.grad = _randn(t.shape, 100 + 10 * step + i)
            opt.step()
        results.append(tensors)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_construction_centres_each_neuron_once() -> None:
    p = _randn((8, 12), 0) + 0.5
    norms = p.norm(dim=1)
    RotationalOptimizer([p], rule="adamw", weight_decay=0.1)
    torch.testing.assert_close(p.norm(dim=1), norms)
    assert p.mean(dim=1).abs().max() < 1e-6
    centred = p.clone()
    RotationalOptimizer([p], rule="adamw", weight_decay=0.1)  # as when resuming over trained weights
    assert torch.equal(p, centred)


def test_a_zero_neuron_stays_zero_and_the_others_train() -> None:
    p = _randn((4, 6), 0)
    p.data[2] = 0.0  # e.g. an embedding's padding row
    opt = RotationalOptimizer([p], rule="adamw", lr=1e-2, weight_decay=0.1)
    before = p.clone()
    for step in range(3):
        p.grad = _randn((4, 6), step + 1)
        opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p[2], torch.zeros(6))
    assert not torch.equal(p[0], before[0])


def test_zero_lr_does_not_rotate() -> None:
    p = _randn((4, 6), 0)
    opt = RotationalOptimizer([p], rule="sgdm", lr=0.0, weight_decay=0.1)
    before = p.clone()
    p.grad = _randn((4, 6), 1)
    opt.step()
    torch.testing.assert_close(p, before)
