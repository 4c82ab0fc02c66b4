"""Loss curves of a run, drawn from its metrics log.

matplotlib's object API on an Agg canvas, never pyplot: importing this module leaves the
process-wide backend of a notebook or script alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_loss_curves(records: list[dict[str, Any]], path: Path) -> None:
    """Train and validation loss against optimizer step, saved as a PNG."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, style, label=key.split("/")[0], markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
