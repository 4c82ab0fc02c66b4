"""The parameter classification table (docs/design.md §3).

Every parameter is classified once, from the type of the module that owns it, into a
`ParamSpec`. The optimizer builder, the rotation metrics and the start-up summary all read
this one table; nothing downstream guesses a neuron axis from `p.dim()`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class ParamSpec:
    name: str  # as in model.named_parameters() (parametrized weights end in `.original`)
    shape: tuple[int, ...]
    kind: str  # linear | conv1d | embedding | norm | bias | gain | other
    neuron_axis: int | None  # axis that indexes output neurons; None for vectors
    rotational: bool  # would an RV optimizer treat it rotationally (needs weight decay)
    weight_decay: bool

    @property
    def tracked(self) -> bool:
        """Rotation metrics follow every tensor that has neurons."""
        return self.neuron_axis is not None

    @property
    def num_neurons(self) -> int:
        return self.shape[self.neuron_axis] if self.neuron_axis is not None else 0


class LinearGain(nn.Module):
    """Parametrization W -> diag(g) W along the neuron axis; g is a learnable [out] vector."""

    def __init__(self, num_neurons: int, neuron_axis: int) -> None:
        super().__init__()
        self.neuron_axis = neuron_axis
        self.gain = nn.Parameter(torch.ones(num_neurons))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (self.gain[:, None] if self.neuron_axis == 0 else self.gain[None, :])


def neuron_axis_of(module: nn.Module) -> int | None:
    """The neuron (output) axis of a linear layer's weight; None for any other module.

    `nn.Linear` stores [out, in] (axis 0); transformers' GPT-2 `Conv1D` stores [in, out] (axis 1).
    """
    if isinstance(module, nn.Linear):
        return 0
    if isinstance(module, Conv1D):
        return 1
    return None


class ParameterLookup:
    """The current tensors of named parameters, read on every call without walking the module tree.

    Each name's owning module is found once; its parameter is read from the module on every
    call, so a parameter replaced in place of the old one (`load_state_dict(assign=True)`,
    FSDP2's sharding) is the one returned. `model.get_parameter` walks the tree per name, which
    for the ~100 tracked tensors of a 125M model cost ~1 ms of host time per measured step.
    """

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self._slots: list[tuple[nn.Module, str]] = []
        for name in names:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if attr not in module._parameters:
                raise AttributeError(f"{type(model).__name__} has no parameter {name!r}")
            self._slots.append((module, attr))

    def __call__(self) -> list[torch.Tensor]:
        return [module._parameters[attr] for module, attr in self._slots]


def sharded_along_neurons(p: torch.Tensor, axis: int) -> bool:
    """Whether `p` is a DTensor sharded along its neuron `axis`: each rank then holds whole neurons.

    The one test the optimizer (per-neuron state and sums stay local) and the rotation metrics
    (a shard's rows land at their global neuron index) both rely on.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return False
    placement = p.placements[0]
    return isinstance(placement, Shard) and placement.dim % p.dim() == axis % p.dim()


def _matrix_axis(module: nn.Module) -> tuple[str, int] | None:
    axis = neuron_axis_of(module)
    if axis is not None:
        return ("linear" if axis == 0 else "conv1d"), axis
    if isinstance(module, nn.Embedding):
        return "embedding", 0  # one row per token
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("RMSNorm")


def classify_parameters(model: nn.Module, *, rotational_embeddings: bool) -> list[ParamSpec]:
    """One ParamSpec per unique parameter of `model`, in `named_parameters()` order.

    `rotational_embeddings` has no default: it is `optim.rotational_embeddings` of the run, and a
    benchmark or tool that left it out would measure another optimizer than training runs.
    """
    by_id: dict[int, tuple[str, int | None, bool]] = {}  # id -> (kind, axis, rotational)
    for module in model.modules():
        matrix = _matrix_axis(module)
        if matrix is not None:
            kind, axis = matrix
            weight = (module.parametrizations.weight.original
                      if parametrize.is_parametrized(module, "weight") else module.weight)
            rotational = kind != "embedding" or rotational_embeddings
            by_id.setdefault(id(weight), (kind, axis, rotational))
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter):
                by_id.setdefault(id(bias), ("bias", None, False))
        elif isinstance(module, LinearGain):
            by_id.setdefault(id(module.gain), ("gain", None, False))
        elif _is_norm(module):
            for p in module.parameters(recurse=False):
                by_id.setdefault(id(p), ("norm", None, False))
    table = []
    for name, p in model.named_parameters():
        kind, axis, rotational = by_id.get(id(p), ("other", None, False))
        decay = kind in ("linear", "conv1d", "embedding")
        table.append(ParamSpec(name, tuple(p.shape), kind, axis, rotational and decay, decay))
    return table


def summarize_table(table: list[ParamSpec]) -> str:
    """A compact start-up summary: counts and sizes per kind, axis and rotational flag."""
    groups: Counter[tuple[str, int | None, bool, bool]] = Counter()
    sizes: Counter[tuple[str, int | None, bool, bool]] = Counter()
    for spec in table:
        key = (spec.kind, spec.neuron_axis, spec.rotational, spec.weight_decay)
        groups[key] += 1
        sizes[key] += int(torch.Size(spec.shape).numel())
    lines = [f"{'kind':<10} {'tensors':>7} {'params':>12} {'axis':>4} {'rotational':>10} {'decay':>5}"]
    for key in sorted(groups, key=lambda k: -sizes[k]):
        kind, axis, rot, decay = key
        lines.append(f"{kind:<10} {groups[key]:>7} {sizes[key]:>12,} {'-' if axis is None else axis:>4} "
                     f"{'yes' if rot else 'no':>10} {'yes' if decay else 'no':>5}")
    total = sum(sizes.values())
    lines.append(f"{'total':<10} {len(table):>7} {total:>12,}")
    return "\n".join(lines)
