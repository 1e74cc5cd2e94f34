"""Rendering the gate's Decision: the sticky PR comment, the job summary, the terminal table.

Pure (no I/O beyond reading the packaged templates). The templates live in
``templates/`` (installed as the package ``mlci.templates``) and get the
Decision plus a little pre-chewed data (which rows fit, the trend charts);
every piece of user text (model, target and ref names, error texts,
fingerprint values) goes through the ``md`` filter, which neutralises
Markdown, HTML, @mentions and #references.

GitHub caps a comment at 65,536 characters, so `render_comment` degrades in
steps until the rendering fits: first the collapsible details (full error
texts, trend charts, tuning, numerics, history, environment), then table rows
(blocking and worst cells kept; a note says how many rows were left out).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2
from rich.table import Table
from rich.text import Text

from mlci.gate import VERDICT_ORDER, Cell, Decision, TargetSummary
from mlci.github import COMMENT_LIMIT, MARKER, SUMMARY_LIMIT  # MARKER: the sticky comment's first line

MAX_COMMENT_CHARS = COMMENT_LIMIT
"""GitHub's limit for a comment body (65,536 characters)."""
MAX_SUMMARY_BYTES = SUMMARY_LIMIT
"""GitHub's limit for one step's job summary ($GITHUB_STEP_SUMMARY, 1 MiB)."""
MAX_CHARTS = 6
REASON_CHARS = 300
"""Cap on each reason listed under the table (the full text is in the details)."""
ERROR_CHARS = 6_000
"""Cap on each full error text in the details (head and tail kept)."""
VALUE_CHARS = 120
"""Cap on a fingerprint value (the TVM target JSON can be long)."""

SECTIONS = ("environment", "tuning", "numerics", "history", "trends", "errors")
DROP_ORDER = ("errors", "trends", "tuning", "numerics", "history", "environment")
"""Which details go first when a rendering is too large: the bulkiest, least needed first."""
REASONED = ("failed", "regression", "inconclusive")
"""Verdicts whose reason is listed under the table."""


@dataclass
class ReportContext:
    repository: str | None = None
    """``owner/name``; commit links need it."""
    server_url: str = "https://github.com"
    run_url: str | None = None
    """Link to the CI run."""
    pr: int | None = None


# --- escaping and formatting (the templates' filters) ----------------------

_WS = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ZWJ = "\u200d"
_BACKSLASHED = set("\\`*[]|~$")


def escape_markdown(text: Any) -> str:
    """Make user text render as itself, inline (a table cell, a list item, a heading).

    Collapses whitespace (newlines would end a table row), backslash-escapes
    Markdown punctuation (pipes, emphasis, code, links, strikethrough, math),
    writes ``& < >`` as entities (no HTML, no autolinks in angle brackets), and
    puts a zero-width joiner after ``@`` and ``#`` so that nobody is pinged and
    no issue is cross-referenced. Not for the inside of HTML tags or code blocks.
    """
    if text is None:
        return "—"
    text = _WS.sub(" ", _CONTROL.sub("", str(text))).strip()
    out: list[str] = []
    for i, ch in enumerate(text):
        if ch in _BACKSLASHED:
            out.append("\\" + ch)
        elif ch == "_":
            # Intraword underscores never emphasise (GFM): keep `my_model` readable.
            inner = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            out.append("_" if inner else "\\_")
        elif ch == "&":
            out.append("&amp;")
        elif ch == "<":
            out.append("&lt;")
        elif ch == ">":
            out.append("&gt;")
        elif ch in "@#" and i + 1 < len(text) and (text[i + 1].isalnum() or text[i + 1] in "_-"):
            out.append(ch + _ZWJ)
        else:
            out.append(ch)
    return "".join(out)


def clip(text: Any, limit: int = REASON_CHARS) -> str:
    """Whitespace collapsed to single spaces; over `limit` characters, the head and the tail
    around an ellipsis (a traceback's last line names the error)."""
    if text is None:
        return ""
    text = _WS.sub(" ", str(text)).strip()
    if len(text) <= limit:
        return text
    head = max(1, (limit - 3) * 2 // 5)
    tail = max(0, limit - 3 - head)
    return f"{text[:head].rstrip()} … {text[len(text) - tail:].lstrip()}" if tail else text[: limit - 1] + "…"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_ms(value: float | None) -> str:
    """A latency given in milliseconds, three significant digits, in µs, ms or s."""
    if not _finite(value):
        return "—"
    if value == 0:
        return "0 ms"
    for scale, unit in ((1000.0, "s"), (1.0, "ms"), (1e-3, "µs")):
        if abs(value) >= scale * 0.9995 or unit == "µs":
            return f"{_sig3(value / scale)} {unit}"
    raise AssertionError("unreachable")


def _sig3(x: float) -> str:
    """Three significant digits, no exponent, no trailing zeros lost (1.20, 12.3, 123, 1230)."""
    if x == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(x))))
    text = f"{x:.{digits}f}"
    if digits and len(text.replace("-", "").replace(".", "").lstrip("0")) > 3:  # 9.999 -> 10.00 -> 10.0
        text = f"{x:.{digits - 1}f}"
    return text


def _pct(ratio_minus_one: float) -> str:
    return f"{ratio_minus_one * 100:+.1f}%"


def format_change(cell: Cell) -> str:
    """``+7.9% [+6.1%, +9.8%]``: the median's relative change and its interval."""
    est = cell.estimate
    if est is None:
        return "—"
    return f"{_pct(est.ratio - 1)} [{_pct(est.low - 1)}, {_pct(est.high - 1)}]"


def format_speedup(value: float | None) -> str:
    """How many times faster than ONNX Runtime: ``3.1x``, ``0.45x``, ``12x``."""
    if not _finite(value):
        return "—"
    if value >= 10:
        return f"{value:.0f}x"
    if value >= 1:
        return f"{value:.1f}x"
    return f"{value:.2f}x"


def format_ratio(ratio: float | None) -> str:
    """A head/base ratio as a relative change: 1.032 -> ``+3.2%``."""
    return _pct(ratio - 1) if _finite(ratio) else "—"


def plain_number(value: float) -> str:
    """Four significant digits, never an exponent (for Mermaid data)."""
    if value == 0 or not _finite(value):
        return "0"
    digits = max(0, 3 - math.floor(math.log10(abs(value))))
    text = f"{value:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_percent(fraction: float) -> str:
    """A confidence as a percentage without noise: 0.95 -> 95%, 0.99875 -> 99.875%."""
    text = f"{fraction * 100:.4f}".rstrip("0").rstrip(".")
    return f"{text}%"


def format_number(value: Any) -> str:
    """Error magnitudes and the like: ``1.2e-05``, ``0.003``, ``—`` for missing."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return escape_markdown(value)


def format_value(value: Any, limit: int = VALUE_CHARS) -> str:
    """A fingerprint value: scalars as text, dicts and lists as compact JSON; escaped and capped."""
    if value is None:
        return "—"
    if isinstance(value, dict | list):
        value = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return escape_markdown(clip(value, limit))


def fenced(text: Any, info: str = "text") -> str:
    """A fenced code block that `text` cannot break out of: the fence is longer than
    any run of backticks in it. Long texts keep their head and tail."""
    body = str(text or "").replace("\r\n", "\n").replace("\r", "\n")
    body = _CONTROL.sub("", body).rstrip()
    if len(body) > ERROR_CHARS:
        head, tail = ERROR_CHARS // 4, ERROR_CHARS - ERROR_CHARS // 4
        omitted = len(body) - head - tail
        body = f"{body[:head]}\n[… {omitted} characters omitted …]\n{body[-tail:]}"
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{body}\n{fence}"


_SHA = re.compile(r"^[0-9a-f]{7,64}$")
_REPO = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def short_sha(sha: str | None) -> str | None:
    """The first 7 hex digits of a commit, or None when it is not a hex sha (never user text)."""
    return sha[:7] if sha and _SHA.match(sha) else None


def safe_url(url: str | None) -> str | None:
    """An http(s) URL fit for a Markdown link destination (inside a table too), else None."""
    if not url or not re.match(r"^https?://[^\s]+$", url):
        return None
    for ch, code in (("(", "%28"), (")", "%29"), ("<", "%3C"), (">", "%3E"), ('"', "%22"), ("|", "%7C"),
                     ("\\", "%5C"), ("`", "%60")):
        url = url.replace(ch, code)
    return url


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


def _link(text: str, url: str | None) -> str:
    """Markdown link when the URL is safe; `text` must already be Markdown."""
    safe = safe_url(url)
    return f"[{text}]({safe})" if safe else text


# --- templates ---------------------------------------------------------------


def template_source(name: str) -> str | None:
    """Templates from the ``mlci.templates`` package (works from a wheel, a zip or an editable install)."""
    if not name or name.startswith(("/", "\\")) or ".." in name.split("/"):
        return None
    try:
        return (importlib.resources.files("mlci.templates") / name).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


@cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(template_source),
        autoescape=False,  # Markdown: the `md` filter escapes user text instead
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        md=escape_markdown,
        clip=clip,
        ms=format_ms,
        change=format_change,
        speedup=format_speedup,
        percent=format_percent,
        ratio=format_ratio,
        plain=plain_number,
        num=format_number,
        value=format_value,
        fence=fenced,
    )
    env.globals.update(link=_link, REASONED=REASONED)
    return env


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
            median = point.get("median") if isinstance(point, dict) else None
            if not _finite(median):
                continue
            labels.append(short_sha(point.get("commit")) or f"run {i + 1}")
            values.append(float(median))
        if len(values) < 2:
            continue
        if _finite(cell.head_ms):
            labels.append(head_label)
            values.append(float(cell.head_ms))
        charts.append(Chart(cell, labels, values))
    return charts


def _targets(decision: Decision) -> tuple[list[TargetSummary], list[str]]:
    """Targets by name (first results file wins) and the union of their fingerprint keys, in order."""
    seen: dict[str, TargetSummary] = {}
    for target in decision.targets:
        seen.setdefault(target.name, target)
    keys: dict[str, None] = {}
    for target in seen.values():
        keys.update(dict.fromkeys(target.fingerprint or {}))
    return list(seen.values()), list(keys)


def _status(decision: Decision) -> str:
    if decision.failed:
        return "FAIL"
    if any(c.verdict in ("failed", "regression") and not c.known_failure for c in decision.cells):
        return "WARN"  # findings that do not gate under this fail-on policy
    return "PASS"


def _base_ref(decision: Decision) -> str | None:
    return next((t.base_ref for t in decision.targets if t.base_ref), None)


def _priority(decision: Decision) -> list[int]:
    """Row indices, most important first: blocking cells, then worst verdicts (the decision's order)."""
    cells = decision.cells
    return sorted(range(len(cells)), key=lambda i: (not cells[i].blocking, VERDICT_ORDER.index(cells[i].verdict), i))


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
    cells = decision.cells
    rows = cells if keep is None else [c for i, c in enumerate(cells) if i in keep]
    hidden = [] if keep is None else [c for i, c in enumerate(cells) if i not in keep]
    pr = context.pr or decision.git.pr
    head_sha = decision.git.commit or next((t.commit for t in decision.targets if t.commit), None)
    base_sha = decision.git.base_commit or next((t.base_commit for t in decision.targets if t.base_commit), None)
    charts = _charts(rows, "this PR" if pr else (short_sha(head_sha) or "head"))
    targets, fingerprint_keys = _targets(decision)
    content = {
        "environment": targets,
        "tuning": [c for c in rows if c.tuning],
        "numerics": [c for c in rows if c.numerics],
        "history": [c for c in rows if c.history is not None],
        "trends": charts,
        "errors": [c for c in rows if c.error],
    }
    had = {  # what the full rendering has: the sections a size-limited one says it left out
        "environment": targets,
        "tuning": any(c.tuning for c in cells),
        "numerics": any(c.numerics for c in cells),
        "history": any(c.history is not None for c in cells),
        "trends": charts if keep is None else _charts(cells, ""),
        "errors": any(c.error for c in cells),
    }
    return environment().get_template(template).render(
        marker=MARKER,
        d=decision,
        pr=pr,
        status=_status(decision),
        head=head_sha,
        base=base_sha,
        base_ref=_base_ref(decision),
        commit=_commit_link(context),
        run_url=safe_url(context.run_url),
        rows=rows,
        hidden=hidden,
        hidden_unchanged=sum(1 for c in hidden if c.verdict == "unchanged"),
        reasons=[c for c in rows if c.verdict in REASONED or (c.history is not None and not c.history.comparable)],
        sections=set(sections),
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
    )


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
    """The sticky pull-request comment (starts with MARKER), at most `max_chars` characters."""
    if max_chars < len(MARKER) + 1:
        raise ValueError(f"max_chars must leave room for the marker, got {max_chars}")
    return _fit("comment.md.j2", decision, context, max_chars, len, "comment")


def render_summary(decision: Decision, context: ReportContext) -> str:
    """The job summary: the comment's content without the marker; fits GitHub's 1 MiB step summary."""
    return _fit("summary.md.j2", decision, context, MAX_SUMMARY_BYTES, lambda s: len(s.encode("utf-8")), "summary")


# --- terminal ------------------------------------------------------------------

VERDICT_STYLES = {
    "failed": "bold red",
    "regression": "red",
    "inconclusive": "yellow",
    "improvement": "green",
    "new": "cyan",
    "removed": "magenta",
    "unchanged": "dim",
}


def terminal_table(decision: Decision) -> Table:
    """The decision as a rich table (user text as plain Text: no console markup from names)."""
    status = _status(decision)
    table = Table(
        title=Text(f"mlci {status}: {decision.headline}", style="bold red" if status == "FAIL" else "bold"),
        caption=Text(_gate_line(decision)),
    )
    for header, justify in (("model", "left"), ("target", "left"), ("base", "right"), ("head", "right"),
                            ("change [interval]", "right"), ("vs ORT", "right"), ("verdict", "left")):
        table.add_column(Text(header), justify=justify, overflow="fold")  # Text: "[interval]" is no console markup
    for cell in decision.cells:
        style = VERDICT_STYLES.get(cell.verdict, "")
        word = cell.verdict + (" (known)" if cell.known_failure else "") + (" *" if cell.blocking else "")
        change = Text(format_change(cell), style=style if cell.verdict in ("regression", "improvement") else "")
        table.add_row(
            Text(cell.model),
            Text(cell.target),
            format_ms(cell.base_ms),
            format_ms(cell.head_ms),
            change,
            format_speedup(cell.speedup_vs_ort),
            Text(word, style=style + (" reverse" if cell.blocking else "")),
        )
    return table


def _gate_line(decision: Decision) -> str:
    policy = f"fail-on: {decision.fail_on}"
    if not decision.failed:
        return f"gate: passes ({policy})"
    why = []
    if decision.blocking:
        n = len(decision.blocking)
        why.append(f"{n} blocking {'cell' if n == 1 else 'cells'}, marked *")
    if decision.problems:
        n = len(decision.problems)
        why.append(f"{n} missing or unreadable results {'file' if n == 1 else 'files'}")
    return f"gate: fails the build: {'; '.join(why)} ({policy})"
