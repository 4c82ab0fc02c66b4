"""benchmarks/gpu_summary.py reads a gpu_check report into issue 10's one table (no GPU needed)."""

from __future__ import annotations

import pytest

from benchmarks.gpu_summary import Report, figures, summary
from tests.train_utils import REPO

SYNTHETIC = """## Device

(started at 0s)
NVIDIA H100 80GB HBM3, 570.0, 81559 MiB
torch 2.11.0 | transformers 5.17.0 | triton 3.6.0

## A heading of another kind ends the device lines

## 1. nanoGPT bench.py

time per iteration: 30.0000ms, MFU: 140.00%

## 2. Ours, gpt2

| optimizer | rotation_every | step ms | fwd+bwd ms | update ms | loop ms | tokens/s | MFU | peak GiB | vs first row |
|---|---|---|---|---|---|---|---|---|---|
| adamw | 0 | 32.0 | 30.0 | 2.0 | 31.0 | 500,000 | 40.0% | 12.00 | 1.000x |
| adamw | 1 | 35.2 | 30.0 | 5.2 | 34.0 | 454,545 | 36.4% | 12.00 | 0.909x |
| rv-adamw | 0 | 33.0 | 30.0 | 3.0 | 32.0 | 490,000 | 39.2% | 12.00 | 0.980x |
| adamw-plain | 0 | 32.5 | 30.0 | 2.5 | 31.5 | 495,000 | 39.6% | 12.00 | 0.985x |
| adamw-plain | 1 | 33.8 | 30.0 | 3.8 | 32.8 | 476,000 | 38.1% | 12.00 | 0.947x |

## 4. Optimizer step alone

`python3 benchmarks/bench_optim_gpu.py --reps 40`

FAILED rc=124: the llama set timed out, so only the GPT-2 table follows

`python3 benchmarks/bench_optim_gpu.py --set gpt2 --reps 30`

optimizer step, gpt2 parameter set (124.4M fp32), NVIDIA H100 80GB HBM3, torch 2.11.0, median of 30
| optimizer | step ms | vs torch fused AdamW | host ms |
|---|---|---|---|
| torch-fused | 1.000 | 1.00x | 0.500 |
| rv-adamw | 3.000 | 3.00x | 0.400 |
| rv-adamw:eager | 0.100 | 0.10x | 0.400 |
| rv-adamw+sums | 0.500 | 0.50x | 0.400 |
| rv-adamw@32x64 | 1.050 | 1.05x | 0.400 |
| rv-adamw@64x32 | 1.500 | 1.50x | 0.400 |

`python3 benchmarks/bench_sums_gpu.py --set gpt2 --reps 30`

rotation sums of a measured step, gpt2 set (52 tracked tensors, 124.4M fp32), NVIDIA H100 80GB HBM3, median of 30
| kernels | device ms | vs torch fused AdamW | host ms |
|---|---|---|---|
| torch fused AdamW step | 1.000 | 1.00x | 0.300 |
| sums @8x128x4 (default) | 4.000 | 4.00x | 0.200 |
| sums @8x256x8 | 2.000 | 2.00x | 0.200 |

## 3. Ours, llama

FAILED rc=1: out of memory

## 7. Before

| optimizer | rotation_every | step ms | fwd+bwd ms | update ms | tokens/s | MFU | peak GiB | vs first row |
|---|---|---|---|---|---|---|---|---|
| adamw | 0 | 80.0 | 70.0 | 10.0 | 400,000 | 31.0% | 23.81 | 1.000x |
"""


def _by_name(report: Report) -> dict[str, float | None]:
    return {f.name: f.value for f in figures(report)}


def test_the_committed_h200_report_gives_the_figures_in_results_md():
    """The figures RESULTS.md quotes for run 2, read back from its unedited report."""
    values = list(_by_name(Report.parse((REPO / "benchmarks" / "gpu_check_h200.md").read_text())).values())
    nano, rv_gpt2, mfu_before, mfu, rv_llama, peak_before, peak = values[:7]
    assert nano == pytest.approx(34.3688 / 37.2) and rv_gpt2 == pytest.approx(390_111 / 440_210)
    assert mfu == 40.4 and rv_llama == pytest.approx(508_067 / 516_528) and peak == 17.75
    assert mfu_before is None and peak_before is None  # run 2 did not run section 7
    step_rv_adamw, step_rv_lion, best_row_tile, best_tile = values[7:11]
    assert step_rv_adamw == pytest.approx(2.591 / 1.692) and step_rv_lion == pytest.approx(2.216 / 1.692)
    assert best_row_tile == step_rv_adamw  # only the default row tile was timed
    assert best_tile is None  # the GPT-2 parameter set came later
    table = summary(Report.parse((REPO / "benchmarks" / "gpu_check_h200.md").read_text()))
    assert table.startswith("Device: NVIDIA H200") and "| 0.924x | >= 1.000x | **not met** |" in table
    assert "+47.3%" in table  # rotation_every=1 on compiled GPT-2, adamw: 54.8 / 37.2 ms


def test_tiles_before_rows_and_failed_sections():
    report = Report.parse(SYNTHETIC)
    rows = {f.name: f for f in figures(report)}
    assert report.device == ("NVIDIA H100 80GB HBM3, 570.0, 81559 MiB | torch 2.11.0 | transformers 5.17.0 | "
                             "triton 3.6.0")
    assert rows["GPT-2 124M adamw, tokens/s against nanoGPT bench.py"].value == pytest.approx(30 / 32)
    assert rows["GPT-2 124M rv-adamw, tokens/s against adamw"].met() == "met"  # 0.98 >= 0.97
    loop = next(f for name, f in rows.items() if name.startswith("GPT-2 124M adamw as `pretrain train`"))
    assert loop.value == pytest.approx(30 / 31) and loop.met() == ""  # reported beside the goal's figure
    tile = next(f for name, f in rows.items() if "column tile" in name)
    assert "rv-adamw@32x64" in tile.name and tile.value == pytest.approx(1.05) and tile.met() == "met"
    sums = next(f for name, f in rows.items() if name.startswith("rotation sums"))
    assert "(sums @8x256x8)" in sums.name and sums.value == pytest.approx(0.5) and sums.met() == ""
    assert rows["rotation_every=1, GPT-2 compiled: adamw step time"].value == pytest.approx(10.0)
    assert rows["rotation_every=1, GPT-2 compiled: adamw step time"].met() == "**not met**"  # 10% is not < 10%
    plain = next(f for name, f in rows.items() if name.startswith("rotation_every=1, GPT-2 compiled: adamw-plain"))
    assert plain.value == pytest.approx(100 * (33.8 / 32.5 - 1)) and plain.met() == "met"
    ours = next(f for name, f in rows.items() if name.startswith("GPT-2 124M adamw-plain"))
    assert ours.value == pytest.approx(495_000 / 500_000) and ours.met() == ""
    assert rows["llama-125m 32 x 1024, peak memory before (section 7)"].cell() == "23.81 GiB"
    failed = rows["llama-125m 32 x 1024 compiled, MFU of adamw"]  # section 3 failed: no number, no verdict
    assert failed.value is None and failed.met() == "" and "not in the report" in failed.cell()
    # Section 4's llama table is missing: its rows say so instead of reading the GPT-2 table.
    assert rows["optimizer step, llama set: rv-adamw against torch fused AdamW"].value is None
    row_tile = next(f for name, f in rows.items() if "row tile" in name)
    assert row_tile.value is None and "(-)" in row_tile.name


def test_the_best_row_tile_of_the_llama_table():
    failed = "FAILED rc=124: the llama set timed out, so only the GPT-2 table follows"
    report = Report.parse(SYNTHETIC.replace(failed, """
optimizer step, llama parameter set (109.5M fp32), NVIDIA H100 80GB HBM3, torch 2.11.0, median of 40
| optimizer | step ms | vs torch fused AdamW | host ms |
|---|---|---|---|
| torch-fused | 1.200 | 1.00x | 0.500 |
| rv-adamw | 1.500 | 1.25x | 0.400 |
| rv-adamw@r4096x8 | 1.800 | 1.50x | 0.400 |
| rv-adamw@r1024x4 | 1.260 | 1.05x | 0.400 |
"""))
    rows = {f.name: f for f in figures(report)}
    tile = next(f for name, f in rows.items() if "row tile" in name)
    assert "(rv-adamw@r1024x4)" in tile.name and tile.value == pytest.approx(1.05) and tile.met() == "met"
    assert rows["optimizer step, llama set: rv-adamw against torch fused AdamW"].value == pytest.approx(1.25)


def test_the_committed_session6_reports_give_the_figures_in_results_md():
    """Session 6's two runs (H100, then H200 with the step timeline), read back from their unedited reports."""
    h100 = _by_name(Report.parse((REPO / "benchmarks" / "gpu_check_h100_s6.md").read_text()))
    h200 = _by_name(Report.parse((REPO / "benchmarks" / "gpu_check_h200_s6.md").read_text()))
    nano = "GPT-2 124M adamw, tokens/s against nanoGPT bench.py"
    assert h100[nano] == pytest.approx(36.7706 / 40.8) and h200[nano] == pytest.approx(33.8177 / 37.4)
    tile = next(name for name in h200 if "column tile (rv-adamw@8x256x8)" in name)
    assert h200[tile] == pytest.approx(2.592 / 1.399)
    assert h200["rotation_every=1, llama 16 x 512 eager: adamw step time"] == pytest.approx(100 * (47.2 / 43.8 - 1))


def test_the_cost_of_every_tenth_step_compares_steps_of_one_row():
    """With `measured ms`, every=10's cost is its measured steps' extra time over its own median step, /10;
    rows apart (here 2% apart by drift alone) would say +2.0%. Every step measured still compares rows."""
    report = Report.parse("""## 2. Ours, gpt2

| optimizer | rotation_every | step ms | fwd+bwd ms | update ms | measured ms | loop ms |
|---|---|---|---|---|---|---|
| adamw | 0 | 35.0 | 33.0 | 2.0 | - | 34.0 |
| adamw | 1 | 37.1 | 33.0 | 4.1 | 37.1 | 36.0 |
| adamw | 10 | 35.7 | 33.0 | 2.7 | 37.8 | 35.0 |
""")
    rows = {f.name: f for f in figures(report)}
    assert rows["rotation_every=10, GPT-2 compiled: adamw step time"].value == pytest.approx(100 * 2.1 / 357)
    assert rows["rotation_every=10, GPT-2 compiled: adamw step time"].met() == "met"  # +0.59% < 1%
    assert rows["rotation_every=1, GPT-2 compiled: adamw step time"].value == pytest.approx(100 * (37.1 / 35 - 1))
    loop = next(f for name, f in rows.items() if name.startswith("rotation_every=1, GPT-2 compiled: adamw steps back"))
    assert loop.value == pytest.approx(100 * (36.0 / 34.0 - 1))
