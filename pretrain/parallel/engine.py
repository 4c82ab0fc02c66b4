"""Strategies: how one optimizer step is computed and saved under single, DDP, FSDP2 (DESIGN 4).

An `Engine` owns the wrapped model and the optimizer and gives the loop one vocabulary:

    for micro in range(grad_accum):
        with engine.accumulate(last=micro == grad_accum - 1):
            loss = loss_of(engine.model(x))           # this rank's micro-batch mean
            engine.backward(loss / grad_accum)
    grad_norm = engine.clip(max_norm)                  # global norm, before clipping
    engine.step()

Gradient accumulation and clipping mean the same in every strategy: the gradient is the mean
over the global batch (all ranks x micro-steps, each micro-batch equally weighted) and it is
clipped by its global L2 norm, exactly as a single process with `world * grad_accum` micro-steps.
DeepSpeed (pretrain/parallel/zero.py) implements the same interface with its own engine.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.errors import UserError
from pretrain.metrics.sources import OptimizerSource
from pretrain.model import fold_gains, unwrap
from pretrain.parallel.world import World
from pretrain.params import ParamSpec


class Engine:
    """Single process and DDP: every rank holds the whole model and optimizer state."""

    strategy = "single"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                 scaler: torch.amp.GradScaler) -> None:
        self.raw_model, self.model, self.optimizer, self.world, self.scaler = model, model, optimizer, world, scaler

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def tracker_source(self, specs: list[ParamSpec]) -> OptimizerSource | None:
        """Where the rotation tracker reads from; None: the model's parameters (ModelSource)."""
        return None

    def clip(self, max_norm: float) -> float | None:
        """Unscale, clip to `max_norm` (0: no clipping) and return the global norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def step(self) -> float | None:
        """Apply the optimizer step; returns the gradient norm where the strategy computes it in here."""
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return None

    def skip(self) -> None:
        """Drop this step's gradients (a non-finite loss under nan_policy=skip)."""
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The plain `transformers` weights (gains folded) on rank 0, None elsewhere; collective."""
        return fold_gains(unwrap(self.raw_model).state_dict(), self.raw_model) if self.world.is_main else None

    def save_state(self, state_dir: Path) -> None:
        """Training weights and optimizer state into `state_dir` (all ranks call it)."""
        if self.world.is_main:
            state_dir.mkdir(parents=True, exist_ok=True)
            save_model(unwrap(self.raw_model), str(state_dir / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")

    def load_state(self, state_dir: Path) -> None:
        if not (state_dir / "model.safetensors").is_file():
            raise UserError(f"{state_dir.parent} was not written by a single-process or DDP run; resume it with "
                            "the parallel.strategy it was trained with")
        load_model(unwrap(self.raw_model), str(state_dir / "model.safetensors"))
        self.optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", weights_only=True))


class DDPEngine(Engine):
    """torch DDP: gradients are averaged over ranks in backward, on the last micro-step only."""

    strategy = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World,
                 scaler: torch.amp.GradScaler) -> None:
        super().__init__(model, optimizer, world, scaler)
        device_ids = [model.device.index] if model.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.model.no_sync():
            yield


class FSDPEngine(Engine):
    """FSDP2 (`fully_shard`): every parameter a DTensor sharded on dim 0, gradients reduce-scattered.

    The optimizer is built on the sharded parameters, so it sees DTensors and handles neurons
    split across ranks itself (pretrain/optim/rotational.py). Checkpoints use torch distributed
    checkpoint (DCP): each rank writes its shards, and a run resumes on any world size.
    """

    strategy = "fsdp2"

    @staticmethod
    def shard(model: nn.Module, param_dtype: torch.dtype) -> nn.Module:
        """fully_shard each transformer block, then the root (embeddings, final norm, tied head)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        blocks = _transformer_blocks(model)
        for block in blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(last)
        yield

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return fold_gains(full, self.raw_model) if self.world.is_main else None

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save_state(self, state_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), checkpoint_id=str(state_dir / "dcp"))

    def load_state(self, state_dir: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (state_dir / "dcp").is_dir():
            raise UserError(f"{state_dir.parent} was not written by an FSDP2 run; resume it with the "
                            "parallel.strategy it was trained with")
        if hasattr(self.optimizer, "init_state"):  # a complete template: DCP loads only what it names
            self.optimizer.init_state()
        state = self._state()
        dcp.load(state, checkpoint_id=str(state_dir / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM (llama: model.layers, gpt2: transformer.h)."""
    base = getattr(model, model.base_model_prefix, model)
    blocks = getattr(base, "layers", None) or getattr(base, "h", None)
    if blocks is None:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__} to shard; "
                        "use parallel.strategy=ddp or deepspeed for this model")
    return list(blocks)
