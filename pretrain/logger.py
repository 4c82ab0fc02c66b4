"""Scalar logging: a JSONL file in the run dir plus TensorBoard, wandb or trackio when asked."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from pretrain.config import Config, config_to_dict
from pretrain.errors import UserError

METRICS_FILE = "metrics.jsonl"


def check_trackers_available(cfg: Config) -> None:
    """Fail before the run starts if a requested tracker is not installed."""
    for name, wanted, module in (("tensorboard", cfg.logging.tensorboard, "tensorboard"),
                                 ("wandb", cfg.logging.wandb, "wandb"), ("trackio", cfg.logging.trackio, "trackio")):
        if wanted and importlib.util.find_spec(module) is None:
            raise UserError(f"logging.{name}=true but the {module} package is not installed; "
                            f"pip install {module} or set logging.{name}=false")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def log_line(step: int, total: int, record: dict[str, float]) -> str:
    """One text line per logged step, for runs without the progress bar (`logging.progress=false`, batch jobs)."""
    parts = [f"step {step}/{total}"]
    if "train/loss" in record:  # the mean over the steps since the previous log line
        parts.append(f"loss {record['train/loss']:.4f}")
    if "val/loss" in record:
        parts.append(f"val {record['val/loss']:.4f}")
    if "train/lr" in record:
        parts.append(f"lr {record['train/lr']:.2e}")
    if "perf/tokens_per_s" in record:
        parts.append(f"{record['perf/tokens_per_s']:,.0f} tok/s")
    return " | ".join(parts)


class MetricsLogger:
    """Writes every record to `metrics.jsonl` and forwards scalars to the enabled trackers.

    On resume the JSONL keeps only records up to the resumed step, so the file always
    describes one consistent trajectory.
    """

    def __init__(self, run_dir: Path, cfg: Config, resume_step: int = 0) -> None:
        self.path = run_dir / METRICS_FILE
        if resume_step > 0:
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")
        self._trackers: list[Any] = []
        log = cfg.logging
        if log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._trackers.append(_TensorBoard(SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1
                                                             if resume_step else None)))
        if log.wandb:
            import wandb

            wandb.init(project=log.project, name=run_dir.name, dir=str(run_dir), config=config_to_dict(cfg),
                       resume="allow")
            self._trackers.append(_WandbLike(wandb))
        if log.trackio:
            import trackio

            trackio.init(project=log.project, name=run_dir.name, config=config_to_dict(cfg), resume="allow")
            self._trackers.append(_WandbLike(trackio))

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                   for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for tracker in self._trackers:
            tracker.log(step, values)

    def close(self) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close()


class _TensorBoard:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandbLike:
    """wandb and trackio share the `log(dict, step=)` / `finish()` interface."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def log(self, step: int, values: dict[str, float]) -> None:
        self.module.log(values, step=step)

    def close(self) -> None:
        self.module.finish()
