"""Learning-rate schedules as pure functions of the optimizer step (so resume is exact)."""

from __future__ import annotations

import math

from pretrain.config import ScheduleConfig


def lr_at(step: int, peak_lr: float, total_steps: int, cfg: ScheduleConfig) -> float:
    """Learning rate for optimizer step `step` (1-based) of `total_steps`.

    Warmup is linear from peak/warmup to peak over `warmup_steps` (0 means none). After
    warmup: constant; cosine or linear decay to `min_lr_ratio * peak` at the last step;
    or warmup-stable-decay (flat, then a linear decay over the last `decay_fraction`).
    """
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return peak_lr * step / cfg.warmup_steps
    floor = peak_lr * cfg.min_lr_ratio
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step <= decay_start:
            return peak_lr
        return peak_lr - (peak_lr - floor) * (step - decay_start) / decay_steps
    # The first post-warmup step runs at the peak and the last step at the floor.
    span = max(1, total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps - 1) / span))
    if cfg.name == "linear":
        return peak_lr - (peak_lr - floor) * progress
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))
