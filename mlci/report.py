"""Rendering the gate's Decision for GitHub: the sticky PR comment and the job summary.

Pure (no I/O beyond reading the packaged templates). The templates live in
``templates/`` (installed as the package ``mlci.templates``) and get one
`ReportView`: the Decision plus a little pre-chewed data (which rows fit, the
trend charts). Every piece of user text (model, target and ref names, error
texts, fingerprint values) goes through the ``md`` filter, which neutralises
Markdown, HTML, @mentions and #references.

GitHub caps a comment at 65,536 characters, so `render_comment` degrades in
steps until the rendering fits: first the collapsible details (full error
texts, trend charts, tuning, numerics, history, environment), then table rows
(blocking and worst cells kept; a note says how many rows were left out).

The comment starts with a marker (an HTML comment, invisible on GitHub) that
finds it again on the next run; the marker is keyed by the config file, so
two mlci configs in one repository keep two sticky comments.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import cache
from typing import Any

import jinja2

from mlci.config import DEFAULT_CONFIG_NAME
from mlci.formatting import (
    COMMENT_LIMIT,
    SUMMARY_LIMIT,
    clip,
    escape_markdown,
    fenced,
    finite,
    format_change,
    format_cost,
    format_cost_change,
    format_faster,
    format_kernels,
    format_ms,
    format_number,
    format_percent,
    format_ratio,
    format_us,
    format_us_change,
    format_usd,
    format_value,
    ort_header,
    plain_number,
    safe_url,
    short_sha,
    status_word,
    trusted_url,
    url_origin,
)
from mlci.gate import VERDICT_ORDER, Cell, Decision, TargetSummary
from mlci.templating import make_environment

MAX_COMMENT_CHARS = COMMENT_LIMIT
"""GitHub's limit for a comment body (65,536 characters)."""
MAX_SUMMARY_BYTES = SUMMARY_LIMIT
"""GitHub's limit for one step's job summary ($GITHUB_STEP_SUMMARY, 1 MiB)."""
MAX_CHARTS = 6

SECTIONS = ("kernels", "environment", "tuning", "numerics", "history", "trends", "errors")
DROP_ORDER = ("errors", "trends", "tuning", "numerics", "history", "environment", "kernels")
"""Which details go first when a rendering is too large: the bulkiest, least needed first."""
REASONED = ("failed", "regression", "inconclusive", "interrupted", "compiled")
"""Verdicts whose reason is listed under the table."""


# --- the sticky comment's marker ----------------------------------------------------

_DEFAULT_MARKER = "<!-- mlci:report -->"
_UNSAFE_IN_MARKER = re.compile(r"[^A-Za-z0-9._/-]")


def comment_marker(config: str | None) -> str:
    """The first line of the sticky comment for the reports of one config file.

    `config` is the config file's path relative to the repository's top level. The default
    config (``mlci.toml`` at the top, or no path recorded) keeps the marker mlci has always
    used, so comments posted before configs were told apart keep being updated. Any other
    path is part of the marker, reduced to ``[A-Za-z0-9._/-]`` with no ``--`` so that it can
    neither end the HTML comment nor show up in the rendered comment.
    """
    if config is None or config == DEFAULT_CONFIG_NAME:
        return _DEFAULT_MARKER
    path = re.sub(r"-{2,}", "-", _UNSAFE_IN_MARKER.sub("", config))
    return f"<!-- mlci:report config={path} -->"


def decision_marker(decision: Decision) -> str:
    """The marker of the config the decision's results came from."""
    return comment_marker(decision.config)


@dataclass
class ReportContext:
    repository: str | None = None
    """``owner/name``; commit links need it."""
    server_url: str = "https://github.com"
    run_url: str | None = None
    """Link to the CI run."""
    pr: int | None = None
    mlflow_url: str | None = None
    """The MLflow tracking server this workflow names (not one a results file names): run links may go there."""

    def link_origins(self) -> set[str]:
        """Where a URL from a results file may link: the GitHub server and the MLflow server of this run."""
        return {o for o in (url_origin(self.server_url), url_origin(self.mlflow_url)) if o}


_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def _commit_link(context: ReportContext) -> Callable[[str | None], str]:
    def link(sha: str | None) -> str:
        short = short_sha(sha)
        if short is None:
            return escape_markdown(sha) if sha else "—"
        server = safe_url((context.server_url or "").rstrip("/"))
        if server and context.repository and _REPO.match(context.repository):
            return f"[`{short}`]({server}/{context.repository}/commit/{sha})"
        return f"`{short}`"

    return link


def _linker(context: ReportContext) -> Callable[[str, str | None], str]:
    def link(text: str, url: str | None) -> str:
        """A Markdown link when the URL goes to this run's GitHub or MLflow server, else `text` alone
        (`text` must already be Markdown)."""
        safe = trusted_url(url, context.link_origins())
        return f"[{text}]({safe})" if safe else text

    return link


@cache
def environment() -> jinja2.Environment:
    """The Markdown templates' environment: the formatters as filters (``md`` escapes user text)."""
    return make_environment(
        filters=dict(
            md=escape_markdown,
            clip=clip,
            ms=format_ms,
            change=format_change,
            faster=format_faster,
            kernels=format_kernels,
            percent=format_percent,
            ratio=format_ratio,
            usd=format_usd,
            cost=format_cost,
            cost_change=format_cost_change,
            us=format_us,
            us_change=format_us_change,
            plain=plain_number,
            num=format_number,
            value=format_value,
            fence=fenced,
        ),
        template_globals=dict(REASONED=REASONED),
    )


# --- what the templates get ----------------------------------------------------


@dataclass(frozen=True)
class Chart:
    cell: Cell
    labels: list[str]
    values: list[float]


def _charts(cells: list[Cell], head_label: str) -> list[Chart]:
    charts = []
    for cell in cells:
        note = cell.history
        if note is None or not note.trend:
            continue
        labels, values = [], []
        for i, point in enumerate(note.trend):
            median = point.median
            if not finite(median):
                continue
            labels.append(short_sha(point.commit) or f"run {i + 1}")
            values.append(float(median))
        if len(values) < 2:
            continue
        if finite(cell.head_ms):
            labels.append(head_label)
            values.append(float(cell.head_ms))
        charts.append(Chart(cell, labels, values))
    return charts


def _targets(decision: Decision) -> tuple[list[TargetSummary], list[str]]:
    """Targets by name (first results file wins) and the fingerprint keys that any of them has a value for, in order."""
    seen: dict[str, TargetSummary] = {}
    for target in decision.targets:
        seen.setdefault(target.name, target)
    keys: dict[str, None] = {}
    for target in seen.values():
        keys.update(dict.fromkeys(k for k, v in (target.fingerprint or {}).items() if v is not None))
    return list(seen.values()), list(keys)


def _base_ref(decision: Decision) -> str | None:
    return next((t.base_ref for t in decision.targets if t.base_ref), None)


def _priority(decision: Decision) -> list[int]:
    """Row indices, most important first: blocking cells, then worst verdicts (the decision's order)."""
    cells = decision.cells
    return sorted(range(len(cells)), key=lambda i: (not cells[i].blocking, VERDICT_ORDER.index(cells[i].verdict), i))


@dataclass(frozen=True)
class ReportView:
    """Everything the comment and summary templates read; each field is a template variable of the same name."""

    marker: str
    """The sticky comment's first line (`comment_marker`)."""
    d: Decision
    """The decision itself (``d`` in the templates)."""
    pr: int | None
    status: str
    """PASS, WARN or FAIL (`formatting.status_word`)."""
    head: str | None
    """The head commit's sha."""
    base: str | None
    """The base commit's sha."""
    base_ref: str | None
    commit: Callable[[str | None], str]
    """A sha as Markdown: a link to the commit when the repository is known."""
    link: Callable[[str, str | None], str]
    """``link(markdown, url)``: a link only to this run's GitHub or MLflow server, else the text alone."""
    run_url: str | None
    """The CI run's URL, safe for a Markdown link."""
    rows: list[Cell]
    """The table's rows: every cell, or those that fit."""
    hidden: list[Cell]
    """The cells left out of the table to fit."""
    hidden_unchanged: int
    reasons: list[Cell]
    """The shown cells whose reason is listed under the table."""
    sections: frozenset[str]
    """The details sections shown (of SECTIONS)."""
    omitted: list[str]
    """Sections the full rendering has but this one leaves out to fit."""
    where: str
    """``comment`` or ``summary``: where "see the rest" points to."""
    minimal: bool
    """Headline and note only: nothing more fits."""
    targets: list[TargetSummary]
    fingerprint_keys: list[str]
    tuning_cells: list[Cell]
    numerics_cells: list[Cell]
    history_cells: list[Cell]
    error_cells: list[Cell]
    charts: list[Chart]
    charts_hidden: int
    compared: int
    """Cells with a head/base estimate (the Bonferroni family)."""
    priced: bool
    """Some target states a price per hour: the table gets a cost column."""
    kernel_cells: list[Cell]
    """Shown cells whose profiled kernels say what grew."""
    ort_label: str
    """ONNX Runtime as the table names it: ``ORT (CUDA)`` when a shown peer ran on another provider than the CPU."""
    peer_notes: list[tuple[str, str]]
    """(target, why ONNX Runtime was not timed there), once per target of the shown rows."""
    ort_na: Callable[[Cell], bool]
    """Whether a cell has no ONNX Runtime timing for a stated reason (its faster cell reads ``n/a``)."""

    def variables(self) -> dict[str, Any]:
        """The fields as template variables (shallow: the Decision and its cells are passed as they are)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _peer_notes(rows: list[Cell]) -> list[tuple[str, str]]:
    notes: dict[tuple[str, str], None] = {}
    for cell in rows:
        note = cell.peer_note
        if note:
            notes[(cell.target, note)] = None
    return list(notes)


def _ort_na(cell: Cell) -> bool:
    return cell.speedup_vs_ort is None and bool(cell.peer_note)


def build_view(
    decision: Decision,
    context: ReportContext,
    *,
    keep: set[int] | None,
    sections: tuple[str, ...],
    where: str,
    minimal: bool = False,
) -> ReportView:
    """The view of one rendering: `keep` the row indices shown (None: all), `sections` the details shown."""
    cells = decision.cells
    rows = cells if keep is None else [c for i, c in enumerate(cells) if i in keep]
    hidden = [] if keep is None else [c for i, c in enumerate(cells) if i not in keep]
    pr = context.pr or decision.git.pr
    head_sha = decision.git.commit or next((t.commit for t in decision.targets if t.commit), None)
    base_sha = decision.git.base_commit or next((t.base_commit for t in decision.targets if t.base_commit), None)
    charts = _charts(rows, "this PR" if pr else (short_sha(head_sha) or "head"))
    targets, fingerprint_keys = _targets(decision)
    content = {
        "kernels": [c for c in rows if c.kernels],
        "environment": targets,
        "tuning": [c for c in rows if c.tuning],
        "numerics": [c for c in rows if c.numerics],
        "history": [c for c in rows if c.history is not None],
        "trends": charts,
        "errors": [c for c in rows if c.error],
    }
    had = {  # what the full rendering has: the sections a size-limited one says it left out
        "kernels": any(c.kernels for c in cells),
        "environment": targets,
        "tuning": any(c.tuning for c in cells),
        "numerics": any(c.numerics for c in cells),
        "history": any(c.history is not None for c in cells),
        "trends": charts if keep is None else _charts(cells, ""),
        "errors": any(c.error for c in cells),
    }
    return ReportView(
        marker=decision_marker(decision),
        d=decision,
        pr=pr,
        status=status_word(decision),
        head=head_sha,
        base=base_sha,
        base_ref=_base_ref(decision),
        commit=_commit_link(context),
        link=_linker(context),
        run_url=safe_url(context.run_url),
        rows=rows,
        hidden=hidden,
        hidden_unchanged=sum(1 for c in hidden if c.verdict == "unchanged"),
        reasons=[c for c in rows if c.verdict in REASONED or (c.history is not None and not c.history.comparable)],
        sections=frozenset(sections),
        omitted=[s for s in SECTIONS if s not in sections and had[s]],
        where=where,
        minimal=minimal,
        targets=targets,
        fingerprint_keys=fingerprint_keys,
        tuning_cells=content["tuning"],
        numerics_cells=content["numerics"],
        history_cells=content["history"],
        error_cells=content["errors"],
        charts=charts[:MAX_CHARTS],
        charts_hidden=max(0, len(charts) - MAX_CHARTS),
        compared=sum(1 for c in cells if c.estimate is not None),
        priced=any(c.price_per_hour is not None for c in cells),
        kernel_cells=content["kernels"],
        ort_label=ort_header([c.peer_provider for c in rows]),
        peer_notes=_peer_notes(rows),
        ort_na=_ort_na,
    )


def _render(
    template: str,
    decision: Decision,
    context: ReportContext,
    *,
    keep: set[int] | None,
    sections: tuple[str, ...],
    where: str,
    minimal: bool = False,
) -> str:
    view = build_view(decision, context, keep=keep, sections=sections, where=where, minimal=minimal)
    return environment().get_template(template).render(view.variables())


def _fit(template: str, decision: Decision, context: ReportContext, limit: int, size: Callable[[str], int], where: str) -> str:
    """The fullest rendering whose size is <= limit: details dropped first, then rows."""
    sections = SECTIONS
    text = _render(template, decision, context, keep=None, sections=sections, where=where)
    if size(text) <= limit:
        return text
    for name in DROP_ORDER:
        sections = tuple(s for s in sections if s != name)
        text = _render(template, decision, context, keep=None, sections=sections, where=where)
        if size(text) <= limit:
            return text

    order = _priority(decision)

    def attempt(k: int) -> str:
        return _render(template, decision, context, keep=set(order[:k]), sections=(), where=where)

    lo, hi = 0, len(order) - 1  # all rows did not fit; find the most that do
    best = attempt(0)
    if size(best) > limit:  # not even the headline, the gate line and the footer: headline and note only
        text = _render(template, decision, context, keep=set(), sections=(), where=where, minimal=True)
        return text if size(text) <= limit else _cut(text, limit, size)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        text = attempt(mid)
        if size(text) <= limit:
            lo, best = mid, text
        else:
            hi = mid - 1
    return best


def _cut(text: str, limit: int, size: Callable[[str], int]) -> str:
    """Last resort for absurdly small limits: the first lines that fit (marker and headline come first)."""
    kept: list[str] = []
    for line in text.splitlines():
        candidate = "\n".join([*kept, line]) + "\n"
        if size(candidate) > limit:
            break
        kept.append(line)
    result = "\n".join(kept) + "\n" if kept else ""
    while result and size(result) > limit:
        result = result[:-1]
    if not result:
        result = text[:limit]
        while result and size(result) > limit:
            result = result[:-1]
    return result


def render_comment(decision: Decision, context: ReportContext, *, max_chars: int = MAX_COMMENT_CHARS) -> str:
    """The sticky pull-request comment (starts with the decision's `comment_marker`), at most `max_chars` characters."""
    if max_chars < len(decision_marker(decision)) + 1:
        raise ValueError(f"max_chars must leave room for the marker, got {max_chars}")
    return _fit("comment.md.j2", decision, context, max_chars, len, "comment")


def render_summary(decision: Decision, context: ReportContext) -> str:
    """The job summary: the comment's content without the marker; fits GitHub's 1 MiB step summary."""
    return _fit("summary.md.j2", decision, context, MAX_SUMMARY_BYTES, lambda s: len(s.encode("utf-8")), "summary")
