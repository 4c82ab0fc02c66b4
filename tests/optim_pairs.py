"""Pairs of optimizers, eager and fused, stepped alike: the fused-step tests compare them (issue 10)."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain.logger import read_metrics
from pretrain.optim import RotationalOptimizer

# Widths >= 16: at step 1 AdamW's direction is ~sign(g), and a narrow neuron whose gradient signs
# all agree has a zero-mean direction of pure rounding noise, which no two summation orders share.
SHAPES = [(16, 20), (16, 20), (17, 24), (24, 40)]


def make_pair(rule: str, rotational: bool, axis: int, zero_mean: bool, device: str, shapes=SHAPES):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=gen) * 0.1 for s in shapes] + [torch.randn(20, generator=gen) * 0.1]
    pairs = []
    for fused in (False, True):
        params = [torch.nn.Parameter(w.clone().to(device)) for w in weights]
        groups = [{"params": params[:-1], "rotational": rotational, "neuron_axis": axis},
                  {"params": params[-1:], "weight_decay": 0.0}]
        opt = RotationalOptimizer(groups, rule=rule, lr=0.01, weight_decay=0.1, betas=(0.9, 0.95),
                                  zero_mean=zero_mean, fused=fused)
        pairs.append((opt, params))
    return pairs


def set_grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def assert_same(eager, fused, rtol: float = 2e-5) -> None:
    (eager_opt, eager_params), (fused_opt, fused_params) = eager, fused
    for a, b in zip(eager_params, fused_params, strict=True):
        scale = a.detach().abs().max()
        torch.testing.assert_close(b.detach().cpu(), a.detach().cpu(), rtol=0, atol=rtol * scale.item())
        for key, value in eager_opt.state[a].items():
            if key != "step":
                other = fused_opt.state[b][key]
                torch.testing.assert_close(other.cpu(), value.cpu(), rtol=0, atol=rtol * value.abs().max().item())


def run_steps(pairs, steps: int = 4) -> None:
    for step in range(steps):
        for opt, params in pairs:
            set_grads(params, step)
            opt.step()


def assert_non_finite_gradient_spreads_alike(rule: str, device: str) -> None:
    """A NaN gradient element poisons what it poisons in the eager step: its neuron under the RV (not
    under Lion, where sign(NaN) = 0 in torch), nothing else."""
    pairs = make_pair(rule, True, 0, True, device)
    for opt, params in pairs:
        set_grads(params, 0)
        params[0].grad[3, 5] = float("nan")
        opt.step()
    (_, eager), (_, fused) = pairs
    for a, b in zip(eager, fused, strict=True):
        assert torch.equal(a.detach().isnan().cpu(), b.detach().isnan().cpu())
    assert eager[0].detach()[3].isnan().all() == (rule != "lion")
    assert not eager[0].detach()[4:].isnan().any()


def assert_rotation_sums_equal_a_float64_reference(device: str, rotational: bool, axis: int) -> None:
    """The fused step's rotation-tracker sums of a step (|w_t|^2, <w_t, dw>, |dw|^2, |g|^2 per neuron
    along `axis`) against float64 sums of the weights saved around that step."""
    _, (opt, params) = make_pair("adamw", rotational, axis, True, device)
    run_steps([(opt, params)], steps=2)
    matrices = params[:-1]
    set_grads(params, 7)
    before = [p.detach().double().clone() for p in matrices]
    rows = {id(p): (axis, torch.zeros(p.shape[axis], 4, dtype=torch.float64, device=device)) for p in matrices}
    assert all(opt.fused_covers(p, axis) for p in matrices)
    opt.request_rotation_sums(rows)
    opt.step()
    other = 1 - axis
    for w0, p in zip(before, matrices, strict=True):
        dw = p.detach().double() - w0
        expected = torch.stack([(w0 * w0).sum(other), (w0 * dw).sum(other), (dw * dw).sum(other),
                                p.grad.double().square().sum(other)], dim=1)
        torch.testing.assert_close(rows[id(p)][1], expected, rtol=1e-12, atol=1e-18)


def angle_history(run_dir: Path) -> torch.Tensor:
    """[measured steps, layers] of a run's logged per-layer angles."""
    rows = [r for r in read_metrics(run_dir) if any(k.startswith("rotation/angle/") for k in r)]
    keys = sorted(k for k in rows[0] if k.startswith("rotation/angle/"))
    return torch.tensor([[r[k] for k in keys] for r in rows], dtype=torch.float64)
