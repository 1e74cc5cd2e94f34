"""Benchmark: progressive tuning over commits, from an empty tuning cache, at a fixed budget per commit.

`mlci run` on every commit of a repository whose models do not change: each run searches a fixed
number of NEW trials (``--trials``, default 64) on top of what the persistent tuning cache already
holds, spent where the estimated remaining gain is largest (``ModelSettings.progressive``). This
benchmark simulates ``--commits`` such runs (default 20) for every model of an mlci config (default:
the bundled examples) in one process, through one tuning cache that starts empty, and records after
each commit: the trials searched, the tuning time, how many kernels have a tuned schedule, and the
median latency of TVM and of ONNX Runtime (both re-measured every commit, by the same harness as
`mlci run`, with the config's ``[measure]`` settings).

The question is whether a small per-commit cost converges: TVM's latency should fall over the
commits, and end within the goal of ONNX Runtime: TVM's median over ORT's, both measured in the
same commit, at most 1.5 (the median of that ratio over the last 3 commits). "ORT/TVM" in the
tables is ONNX Runtime's median divided by TVM's: above 1 means TVM is faster; the goal is
ORT/TVM >= 0.67.

Commits run in order and, within a commit, every model in the config's order (as one CI run
would). The JSON is rewritten after every commit, so an interrupted run keeps what it measured; a
plot of TVM's latency per commit against ORT's and the goal is written at the end (matplotlib).

Timings are wall-clock on a shared machine: other load on the CPU shows up as noise (the load
average before, during and after is recorded in the JSON).

Run (from the repository root, in the project's virtualenv)::

    python bench/progressive.py                                  # all models, 20 commits x 64 trials
    python bench/progressive.py --models mlp --commits 2 --trials 8   # a smoke test, about a minute

Rough cost on 2 cores: about a minute per commit per model at 64 trials (tuning dominates; small
models are faster, squeezenet slower), so the default run takes on the order of an hour.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mlci import tuning
from mlci.config import Config, load_config
from mlci.models import ModelError
from mlci.pipeline import Imported, ModelSettings, Pipeline, run_prepare
from mlci.stats import speedup, summarize
from mlci.targets import environment_fingerprint, select_target

if __package__:  # python -m bench.progressive
    from bench.tvm_vs_ort import TUNE_SECONDS, Timing, _ms, _say, _x, err, selected_models, write_json
else:  # python bench/progressive.py: bench/ is on sys.path
    from tvm_vs_ort import TUNE_SECONDS, Timing, _ms, _say, _x, err, selected_models, write_json

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "mlci.toml"
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "progressive.json"
DEFAULT_COMMITS = 20
DEFAULT_TRIALS = 64
GOAL_TVM_OVER_ORT = 1.5
"""TVM's median latency may be at most this many times ONNX Runtime's measured in the same commit,
at the end of the curve (the median ratio of the last ENDING commits)."""
ENDING = 3
"""Commits whose paired TVM/ORT ratios (median) say where the curve ends."""


# --- results ----------------------------------------------------------------


@dataclass
class CommitRecord:
    """One simulated commit of one model: a progressive tuning call, a build, a check and a timing."""

    commit: int
    trials_so_far: int
    """New trials searched for this model over commits 1..commit (the cache's growth)."""
    trials_new: int = 0
    trials_valid_new: int = 0
    trials_cached: int = 0
    tasks_from_cache: int = 0
    tune_seconds: float = 0.0
    deadline_hit: bool = False
    build_seconds: float | None = None
    kernels: int | None = None
    kernels_tuned: int | None = None
    numerics_passed: bool | None = None
    max_abs_err: float | None = None
    tvm: Timing | None = None
    ort: Timing | None = None
    ort_over_tvm: float | None = None
    ort_threads: int | None = None
    wall_seconds: float = 0.0
    load_average: list[float] = field(default_factory=list)
    error: str | None = None
    """The stage's status and message when this commit failed for this model (ModelError)."""


@dataclass
class ModelRun:
    name: str
    kernels: int
    import_seconds: float
    commits: list[CommitRecord] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def measured(self) -> list[CommitRecord]:
        return [c for c in self.commits if c.tvm is not None and c.ort is not None]

    def summarize(self) -> dict[str, Any]:
        """First/last TVM median, and whether the goals hold on TVM/ORT paired by commit: both are
        measured interleaved in the same commit, so a machine that is faster or slower for a while
        (seen here: both medians moving +-20% together between commits with no kernel changed)
        moves both sides of the ratio alike. The end is the median ratio of the last ENDING commits."""
        done = self.measured()
        if not done:
            self.summary = {"commits_measured": 0, "goal_met": False, "latency_fell": False}
            return self.summary
        first, last = done[0], done[-1]
        assert first.tvm is not None and last.tvm is not None
        ort_median = summarize([c.ort.median_ms for c in done if c.ort is not None]).median
        ratios = [(c.commit, c.tvm.median_ms / c.ort.median_ms) for c in done
                  if c.tvm is not None and c.ort is not None and c.ort.median_ms]
        ending = summarize([r for _, r in ratios[-ENDING:]]).median if ratios else None
        meeting = [commit for commit, r in ratios if r <= GOAL_TVM_OVER_ORT]
        self.summary = {
            "commits_measured": len(done),
            "commits_failed": sum(1 for c in self.commits if c.error),
            "first_tvm_median_ms": first.tvm.median_ms,
            "last_tvm_median_ms": last.tvm.median_ms,
            "best_tvm_median_ms": min(c.tvm.median_ms for c in done if c.tvm is not None),
            "ort_median_ms": ort_median,
            "last_ort_over_tvm": last.ort_over_tvm,
            "last_tvm_over_ort": ratios[-1][1] if ratios else None,
            "ending_commits": min(ENDING, len(ratios)),
            "ending_tvm_over_ort": ending,
            "goal_tvm_over_ort": GOAL_TVM_OVER_ORT,
            "goal_met": ending is not None and ending <= GOAL_TVM_OVER_ORT,
            "first_commit_meeting_goal": meeting[0] if meeting else None,
            "latency_fell": last.tvm.median_ms < first.tvm.median_ms,
            "trials_total": self.commits[-1].trials_so_far,
            "tune_seconds_total": round(sum(c.tune_seconds for c in self.commits), 3),
            "kernels_tuned_last": last.kernels_tuned,
        }
        return self.summary


# --- one commit ---------------------------------------------------------------


def run_commit(
    pipeline: Pipeline, config: Config, imported: Imported, settings: ModelSettings, commit: int, trials_before: int
) -> CommitRecord:
    """Tune (progressively), build, check and time one model as one `mlci run` would; a model's
    own failure is recorded, not raised, so the other models and commits still run."""
    record = CommitRecord(commit=commit, trials_so_far=trials_before, kernels=len(imported.kernels))
    start = time.monotonic()
    try:
        compiled = pipeline.tune_and_build(imported, settings)
        outcome = compiled.tuning
        assert outcome is not None and compiled.build_seconds is not None
        record.trials_new = outcome.trials_new
        record.trials_valid_new = outcome.trials_valid_new
        record.trials_cached = outcome.trials_cached
        record.tasks_from_cache = outcome.tasks_from_cache
        record.tune_seconds = round(outcome.seconds, 3)
        record.deadline_hit = outcome.deadline_hit
        record.trials_so_far = trials_before + outcome.trials_new
        record.build_seconds = round(compiled.build_seconds, 3)
        if compiled.build_report is not None:
            record.kernels = len(compiled.build_report.kernels)
            record.kernels_tuned = len(compiled.build_report.tuned)
        checked = pipeline.check(compiled, settings)
        record.numerics_passed = checked.numerics.passed
        record.max_abs_err = checked.numerics.max_abs_err
        measured = pipeline.measure(checked, config.measure)
        record.tvm, record.ort = Timing.of(measured.tvm_ms), Timing.of(measured.ort_ms)
        record.ort_over_tvm = speedup(record.ort.median_ms, record.tvm.median_ms)
        record.ort_threads = measured.ort_threads
    except ModelError as exc:
        partial = exc.partial
        if partial is not None and partial.tuning is not None:
            record.trials_new = partial.tuning.trials_new
            record.trials_so_far = trials_before + partial.tuning.trials_new
            record.tune_seconds = round(partial.tuning.seconds, 3)
        record.error = f"{exc.status.value}: {exc}"
    record.wall_seconds = round(time.monotonic() - start, 3)
    record.load_average = [round(v, 2) for v in os.getloadavg()]
    return record


def commit_line(record: CommitRecord) -> str:
    if record.error:
        return f"commit {record.commit}: FAILED {record.error}"
    assert record.tvm is not None and record.ort is not None
    ratio = f"{record.ort_over_tvm:.2f}x" if record.ort_over_tvm is not None else "-"
    return (
        f"commit {record.commit}: +{record.trials_new} trials ({record.trials_so_far} so far) in {record.tune_seconds:.1f} s, "
        f"{record.kernels_tuned}/{record.kernels} kernels tuned; TVM {_ms(record.tvm.median_ms)} ms, "
        f"ORT {_ms(record.ort.median_ms)} ms, ORT/TVM {ratio}"
    )


# --- output ---------------------------------------------------------------------


def model_table(run: ModelRun, trials: int) -> Table:
    table = Table(
        title=f"{run.name}: progressive tuning, {trials} new trials a commit (ORT/TVM > 1: TVM faster)",
        title_justify="left",
    )
    for header in (
        "commit",
        "trials so far",
        "new trials",
        "tune s",
        "kernels tuned/total",
        "TVM ms",
        "ORT ms",
        f"ORT/TVM (>={1 / GOAL_TVM_OVER_ORT:.2f} goal)",
    ):
        table.add_column(header, justify="right")
    for c in run.commits:
        if c.error:
            table.add_row(
                str(c.commit), str(c.trials_so_far), str(c.trials_new), f"{c.tune_seconds:.1f}", "[red]failed[/red]", "-", "-", "-"
            )
            continue
        assert c.tvm is not None and c.ort is not None
        table.add_row(
            str(c.commit),
            str(c.trials_so_far),
            str(c.trials_new),
            f"{c.tune_seconds:.1f}",
            f"{c.kernels_tuned}/{c.kernels}",
            _ms(c.tvm.median_ms),
            _ms(c.ort.median_ms),
            _x(c.ort_over_tvm, 1 / GOAL_TVM_OVER_ORT),
        )
    return table


def summary_line(run: ModelRun) -> str:
    s = run.summary
    if not s.get("commits_measured"):
        return f"{run.name}: no commit measured"

    def yes(flag: bool) -> str:
        return "[green]yes[/green]" if flag else "[red]no[/red]"

    return (
        f"{run.name}: TVM {_ms(s['first_tvm_median_ms'])} -> {_ms(s['last_tvm_median_ms'])} ms "
        f"(fell: {yes(s['latency_fell'])}); ORT {_ms(s['ort_median_ms'])} ms; "
        f"TVM/ORT paired by commit: {_x(s['ending_tvm_over_ort'])} over the last {s['ending_commits']} commits, "
        f"{_x(s['last_tvm_over_ort'])} at the last (goal <= {GOAL_TVM_OVER_ORT}: {yes(s['goal_met'])}"
        + (f", first met at commit {s['first_commit_meeting_goal']})" if s["first_commit_meeting_goal"] else ")")
    )


def notes(runs: list[ModelRun]) -> list[str]:
    """Anything that makes a commit's numbers questionable."""
    out = []
    for run in runs:
        for c in run.commits:
            if c.error:
                out.append(f"{run.name} commit {c.commit}: {c.error}")
            if c.numerics_passed is False:
                out.append(f"{run.name} commit {c.commit}: TVM differs from ONNX Runtime (max abs err {c.max_abs_err:.3g})")
            if c.deadline_hit:
                out.append(f"{run.name} commit {c.commit}: tuning stopped at the {TUNE_SECONDS:.0f} s cap")
    return out


def plot(runs: list[ModelRun], path: Path, trials: int) -> bool:
    """TVM's median latency per commit against ONNX Runtime's and the goal, one subplot a model.
    matplotlib is imported here so that the benchmark runs (JSON and tables) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        err.print(f"matplotlib is not installed: no plot written ({path}); `pip install matplotlib` for one", markup=False)
        return False

    runs = [r for r in runs if r.measured()]
    if not runs:
        err.print("nothing was measured: no plot written", markup=False)
        return False
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.2 * len(runs)), squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        done = run.measured()
        commits = [c.commit for c in done]
        ax.plot(commits, [c.tvm.median_ms for c in done if c.tvm is not None], "o-", label="TVM (median)")
        ort = [c.ort.median_ms for c in done if c.ort is not None]
        ax.plot(commits, ort, "s--", color="tab:orange", label="ONNX Runtime (median, same commit)")
        ax.plot(commits, [GOAL_TVM_OVER_ORT * ms for ms in ort], ":", color="tab:green",
                label=f"goal: {GOAL_TVM_OVER_ORT}x ONNX Runtime")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_title(f"{run.name} ({run.kernels} kernels, {trials} new trials a commit)")
        ax.set_xlabel("commit")
        ax.set_ylabel("latency (ms, log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="mlci.toml (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME", help="only these models (default: all)")
    parser.add_argument("--commits", type=int, default=DEFAULT_COMMITS, help="commits to simulate (default: %(default)s)")
    parser.add_argument(
        "--trials", type=int, default=DEFAULT_TRIALS, help="new tuning trials a commit, per model (default: %(default)s)"
    )
    parser.add_argument("--target", default="cpu", help="target name from [targets] (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG output (default: the JSON's path with .png)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (tuning cache and logs)")
    args = parser.parse_args(argv)
    if args.commits < 1:
        parser.error("--commits must be at least 1")
    if args.trials < 1:
        parser.error("--trials must be at least 1")
    if args.plot is None:
        args.plot = args.out.with_suffix(".png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    selected = selected_models(config, args.models)
    if selected is None:
        return 2
    run_prepare(config)  # e.g. generate the example models
    target = select_target(config, args.target)

    tmp = Path(tempfile.mkdtemp(prefix="mlci-bench-progressive-"))
    pipeline = Pipeline(target, tuning.TuningCache(tmp / "cache"), log_dir=tmp / "logs")
    started = dt.datetime.now(dt.UTC)
    payload: dict[str, Any] = {
        "benchmark": "progressive",
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "nproc": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average_start": list(os.getloadavg()),
            "load_average_end": None,
            "tvm_threads": pipeline.threads,
            "ort_threads": None,
            "target": target.name,
            "tvm_target": target.tvm_target,
            "fingerprint": environment_fingerprint(target, pipeline.threads).as_dict(),
        },
        "parameters": {
            "config": str(config.path.resolve()),
            "models": [m.name for m in selected],
            "commits": args.commits,
            "trials_per_commit": args.trials,
            "progressive": True,
            "tune_seconds_cap": TUNE_SECONDS,
            "trials_per_round": config.tuning.trials_per_round,
            "measure": asdict(config.measure),
            "goal_tvm_over_ort": GOAL_TVM_OVER_ORT,
        },
        "completed": False,
        "models": {},
    }

    runs: list[ModelRun] = []
    settings: dict[str, ModelSettings] = {}
    imported: dict[str, Imported] = {}
    interrupted = False

    def save() -> None:
        for run in runs:
            run.summarize()
        payload["models"] = {run.name: asdict(run) for run in runs}
        write_json(args.out, payload)

    try:
        for cfg in selected:
            _say(cfg.name, "importing")
            try:
                imported[cfg.name] = pipeline.load_and_import(cfg)
            except ModelError as exc:
                err.print(f"{cfg.name}: cannot import, skipped: {exc}", markup=False)
                continue
            resolved = ModelSettings.resolve(config, cfg)
            settings[cfg.name] = replace(resolved, trials=args.trials, progressive=True, seconds=TUNE_SECONDS)
            runs.append(ModelRun(cfg.name, len(imported[cfg.name].kernels), round(imported[cfg.name].seconds, 3)))
            _say(cfg.name, f"{len(imported[cfg.name].kernels)} kernels")

        for commit in range(1, args.commits + 1):
            for run in runs:
                before = run.commits[-1].trials_so_far if run.commits else 0
                _say(run.name, f"commit {commit}/{args.commits}: tuning {args.trials} new trials")
                record = run_commit(pipeline, config, imported[run.name], settings[run.name], commit, before)
                run.commits.append(record)
                if payload["machine"]["ort_threads"] is None:
                    payload["machine"]["ort_threads"] = record.ort_threads
                _say(run.name, commit_line(record))
                save()
    except KeyboardInterrupt:
        interrupted = True
        err.print("interrupted: writing what was measured", markup=False)
    finally:
        if args.keep or interrupted:
            err.print(f"kept the temporary directory (tuning cache, logs): {tmp}", markup=False)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    payload["machine"]["load_average_end"] = list(os.getloadavg())
    payload["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    payload["completed"] = not interrupted
    save()

    console = err if err.is_terminal or os.environ.get("COLUMNS") else Console(stderr=True, highlight=False, width=200)
    for run in runs:
        console.print(model_table(run, args.trials))
    for run in runs:
        console.print(summary_line(run))
    for line in notes(runs):
        console.print(f"note: {line}", markup=False)
    machine = payload["machine"]
    console.print(
        f"threads: TVM {machine['tvm_threads']}, ONNX Runtime {machine['ort_threads']}; load average (1/5/15 min) "
        f"at start {machine['load_average_start']}, at end {machine['load_average_end']}",
        markup=False,
    )
    plotted = plot(runs, args.plot, args.trials)
    print(f"JSON: {args.out}")
    if plotted:
        print(f"PNG: {args.plot}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
