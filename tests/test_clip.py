"""`clip_grad_norm` (pretrain/parallel/engine.py) against torch's `clip_grad_norm_`, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.parallel.engine import clip_grad_norm


def make_params(scale: float, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3), (1,), (200,)]
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtypes[i % len(dtypes)]))
        p.grad = (scale * torch.randn(shape, generator=gen)).to(p.dtype)
        params.append(p)
    params.append(torch.nn.Parameter(torch.zeros(3)))  # no gradient: left out, as torch does
    return params


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.float64)], ids=["one-dtype", "mixed"])
@pytest.mark.parametrize("scale", [0.001, 1.0, 100.0], ids=["below", "near", "above"])
@pytest.mark.parametrize("max_norm", [1.0, 0.0], ids=["clip", "no-clip"])
def test_equals_torch_clip_grad_norm(scale, max_norm, dtypes):
    ours, reference = make_params(scale, dtypes), make_params(scale, dtypes)
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(reference, max_norm if max_norm > 0 else math.inf)
    assert norm == float(expected)
    for p, q in zip(ours, reference, strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)


def test_a_norm_just_below_the_limit_still_matches():
    """At the boundary the scaling pass runs (its clamped coefficient decides), as in torch."""
    params = make_params(1.0)
    limit = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])) * (1 + 1e-7)
    ours, reference = make_params(1.0), make_params(1.0)
    assert clip_grad_norm(ours, limit) == float(torch.nn.utils.clip_grad_norm_(reference, limit))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, reference, strict=True) if p.grad is not None)


def test_a_non_finite_gradient_gives_a_non_finite_norm():
    params = make_params(1.0)
    params[0].grad[0, 0] = math.nan
    assert math.isnan(clip_grad_norm(params, 1.0))
    assert clip_grad_norm([torch.nn.Parameter(torch.ones(2))], 1.0) == 0.0  # no gradients at all



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients_just_below_the_limit_match(dtype):
    """torch takes the coefficient in the norm's dtype (a reciprocal, then a product: two roundings), so
    for bf16/fp16 gradients a norm a little below max_norm can still scale them by less than 1."""
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        scale = 10 ** (6 * torch.rand(1, generator=gen).item() - 3)
        grads = [(scale * torch.randn(shape, generator=gen)).to(dtype) for shape in [(17, 9), (33,), (5, 5, 5)]]
        norm = float(torch.nn.utils.get_total_norm(grads))
        for above in (1e-5, 1e-4, 1e-3):  # max_norm this far (relative) above the norm
            ours, reference = [], []
            for params in (ours, reference):
                for g in grads:
                    params.append(torch.nn.Parameter(torch.zeros_like(g)))
                    params[-1].grad = g.clone()
            limit = (norm + 1e-6) * (1 + above)
            assert clip_grad_norm(ours, limit) == float(torch.nn.utils.clip_grad_norm_(reference, limit))
            assert all(torch.equal(p.grad, q.grad) for p, q in zip(ours, reference, strict=True)), (seed, above)
