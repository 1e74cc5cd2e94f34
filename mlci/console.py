"""What a person sees in the terminal: `mlci run`'s progress and results table, `mlci compare`'s decision table.

On a terminal: rich progress bars (stage, trials done/total). In CI logs
(not a TTY): one plain line per stage, which reads well in a log viewer.
Numbers are formatted by `mlci.formatting`, as in the PR comment.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from mlci.formatting import format_change, format_faster, format_kernels, format_ms, status_word
from mlci.results import Results

if TYPE_CHECKING:
    from mlci.gate import Decision


class RunReporter:
    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
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

    def __enter__(self) -> RunReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _log(self, model: str, text: str) -> None:
        if not self.live and self._last_line.get(model) != text:
            self._last_line[model] = text
            self.console.print(f"{escape(model)}: {escape(text)}", highlight=False)

    def stage(self, model: str, text: str) -> None:
        if model not in self._tasks:
            self._tasks[model] = self.progress.add_task(text, model=escape(model), total=None)
        self.progress.update(self._tasks[model], description=escape(text), total=None, completed=0)
        self._log(model, text)

    def trials(self, model: str, done: int, total: int, kernel: str) -> None:
        if model not in self._tasks:
            self.stage(model, "tuning")
        label = f"tuning {kernel}" if kernel else "tuning"
        self.progress.update(self._tasks[model], description=escape(label), total=total, completed=done)
        if not self.live and (done == total or done == 0):
            self._log(model, f"tuning: {done}/{total} trials")

    def finish(self, model: str, status: str) -> None:
        if model in self._tasks:
            task = self._tasks[model]
            colour = "green" if status == "ok" else "red"
            self.progress.update(task, description=f"[{colour}]{status}[/{colour}]", total=1, completed=1)
        self._log(model, status)


def results_table(results: Results) -> Table:
    table = Table(title=f"mlci run: target {escape(results.target.name)}", title_justify="left")
    table.add_column("model")
    table.add_column("status")
    ab = any(m.base is not None for m in results.models)
    if ab:
        table.add_column("base", justify="right")
    table.add_column("TVM", justify="right")
    if ab:
        table.add_column("vs base", justify="right")
    table.add_column("ORT", justify="right")
    table.add_column("faster", justify="right")
    table.add_column("kernels tuned", justify="right")
    table.add_column("trials new/cached", justify="right")
    for m in results.models:
        status_style = "green" if m.ok else "red"
        trials = (
            f"{m.tuning.trials_new}/{m.tuning.trials_cached}" if m.tuning else "-"
        )
        head_ms = m.latency_ms.median if m.latency_ms else None
        cells = [escape(m.name), f"[{status_style}]{m.status}[/{status_style}]"]
        if ab:
            base_ms = m.base.latency_ms.median if m.base and m.base.latency_ms else None
            cells.append(format_ms(base_ms) if m.base is None or m.base.status == "ok" else m.base.status)
            cells += [format_ms(head_ms), f"{(head_ms / base_ms - 1) * 100:+.1f}%" if head_ms and base_ms else "-"]
        else:
            cells.append(format_ms(head_ms))
        cells += [format_ms(m.peer.onnxruntime_median_ms if m.peer else None),
                  format_faster(m.peer.speedup if m.peer else None), format_kernels(m.compile), trials]
        table.add_row(*cells)
    return table


def failure_lines(results: Results) -> list[str]:
    """One line per failed or cut-short model, printed under the table where long messages fit."""
    lines = []
    for m in results.models:
        if not m.ok:
            lines.append(f"[red]{escape(m.name)}[/red] ({m.status}): {escape(m.error or '')}")
        elif m.tuning and m.tuning.deadline_hit:
            lines.append(
                f"[yellow]{escape(m.name)}[/yellow]: tuning stopped at its time cap after "
                f"{m.tuning.seconds:.0f} s; the next run continues where it stopped"
            )
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
    for header, justify in (("model", "left"), ("target", "left"), ("base", "right"), ("head", "right"),
                            ("change [interval]", "right"), ("faster", "right"), ("verdict", "left")):
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
            format_faster(cell.speedup_vs_ort),
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
