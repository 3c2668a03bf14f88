"""Welch's and the paired t-test of a variant against the baseline, with the effect and its 95%
interval, and the one-sided test against a margin (Parameter Golf's record rule)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

SIGNIFICANCE = 0.01  # Parameter Golf's bar for a new record, and the reports' bar for a verdict
MIN_SEEDS = 3  # fewer seeds (or pairs) than this: a test means little, and a report gives no verdict


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
    if all(x == xs[0] for x in xs):  # exactly: the rounding of a sum must not invent a spread
        return float(xs[0]), 0.0
    m = sum(xs) / n
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0)


def _no_spread(sd: float, values: Sequence[float]) -> bool:
    """A standard deviation that is zero, or only the rounding of the values' arithmetic."""
    return sd <= 1e-12 * max(1.0, *(abs(v) for v in values))


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
    if _no_spread(math.hypot(sa, sb), [*a, *b]):
        p = 1.0 if diff == 0.0 else 0.0
        return Welch(diff, math.copysign(math.inf, diff) if diff else 0.0, float(len(a) + len(b) - 2), p, diff, diff)
    df = (va + vb) ** 2 / ((va * va / (len(a) - 1) if va else 0.0) + (vb * vb / (len(b) - 1) if vb else 0.0))
    t = diff / se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Welch(diff, t, df, p, diff - half, diff + half)


@dataclass(frozen=True)
class Paired(Welch):
    """The paired t-test of ``a`` against ``b`` over the ``n`` seeds both have (same seed: same
    data order and initial draw, so the seed's own luck cancels): the mean of the per-seed
    differences ``a - b``, t, ``n - 1`` degrees of freedom, the two-sided p-value and the 95%
    interval of the mean difference."""

    n: int


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Paired:
    """``scipy.stats.ttest_rel`` of ``a`` against ``b`` (``a[i]`` and ``b[i]`` the same seed; at
    least two pairs). Identical differences (zero standard error) give p = 1 for a zero mean
    difference, 0 otherwise."""
    from scipy import stats

    if len(a) != len(b) or len(a) < 2:
        raise ValueError(f"the paired t-test needs at least 2 pairs of values, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    d, sd = mean_std(diffs)
    se = sd / math.sqrt(len(diffs))
    df = float(len(diffs) - 1)
    if _no_spread(sd, [*a, *b]):
        return Paired(d, math.copysign(math.inf, d) if d else 0.0, df, 1.0 if d == 0.0 else 0.0, d, d, n=len(diffs))
    p = float(stats.ttest_rel(a, b).pvalue)
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Paired(d, d / se, df, p, d - half, d + half, n=len(diffs))


def margin_p(a: Sequence[float], b: Sequence[float], margin: float, *, pair: bool) -> float:
    """One-sided p-value that ``a`` is lower than ``b`` by more than ``margin`` (the null
    hypothesis: ``mean(b) - mean(a) <= margin``): Welch's test, or the paired test over same-seed
    pairs with ``pair``. Parameter Golf's record rule asks for p < 0.01 with a 0.005-nat margin.
    Zero spread: 0 if the improvement exceeds the margin, else 1."""
    from scipy import stats

    if pair:
        diffs = [x - y for x, y in zip(a, b)]  # per seed; better by more than the margin: mean < -margin
        spread = mean_std(diffs)[1]
        result = None if _no_spread(spread, [*a, *b]) else stats.ttest_1samp(diffs, -margin, alternative="less")
    else:
        spread = math.hypot(mean_std(a)[1], mean_std(b)[1])
        result = None if _no_spread(spread, [*a, *b]) else stats.ttest_ind([x + margin for x in a], b, equal_var=False, alternative="less")
    if result is None:
        return 0.0 if mean_std(b)[0] - mean_std(a)[0] > margin else 1.0
    return float(result.pvalue)
