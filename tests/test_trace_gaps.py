"""benchmarks/trace_gaps.py: GPU busy/idle time, idle gaps and host syncs of a torch.profiler chrome trace."""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.bench_mfu import Mark, profile_steps, row_path, write_trace
from benchmarks.trace_gaps import Event, analyse, describe, host_during, launch_lead, main, read_events, stacks_at_each
from tests.train_utils import REPO

HOST, MAIN, AUTOGRAD = 4242, 4242, 4250  # host pid, main thread, autograd worker thread


def _x(cat: str, name: str, ts: float, dur: float, pid: object, tid: object, **args: object) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": pid, "tid": tid, "ts": ts, "dur": dur, "args": args}


def _synthetic() -> dict:
    """Device activity 100-430 us with gaps 150-160, 210-310 and 400-420 (idle 130 us, busy 200 us)."""
    device = [
        _x("kernel", "k1_gemm", 100, 50, 0, 7, correlation=1),
        _x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 100, 1, 0, 9, correlation=11),
        _x("kernel", "k2_softmax", 160, 40, 0, 7, correlation=2),
        _x("kernel", "k3_other_stream", 180, 30, 0, 8, correlation=3),  # overlaps k2 and the copy below
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 200, 5, 0, 7, correlation=9),
        _x("kernel", "k4_adamw", 310, 90, 0, 7, correlation=4),
        _x("gpu_memset", "Memset (Device)", 420, 10, 0, 7, correlation=5),
        _x("gpu_user_annotation", "forward_backward", 100, 330, 0, 7),  # not device activity
    ]
    host = [
        _x("user_annotation", "ProfilerStep#1", 90, 315, HOST, MAIN),
        _x("user_annotation", "forward_backward", 95, 300, HOST, MAIN),
        _x("cpu_op", "aten::item", 195, 110, HOST, MAIN),
        _x("cpu_op", "aten::_local_scalar_dense", 196, 108, HOST, MAIN),
        _x("cuda_runtime", "cudaMemcpyAsync", 197, 3, HOST, MAIN, correlation=9),
        _x("cuda_runtime", "cudaStreamSynchronize", 201, 100, HOST, MAIN),
        _x("cuda_runtime", "cudaMemcpyAsync", 99, 2, HOST, MAIN, correlation=11),  # host to device: no sync
        _x("cpu_op", "autograd::engine::evaluate_function: MmBackward0", 140, 20, HOST, AUTOGRAD),
        _x("cuda_runtime", "cudaLaunchKernel", 120, 5, HOST, MAIN, correlation=2),  # returns 25 us before its gap
        _x("cuda_runtime", "cudaLaunchKernel", 305, 4, HOST, MAIN, correlation=4),  # returns 99 us into its gap
        _x("cuda_driver", "cuLaunchKernel", 412, 6, HOST, MAIN, correlation=5),  # returns 18 us into its gap
        _x("cuda_runtime", "cudaStreamSynchronize", 420, 20, HOST, MAIN),
    ]
    other = [{"ph": "M", "name": "process_name", "pid": HOST, "tid": 0, "args": {"name": "python"}},
             {"ph": "s", "cat": "ac2g", "id": 9, "pid": HOST, "tid": MAIN, "ts": 197},
             {"ph": "f", "cat": "ac2g", "id": 9, "pid": 0, "tid": 7, "ts": 200, "bp": "e"}]
    return {"schemaVersion": 1, "traceEvents": [*other, *host, *device]}


@pytest.fixture
def synthetic_path(tmp_path: Path) -> Path:
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as out:
        json.dump(_synthetic(), out)
    return path


def test_busy_idle_and_gaps_of_a_synthetic_trace(synthetic_path: Path) -> None:
    analysis = analyse(read_events(synthetic_path))
    assert (analysis.window_start, analysis.window_end) == (100, 430)
    assert analysis.busy_us == pytest.approx(200)  # 50 + (160..210) 50 + 90 + 10
    assert analysis.idle_us == pytest.approx(130)
    assert [(g.start, g.end) for g in analysis.gaps] == [(210, 310), (400, 420), (150, 160)]
    assert [(g.before.name, g.after.name) for g in analysis.gaps] == [
        ("k3_other_stream", "k4_adamw"), ("k4_adamw", "Memset (Device)"), ("k1_gemm", "k2_softmax")]
    assert (analysis.device_events, analysis.streams, analysis.steps) == (7, 3, 1)


def test_the_host_ops_running_during_each_gap(synthetic_path: Path) -> None:
    analysis = analyse(read_events(synthetic_path))
    sync_gap, launch_gap, autograd_gap = analysis.gaps
    stacks = host_during(sync_gap, analysis.host)
    assert [[e.name for e in chain] for chain in stacks.values()] == [
        ["ProfilerStep#1", "forward_backward", "aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize"]]
    assert describe(stacks) == ("ProfilerStep#1 > forward_backward > aten::item > aten::_local_scalar_dense > "
                                "cudaStreamSynchronize")
    # nothing runs at 410, the gap's middle: the range overlapping the gap longest is the launch at 412-418
    assert describe(host_during(launch_gap, analysis.host)) == "cuLaunchKernel"
    both = host_during(autograd_gap, analysis.host)  # 155: the main thread waits while the autograd thread works
    assert {tid: [e.name for e in chain] for (_, tid), chain in both.items()} == {
        MAIN: ["ProfilerStep#1", "forward_backward"],
        AUTOGRAD: ["autograd::engine::evaluate_function: MmBackward0"]}
    assert describe(both).split("<br>") == [
        f"tid {MAIN}: ProfilerStep#1 > forward_backward",
        f"tid {AUTOGRAD}: autograd::engine::evaluate_function: MmBackward0"]


def test_how_long_after_the_gap_started_the_next_activity_was_issued(synthetic_path: Path) -> None:
    analysis = analyse(read_events(synthetic_path))
    assert [launch_lead(gap, analysis.launches) for gap in analysis.gaps] == [99, 18, -25]
    assert launch_lead(analysis.gaps[0], {}) is None


def test_host_sync_totals_count_only_device_to_host_copies(synthetic_path: Path) -> None:
    syncs = {s.call: (s.count, s.total_us, s.longest_us) for s in analyse(read_events(synthetic_path)).syncs}
    assert syncs == {"cudaStreamSynchronize": (2, 120, 100), "cudaMemcpyAsync (DtoH)": (1, 3, 3)}


def test_report_lists_the_largest_gaps_first(synthetic_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(synthetic_path), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "GPU busy 0.200 ms (60.6%), idle 0.130 ms (39.4%) in 3 gaps" in text
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 2 |", "| 3 |"))]
    assert len(rows) == 2
    assert rows[0].startswith("| 1 | 100.0 | 0.110 | +95.0 to +99.0 | k3_other_stream | k4_adamw | ProfilerStep#1 > ")
    assert rows[1].startswith("| 2 | 20.0 | 0.300 | +12.0 to +18.0 | k4_adamw | Memset (Device) | cuLaunchKernel |")
    assert "| 50–500 us | 1 | 0.100 | 76.9% |\n| 5–50 us | 2 | 0.030 | 23.1% |" in text
    assert ("| during the gap: the host was late | 2 | 0.120 | 92.3% |\n"
            "| before the gap: queued for the GPU | 1 | 0.010 | 7.7% |") in text
    # where in the step: the ranges running at the launches (305, 412 after ProfilerStep#1 ended, and 120)
    assert "| forward_backward | 2 | 0.110 | 84.6% |\n| (no annotated range) | 1 | 0.020 | 15.4% |" in text
    # what held the host up: the late gaps only, at their middles (nothing runs at 410)
    assert ("| cudaStreamSynchronize | 1 | 0.100 | 76.9% |\n| (nothing recorded on the host) | 1 | 0.020 | 15.4% |"
            "\n\n") in text
    assert "MmBackward0" not in text  # the queued gap's host op, and its row is past --top 2
    assert "| cudaStreamSynchronize | 2 | 0.120 | 0.100 |" in text


def test_a_long_host_stack_keeps_its_outer_and_inner_frames(tmp_path: Path) -> None:
    names = [f"op{i}" for i in range(8)]
    trace = [_x("kernel", "a", 0, 10, 0, 7), _x("kernel", "b", 30, 10, 0, 7),
             *(_x("cpu_op", name, i, 40 - 2 * i, HOST, MAIN) for i, name in enumerate(names))]
    path = tmp_path / "deep.json"
    path.write_text(json.dumps(trace))  # a bare event list is a chrome trace too
    analysis = analyse(read_events(path))
    assert describe(host_during(analysis.gaps[0], analysis.host)) == "op0 > op1 > … > op5 > op6 > op7"


def test_a_trace_without_gaps_and_a_second_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "two_devices.json"
    path.write_text(json.dumps([_x("kernel", "a", 0, 10, 0, 7), _x("kernel", "b", 10, 5, 0, 7),
                                _x("kernel", "c", 100, 5, 1, 7)]))  # device 1: its gap is not device 0's
    assert main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "only device 0 is analysed" in text and "The GPU never idles in the window." in text
    assert "GPU busy 0.015 ms (100.0%), idle 0.000 ms (0.0%) in 0 gaps" in text


def test_the_sweep_finds_the_same_stacks_as_a_scan_of_every_event() -> None:
    """Nested ranges on two threads, some overlapping without nesting (clock skew between ops and runtime calls)."""
    rng = random.Random(0)
    host = []
    for tid in (1, 2):
        start = 0.0
        for _ in range(200):
            start += rng.uniform(0, 5)
            outer = Event("outer", "cpu_op", start, start + rng.uniform(1, 12), HOST, tid)
            inner_start = outer.start + rng.uniform(0, outer.end - outer.start)
            host += [outer, Event("inner", "cuda_runtime", inner_start, inner_start + rng.uniform(0, 4), HOST, tid)]
    moments = [rng.uniform(0, 1000) for _ in range(300)] + [e.start for e in host[:50]] + [e.end for e in host[:50]]
    expected = [{(HOST, tid): sorted((e for e in host if e.tid == tid and e.start <= t < e.end),
                                     key=lambda e: (e.start, -e.end)) for tid in (1, 2)} for t in moments]
    expected = [{thread: chain for thread, chain in stacks.items() if chain} for stacks in expected]
    assert stacks_at_each(host, moments) == expected


class MatmulStep:
    """bench_mfu's BenchStep interface over a tiny matmul, recording the steps it ran."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.weight = torch.randn(32, 32)
        self.steps: list[int] = []

    def __call__(self, step: int, mark: Mark) -> tuple[float, float]:
        self.steps.append(step)
        with mark("forward_backward"):
            self.weight = torch.tanh(self.weight @ self.weight)
        return 0.0, 0.0


@pytest.mark.parametrize("name", ["cpu.json", "cpu.json.gz"])
def test_a_real_cpu_trace_reports_no_gpu_activity_in_one_line(tmp_path: Path, name: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    bench_step = MatmulStep()
    profiler = profile_steps(bench_step, 11, 3)  # a stand-in for BenchStep: only device and the call are used
    path = tmp_path / name
    write_trace(profiler, str(path))
    assert bench_step.steps == [11, 12, 13, 14]  # the profiler's warm-up step, then the 3 recorded
    if name.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic
    assert not list(tmp_path.glob("*.partial"))
    events = read_events(path)
    names = [e.name for e in events]
    assert names.count("forward_backward") == 3 and names.count("aten::tanh") == 3  # not the warm-up step's
    assert sorted(n for n in names if n.startswith("ProfilerStep#")) == ["ProfilerStep#1", "ProfilerStep#2",
                                                                         "ProfilerStep#3"]
    assert all(e.end >= e.start for e in events)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: no GPU activity in this trace")


def test_the_command_line_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    not_json = tmp_path / "trace.json"
    not_json.write_text("{oops")
    for path, message in ((tmp_path / "missing.json.gz", "error: cannot read"),
                          (not_json, "error: " + str(not_json) + " is not a JSON chrome trace")):
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trace_gaps.py"), str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert done.stdout == "" and done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr


def test_several_profiled_rows_get_one_file_each():
    assert row_path("out/trace.json.gz", 3, rows=1) == "out/trace.json.gz"
    assert row_path("out/trace.json.gz", 3, rows=2) == "out/trace.row3.json.gz"
    assert row_path("profile", 0, rows=2) == "profile.row0"
