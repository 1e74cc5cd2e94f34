"""The regression gate: results files in, one verdict per model x target out. Pure (no I/O).

`mlci compare` reads the results of every matrix job, calls `decide`, renders
the outcome and picks the exit code from `Decision.failed`. The statistics
(interval, verdict rule, matrix-wide false-alarm control) live in `stats.py`.

Where the baseline comes from, in order:
1. A/B: the base commit's model measured interleaved with the head in the
   same job (`ModelResult.base`): paired samples, immune to runner drift.
2. History: the MLflow run of the merge-base or the newest default-branch run
   (`ModelResult.history`), compared only when the environment fingerprint
   matches; a mismatch is reported, never compared.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from mlci.config import GateConfig
from mlci.results import (
    BaseStatus,
    CompileInfo,
    Execution,
    FailOn,
    GitInfo,
    KernelProfile,
    Latency,
    ModelResult,
    NumericsInfo,
    Results,
    Status,
    TargetInfo,
    TrendPoint,
    TuningInfo,
    Verdict,
)
from mlci.stats import RatioEstimate, cell_confidence, classify, cost_per_million, median_ratio_ci, speedup

DEFAULT_THRESHOLD = GateConfig.threshold
DEFAULT_CONFIDENCE = GateConfig.confidence
VERDICT_ORDER = tuple(Verdict)
"""Worst first: the order of the table and of the headline."""


@dataclass(frozen=True)
class HistoryNote:
    """How the head compares with the MLflow baseline; shown, gating only without A/B."""

    commit: str | None
    branch: str | None
    run_id: str
    comparable: bool
    """False when the environment fingerprint differs: never compared blindly."""
    fingerprint_diff: dict[str, list[Any]]
    ratio: float | None
    trend: list[TrendPoint]
    trend_url: str | None = None
    """The trend's runs side by side on the MLflow server, linked from a regressed cell."""


TOP_KERNELS = 5
"""Kernels named per slower cell: those whose time grew most."""


@dataclass(frozen=True)
class KernelChange:
    """One kernel's time per inference in the base build and in the head build (µs; None: not in that build)."""

    name: str
    base_us: float | None
    head_us: float | None
    base_calls: int | None = None
    head_calls: int | None = None

    @property
    def growth_us(self) -> float:
        """head - base; a kernel only in the head grew by all its time, one only in the base shrank by all of it."""
        return (self.head_us or 0.0) - (self.base_us or 0.0)

    @property
    def change(self) -> float | None:
        """Relative change (+0.5: 50% slower); None for a kernel on one side only."""
        if self.base_us is None or self.head_us is None or self.base_us <= 0:
            return None
        return self.head_us / self.base_us - 1.0

    @property
    def side(self) -> str | None:
        """``new`` (head only), ``gone`` (base only) or None (in both)."""
        if self.base_us is None:
            return "new"
        if self.head_us is None:
            return "gone"
        return None


def kernel_growth(base: KernelProfile | None, head: KernelProfile | None, limit: int = TOP_KERNELS) -> list[KernelChange]:
    """The kernels whose time per inference grew most from base to head, most first (at most `limit`):
    those that grew or are new, then those gone from the head (a renamed kernel shows on both lists).
    Empty unless both builds were profiled."""
    if base is None or head is None or not (base.kernels or head.kernels):
        return []
    before = {k.name: k for k in base.kernels}
    after = {k.name: k for k in head.kernels}
    changes = []
    for name in {**before, **after}:
        b, h = before.get(name), after.get(name)
        changes.append(KernelChange(name, b.total_us if b else None, h.total_us if h else None,
                                    b.calls if b else None, h.calls if h else None))
    grown = sorted((c for c in changes if c.growth_us > 0), key=lambda c: (-c.growth_us, c.name))
    gone = sorted((c for c in changes if c.side == "gone"), key=lambda c: (c.growth_us, c.name))
    return (grown + gone)[:limit]


@dataclass(frozen=True)
class Cell:
    model: str
    target: str
    verdict: Verdict
    reason: str
    """One line for the reviewer: why this verdict."""
    threshold: float
    baseline: str | None = None
    """``ab`` (same-runner A/B), ``history`` (an MLflow run) or None."""
    base_commit: str | None = None
    base_ms: float | None = None
    head_ms: float | None = None
    estimate: RatioEstimate | None = None
    speedup_vs_ort: float | None = None
    peer_provider: str | None = None
    """ONNX Runtime's execution provider when it was timed (``CUDAExecutionProvider`` on a CUDA target) ..."""
    peer_note: str | None = None
    """... and why it was not, where it was not (the comment then reads ``n/a``)."""
    blocking: bool = False
    """Whether this cell fails the build under the decision's fail-on policy."""
    known_failure: bool = False
    """Failed at the base commit too: shown, but does not fail the build."""
    status: Status | None = None
    error: str | None = None
    tuning: TuningInfo | None = None
    compile: CompileInfo | None = None
    numerics: NumericsInfo | None = None
    rounds: int = 0
    mlflow_run_id: str | None = None
    mlflow_url: str | None = None
    history: HistoryNote | None = None
    price_per_hour: float | None = None
    """The target's price (USD per hour); None: no costs for this cell."""
    head_cost: float | None = None
    """USD per million inferences of the head build (from its median)."""
    base_cost: float | None = None
    """The same for the baseline's median."""
    ort_cost: float | None = None
    """The same for ONNX Runtime's median."""
    kernels: tuple[KernelChange, ...] = ()
    """The kernels that grew most, when the run profiled both builds (a cell it measured slower)."""

    @property
    def change(self) -> float | None:
        """Relative change of the median latency, head vs base (+0.07 = 7% slower)."""
        return self.estimate.ratio - 1.0 if self.estimate else None

    @property
    def cost_change(self) -> float | None:
        """USD per million inferences, head minus base (positive: dearer)."""
        if self.head_cost is None or self.base_cost is None:
            return None
        return self.head_cost - self.base_cost


@dataclass(frozen=True)
class TargetSummary:
    name: str
    fingerprint: dict[str, Any]
    commit: str | None
    base_commit: str | None
    base_ref: str | None


@dataclass(frozen=True)
class Decision:
    cells: list[Cell]
    fail_on: FailOn
    family_confidence: float
    cell_confidence: float
    targets: list[TargetSummary]
    git: GitInfo
    problems: tuple[str, ...] = ()
    """Inputs that could not be used (an unreadable results file): the gate cannot vouch."""
    config: str | None = None
    """The config the results came from (relative to the repository): keys the sticky comment."""

    @property
    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(VERDICT_ORDER, 0)
        for cell in self.cells:
            counts[cell.verdict] += 1
        return counts

    @property
    def blocking(self) -> list[Cell]:
        return [c for c in self.cells if c.blocking]

    @property
    def failed(self) -> bool:
        return bool(self.blocking) or (bool(self.problems) and self.fail_on != FailOn.NEVER)

    @property
    def verdict(self) -> str:
        """One word for the whole matrix (the `verdict` output): failed, regression or pass."""
        kinds = {c.verdict for c in self.blocking}
        if Verdict.FAILED in kinds or (self.problems and self.fail_on != FailOn.NEVER):
            return "failed"
        if Verdict.REGRESSION in kinds:
            return "regression"
        return "pass"

    @property
    def headline(self) -> str:
        parts = []
        for verdict, singular, plural in (
            (Verdict.FAILED, "failure", "failures"),
            (Verdict.REGRESSION, "regression", "regressions"),
            (Verdict.IMPROVEMENT, "improvement", "improvements"),
        ):
            cells = [c for c in self.cells if c.verdict == verdict and not c.known_failure]
            if cells:
                targets = sorted({c.target for c in cells})
                noun = singular if len(cells) == 1 else plural
                parts.append(f"{len(cells)} {noun} on {', '.join(targets)}")
        known = sum(c.known_failure for c in self.cells)
        if not parts:
            if any(c.verdict == Verdict.UNCHANGED for c in self.cells):
                parts.append("No significant change")
            elif not any(c.verdict in (Verdict.INCONCLUSIVE, Verdict.COMPILED, Verdict.INTERRUPTED) for c in self.cells):
                parts.append("Nothing compared")
        if known:
            parts.append(f"{known} still failing as at the base")
        inconclusive = self.counts[Verdict.INCONCLUSIVE]
        if inconclusive:
            parts.append(f"{inconclusive} inconclusive")
        interrupted = sorted({c.target for c in self.cells if c.verdict == Verdict.INTERRUPTED})
        if interrupted:
            parts.append(f"{', '.join(interrupted)} interrupted: not measured")
        compiled = sorted({c.target for c in self.cells if c.verdict == Verdict.COMPILED})
        if compiled:
            parts.append(f"{', '.join(compiled)} compiled only, not timed")
        if self.problems:
            parts.append(f"{len(self.problems)} missing or unreadable results file{'s' if len(self.problems) > 1 else ''}")
        return "; ".join(parts)


def decide(
    results: list[Results],
    *,
    fail_on: FailOn | str | None = None,
    threshold: float | None = None,
    family_confidence: float | None = None,
    problems: list[str] | None = None,
) -> Decision:
    """Verdicts for every model x target of every results file.

    Explicit arguments override what `mlci run` recorded from the config
    (`Results.gate`); per-model thresholds from the config win over the global one
    unless `threshold` is given.
    """
    gate = results[0].gate if results else None
    chosen = fail_on or (gate and gate.fail_on) or FailOn.REGRESSION
    if chosen not in tuple(FailOn):
        raise ValueError(f"fail-on must be one of {', '.join(FailOn)}, not {chosen!r}")
    policy = FailOn(chosen)
    family = family_confidence or (gate and gate.confidence) or DEFAULT_CONFIDENCE

    compared = sum(1 for r in results for m in r.models if _samples(m) is not None)
    per_cell = cell_confidence(compared, family)
    cells: list[Cell] = []
    default_threshold = threshold if threshold is not None else (gate and gate.threshold) or DEFAULT_THRESHOLD
    for res in results:
        for model in res.models:
            limit = threshold if threshold is not None else (model.threshold or default_threshold)
            cells.append(_cell(res, model, limit, per_cell))
        for name in res.removed_models:
            cells.append(Cell(name, res.target.name, Verdict.REMOVED, "in the base commit's config, not in the head's",
                              default_threshold, base_commit=res.git.base_commit))
    cells = [_with_blocking(c, policy) for c in cells]
    cells.sort(key=lambda c: (VERDICT_ORDER.index(c.verdict), c.model, c.target))
    targets = [
        TargetSummary(r.target.name, r.target.fingerprint.as_dict(), r.git.commit, r.git.base_commit, r.base_ref)
        for r in results
    ]
    git = results[0].git if results else GitInfo()
    configs = sorted({r.config for r in results if r.config})
    return Decision(cells, policy, family, per_cell, targets, git, tuple(problems or ()),
                    config=", ".join(configs) or None)


def latency_problems(results: Results) -> Iterator[str]:
    """Every latency in `results` that is not a positive, finite number of milliseconds, by model and key.

    A results file comes from an untrusted run. A zero, negative, NaN or infinite latency cannot be
    compared (log-ratios of zero are infinite), so the file is refused rather than shown as ``+nan%``.
    `mlci compare` treats such a file like an unreadable one.
    """
    for i, model in enumerate(results.models):
        for key, value in _latencies(model):
            if not _is_latency(value):
                yield f"models[{i}] ({model.name!r}).{key} is {value!r}"


_MAX_LATENCY_PROBLEMS = 5


def latency_problem(results: Results) -> str | None:
    """`latency_problems` as one line (the first few and a count), or None when every latency is plausible."""
    shown, more = [], 0
    for problem in latency_problems(results):
        if len(shown) < _MAX_LATENCY_PROBLEMS:
            shown.append(problem)
        else:
            more += 1
    if not shown:
        return None
    return "; ".join(shown) + (f"; and {more} more" if more else "")


def _is_latency(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def _latencies(model: ModelResult) -> Iterator[tuple[str, Any]]:
    """(key, value) of every latency of one model that the gate or the report reads; missing ones (None) skipped."""
    sides = [("latency_ms", model.latency_ms),
             ("base.latency_ms", model.base.latency_ms if model.base else None),
             ("history.latency_ms", model.history.latency_ms if model.history else None)]
    for prefix, lat in sides:
        if lat is None:
            continue
        for j, sample in enumerate(lat.samples):
            yield f"{prefix}.samples[{j}]", sample
        for name in ("median", "mean", "min", "p90"):
            value = getattr(lat, name)
            if value is not None:
                yield f"{prefix}.{name}", value
    if model.peer is not None and model.peer.onnxruntime_median_ms is not None:
        yield "peer.onnxruntime_median_ms", model.peer.onnxruntime_median_ms
        for j, sample in enumerate(model.peer.onnxruntime_samples or []):
            yield f"peer.onnxruntime_samples[{j}]", sample
    for j, point in enumerate(model.history.trend if model.history else []):
        if point.median is not None:
            yield f"history.trend[{j}].median", point.median


def _with_blocking(cell: Cell, fail_on: FailOn) -> Cell:
    if cell.known_failure or fail_on == FailOn.NEVER:
        return cell
    blocking = cell.verdict == Verdict.FAILED or (fail_on == FailOn.REGRESSION and cell.verdict == Verdict.REGRESSION)
    return replace(cell, blocking=True) if blocking else cell


def _median(latency: Latency | None) -> float | None:
    return latency.median if latency else None


def _samples(model: ModelResult) -> tuple[list[float], list[float], bool, str] | None:
    """(base, head, paired, kind) when this cell has samples to compare, else None."""
    if not model.ok or model.latency_ms is None:
        return None
    base = model.base
    if base is not None and base.status == BaseStatus.OK and base.latency_ms and base.latency_ms.samples:
        # Paired when the samples came from the same blocks (always, from `mlci run`);
        # a hand-merged file with unequal counts is still compared, unpaired.
        paired = base.latency_ms.n == model.latency_ms.n
        return base.latency_ms.samples, model.latency_ms.samples, paired, "ab"
    hist = model.history
    if base is None and hist is not None and hist.fingerprint_match and hist.latency_ms and hist.latency_ms.samples:
        return hist.latency_ms.samples, model.latency_ms.samples, False, "history"
    return None


def _history_note(model: ModelResult) -> HistoryNote | None:
    hist = model.history
    if hist is None:
        return None
    ratio = None
    if hist.fingerprint_match and model.latency_ms and hist.latency_ms and hist.latency_ms.median:
        ratio = model.latency_ms.median / hist.latency_ms.median
    return HistoryNote(hist.commit, hist.branch, hist.run_id, hist.fingerprint_match,
                       hist.fingerprint_diff, ratio, hist.trend, hist.trend_url)


def _cell(res: Results, model: ModelResult, threshold: float, confidence: float) -> Cell:
    base = model.base
    price = res.target.price_per_hour
    ort_ms = model.peer.onnxruntime_median_ms if model.peer else None
    common: dict[str, Any] = dict(
        model=model.name,
        target=res.target.name,
        threshold=threshold,
        status=model.status,
        error=model.error,
        tuning=model.tuning,
        compile=model.compile,
        numerics=model.numerics,
        mlflow_run_id=model.mlflow_run_id,
        mlflow_url=model.mlflow_url,
        history=_history_note(model),
        head_ms=_median(model.latency_ms),
        speedup_vs_ort=speedup(model.peer.onnxruntime_median_ms if model.peer else None, _median(model.latency_ms)),
        peer_provider=model.peer.provider if model.peer else None,
        peer_note=model.peer.note if model.peer else None,
        base_commit=base.commit if base else (model.history.commit if model.history else None),
        rounds=base.rounds if base else 0,
        price_per_hour=price,
        head_cost=cost_per_million(price, _median(model.latency_ms)),
        ort_cost=cost_per_million(price, ort_ms),
        kernels=tuple(kernel_growth(base.profile if base else None, model.profile)),
    )
    if model.status == Status.INTERRUPTED:
        why = res.interrupted or "the machine went away"
        return Cell(verdict=Verdict.INTERRUPTED, reason=f"not measured: {why}; neither a regression nor a failure "
                    "of the model (rerun the job)", **common)
    if not model.ok:
        if model.status == Status.NUMERICS_FAILED:
            return Cell(verdict=Verdict.FAILED, reason=f"wrong numbers: {model.error}", **common)
        if base is not None and base.status == BaseStatus.OK:
            return Cell(verdict=Verdict.FAILED, reason=f"{model.status} (the base commit built): {model.error}", **common)
        if base is not None and base.status != BaseStatus.MISSING:
            return Cell(verdict=Verdict.FAILED, reason=f"{model.status}, as at the base commit: {model.error}",
                        known_failure=True, **common)
        return Cell(verdict=Verdict.FAILED, reason=f"{model.status}: {model.error}", **common)

    if res.target.execution != Execution.NATIVE:
        return Cell(verdict=Verdict.COMPILED, reason=_not_native_reason(res.target, model), **common)
    if base is not None and base.status == BaseStatus.MISSING:
        return Cell(verdict=Verdict.NEW, reason="not in the base commit", **common)
    if base is not None and base.status != BaseStatus.OK:
        why = f"{base.status}: {base.error}" if base.error else base.status
        return Cell(verdict=Verdict.NEW, reason=f"works now; the base commit had {why}", **common)

    compared = _samples(model)
    if compared is None:
        note = common["history"]
        if note is not None and not note.comparable:
            keys = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in note.fingerprint_diff.items())
            return Cell(verdict=Verdict.NEW, reason=f"no comparable baseline: the environment changed ({keys})", **common)
        return Cell(verdict=Verdict.NEW, reason="no baseline: no A/B base and no earlier run in MLflow", **common)

    base_samples, head_samples, paired, kind = compared
    estimate = median_ratio_ci(base_samples, head_samples, paired=paired, confidence=confidence)
    verdict = classify(estimate, threshold)
    base_ms = base.latency_ms.median if kind == "ab" and base and base.latency_ms else _median(model.history.latency_ms)
    reason = _reason(verdict, estimate, threshold, kind)
    return Cell(verdict=verdict, reason=reason, baseline=kind, base_ms=base_ms, estimate=estimate,
                base_cost=cost_per_million(price, base_ms), **common)


def _not_native_reason(target: TargetInfo, model: ModelResult) -> str:
    """What a runner without the target's hardware vouches for: that the model compiles for it and,
    under emulation, that its numbers are right; never its speed."""
    if target.execution == Execution.EMULATED and model.numerics is not None:
        done = "compiled; numerics right under emulation"
    else:
        done = "compiled"
    note = f" ({target.execution_note})" if target.execution_note else ""
    return f"{done}, not timed: this runner lacks the target's hardware{note}"


def _reason(verdict: Verdict, est: RatioEstimate, threshold: float, kind: str) -> str:
    interval = f"{(est.low - 1) * 100:+.1f}% to {(est.high - 1) * 100:+.1f}%"
    how = "same-runner A/B" if kind == "ab" else "vs the MLflow baseline"
    band = f"±{threshold * 100:g}%"
    text = {
        Verdict.REGRESSION: f"slower beyond {band}",
        Verdict.IMPROVEMENT: f"faster beyond {band}",
        Verdict.UNCHANGED: f"interval inside {band}",
        Verdict.INCONCLUSIVE: f"too noisy to tell: the interval crosses the {band} band",
    }[verdict]
    return f"{text} ({how}, {est.confidence * 100:.4g}% interval {interval})"
