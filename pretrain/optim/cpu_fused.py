"""The optimizer step on CPU as one C++ pass per tensor (cpu_step.cpp), built on first use.

`optim.fused: true` on CPU takes this path. The eager step's ~20 foreach passes and per-neuron
sums become one pass that reads each element once, plus a second loop over a neuron's elements
while they are still in L1. That makes RV-Lion cost about what plain Lion costs: see
benchmarks/RESULTS.md § Optimizer step.

The extension is compiled for the host's CPU (`-march=native`), so its name carries a hash of
the CPU's feature flags: nodes of a cluster that share a home directory never load each
other's builds. The first build takes about 30 s and needs a C++ compiler with OpenMP (g++);
later runs load the cached build in ~0.1 s. Ranks that start together build once: torch's
extension loader locks the build folder.

It covers fp32 contiguous tensors: plain ones of any shape, and rotational ones with whole
neurons along dim 0 (any rank) or along dim 1 of a 2-d tensor (GPT-2's Conv1D). The rest
(ZeRO flat partitions, neurons split across ranks, other dtypes) take the eager step, which
tests/test_optim_cpu_fused.py checks it against. On a measured step it also writes the rotation
tracker's float64 sums from the values it already holds, as the Triton kernel does
(`FusedSource`): the metrics add no copy and no pass over the weights.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.optim.hyper import RULE_IDS, Hyper

_SOURCE = Path(__file__).with_name("cpu_step.cpp")
# -fno-math-errno lets the loops vectorise sqrt (AdamW: 2x faster); the step never reads errno.
_CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]


def supports(t: Tensor, grad: Tensor | None, axis: int | None) -> bool:
    """Whether the kernel can step `t` in place (neurons along `axis`; None: plain) from `grad` (None: unknown)."""
    if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or t.numel() == 0:
        return False
    if axis is not None and not (t.dim() >= 2 and axis % t.dim() == 0) and not (t.dim() == 2 and axis % 2 == 1):
        return False
    return grad is None or (grad.dtype == torch.float32 and grad.is_contiguous() and grad.shape == t.shape)


class Launch:
    """Same-rule tensors the kernel steps in one call, walked by neurons along `walk` (0, 1; None: flat)."""

    def __init__(self, walk: int | None, rotational: bool, weights: list[Tensor], moments: list[list[Tensor]],
                 norms: list[Tensor] | None, avgs: list[Tensor] | None) -> None:
        self.rotational = rotational
        self.axis = -1 if walk is None else walk
        self.moments = moments
        self.norms, self.avgs = norms or [], avgs or []
        self.kernel = load()

    def run(self, weights: list[Tensor], grads: list[Tensor], hyper: Hyper, sums: list[Tensor] | None = None,
            warmup: bool = False) -> None:
        """One step; `sums`: per tensor a float64 [neurons, 4] contiguous view for the rotation tracker.

        `warmup` does nothing: the extension was built when the launch was made.
        """
        if warmup:
            return
        if sums is not None and self.axis < 0:
            raise ValueError("rotation sums need a neuron axis to walk")
        m, v = self.moments[0], self.moments[-1]
        self.kernel.step(weights, grads, m, v, self.norms, self.avgs, sums or [], RULE_IDS[hyper.rule], self.axis,
                         self.rotational, hyper.lr, hyper.weight_decay, hyper.beta1, hyper.beta2, hyper.eps,
                         hyper.scale, hyper.eta, hyper.decay, hyper.decay_bias, hyper.rot_eps, hyper.zero_mean,
                         torch.get_num_threads())


def make_launch(walk: int | None, rotational: bool, weights: list[Tensor], moments: list[list[Tensor]],
                norms: list[Tensor] | None, avgs: list[Tensor] | None) -> Launch:
    return Launch(walk, rotational, weights, moments, norms, avgs)


class BuildError(RuntimeError):
    """The extension did not build; the message is the compiler's own first error line."""


@cache
def load() -> Any:
    """The compiled extension module (built into torch's extension cache on first use)."""
    import logging

    from torch.utils import cpp_extension

    name = f"pretrain_cpu_step_{_host_tag()}"
    if not Path(cpp_extension._get_build_directory(name, verbose=False), f"{name}.so").exists():
        print("building the fused CPU optimizer step (once per machine, ~30 s)", flush=True)
    log = logging.getLogger(cpp_extension.__name__)
    level = log.level
    log.setLevel(logging.ERROR)  # its compiler-compatibility warning is a page of text; a failure says enough
    try:
        return cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS, extra_ldflags=["-fopenmp"],
                                  verbose=False)
    except (RuntimeError, OSError) as exc:
        raise BuildError(_first_error(str(exc))) from exc
    finally:
        log.setLevel(level)


def _first_error(log: str) -> str:
    """The line of a failed build's output that says why: the compiler's first error, not the command."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("[", "FAILED:", "ninja:", "Error building"))
              and " -c " not in line]
    errors = [line for line in useful if "error" in line.lower() or "not found" in line.lower()]
    return (errors or useful or lines or ["no output"])[0][:300]


def _host_tag() -> str:
    """A short hash of this CPU's model and feature flags (the build targets them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info = "\n".join(sorted({line for line in lines if line.startswith(("flags", "model name", "Features"))}))
    except OSError:
        import platform

        info = platform.processor() + platform.machine()
    return hashlib.sha1(info.encode()).hexdigest()[:10]
