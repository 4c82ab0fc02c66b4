"""The study report: `report.md` and `figures/` of a study folder, from the cells' own files.

Tables: one row per cell; per setting the mean ± std over seeds; per with/without-warmup pair the
paired difference over seeds with its 95% interval; the early instability and the rotational
transient per optimizer. Every number is recomputed from `metrics.jsonl` and the newest
checkpoint's `rotation/` (pretrain.study_summary), so `pretrain study FILE --report-only`
regenerates the same report at any time.
"""

from __future__ import annotations

import math
from pathlib import Path

from pretrain.metrics import EQUILIBRIUM_TOLERANCE
from pretrain.study import Study
from pretrain.study_figures import FIGURES, least_warmup_groups, write_figures
from pretrain.study_run import RUNNING_ELSEWHERE, cell_status
from pretrain.study_stats import CONFIDENCE, PairedDifference, mean_std, paired_difference
from pretrain.study_summary import EARLY_FRACTION, SPIKE_FACTOR, CellSummary, finite, group_by, summarize_cell

# Points of the run at which the transient table samples the rotation traces (fractions of the last step).
TRANSIENT_POINTS = (0.0, 0.1, 0.5, 1.0)


def write_report(study: Study) -> Path:
    """Write `<study>/report.md` and `<study>/figures/*.png` from the cells' files; return the report path."""
    summaries = [summarize_cell(cell, cell_status(cell)) for cell in study.cells]
    write_figures(summaries, study.out_dir / "figures")
    path = study.out_dir / "report.md"
    path.write_text(report_text(study, summaries))
    return path


def report_text(study: Study, summaries: list[CellSummary]) -> str:
    counts = {status: sum(s.status == status for s in summaries)
              for status in ("done", "diverged", RUNNING_ELSEWHERE, "partial", "pending")}
    seeds = sorted({s.seed for s in summaries})
    lines = [
        f"# Study `{study.name}`", "",
        f"Study file `{study.path}`, base recipe `{study.base}`, {len(summaries)} cells "
        f"({len(seeds)} seed{'s' if len(seeds) != 1 else ''}): "
        + ", ".join(f"{n} {status}" for status, n in counts.items() if n) + ".",
        f"Regenerate with `pretrain study {study.path} --report-only`.", "",
        "## Definitions", "",
        *_definitions(),
        "",
        "## Per setting, over seeds", "",
        "Mean ± sample standard deviation over the finished seeds of each setting (one seed: its value); "
        "the final val loss leaves out diverged seeds.", "",
        setting_table(summaries), "",
    ]
    pairs = warmup_pairs(summaries)
    if pairs:
        lines += ["## Warmup: paired differences over seeds", "",
                  f"Per optimizer and lr, the per-seed difference *without warmup minus with warmup* (same seed: same "
                  f"initial weights and batches), its mean and {CONFIDENCE:.0%} interval (Student's t over the "
                  "seeds). A positive loss difference means warmup helped. An interval that contains 0 is reported "
                  "as *no difference*; with fewer than 2 seeds there is no interval.", "",
                  pair_table(pairs), "",
                  *warmup_onset_lines(pairs), ""]
    lines += ["## The rotational transient", "",
              "Median over the decayed linear layers (*matrices*) of θ/η_r and of the mean neuron weight norm, "
              "at step 1, at 10% and 50% of the run and at the end (the last measurement with a defined η_r: a "
              "schedule that decays to 0 has none at its final step), for each setting without warmup (the least "
              "warmup of the grid), mean over the seeds; *embedding*: the same for the token embedding. "
              "A rotational optimizer holds θ/η_r at 1 and the norms at their initial value from step 1; a plain "
              "one starts far from equilibrium and approaches it as its norms change.", "",
              transient_table(summaries), ""]
    lines += ["## Per cell", "", cell_table(summaries), ""]
    for name, (title, caption, _) in FIGURES.items():
        lines += [f"## {title}", "", f"![{title}](figures/{name})", "", caption, ""]
    return "\n".join(lines)


def _definitions() -> list[str]:
    window = f"{EARLY_FRACTION:.0%}"
    return [
        "- Losses are cross-entropy in nats per token. *Final val loss*: the last evaluation; *best val loss*: "
        "the lowest; *final train loss*: the last logged single-batch loss.",
        f"- *Early peak*: the highest train loss logged in the first {window} of the steps (at least step 1) "
        "divided by the first logged train loss (step 1); above 1 means the loss rose above its starting value "
        "(∞: a non-finite loss in that window).",
        f"- *Spike*: a run of consecutive logged steps whose train loss exceeds {SPIKE_FACTOR}x the lowest train "
        "loss logged before it (non-finite counts). *Diverged*: the run stopped on or logged a non-finite loss, "
        "or its last logged train loss is above its first.",
        "- *θ/η_r*: a layer's mean angular update per step (θ, radians, mean over its neurons) over the "
        "equilibrium angle η_r that the optimizer reaches with weight decay at the scheduled lr of that step "
        "(docs/rotation-metrics.md). *Step-1 θ/η_r* is the median over the decayed linear layers "
        "(*matrices*: every attention and MLP projection, and the output head unless it is tied to the "
        "embedding) and, separately, the token embedding.",
        f"- *Time to equilibrium*: the first measured step after which θ/η_r stays within ±{EQUILIBRIUM_TOLERANCE:.0%} "
        "of 1 in every rotational-eligible layer (the decayed matrices, the embedding included when "
        "`optim.rotational_embeddings` is on: the same set for a plain optimizer and its RV), from the newest "
        "checkpoint's rotation history; – means not reached by the end. Measurements at lr 0 (the last step of a "
        "schedule that decays to 0, where η_r = 0) do not count. *Half the layers in equilibrium*: the "
        "same for at least half of the layers that have an η_r. The next column counts those layers inside the "
        "band at the end.",
        "- Means over seeds leave out the seeds without a value (diverged, or never in equilibrium). "
        "*tokens/s*: median over logging windows (it measures the machine's load as much as the optimizer).",
    ]


# ----------------------------------------------------------------------------- tables


def setting_table(summaries: list[CellSummary]) -> str:
    """One row per setting (cell without its seed): mean ± std over seeds."""
    rows = ["| setting | seeds | final val loss | early peak | step-1 θ/η_r matrices | step-1 θ/η_r embedding "
            "| spikes | diverged | half the layers in equilibrium (step) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, members in group_by(summaries, lambda s: s.setting).items():
        rows.append(
            f"| {label} | {_seed_count(members)} "
            f"| {_mean_std(finite([s.final_val for s in members if not s.diverged]))} "
            f"| {_early(members)} | {_mean_std(finite([s.step1_ratio('matrices') for s in members]), 1)} "
            f"| {_mean_std(finite([s.step1_ratio('embedding') for s in members]), 3)} "
            f"| {sum(s.spikes for s in members)} | {sum(s.diverged for s in members)}/{len(members)} "
            f"| {_mean_std(finite([s.half_equilibrium for s in members]), 0)} |")
    return "\n".join(rows)


def _seed_count(members: list[CellSummary]) -> str:
    """Seeds that finished (done or diverged), 'k of n' while some have not."""
    finished = sum(s.status in ("done", "diverged") for s in members)
    return str(finished) if finished == len(members) else f"{finished} of {len(members)}"


def _early(members: list[CellSummary]) -> str:
    values = [s.early_peak for s in members if s.early_peak is not None]
    if any(math.isinf(v) for v in values):
        return f"∞ in {sum(math.isinf(v) for v in values)}/{len(values)}"
    return _mean_std(values, 2)


def warmup_pairs(summaries: list[CellSummary]) -> list[tuple[str, list[CellSummary], list[CellSummary]]]:
    """(pairing label, cells without warmup, cells with one warmup value) for every setting that has both;
    a grid with several warmup values pairs each of them with warmup 0."""
    pairs = []
    for label, members in group_by(summaries, lambda s: s.pairing).items():
        by_warmup = group_by(members, lambda s: s.warmup)
        if 0 not in by_warmup:
            continue
        pairs += [(label, by_warmup[0], cells) for warmup, cells in sorted(by_warmup.items()) if warmup > 0]
    return pairs


def final_val_by_seed(cells: list[CellSummary]) -> dict[int, float]:
    """Seed -> final val loss; a diverged seed or one without evaluation is left out."""
    return {s.seed: s.final_val for s in cells if s.final_val is not None and not s.diverged}


def early_peak_by_seed(cells: list[CellSummary]) -> dict[int, float]:
    return {s.seed: s.early_peak for s in cells if s.early_peak is not None}


def pair_table(pairs: list[tuple[str, list[CellSummary], list[CellSummary]]]) -> str:
    ci = f"{CONFIDENCE:.0%} interval"
    rows = [f"| optimizer and lr | warmup | seeds | final val loss, no warmup − warmup | {ci} of the loss | reading "
            f"| early peak, no warmup − warmup | {ci} of the early peak |",
            "|---|---:|---:|---:|---:|---|---:|---:|"]
    for label, without, with_ in pairs:
        loss = paired_difference(final_val_by_seed(without), final_val_by_seed(with_))
        peak = paired_difference(early_peak_by_seed(without), early_peak_by_seed(with_))
        dropped = {s.seed for s in without + with_} - (set(final_val_by_seed(without)) & set(final_val_by_seed(with_)))
        note = f" ({len(dropped)} seed(s) left out: diverged or no val loss)" if dropped else ""
        rows.append(f"| {label} | {with_[0].warmup} | {loss.seeds if loss else 0} | {_diff(loss, 4)} "
                    f"| {_interval(loss, 4)} | {reading(loss)}{note} | {_diff(peak, 3)} | {_interval(peak, 3)} |")
    return "\n".join(rows)


def reading(diff: PairedDifference | None) -> str:
    """The verdict the report prints for a loss difference (no warmup − warmup)."""
    if diff is None:
        return "no data"
    if diff.low is None:
        return "one seed: no interval"
    if not diff.significant:
        return "no difference"
    return "warmup better" if diff.mean > 0 else "no warmup better"


def warmup_onset_lines(pairs: list[tuple[str, list[CellSummary], list[CellSummary]]]) -> list[str]:
    """Per optimizer and warmup: at which lrs warmup lowers the final val loss and the early peak (interval
    excluding 0), at which it raises them, and where there is no difference."""
    lines = []
    for (optimizer, warmup), members in group_by(pairs, lambda p: (p[1][0].optimizer, p[2][0].warmup)).items():
        parts = []
        for name, by_seed in (("final val loss", final_val_by_seed), ("early peak", early_peak_by_seed)):
            verdicts: dict[str, list[str]] = {}
            for _, without, with_ in sorted(members, key=lambda p: p[1][0].lr):
                verdict = reading(paired_difference(by_seed(without), by_seed(with_)))
                verdicts.setdefault(verdict, []).append(f"{without[0].lr:.3g}")
            said = [f"{verdict} at lr {', '.join(lrs)}" for verdict, lrs in verdicts.items()]
            parts.append(f"{name}: {'; '.join(said)}")
        lines.append(f"- {optimizer}, warmup {warmup} steps. " + ". ".join(parts) + ".")
    return ["Where warmup matters (a verdict needs the interval to exclude 0):", "", *lines]


def transient_table(summaries: list[CellSummary]) -> str:
    rows = ["| setting | θ/η_r matrices at step 1 → 10% → 50% → end | weight norm matrices at the same steps "
            "| θ/η_r embedding | weight norm embedding |",
            "|---|---|---|---|---|"]
    for members in least_warmup_groups(summaries).values():
        for cells in group_by(members, lambda s: s.lr).values():
            ratio, norm = zip(*(_trace_points(cells, group) for group in ("matrices", "embedding")), strict=True)
            rows.append(f"| {cells[0].setting} | {ratio[0]} | {norm[0]} | {ratio[1]} | {norm[1]} |")
    return "\n".join(rows)


def _trace_points(cells: list[CellSummary], group: str) -> tuple[str, str]:
    """'a → b → c → d' of the seed-mean ratio and norm at TRANSIENT_POINTS (step 1 first)."""
    traces = [s.traces[group] for s in cells if group in s.traces]
    if not traces:
        return "–", "–"
    ratios, norms = [], []
    for fraction in TRANSIENT_POINTS:
        sampled = [t.at_fraction(fraction) for t in traces]
        ratios.append(_mean([r for _, r, _ in sampled]))
        norms.append(_mean([n for _, _, n in sampled]))
    return (" → ".join(_number(r) for r in ratios), " → ".join(_number(n) for n in norms))


def cell_table(summaries: list[CellSummary]) -> str:
    """Markdown table, one row per cell."""
    rows = ["| cell | status | last step | final train loss | final val loss | best val loss | early peak "
            "| spikes | diverged | time to equilibrium (step) | half the layers in equilibrium (step) "
            "| layers in equilibrium at the end | tokens/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for s in summaries:
        layers = "–" if s.layers_in_equilibrium is None else "{}/{}".format(*s.layers_in_equilibrium)
        speed = "–" if s.tokens_per_s is None else f"{s.tokens_per_s:,.0f}"
        ran = s.last_step is not None
        rows.append(f"| {s.cell.name} | {s.status} | {_step(s.last_step)} "
                    f"| {_fmt(s.final_train)} | {_fmt(s.final_val)} | {_fmt(s.best_val)} | {_fmt(s.early_peak, 3)} "
                    f"| {s.spikes if ran else '–'} | {('yes' if s.diverged else 'no') if ran else '–'} "
                    f"| {_step(s.time_to_equilibrium)} | {_step(s.half_equilibrium)} | {layers} | {speed} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- formatting


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is not None and math.isinf(value):
        return "∞"
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _step(value: int | None) -> str:
    return "–" if value is None else str(value)


def _mean_std(values: list[float], digits: int = 4) -> str:
    stats = mean_std(values)
    if stats is None:
        return "–"
    if len(values) == 1:
        return f"{stats[0]:.{digits}f}"
    return f"{stats[0]:.{digits}f} ± {stats[1]:.{digits}f}"


def _mean(values: list[float]) -> float:
    values = finite(values)
    return sum(values) / len(values) if values else math.nan


def _number(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.3g}"


def _diff(diff: PairedDifference | None, digits: int) -> str:
    return "–" if diff is None else f"{diff.mean:+.{digits}f}"


def _interval(diff: PairedDifference | None, digits: int) -> str:
    if diff is None or diff.low is None or diff.high is None:
        return "–"
    return f"[{diff.low:+.{digits}f}, {diff.high:+.{digits}f}]"
