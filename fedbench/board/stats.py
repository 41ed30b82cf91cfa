"""Statistics over seeds: mean, sample standard deviation and a 95% confidence interval.

The half-width of the 95% confidence interval of the mean comes from Student's t with n-1
degrees of freedom, taken from a built-in table of the 0.975 quantile (df 1-30, 40, 60, 120,
inf; interpolated linearly in 1/df between entries, error < 1e-4), so SciPy is not needed.
n = 1 gives no spread.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

# Student's t, 0.975 quantile (two-sided 95%), by degrees of freedom.
_T975 = {
    1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624,
    8: 2.306004, 9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787,
    15: 2.131450, 16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614,
    22: 2.073873, 23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407,
    29: 2.045230, 30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.979930,
}
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError("t975 needs df >= 1")
    if df in _T975:
        return _T975[df]
    knots = [(d, _T975[d]) for d in (30, 40, 60, 120)] + [(math.inf, _Z975)]
    for (a, ta), (b, tb) in itertools.pairwise(knots):
        if a < df < b:
            inv_b = 0.0 if b == math.inf else 1 / b
            w = (1 / df - inv_b) / (1 / a - inv_b)
            return tb + w * (ta - tb)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof=1) and 95% CI half-width over ``n`` seeds; None where undefined."""

    mean: float | None
    std: float | None
    ci95: float | None
    n: int


NO_VALUES = Summary(None, None, None, 0)


def summarize(values: Iterable[float | None]) -> Summary:
    """Summarize the finite values (None, a metric a seed lacks, is left out, never read as 0)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return NO_VALUES
    if len(xs) == 1:
        return Summary(xs[0], None, None, 1)
    std = statistics.stdev(xs)
    return Summary(statistics.fmean(xs), std, t975(len(xs) - 1) * std / math.sqrt(len(xs)), len(xs))
