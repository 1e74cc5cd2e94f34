"""`mlci run`'s progress in a CI log: a line per stage, and never minutes of silence while tuning."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from rich.console import Console

from mlci.console import RunReporter, format_elapsed, progress_interval


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_file(tmp_path: Path):
    """A real file: no terminal, as stderr is in a CI job."""
    with open(tmp_path / "ci.log", "w", encoding="utf-8") as f:
        yield f


def _ci_console(log_file) -> Console:
    console = Console(file=log_file, width=200)
    assert not console.is_terminal
    return console


def _lines(log_file) -> list[str]:
    log_file.flush()
    return Path(log_file.name).read_text(encoding="utf-8").splitlines()


def test_tuning_reports_at_most_and_at_least_every_interval(log_file) -> None:
    clock = FakeClock()
    reporter = RunReporter(_ci_console(log_file), interval=30, clock=clock)
    reporter.stage("cnn", "tuning")
    reporter.trials("cnn", 0, 64, "")
    clock.now += 10
    reporter.trials("cnn", 3, 64, "fused_conv2d_add")  # 10 s after the last line: not yet
    reporter.tick()
    assert _lines(log_file) == ["cnn: tuning", "cnn: tuning: 0/64 trials (0 s)"]

    clock.now += 21  # 31 s of silence, and MetaSchedule said nothing: the heartbeat speaks
    reporter.tick()
    clock.now += 4
    reporter.trials("cnn", 10, 64, "fused_conv2d_add")  # 4 s after the heartbeat: not yet
    clock.now += 27
    reporter.trials("cnn", 20, 64, "fused_dense")  # 31 s after it
    clock.now += 94
    reporter.tick()
    reporter.trials("cnn", 64, 64, "fused_dense")  # the last trial always
    reporter.stage("cnn", "compiling")
    clock.now += 5
    reporter.tick()
    assert _lines(log_file)[2:] == [
        "cnn: tuning: 3/64 trials, kernel fused_conv2d_add (31 s)",
        "cnn: tuning: 20/64 trials, kernel fused_dense (1m 02s)",
        "cnn: tuning: 20/64 trials, kernel fused_dense (2m 36s)",
        "cnn: tuning: 64/64 trials, kernel fused_dense (2m 36s)",
        "cnn: compiling",
    ]


def test_every_long_stage_gets_a_heartbeat_until_the_model_finishes(log_file) -> None:
    clock = FakeClock()
    reporter = RunReporter(_ci_console(log_file), interval=30, clock=clock)
    reporter.stage("mlp", "compiling")
    clock.now += 45
    reporter.tick()
    reporter.finish("mlp", "ok")
    clock.now += 300
    reporter.tick()  # nothing under way: nothing to say
    assert _lines(log_file) == ["mlp: compiling", "mlp: compiling (45 s)", "mlp: ok"]


def test_the_heartbeat_thread_prints_while_metaschedule_is_silent(log_file) -> None:
    with RunReporter(_ci_console(log_file), interval=0.1) as reporter:
        reporter.stage("cnn", "tuning")
        reporter.trials("cnn", 5, 64, "fused_conv2d_add")
        time.sleep(0.45)
    during = _lines(log_file)
    time.sleep(0.25)
    assert _lines(log_file) == during  # the heartbeat stops with the run
    assert during[:2] == ["cnn: tuning", "cnn: tuning: 5/64 trials, kernel fused_conv2d_add (0 s)"]
    heartbeats = during[2:]
    assert 2 <= len(heartbeats) <= 6
    assert all(line.startswith("cnn: tuning: 5/64 trials, kernel fused_conv2d_add (") for line in heartbeats)


def test_a_terminal_gets_progress_bars_and_no_log_lines(tmp_path: Path) -> None:
    with open(tmp_path / "tty", "w", encoding="utf-8") as f:
        terminal = Console(file=f, force_terminal=True, width=120)
        with RunReporter(terminal, interval=0.05) as reporter:
            assert reporter._heartbeat is None
            reporter.stage("cnn", "tuning")
            reporter.trials("cnn", 5, 64, "k")
            time.sleep(0.15)
    assert "cnn: tuning" not in (tmp_path / "tty").read_text(encoding="utf-8")


def test_the_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, log_file) -> None:
    assert progress_interval({}) == (30.0, None)
    assert progress_interval({"MLCI_PROGRESS_INTERVAL": " 2.5 "}) == (2.5, None)
    for bad in ("soon", "0", "-1", "nan", "inf"):
        interval, warning = progress_interval({"MLCI_PROGRESS_INTERVAL": bad})
        assert interval == 30.0 and warning == (
            f"MLCI_PROGRESS_INTERVAL={bad!r} is not a positive number of seconds; using 30 s")

    monkeypatch.setenv("MLCI_PROGRESS_INTERVAL", "5")
    assert RunReporter(_ci_console(log_file)).interval == 5
    monkeypatch.setenv("MLCI_PROGRESS_INTERVAL", "soon")
    assert RunReporter(_ci_console(log_file)).interval == 30
    assert _lines(log_file) == ["warning: MLCI_PROGRESS_INTERVAL='soon' is not a positive number of seconds; "
                                "using 30 s"]


def test_elapsed_times_read_in_seconds_then_minutes() -> None:
    assert [format_elapsed(s) for s in (0, 59.9, 60, 125, 3725)] == ["0 s", "59 s", "1m 00s", "2m 05s", "62m 05s"]


def test_a_vacuous_numerics_check_is_marked_in_the_run_table_and_explained_under_it() -> None:
    from mlci.console import failure_lines, results_table
    from mlci.results import Fingerprint, GitInfo, ModelResult, NumericsInfo, Results, TargetInfo

    def numerics(vacuous: str | None) -> NumericsInfo:
        return NumericsInfo(0.0, 0.0, 1e-4, 1e-3, True, input_sets=2, vacuous=vacuous)

    results = Results(git=GitInfo(), target=TargetInfo("cpu", {"kind": "llvm"}, Fingerprint(hash="f")), models=[
        ModelResult("zoo", "zoo.onnx", numerics=numerics("the check proves nothing: over 2 different input sets")),
        ModelResult("real", "real.onnx", numerics=numerics(None)),
    ])
    console = Console(width=200, record=True)
    console.print(results_table(results))
    for line in failure_lines(results):
        console.print(line)
    text = console.export_text()
    assert "ok, numerics vacuous" in text.splitlines()[[i for i, ln in enumerate(text.splitlines()) if "zoo" in ln][0]]
    assert "zoo: numerics vacuous: the check proves nothing" in text
    assert "real: numerics" not in text and "real " in text
