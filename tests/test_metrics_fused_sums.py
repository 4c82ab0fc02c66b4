"""The Triton per-neuron sums of a measured step against the float64 Gram path (issue 10).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py); with one, the
compiled kernel is compared on CUDA tensors.
"""

from __future__ import annotations

import os

import pytest
import torch

from pretrain.metrics.neurons import neuron_sums

pytest.importorskip("triton", reason="Triton is a dev dependency on Linux x86-64 (pip install -e '.[dev]')")


@pytest.fixture
def device(monkeypatch) -> str:
    if torch.cuda.is_available():
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets the interpreter without a GPU"
    import pretrain.metrics.fused_sums as fused_sums

    monkeypatch.setattr(fused_sums, "RUN_ON_CPU", True)
    return "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [0, 1])
def test_kernel_sums_equal_the_float64_gram_path(device, dtype, axis):
    from pretrain.metrics.fused_sums import delta_sums, supports

    gen = torch.Generator().manual_seed(0)
    before = (torch.randn(37, 300, generator=gen) * 0.05).to(dtype)
    after = (before.float() + torch.randn(37, 300, generator=gen) * 1e-4).to(dtype)
    expected = neuron_sums(before, after, axis, torch.empty(2 * before.numel(), dtype=torch.float64))
    before, after = before.to(device), after.to(device)
    assert supports(before, after)
    torch.testing.assert_close(delta_sums(before, after, axis).cpu(), expected, rtol=1e-12, atol=1e-20)
