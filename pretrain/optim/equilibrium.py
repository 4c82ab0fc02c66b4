"""Expected equilibrium angular update per step, eta_r (docs/design.md §4, step 5).

The same formula serves two purposes: the rotational optimizers use it as their per-step
rotation target, and the rotation metrics compare a plain optimizer's measured angles to it.
"""

from __future__ import annotations

import math

from pretrain.config import OPTIMIZERS

RULES = tuple(dict.fromkeys(kind.rule for kind in OPTIMIZERS.values()))  # adamw, lion, sgdm


def rule_of(optimizer_name: str) -> str:
    """Inner update rule of a config optimizer name: 'rv-adamw' -> 'adamw', 'adamw-plain' -> 'adamw'."""
    if optimizer_name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer_name!r}; expected one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[optimizer_name].rule


def equilibrium_rate(rule: str, lr: float, weight_decay: float,
                     betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.9) -> float:
    """eta_r for `rule` at the scheduled learning rate `lr` (0 when lr or weight decay is 0)."""
    if lr <= 0.0 or weight_decay <= 0.0:
        return 0.0
    b1, b2 = betas
    if rule == "adamw":
        return math.sqrt(2.0 * lr * weight_decay * (1.0 - b1) / (1.0 + b1))
    if rule == "sgdm":
        return math.sqrt(2.0 * lr * weight_decay / (1.0 + momentum))
    if rule == "lion":
        return (math.sqrt(math.pi / 2.0) * math.sqrt(2.0 * lr * weight_decay)
                * math.sqrt((1.0 - b1) ** 2 + b1 ** 2 * (1.0 - b2) / (1.0 + b2)))
    raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
