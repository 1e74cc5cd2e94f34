"""What a person sees while `mlci run` works: progress, then one table.

On a terminal: rich progress bars (stage, trials done/total). In CI logs
(not a TTY): one plain line per stage, which reads well in a log viewer.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from mlci.results import Results


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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def results_table(results: Results) -> Table:
    table = Table(title=f"mlci run: target {escape(results.target.name)}", title_justify="left")
    table.add_column("model")
    table.add_column("status")
    ab = any(m.base is not None for m in results.models)
    if ab:
        table.add_column("base ms", justify="right")
    table.add_column("TVM ms", justify="right")
    if ab:
        table.add_column("vs base", justify="right")
    table.add_column("ORT ms", justify="right")
    table.add_column("speedup", justify="right")
    table.add_column("trials new/cached", justify="right")
    for m in results.models:
        speed = m.peer.get("speedup")
        status_style = "green" if m.ok else "red"
        trials = (
            f"{m.tuning.get('trials_new', 0)}/{m.tuning.get('trials_cached', 0)}" if m.tuning else "-"
        )
        head_ms = m.latency_ms.median if m.latency_ms else None
        cells = [escape(m.name), f"[{status_style}]{m.status}[/{status_style}]"]
        if ab:
            base_ms = m.base.latency_ms.median if m.base and m.base.latency_ms else None
            cells.append(_ms(base_ms) if m.base is None or m.base.status == "ok" else m.base.status)
            cells += [_ms(head_ms), f"{(head_ms / base_ms - 1) * 100:+.1f}%" if head_ms and base_ms else "-"]
        else:
            cells.append(_ms(head_ms))
        cells += [_ms(m.peer.get("onnxruntime_median_ms")), "-" if speed is None else f"{speed:.2f}x", trials]
        table.add_row(*cells)
    return table


def failure_lines(results: Results) -> list[str]:
    """One line per failed or cut-short model, printed under the table where long messages fit."""
    lines = []
    for m in results.models:
        if not m.ok:
            lines.append(f"[red]{escape(m.name)}[/red] ({m.status}): {escape(m.error or '')}")
        elif m.tuning.get("deadline_hit"):
            lines.append(
                f"[yellow]{escape(m.name)}[/yellow]: tuning stopped at its time cap after "
                f"{m.tuning['seconds']:.0f} s; the next run continues where it stopped"
            )
    return lines
