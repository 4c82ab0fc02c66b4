"""Distributed training: the launch check, the process group and one engine per strategy (docs/design.md §9).

`ENGINES` is the one place that maps `parallel.strategy` to code; the training loop sees only
the `Engine` protocol.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import Config
from pretrain.optim import build_optimizer
from pretrain.parallel.engine import DDPEngine, Engine, FSDPEngine, OptimizerView, SingleEngine
from pretrain.parallel.stop import StopSignals
from pretrain.parallel.world import (
    StepWatchdog,
    World,
    average_over_ranks,
    barrier,
    check_world,
    close_world,
    decided_by_main,
    init_world,
    mean_over_ranks,
)
from pretrain.params import ParamSpec

__all__ = ["ENGINES", "Engine", "OptimizerView", "StepWatchdog", "StopSignals", "World", "average_over_ranks",
           "barrier", "build_engine", "check_world", "close_world", "decided_by_main", "init_world", "mean_over_ranks"]

EngineBuilder = Callable[[Config, nn.Module, list[ParamSpec], World, torch.dtype], Engine]


def _single(cfg: Config, model: nn.Module, table: list[ParamSpec], world: World, dtype: torch.dtype) -> Engine:
    return SingleEngine(model, build_optimizer(model, table, cfg.optim), world, dtype, cfg.train.grad_clip)


def _ddp(cfg: Config, model: nn.Module, table: list[ParamSpec], world: World, dtype: torch.dtype) -> Engine:
    return DDPEngine(model, build_optimizer(model, table, cfg.optim), world, dtype, cfg.train.grad_clip)


def _fsdp2(cfg: Config, model: nn.Module, table: list[ParamSpec], world: World, dtype: torch.dtype) -> Engine:
    FSDPEngine.shard(model, dtype)  # first: the optimizer must see the sharded (DTensor) parameters
    return FSDPEngine(model, build_optimizer(model, table, cfg.optim), world, dtype, cfg.train.grad_clip)


def _deepspeed(cfg: Config, model: nn.Module, table: list[ParamSpec], world: World, dtype: torch.dtype) -> Engine:
    from pretrain.parallel.zero import DeepSpeedEngine  # imports deepspeed: only when asked for

    return DeepSpeedEngine(model, build_optimizer(model, table, cfg.optim), world, cfg, table, dtype)


# parallel.strategy -> builder; the keys are the config's choices (tests/test_parallel_config.py checks).
ENGINES: dict[str, EngineBuilder] = {"single": _single, "ddp": _ddp, "fsdp2": _fsdp2, "deepspeed": _deepspeed}


def build_engine(cfg: Config, model: nn.Module, table: list[ParamSpec], world: World, dtype: torch.dtype) -> Engine:
    """Wrap `model` (on its device) for `parallel.strategy` and build the optimizer.

    `train.compile` is the loop's business: it compiles the forward pass together with the loss
    (pretrain/loss.py), not the model alone.
    """
    return ENGINES[cfg.parallel.strategy](cfg, model, table, world, dtype)
