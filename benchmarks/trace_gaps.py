"""Where a profiled step leaves the GPU idle, read from a torch.profiler chrome trace (no torch needed).

    python benchmarks/trace_gaps.py TRACE.json.gz [--top 15]     # e.g. from bench_mfu.py --trace

The window is the span from the first to the last device activity (kernel, memcpy, memset) of the
trace's GPU; busy is the union of those activities over all streams, idle the rest of the window.
Each idle gap is listed with the activities around it and what the host was running at the gap's
middle: per host thread, the nested ops there (annotation > op > ... > CUDA runtime call), or where
nothing was, the host range that overlaps the gap the longest. Host sync calls (stream, device and
event synchronizes, and device-to-host copies) are totalled apart: each one is a point where the
host waits for the GPU to drain, after which the GPU idles until the next launch arrives.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

DEVICE_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
HOST_CATEGORIES = frozenset({"cpu_op", "user_annotation", "python_function", "cuda_runtime", "cuda_driver"})
SYNC_CALLS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
                        "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize"})
COPY_CALLS = frozenset({"cudaMemcpy", "cudaMemcpyAsync", "cuMemcpy", "cuMemcpyAsync", "cuMemcpyDtoH",
                        "cuMemcpyDtoHAsync"})  # host syncs only when they copy device to host
GAP_BUCKETS_US = (5.0, 50.0, 500.0)
MAX_FRAMES = 6  # a longer host stack keeps its two outermost and three innermost frames


class TraceError(Exception):
    """A trace this tool cannot analyse; main prints it as one line."""


@dataclass(frozen=True)
class Event:
    """One complete ("X") event of the trace; times in microseconds."""

    name: str
    category: str
    start: float
    end: float
    pid: object
    tid: object
    correlation: int | None = None


@dataclass(frozen=True)
class Gap:
    """An idle stretch of the GPU between the activity that ended last before it and the next one."""

    start: float
    end: float
    before: Event
    after: Event

    @property
    def length(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class SyncTotal:
    call: str
    count: int
    total_us: float
    longest_us: float


@dataclass(frozen=True)
class Analysis:
    window_start: float
    window_end: float
    busy_us: float
    gaps: list[Gap]  # longest first
    device_events: int
    streams: int
    steps: int  # ProfilerStep#N ranges on the host
    syncs: list[SyncTotal]  # most total time first
    host: list[Event]
    note: str = ""

    @property
    def window_us(self) -> float:
        return self.window_end - self.window_start

    @property
    def idle_us(self) -> float:
        return self.window_us - self.busy_us


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_events(trace: object) -> list[Event]:
    """The device and host complete events of a chrome trace (an object with traceEvents, or a bare list)."""
    raw = trace.get("traceEvents") if isinstance(trace, dict) else trace
    if not isinstance(raw, list):
        raise TraceError("not a chrome trace: no traceEvents list")
    events = []
    for item in raw:
        if not isinstance(item, dict) or item.get("ph") != "X":
            continue
        category, start, duration = item.get("cat"), item.get("ts"), item.get("dur")
        if category not in DEVICE_CATEGORIES | HOST_CATEGORIES or not (_number(start) and _number(duration)):
            continue
        args = item.get("args") if isinstance(item.get("args"), dict) else {}
        correlation = args.get("correlation")
        events.append(Event(str(item.get("name", "")), category, float(start), float(start) + float(duration),
                            item.get("pid"), item.get("tid"), correlation if isinstance(correlation, int) else None))
    return events


def read_events(path: Path) -> list[Event]:
    """The events of a .json or .json.gz trace file."""
    try:
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else path.open()) as source:
            return parse_events(json.load(source))
    except OSError as error:  # a missing file, or a .gz that is not gzip
        raise TraceError(f"cannot read {path}: {error.strerror or error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError) as error:
        raise TraceError(f"{path} is not a JSON chrome trace ({error})") from None
    except TraceError as error:
        raise TraceError(f"{path}: {error}") from None


def find_gaps(device: list[Event]) -> list[Gap]:
    """Idle stretches between consecutive device activities (their union over streams), in time order."""
    ordered = sorted(device, key=lambda e: (e.start, e.end))
    last = ordered[0]
    gaps = []
    for event in ordered[1:]:
        if event.start > last.end:
            gaps.append(Gap(last.end, event.start, last, event))
        if event.end > last.end:
            last = event
    return gaps


def sync_totals(host: list[Event], device: list[Event]) -> list[SyncTotal]:
    copies = {e.correlation: e.name for e in device if e.category == "gpu_memcpy" and e.correlation is not None}
    durations: dict[str, list[float]] = defaultdict(list)
    for event in host:
        if event.category not in ("cuda_runtime", "cuda_driver"):
            continue
        call = re.sub(r"_v\d+$", "", event.name)
        if call in SYNC_CALLS:
            durations[call].append(event.end - event.start)
        elif call in COPY_CALLS and ("DtoH" in call or "DtoH" in copies.get(event.correlation, "")):
            durations[f"{call} (DtoH)"].append(event.end - event.start)
    totals = [SyncTotal(call, len(d), sum(d), max(d)) for call, d in durations.items()]
    return sorted(totals, key=lambda s: -s.total_us)


def analyse(events: list[Event]) -> Analysis:
    device = [e for e in events if e.category in DEVICE_CATEGORIES]
    if not device:
        raise TraceError("no GPU activity in this trace (no kernel, gpu_memcpy or gpu_memset events): record it on "
                         "a GPU with ProfilerActivity.CUDA, e.g. bench_mfu.py --device cuda --trace FILE")
    devices = sorted({e.pid for e in device}, key=str)
    note = ""
    if len(devices) > 1:
        note = f"the trace has GPU activity on devices {devices}; only device {devices[0]} is analysed"
        device = [e for e in device if e.pid == devices[0]]
    host = [e for e in events if e.category in HOST_CATEGORIES]
    gaps = find_gaps(device)
    start, end = min(e.start for e in device), max(e.end for e in device)
    steps = len({e.name for e in host if e.category == "user_annotation" and e.name.startswith("ProfilerStep#")})
    return Analysis(start, end, (end - start) - sum(g.length for g in gaps),
                    sorted(gaps, key=lambda g: (-g.length, g.start)), len(device), len({e.tid for e in device}),
                    steps, sync_totals(host, device), host, note)


def stacks_at(host: list[Event], moment: float) -> dict[object, list[Event]]:
    """Per host thread, the events running at `moment`, outermost first."""
    running: dict[object, list[Event]] = defaultdict(list)
    for event in host:
        if event.start <= moment < event.end:
            running[(event.pid, event.tid)].append(event)
    return {thread: sorted(chain, key=lambda e: (e.start, -e.end)) for thread, chain in running.items()}


def host_during(gap: Gap, host: list[Event]) -> dict[object, list[Event]]:
    """What the host ran during the gap: the stacks at its middle, else at the longest-overlapping range."""
    middle = (gap.start + gap.end) / 2
    stacks = stacks_at(host, middle)
    if stacks:
        return stacks
    overlapping = [e for e in host if min(e.end, gap.end) > max(e.start, gap.start)]
    if not overlapping:
        return {}
    longest = max(overlapping, key=lambda e: min(e.end, gap.end) - max(e.start, gap.start))
    return stacks_at(host, (max(longest.start, gap.start) + min(longest.end, gap.end)) / 2)


def _cell(text: str, width: int = 60) -> str:
    short = text if len(text) <= width else text[:width - 1] + "…"
    return short.replace("|", "\\|")


def describe(stacks: dict[object, list[Event]]) -> str:
    if not stacks:
        return "nothing recorded on the host"
    lines = []
    for (_, tid), chain in sorted(stacks.items(), key=lambda item: item[1][0].start):
        names = [_cell(e.name, 50) for e in chain]
        if len(names) > MAX_FRAMES:
            names = [*names[:2], "…", *names[-3:]]
        lines.append((f"tid {tid}: " if len(stacks) > 1 else "") + " > ".join(names))
    return "<br>".join(lines)


def report(analysis: Analysis, top: int, title: str) -> str:
    ms = 1e-3
    window = analysis.window_us
    lines = [f"### GPU idle gaps: {title}", ""]
    if analysis.note:
        lines += [analysis.note, ""]
    lines.append(f"- window: {window * ms:.3f} ms from the first to the last of {analysis.device_events} device "
                 f"activities on {analysis.streams} stream(s)")
    lines.append(f"- GPU busy {analysis.busy_us * ms:.3f} ms ({100 * analysis.busy_us / window:.1f}%), idle "
                 f"{analysis.idle_us * ms:.3f} ms ({100 * analysis.idle_us / window:.1f}%) "
                 f"in {len(analysis.gaps)} gaps")
    if analysis.steps:
        n = analysis.steps
        lines.append(f"- per profiler step ({n} ProfilerStep ranges): window {window * ms / n:.3f} ms, busy "
                     f"{analysis.busy_us * ms / n:.3f} ms, idle {analysis.idle_us * ms / n:.3f} ms")
    lines += ["", "| gap length | gaps | idle ms | share of idle |", "|---|---|---|---|"]
    bounds = [0.0, *GAP_BUCKETS_US, float("inf")]
    for low, high in pairwise(bounds):
        inside = [g.length for g in analysis.gaps if low <= g.length < high]
        label = f"≥ {low:g} us" if high == float("inf") else f"{low:g}–{high:g} us"
        share = 100 * sum(inside) / analysis.idle_us if analysis.idle_us else 0.0
        lines.append(f"| {label} | {len(inside)} | {sum(inside) * ms:.3f} | {share:.1f}% |")
    lines += ["", f"Largest {min(top, len(analysis.gaps))} gaps (at = ms after the window's start):", "",
              "| # | gap us | at ms | before | after | host during the gap |", "|---|---|---|---|---|---|"]
    for rank, gap in enumerate(analysis.gaps[:top], 1):
        host = describe(host_during(gap, analysis.host))
        lines.append(f"| {rank} | {gap.length:.1f} | {(gap.start - analysis.window_start) * ms:.3f} | "
                     f"{_cell(gap.before.name)} | {_cell(gap.after.name)} | {host} |")
    lines += ["", "Host sync calls (the host waits for the GPU):", ""]
    if analysis.syncs:
        lines += ["| call | count | total ms | longest ms |", "|---|---|---|---|"]
        lines += [f"| {s.call} | {s.count} | {s.total_us * ms:.3f} | {s.longest_us * ms:.3f} |" for s in analysis.syncs]
    else:
        lines.append("none recorded (a trace without CUDA runtime events cannot show them)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a torch.profiler chrome trace, .json or .json.gz")
    parser.add_argument("--top", type=int, default=15, help="how many of the largest gaps to list")
    args = parser.parse_args(argv)
    try:
        print(report(analyse(read_events(args.trace)), args.top, str(args.trace)))
    except TraceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
