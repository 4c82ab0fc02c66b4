"""DeepSpeed ZeRO 0-3 with the RV math intact (docs/design.md §9).

The run config is the one source of truth: `deepspeed_config` derives batch sizes, ZeRO stage,
clipping and precision from it and merges the optional `parallel.deepspeed_config` JSON (bucket
sizes, ...) under them; a JSON that sets any of those keys differently is refused, and so is optimizer
offload.

After `deepspeed.initialize`, the client optimizer (ours) holds flat 1-D fp32 partitions instead
of the weights. `segment_maps` reads DeepSpeed's flattening (where each model tensor sits in the
flat buffer, and which slice this rank owns) and builds one `SegmentMap` per partition; the
rotational optimizer adopts them, so each neuron's sums are reduced over ranks and the update is
the single-process one. The rotation tracker reads the same partitions through step hooks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import Config
from pretrain.errors import UserError
from pretrain.model import fold_gains
from pretrain.optim.rotational import RotationalOptimizer
from pretrain.optim.segments import Segment, SegmentMap, TensorInfo
from pretrain.parallel.engine import BeforeUpdate, OptimizerView
from pretrain.parallel.world import World
from pretrain.parallel.zero_portable import load_portable, save_portable
from pretrain.params import ParamSpec

_CHECKPOINT_TAG = "deepspeed"


def deepspeed_config(cfg: Config, world: World, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config of this run: ours, over the user's JSON for everything we do not set."""
    t = cfg.train
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world.size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,
    }
    user: dict[str, Any] = {}
    if cfg.parallel.deepspeed_config:
        path = Path(cfg.parallel.deepspeed_config)
        try:
            user = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"parallel.deepspeed_config {path} is not a readable JSON file ({exc}); "
                            "point it at a file such as launch/deepspeed/zero.json") from None
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise UserError(f"parallel.deepspeed_config sets {key!r}, which the run config owns (optim / schedule "
                            "sections); remove it from the JSON")
    for key, value in ours.items():
        given = user.get(key)
        if isinstance(value, dict) and isinstance(given, dict):  # bf16 / fp16: DeepSpeed's loss-scaling keys pass
            for sub, wanted in value.items():
                _refuse_clash(f"{key}.{sub}", given.get(sub, wanted), wanted)
            ours[key] = {**given, **value}
        elif key in user:
            _refuse_clash(key, given, value)
    zero = dict(user.get("zero_optimization", {}))
    if zero.get("stage", cfg.parallel.zero_stage) != cfg.parallel.zero_stage:
        raise UserError(f"parallel.deepspeed_config sets zero_optimization.stage={zero['stage']} but "
                        f"parallel.zero_stage={cfg.parallel.zero_stage}; set the stage in the run config only")
    if zero.get("compute_grad_norm", True) is not True:
        raise UserError("parallel.deepspeed_config sets zero_optimization.compute_grad_norm=false, but the run "
                        "logs and checks the gradient norm every step; remove it from the JSON")
    if str((zero.get("offload_optimizer") or {}).get("device", "none")).lower() != "none":
        # DeepSpeed refuses a client optimizer there unless told not to, and then steps ours on host
        # partitions whose per-neuron sums it would all-reduce over NCCL, which reduces device tensors only.
        raise UserError("parallel.deepspeed_config sets zero_optimization.offload_optimizer, which this project's "
                        "optimizers do not support; remove it from the JSON (a higher parallel.zero_stage also "
                        "saves GPU memory)")
    zero["stage"] = cfg.parallel.zero_stage
    return {**user, **ours, "zero_optimization": zero}


def _refuse_clash(key: str, given: Any, wanted: Any) -> None:
    if given not in (wanted, "auto"):
        raise UserError(f"parallel.deepspeed_config sets {key}={given!r} but the run config gives {wanted!r}; "
                        "remove it from the JSON (the run config is the source of truth)")


class DeepSpeedEngine:
    """`deepspeed.initialize` around the model and our optimizer; the loop's vocabulary on top.

    DeepSpeed casts the model itself (its bf16 / fp16 modes) and clips inside its step with
    `gradient_clipping` from the run config, so `autocast` is empty and `step` only reads the norm.
    In fp16 its ZeRO optimizer scales the loss: on an overflow its step skips the update, lowers the
    scale (after `fp16.hysteresis` overflows, 2 by default) and reports an infinite norm.
    """

    strategy = "deepspeed"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, world: World, cfg: Config,
                 table: list[ParamSpec], dtype: torch.dtype) -> None:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.raw_model, self.optimizer, self.world = model, optimizer, world
        self.device = next(model.parameters()).device
        accelerator = get_accelerator().device_name()
        if accelerator != self.device.type:  # DeepSpeed would move the model there, away from the batches
            raise UserError(f"DeepSpeed's accelerator is {accelerator} (DS_ACCELERATOR="
                            f"{os.environ.get('DS_ACCELERATOR', 'unset')}) but the run trains on {self.device} "
                            f"(train.device={cfg.train.device}); make them agree: set "
                            f"DS_ACCELERATOR={self.device.type} or train.device")
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        # Taken before DeepSpeed partitions (ZeRO-3 keeps the parameter objects, emptied).
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                config=deepspeed_config(cfg, world, dtype))
        self.model: nn.Module = self.ds
        self.stage = cfg.parallel.zero_stage
        try:
            self.maps = segment_maps(self.ds.optimizer, table, self.names, self.stage)
            held = {info.name for segment_map, _, _ in self.maps.values() for info in segment_map.tensors}
            missing = set(self.names.values()) - held if self.stage else set()
            if missing:  # every parameter trains, so DeepSpeed's flat groups must hold each (the export reads them)
                raise RuntimeError(f"DeepSpeed's partitions hold no master weights of {sorted(missing)[0]}; this "
                                   "DeepSpeed version groups parameters differently from what this project expects")
            if isinstance(optimizer, RotationalOptimizer):
                for flat, (segment_map, originals, group_index) in self.maps.items():
                    optimizer.adopt_flat_partition(flat, segment_map, originals, group_index)
        except ValueError as exc:  # an RV configuration the flat partitions cannot honour
            raise UserError(f"{exc} (parallel.strategy=deepspeed, zero_stage={self.stage})") from None
        self._last = True
        self.scales_loss = self.ds.fp16_enabled()

    def loss_scale(self) -> float:
        return float(self.ds.optimizer.loss_scale) if self.scales_loss else 1.0

    def autocast(self) -> AbstractContextManager[None]:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def accumulate(self, last: bool) -> Iterator[None]:
        self._last = last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop already divides by grad_accum
        if not self._last:
            self.ds.step()  # a micro-step: DeepSpeed only counts it

    def step(self, loss: torch.Tensor, before_update: BeforeUpdate | None = None) -> tuple[float, float]:
        value = float(loss)
        if not math.isfinite(value):
            # Nothing to drop: a non-finite loss stops the run (config.validate refuses train.nan_policy=skip
            # under DeepSpeed, whose gradients already sit in its own reduced buffers and whose micro-step
            # count would drift), so the gradients DeepSpeed holds are never applied.
            return value, math.nan
        # ZeRO 1-3 measure the norm inside their step; stage 0 (fp32, whole averaged gradients on
        # every rank) clips without recording it, so it is taken here, before DeepSpeed clips.
        norm = (torch.nn.utils.get_total_norm([p.grad for p in self.raw_model.parameters() if p.grad is not None])
                if self.stage == 0 else None)
        if before_update is not None:
            before_update(None)  # the tracker reads DeepSpeed's gradients inside its step (OptimizerSource)
        scaler = getattr(self.ds.optimizer, "loss_scaler", None)  # replaced by DeepSpeed's load_checkpoint
        if hasattr(scaler, "raise_error_at_min_scale"):
            # An overflow at the minimum scale would raise a bare Exception; the scale stays there instead
            # and the loop stops the run after train.max_skips overflows in a row, with one line.
            scaler.raise_error_at_min_scale = False
        self.ds.step()
        return value, float(norm if norm is not None else self.ds.get_global_grad_norm())

    def optimizer_view(self) -> OptimizerView:
        maps = {id(flat): m for flat, (m, _, _) in self.maps.items()}
        return OptimizerView(self.optimizer, self.names, maps, dist.group.WORLD if self.stage else None, self.device)

    def export_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The fp32 master weights, as the torch engines export them (not the bf16/fp16 copies the model runs on)."""
        if self.stage == 0:  # fp32 only (check_world): the model's own weights are the masters
            return fold_gains(self.raw_model.state_dict(), self.raw_model) if self.world.is_main else None
        masters = full_masters(self.maps, self.world.is_main)
        if not self.world.is_main:
            return None
        params = {name for name, _ in self.raw_model.named_parameters(remove_duplicate=False)}
        # Buffers in the masters' dtype too (DeepSpeed's half modes cast them with the model): one dtype per file.
        buffers = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                   for k, v in self.raw_model.state_dict().items() if k not in params}
        return fold_gains({**buffers, **masters}, self.raw_model)

    def save_state(self, state_dir: Path) -> None:
        # save_latest: DeepSpeed's own tools (zero_to_fp32.py, ds_to_universal) find the tag without -t.
        self.ds.save_checkpoint(str(state_dir), tag=_CHECKPOINT_TAG, save_latest=True)
        if self.maps:  # ZeRO 1-3: also the world-size and stage independent form (zero_portable.py)
            save_portable(self.maps, self.optimizer, state_dir / "portable", self.world.rank)

    def load_state(self, state_dir: Path) -> None:
        if not (state_dir / _CHECKPOINT_TAG).is_dir():
            raise UserError(f"{state_dir.parent} was not written by a DeepSpeed run; resume it with the "
                            "parallel.strategy it was trained with")
        saved = torch.load(state_dir / "trainer.pt", weights_only=True)
        written = (saved.get("world_size"), saved.get("zero_stage"))
        if written != (self.world.size, self.stage):
            if not (self.stage and written[1] and (state_dir / "portable").is_dir()):
                raise UserError(f"{state_dir.parent} was written by DeepSpeed with {written[0]} rank(s) at ZeRO stage "
                                f"{written[1]}; it resumes on another world size or stage only between ZeRO stages "
                                f"1-3 (now {self.world.size} rank(s), stage {self.stage})")
            load_portable(self.maps, self.optimizer, self.ds.optimizer, self.stage, state_dir / "portable")
            return
        path, _ = self.ds.load_checkpoint(str(state_dir), tag=_CHECKPOINT_TAG, load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"DeepSpeed could not load {state_dir / _CHECKPOINT_TAG}; it resumes only on the "
                            "world size and ZeRO stage that wrote it")


SegmentMaps = dict[torch.Tensor, tuple[SegmentMap, list[torch.Tensor], int]]


def segment_maps(zero_optimizer: Any, table: list[ParamSpec], names: dict[int, str], stage: int) -> SegmentMaps:
    """flat fp32 partition -> (its SegmentMap, the model tensors of its group, the param group index)."""
    if stage == 0:
        return {}
    axis = {spec.name: spec.neuron_axis for spec in table}

    def info(p: torch.Tensor, shape: tuple[int, ...]) -> TensorInfo:
        name = names[id(p)]
        return TensorInfo(name, tuple(shape), axis[name])

    maps: SegmentMaps = {}
    if stage in (1, 2):
        opt = zero_optimizer
        for i, originals in enumerate(opt.bit16_groups):
            group = opt.real_dp_process_group[i]
            flat = opt.bit16_groups_flat[i]
            part = opt.parallel_partitioned_bit16_groups[i][dist.get_rank(group=group)]
            fp32 = opt.single_partition_of_fp32_groups[i]
            tensors = [info(p, p.shape) for p in originals]
            order = {id(p): k for k, p in enumerate(originals)}
            part_lo, part_hi = _offset(part, flat), _offset(part, flat) + part.numel()
            segments = []
            for p in opt.round_robin_bit16_groups[i]:
                lo = _offset(p, flat)
                a, b = max(lo, part_lo), min(lo + p.numel(), part_hi)
                if a < b:
                    segments.append(Segment(order[id(p)], a - lo, b - a, a - part_lo))
            maps[fp32] = (SegmentMap(tensors, segments, fp32.numel(), group), list(originals), i)
    else:
        opt = zero_optimizer
        for j, originals in enumerate(opt.fp16_groups):
            group = opt.sub_group_process_groups[j]
            rank = dist.get_rank(group=group)
            flat16, fp32 = opt.fp16_partitioned_groups_flat[j], opt.fp32_partitioned_groups_flat[j]
            tensors = [info(p, p.ds_shape) for p in originals]
            segments = []
            for k, p in enumerate(originals):
                size = p.partition_numel()
                start = rank * size
                length = max(0, min(size, p.ds_numel - start))
                if length:
                    segments.append(Segment(k, start, length, _offset(p.ds_tensor, flat16)))
            maps[fp32] = (SegmentMap(tensors, segments, fp32.numel(), group), list(originals),
                          opt.sub_group_to_group_id[j])
    return maps


def full_masters(maps: SegmentMaps, is_main: bool) -> dict[str, torch.Tensor]:
    """Every model tensor's fp32 master weights, assembled on the group's first rank (empty elsewhere).

    Each rank owns disjoint runs of each tensor (its segments); a tensor is rebuilt from zeros plus every
    rank's runs by one sum-reduce, exact because each element has exactly one nonzero term. One tensor at a
    time: the peak is the largest tensor, not the model (DeepSpeed's GatheredParameters held all of it on
    every rank). Every rank walks the maps in the same order, so the collectives match.
    """
    out: dict[str, torch.Tensor] = {}
    for flat, (segment_map, _, _) in maps.items():
        group = segment_map.group
        by_tensor: dict[int, list[Segment]] = {}
        for seg in segment_map.segments:
            by_tensor.setdefault(seg.tensor, []).append(seg)
        for k, info in enumerate(segment_map.tensors):
            full = torch.zeros(math.prod(info.shape), dtype=torch.float32, device=flat.device)
            for seg in by_tensor.get(k, []):
                full[seg.start:seg.start + seg.length] = flat[seg.offset:seg.offset + seg.length]
            dist.reduce(full, dst=dist.get_global_rank(group, 0), group=group)
            if is_main:
                out[info.name] = full.view(info.shape).cpu()
    return out


def _offset(view: torch.Tensor, flat: torch.Tensor) -> int:
    """Element offset of `view` inside the flat buffer it aliases."""
    offset, rest = divmod(view.data_ptr() - flat.data_ptr(), flat.element_size())
    if rest or not 0 <= offset <= flat.numel():
        raise RuntimeError("a DeepSpeed parameter does not alias its flat buffer; this DeepSpeed version "
                           "flattens differently from what the RV segment map expects")
    return offset
