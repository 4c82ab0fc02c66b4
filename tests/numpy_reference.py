"""An independent float64 numpy re-derivation of the optimizers, written from docs/design.md §4.

It follows the math step by step (centre, direction, radial removal, zero mean, update-norm
average, rotation, zero mean, rescale), one neuron matrix at a time, and shares no code with
`pretrain.optim`, so agreement with it is evidence, not tautology.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def eta_r(rule: str, lr: float, wd: float, betas: tuple[float, float], momentum: float) -> float:
    """docs/design.md §4, step 5."""
    b1, b2 = betas
    if rule == "adamw":
        return math.sqrt(2 * lr * wd * (1 - b1) / (1 + b1))
    if rule == "sgdm":
        return math.sqrt(2 * lr * wd / (1 + momentum))
    return math.sqrt(math.pi / 2) * math.sqrt(2 * lr * wd) * math.sqrt((1 - b1) ** 2 + b1 ** 2 * (1 - b2) / (1 + b2))


def to_neurons(x: np.ndarray, axis: int | None) -> np.ndarray:
    """A [neurons, elements] copy: one row per slice along `axis` (axis None: one row, the whole tensor)."""
    if axis is None:
        return x.reshape(1, -1).copy()
    return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1).copy()


def from_neurons(rows: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return rows.reshape(shape)
    moved = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.moveaxis(rows.reshape(moved), 0, axis)


@dataclass
class Tensor:
    """One parameter: its value and its state."""

    w: np.ndarray
    rotational: bool
    axis: int | None  # neuron axis; None: the whole tensor is one neuron
    wd: float
    m: np.ndarray = field(init=False)  # first moment / Lion momentum / SGD momentum buffer
    v: np.ndarray = field(init=False)  # AdamW second moment
    n: np.ndarray | None = None  # per-neuron norms
    s: np.ndarray | None = None  # per-neuron update-norm average

    def __post_init__(self) -> None:
        self.w = self.w.astype(np.float64)
        self.m = np.zeros_like(self.w)
        self.v = np.zeros_like(self.w)


class Reference:
    """Plain or rotational AdamW / Lion / SGDM over a list of tensors, stepped with given gradients."""

    def __init__(self, tensors: list[Tensor], rule: str, betas: tuple[float, float] = (0.9, 0.999),
                 momentum: float = 0.9, eps: float = 1e-8, c: float = 0.9, zero_mean: bool = True,
                 center_init: bool = True, rot_eps: float = 1e-8) -> None:
        self.tensors, self.rule, self.betas, self.momentum, self.eps = tensors, rule, betas, momentum, eps
        self.c, self.zero_mean, self.rot_eps = c, zero_mean, rot_eps
        self.t = 0
        for x in tensors:
            if not x.rotational:
                continue
            rows = to_neurons(x.w, x.axis)
            x.n = np.linalg.norm(rows, axis=1)  # step 1: the initial norm is kept
            if center_init:
                centred = rows - rows.mean(axis=1, keepdims=True)
                centred *= (x.n / np.linalg.norm(centred, axis=1))[:, None]
                x.w = from_neurons(centred, x.w.shape, x.axis)
            x.s = np.zeros_like(x.n)

    def direction(self, x: Tensor, g: np.ndarray) -> np.ndarray:
        """Step 2: the inner step direction without lr and without weight decay."""
        b1, b2 = self.betas
        if self.rule == "adamw":
            x.m = b1 * x.m + (1 - b1) * g
            x.v = b2 * x.v + (1 - b2) * g * g
            m_hat = x.m / (1 - b1 ** self.t)
            v_hat = x.v / (1 - b2 ** self.t)
            return m_hat / (np.sqrt(v_hat) + self.eps)
        if self.rule == "lion":
            u = np.sign(b1 * x.m + (1 - b1) * g)
            x.m = b2 * x.m + (1 - b2) * g
            return u
        x.m = self.momentum * x.m + g
        return x.m.copy()

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        self.t += 1
        for x, g in zip(self.tensors, grads, strict=True):
            g = g.astype(np.float64)
            if x.rotational:
                self.rotate(x, self.direction(x, g), lr)
            elif self.rule == "sgdm":  # L2 decay through the momentum buffer
                x.w = x.w - lr * self.direction(x, g + x.wd * x.w)
            else:  # decoupled decay
                u = self.direction(x, g)
                x.w = x.w * (1 - lr * x.wd) - lr * u

    def rotate(self, x: Tensor, u_full: np.ndarray, lr: float) -> None:
        w = to_neurons(x.w, x.axis)
        u = to_neurons(u_full, x.axis)
        # Step 3: remove the radial part, then the mean.
        u = u - w * (np.sum(u * w, axis=1) / np.sum(w * w, axis=1))[:, None]
        if self.zero_mean:
            u = u - u.mean(axis=1, keepdims=True)
        # Step 4: the update-norm average, with ||u||^2 the sum of squares over each neuron's elements.
        x.s = self.c * x.s + (1 - self.c) * np.sum(u * u, axis=1)
        s_hat = x.s / (1 - self.c ** self.t)
        # Steps 5-6.
        eta = eta_r(self.rule, lr, x.wd, self.betas, self.momentum)
        w = w - eta * (x.n / (np.sqrt(s_hat) + self.rot_eps))[:, None] * u
        if self.zero_mean:
            w = w - w.mean(axis=1, keepdims=True)
        w = w * (x.n / np.linalg.norm(w, axis=1))[:, None]
        x.w = from_neurons(w, x.w.shape, x.axis)
