"""Pure statistics on latency samples (no I/O, no TVM): summaries now, verdicts later."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Summary:
    median: float
    mean: float
    std: float
    min: float
    p90: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples: list[float]) -> Summary:
    """Median, mean, sample standard deviation, min and p90 of latency samples."""
    values = sorted(samples)
    n = len(values)
    if n == 0:
        nan = math.nan
        return Summary(nan, nan, nan, nan, nan, 0)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Summary(
        median=percentile(values, 0.5),
        mean=mean,
        std=std,
        min=values[0],
        p90=percentile(values, 0.9),
        n=n,
    )


def speedup(reference_ms: float | None, candidate_ms: float | None) -> float | None:
    """How many times faster the candidate is than the reference (>1: faster)."""
    if not reference_ms or not candidate_ms or candidate_ms <= 0:
        return None
    return reference_ms / candidate_ms
