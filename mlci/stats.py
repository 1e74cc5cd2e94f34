"""Pure statistics on latency samples (no I/O, no TVM): summaries now, verdicts later."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mlci.results import Verdict


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


# --- comparing two sets of samples (the regression gate builds on these) ----------

VERDICTS = ("regression", "improvement", "unchanged", "inconclusive")


@dataclass(frozen=True)
class RatioEstimate:
    """head/base latency ratio (paired: median per-pair ratio; unpaired: ratio of medians)
    with a bootstrap confidence interval."""

    ratio: float
    low: float
    high: float
    confidence: float


BOOTSTRAP_MAX_SAMPLES = 20_000
"""Samples per side the bootstrap uses at most: beyond, an evenly spaced subset (see `thin`)."""
BOOTSTRAP_CHUNK = 1 << 21
"""Resampled values held at once (16 MB of indices): memory stays flat however many samples a file has."""


def thin(values: list[float], limit: int = BOOTSTRAP_MAX_SAMPLES) -> list[float]:
    """At most `limit` values: every k-th one (k = ceil(n / limit)), from the first.

    A results file comes from an untrusted run and may hold hundreds of thousands of samples.
    An even stride keeps the spread over the whole measurement and keeps pairs aligned (both
    sides of a paired A/B thin alike); the interval only gets wider, never falsely narrow.
    """
    if len(values) <= limit:
        return values
    step = -(-len(values) // limit)
    return values[::step]


def median_ratio_ci(
    base: list[float],
    head: list[float],
    *,
    paired: bool,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> RatioEstimate:
    """Percentile bootstrap of the head/base latency ratio.

    Paired (A/B samples taken in alternating blocks, sample i of each from the same
    moment): the median of the per-pair ratios (as a median of log-ratios, so that
    swapping the sides exactly inverts it), pairs resampled jointly. A runner that
    switches between a fast and a slow state moves both samples of a pair alike, and
    the per-pair ratio cancels it; a ratio of the two medians would not.
    Unpaired: median(head) / median(base), each side resampled on its own.

    Latencies must be positive and finite. Each side is `thin`ned to BOOTSTRAP_MAX_SAMPLES
    and the resamples are drawn in chunks of rows from one seeded stream, so that memory is
    bounded and the result is the same as drawing them all at once.
    """
    import numpy as np

    b = np.asarray(thin(list(base)), dtype=np.float64)
    h = np.asarray(thin(list(head)), dtype=np.float64)
    if b.size == 0 or h.size == 0:
        raise ValueError("both sides need at least one sample")
    if paired and b.size != h.size:
        raise ValueError(f"paired samples need equal counts, got {b.size} and {h.size}")
    for side, values in (("base", b), ("head", h)):
        if not (np.all(np.isfinite(values)) and np.all(values > 0)):
            raise ValueError(f"{side} latencies must be positive and finite")
    rng = np.random.default_rng(seed)

    def boot_medians(values: np.ndarray) -> np.ndarray:
        """The median of each of `resamples` resamples of `values`, drawn chunk by chunk in stream order."""
        rows = max(1, BOOTSTRAP_CHUNK // values.size)
        out = np.empty(resamples, dtype=np.float64)
        for start in range(0, resamples, rows):
            stop = min(resamples, start + rows)
            idx = rng.integers(0, values.size, size=(stop - start, values.size))
            out[start:stop] = np.median(values[idx], axis=1)
        return out

    if paired:
        log_ratio = np.log(h) - np.log(b)
        ratio = float(np.exp(np.median(log_ratio)))
        boot = np.exp(boot_medians(log_ratio))
    else:
        ratio = float(np.median(h) / np.median(b))
        base_medians = boot_medians(b)  # all of base's draws first, then head's: the order of one big draw each
        boot = boot_medians(h) / base_medians
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return RatioEstimate(ratio, float(min(low, ratio)), float(max(high, ratio)), confidence)


def classify(estimate: RatioEstimate, threshold: float) -> Verdict:
    """The verdict rule, Bencher-style: a change counts only when the whole interval
    says so and the estimate clears the threshold; `unchanged` needs the interval
    inside the threshold band; anything else is `inconclusive` (never a guess)."""
    upper, lower = 1.0 + threshold, 1.0 / (1.0 + threshold)
    if estimate.low > 1.0 and estimate.ratio >= upper:
        return Verdict.REGRESSION
    if estimate.high < 1.0 and estimate.ratio <= lower:
        return Verdict.IMPROVEMENT
    if estimate.low >= lower and estimate.high <= upper:
        return Verdict.UNCHANGED
    return Verdict.INCONCLUSIVE


def faster_backend(speedup_vs_ort: float | None) -> tuple[str, float] | None:
    """Which of tuned TVM and ONNX Runtime to ship on a target, and how many times faster it
    runs than the other: ("tvm", 3.1) or ("onnxruntime", 2.0); None without both latencies."""
    if speedup_vs_ort is None or not math.isfinite(speedup_vs_ort) or speedup_vs_ort <= 0:
        return None
    if speedup_vs_ort >= 1.0:
        return "tvm", speedup_vs_ort
    return "onnxruntime", 1.0 / speedup_vs_ort


def cell_confidence(cells: int, family_confidence: float = 0.95) -> float:
    """Bonferroni: each of `cells` intervals at 1 - alpha/cells keeps the chance of any
    false alarm across the whole model x target matrix at most alpha."""
    alpha = 1.0 - family_confidence
    return 1.0 - alpha / max(cells, 1)


def cost_per_million(price_per_hour: float | None, median_ms: float | None) -> float | None:
    """USD per million inferences on a machine that costs `price_per_hour` and runs one inference at a
    time, each taking `median_ms`: price x median seconds x 1e6 / 3600. None without both numbers."""
    if price_per_hour is None or median_ms is None:
        return None
    if not (math.isfinite(price_per_hour) and math.isfinite(median_ms)) or price_per_hour <= 0 or median_ms < 0:
        return None
    return price_per_hour * (median_ms / 1e3) * 1e6 / 3600.0
