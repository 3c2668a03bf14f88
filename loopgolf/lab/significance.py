"""Welch's t-test of a variant against the baseline, with the effect and its 95% interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Welch:
    """``mean(a) - mean(b)`` with Welch's t, its Welch-Satterthwaite degrees of freedom, the
    two-sided p-value and the 95% confidence interval of the difference."""

    diff: float
    t: float
    df: float
    p: float
    ci_low: float
    ci_high: float


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def welch(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Welch:
    """Welch's unequal-variance t-test of ``a`` against ``b`` (each at least two values). A zero
    standard error (identical values on both sides) gives p = 1 for equal means, 0 otherwise."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values per side, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    va, vb = sa * sa / len(a), sb * sb / len(b)
    diff = ma - mb
    se = math.sqrt(va + vb)
    if se == 0.0:
        p = 1.0 if diff == 0.0 else 0.0
        return Welch(diff, math.copysign(math.inf, diff) if diff else 0.0, float(len(a) + len(b) - 2), p, diff, diff)
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0))
    t = diff / se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Welch(diff, t, df, p, diff - half, diff + half)
