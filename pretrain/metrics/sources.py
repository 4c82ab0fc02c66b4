"""Where the rotation tracker reads weights and gradients from, under each strategy.

A source turns one optimizer step into per-neuron float64 sums [neurons, 4] of the tracked
tensors (|w_t|^2, <w_t, dw>, |dw|^2, |g|^2, in the tracker's neuron order) over the elements this
rank holds. Sums of a sharded run are then all-reduced over `group`, which gives exactly the
single-process numbers (docs/design.md §5):
- `ModelSource` reads the model's parameters by name: whole tensors (single, DDP) or FSDP2
  DTensor shards (rows of a neuron-axis shard land at their global neuron index; a shard along
  another axis holds part of every neuron and its partial sums add up across ranks). On CUDA
  its fp32 tensors are measured one launch per shape (pretrain/metrics/fused_sums.py `Batch`).
- `FusedSource` has the optimizer's fused step (pretrain/optim/fused.py) write the sums from
  the registers it already holds: no copy of the weights and no extra pass over them.
- `OptimizerSource` watches the optimizer's own step through step hooks, for DeepSpeed, whose
  optimizer updates flat ZeRO partitions (mapped to neurons by their `SegmentMap`) while the
  model's parameters may hold nothing at all (ZeRO-3).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from pretrain.metrics.neurons import neuron_sums, workspace_elements
from pretrain.optim.hyper import KernelRejected
from pretrain.optim.segments import SegmentMap
from pretrain.params import ParameterLookup, ParamSpec, sharded_along_neurons


def _local_rows(p: Tensor, axis: int) -> tuple[Tensor, int, bool]:
    """(local tensor, global index of its first neuron, whether its neurons are split across ranks)."""
    if not isinstance(p, DTensor):
        return p, 0, False
    mesh = p.device_mesh
    if sharded_along_neurons(p, axis):
        n = p.shape[axis]
        return p._local_tensor, min(mesh.get_local_rank() * math.ceil(n / mesh.size()), n), False
    return p._local_tensor, 0, isinstance(p.placements[0], Shard)


def _delta_sums(before: Tensor, after: Tensor, axis: int, workspace: Tensor) -> Tensor:
    """`neuron_sums`, through the Triton kernel where it applies (pretrain/metrics/fused_sums.py)."""
    fused = _fused_sums()
    if fused is not None and fused.supports(before, after):
        return fused.delta_sums(before, after, axis)
    return neuron_sums(before, after, axis, workspace)


def _fused_sums() -> Any:
    try:
        from pretrain.metrics import fused_sums
    except ImportError:  # no Triton: the float64 Gram path alone
        return None
    return fused_sums


def _grad_square_sums(grad: Tensor | None, axis: int, rows: int, device: torch.device) -> Tensor:
    if grad is None:
        return torch.zeros(rows, dtype=torch.float64, device=device)
    dims = tuple(d for d in range(grad.dim()) if d != axis)
    return torch.linalg.vector_norm(grad, dim=dims, dtype=torch.promote_types(grad.dtype, torch.float32)
                                    ).double().square()


def _compiled_batch(fused: Any, weights: list[Tensor], grads: list[Tensor], rows: list[Tensor], axis: int) -> Any:
    """A `fused_sums.Batch` of these tensors with its kernels compiled, or None (with a notice) where the device's
    compiler rejects them: the tensors are then measured one at a time, with the same numbers."""
    batch = fused.Batch(weights, axis)
    try:
        batch.compile(weights, grads, rows)
    except KernelRejected as reason:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"notice: the batched rotation-metric kernels did not compile for {len(weights)} tensors of shape "
                  f"{tuple(weights[0].shape)} ({reason}); they are measured one at a time", file=sys.stderr)
        return None
    return batch


class _SumRows:
    """A measured step's [neurons, 4] float64 sums, and each tracked tensor's rows of them: its local
    neurons at their global index. Allocated and sliced once, then zeroed per step (slicing a view per
    tensor on every measured step was a visible share of its host time on a GPU)."""

    def __init__(self, specs: list[ParamSpec]) -> None:
        self.specs = specs
        self.base = [0]
        for spec in specs:
            self.base.append(self.base[-1] + spec.num_neurons)
        self._out: Tensor | None = None
        self._rows: list[Tensor] = []

    def zeroed(self, params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """(the sums, zeroed; per tracked tensor its rows of them) for this step's `params`."""
        locals_ = [_local_rows(p, spec.neuron_axis) for p, spec in zip(params, self.specs, strict=True)]
        device = locals_[0][0].device if locals_ else torch.device("cpu")
        if self._out is None or self._out.device != device:
            self._out = torch.zeros(self.base[-1], 4, dtype=torch.float64, device=device)
            self._rows = [self._out[self.base[i] + first:self.base[i] + first + local.shape[spec.neuron_axis]]
                          for i, ((local, first, _), spec) in enumerate(zip(locals_, self.specs, strict=True))]
        else:
            self._out.zero_()
        return self._out, self._rows


class ModelSource:
    """Tracked tensors read from the model by name; see the module docstring."""

    def __init__(self, model: nn.Module, specs: list[ParamSpec]) -> None:
        self.specs = specs
        # Read on every use, so a parameter replaced after construction (e.g. by
        # load_state_dict(assign=True)) is still the one measured.
        self._params = ParameterLookup(model, [spec.name for spec in specs])
        self.group = next((p.device_mesh.get_group() for p in self._params() if isinstance(p, DTensor)), None)
        self._workspace = workspace_elements(specs)
        self._before: list[Tensor | None] | None = None  # per tensor: its w_t copy, None where a Batch holds it
        self._sum_rows = _SumRows(specs)
        self._out: Tensor | None = None
        self._rows: list[Tensor] = []
        self._batched: list[tuple[Any, list[int]]] = []
        self._batches: dict[tuple[int, ...], Any] = {}  # fused_sums.Batch by member tensors (None: rejected)
        self._torch_sums: set[int] = set()  # tensors whose batch was rejected: no Triton kernel measures them

    def begin(self, grad_divisor: Tensor | None = None) -> None:
        """Copy w_t and sum |g|^2 of every tracked tensor; `grad_divisor`: the clipping still ahead of the update."""
        params = self._params()
        self._out, self._rows = self._sum_rows.zeroed(params)
        self._before = [None] * len(self.specs)
        fused = _fused_sums()
        batched: dict[tuple, list[tuple[int, Tensor, Tensor]]] = {}  # (shape, axis) -> (index, w, grad)
        for i, (p, spec) in enumerate(zip(params, self.specs, strict=True)):
            local, _, _ = _local_rows(p, spec.neuron_axis)
            grad = p.grad._local_tensor if isinstance(p.grad, DTensor) else p.grad
            if fused is not None and fused.batchable(local, grad):
                batched.setdefault((tuple(local.shape), spec.neuron_axis % 2), []).append((i, local.detach(), grad))
            else:
                self._capture_one(i, local, grad, params)
        self._batched = []
        for (_, axis), entries in batched.items():
            members = [i for i, _, _ in entries]
            weights, grads = [w for _, w, _ in entries], [g for _, _, g in entries]
            rows = [self._rows[i] for i in members]
            if tuple(members) not in self._batches:
                self._batches[tuple(members)] = _compiled_batch(fused, weights, grads, rows, axis)
            batch = self._batches[tuple(members)]
            if batch is None:  # its kernels do not compile on this device: one tensor at a time, in torch
                for i, w, g in entries:
                    self._capture_one(i, w, g, params)
                    self._torch_sums.add(i)
                continue
            batch.capture(weights, grads, rows)
            self._batched.append((batch, members))
        if grad_divisor is not None:  # the update divides every gradient by it: |g / d|^2 = |g|^2 / d^2
            self._out[:, 3].div_(grad_divisor.double().square())

    def _capture_one(self, i: int, local: Tensor, grad: Tensor | None, params: list[Tensor]) -> None:
        """Tensor i's w_t copy and |g|^2 sums, on its own."""
        axis = self.specs[i].neuron_axis
        # An exact copy in the parameter's own dtype: theta needs w_t bit for bit, since a
        # rounded copy (bf16: ~4e-3 relative per element) would add more angle than the
        # ~1e-3 rad per step being measured, and a wider one would only cost more.
        self._before[i] = local.detach().clone()
        self._rows[i][:, 3] += _grad_square_sums(grad, axis, local.shape[axis], local.device)

    def _local(self, i: int, params: list[Tensor]) -> Tensor:
        return _local_rows(params[i], self.specs[i].neuron_axis)[0].detach()

    def end(self) -> Tensor | None:
        if self._before is None:
            return None
        params = self._params()
        workspace = torch.empty(self._workspace, dtype=torch.float64, device=self._out.device)
        for i, (spec, before) in enumerate(zip(self.specs, self._before, strict=True)):
            if before is not None:
                sums = neuron_sums if i in self._torch_sums else _delta_sums
                self._rows[i][:, :3] += sums(before, self._local(i, params), spec.neuron_axis, workspace)
        for batch, members in self._batched:
            batch.measure([self._local(i, params) for i in members], [self._rows[i] for i in members])
        out, self._out, self._before, self._batched = self._out, None, None, []
        return out


class OptimizerSource:
    """Sums taken inside `optimizer.step()` (pre/post step hooks) from the tensors it updates."""

    def __init__(self, optimizer: torch.optim.Optimizer, specs: list[ParamSpec], names: dict[int, str],
                 maps: dict[int, SegmentMap], group: Any, device: torch.device) -> None:
        self.specs, self.names, self.maps, self.group = specs, names, maps, group
        self.base: dict[str, int] = {}
        total = 0
        for spec in specs:
            self.base[spec.name] = total
            total += spec.num_neurons
        self.total = total
        self._axis = {spec.name: spec.neuron_axis for spec in specs}
        # The sums live on the compute device: NCCL all-reduces device tensors only, and host
        # sums would cost a copy (a sync) per tensor per measured step.
        self.device = device
        self._routes = {key: tuple(t.to(self.device) for t in self._route(m)) for key, m in maps.items()}
        self._sums: Tensor | None = None
        self._before: dict[int, Tensor] = {}
        self._workspace = workspace_elements(specs)
        optimizer.register_step_pre_hook(self._pre_step)
        optimizer.register_step_post_hook(self._post_step)

    def _route(self, segment_map: SegmentMap) -> tuple[Tensor, Tensor]:
        """(source, destination): map neurons that are tracked, and their rows in the tracker."""
        src, dst = [], []
        for i, info in enumerate(segment_map.tensors):
            if info.name in self.base:
                src.append(torch.arange(segment_map.base[i], segment_map.base[i] + info.num_neurons))
                dst.append(torch.arange(self.base[info.name], self.base[info.name] + info.num_neurons))
        empty = torch.zeros(0, dtype=torch.int64)
        return (torch.cat(src) if src else empty), (torch.cat(dst) if dst else empty)

    def _tracked(self, optimizer: torch.optim.Optimizer) -> list[Tensor]:
        return [p for g in optimizer.param_groups for p in g["params"]
                if id(p) in self.maps or self.names.get(id(p)) in self.base]

    def begin(self, grad_divisor: Tensor | None = None) -> None:
        """Arm the hooks: the next optimizer step(s) add their sums (ZeRO-3 steps once per sub-group).

        The hooks read the gradients the optimizer steps with, so no `grad_divisor` applies (DeepSpeed gives none).
        """
        self._sums = torch.zeros(self.total, 4, dtype=torch.float64, device=self.device)

    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._sums is None:
            return
        for p in self._tracked(optimizer):
            self._before[id(p)] = p.detach().clone()
            if p.grad is not None:
                self._add(p, slice(3, 4), [_grad_square_sums(g, axis, g.shape[axis], g.device).unsqueeze(1)
                                           for g, axis in self._pieces(p, p.grad)])

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._sums is None:
            return
        workspace: Tensor | None = None
        for p in self._tracked(optimizer):
            if workspace is None:
                workspace = torch.empty(self._workspace, dtype=torch.float64, device=p.device)
            pieces = zip(self._pieces(p, self._before.pop(id(p))), self._pieces(p, p.detach()), strict=True)
            self._add(p, slice(0, 3), [neuron_sums(w0, w1, axis, workspace) for (w0, axis), (w1, _) in pieces])

    def _pieces(self, p: Tensor, t: Tensor) -> list[tuple[Tensor, int]]:
        """`t` (shaped like `p`) in pieces with a neuron axis: a partition's blocks, or the whole tensor (ZeRO 0).

        Summed piece by piece (`neuron_sums` in its bounded workspace), a measured step makes no
        float64 copy of a whole partition: those took up to 40 bytes an element at once."""
        if id(p) in self.maps:
            return [(block.view(t), 1 if block.columns else 0) for block in self.maps[id(p)].blocks]
        return [(t, self._axis[self.names[id(p)]])]

    def _add(self, p: Tensor, columns: slice, sums: list[Tensor]) -> None:
        """Add the [neurons, k] sums of `p`'s pieces into `columns` of its tracker rows."""
        if id(p) not in self.maps:
            start = self.base[self.names[id(p)]]
            self._sums[start:start + len(sums[0]), columns] += sums[0].to(self._sums)
            return
        segment_map = self.maps[id(p)]
        part = self._sums.new_zeros(segment_map.num_neurons, columns.stop - columns.start)
        for block, piece in zip(segment_map.blocks, sums, strict=True):
            part[block.neurons] += piece.to(part)
        src, dst = self._routes[id(p)]
        self._sums[:, columns].index_add_(0, dst, part[src])

    def end(self) -> Tensor | None:
        sums, self._sums = self._sums, None
        return sums


class FusedSource:
    """Sums written by the rotational optimizer's fused step itself; see the module docstring."""

    def __init__(self, model: nn.Module, optimizer: Any, specs: list[ParamSpec]) -> None:
        self.optimizer, self.specs = optimizer, specs
        self._params = ParameterLookup(model, [spec.name for spec in specs])
        self.group = next((p.device_mesh.get_group() for p in self._params() if isinstance(p, DTensor)), None)
        self._sum_rows = _SumRows(specs)
        self._sums: Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, optimizer: Any, specs: list[ParamSpec]) -> FusedSource | None:
        """A FusedSource when `optimizer`'s fused step covers every tracked tensor, else None."""
        covers = getattr(optimizer, "fused_covers", None)
        if covers is None or not specs:
            return None
        if all(covers(model.get_parameter(spec.name), spec.neuron_axis) for spec in specs):
            return cls(model, optimizer, specs)
        return None

    def begin(self, grad_divisor: Tensor | None = None) -> None:
        """Ask the next step for its sums; its kernel divides the gradient by `grad_divisor` before summing it."""
        params = self._params()
        self._sums, rows = self._sum_rows.zeroed(params)
        self.optimizer.request_rotation_sums({id(p): (spec.neuron_axis, r)
                                              for p, spec, r in zip(params, self.specs, rows, strict=True)})

    def end(self) -> Tensor | None:
        self.optimizer.request_rotation_sums({})  # a step that never ran (fp16 overflow) must not keep the request
        sums, self._sums = self._sums, None
        return sums
