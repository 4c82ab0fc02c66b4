"""The chunked causal-LM loss against `F.cross_entropy` on a full fp32 copy of the logits (issue 10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pretrain.loss as loss_module
from pretrain.loss import cross_entropy


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 1000)  # many chunks, a ragged last one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_the_fp32_reference(small_chunks, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 41, 97) * 4).to(dtype)
    targets = torch.randint(0, 97, (3, 41))
    ref_in, ours_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    expected = F.cross_entropy(ref_in.float().flatten(0, 1), targets.flatten())
    expected.backward()
    got = cross_entropy(ours_in * 1.0, targets)  # a non-leaf, as a model's head output
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # the same fp32 softmax, up to summation order (bf16: one rounding of it, at most an ulp apart)
    tolerance = dict(rtol=1e-5, atol=1e-9) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tolerance)


def test_evaluation_needs_no_graph(small_chunks):
    logits, targets = torch.randn(2, 5, 33), torch.randint(0, 33, (2, 5))
    with torch.no_grad():
        got = cross_entropy(logits, targets)
    torch.testing.assert_close(got, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), rtol=1e-6, atol=0)


def test_backward_reuses_the_logits_memory():
    """The gradient is written where the logits were: no second full-vocabulary tensor."""
    logits = torch.randn(8, 50, requires_grad=True)
    head_out = logits * 1.0
    seen = []
    head_out.register_hook(lambda grad: seen.append(grad.data_ptr()))
    cross_entropy(head_out, torch.randint(0, 50, (8,))).backward()
    assert seen == [head_out.data_ptr()]


def test_compiled_loss_matches_eager(small_chunks):
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 9, 61), torch.randint(0, 61, (2, 9))
    eager_in, compiled_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = cross_entropy(eager_in * 1.0, targets)
    eager.backward()
    compiled = torch.compile(lambda x, y: cross_entropy(x * 1.0, y))(compiled_in, targets)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled_in.grad, eager_in.grad, rtol=1e-5, atol=1e-8)
