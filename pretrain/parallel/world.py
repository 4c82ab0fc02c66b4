"""The process group: what the launcher started, checked against what the config asks for.

Every launcher we support (torchrun, `accelerate launch`, the `deepspeed` launcher, the SLURM
script, which runs torchrun per node) exports RANK, WORLD_SIZE and LOCAL_RANK; the strategy
itself lives only in the run config. A launch that does not deliver what the config asks for
is refused before anything is built: `accelerate launch --cpu` and the `deepspeed` launcher both
fall back to one process without a word, which would otherwise train a different run.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.errors import UserError

T = TypeVar("T")

# Environment variables accelerate sets when its own FSDP / DeepSpeed plugin is chosen; the
# strategy and its settings come from the run config, so a launch config with a plugin is refused
# (as is an accelerate mixed precision other than train.precision).
_ACCELERATE_STRATEGY_ENV = {"ACCELERATE_USE_FSDP": "fsdp2", "ACCELERATE_USE_DEEPSPEED": "deepspeed"}


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; fix the launch script") from None


def launched_world() -> World:
    """Rank, world size and local rank from the launcher's environment (1 process without one)."""
    return World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))


def check_world(cfg: Config, world: World | None = None) -> World:
    """Refuse a launch whose processes, rank or strategy differ from what the config asks for."""
    world = world or launched_world()
    strategy, wanted = cfg.parallel.strategy, cfg.parallel.world_size
    if wanted is not None and world.size != wanted:
        raise UserError(f"parallel.world_size={wanted} but the launcher started {world.size} process(es); "
                        "fix the launch command (e.g. torchrun --nproc_per_node) or the config")
    if world.size > 1 and strategy == "single":
        raise UserError(f"the launcher started {world.size} processes but parallel.strategy=single; "
                        "launch one process or choose a distributed strategy (ddp, fsdp2, deepspeed)")
    if not 0 <= world.rank < world.size or not 0 <= world.local_rank < world.size:
        raise UserError(f"the launcher gave RANK={world.rank} LOCAL_RANK={world.local_rank} for WORLD_SIZE="
                        f"{world.size}; fix the launch script")
    for env, plugin in _ACCELERATE_STRATEGY_ENV.items():
        if os.environ.get(env, "").lower() in ("1", "true"):
            raise UserError(f"the accelerate launch config enables its {plugin} plugin, whose settings pretrain does "
                            "not read; use a plain multi-process accelerate config from launch/accelerate/ and set "
                            f"parallel.strategy (now {strategy}) in the run config")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if mixed not in ("no", "", cfg.train.precision):
        raise UserError(f"accelerate launch asks for --mixed_precision {mixed}, which pretrain does not apply; launch "
                        f"with mixed_precision 'no' and set train.precision (now {cfg.train.precision}) instead")
    if strategy == "deepspeed" and cfg.parallel.zero_stage == 0 and cfg.train.precision in ("bf16", "fp16"):
        raise UserError("DeepSpeed with half precision wraps the optimizer in its own flat-partition optimizer; "
                        "set parallel.zero_stage to 1, 2 or 3 (or train.precision=fp32)")
    return world


def init_world(cfg: Config, device: torch.device) -> bool:
    """Check the launch, then join the process group (gloo on CPU, NCCL on GPUs) if there is one.

    Returns whether this call created the group (and so should destroy it): a group the caller
    initialised already is used as it is. The collective timeout (`parallel.timeout_s`) bounds how
    long the survivors of a dead rank wait before they fail; under torchrun the agent stops them at once.
    """
    world = check_world(cfg)
    if device.type == "cuda":
        # The run's device becomes the current one: Triton kernels, CUDA events and new streams
        # use the current device, and a single process on `train.device=cuda:1` left it at cuda:0.
        torch.cuda.set_device(device)
    if cfg.parallel.strategy == "single" or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "MASTER_ADDR" not in os.environ:
        if world.size > 1:
            raise UserError("WORLD_SIZE > 1 but MASTER_ADDR is not set; start the run with torchrun, "
                            "accelerate launch or the deepspeed launcher")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29500"))
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s))
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise UserError(f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the launcher "
                        f"said {world.rank} of {world.size}; fix the launch script")
    return True


def close_world() -> None:
    """Leave the process group, after collecting the run's objects while the interpreter is whole.

    FSDP2's modules and DTensors form reference cycles that hold the group; one freed at interpreter
    exit lets gloo's worker threads touch Python objects as it shuts down (seen once in CI: "terminate
    called without an active exception", SIGABRT on a rank that had finished). No barrier: a peer that
    failed after the loop (its plot, its run folder) would turn a finished rank's exit into an error.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def average_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """This rank's `values` (on its device) averaged over all ranks, on the device: no host sync.

    Reduced in float64: the logged loss is the global batch's, and reading each rank's number
    first and uploading it again would cost a sync for the read and one for the upload.
    """
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.double()
        dist.all_reduce(values)
        values = values / dist.get_world_size()
    return values


def mean_over_ranks(values: torch.Tensor) -> list[float]:
    """`average_over_ranks` of 1-d `values`, read in one host sync."""
    return average_over_ranks(values).tolist()


def decided_by_main(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 alone (file checks, notices) and give every rank its result or its UserError."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", decide())]
        except UserError as exc:
            box = [("error", str(exc))]
    dist.broadcast_object_list(box, src=0)  # in memory, from our own rank 0
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


class StepWatchdog:
    """Ends this process when a training step stalls: a hung or dead peer blocks every collective.

    The collective timeout (`parallel.timeout_s`) must cover slow setup, evaluation and checkpoint
    writes, so it is long; a training step is short and regular. From the second step on (the first
    includes warm-up and compilation) a step may take `parallel.step_timeout_s` or 10x the slowest
    step so far, whichever is longer. Checkpoints and the first evaluation run `paused()`; later
    evaluations call `progress()` after every batch. A stalled rank prints one line and exits, and
    the launcher stops the rest. Off in a single process.
    """

    def __init__(self, limit_s: float, rank: int, enabled: bool) -> None:
        self.limit_s, self.rank = limit_s, rank
        self._lock = threading.Lock()
        self._started: float | None = None  # when the running step (or its rest after a pause) began
        self._armed = False
        self._longest = 0.0
        self._step = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """A new step begins."""
        now = time.monotonic()
        with self._lock:
            if self._started is not None:
                if self._armed:  # the first step's time (warm-up, compilation) sets no limit
                    self._longest = max(self._longest, now - self._started)
                self._armed = True
            self._started, self._step = now, step

    def progress(self) -> None:
        """Work inside a step moved on (a val batch): restart the stall clock, keep the step limit."""
        with self._lock:
            if self._started is not None:
                self._started = time.monotonic()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        with self._lock:
            self._started = None
        try:
            yield
        finally:
            with self._lock:
                self._started = time.monotonic()

    def stop(self) -> None:
        """End the watch and wait for its thread: no thread of ours outlives the run into interpreter exit."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.wait(min(1.0, self.limit_s / 10)):
            with self._lock:
                if not (self._armed and self._started is not None):
                    continue
                limit = max(self.limit_s, 10 * self._longest)
                stalled = time.monotonic() - self._started
            if stalled > limit:
                print(f"error: rank {self.rank}: step {self._step} made no progress for {stalled:.0f} s (a hung or "
                      "dead rank; raise parallel.step_timeout_s if steps are really this slow); stopping, the run is "
                      "kept: continue it with --resume auto", file=sys.stderr, flush=True)
                os._exit(1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
