"""`mlci history`: the benchmark of each model x target over the commits of a branch, from MLflow.

MLflow's own UI lists runs; it has no view of one benchmark across commits. This reads the runs
`mlci run` logged (through `mlci.history`), builds the trend (`mlci.trend`: rows, changes by the
gate's rule, sparklines) and renders it as a terminal table, JSON, or a self-contained HTML report.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table
from rich.text import Text

from mlci.config import Config
from mlci.formatting import format_cost, format_ms, format_speedup
from mlci.gitinfo import default_branch
from mlci.history import StoreRuns, read_runs
from mlci.tracking import without_credentials
from mlci.trend import Series, build_series, format_change, format_median, history_json, render_html

FORMATS = ("table", "json", "html")


class HistoryUsageError(Exception):
    """A model or target that neither the config nor MLflow knows, or a format mlci does not write."""


@dataclass
class HistoryOptions:
    model: str | None = None
    target: str | None = None
    branch: str | None = None
    """None: the repository's default branch (origin's HEAD), else main."""
    limit: int = 30
    format: str = "table"
    tracking_uri: str | None = None
    """None: as `mlci run` resolves it (MLFLOW_TRACKING_URI, the config, the sqlite store under .mlci/)."""


@dataclass
class HistoryOutcome:
    series: list[Series]
    tracking_uri: str
    """Without credentials: fit to print."""
    experiment: str
    branch: str
    notes: list[str] = field(default_factory=list)
    """What the reader should know: no runs, a history cut short."""

    @property
    def empty(self) -> bool:
        return not self.series


def execute(config: Config, options: HistoryOptions) -> HistoryOutcome:
    """Read and build the history; raises HistoryUsageError for an unknown model or target and
    mlci.history.HistoryStoreError when MLflow cannot be read."""
    if options.format not in FORMATS:
        raise HistoryUsageError(f"--format must be one of {', '.join(FORMATS)}, not {options.format!r}")
    uri = options.tracking_uri or config.tracking_uri()
    branch = options.branch or default_branch(config.root) or "main"
    experiment = config.tracking.experiment
    store = read_runs(uri, experiment, branch=branch, model=options.model, target=options.target,
                      limit=options.limit)
    shown = without_credentials(uri)
    outcome = HistoryOutcome(build_series(store.records, options.limit), shown, experiment, branch)
    if store.truncated:
        outcome.notes.append("the branch has more runs than mlci reads at once; older commits are left out")
    if not outcome.empty:
        return outcome
    _check_names(config, options, store)
    what = " ".join(p for p in (f"of model {options.model!r}" if options.model else "",
                                f"on target {options.target!r}" if options.target else "") if p)
    where = f"in MLflow at {shown} (experiment {experiment!r})"
    if not store.store_exists:
        outcome.notes.append(f"no runs {where}: nothing logged there yet (`mlci run` logs one per model and target)")
    else:
        outcome.notes.append(f"no runs {what + ' ' if what else ''}on branch {branch!r} {where}")
    return outcome


def _check_names(config: Config, options: HistoryOptions, store: StoreRuns) -> None:
    """A model or target filter that found nothing: an error when neither the config nor MLflow has the name."""
    problems = []
    for flag, wanted, configured, logged in (
        ("--model", options.model, [m.name for m in config.models], store.models),
        ("--target", options.target, list(config.targets), store.targets),
    ):
        if wanted is None or wanted in configured or wanted in logged:
            continue
        known = sorted(set(configured) | set(logged))
        problems.append(f"{flag} {wanted}: no such {flag[2:]} in {config.path} or in MLflow; "
                        f"known: {', '.join(known) or 'none'}")
    if problems:
        raise HistoryUsageError("; ".join(problems))


# --- rendering ----------------------------------------------------------------------------

VERDICT_STYLES = {"regression": "red", "improvement": "green", "unchanged": "dim", "inconclusive": "yellow"}


def tables(outcome: HistoryOutcome) -> list[Table]:
    """One rich table per model x target, oldest commit first; the sparkline of the medians in its title."""
    out = []
    for series in outcome.series:
        title = Text.assemble((f"{series.model} on {series.target}", "bold"), "  ", series.sparkline)
        table = Table(title=title, title_justify="left",
                      caption=Text(f"branch {outcome.branch}, oldest first; ┊ and 'env' mark a change of "
                                   "environment (not compared across)"), caption_justify="left")
        priced = any(row.cost_per_million_usd is not None for row in series.rows)
        columns = [("commit", "left", False), ("date", "left", True), ("TVM median [95%]", "right", True),
                   ("ORT", "right", True), ("TVM speedup", "right", True), ("trials", "right", True),
                   ("vs previous [interval]", "right", True), ("verdict", "left", False)]
        if priced:
            columns.insert(5, ("$ per 1M inferences", "right", True))
        for header, justify, wrap in columns:
            table.add_column(Text(header), justify=justify, no_wrap=not wrap)
        for row in series.rows:
            commit = Text(row.short_sha or (row.commit or "?")[:12])
            if row.environment_changed:
                commit.append(" env", style="bold magenta")
            verdict = Text(row.verdict or ("failed" if row.status == "FAILED" else "—"),
                           style=VERDICT_STYLES.get(row.verdict or "", "red" if row.status == "FAILED" else "dim"))
            cells = [
                commit, Text((row.created_at or "")[:10]), Text(format_median(row)),
                Text(format_ms(row.onnxruntime_median_ms)), Text(format_speedup(row.speedup_vs_onnxruntime)),
                Text("—" if row.trials_new is None else str(row.trials_new)), Text(format_change(row)), verdict,
            ]
            if priced:
                cells.insert(5, Text(format_cost(row.cost_per_million_usd, row.onnxruntime_cost_per_million_usd)))
            table.add_row(*cells)
        out.append(table)
    return out


def notes_of_rows(outcome: HistoryOutcome) -> list[str]:
    """The rows' notes worth a line under the tables: environment changes and missing samples (not "first commit")."""
    lines = []
    for series in outcome.series:
        for row in series.rows:
            if row.note and (row.environment_changed or row.samples == 0):
                lines.append(f"{series.model} on {series.target} at {row.short_sha or row.commit}: {row.note}")
    return lines


def table_text(outcome: HistoryOutcome, width: int = 160) -> str:
    """The tables and their notes as plain text (for -o FILE)."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, no_color=True, highlight=False, soft_wrap=False)
    for table in tables(outcome):
        console.print(table)
    for line in notes_of_rows(outcome):
        console.print(Text(line))
    return buffer.getvalue()


def to_json(outcome: HistoryOutcome) -> str:
    return json.dumps(history_json(outcome.series, tracking_uri=outcome.tracking_uri, experiment=outcome.experiment,
                                   branch=outcome.branch), indent=2, ensure_ascii=False) + "\n"


def to_html(outcome: HistoryOutcome) -> str:
    return render_html(outcome.series, tracking_uri=outcome.tracking_uri, experiment=outcome.experiment,
                       branch=outcome.branch,
                       generated_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def write_output(path: Path, text: str) -> None:
    """Write a report file, its directory made; an unwritable path is the user's error to fix."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise HistoryUsageError(f"-o {path}: cannot write it ({exc.strerror or exc})") from None
