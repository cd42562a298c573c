"""Statistics of repeated runs: mean and spread over seeds, and paired differences with a
95% confidence interval (Student's t over the per-seed differences, SciPy)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation (n-1; 0 for one value) and count of the values given."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return {"mean": None, "std": None, "n": 0}
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "n": len(xs)}


def paired_interval(a: dict[int, float | None], b: dict[int, float | None], level: float = 0.95) -> dict:
    """a - b over the seeds both have: mean difference and its ``level`` t-interval. With one
    pair the interval is unbounded (no spread to estimate): ``low``/``high`` are None."""
    from scipy.stats import t

    seeds = sorted(s for s in a if s in b and a[s] is not None and b[s] is not None)
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return {"mean": None, "low": None, "high": None, "n": 0, "seeds": []}
    stats = mean_std(diffs)
    if len(diffs) < 2:
        return {"mean": stats["mean"], "low": None, "high": None, "n": 1, "seeds": seeds, "diffs": diffs}
    half = t.ppf(0.5 + level / 2, len(diffs) - 1) * stats["std"] / math.sqrt(len(diffs))
    return {"mean": stats["mean"], "low": stats["mean"] - half, "high": stats["mean"] + half,
            "n": len(diffs), "seeds": seeds, "diffs": diffs}


def verdict(interval: dict, threshold: float) -> str:
    """Whether a ``paired_interval`` lies above ``threshold`` ("yes"), below it ("no"), or
    straddles it ("inconclusive"); "n/a" without an interval."""
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "n/a"
    if low >= threshold:
        return "yes"
    if high < threshold:
        return "no"
    return "inconclusive"
