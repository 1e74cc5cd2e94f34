"""Benchmark history over commits, from MLflow runs to rows, verdicts, sparklines and the HTML report. Pure.

`mlci history` reads one MLflow run per commit x model x target (`mlci.history` does the reading)
and hands the runs here as `RunRecord`s. Each model x target becomes a `Series`: one `TrendRow` per
commit, oldest first, so that the table, the sparkline and the chart all read left to right (top
to bottom) in the order the commits were measured.

Consecutive commits are compared with the regression gate's own rule (`stats.median_ratio_ci` and
`stats.classify`, unpaired as the gate compares with an MLflow baseline) on the latency samples of
each run's results.json. A run without samples gets no verdict and a note saying why; a median
from the metrics alone is never compared. Nor is anything compared across a change of the
environment fingerprint: the series is cut into segments there, and the sparkline and the chart's
line break at each cut.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from mlci.formatting import format_ms, short_sha
from mlci.gate import DEFAULT_CONFIDENCE, DEFAULT_THRESHOLD
from mlci.results import Verdict
from mlci.stats import cell_confidence, classify, cost_per_million, median_ratio_ci

INTERVAL_CONFIDENCE = 0.95
"""Of the interval shown around each median (the verdicts use the gate's own confidence)."""
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
SPARK_BREAK = "┊"
"""Where the environment fingerprint changed: the sparkline is not joined across it."""
SPARK_MISSING = "·"
"""A commit without a median (its run failed)."""
_FINGERPRINT_NOISE = {"hash", "os", "python"}
"""Left out of an environment diff, as the gate leaves them out of the fingerprint hash."""


@dataclass(frozen=True)
class RunRecord:
    """What one MLflow run says about one commit x model x target; None where it says nothing."""

    run_id: str
    model: str
    target: str
    commit: str | None
    started_ms: int
    """The run's start time (milliseconds since the epoch): orders the commits."""
    created_at: str | None = None
    status: str = "FINISHED"
    run_url: str | None = None
    branch: str | None = None
    fingerprint: str | None = None
    """The environment fingerprint's hash."""
    environment: dict[str, Any] = field(default_factory=dict)
    """The full fingerprint from results.json ({} when the run has none)."""
    tvm_version: str | None = None
    samples: list[float] | None = None
    """TVM latency samples (ms) from results.json; None when the run has no readable results.json."""
    samples_problem: str | None = None
    """Why `samples` is None or unusable, in words."""
    median_ms: float | None = None
    onnxruntime_median_ms: float | None = None
    speedup: float | None = None
    """ONNX Runtime's median over TVM's: above 1, TVM is faster."""
    trials_new: int | None = None
    threshold: float | None = None
    """The relative change that counted for this model when it ran (its config's, recorded in results.json)."""
    confidence: float | None = None
    """The gate's family confidence when it ran."""
    price_per_hour: float | None = None
    """The target's price (USD per hour) the run recorded in results.json; None: no cost for this run."""


@dataclass(frozen=True)
class TrendRow:
    """One commit of one model x target. The keys of `as_dict` are `mlci history --format json`'s."""

    model: str
    target: str
    commit: str | None
    short_sha: str | None
    created_at: str | None
    run_id: str
    run_url: str | None
    status: str
    median_ms: float | None
    median_low_ms: float | None
    median_high_ms: float | None
    samples: int
    onnxruntime_median_ms: float | None
    speedup_vs_onnxruntime: float | None
    cost_per_million_usd: float | None
    """USD per million inferences at the run's price per hour (`stats.cost_per_million`); None without a price."""
    onnxruntime_cost_per_million_usd: float | None
    trials_new: int | None
    fingerprint: str | None
    tvm_version: str | None
    segment: int
    """Rows of one segment share an environment fingerprint; only they are compared."""
    environment_changed: bool
    """True on the first row after a change of environment fingerprint."""
    environment_diff: dict[str, list[Any]]
    """On such a row: key -> [previous, this] for each fingerprint entry that differs."""
    previous_commit: str | None
    """The commit this row is compared with: the last earlier row of the segment with a median."""
    change: float | None
    """Relative change of the median vs `previous_commit` (+0.07: 7% slower); None when not compared."""
    change_low: float | None
    change_high: float | None
    verdict: str | None
    """regression, improvement, unchanged or inconclusive (the gate's rule); None when not compared."""
    threshold: float | None
    note: str | None
    """Why there is no verdict, or what else a reader should know about this row."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Series:
    model: str
    target: str
    rows: list[TrendRow]

    @property
    def sparkline(self) -> str:
        return sparkline(self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "sparkline": self.sparkline,
                "rows": [r.as_dict() for r in self.rows]}


# --- building the series ------------------------------------------------------------------


def latest_commits(records: Sequence[RunRecord], limit: int | None = None) -> list[RunRecord]:
    """One run per commit of each model x target, the newest `limit` commits of each (None: all).

    Several runs of one commit (a job run again outside CI) count once: the newest run, at the place
    of the commit's first run (the commits' order is the order they were first measured in)."""
    groups: dict[tuple[str, str], dict[str, list[RunRecord]]] = {}
    for record in records:
        commits = groups.setdefault((record.model, record.target), {})
        commits.setdefault(record.commit or f"run:{record.run_id}", []).append(record)
    chosen: list[RunRecord] = []
    for key in sorted(groups):
        ordered = sorted(groups[key].values(), key=lambda runs: min((r.started_ms, r.run_id) for r in runs))
        picked = [max(runs, key=lambda r: (r.started_ms, r.run_id)) for runs in ordered]
        chosen += picked[-limit:] if limit else picked
    return chosen


def build_series(records: Sequence[RunRecord], limit: int | None = None) -> list[Series]:
    """One series per model x target (sorted by name), one row per commit, oldest first (see `latest_commits`).

    The verdicts use the gate's confidence split over the series (Bonferroni, as the gate splits it
    over the cells of one commit), so that each commit's column of verdicts keeps the gate's
    false-alarm rate."""
    chosen: dict[tuple[str, str], list[RunRecord]] = {}
    for record in latest_commits(records, limit):
        chosen.setdefault((record.model, record.target), []).append(record)
    family = next((r.confidence for runs in chosen.values() for r in reversed(runs) if r.confidence), None)
    confidence = cell_confidence(len(chosen), family or DEFAULT_CONFIDENCE)
    return [Series(model, target, series_rows(chosen[(model, target)], confidence))
            for model, target in sorted(chosen)]


def series_rows(records: Sequence[RunRecord], confidence: float = DEFAULT_CONFIDENCE) -> list[TrendRow]:
    """Rows for the runs of one model x target, in the given (commit) order."""
    rows: list[TrendRow] = []
    segment = 0
    previous: RunRecord | None = None
    compared_with: RunRecord | None = None  # the last run of this segment with usable samples
    for record in records:
        changed, diff = False, {}
        if previous is not None and not same_environment(previous, record):
            changed, diff = True, environment_diff(previous, record)
            segment += 1
            compared_with = None
        samples, sample_note = usable_samples(record)
        row = TrendRow(
            model=record.model, target=record.target, commit=record.commit, short_sha=short_sha(record.commit),
            created_at=record.created_at, run_id=record.run_id, run_url=record.run_url, status=record.status,
            median_ms=_finite(record.median_ms), median_low_ms=None, median_high_ms=None,
            samples=len(samples or []), onnxruntime_median_ms=_finite(record.onnxruntime_median_ms),
            speedup_vs_onnxruntime=_finite(record.speedup),
            cost_per_million_usd=cost_per_million(record.price_per_hour, _finite(record.median_ms)),
            onnxruntime_cost_per_million_usd=cost_per_million(record.price_per_hour,
                                                              _finite(record.onnxruntime_median_ms)),
            trials_new=record.trials_new,
            fingerprint=record.fingerprint, tvm_version=record.tvm_version, segment=segment,
            environment_changed=changed, environment_diff=diff, previous_commit=None, change=None,
            change_low=None, change_high=None, verdict=None,
            threshold=record.threshold if record.threshold is not None else DEFAULT_THRESHOLD, note=None,
        )
        if samples:
            low, high = median_interval(samples)
            row = replace(row, median_low_ms=low, median_high_ms=high)
        row = _compared(row, record, samples, sample_note, compared_with, changed, confidence)
        rows.append(row)
        previous = record
        if samples:
            compared_with = record
    return rows


def _compared(row: TrendRow, record: RunRecord, samples: list[float] | None, sample_note: str | None,
              base: RunRecord | None, changed: bool, confidence: float) -> TrendRow:
    """`row` with its change and verdict vs `base` (the segment's previous run with samples), or a note why not."""
    if changed:
        keys = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in row.environment_diff.items()) or "fingerprint"
        return replace(row, note=f"environment changed ({keys}): not compared with earlier commits")
    if samples is None:
        return replace(row, note=sample_note)
    if base is None:
        return replace(row, note="first measured commit of this environment")
    base_samples, _ = usable_samples(base)
    assert base_samples is not None
    estimate = median_ratio_ci(base_samples, samples, paired=False, confidence=confidence)
    verdict = classify(estimate, row.threshold if row.threshold is not None else DEFAULT_THRESHOLD)
    return replace(row, previous_commit=base.commit, change=estimate.ratio - 1.0, change_low=estimate.low - 1.0,
                   change_high=estimate.high - 1.0, verdict=str(verdict))


def usable_samples(record: RunRecord) -> tuple[list[float] | None, str | None]:
    """The run's samples when the gate could compare them; else None and why, in words."""
    if record.samples is None:
        return None, record.samples_problem or "no latency samples (no readable results.json): not compared"
    if not record.samples:
        return None, record.samples_problem or "no latency samples in results.json (the model failed?): not compared"
    bad = [s for s in record.samples if not _positive(s)]
    if bad:
        return None, f"results.json has latency samples that are not positive finite milliseconds ({bad[0]!r}): not compared"
    return list(record.samples), None


def median_interval(samples: list[float], confidence: float = INTERVAL_CONFIDENCE) -> tuple[float, float]:
    """A bootstrap interval of the median, by the gate's bootstrap: the ratio of the samples' median to
    a baseline of one sample of 1 ms is the median itself."""
    estimate = median_ratio_ci([1.0], samples, paired=False, confidence=confidence)
    return estimate.low, estimate.high


def same_environment(a: RunRecord, b: RunRecord) -> bool:
    """Runs are comparable only when both name their fingerprint and it is the same one."""
    return a.fingerprint is not None and a.fingerprint == b.fingerprint


def environment_diff(before: RunRecord, after: RunRecord) -> dict[str, list[Any]]:
    """key -> [before, after] for each fingerprint entry that differs (the hash when nothing else tells)."""
    old, new = before.environment, after.environment
    keys = (set(old) | set(new)) - _FINGERPRINT_NOISE
    diff = {k: [old.get(k), new.get(k)] for k in sorted(keys) if old.get(k) != new.get(k)}
    if not diff and before.tvm_version != after.tvm_version:
        diff["tvm"] = [before.tvm_version, after.tvm_version]
    return diff or {"hash": [before.fingerprint, after.fingerprint]}


# --- presenting ---------------------------------------------------------------------------


def sparkline(rows: Sequence[TrendRow]) -> str:
    """One block per commit, its height the median within the series' range; broken where the environment changed."""
    medians = [r.median_ms for r in rows if r.median_ms is not None]
    if not medians:
        return SPARK_MISSING * len(rows)
    low, high = min(medians), max(medians)
    out = []
    for row in rows:
        if row.environment_changed:
            out.append(SPARK_BREAK)
        if row.median_ms is None:
            out.append(SPARK_MISSING)
            continue
        level = 0 if high == low else round((row.median_ms - low) / (high - low) * (len(SPARK_LEVELS) - 1))
        out.append(SPARK_LEVELS[level])
    return "".join(out)


def format_change(row: TrendRow) -> str:
    """``+7.1% [+2.0, +12.3]`` (the interval in percent too); ``—`` when the row was not compared."""
    if row.change is None or row.change_low is None or row.change_high is None:
        return "—"
    return f"{row.change * 100:+.1f}% [{row.change_low * 100:+.1f}, {row.change_high * 100:+.1f}]"


def format_median(row: TrendRow) -> str:
    """``3.10 µs [3.02, 3.31]``: the median with its interval (in the median's unit unless one is given)."""
    if row.median_ms is None:
        return "—"
    if row.median_low_ms is None or row.median_high_ms is None:
        return format_ms(row.median_ms)
    median, low, high = (format_ms(v) for v in (row.median_ms, row.median_low_ms, row.median_high_ms))
    unit = median.rpartition(" ")[2]
    if low.endswith(" " + unit) and high.endswith(" " + unit):
        low, high = low.rpartition(" ")[0], high.rpartition(" ")[0]
    return f"{median} [{low}, {high}]"


def history_json(series: Sequence[Series], *, tracking_uri: str, experiment: str, branch: str) -> dict[str, Any]:
    """`mlci history --format json`: the same rows as the table, keyed as `TrendRow`'s fields."""
    return {"tracking_uri": tracking_uri, "experiment": experiment, "branch": branch,
            "series": [s.as_dict() for s in series]}


# --- the HTML report ----------------------------------------------------------------------


def chart_svg(series: Series) -> str:
    """One model x target as inline SVG (matplotlib): the median line with its interval band, ONNX Runtime
    as a second line, red markers on regressions, a dashed vertical rule at each environment change,
    and each commit's point a link to its MLflow run where the store has run pages.

    SVG ids a reader (or a test) can find, KEY being ``<model>@<target>``: ``points-KEY`` (one ``use`` per measured
    commit, inside an ``a`` where there is a link), ``regressions-KEY``, ``median-KEY-SEGMENT`` (one line per
    segment: none joins two environments) and ``environment-change-KEY-INDEX``."""
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    rows = series.rows
    key = f"{series.model}@{series.target}"
    xs = list(range(len(rows)))
    values = [v for r in rows for v in (r.median_ms, r.median_high_ms, r.onnxruntime_median_ms) if v is not None]
    scale, unit = (1000.0, "µs") if values and max(values) < 1.0 else (1.0, "ms")

    def y(value: float | None) -> float | None:
        return None if value is None else value * scale

    # The salt makes the SVG's generated ids differ between the charts of one page.
    with rc_context({"svg.fonttype": "none", "svg.hashsalt": key, "font.size": 9}):
        fig = Figure(figsize=(max(7.0, min(13.0, 2.5 + 0.45 * len(rows))), 3.4), layout="constrained")
        ax = fig.add_subplot()
        labelled: set[str] = set()

        def label(name: str) -> str:
            first = name not in labelled
            labelled.add(name)
            return name if first else "_nolegend_"

        for segment in sorted({r.segment for r in rows}):
            part = [(x, r) for x, r in zip(xs, rows, strict=True) if r.segment == segment and r.median_ms is not None]
            if not part:
                continue
            px = [x for x, _ in part]
            ax.plot(px, [y(r.median_ms) for _, r in part], color="#1f77b4", linewidth=1.6, label=label("TVM median"),
                    gid=f"median-{key}-{segment}")
            banded = [(x, r) for x, r in part if r.median_low_ms is not None and r.median_high_ms is not None]
            if banded:
                ax.fill_between([x for x, _ in banded], [y(r.median_low_ms) for _, r in banded],
                                [y(r.median_high_ms) for _, r in banded], color="#1f77b4", alpha=0.18, linewidth=0,
                                label=label("95% interval"))
            ort = [(x, y(r.onnxruntime_median_ms)) for x, r in part if r.onnxruntime_median_ms is not None]
            if ort:
                ax.plot([x for x, _ in ort], [v for _, v in ort], color="#ff7f0e", linewidth=1.2, linestyle="--",
                        marker=".", label=label("ONNX Runtime median"))
        measured = [(x, r) for x, r in zip(xs, rows, strict=True) if r.median_ms is not None]
        points = ax.scatter([x for x, _ in measured], [y(r.median_ms) for _, r in measured], s=22, color="#1f77b4",
                            zorder=3)
        points.set_urls([r.run_url for _, r in measured])
        points.set_gid(f"points-{key}")
        regressions = [(x, r) for x, r in measured if r.verdict == Verdict.REGRESSION]
        if regressions:
            marks = ax.scatter([x for x, _ in regressions], [y(r.median_ms) for _, r in regressions], s=70, marker="v",
                               color="#d62728", zorder=4, label="regression")
            marks.set_urls([r.run_url for _, r in regressions])
            marks.set_gid(f"regressions-{key}")
        for x, row in zip(xs, rows, strict=True):
            if row.environment_changed:
                what = ", ".join(row.environment_diff) or "environment"
                ax.axvline(x - 0.5, color="#7f7f7f", linestyle=":", linewidth=1.2, label=label("environment changed"),
                           gid=f"environment-change-{key}-{x}")
                ax.annotate(what, (x - 0.5, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                            ha="right", fontsize=7, color="#555555", annotation_clip=False, parse_math=False)
        ax.set_xticks(xs, [r.short_sha or (r.commit or "?")[:7] for r in rows], rotation=45, ha="right",
                      fontfamily="monospace")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_ylabel(f"latency ({unit})")
        ax.grid(axis="y", alpha=0.3)
        if measured:
            top = max(values) * scale
            ax.set_ylim(0, top * 1.12)  # from zero: a change reads at its true size; room above for the markers
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]  # inline: no XML prolog or doctype inside HTML


def render_html(series: Sequence[Series], *, tracking_uri: str, experiment: str, branch: str,
                generated_at: str) -> str:
    """The self-contained HTML report (templates/history.html.j2): inline SVG and CSS, nothing fetched when viewed."""
    from markupsafe import escape

    from mlci.templating import make_environment

    env = make_environment({"h": lambda value: str(escape("" if value is None else value)),
                            "change": format_change, "median": format_median, "ms": format_ms})
    charts = [{"series": s, "svg": chart_svg(s), "key": f"{s.model}@{s.target}"} for s in series]
    return env.get_template("history.html.j2").render(
        charts=charts, tracking_uri=tracking_uri, experiment=experiment, branch=branch, generated_at=generated_at,
        spark_break=SPARK_BREAK)


def _finite(value: float | None) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) else None


def _positive(value: Any) -> bool:
    return _finite(value) is not None and value > 0
