"""Where a profiled step leaves the GPU idle, read from a torch.profiler chrome trace (no torch needed).

    python benchmarks/trace_gaps.py TRACE.json.gz [--top 15]     # e.g. from bench_mfu.py --trace

The window is the span from the first to the last device activity (kernel, memcpy, memset) of the
trace's GPU; busy is the union of those activities over all streams, idle the rest of the window.
Idle time is then split by gap length; by when the host issued the activity that ended the gap
(the return of the CUDA call with the same correlation id: during the gap means the host was late,
a launch-bound or synced stretch; before it means the work was queued and the GPU idled anyway);
by where in the step the gaps are (the annotated ranges, e.g. record_function or Optimizer.step,
running when that call was made); and, for the gaps the host was late for, by the host op that
started last among those running at the gap's middle (what held the host up). The largest gaps
are listed one by one with the activities around them and, per host thread, the nested ops at the
gap's middle (annotation > op > ... > CUDA call), or where nothing ran there, at the host range
overlapping the gap longest. Host sync calls (stream, device and event synchronizes, device-to-host
copies) are totalled apart: at each one the host waits for the GPU to drain, and the GPU idles
until the next launch arrives.

The profiler's own bookkeeping slows the host a little, so host-bound gaps are somewhat longer in
a trace than in an unprofiled step.
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
    launches: dict[int, Event]  # correlation id -> the host CUDA call that issued a device activity
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
    launches = {e.correlation: e for e in host
                if e.category in ("cuda_runtime", "cuda_driver") and e.correlation is not None}
    return Analysis(start, end, (end - start) - sum(g.length for g in gaps),
                    sorted(gaps, key=lambda g: (-g.length, g.start)), len(device), len({e.tid for e in device}),
                    steps, sync_totals(host, device), host, launches, note)


Stacks = dict[object, list[Event]]  # per host thread (pid, tid), the events running, outermost first


def stacks_at_each(host: list[Event], moments: list[float]) -> list[Stacks]:
    """The host stacks at each moment, in one sweep over the events in time order."""
    events = sorted(host, key=lambda e: (e.start, -e.end))  # a range before the ranges nested in it
    open_ranges: dict[object, list[Event]] = defaultdict(list)
    found: list[Stacks] = [{} for _ in moments]
    following = 0
    for index in sorted(range(len(moments)), key=moments.__getitem__):
        moment = moments[index]
        while following < len(events) and events[following].start <= moment:
            event = events[following]
            stack = open_ranges[(event.pid, event.tid)]
            while stack and stack[-1].end <= event.start:
                stack.pop()
            stack.append(event)
            following += 1
        for thread, stack in open_ranges.items():
            while stack and stack[-1].end <= moment:
                stack.pop()
            running = [e for e in stack if e.end > moment]  # a range that overlaps without nesting has ended
            if running:
                found[index][thread] = running
    return found


def host_during(gap: Gap, host: list[Event]) -> Stacks:
    """What the host ran during the gap: the stacks at its middle, else at the longest-overlapping range."""
    stacks = stacks_at_each(host, [(gap.start + gap.end) / 2])[0]
    if stacks:
        return stacks
    overlapping = [e for e in host if min(e.end, gap.end) > max(e.start, gap.start)]
    if not overlapping:
        return {}
    longest = max(overlapping, key=lambda e: min(e.end, gap.end) - max(e.start, gap.start))
    return stacks_at_each(host, [(max(longest.start, gap.start) + min(longest.end, gap.end)) / 2])[0]


def phase(stacks: Stacks) -> str:
    """The annotated ranges (record_function, Optimizer.step, ...) running, below the ProfilerStep ones."""
    ranges = sorted((e for chain in stacks.values() for e in chain
                     if e.category == "user_annotation" and not e.name.startswith("ProfilerStep#")),
                    key=lambda e: e.start)
    return " > ".join(dict.fromkeys(e.name for e in ranges)) or "(no annotated range)"


def latest_op(stacks: Stacks) -> str:
    """The innermost host range that started last: what the host was busy with, over all its threads."""
    leaves = [chain[-1] for chain in stacks.values()]
    return max(leaves, key=lambda e: e.start).name if leaves else "(nothing recorded on the host)"


def size_of(gap: Gap) -> str:
    low, high = next((low, high) for low, high in pairwise([0.0, *GAP_BUCKETS_US, float("inf")]) if gap.length < high)
    return f"≥ {low:g} us" if high == float("inf") else f"{low:g}–{high:g} us"


def launch_of(gap: Gap, launches: dict[int, Event]) -> Event | None:
    """The host CUDA call that issued the activity after the gap, where the trace has it."""
    return launches.get(gap.after.correlation) if gap.after.correlation is not None else None


def launch_lead(gap: Gap, launches: dict[int, Event]) -> float | None:
    """Microseconds from the GPU going idle to the return of the host call that issued the next activity, from
    which on that activity is queued for the GPU (< 0: queued before the GPU went idle)."""
    launch = launch_of(gap, launches)
    return None if launch is None else launch.end - gap.start


def launch_timing(lead: float | None) -> str:
    if lead is None:
        return "not in the trace"
    return "during the gap: the host was late" if lead > 0 else "before the gap: queued for the GPU"


def idle_by(gaps: list[Gap], labels: list[str]) -> list[tuple[str, int, float]]:
    """(label, gaps, idle us) summed over the gaps, the most idle first."""
    totals: dict[str, list[float]] = defaultdict(list)
    for gap, label in zip(gaps, labels, strict=True):
        totals[label].append(gap.length)
    return sorted(((label, len(lengths), sum(lengths)) for label, lengths in totals.items()), key=lambda row: -row[2])


def _cell(text: str, width: int = 60, keep_end: bool = False) -> str:
    if len(text) > width:
        text = "…" + text[1 - width:] if keep_end else text[:width - 1] + "…"
    return text.replace("|", "\\|")


def describe(stacks: Stacks) -> str:
    if not stacks:
        return "nothing recorded on the host"
    lines = []
    for (_, tid), chain in sorted(stacks.items(), key=lambda item: item[1][0].start):
        names = [_cell(e.name, 50) for e in chain]
        if len(names) > MAX_FRAMES:
            names = [*names[:2], "…", *names[-3:]]
        lines.append((f"tid {tid}: " if len(stacks) > 1 else "") + " > ".join(names))
    return "<br>".join(lines)


def _idle_table(caption: str, column: str, rows: list[tuple[str, int, float]], idle: float) -> list[str]:
    lines = ["", caption, "", f"| {column} | gaps | idle ms | share of idle |", "|---|---|---|---|"]
    return lines + [f"| {_cell(label, keep_end=True)} | {count} | {total * 1e-3:.3f} | "
                    f"{100 * total / idle if idle else 0.0:.1f}% |" for label, count, total in rows]


def _idle_tables(analysis: Analysis, top: int) -> list[str]:
    """Idle time split by gap length, by when the next activity was issued, by step phase and by what held the host."""
    gaps, idle, launches = analysis.gaps, analysis.idle_us, analysis.launches
    issued = [launch_of(gap, launches) for gap in gaps]
    leads = [launch_lead(gap, launches) for gap in gaps]
    middles = stacks_at_each(analysis.host, [(gap.start + gap.end) / 2 for gap in gaps])
    issuers = stacks_at_each(analysis.host, [(gap.start + gap.end) / 2 if call is None else call.start
                                             for gap, call in zip(gaps, issued, strict=True)])
    late = [(gap, stacks) for gap, stacks, lead in zip(gaps, middles, leads, strict=True)
            if lead is not None and lead > 0]
    return [
        *_idle_table("Idle time by gap length:", "gap length", idle_by(gaps, [size_of(gap) for gap in gaps]), idle),
        *_idle_table("Idle time by when the host issued the activity after the gap:", "issued",
                     idle_by(gaps, [launch_timing(lead) for lead in leads]), idle),
        *_idle_table("Where in the step: idle time by the annotated host ranges (all threads) running when the host "
                     "issued the activity after each gap (at the gap's middle where that call is not in the trace):",
                     "host ranges", idle_by(gaps, [phase(stacks) for stacks in issuers])[:top], idle),
        *_idle_table("What held the host up, over the gaps it was late for: idle time by the host op that started "
                     "last among those running at the gap's middle:", "host op",
                     idle_by([gap for gap, _ in late], [latest_op(stacks) for _, stacks in late])[:top], idle)]


def _gap_rows(analysis: Analysis, top: int) -> list[str]:
    lines = ["", f"Largest {min(top, len(analysis.gaps))} gaps (at: ms after the window's start; issuing call: when "
             "the host call that issued the next activity ran, in us from the gap's start):", "",
             "| # | gap us | at ms | issuing call | before | after | host during the gap |",
             "|---|---|---|---|---|---|---|"]
    for rank, gap in enumerate(analysis.gaps[:top], 1):  # longest first
        call = launch_of(gap, analysis.launches)
        issued = "?" if call is None else f"{call.start - gap.start:+.1f} to {call.end - gap.start:+.1f}"
        lines.append(f"| {rank} | {gap.length:.1f} | {(gap.start - analysis.window_start) * 1e-3:.3f} | {issued} | "
                     f"{_cell(gap.before.name)} | {_cell(gap.after.name)} | "
                     f"{describe(host_during(gap, analysis.host))} |")
    return lines


def report(analysis: Analysis, top: int, title: str) -> str:
    ms = 1e-3
    window, busy, idle = analysis.window_us, analysis.busy_us, analysis.idle_us
    lines = [f"### GPU idle gaps: {title}", ""]
    if analysis.note:
        lines += [analysis.note, ""]
    lines.append(f"- window: {window * ms:.3f} ms from the first to the last of {analysis.device_events} device "
                 f"activities on {analysis.streams} stream(s)")
    lines.append(f"- GPU busy {busy * ms:.3f} ms ({100 * busy / window:.1f}%), idle {idle * ms:.3f} ms "
                 f"({100 * idle / window:.1f}%) in {len(analysis.gaps)} gaps")
    if analysis.steps:
        n = analysis.steps
        lines.append(f"- per profiler step ({n} ProfilerStep ranges): window {window * ms / n:.3f} ms, busy "
                     f"{busy * ms / n:.3f} ms, idle {idle * ms / n:.3f} ms")
    if analysis.gaps:
        lines += _idle_tables(analysis, top) + _gap_rows(analysis, top)
    else:
        lines += ["", "The GPU never idles in the window."]
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
