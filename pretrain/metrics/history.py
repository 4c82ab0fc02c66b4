"""Per-layer rotation history and the model-level numbers derived from it (docs/design.md §5).

The history is a dense [measurements, layers, metrics] float64 array plus per-measurement
step, lr and eta_r. Everything model-level (mean ratio, balance, time to equilibrium) is
derived from it by the functions here, so the tracker, the checkpoint reader and the report
all compute these numbers one way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Per-layer metrics, in the order of the history's last axis (see docs/rotation-metrics.md).
LAYER_METRICS = ("theta_mean", "theta_rms", "theta_cv", "ratio", "rel_update", "grad_norm", "weight_norm")
# A layer is in equilibrium while |theta_mean / eta_r - 1| <= this.
EQUILIBRIUM_TOLERANCE = 0.1


class RotationHistory:
    """Append-only per-layer measurements; arrays grow by doubling so appends stay O(layers)."""

    def __init__(self, layers: list[str]) -> None:
        self.layers = list(layers)
        self._n = 0
        self._step = np.zeros(0, np.int64)
        self._lr = np.zeros(0, np.float64)
        self._eta_r = np.zeros(0, np.float64)
        self._values = np.zeros((0, len(self.layers), len(LAYER_METRICS)), np.float64)

    def __len__(self) -> int:
        return self._n

    def append(self, step: int, lr: float, eta_r: float, values: np.ndarray) -> None:
        """Add one measurement; `values` is [layers, len(LAYER_METRICS)]."""
        if values.shape != self._values.shape[1:]:
            raise ValueError(f"expected values of shape {self._values.shape[1:]}, got {values.shape}")
        if self._n and step <= self._step[self._n - 1]:
            raise ValueError(f"rotation history is at step {self._step[self._n - 1]}; cannot append step {step}")
        if self._n == len(self._step):
            capacity = max(16, 2 * self._n)
            self._step, self._lr, self._eta_r, self._values = (
                _grown(a, capacity) for a in (self._step, self._lr, self._eta_r, self._values))
        self._step[self._n], self._lr[self._n], self._eta_r[self._n] = step, lr, eta_r
        self._values[self._n] = values
        self._n += 1

    @property
    def steps(self) -> np.ndarray:
        return self._step[: self._n]

    @property
    def lr(self) -> np.ndarray:
        return self._lr[: self._n]

    @property
    def eta_r(self) -> np.ndarray:
        return self._eta_r[: self._n]

    @property
    def values(self) -> np.ndarray:
        """[measurements, layers, metrics] view."""
        return self._values[: self._n]

    def column(self, metric: str) -> np.ndarray:
        """[measurements, layers] view of one metric of LAYER_METRICS."""
        return self.values[:, :, LAYER_METRICS.index(metric)]

    # ------------------------------------------------------------------ model-level numbers

    def ratio_mean(self, first: int = 0) -> np.ndarray:
        """Per measurement from index `first` on (-1: the latest alone), mean of theta/eta_r over the
        layers where it is defined (NaN if none)."""
        return _nanmean(self.column("ratio")[first:], axis=1)

    def balance(self, first: int = 0) -> np.ndarray:
        """Per measurement from index `first` on, max/min of the layers' mean theta (NaN when the smallest is 0)."""
        theta = self.column("theta_mean")[first:]
        if theta.shape[1] == 0:
            return np.full(len(theta), np.nan)
        high, low = np.fmax.reduce(theta, axis=1), np.fmin.reduce(theta, axis=1)  # fmax/fmin skip NaN
        return np.divide(high, low, out=np.full(len(theta), np.nan), where=low > 0)

    def time_to_equilibrium(self) -> list[int | None]:
        """Per layer: the first measured step from which every later ratio is within tolerance.

        Only measurements with eta_r > 0 count: at lr 0 (the end of a decay-to-zero schedule)
        no layer can rotate at a rate of 0, and that one step would otherwise undo every layer.
        """
        counted = self.eta_r > 0
        inside = np.abs(self.column("ratio") - 1.0) <= EQUILIBRIUM_TOLERANCE  # NaN compares False
        outside = ~inside & counted[:, None]
        # Index of the first measurement after the last one outside the band (0 when never outside).
        after_last_out = np.where(outside.any(axis=0), self._n - np.argmax(outside[::-1], axis=0), 0)
        # ... moved on to the first counted measurement at or after it.
        next_counted = np.minimum.accumulate(np.where(counted, np.arange(self._n), self._n)[::-1])[::-1]
        next_counted = np.append(next_counted, self._n)
        return [int(self.steps[j]) if (j := next_counted[i]) < self._n else None for i in after_last_out]

    def overall_time_to_equilibrium(self, counted: Sequence[bool] | None = None) -> int | None:
        """Max over the counted layers that have an eta_r; None until every one of them is in equilibrium.

        `counted` selects the layers (default: all). Callers pass the rotational-eligible ones, so
        a plain optimizer and its RV are judged on the same tensors; an embedding that an RV
        leaves plain would otherwise hold the RV's time back forever.
        """
        defined = ~np.isnan(self.column("ratio")).all(axis=0)
        if counted is not None:
            defined &= np.asarray(counted, dtype=bool)
        times = [t for t, d in zip(self.time_to_equilibrium(), defined, strict=True) if d]
        if not times or any(t is None for t in times):
            return None
        return max(times)

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """Tensors, lists and strings only, so `torch.load(weights_only=True)` reads it back."""
        return {"layers": list(self.layers), "metrics": list(LAYER_METRICS),
                "step": torch.from_numpy(self.steps.copy()), "lr": torch.from_numpy(self.lr.copy()),
                "eta_r": torch.from_numpy(self.eta_r.copy()), "values": torch.from_numpy(self.values.copy())}

    @classmethod
    def from_arrays(cls, layers: list[str], step: np.ndarray, lr: np.ndarray, eta_r: np.ndarray,
                    values: np.ndarray) -> RotationHistory:
        history = cls(layers)
        for i in range(len(step)):
            history.append(int(step[i]), float(lr[i]), float(eta_r[i]), values[i])
        return history

    @classmethod
    def from_state_dict(cls, state: dict) -> RotationHistory:
        if list(state["metrics"]) != list(LAYER_METRICS):
            raise ValueError(f"rotation history has metrics {state['metrics']}, expected {list(LAYER_METRICS)}")
        return cls.from_arrays(state["layers"], state["step"].numpy(), state["lr"].numpy(),
                               state["eta_r"].numpy(), state["values"].numpy())


def _grown(a: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros((capacity,) + a.shape[1:], a.dtype)
    out[: len(a)] = a
    return out


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """np.nanmean without its warning on all-NaN slices (those give NaN)."""
    finite = ~np.isnan(a)
    count = finite.sum(axis=axis)
    total = np.where(finite, a, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(total.shape, np.nan), where=count > 0)
