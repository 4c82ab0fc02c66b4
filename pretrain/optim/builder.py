"""Optimizer from the parameter table and the optim config (docs/design.md §3 and §4).

Groups come from the table, never from tensor shapes: tensors without weight decay (norms,
biases, gains) get weight_decay 0 and are never rotational; for the rv-* optimizers the
rotational tensors are grouped by neuron axis. Groups carry the parameter names
(`param_names`, torch's own field), so state dicts and logs say which tensor is which.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pretrain.config import OPTIMIZERS, OptimConfig
from pretrain.errors import UserError
from pretrain.optim.rotational import FusedStepUnavailable, RotationalOptimizer
from pretrain.params import ParamSpec


def param_groups(model: nn.Module, table: list[ParamSpec], weight_decay: float,
                 rotational: bool) -> list[dict[str, Any]]:
    """Groups keyed by (decay, rotational, neuron axis), in the table's order of first appearance."""
    groups: dict[tuple[bool, bool, int | None], dict[str, Any]] = {}
    for spec in table:
        p = model.get_parameter(spec.name)
        if not p.requires_grad:
            continue
        rot = rotational and spec.rotational
        key = (spec.weight_decay, rot, spec.neuron_axis if rot else None)
        group = groups.setdefault(key, {"params": [], "weight_decay": weight_decay if spec.weight_decay else 0.0,
                                        "rotational": rot})
        if rot:
            group["neuron_axis"] = spec.neuron_axis
        group["params"].append((spec.name, p))
    return list(groups.values())


def build_optimizer(model: nn.Module, table: list[ParamSpec], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names in `config.OPTIMIZERS`: torch's AdamW, or ours with a rule, plain or RV."""
    kind = OPTIMIZERS[cfg.name]
    groups = param_groups(model, table, cfg.weight_decay, rotational=kind.rotational)
    if kind.torch_adamw:
        for group in groups:
            del group["rotational"]  # torch's AdamW has no use for it
        fused = cfg.fused if cfg.fused is not None else all(p.is_cuda for p in model.parameters())
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, fused=fused, foreach=not fused)
    try:
        return RotationalOptimizer(groups, rule=kind.rule, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   betas=tuple(cfg.betas), momentum=cfg.momentum, eps=cfg.eps,
                                   update_norm_decay=cfg.update_norm_decay, zero_mean=cfg.zero_mean,
                                   per_neuron=cfg.per_neuron, center_init=cfg.center_init,
                                   rotational_eps=cfg.rotational_eps, fused=cfg.fused)
    except FusedStepUnavailable as exc:
        raise UserError(f"optim.fused=true: {exc}; set optim.fused=null (the default) or false") from exc
