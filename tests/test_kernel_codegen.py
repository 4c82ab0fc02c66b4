"""What our Triton kernels compile to for a Hopper GPU (sm_90), compiled here without one.

Session 8 found that every global load and store of the fused optimizer step and of the batched
rotation sums was a 32-bit one: the 16-byte alignment of the tensors was said of the int64
address before its cast to a pointer, where the compiler loses it, and the kernels needed
222-255 registers a thread (one CTA an SM). Timing needs a GPU; what the compiler makes of a
kernel does not. `benchmarks/kernel_codegen.py` compiles every launch of a parameter set as
Triton's JIT would, from the launches the code itself plans (on meta tensors), and reads the PTX
and the cubin. It runs in a subprocess: the tests' process runs Triton's interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton is a dev dependency on Linux x86-64 (pip install -e '.[dev]')")

ROOT = Path(__file__).resolve().parents[1]


def compiled_launches(shapes: str) -> list[dict]:
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "benchmarks/kernel_codegen.py", "--set", shapes, "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def launches(request) -> list[dict]:
    return compiled_launches(request.param)


def test_every_launch_is_compiled(launches):
    """Every kind a GPU run makes: steps queued (flags), measured ones too since session 9, and measured steps
    that read the flags first (FSDP2, fp16)."""
    labels = [launch["launch"] for launch in launches]
    for kind in ("step rv-adamw flags", "step rv-adamw tracked flags", "step rv-adamw tracked:", "step rv-lion flags",
                 "sums capture_kernel", "sums delta_kernel"):
        assert any(label.startswith(kind) for label in labels), kind
    assert any(label.startswith("step adamw flags:") and "norms" not in label for label in labels)  # plain AdamW


def test_tiles_move_through_128_bit_loads_and_stores(launches):
    """The elements of a tile move 128 bits at a time; what is left are per-neuron scalars (norms, flags)."""
    # The lowest share is RV-Lion's on rows: 6 128-bit loads of its 3 roles beside the per-neuron norm and
    # average and the two flags, 0.80; before the alignment fix every share was 0.
    for launch in launches:
        assert launch["load_vector_share"] >= 0.75, launch
        assert launch["store_vector_share"] >= 0.75, launch
        assert launch["loads"].get("v4.b32", 0) >= 2, launch  # two roles at least (w and g; the sums' w_t, w)


def test_every_launch_leaves_room_for_16_warps_an_sm(launches):
    """A memory-bound kernel needs loads in flight: its registers must leave two 8-warp CTAs an SM or more."""
    for launch in launches:
        assert launch["warps_per_sm"] >= 16, launch
        assert launch["local_bytes"] == 0, launch  # nothing spilled


def test_occupancy_counts_registers_as_the_hardware_allocates_them():
    """A warp's registers come in units of 256 (a thread's count rounded up to 8), and an SM holds 64 warps."""
    from collections import Counter

    from benchmarks.kernel_codegen import Codegen

    def occupancy(registers: int, warps: int) -> tuple[int, int]:
        code = Codegen(registers, 0, Counter(), Counter(), warps)
        return code.ctas_per_sm, code.warps_per_sm

    assert occupancy(41, 8) == (5, 40)  # 48 registers allocated: 65536 // (48 * 256) = 5, not 65536 // (41 * 256) = 6
    assert occupancy(80, 8) == (3, 24) and occupancy(128, 8) == (2, 16)
    assert occupancy(24, 8) == (8, 64)  # the registers would hold 10 CTAs
    assert occupancy(16, 1) == (32, 32)  # at most 32 CTAs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_offline_compile_is_the_jits_own():
    """On a GPU: the PTX compiled here for the device's architecture is the one Triton's JIT makes there."""
    import pretrain.optim.fused as fused
    from benchmarks.kernel_codegen import KernelLaunch, compile_for
    from pretrain.optim.hyper import Hyper

    def tensors() -> list[torch.Tensor]:
        return [torch.randn(768, 768, device="cuda") for _ in range(2)]

    weights, norms = tensors(), [torch.ones(768, device="cuda") for _ in range(2)]
    launch = fused.make_launch(0, True, weights, [tensors(), tensors()], norms, [n.clone() for n in norms])
    _, args, constants = launch.arguments(weights, tensors(), Hyper("adamw", 1e-3, 0.1, 0.9, 0.95, 1e-8, 1.0))
    major, minor = torch.cuda.get_device_capability()
    jit = fused._step_kernel.warmup(*args, grid=(1,), **constants)
    jit = jit.result() if hasattr(jit, "result") else jit
    assert compile_for(KernelLaunch("rv-adamw", fused._step_kernel, args, constants), 10 * major + minor).ptx \
        == jit.asm["ptx"]
