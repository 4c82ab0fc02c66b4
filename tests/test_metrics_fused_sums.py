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


@pytest.mark.parametrize("tile", [None, (8, 256, 8), (4, 512, 8), (16, 64, 4)])  # None: the shipped tiles
@pytest.mark.parametrize("axis", [0, 1])
def test_batched_capture_and_measure_equal_float64_for_every_tile(device, monkeypatch, tile, axis):
    """`Batch` (one launch per shape) with other tiles (benchmarks/bench_sums_gpu.py compares them):
    the sums of every tensor equal the float64 Gram path, and |g|^2 per neuron a float64 sum."""
    import pretrain.metrics.fused_sums as fused_sums

    if tile is not None:
        monkeypatch.setattr(fused_sums, "COLUMN_TILE" if axis else "ROW_TILE", tile)
    gen = torch.Generator().manual_seed(1)
    before = [torch.randn(37, 300, generator=gen) * 0.05 for _ in range(3)]
    grads = [torch.randn(37, 300, generator=gen) for _ in range(3)]
    after = [w + torch.randn(37, 300, generator=gen) * 1e-4 for w in before]
    weights = [w.clone().to(device) for w in before]
    neurons = before[0].shape[axis]
    rows = list(torch.zeros(3 * neurons, 4, dtype=torch.float64, device=device).split(neurons))
    batch = fused_sums.Batch(weights, axis)
    batch.capture(weights, [g.to(device) for g in grads], rows)
    for w, new in zip(weights, after, strict=True):
        w.copy_(new)
    batch.measure(weights, rows)
    workspace = torch.empty(2 * before[0].numel(), dtype=torch.float64)
    for row, w0, w1, g in zip(rows, before, after, grads, strict=True):
        torch.testing.assert_close(row[:, :3].cpu(), neuron_sums(w0, w1, axis, workspace), rtol=1e-12, atol=1e-20)
        torch.testing.assert_close(row[:, 3].cpu(), g.double().square().sum(dim=1 - axis), rtol=1e-12, atol=0)
