"""What the fused kernels (Triton and C++) share with the optimizer: a step's scalars, a rejected kernel."""

from __future__ import annotations

import math
from dataclasses import dataclass

RULE_IDS = {"adamw": 0, "lion": 1, "sgdm": 2}


class KernelRejected(RuntimeError):
    """The device's compiler or loader would not take a kernel; nothing of it has run."""


@dataclass
class Hyper:
    """The scalars of one step (host floats: no device sync, no recompilation)."""

    rule: str
    lr: float
    weight_decay: float
    beta1: float  # AdamW/Lion beta1, SGDM momentum
    beta2: float
    eps: float  # AdamW eps * sqrt(1 - beta2^t), as the eager rule folds the bias correction
    scale: float  # u's scalar factor: sqrt(1 - beta2^t) / (1 - beta1^t) for AdamW, else 1
    eta: float = 0.0  # the equilibrium rotation rate
    decay: float = 0.9  # update-norm average decay
    decay_bias: float = 1.0  # 1 - decay^t
    rot_eps: float = 1e-8
    zero_mean: bool = True

    @staticmethod
    def for_step(group: dict, step: int, eta: float = 0.0) -> Hyper:
        rule = group["rule"]
        if rule == "adamw":
            beta1, beta2 = group["betas"]
            bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
            eps, scale = group["eps"] * bias2_sqrt, bias2_sqrt / (1.0 - beta1 ** step)
        elif rule == "lion":
            (beta1, beta2), eps, scale = group["betas"], 0.0, 1.0
        else:
            beta1, beta2, eps, scale = group["momentum"], 0.0, 0.0, 1.0
        return Hyper(rule, float(group["lr"]), float(group["weight_decay"]), beta1, beta2, eps, scale, eta,
                     group["update_norm_decay"], 1.0 - group["update_norm_decay"] ** step, group["rotational_eps"],
                     group["zero_mean"])
