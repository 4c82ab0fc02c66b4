"""Per-neuron rotation metrics of any optimizer, measured from weights and gradients alone.

Per optimizer step the training loop does::

    measuring = tracker.should_measure(step)
    if measuring: tracker.capture(divisor)         # after backward, right before optimizer.step()
    optimizer.step()
    if measuring: tracker.queue_measure(step, lr)  # tracker.discard() if the step was dropped
    ...                                            # the next step is queued and reads its loss
    scalars = tracker.scalars(step)                # arrived meanwhile: no wait

Only measurement steps cost anything: `capture` keeps one exact copy of the tracked weights
(in their own dtype) and the per-neuron gradient norms; `queue_measure` reduces the step's
change per neuron, frees the copy and queues the per-layer numbers' copy to the host.
`measure(step, lr)` is `queue_measure` and `scalars` at once, waiting for the update. The
quantities and file format: docs/rotation-metrics.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import OptimConfig
from pretrain.metrics.history import EQUILIBRIUM_TOLERANCE, LAYER_METRICS, RotationHistory
from pretrain.metrics.neurons import LAYER_STATS, NEURON_METRICS, LayerSums, layer_stats, neuron_metrics
from pretrain.metrics.sources import FusedSource, ModelSource, OptimizerSource
from pretrain.metrics.store import write_rotation
from pretrain.optim.equilibrium import equilibrium_rate, rule_of
from pretrain.parallel.host_copy import HostCopy
from pretrain.params import ParamSpec

STATE_VERSION = 1
# Logger name group of each per-layer metric: `rotation/<group>/<layer>`.
LOG_GROUPS = {"theta_mean": "angle", "theta_rms": "angle_rms", "theta_cv": "cv", "ratio": "ratio",
              "rel_update": "rel_update", "grad_norm": "grad_norm", "weight_norm": "weight_norm"}
# Wrapper prefixes (torch.compile, DDP, transformers base models) and weight suffixes that
# carry no information in a layer name.
_PREFIXES = ("_orig_mod.", "module.", "model.", "transformer.")
_SUFFIXES = (".parametrizations.weight.original", ".weight")


def layer_name(param_name: str) -> str:
    """Short display name: 'model.layers.0.mlp.up_proj.weight' -> 'layers.0.mlp.up_proj'."""
    name = param_name
    while name.startswith(_PREFIXES):
        name = name.split(".", 1)[1]
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


class RotationTracker:
    """Measures the per-neuron angular update of every tracked tensor of `table`."""

    def __init__(self, model: nn.Module, table: list[ParamSpec], optim_cfg: OptimConfig, every: int,
                 source: ModelSource | OptimizerSource | FusedSource | None = None) -> None:
        if every < 0:
            raise ValueError(f"rotation metrics interval must be >= 0 (0 turns them off), got {every}")
        self.every = every
        self.specs = [spec for spec in table if spec.tracked]
        names = [layer_name(spec.name) for spec in self.specs]
        self.layers = names if len(set(names)) == len(names) else [spec.name for spec in self.specs]
        self._history = RotationHistory(self.layers)
        # Per-neuron values of the latest measurement ([neurons, NEURON_METRICS]); split into
        # `snapshot`'s per-layer dict only when read (a checkpoint), not on every measured step.
        self._latest: torch.Tensor | None = None
        self._snapshot: dict[str, dict[str, torch.Tensor]] = {}
        # `rotation/...` logger keys of `history.values[-1]` flattened metric-major.
        self._keys = [f"rotation/{LOG_GROUPS[metric]}/{layer}" for metric in LAYER_METRICS for layer in self.layers]
        self.source = source or ModelSource(model, self.specs)
        self._optim = optim_cfg
        self._rule = rule_of(optim_cfg.name)
        self._neurons = [spec.num_neurons for spec in self.specs]
        self._layer_sums = LayerSums(self._neurons)
        self._line = ""
        # The queued measurement (`queue_measure`) whose per-layer figures are still on their way
        # to the host: (step, lr, their copy). Recorded in `history` by `_record`.
        self._queued: tuple[int, float, HostCopy] | None = None

    # ------------------------------------------------------------------ the per-step protocol

    def should_measure(self, step: int) -> bool:
        """Every `every` optimizer steps, and the first step (where warmup-free runs differ most)."""
        return self.every > 0 and (step % self.every == 0 or step == 1)

    @torch.no_grad()
    def capture(self, grad_divisor: torch.Tensor | None = None) -> None:
        """Remember the pre-step weights and per-neuron gradient norms; call right before optimizer.step().

        `grad_divisor`: the clipping the update will still apply to the gradients (a device scalar
        it divides them by), or None where they are already clipped; the gradient norms recorded
        are the clipped ones either way. Follow with `measure`, or `discard` if the step was dropped.
        """
        self.source.begin(grad_divisor)

    @torch.no_grad()
    def discard(self) -> None:
        """Forget a capture whose step was dropped (non-finite), so nothing of it is recorded."""
        self.source.end()

    def measure(self, step: int, lr: float) -> dict[str, float]:
        """Compare to the captured weights; record and return `rotation/...` scalars (finite ones only).

        Waits for the update to finish; `queue_measure` + `scalars` is the same without the wait."""
        self.queue_measure(step, lr)
        return self.scalars(step)

    @torch.no_grad()
    def queue_measure(self, step: int, lr: float) -> None:
        """`measure` without waiting for the device: the figures are recorded once they reach the host.

        What reads the history (`scalars` of this step, `history`, `state_dict`, `save`) records
        them first, waiting for them if they are still on their way; so does the next
        `queue_measure`, by which time they have arrived.
        """
        self._record()
        sums = self.source.end()
        if sums is None:
            raise RuntimeError("RotationTracker.measure() needs capture() before optimizer.step()")
        if self.source.group is not None:  # sharded: each rank summed the elements it holds
            dist.all_reduce(sums, group=self.source.group)
        metrics = neuron_metrics(sums[:, :3], sums[:, 3].sqrt())
        self._latest, self._snapshot = metrics, {}
        self._queued = (step, lr, HostCopy(layer_stats(metrics, self._layer_sums.to(metrics.device))))

    def scalars(self, step: int) -> dict[str, float]:
        """The `rotation/...` scalars of measured step `step` (finite ones only).

        Waits only if `step` is the queued measurement: a later one stays queued."""
        if self._queued is not None and self._queued[0] == step:
            self._record()
        steps = self._history.steps
        if len(steps) and steps[-1] == step:  # the loop's case: no search over a long run's history
            return self._scalars(len(steps) - 1)
        at = np.flatnonzero(steps == step)
        if not at.size:
            raise KeyError(f"step {step} was not measured")
        return self._scalars(int(at[-1]))

    @property
    def history(self) -> RotationHistory:
        """Every recorded measurement (a queued one is recorded first)."""
        self._record()
        return self._history

    @property
    def snapshot(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per-neuron values of the latest measurement: layer -> NEURON_METRICS -> [neurons] ({} before any)."""
        if self._latest is not None:
            self._snapshot = {layer: dict(zip(NEURON_METRICS, part.unbind(dim=1), strict=True))
                              for layer, part in zip(self.layers, self._latest.split(self._neurons), strict=True)}
            self._latest = None
        return self._snapshot

    def summary_line(self) -> str:
        """Short progress-bar text of the latest recorded measurement, e.g. 'θ/η 1.02 eq 10/14' (layers
        within ±10%); '' before any. It does not wait for a queued one."""
        return self._line

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict:
        """History and latest snapshot; tensors, lists, dicts and numbers only (weights_only-loadable)."""
        return {"version": STATE_VERSION, "history": self.history.state_dict(),
                "snapshot": {layer: {k: v.cpu().clone() for k, v in m.items()} for layer, m in self.snapshot.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"rotation tracker state version {state.get('version')} is not {STATE_VERSION}")
        history = RotationHistory.from_state_dict(state["history"])
        if history.layers != self.layers:
            raise ValueError(f"rotation history tracks {len(history.layers)} layers {history.layers[:3]}..., "
                             f"this model tracks {len(self.layers)} layers {self.layers[:3]}...")
        self._history, self._queued = history, None
        self._latest, self._snapshot = None, {layer: dict(m) for layer, m in state["snapshot"].items()}
        self._line = self._summarize() if len(history) else ""

    def save(self, directory: Path) -> None:
        """Write the checkpoint's `rotation/` folder into `directory` (created if missing)."""
        write_rotation(Path(directory), self._layer_table(), self._optimizer_info(), self.every, self.history,
                       self.snapshot)

    # ------------------------------------------------------------------ internals

    def _record(self) -> None:
        """Append the queued measurement, if any, to the history (waiting for its figures)."""
        if self._queued is None:
            return
        step, lr, copy = self._queued
        per_layer = dict(zip(LAYER_STATS, copy.tensor().numpy().T, strict=True))
        self._queued = None  # only once read: a failed read (a broken device) leaves it queued
        eta_r = equilibrium_rate(self._rule, lr, self._optim.weight_decay, self._optim.betas, self._optim.momentum)
        layer_eta = np.array([eta_r if spec.weight_decay else 0.0 for spec in self.specs])
        per_layer["ratio"] = np.divide(per_layer["theta_mean"], layer_eta,
                                       out=np.full(len(self.specs), np.nan), where=layer_eta > 0)
        self._history.append(step, lr, eta_r, np.stack([per_layer[m] for m in LAYER_METRICS], axis=1))
        self._line = self._summarize()

    def _scalars(self, index: int) -> dict[str, float]:
        """The logger scalars of the history's measurement `index`."""
        history = self._history
        out = dict(zip(self._keys, history.values[index].T.ravel().tolist(), strict=True))  # metric-major
        out["rotation/eta_r"] = float(history.eta_r[index])
        # This measurement only: over the whole history a long run's measured steps would grow O(steps).
        out["rotation/ratio_mean"] = float(history.ratio_mean(first=index)[0])
        out["rotation/balance"] = float(history.balance(first=index)[0])
        # Undefined values (no eta_r without weight decay, a layer whose theta is 0) stay
        # NaN in the history but are left out here, so logger graphs have no holes.
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def _summarize(self) -> str:
        ratio = self._history.column("ratio")[-1]
        defined = ~np.isnan(ratio)
        if not defined.any():  # no eta_r (no weight decay): the mean angle itself
            theta = self._history.column("theta_mean")[-1]
            theta = theta[~np.isnan(theta)]
            return f"θ {theta.mean():.1e}" if theta.size else "θ nan"
        inside = int((np.abs(ratio[defined] - 1.0) <= EQUILIBRIUM_TOLERANCE).sum())
        return f"θ/η {self._history.ratio_mean(first=-1)[0]:.2f} eq {inside}/{int(defined.sum())}"

    def _layer_table(self) -> list[dict]:
        return [{"name": layer, "param": spec.name, "kind": spec.kind, "shape": list(spec.shape),
                 "neuron_axis": spec.neuron_axis, "neurons": spec.num_neurons, "rotational": spec.rotational,
                 "weight_decay": spec.weight_decay} for layer, spec in zip(self.layers, self.specs, strict=True)]

    def _optimizer_info(self) -> dict:
        o = self._optim
        return {"name": o.name, "rule": self._rule, "lr": o.lr, "weight_decay": o.weight_decay,
                "betas": list(o.betas), "momentum": o.momentum}
