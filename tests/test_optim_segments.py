"""The ZeRO segment map: per-neuron sums and updates of flat partitions, against direct references."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pretrain.optim.rotational import RotationalOptimizer
from pretrain.optim.segments import Segment, SegmentMap, TensorInfo

# A flat group as DeepSpeed lays it out: tensors back to back (here with 3 elements of alignment
# padding after the second), cut into partitions at arbitrary element boundaries.
SHAPES = {"linear": ((4, 6), 0), "conv1d": ((6, 5), 1), "norm": ((7,), None)}
PADDING_AFTER = {"conv1d": 3}


def layout() -> tuple[list[TensorInfo], dict[str, int], int]:
    infos, offsets, at = [], {}, 0
    for name, (shape, axis) in SHAPES.items():
        infos.append(TensorInfo(name, shape, axis))
        offsets[name] = at
        at += int(np.prod(shape)) + PADDING_AFTER.get(name, 0)
    return infos, offsets, at


def partition_map(lo: int, hi: int) -> SegmentMap:
    """The map of flat elements [lo, hi)."""
    infos, offsets, _ = layout()
    segments = []
    for k, info in enumerate(infos):
        first, last = offsets[info.name], offsets[info.name] + int(np.prod(info.shape))
        a, b = max(first, lo), min(last, hi)
        if a < b:
            segments.append(Segment(k, a - first, b - a, a - lo))
    return SegmentMap(infos, segments, hi - lo)


def reference_neurons(total: int) -> np.ndarray:
    """Group neuron id of every flat element (-1 on padding), from np.unravel_index."""
    infos, offsets, _ = layout()
    ids, base = np.full(total, -1), 0
    for info in infos:
        n = int(np.prod(info.shape))
        coords = np.unravel_index(np.arange(n), info.shape)
        ids[offsets[info.name]:offsets[info.name] + n] = base + (coords[info.axis] if info.axis is not None else 0)
        base += info.num_neurons
    return ids


CUTS = [(0, 30), (30, 61), (61, 83), (5, 6), (29, 62)]


@pytest.mark.parametrize(("lo", "hi"), CUTS)
def test_blocks_give_each_element_its_neuron_as_a_per_element_reference_does(lo, hi):
    _, _, total = layout()
    got = np.full(hi - lo, -1)  # padding stays -1
    for block in partition_map(lo, hi).blocks:
        elements = block.view(torch.arange(hi - lo))
        neurons = torch.arange(block.neurons.start, block.neurons.stop)
        neurons = neurons.view(1, -1) if block.columns else neurons.view(-1, 1)
        got[elements.flatten().numpy()] = neurons.expand_as(elements).flatten().numpy()
    expected = np.full(hi - lo, -1)  # a partition may reach past the last tensor (trailing padding)
    reference = reference_neurons(total)[lo:hi]
    expected[:len(reference)] = reference
    np.testing.assert_array_equal(got, expected)


def test_partitions_add_up_to_the_whole_tensors():
    _, offsets, total = layout()
    w, u = torch.randn(total), torch.randn(total)
    maps = [partition_map(0, 30), partition_map(30, 61), partition_map(61, total)]
    sums = sum(m.rotation_sums(w[m_lo:m_hi], u[m_lo:m_hi], zero_mean=True)
               for m, (m_lo, m_hi) in zip(maps, [(0, 30), (30, 61), (61, total)], strict=True))
    conv = w[offsets["conv1d"]:offsets["conv1d"] + 30].view(6, 5)  # neurons are its columns
    conv_u = u[offsets["conv1d"]:offsets["conv1d"] + 30].view(6, 5)
    torch.testing.assert_close(sums[0, 4:9], conv.square().sum(0))
    torch.testing.assert_close(sums[2, 4:9], (conv * conv_u).sum(0))
    torch.testing.assert_close(sums[5], torch.tensor([6.0] * 4 + [6.0] * 5 + [7.0]))


def test_apply_scales_each_element_by_its_neurons_coefficients():
    _, _, total = layout()
    lo, hi = 29, 62
    w, u = torch.randn(hi - lo), torch.randn(hi - lo)
    a, b, c = torch.randn(10), torch.randn(10), torch.randn(10)
    ids = reference_neurons(total)[lo:hi]
    expected = w.clone()
    mask = torch.from_numpy(ids >= 0)
    idx = torch.from_numpy(ids[ids >= 0])
    expected[mask] = a[idx] * w[mask] + b[idx] * u[mask] + c[idx]
    partition_map(lo, hi).apply(w, u, a, b, c)
    torch.testing.assert_close(w, expected)  # padding untouched, every element updated once


def test_a_flat_partition_takes_the_same_rv_step_as_the_tensors(tmp_path):
    """One rank holding the whole group: the flat step must equal the dense optimizer's step."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        infos, offsets, total = layout()
        dense = [torch.nn.Parameter(torch.randn(info.shape)) for info in infos[:2]]  # the two matrices
        flat_source = [torch.nn.Parameter(p.detach().clone()) for p in dense]
        def groups(params: list) -> list[dict]:
            return [{"params": params[:1], "neuron_axis": 0}, {"params": params[1:], "neuron_axis": 1}]

        ref = RotationalOptimizer(groups(dense), lr=0.01, weight_decay=0.1)
        opt = RotationalOptimizer(groups(flat_source), lr=0.01, weight_decay=0.1)
        # Each group becomes one flat partition (the centred weights, as DeepSpeed copies them).
        flats = []
        for k, p in enumerate(flat_source):
            flat = torch.nn.Parameter(p.detach().flatten().clone())
            opt.param_groups[k]["params"] = [flat]
            smap = SegmentMap([infos[k]], [Segment(0, 0, p.numel(), 0)], p.numel())
            opt.adopt_flat_partition(flat, smap, [p], k)
            flats.append(flat)
        for _ in range(3):
            grads = [torch.randn(info.shape) for info in infos[:2]]
            for p, flat, g in zip(dense, flats, grads, strict=True):
                p.grad, flat.grad = g.clone(), g.flatten().clone()
            ref.step()
            opt.step()
        for p, flat in zip(dense, flats, strict=True):
            torch.testing.assert_close(flat.detach().view(p.shape), p.detach(), rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_an_unmapped_flat_partition_is_refused_not_stepped_with_another_rule():
    weight = torch.nn.Parameter(torch.randn(4, 6))
    opt = RotationalOptimizer([{"params": [weight], "rotational": True}], lr=0.01, weight_decay=0.1)
    flat = torch.nn.Parameter(weight.detach().flatten().clone())
    opt.param_groups[0]["params"] = [flat]  # what ZeRO does, without the segment map
    flat.grad = torch.randn_like(flat)
    with pytest.raises(RuntimeError, match="no neuron axis and no segment map"):
        opt.step()
