"""The chunked causal-LM loss against `F.cross_entropy` on a full fp32 copy of the logits (issue 10)."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_matches_eager(small_chunks, dtype):
    torch.manual_seed(1)
    logits, targets = (torch.randn(2, 9, 61) * 4).to(dtype), torch.randint(0, 61, (2, 9))
    eager_in, compiled_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    eager = cross_entropy(eager_in * 1.0, targets)
    eager.backward()
    compiled = torch.compile(lambda x, y: cross_entropy(x * 1.0, y))(compiled_in, targets)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=0)
    # the same fp32 arithmetic (bf16: rounded once from it, so an ulp apart at most)
    tolerance = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-7)
    torch.testing.assert_close(compiled_in.grad, eager_in.grad, **tolerance)


def test_compiled_backward_keeps_no_fp32_copy_of_the_logits(small_chunks):
    """Inductor's code for the compiled loss allocates nothing of the vocabulary's width in fp32: the
    softmax lives in registers, between the bf16 logits read and the bf16 gradient written."""
    from torch._inductor.utils import run_and_get_code

    vocab = 97
    logits = (torch.randn(64, vocab) * 4).bfloat16().requires_grad_()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(x * 1.0, y)
        loss.backward()
        return loss

    _, codes = run_and_get_code(torch.compile(step), logits, torch.randint(0, vocab, (64,)))
    allocations = re.findall(r"empty_strided_\w+\(\(([\d, ]+)\), \([\d, ]*\), torch\.(\w+)\)", "\n".join(codes))
    assert allocations, "no allocation found: inductor's output format changed"
    wide = [(shape, dtype) for shape, dtype in allocations if shape.replace(" ", "").endswith(f",{vocab}")]
    assert wide and all(dtype == "bfloat16" for _, dtype in wide), wide  # the gradient, and nothing in fp32


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_compiled_region_has_no_graph_break(arch):
    """Model forward + loss trace as one graph: a break would split the compiled step and keep the
    loss (or attention) out of the fused kernels (issue 10's suspects; checked with dynamo on CPU)."""
    from pretrain.config import ModelConfig
    from pretrain.loss import causal_lm_loss
    from pretrain.model import build_model

    model = build_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                        vocab_size=64, seq_len=16, eos_id=0)
    ids = torch.randint(0, 64, (2, 16))
    explained = torch._dynamo.explain(causal_lm_loss)(model, ids, ids)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
