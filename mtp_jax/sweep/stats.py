"""Seed statistics of a sweep: a configuration's mean and standard error, a paired difference
with its t interval, and the verdict rule (docs/experiments.md states it before any run).

Verdict at LEVEL (90%): "reproduces" when the interval of treatment minus control lies above 0,
"opposite" when it lies below 0, "inconclusive" otherwise (and with fewer than two pairs).
"""

from __future__ import annotations

import dataclasses
import math
import statistics

LEVEL = 0.90


def mean_se(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); the error is nan for one value."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with df degrees of freedom (scipy comes with jax)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclasses.dataclass(frozen=True)
class Paired:
    pairs: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        if self.pairs >= 2 and self.low > 0:
            return "reproduces"
        if self.pairs >= 2 and self.high < 0:
            return "opposite"
        return "inconclusive"


def paired_difference(treatment: list[float], control: list[float], level: float = LEVEL) -> Paired:
    """Mean of treatment[i] - control[i] and its two-sided t interval at `level` (nan bounds below
    two pairs)."""
    if len(treatment) != len(control) or not treatment:
        raise ValueError(f"paired values need equal, non-zero lengths: {len(treatment)} vs {len(control)}")
    diffs = [t - c for t, c in zip(treatment, control)]
    mean, se = mean_se(diffs)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * se if len(diffs) > 1 else math.nan
    return Paired(len(diffs), mean, mean - half, mean + half)
