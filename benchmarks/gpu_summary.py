"""Issue 10's measurements as one table, read from a `benchmarks/gpu_check.sh` report.

    python benchmarks/gpu_summary.py OUT_DIR/gpu_check.md      # gpu_check.sh runs it last

Each row is one figure of the issue (a ratio within the same run, an MFU, a memory peak) with
its goal and whether the report meets it. A row whose section was not run, or failed, says
so instead of a number. Only the report is read: the figures are the benchmarks' own.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

Table = list[dict[str, str]]
_CLOCK = "(started at "  # gpu_check.sh's time stamp under each heading
Captioned = tuple[str, Table]  # a table and the text line above it


@dataclass(frozen=True)
class Report:
    """A gpu_check report: the device lines and, per section number, its text and its captioned tables."""

    device: str
    texts: dict[str, str]
    tables: dict[str, list[Captioned]]

    @staticmethod
    def parse(text: str) -> Report:
        sections: dict[str, list[str]] = {}
        key = ""
        for line in text.splitlines():
            if line.startswith("## "):  # "## 3. Ours, ...", "## Device", or any other heading
                number = re.match(r"## (\d+)\.", line)
                key = number.group(1) if number else line[3:].strip().lower()
                sections[key] = []
            elif key:
                sections[key].append(line)
        device = " | ".join(line.strip() for line in sections.get("device", [])
                            if line.strip() and not line.startswith(_CLOCK))
        return Report(device, {k: "\n".join(v) for k, v in sections.items()},
                      {k: _tables(v) for k, v in sections.items()})

    def rows(self, section: str, caption: str = "") -> Table:
        """The section's first table whose caption contains `caption` (a section may print several, and a
        run that failed prints fewer), or no rows."""
        return next((table for above, table in self.tables.get(section, []) if caption in above), [])


def _tables(lines: list[str]) -> list[Captioned]:
    """Markdown tables (header, separator, rows) as lists of {column: cell}, with the line above each."""
    tables, block, caption, last = [], [], "", ""
    for line in [*lines, ""]:
        if line.startswith("|"):
            if not block:
                caption = last
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if block:
            if len(block) > 2:
                tables.append((caption, [dict(zip(block[0], row, strict=False)) for row in block[2:]]))
            block = []
        last = line.strip() or last
    return tables


def _number(cell: str | None) -> float | None:
    """The first number in a cell ('37.2', '440,210', '40.4%', '1.53x'), or None."""
    found = re.search(r"-?\d[\d,]*\.?\d*", cell or "")
    return float(found.group().replace(",", "")) if found else None


def _row(table: Table, **match: str) -> dict[str, str] | None:
    return next((r for r in table if all(r.get(k) == v for k, v in match.items())), None)


def _value(table: Table, column: str, **match: str) -> float | None:
    row = _row(table, **match)
    return _number(row.get(column)) if row else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


@dataclass(frozen=True)
class Figure:
    name: str
    value: float | None
    unit: str  # a key of _FORMATS
    goal: str  # e.g. ">= 1.0", "< 10", or "" (reported only)

    def met(self) -> str:
        if self.value is None or not self.goal:
            return ""
        op, bound = self.goal.split()
        ok = {">=": self.value >= float(bound), "<=": self.value <= float(bound), "<": self.value < float(bound)}[op]
        return "met" if ok else "**not met**"

    def cell(self) -> str:
        if self.value is None:
            return "not in the report (section not run or failed)"
        return _FORMATS[self.unit].format(self.value)

    def goal_cell(self) -> str:
        if not self.goal:
            return "reported"
        op, bound = self.goal.split()
        return f"{op} {_FORMATS[self.unit].format(float(bound)).lstrip('+')}"


# How a figure of each kind is written: a ratio, a change in step time, an MFU, memory, throughput.
_FORMATS = {"x": "{:.3f}x", "cost": "{:+.1f}%", "mfu": "{:.1f}%", "GiB": "{:.2f} GiB", "tokens/s": "{:,.0f} tokens/s"}


def _cost(table: Table, optimizer: str, every: str, column: str = "step ms") -> float | None:
    """Percent more step time (`column`) with `logging.rotation_every=every` than with 0.

    Every step measured (1): that row's step time against the row without metrics. Every k > 1
    steps: the measured steps' extra time over the same row's median step, spread over k steps,
    which compares steps of one row, not two rows apart (rows differ by ~2% run to run, more
    than the < 1% this figure is held to). Reports without a `measured ms` column compare rows,
    and so does `loop ms` (a mean over steps back to back, with no measured step of its own).
    """
    on = _value(table, column, optimizer=optimizer, rotation_every=every)
    measured = _value(table, "measured ms", optimizer=optimizer, rotation_every=every)
    if int(every) > 1 and column == "step ms" and measured is not None and on:
        return 100 * (measured - on) / (int(every) * on)
    off = _value(table, column, optimizer=optimizer, rotation_every="0")
    return 100 * (on / off - 1) if on is not None and off else None


def _best_tile(table: Table, base: float | None) -> tuple[float | None, str]:
    """(step time against `base`, name) of the fastest of the rv-adamw rows: the default tile and `rv-adamw@...`."""
    tiles = [(_ratio(_number(r.get("step ms")), base), "rv-adamw (default)" if r["optimizer"] == "rv-adamw"
              else r["optimizer"])
             for r in table if r.get("optimizer") == "rv-adamw" or r.get("optimizer", "").startswith("rv-adamw@")]
    return min((t for t in tiles if t[0] is not None), default=(None, ""))


def figures(report: Report) -> list[Figure]:
    """Issue 10's rows, in its order."""
    nano = re.search(r"time per iteration: ([\d.]+)ms", report.texts.get("1", ""))
    gpt2, llama, before = report.rows("2"), report.rows("3"), report.rows("7")
    opt_llama, opt_gpt2 = report.rows("4", "llama"), report.rows("4", "gpt2 parameter set")
    recipe, metrics = report.rows("6"), report.rows("5")
    adamw_ms = _value(gpt2, "step ms", optimizer="adamw", rotation_every="0")
    fused_llama = _value(opt_llama, "step ms", optimizer="torch-fused")
    fused_gpt2 = _value(opt_gpt2, "step ms", optimizer="torch-fused")
    best_tile, best_row_tile = _best_tile(opt_gpt2, fused_gpt2), _best_tile(opt_llama, fused_llama)
    sums = [(_number(r.get("device ms")), r["kernels"]) for r in report.rows("4", "rotation sums")
            if r.get("kernels", "").startswith("sums @")]
    sums_default = next((ms for ms, name in sums if name.endswith("(default)")), None)
    best_sums = min((t for t in sums if t[0] is not None), default=(None, ""))
    rows = [
        Figure("GPT-2 124M adamw, tokens/s against nanoGPT bench.py", _ratio(_number(nano and nano.group(1)),
                                                                            adamw_ms), "x", ">= 1.0"),
        Figure("GPT-2 124M rv-adamw, tokens/s against adamw", _ratio(_value(
            gpt2, "tokens/s", optimizer="rv-adamw", rotation_every="0"), _value(
            gpt2, "tokens/s", optimizer="adamw", rotation_every="0")), "x", ">= 0.97"),
        Figure("llama-125m 32 x 1024 compiled, MFU of adamw before (section 7: the pre-issue loss and RV step)",
               _value(before, "MFU", optimizer="adamw"), "mfu", ""),
        Figure("llama-125m 32 x 1024 compiled, MFU of adamw", _value(llama, "MFU", optimizer="adamw"), "mfu", ">= 45"),
        Figure("llama-125m, rv-adamw tokens/s against adamw", _ratio(
            _value(llama, "tokens/s", optimizer="rv-adamw"), _value(llama, "tokens/s", optimizer="adamw")), "x",
            ">= 0.97"),
        Figure("llama-125m 32 x 1024, peak memory before (section 7)", _value(before, "peak GiB", optimizer="adamw"),
               "GiB", ""),
        Figure("llama-125m 32 x 1024, peak memory now", _value(llama, "peak GiB", optimizer="adamw"), "GiB", ""),
        Figure("optimizer step, llama set: rv-adamw against torch fused AdamW", _ratio(
            _value(opt_llama, "step ms", optimizer="rv-adamw"), fused_llama), "x", "<= 1.10"),
        Figure("optimizer step, llama set: rv-lion against torch fused AdamW", _ratio(
            _value(opt_llama, "step ms", optimizer="rv-lion"), fused_llama), "x", "<= 1.10"),
        Figure(f"optimizer step, llama set: best rv-adamw row tile ({best_row_tile[1] or '-'}) against torch fused "
               "AdamW", best_row_tile[0], "x", "<= 1.10"),
        Figure(f"optimizer step, GPT-2 set: best rv-adamw column tile ({best_tile[1] or '-'}) against torch fused "
               "AdamW", best_tile[0], "x", "<= 1.10"),
        Figure(f"rotation sums of a measured step, GPT-2 set: best tile ({best_sums[1] or '-'}) against the "
               "default", _ratio(best_sums[0], sums_default), "x", ""),
        Figure("rotation_every=1, llama 16 x 512 eager: adamw step time", _cost(metrics, "adamw", "1"), "cost", "< 10"),
        Figure("rotation_every=1, llama 16 x 512 eager: rv-adamw step time", _cost(metrics, "rv-adamw", "1"), "cost",
               "< 10"),
        *(Figure(f"rotation_every=1, llama 16 x 512 eager: {name} steps back to back as `pretrain train` runs them "
                 "(`loop ms`)", _cost(metrics, name, "1", "loop ms"), "cost", "") for name in ("adamw", "rv-adamw")),
        Figure("rotation_every=1, GPT-2 compiled: adamw step time", _cost(gpt2, "adamw", "1"), "cost", "< 10"),
        Figure("rotation_every=1, GPT-2 compiled: rv-adamw step time", _cost(gpt2, "rv-adamw", "1"), "cost", "< 10"),
        Figure("rotation_every=1, GPT-2 compiled: adamw-plain (our AdamW kernel, which writes the sums) step time",
               _cost(gpt2, "adamw-plain", "1"), "cost", "< 10"),
        Figure("rotation_every=1, GPT-2 compiled: adamw steps back to back as `pretrain train` runs them (`loop ms`; "
               "a measured step's figures read a step later)", _cost(gpt2, "adamw", "1", "loop ms"), "cost", ""),
        Figure("rotation_every=10, GPT-2 compiled: adamw step time", _cost(gpt2, "adamw", "10"), "cost", "< 1"),
        Figure("rotation_every=10, GPT-2 compiled: rv-adamw step time", _cost(gpt2, "rv-adamw", "10"), "cost", "< 1"),
        Figure("shipped gpt2-124m recipe (0.5M tokens/step): adamw", _value(recipe, "tokens/s", optimizer="adamw"),
               "tokens/s", ""),
        Figure("shipped gpt2-124m recipe (0.5M tokens/step): rv-adamw", _value(recipe, "tokens/s",
                                                                              optimizer="rv-adamw"), "tokens/s", ""),
        Figure("GPT-2 124M adamw-plain (our AdamW kernel) against adamw (torch's fused AdamW), tokens/s", _ratio(
            _value(gpt2, "tokens/s", optimizer="adamw-plain", rotation_every="0"), _value(
                gpt2, "tokens/s", optimizer="adamw", rotation_every="0")), "x", ""),
        Figure("GPT-2 124M adamw as `pretrain train` runs it (steps back to back, `loop ms`), against nanoGPT "
               "bench.py (each step ends in a sync)", _ratio(_number(nano and nano.group(1)), _value(
                   gpt2, "loop ms", optimizer="adamw", rotation_every="0")), "x", ""),
    ]
    return rows


def summary(report: Report) -> str:
    lines = [f"Device: {report.device or 'unknown'}", "", "| measurement | value | goal | |", "|---|---|---|---|"]
    for f in figures(report):
        lines.append(f"| {f.name} | {f.cell()} | {f.goal_cell()} | {f.met()} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    print(summary(Report.parse(parser.parse_args().report.read_text())))


if __name__ == "__main__":
    main()
