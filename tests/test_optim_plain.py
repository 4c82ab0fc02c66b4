"""With rotational off, RotationalOptimizer is the plain optimizer: torch's AdamW and SGD, published Lion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy_reference import Reference
from numpy_reference import Tensor as RefTensor

from pretrain.optim import RotationalOptimizer

SHAPES = [(6, 5), (7,), (3, 4, 2), (1,)]
STEPS = 20


def _params(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _groups(params: list[torch.Tensor], weight_decay: float, ours: bool) -> list[dict]:
    """Matrices decayed, vectors not; ours says `rotational=False` explicitly."""
    groups = [{"params": params[:1] + params[2:3], "weight_decay": weight_decay},
              {"params": params[1:2] + params[3:], "weight_decay": 0.0}]
    if ours:
        for group in groups:
            group["rotational"] = False
    return groups


def _run_against(reference: torch.optim.Optimizer, ours: torch.optim.Optimizer, mine: list[torch.Tensor],
                 theirs: list[torch.Tensor], schedule: bool = False) -> None:
    for step in range(STEPS):
        for p, q, g in zip(mine, theirs, _grads(step), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        if schedule:  # as the training loop does: every group's lr is rewritten before each step
            for group in reference.param_groups + ours.param_groups:
                group["lr"] = 1e-2 * (step + 1) / STEPS
        reference.step()
        ours.step()
        for p, q in zip(mine, theirs, strict=True):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lr_schedule", [False, True])
def test_plain_adamw_matches_torch_adamw(lr_schedule: bool) -> None:
    mine, theirs = _params(), _params()
    ours = RotationalOptimizer(_groups(mine, 0.1, ours=True), rule="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    reference = torch.optim.AdamW(_groups(theirs, 0.1, ours=False), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    _run_against(reference, ours, mine, theirs, schedule=lr_schedule)


def test_plain_sgdm_matches_torch_sgd() -> None:
    mine, theirs = _params(), _params()
    ours = RotationalOptimizer(_groups(mine, 0.05, ours=True), rule="sgdm", lr=0.05, momentum=0.9)
    reference = torch.optim.SGD(_groups(theirs, 0.05, ours=False), lr=0.05, momentum=0.9)
    _run_against(reference, ours, mine, theirs)


def test_plain_lion_matches_published_update() -> None:
    params = _params()
    betas = (0.9, 0.99)
    ours = RotationalOptimizer(_groups(params, 0.5, ours=True), rule="lion", lr=3e-3, betas=betas)
    ref = Reference([RefTensor(p.numpy(), rotational=False, axis=None, wd=0.5 if p.dim() > 1 else 0.0)
                     for p in params], rule="lion", betas=betas)
    for step in range(STEPS):
        grads = _grads(step)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        ours.step()
        ref.step([g.numpy() for g in grads], lr=3e-3)
        for p, x in zip(params, ref.tensors, strict=True):
            np.testing.assert_allclose(p.numpy(), x.w, rtol=1e-5, atol=1e-6)


def test_parameters_without_gradients_are_left_alone() -> None:
    params = _params()
    opt = RotationalOptimizer([{"params": params[:2]}, {"params": params[2:]}], rule="adamw", lr=1e-2,
                              weight_decay=0.1)
    before = [p.clone() for p in params]
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert not torch.equal(params[0], before[0])
    for p, b in zip(params[1:], before[1:], strict=True):
        assert torch.equal(p, b)
        assert "step" not in opt.state[p]
