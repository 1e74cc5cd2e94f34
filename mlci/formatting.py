"""Text formatting shared by every view of a result: the PR comment, the job summary and the terminal.

Pure and standard library only. One formatter per kind of value, so that a latency, a change or a
speedup reads the same wherever it is shown; `escape_markdown` and its helpers make user text
(model, target and ref names, error texts) inert in GitHub-flavoured Markdown. Also here: the size
limits GitHub puts on a comment and on a step summary, which both the renderer and the code that
posts the text must respect.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from mlci.stats import faster_backend

if TYPE_CHECKING:
    from mlci.gate import Cell, Decision
    from mlci.results import CompileInfo

COMMENT_LIMIT = 65_536
"""GitHub rejects a comment body over this many characters (422)."""
SUMMARY_LIMIT = 1_048_576
"""GitHub keeps at most this many bytes of one step's job summary ($GITHUB_STEP_SUMMARY)."""

REASON_CHARS = 300
"""Cap on a one-line reason (the full text is shown elsewhere)."""
ERROR_CHARS = 6_000
"""Cap on a full error text in a code block (head and tail kept)."""
VALUE_CHARS = 120
"""Cap on a fingerprint value (the TVM target JSON can be long)."""

_WS = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INVISIBLE = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U00013438"
    "\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
"""Unicode's format characters (category Cf): bidi overrides and isolates, zero-width and other invisible
characters. In a name or an error text they can make a comment read otherwise than it is written (a
right-to-left override reverses what follows), so they are shown as ``<U+202E>`` instead."""
_AUTOLINK = re.compile(r"(?i)(?<![a-z0-9])(?:https?:(?=//)|www(?=\.))")
"""Where GitHub's autolinking starts (``http://``, ``https://``, ``www.``): a zero-width joiner goes after the match."""
_ZWJ = "\u200d"
_BACKSLASHED = set("\\`*[]|~$")


def reveal_invisible(text: str) -> str:
    """C0 controls removed and format characters (bidi controls, zero-width characters) written as ``<U+XXXX>``:
    what a reader sees is then what the text says. Every escape of user text goes through here."""
    return _INVISIBLE.sub(lambda m: f"<U+{ord(m.group()):04X}>", _CONTROL.sub("", text))


def quoted_for_log(text: str, limit: int | None = None) -> str:
    """Untrusted text as a log line may show it: in quotes, control characters and quotes escaped
    (a name from a shared cache must not start a line of its own, such as a GitHub `::error::`
    command), cut at `limit` characters."""
    shown = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    if limit is not None and len(shown) > limit:
        shown = shown[:limit] + "..."
    return f"'{shown}'"


# --- user text in Markdown ----------------------------------------------------------


def escape_markdown(text: Any) -> str:
    """Make user text render as itself, inline (a table cell, a list item, a heading).

    Shows invisible format characters (bidi controls) as ``<U+XXXX>`` (`reveal_invisible`),
    collapses whitespace (newlines would end a table row), backslash-escapes
    Markdown punctuation (pipes, emphasis, code, links, strikethrough, math),
    writes ``& < >`` as entities (no HTML, no autolinks in angle brackets), and
    puts a zero-width joiner after ``@`` and ``#`` so that nobody is pinged and
    no issue is cross-referenced, and inside ``https://`` and ``www.`` so that a
    URL in user text stays text, never a link. Not for the inside of HTML tags or code blocks.
    """
    if text is None:
        return "—"
    text = _WS.sub(" ", reveal_invisible(str(text))).strip()
    joins = {m.end() - 1 for m in _AUTOLINK.finditer(text)}
    out: list[str] = []
    for i, ch in enumerate(text):
        if i in joins:
            out.append(ch + _ZWJ)
            continue
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


def fenced(text: Any, info: str = "text") -> str:
    """A fenced code block that `text` cannot break out of: the fence is longer than
    any run of backticks in it. Long texts keep their head and tail."""
    body = str(text or "").replace("\r\n", "\n").replace("\r", "\n")
    body = reveal_invisible(body).rstrip()
    if len(body) > ERROR_CHARS:
        head, tail = ERROR_CHARS // 4, ERROR_CHARS - ERROR_CHARS // 4
        omitted = len(body) - head - tail
        body = f"{body[:head]}\n[… {omitted} characters omitted …]\n{body[-tail:]}"
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{body}\n{fence}"


_SHA = re.compile(r"^[0-9a-f]{7,64}$")


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


def url_origin(url: str | None) -> str | None:
    """``scheme://host[:port]`` of an http(s) URL, lower-cased, default ports dropped; None for anything else."""
    if not url or not re.match(r"(?i)^https?://", url):
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if not host or "@" in parts.netloc or "\\" in parts.netloc:  # user@host and host\@other read differently elsewhere
        return None
    scheme = parts.scheme.lower()
    default = {"http": 80, "https": 443}[scheme]
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


def trusted_url(url: str | None, origins: Collection[str | None]) -> str | None:
    """`safe_url` of `url` when it points at one of `origins` (`url_origin` form), else None.

    URLs in a results file come from an untrusted run: the report links only to hosts the
    workflow itself names (its GitHub server and MLflow tracking server)."""
    allowed = {o for o in origins if o}
    return safe_url(url) if url_origin(url) in allowed else None


# --- numbers ------------------------------------------------------------------------


def finite(value: Any) -> bool:
    """A real number that can be shown (not None, not a bool, not NaN or infinite)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def format_ms(value: float | None) -> str:
    """A latency given in milliseconds, three significant digits, in µs, ms or s; ``—`` when missing."""
    if not finite(value):
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
    if not finite(value):
        return "—"
    if value >= 10:
        return f"{value:.0f}x"
    if value >= 1:
        return f"{value:.1f}x"
    return f"{value:.2f}x"


BACKEND_NAMES = {"tvm": "TVM", "onnxruntime": "ORT"}


def format_faster(speedup_vs_ort: float | None) -> str:
    """The backend to ship on a target and by how much: ``TVM by 3.1x``, ``ORT by 2.0x``, ``—``."""
    faster = faster_backend(speedup_vs_ort)
    if faster is None:
        return "—"
    backend, factor = faster
    return f"{BACKEND_NAMES[backend]} by {format_speedup(factor)}"


def provider_label(provider: str | None) -> str | None:
    """ONNX Runtime's execution provider as a column names it: ``CUDA`` for ``CUDAExecutionProvider``;
    None for the CPU (the plain ``ORT``) or no provider."""
    if not provider or provider == "CPUExecutionProvider":
        return None
    return provider.removesuffix("ExecutionProvider") or provider


def ort_header(providers: list[str | None]) -> str:
    """``ORT``, or ``ORT (CUDA)`` when the peer ran on another provider than the CPU (several: joined)."""
    labels = list(dict.fromkeys(label for p in providers if (label := provider_label(p))))
    return f"ORT ({', '.join(labels)})" if labels else "ORT"


def format_kernels(compile_info: CompileInfo | None) -> str:
    """Kernels with a tuned schedule out of all kernels, so a silent fallback to untuned code shows:
    ``26/29``, with ``(default build)`` when the build with default schedules only was faster."""
    if compile_info is None or compile_info.kernels is None or compile_info.kernels_tuned is None:
        return "—"
    text = f"{compile_info.kernels_tuned}/{compile_info.kernels}"
    return text + " (default build)" if compile_info.build == "default" else text


def format_usd(value: float | None) -> str:
    """Money in US dollars: cents from $1 up (``$12.34``, ``$1,234.50``), two significant digits below
    (``$0.42``, ``$0.0051``: a small model's cost per million inferences is a fraction of a cent); ``—`` when missing."""
    if not finite(value):
        return "—"
    sign = "-" if value < 0 else ""
    amount = abs(value)
    if amount == 0:
        return "$0"
    if round(amount, 2) >= 1:
        return f"{sign}${amount:,.2f}"
    digits = max(2, 1 - math.floor(math.log10(amount)))
    if digits > 2 and round(amount, digits - 1) >= 10 ** (1 - digits + 1):  # 0.0999 -> 0.10, not 0.100
        digits -= 1
    return f"{sign}${amount:.{digits}f}"


def format_cost(head_cost: float | None, ort_cost: float | None = None) -> str:
    """A cost per million inferences for TVM, with ONNX Runtime's beside it: ``$0.31 (ORT $0.95)``; ``—`` when missing."""
    if not finite(head_cost):
        return "—" if not finite(ort_cost) else f"— (ORT {format_usd(ort_cost)})"
    text = format_usd(head_cost)
    return f"{text} (ORT {format_usd(ort_cost)})" if finite(ort_cost) else text


def format_cost_change(delta: float | None) -> str:
    """What a change costs: ``+$0.42 per million inferences``, ``-$0.0031 per million inferences``; empty when unknown."""
    if not finite(delta):
        return ""
    sign = "-" if delta < 0 else "+"
    return f"{sign}{format_usd(abs(delta))} per million inferences"


def format_us(value: float | None) -> str:
    """A kernel time given in microseconds, in the unit `format_ms` picks (``812 µs``, ``1.20 ms``)."""
    return format_ms(value / 1e3) if finite(value) else "—"


def format_us_change(delta_us: float | None) -> str:
    """A kernel's growth in microseconds, signed: ``+73.1 µs``, ``-1.20 ms``."""
    if not finite(delta_us):
        return "—"
    return ("-" if delta_us < 0 else "+") + format_us(abs(delta_us))


def format_ratio(ratio: float | None) -> str:
    """A head/base ratio as a relative change: 1.032 -> ``+3.2%``."""
    return _pct(ratio - 1) if finite(ratio) else "—"


def plain_number(value: float) -> str:
    """Four significant digits, never an exponent (for Mermaid data)."""
    if value == 0 or not finite(value):
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


# --- a decision in one word ------------------------------------------------------------


def status_word(decision: Decision) -> str:
    """PASS, WARN (findings that do not gate under this fail-on policy) or FAIL: every view's headline starts with it."""
    if decision.failed:
        return "FAIL"
    if any(c.verdict in ("failed", "regression") and not c.known_failure for c in decision.cells):
        return "WARN"
    return "PASS"
