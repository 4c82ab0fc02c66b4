"""The engine interface the training loop depends on, and the torch engines (docs/design.md §9).

An engine owns the wrapped model and the optimizer of one strategy and gives the loop one vocabulary:

    for micro in range(grad_accum):
        with engine.accumulate(last=micro == grad_accum - 1), engine.autocast():
            loss = loss_of(engine.model(x))           # this rank's micro-batch mean
            engine.backward(loss / grad_accum)
    loss, grad_norm = engine.step(global_mean_loss)   # clip, update; global norm before clipping

Gradient accumulation and clipping mean the same in every strategy: the gradient is the mean
over the global batch (all ranks x micro-steps, each micro-batch equally weighted) and it is
clipped by its global L2 norm, exactly as a single process with `world * grad_accum` micro-steps.
Mixed precision (autocast, a loss scaler, a sharding policy) and clipping are each engine's own
business, so the loop never names a strategy. The torch engines live here; DeepSpeed's is in
pretrain/parallel/zero.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.tensor import DTensor

from pretrain.errors import UserError
from pretrain.model import fold_gains, unwrap
from pretrain.optim.segments import SegmentMap
from pretrain.parallel.host_copy import HostCopy
from pretrain.parallel.world import World

# The rotation tracker's capture, run right before the update: it gets the divisor the update will
# still apply to the gradients (a device scalar), or None where they are already clipped.
BeforeUpdate = Callable[[torch.Tensor | None], None]


@dataclass(frozen=True)
class OptimizerView:
    """Where an update is visible when the model's parameters do not show it (DeepSpeed ZeRO).

    The optimizer updates its own tensors (flat fp32 partitions, mapped to neurons by `maps`,
    keyed by `id(flat)`); `names` maps `id(model parameter)` to its name; per-neuron sums of a
    partitioned state are all-reduced over `group` (None: every rank holds whole tensors), on
    `device`, the compute device: NCCL reduces device tensors only, and the optimizer's own
    tensors say nothing of it (ZeRO-3 empties its groups outside a step).
    """

    optimizer: torch.optim.Optimizer
    names: dict[int, str]
    maps: dict[int, SegmentMap]
    group: Any
    device: torch.device


class Engine(Protocol):
    """What the training loop asks of a strategy; see the module docstring."""

    strategy: str
    raw_model: nn.Module  # the plain `transformers` model (parameters may be sharded)
    model: nn.Module  # what the forward pass runs through (wrapped for the strategy)
    optimizer: torch.optim.Optimizer
    # fp16 with a dynamic loss scaler: a step whose gradient overflowed (non-finite norm, finite
    # loss) was skipped and the scale lowered; that is the scaler's search, not a divergence.
    scales_loss: bool

    def loss_scale(self) -> float:
        """The current loss scale (1.0 where the engine does not scale the loss); may be a host sync."""

    def autocast(self) -> AbstractContextManager[None]:
        """The forward pass's mixed precision (nothing where the engine casts parameters itself)."""

    def accumulate(self, last: bool) -> AbstractContextManager[None]:
        """One micro-step; gradients are reduced over ranks on the `last` one."""

    def backward(self, loss: torch.Tensor) -> None:
        """Add d(loss)/d(parameters) to the accumulated gradient."""

    def step(self, loss: torch.Tensor, before_update: BeforeUpdate | None = None) -> tuple[float, float]:
        """Clip the accumulated gradient and apply the update; return (loss, global norm before clipping).

        `loss` is the global batch's mean loss, still on the device. A non-finite loss drops the
        step's gradients without an update and gives a NaN norm. `before_update`, if given, runs
        right before the parameters change (the rotation tracker's capture), with the clipping
        still to be applied to the gradients: None where they are already clipped in place, else
        a device scalar the update divides them by. It may run for a step that is then dropped
        (the engine that queues its update before reading the loss learns that only after), so
        the caller discards what it captured when the step was not applied. A non-finite norm
        means no update was applied, except under DeepSpeed ZeRO 0 and ZeRO 1/2 in bf16 mode,
        which apply it; the loop stops such a run. Where the engine `scales_loss`, it has also
        lowered the loss scale.
        """

    def optimizer_view(self) -> OptimizerView | None:
        """Where the rotation tracker reads updates; None: the model's own parameters."""

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The plain `transformers` weights (gains folded) on rank 0, None elsewhere; collective."""

    def save_state(self, state_dir: Path) -> None:
        """Training weights and optimizer state into `state_dir` (every rank calls it)."""

    def load_state(self, state_dir: Path) -> None:
        """The inverse of `save_state`; refuses a state another strategy wrote."""


class TorchEngine:
    """Shared by the engines that drive a torch optimizer themselves: loss scaling, clipping, the update."""

    strategy = ""
    casts_parameters = False  # True where the wrapper runs the forward in low precision itself

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World, dtype: torch.dtype,
                 max_norm: float) -> None:
        self.raw_model, self.model, self.optimizer, self.world = model, model, optimizer, world
        self.device = next(model.parameters()).device
        self.dtype, self.max_norm = dtype, max_norm
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)
        self.scales_loss = self.scaler.is_enabled()
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        # Unscaled plain tensors whose optimizer takes its clipping and skip as device tensors step
        # without a host sync in between (`_step_on_device`); anything else reads the loss first.
        self._decides_on_device = not self.scales_loss and takes_device_flags(optimizer) and not any(
            isinstance(p, DTensor) for p in self._params)

    def loss_scale(self) -> float:
        return self.scaler.get_scale()

    def autocast(self) -> AbstractContextManager[None]:
        if self.dtype == torch.float32 or self.casts_parameters:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, loss: torch.Tensor, before_update: BeforeUpdate | None = None) -> tuple[float, float]:
        # Asked every step: an optimizer's answer changes with its groups (add_param_group).
        if self._decides_on_device and takes_device_flags(self.optimizer):
            return self._step_on_device(loss, before_update)
        value = float(loss)  # a host sync: the backward pass must be done
        if not math.isfinite(value):
            self.skip()
            return value, math.nan
        self.scaler.unscale_(self.optimizer)
        norm = clip_grad_norm(self._params, self.max_norm)  # a second one, for the norm
        if not math.isfinite(norm):
            self.scaler.update()  # an fp16 overflow lowers the loss scale; otherwise nothing
            self.skip()
            return value, norm
        if before_update is not None:
            before_update(None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value, norm

    def _step_on_device(self, loss: torch.Tensor, before_update: BeforeUpdate | None) -> tuple[float, float]:
        """The step without waiting for the GPU: the optimizer is queued before the loss and norm are read.

        Its kernels take the clipping and the skip as device tensors (the `grad_scale` and
        `found_inf` a loss scaler would hand torch's fused AdamW): the gradient is divided by
        max(1, (norm + 1e-6) / max_norm), the same clipping as `clip_grad_norm`, and a non-finite
        loss or norm leaves the weights and the optimizer state as they were. The loss and norm
        are copied to the host before the optimizer is queued and read after, so the optimizer
        keeps the GPU busy while the host finishes this step and starts the next one. A measured
        step takes this path too (`before_update` is queued with the rest), so measuring neither
        stalls the GPU nor changes how the update clips.
        """
        grads = [p.grad for p in self._params if p.grad is not None]
        norm = grad_norm(grads) if grads else loss.new_zeros(())
        finite = loss.isfinite() & norm.isfinite()
        numbers = HostCopy(torch.stack([loss.double(), norm.double()]))
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.grad_scale = ((norm.float() + 1e-6) / self.max_norm).clamp_min(1.0) if self.max_norm > 0 \
            else None
        try:
            if before_update is not None:
                before_update(self.optimizer.grad_scale)
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf, self.optimizer.grad_scale
        value, norm_value = numbers.tolist()
        self.optimizer.zero_grad(set_to_none=True)
        if not (math.isfinite(value) and math.isfinite(norm_value)) and hasattr(self.optimizer, "rewind_step"):
            self.optimizer.rewind_step()  # its step counts live on the host (torch's fused AdamW: on the device)
        return value, norm_value if math.isfinite(value) else math.nan

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_view(self) -> OptimizerView | None:
        return None

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        return fold_gains(unwrap(self.raw_model).state_dict(), self.raw_model) if self.world.is_main else None

    def save_state(self, state_dir: Path) -> None:
        if self.world.is_main:
            state_dir.mkdir(parents=True, exist_ok=True)
            save_model(unwrap(self.raw_model), str(state_dir / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), state_dir / "optimizer.pt")
        self._save_scaler(state_dir)

    def load_state(self, state_dir: Path) -> None:
        if not (state_dir / "model.safetensors").is_file():
            raise UserError(f"{state_dir.parent} was not written by a single-process or DDP run; resume it with "
                            "the parallel.strategy it was trained with")
        load_model(unwrap(self.raw_model), str(state_dir / "model.safetensors"))
        # Rank 0 saved it from its own GPU: every rank maps it onto its own device.
        self.optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        self._load_scaler(state_dir)

    def _save_scaler(self, state_dir: Path) -> None:
        """fp16: the loss scale and its growth count (the same on every rank), so a resume is exact."""
        if self.scales_loss and self.world.is_main:
            torch.save(self.scaler.state_dict(), state_dir / "scaler.pt")

    def _load_scaler(self, state_dir: Path) -> None:
        """A checkpoint without scaler.pt (not fp16, or written before it was saved) leaves the scaler fresh."""
        if self.scales_loss and (state_dir / "scaler.pt").is_file():
            self.scaler.load_state_dict(torch.load(state_dir / "scaler.pt", weights_only=True))


class SingleEngine(TorchEngine):
    """One process: the model and its optimizer, under autocast when the precision is not fp32."""

    strategy = "single"


class DDPEngine(TorchEngine):
    """torch DDP: every rank holds the whole model; gradients are averaged on the last micro-step only."""

    strategy = "ddp"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World, dtype: torch.dtype,
                 max_norm: float) -> None:
        super().__init__(model, optimizer, world, dtype, max_norm)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        with contextlib.nullcontext() if last else self.model.no_sync():
            yield


class FSDPEngine(TorchEngine):
    """FSDP2 (`fully_shard`): every parameter a DTensor sharded on dim 0, gradients reduce-scattered.

    The optimizer is built on the sharded parameters (see `shard`), so it sees DTensors and handles
    neurons split across ranks itself (pretrain/optim/rotational.py). The forward runs in `dtype`
    through FSDP's MixedPrecisionPolicy, not autocast. Checkpoints use torch distributed checkpoint
    (DCP): each rank writes its shards, and a run resumes on any world size.
    """

    strategy = "fsdp2"
    casts_parameters = True

    @staticmethod
    def shard(model: nn.Module, param_dtype: torch.dtype) -> nn.Module:
        """fully_shard each transformer block, then the root (embeddings, final norm, tied head)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in _transformer_blocks(model):
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
        self._save_scaler(state_dir)

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
        self._load_scaler(state_dir)


def takes_device_flags(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours `grad_scale` and `found_inf` tensors set on it, as a loss
    scaler hands them, without reading them: torch's fused Adam/AdamW do, in the kernel, and so
    does our optimizer where every tensor takes its Triton step (`takes_device_flags`)."""
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return all(group.get("fused") for group in optimizer.param_groups)
    return bool(getattr(optimizer, "takes_device_flags", False))


def grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads`, on the device (a DTensor where the gradients are).

    Plain tensors of one device and dtype take their norms from one `_foreach_norm`, without
    torch's per-tensor Python, which on a GPT-2 step kept the GPU waiting for ~1 ms
    (benchmarks/RESULTS.md); DTensors (FSDP2) and mixed sets take torch's path.
    """
    plain = not any(isinstance(g, DTensor) for g in grads) and len({(g.device, g.dtype) for g in grads}) == 1
    return (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if plain
            else torch.nn.utils.get_total_norm(grads))


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients to a global L2 norm of at most `max_norm` (<= 0: leave them); return the norm before.

    torch's `clip_grad_norm_` arithmetic (gradients times min(1, max_norm / (norm + 1e-6))), with
    the norm read first (a host sync) and the scaling pass left out when it would multiply by
    exactly 1.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = grad_norm(grads)
    norm = float(total.full_tensor() if isinstance(total, DTensor) else total)
    # A norm this far below max_norm gives a coefficient >= 1, clamped to 1: the pass would change
    # nothing. torch takes the coefficient in the norm's dtype, rounded three times (the sum, a
    # reciprocal, a product), so the margin is a few of that dtype's epsilons (bf16 gradients: 3%).
    margin = max(1e-5, 4 * torch.finfo(total.dtype).eps)
    if max_norm > 0 and math.isfinite(norm) and norm + 1e-6 > max_norm * (1 - margin):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return norm


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM (llama: model.layers, gpt2: transformer.h)."""
    base = getattr(model, model.base_model_prefix, model)
    blocks = getattr(base, "layers", None) or getattr(base, "h", None)
    if blocks is None:
        raise UserError(f"cannot find the transformer blocks of {type(model).__name__} to shard; "
                        "use parallel.strategy=ddp or deepspeed for this model")
    return list(blocks)
