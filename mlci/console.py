"""What a person sees in the terminal: `mlci run`'s progress and results table, `mlci compare`'s decision table.

On a terminal: rich progress bars (stage, trials done/total). In CI logs
(not a TTY): one plain line per stage, which reads well in a log viewer, and
while a stage lasts a line at least every 30 s (MLCI_PROGRESS_INTERVAL), so a
long tuning round never leaves the log silent.
Numbers are formatted by `mlci.formatting`, as in the PR comment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mlci.config import seconds_from_env
from mlci.formatting import (
    format_change,
    format_cost,
    format_cost_change,
    format_faster,
    format_kernels,
    format_ms,
    ort_header,
    status_word,
)
from mlci.results import Execution, Results

if TYPE_CHECKING:
    from mlci.gate import Decision


PROGRESS_INTERVAL_ENV = "MLCI_PROGRESS_INTERVAL"
DEFAULT_PROGRESS_INTERVAL = 30.0
"""Seconds between progress lines in a CI log: a log silent for minutes reads as a hung job."""


def progress_interval(environ: Mapping[str, str] | None = None) -> tuple[float, str | None]:
    """The interval from MLCI_PROGRESS_INTERVAL (default 30 s), and a warning when its value is no
    positive number (the default is used then)."""
    return seconds_from_env(PROGRESS_INTERVAL_ENV, DEFAULT_PROGRESS_INTERVAL, environ)


def format_elapsed(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60}m {seconds % 60:02d}s"


@dataclass
class _Activity:
    """What one model is doing, for the CI log's progress lines."""

    stage: str
    started: float
    trials: tuple[int, int, str] | None = None
    """(done, owed, kernel) while tuning."""


class RunReporter:
    """`mlci run`'s progress. On a terminal: rich progress bars. In a CI log: a line per stage change,
    and while a stage lasts a line at least every `interval` seconds (trials done of those owed, the
    kernel, the time elapsed), from a heartbeat thread, since MetaSchedule may report nothing for
    minutes during a long round; trial reports in between are printed at most every `interval` s."""

    def __init__(self, console: Console, interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.console = console
        self.live = console.is_terminal
        warning = None
        if interval is None:
            interval, warning = progress_interval()
        self.interval = interval
        self.clock = clock
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.fields[model]}[/bold]"),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not self.live,
        )
        self._tasks: dict[str, int] = {}
        self._last_line: dict[str, str] = {}
        self._activity: dict[str, _Activity] = {}
        self._quiet_since = clock()
        """When the log last got a line (or was last found with nothing under way)."""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        if warning:
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)

    def __enter__(self) -> RunReporter:
        self.progress.__enter__()
        if not self.live:
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._beat, name="mlci-progress-heartbeat", daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        self.progress.__exit__(*exc)

    def _beat(self) -> None:
        """Wake when the log would next have been silent for `interval` seconds, and say what is going on."""
        while not self._stop.wait(self._seconds_to_next_line()):
            self.tick()

    def _seconds_to_next_line(self) -> float:
        with self._lock:
            return max(0.01, self._quiet_since + self.interval - self.clock())

    def tick(self) -> None:
        """Print a line for every model still in a stage when nothing was printed for `interval` seconds."""
        with self._lock:
            if self.clock() - self._quiet_since < self.interval:
                return
            if not self._activity:
                self._quiet_since = self.clock()  # nothing under way: look again an interval later
            for model in list(self._activity):
                self._log(model, self._describe(model), repeat=True)

    def _describe(self, model: str) -> str:
        activity = self._activity[model]
        elapsed = format_elapsed(self.clock() - activity.started)
        if activity.trials is None:
            return f"{activity.stage} ({elapsed})"
        done, total, kernel = activity.trials
        on = f", kernel {kernel}" if kernel else ""
        return f"{activity.stage}: {done}/{total} trials{on} ({elapsed})"

    def _log(self, model: str, text: str, repeat: bool = False) -> None:
        """One plain line in a CI log; the same line twice in a row only as a heartbeat."""
        with self._lock:
            if not self.live and (repeat or self._last_line.get(model) != text):
                self._last_line[model] = text
                self._quiet_since = self.clock()
                self.console.print(f"{escape(model)}: {escape(text)}", highlight=False)

    def stage(self, model: str, text: str) -> None:
        with self._lock:
            if model not in self._tasks:
                self._tasks[model] = self.progress.add_task(text, model=escape(model), total=None)
            self.progress.update(self._tasks[model], description=escape(text), total=None, completed=0)
            self._activity[model] = _Activity(stage=text, started=self.clock())
            self._log(model, text)

    def trials(self, model: str, done: int, total: int, kernel: str) -> None:
        with self._lock:
            if model not in self._tasks or model not in self._activity:
                self.stage(model, "tuning")
            label = f"tuning {kernel}" if kernel else "tuning"
            self.progress.update(self._tasks[model], description=escape(label), total=total, completed=done)
            activity = self._activity[model]
            activity.trials = (done, total, kernel)
            if done == 0 or done == total or self.clock() - self._quiet_since >= self.interval:
                self._log(model, self._describe(model))

    def finish(self, model: str, status: str) -> None:
        with self._lock:
            self._activity.pop(model, None)
            if model in self._tasks:
                task = self._tasks[model]
                colour = "green" if status == "ok" else "red"
                self.progress.update(task, description=f"[{colour}]{status}[/{colour}]", total=1, completed=1)
            self._log(model, status)


def results_table(results: Results) -> Table:
    target = results.target
    not_native = target.execution != Execution.NATIVE
    table = Table(title=f"mlci run: target {escape(target.name)}", title_justify="left",
                  caption=escape(target.execution_note or target.execution) if not_native else None, caption_justify="left")
    table.add_column("model")
    table.add_column("status")
    ab = any(m.base is not None for m in results.models)
    if ab:
        table.add_column("base", justify="right")
    table.add_column("TVM", justify="right")
    if ab:
        table.add_column("vs base", justify="right")
    table.add_column(escape(ort_header([m.peer.provider for m in results.models if m.peer])), justify="right")
    priced = results.target.price_per_hour is not None
    if priced:
        table.add_column(f"$ per 1M inferences (at ${results.target.price_per_hour:g}/h)", justify="right")
    table.add_column("faster", justify="right")
    table.add_column("kernels tuned", justify="right")
    table.add_column("trials new/cached", justify="right")
    for m in results.models:
        vacuous = bool(m.numerics and m.numerics.vacuous)
        unchecked = bool(m.numerics and m.numerics.no_reference)
        status_style = "red" if not m.ok else "yellow" if vacuous or unchecked else "green"
        status = f"{m.status}, no reference" if unchecked else f"{m.status}, numerics vacuous" if vacuous else m.status
        if not_native and m.ok:  # built for hardware this runner lacks: never timed
            status = "ok, emulated" if m.numerics and m.numerics.emulated else "compiled"
        trials = f"{m.tuning.trials_new}/{m.tuning.trials_cached}" if m.tuning else "-"
        if m.tuning and m.tuning.kernels_from_remote:
            trials += f" ({m.tuning.kernels_from_remote} kernels from S3)"
        head_ms = m.latency_ms.median if m.latency_ms else None
        cells = [escape(m.name), f"[{status_style}]{status}[/{status_style}]"]
        if ab:
            base_ms = m.base.latency_ms.median if m.base and m.base.latency_ms else None
            cells.append(format_ms(base_ms) if m.base is None or m.base.status == "ok" else m.base.status)
            cells += [format_ms(head_ms), f"{(head_ms / base_ms - 1) * 100:+.1f}%" if head_ms and base_ms else "-"]
        else:
            cells.append(format_ms(head_ms))
        untimed = m.peer is not None and m.peer.onnxruntime_median_ms is None and m.peer.note
        cells.append("n/a" if untimed else format_ms(m.peer.onnxruntime_median_ms if m.peer else None))
        if priced:
            cells.append(format_cost(m.cost.per_million_usd, m.cost.onnxruntime_per_million_usd) if m.cost else "—")
        cells += [format_faster(m.peer.speedup if m.peer else None), format_kernels(m.compile), trials]
        table.add_row(*cells)
    return table


def failure_lines(results: Results) -> list[str]:
    """One line per failed, cut-short or vacuously checked model, printed under the table where long
    messages fit."""
    lines = []
    for m in results.models:
        if not m.ok:
            lines.append(f"[red]{escape(m.name)}[/red] ({m.status}): {escape(m.error or '')}")
        elif m.tuning and m.tuning.deadline_hit:
            lines.append(
                f"[yellow]{escape(m.name)}[/yellow]: tuning stopped at its time cap after "
                f"{m.tuning.seconds:.0f} s; the next run continues where it stopped"
            )
        if m.numerics and m.numerics.vacuous:
            lines.append(f"[yellow]{escape(m.name)}[/yellow]: numerics vacuous: {escape(m.numerics.vacuous)}")
        if m.numerics and m.numerics.no_reference:
            lines.append(f"[yellow]{escape(m.name)}[/yellow]: numerics not checked (no reference): "
                         f"{escape(m.numerics.no_reference)}")
    notes = dict.fromkeys(m.peer.note for m in results.models if m.peer and m.peer.note)
    lines += [f"ORT n/a: {escape(note)}" for note in notes]  # once: every model of a target shares it
    return lines


# --- mlci compare ------------------------------------------------------------------

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
    status = status_word(decision)
    table = Table(
        title=Text(f"mlci {status}: {decision.headline}", style="bold red" if status == "FAIL" else "bold"),
        caption=Text(_gate_line(decision)),
    )
    priced = any(c.price_per_hour is not None for c in decision.cells)
    columns = [("model", "left"), ("target", "left"), ("base", "right"), ("head", "right"),
               ("change [interval]", "right"), ("faster", "right"), ("verdict", "left")]
    if priced:
        columns.insert(5, ("$ per 1M inferences", "right"))
    for header, justify in columns:
        table.add_column(Text(header), justify=justify, overflow="fold")  # Text: "[interval]" is no console markup
    for cell in decision.cells:
        style = VERDICT_STYLES.get(cell.verdict, "")
        word = cell.verdict + (" (known)" if cell.known_failure else "") + (" *" if cell.blocking else "")
        changed = cell.verdict in ("regression", "improvement")
        change = Text(format_change(cell), style=style if changed else "")
        if changed and cell.cost_change is not None:
            change.append(f", {format_cost_change(cell.cost_change)}")
        row = [Text(cell.model), Text(cell.target), format_ms(cell.base_ms), format_ms(cell.head_ms), change,
               format_faster(cell.speedup_vs_ort), Text(word, style=style + (" reverse" if cell.blocking else ""))]
        if priced:
            row.insert(5, format_cost(cell.head_cost, cell.ort_cost))
        table.add_row(*row)
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
