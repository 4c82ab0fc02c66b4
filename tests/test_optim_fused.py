"""The fused (Triton) optimizer step against the eager one (issue 10).

On CPU the kernel runs in Triton's interpreter (`TRITON_INTERPRET=1`, set by tests/conftest.py),
so CI checks the same kernel source the GPU compiles; on a CUDA machine the same tests compare
the compiled kernel on CUDA tensors.
Tolerances: both paths compute in fp32 with different summation orders (~1e-7 relative per step).
"""

from __future__ import annotations

import os

import pytest
import torch

from pretrain.logger import read_metrics
from tests.optim_pairs import (
    SHAPES,
    angle_history,
    assert_non_finite_gradient_spreads_alike,
    assert_rotation_sums_equal_a_float64_reference,
    assert_same,
    make_pair,
    run_steps,
    set_grads,
)
from tests.train_utils import tiny_config

triton = pytest.importorskip("triton", reason="Triton is a dev dependency on Linux x86-64 (pip install -e '.[dev]')")


@pytest.fixture
def device() -> str:
    """Where the kernel runs: CUDA, or CPU tensors through Triton's interpreter (optimizers built with fused=True)."""
    if torch.cuda.is_available():
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets the interpreter without a GPU"
    return "cpu"


@pytest.mark.parametrize("rule", ["adamw", "lion", "sgdm"])
@pytest.mark.parametrize("rotational", [True, False], ids=["rv", "plain"])
@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("zero_mean", [True, False], ids=["zero_mean", "no_mean"])
def test_fused_step_matches_eager(device, rule, rotational, axis, zero_mean):
    pairs = make_pair(rule, rotational, axis, zero_mean, device)
    run_steps(pairs)
    assert_same(*pairs)


def use_two_pass_tiles(monkeypatch, elements: int, rows: int, shapes: list[tuple[int, int]], axis: int) -> None:
    """Row tiles of `elements` elements a neuron and column tiles of `rows` rows, which every neuron of `shapes`
    along `axis` exceeds: the kernel takes its two-pass loop for all of them."""
    import pretrain.optim.fused as fused

    monkeypatch.setattr(fused, "ROW_TILE", (elements, 4))
    monkeypatch.setattr(fused, "ONE_PASS_WIDTH", elements)
    monkeypatch.setattr(fused, "COLUMN_TILE", (8, rows, 4))
    for shape in shapes:
        layout = fused.Layout.of(torch.empty(shape), axis)
        assert fused.tile_for(layout)[1] < layout.width, shape


@pytest.mark.parametrize("axis", [0, 1])
def test_two_pass_neurons_match_eager(device, monkeypatch, axis):
    """Neurons longer than a tile take the kernel's two-pass loop."""
    shapes = [(12, 100), (7, 130)] if axis == 0 else [(100, 12), (130, 7)]
    use_two_pass_tiles(monkeypatch, 64, 64, shapes, axis)
    pairs = make_pair("adamw", True, axis, True, device, shapes=shapes)
    run_steps(pairs)
    assert_same(*pairs)


@pytest.mark.parametrize(("shape", "one_pass"), [((3, 2048), True), ((3, 2049), True), ((2, 4096), True),
                                               ((2, 4097), False), ((5, 7), True), ((17, 3), True)])
def test_row_neurons_at_the_tile_boundaries_match_eager(device, shape, one_pass):
    """Widths at ROW_TILE's 2048 elements and ONE_PASS_WIDTH's 4096, and narrow ones (masked, scalar accesses)."""
    import pretrain.optim.fused as fused

    layout = fused.Layout.of(torch.empty(shape), 0)
    assert (fused.tile_for(layout)[1] >= layout.width) == one_pass
    wide = layout.width >= 16  # see tests/optim_pairs.py SHAPES: AdamW's first step on narrow neurons is noise
    pairs = make_pair("adamw" if wide else "sgdm", True, 0, wide, device, shapes=[shape, shape])
    run_steps(pairs, steps=2)
    assert pairs[1][0].fused_fraction == 1.0
    assert_same(*pairs)


@pytest.mark.parametrize("axis", [0, 1])
def test_model_widths_match_eager(device, axis):
    """The tile shapes of real models: llama/GPT-2 widths 768, 2048, 3072 and a 5000-wide (two-pass) neuron."""
    shapes = [(3, 768), (2, 2048), (2, 3072), (2, 5000)] if axis == 0 else [(768, 9), (3072, 9)]
    pairs = make_pair("adamw", True, axis, True, device, shapes=shapes)
    run_steps(pairs, steps=2)
    assert_same(*pairs, rtol=1e-4)  # sums over 3072 fp32 products in another order: ~2e-5 apart


@pytest.mark.parametrize("tile", [(32, 64, 4), (64, 32, 4), (16, 128, 8), (4, 1024, 8)],
                         ids=lambda t: "x".join(map(str, t)))
def test_column_tiles_match_eager(device, monkeypatch, tile):
    """The column tiles the GPU benchmark compares (one and two passes, masked edges), with rotation sums."""
    import pretrain.optim.fused as fused

    monkeypatch.setattr(fused, "COLUMN_TILE", tile)
    pairs = make_pair("adamw", True, 1, True, device, shapes=[(40, 70), (130, 24)])
    run_steps(pairs, steps=2)
    assert_same(*pairs)
    assert_rotation_sums_equal_a_float64_reference(device, True, axis=1)


@pytest.mark.parametrize("rotational", [True, False], ids=["rv", "plain"])
def test_rotation_sums_equal_a_float64_reference(device, rotational):
    assert_rotation_sums_equal_a_float64_reference(device, rotational, axis=1)


@pytest.mark.parametrize("axis", [0, 1])
def test_two_pass_rotation_sums_of_plain_tensors_equal_a_float64_reference(device, monkeypatch, axis):
    """The sums a measured step writes from the kernel's two-pass loop (neurons longer than a tile) for
    tensors the plain rule steps; the rotational ones' are checked with the column tiles above (the
    writing pass, where the sums are taken, is the same code for both)."""
    use_two_pass_tiles(monkeypatch, 16, 8, SHAPES, axis)
    assert_rotation_sums_equal_a_float64_reference(device, False, axis=axis)


def test_training_with_the_fused_step_matches_eager(device, tiny_data_dir, tmp_path):
    """20 steps of the tiny recipe (RV-AdamW, rotation metrics every step through the kernel) vs eager,
    on the kernel's device (fp32, so both runs compute alike)."""
    from pretrain.train import train

    results = {}
    for fused in ("false", "true"):
        cfg = tiny_config(tiny_data_dir, tmp_path / fused, "train.steps=20", "checkpoint.every=100",
                          "optim.rotational_embeddings=true", f"optim.fused={fused}", f"train.device={device}")
        results[fused] = train(cfg)
    eager, fused = results["false"], results["true"]
    for step, loss in eager.losses.items():
        assert fused.losses[step] == pytest.approx(loss, rel=1e-5), step
    assert {r.get("optim/fused_fraction") for r in read_metrics(fused.run_dir) if "train/loss" in r} == {1.0}
    history = [angle_history(r.run_dir) for r in (eager, fused)]
    torch.testing.assert_close(history[1], history[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("rule", ["adamw", "lion", "sgdm"])
def test_a_non_finite_gradient_spreads_as_in_the_eager_step(device, rule):
    assert_non_finite_gradient_spreads_alike(rule, device)


@pytest.mark.parametrize("rotational", [True, False], ids=["rv", "plain"])
def test_a_tensor_without_a_gradient_on_some_steps_keeps_its_own_step_count(device, rotational):
    """Steps without the last tensor's gradient advance only the others' counts; a step with it again
    must not take the plan made when all counts were equal, which steps them all with one count."""
    pairs = make_pair("adamw", rotational, 0, True, device)
    for step in range(5):
        for opt, params in pairs:
            set_grads(params, step)
            if step not in (0, 3):
                params[3].grad = None  # the last tensor of the first group
            opt.step()
    assert [int(pairs[1][0].state[p]["step"]) for p in pairs[1][1]] == [5, 5, 5, 2, 5]
    assert_same(*pairs)


def test_tensors_of_other_step_counts_step_fused_and_report_their_rotation_sums(device):
    """Launches split by step count: after steps without one tensor's gradient every tensor still takes
    the fused step, and a measured step writes every tracked tensor's sums (float64 reference)."""
    pairs = make_pair("adamw", True, 0, True, device)
    (_, params), (opt, fused_params) = pairs
    for step in range(3):
        for o, ps in pairs:
            set_grads(ps, step)
            if step:
                ps[1].grad = None  # a tensor of the same shape as ps[0]: their launch splits
            o.step()
    matrices = fused_params[:-1]
    for _, ps in pairs:
        set_grads(ps, 9)
    before = [p.detach().double().clone() for p in matrices]
    rows = {id(p): (0, torch.zeros(p.shape[0], 4, dtype=torch.float64, device=device)) for p in matrices}
    opt.request_rotation_sums(rows)
    for o, _ in pairs:
        o.step()
    assert opt.fused_fraction == 1.0
    assert [int(opt.state[p]["step"]) for p in matrices] == [4, 2, 4, 4]
    assert_same(*pairs)
    for w0, p in zip(before, matrices, strict=True):
        dw = p.detach().double() - w0
        expected = torch.stack([(w0 * w0).sum(1), (w0 * dw).sum(1), (dw * dw).sum(1),
                                p.grad.double().square().sum(1)], dim=1)
        torch.testing.assert_close(rows[id(p)][1], expected, rtol=1e-12, atol=1e-18)


class _RejectingCompiler:
    """The step kernel on a device whose compiler rejects it: `warmup` (compile only) raises, as Triton's
    does when a lowering pass fails; a launch would still go to the real kernel."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return self.kernel[grid]

    def warmup(self, *args, **kwargs):
        raise RuntimeError("PassManager::run failed")


def test_a_kernel_the_compiler_rejects_takes_the_eager_step_or_stops_in_one_line(device, monkeypatch, capsys):
    import pretrain.optim.fused as fused
    from pretrain.errors import UserError

    monkeypatch.setattr(fused, "_step_kernel", _RejectingCompiler(fused._step_kernel))
    # Required (optim.fused=true): the first step stops before anything changes.
    (_, _), (required, params) = make_pair("adamw", True, 0, True, device)
    before = [p.detach().clone() for p in params]
    set_grads(params, 0)
    with pytest.raises(UserError, match=r"did not compile .*PassManager::run failed.*optim.fused=false") as caught:
        required.step()
    assert "\n" not in str(caught.value)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))

    # Not required (optim.fused=null, the default on CUDA; on CPU only fused=True reaches Triton): the eager
    # step, the same numbers, one notice per launch that did not compile.
    pairs = make_pair("adamw", True, 0, True, device)
    pairs[1][0]._fused_required = False
    capsys.readouterr()
    run_steps(pairs)
    assert_same(*pairs)
    assert pairs[1][0].fused_fraction == 0.0
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 4  # one per shape (three matrix shapes, one vector), at the first step only
    assert all("did not compile" in line and "eager step" in line for line in notices)

    # Rotation sums asked of a kernel that does not compile: no silent gap in the metrics, one line.
    (_, _), (tracked, params) = make_pair("adamw", True, 0, True, device)
    tracked._fused_required = False
    set_grads(params, 0)
    tracked.request_rotation_sums({id(p): (0, torch.zeros(p.shape[0], 4, dtype=torch.float64, device=device))
                                   for p in params[:-1]})
    with pytest.raises(UserError, match="did not compile"):
        tracked.step()


def test_pointer_tables_upload_only_when_an_address_changes(device):
    """The kernels' address tables (on CUDA uploaded without blocking, through pinned memory) hold the
    tensors' addresses, and a table is rebuilt only when one of them moves."""
    from pretrain.optim.fused import PointerTables

    a, b, c = (torch.zeros(4, device=device) for _ in range(3))
    tables = PointerTables(a.device)
    first = tables.get("w", [a, b])
    assert tables.get("w", [a, b]) is first
    assert first.device == a.device and first.tolist() == [a.data_ptr(), b.data_ptr()]
    moved = tables.get("w", [a, c])
    assert moved is not first and moved.tolist() == [a.data_ptr(), c.data_ptr()]
    assert tables.address("w") == (a.data_ptr(), c.data_ptr()) and tables.address("g") is None


def test_loaded_state_is_realigned_for_the_kernels_16_byte_loads(device):
    """A state dict whose tensors are views at 4-byte offsets (a checkpoint of views into one buffer) loads
    into 16-byte-aligned tensors, which `fused.Launch` requires; the values and the next step are unchanged."""
    import pretrain.optim.fused as fused

    pairs = make_pair("adamw", True, 0, True, device)
    run_steps(pairs, steps=2)
    (_, eager_params), (opt, params) = pairs
    state = opt.state_dict()
    for per_param in state["state"].values():
        for name, value in per_param.items():
            if value.dim():
                buffer = torch.empty(value.numel() + 1, dtype=value.dtype, device=value.device)
                per_param[name] = buffer[1:].view_as(value).copy_(value)
                assert per_param[name].data_ptr() % 16
    opt.load_state_dict(state)
    for p in params:
        for name, value in opt.state[p].items():
            assert not value.dim() or fused._aligned(value), name
    for opt_, params_ in pairs:
        set_grads(params_, 2)
        opt_.step()
    assert_same(*pairs)
    assert opt.fused_fraction == 1.0


@pytest.mark.parametrize("rotational", [True, False], ids=["rv", "plain"])
def test_gradients_at_unaligned_addresses_step_as_aligned_ones(device, rotational):
    """Gradients that are views into one flat buffer at 4-byte offsets (FSDP2's reduce-scatter output, say)
    are read from aligned copies, which must outlive the kernel's launch (the tables hold addresses)."""

    def set_unaligned_grads(params: list[torch.Tensor], step: int) -> None:
        set_grads(params, step)
        flat = torch.empty(1 + sum(p.numel() for p in params), device=params[0].device)
        start = 1
        for p in params:
            grad, p.grad = p.grad, flat[start:start + p.numel()].view_as(p)
            p.grad.copy_(grad)
            start += p.numel()
        assert all(p.grad.data_ptr() % 16 for p in params)

    pairs = make_pair("adamw", rotational, 0, True, device)
    for step in range(3):
        for opt, params in pairs:
            set_unaligned_grads(params, step)
            opt.step()
    assert pairs[1][0].fused_fraction == 1.0
    assert_same(*pairs)


def test_a_launch_makes_its_tensors_device_current(monkeypatch):
    """Triton launches on the current CUDA device: `launch` makes the tensors' device current around the
    launch (and the compile-and-load), so a kernel never reads one GPU's pointer tables from another."""
    from pretrain.optim import fused

    events: list[str] = []

    class Guard:  # stands in for torch.cuda.device, which needs a GPU
        def __init__(self, device: torch.device) -> None:
            self.device = device

        def __enter__(self) -> None:
            events.append(f"enter {self.device}")

        def __exit__(self, *exc: object) -> None:
            events.append("exit")

    class Kernel:
        def __getitem__(self, grid: tuple[int, ...]):
            return lambda *args, **constants: events.append(f"run {grid} {args} {constants}")

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(fused, "compile_only", lambda *a: events.append("compile"))
    fused.launch(Kernel(), (2,), (1,), {"X": 3}, torch.device("cuda", 1))
    fused.launch(Kernel(), (2,), (1,), {}, torch.device("cuda", 1), warmup=True)
    fused.launch(Kernel(), (1,), (), {}, torch.device("cpu"))  # the interpreter: no CUDA device to make current
    assert events == ["enter cuda:1", "run (2,) (1,) {'X': 3}", "exit", "enter cuda:1", "compile", "exit",
                      "run (1,) () {}"]
