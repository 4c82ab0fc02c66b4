"""Statistics over the seeds of a study: mean and spread, and paired differences with a 95% interval.

Seeds are the study's unit of replication: two settings that differ only in one grid key (e.g.
warmup) and share a seed see the same initial weights and the same batches, so their difference
is paired by seed. The interval is Student's t for the mean of the per-seed differences; with
n seeds it has n - 1 degrees of freedom. Pure Python: no numpy or scipy needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

CONFIDENCE = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float] | None:
    """(mean, sample standard deviation); the deviation is 0 for one value; None for none."""
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@cache
def t_quantile(probability: float, df: int) -> float:
    """The `probability` quantile of Student's t with `df` degrees of freedom (probability in (0.5, 1))."""
    if df < 1 or not 0.5 < probability < 1.0:
        raise ValueError(f"need df >= 1 and a probability in (0.5, 1), got df={df}, p={probability}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(60):  # bisection: 2^-60 of the bracket, far below the integration error
        mid = 0.5 * (low + high)
        low, high = (mid, high) if _t_cdf(mid, df) < probability else (low, mid)
    return 0.5 * (low + high)


def _t_cdf(x: float, df: int) -> float:
    """P(T <= x) for x >= 0: 1/2 plus the integral of the density from 0 to x, as
    arctan-substituted Simpson's rule (t = sqrt(df) tan(u) makes the integrand smooth and bounded)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    top = math.atan(x / math.sqrt(df))
    intervals = 2000  # even

    def integrand(u: float) -> float:  # density(sqrt(df) tan u) * d t / d u
        return math.exp(log_norm) * math.sqrt(df) * math.cos(u) ** (df - 1)

    h = top / intervals
    total = integrand(0.0) + integrand(top)
    total += sum((4 if i % 2 else 2) * integrand(i * h) for i in range(1, intervals))
    return 0.5 + total * h / 3


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences a - b with its two-sided CONFIDENCE interval (None for one seed)."""

    seeds: int
    mean: float
    low: float | None
    high: float | None

    @property
    def significant(self) -> bool:
        """The interval excludes 0; with one seed nothing is significant."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> PairedDifference | None:
    """Paired by seed over the seeds both have (finite values only); None when they share none."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, None, None)
    half = t_quantile(0.5 + CONFIDENCE / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, mean - half, mean + half)
