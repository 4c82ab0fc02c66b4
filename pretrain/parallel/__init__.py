"""Distributed training: the launch check, the process group and one engine per strategy (DESIGN 4, 9)."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.config import Config
from pretrain.optim import build_optimizer
from pretrain.parallel.engine import DDPEngine, Engine, FSDPEngine
from pretrain.parallel.world import (
    StepWatchdog,
    World,
    barrier,
    check_world,
    close_world,
    decided_by_main,
    init_world,
    mean_over_ranks,
)
from pretrain.params import ParamSpec

__all__ = ["Engine", "StepWatchdog", "World", "barrier", "build_engine", "check_world", "close_world",
           "decided_by_main", "init_world", "mean_over_ranks"]


def build_engine(cfg: Config, model: nn.Module, table: list[ParamSpec], world: World, dtype: torch.dtype,
                 scaler: torch.amp.GradScaler) -> Engine:
    """Wrap `model` for `parallel.strategy` and build the optimizer on the parameters it will update."""
    strategy = cfg.parallel.strategy
    if strategy == "fsdp2":  # the optimizer must see the sharded (DTensor) parameters
        FSDPEngine.shard(model, dtype)
        return FSDPEngine(model, build_optimizer(model, table, cfg.optim), world, scaler)
    optimizer = build_optimizer(model, table, cfg.optim)
    if strategy == "deepspeed":
        from pretrain.parallel.zero import DeepSpeedEngine

        return DeepSpeedEngine(model, optimizer, world, cfg, table, dtype)
    return (DDPEngine if strategy == "ddp" else Engine)(model, optimizer, world, scaler)
