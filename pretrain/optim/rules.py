"""Inner update rules of the rotational optimizer (docs/design.md §4, step 2).

Each rule advances its moment buffers for a list of tensors with foreach ops and returns
the step direction u *without* learning rate and weight decay. The direction is returned
lazily (`Direction`) so that the plain step can fold the final division into the parameter
update, as torch's AdamW does, and scalar factors never cost a pass over memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Direction:
    """u = scale * numer / denom elementwise (u = scale * numer when denom is None).

    `numer` may alias optimizer state (SGDM's momentum buffer), so it is read-only;
    `denom` is scratch memory owned by the direction.
    """

    numer: list[Tensor]
    denom: list[Tensor] | None
    scale: float

    def add_to(self, params: list[Tensor], alpha: float) -> None:
        """params += alpha * u."""
        if self.denom is None:
            torch._foreach_add_(params, self.numer, alpha=alpha * self.scale)
        else:
            torch._foreach_addcdiv_(params, self.numer, self.denom, value=alpha * self.scale)

    def unscaled(self) -> list[Tensor]:
        """numer / denom as tensors (u / scale), computed into denom's memory to avoid an allocation."""
        if self.denom is None:
            return self.numer
        torch._foreach_reciprocal_(self.denom)
        torch._foreach_mul_(self.denom, self.numer)
        return self.denom


# A rule advances the buffers (named as in torch.optim, so states read familiarly) given the
# gradients, the 1-based step count and the group's hyperparameters, and returns u.
DirectionFn = Callable[[list[Tensor], dict[str, list[Tensor]], int, dict[str, Any]], Direction]


@dataclass(frozen=True)
class Rule:
    name: str
    buffers: tuple[str, ...]  # zero-initialised state tensors shaped like the parameter
    # Plain (non-rotational) decay: SGDM adds wd * p to the gradient (L2 through the momentum, as
    # torch.optim.SGD and the paper's SGDM do); AdamW and Lion decay the weights decoupled.
    coupled_decay: bool
    direction: DirectionFn


def _adamw(grads: list[Tensor], buf: dict[str, list[Tensor]], step: int, group: dict[str, Any]) -> Direction:
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = buf["exp_avg"], buf["exp_avg_sq"]
    torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = math.sqrt(1.0 - beta2 ** step)
    # m_hat / (sqrt(v_hat) + eps) == (sqrt(bc2) / bc1) * m / (sqrt(v) + eps * sqrt(bc2)):
    # the bias corrections become one scalar instead of a division pass.
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_add_(denom, group["eps"] * bias2_sqrt)
    return Direction(exp_avg, denom, bias2_sqrt / bias1)


def _lion(grads: list[Tensor], buf: dict[str, list[Tensor]], step: int, group: dict[str, Any]) -> Direction:
    beta1, beta2 = group["betas"]
    exp_avg = buf["exp_avg"]
    update = torch._foreach_lerp(exp_avg, grads, 1.0 - beta1)  # beta1 * m + (1 - beta1) * g
    torch._foreach_sign_(update)
    torch._foreach_lerp_(exp_avg, grads, 1.0 - beta2)  # the momentum moves after the update is taken
    return Direction(update, None, 1.0)


def _sgdm(grads: list[Tensor], buf: dict[str, list[Tensor]], step: int, group: dict[str, Any]) -> Direction:
    momentum_buffer = buf["momentum_buffer"]
    # From a zero buffer the first step gives buf = g exactly, as torch.optim.SGD's clone does.
    torch._foreach_mul_(momentum_buffer, group["momentum"])
    torch._foreach_add_(momentum_buffer, grads)
    return Direction(momentum_buffer, None, 1.0)


INNER_RULES: dict[str, Rule] = {
    "adamw": Rule("adamw", ("exp_avg", "exp_avg_sq"), coupled_decay=False, direction=_adamw),
    "lion": Rule("lion", ("exp_avg",), coupled_decay=False, direction=_lion),
    "sgdm": Rule("sgdm", ("momentum_buffer",), coupled_decay=True, direction=_sgdm),
}
