"""Benchmark: untuned TVM vs tuned TVM (budget N and 4N) vs ONNX Runtime, and `mlci run` cold vs warm.

For every model of an mlci config (default: the bundled examples), in one process:

1. untuned TVM: the model built against an empty MetaSchedule database (naive kernels on CPU);
2. tuned TVM at the model's default budget N (its ``trials``, else ``[tuning].trials``), tuned into
   a fresh temporary tuning cache, then at 4N continuing from that same cache (so the second
   search should only cover the 3N trials the cache does not hold yet);
3. ONNX Runtime (CPU provider, I/O binding) on the original model file.

All latencies come from the same harness as `mlci run` (``mlci.measure.time_callable`` with the
config's ``[measure]`` settings); the table reports medians. "ORT/TVM" is ONNX Runtime's median
divided by TVM's, so above 1 means TVM is faster; the product's goal is 0.9 or better.

Then, unless ``--skip-cli``, the wall time of the real command: the config and ``make_models.py``
are copied into an empty temporary directory (no ``.mlci/``), ``mlci run`` is run there twice as a
subprocess (MLflow tracking on, embedded sqlite), and the new tuning trials of each run are read
from its results file. Goals: warm/cold <= 0.25 and 0 new trials when warm.

Timings are wall-clock on a shared machine: other load on the CPU shows up as noise (the load
average before and after is recorded in the JSON).

Run (from the repository root, in the project's virtualenv)::

    python bench/tvm_vs_ort.py                       # everything, several minutes on 2 cores
    python bench/tvm_vs_ort.py --models mlp --budget-scale 0.25 --skip-cli   # a quick try
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mlci import measure, tuning
from mlci.config import Config, ModelConfig, load_config
from mlci.pipeline import Compiled, ModelSettings, Pipeline, run_prepare
from mlci.results import json_safe
from mlci.stats import speedup, summarize
from mlci.targets import ResolvedTarget, environment_fingerprint, select_target

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "mlci.toml"
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "tvm_vs_ort.json"
TUNE_SECONDS = 3600.0
"""Wall-clock cap per tuning call: large, so the trial budget and not the clock ends the search."""
BUDGET_MULTIPLIER = 4
ORT_OVER_TVM_GOAL = 0.9
WARM_OVER_COLD_GOAL = 0.25

err = Console(stderr=True, highlight=False, soft_wrap=True)


# --- results ----------------------------------------------------------------


@dataclass
class Timing:
    """Latency of one implementation of one model, in milliseconds."""

    median_ms: float
    min_ms: float
    p90_ms: float
    std_ms: float
    n: int
    samples_ms: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        s = summarize(samples)
        return cls(s.median, s.min, s.p90, s.std, s.n, [round(v, 6) for v in samples])


@dataclass
class TunedRun:
    """One tuning call into the model's cache, then a build and its timing."""

    budget: int
    trials_new: int
    trials_valid_new: int
    trials_cached: int
    trials_planned: int
    tasks_from_cache: int
    tune_seconds: float
    deadline_hit: bool
    build_seconds: float
    timing: Timing
    numerics_passed: bool
    max_abs_err: float


@dataclass
class ModelBench:
    name: str
    kernels: int
    import_seconds: float
    untuned: Timing
    untuned_numerics_passed: bool
    tuned: TunedRun
    tuned_4x: TunedRun
    ort: Timing
    ratios: dict[str, float | None] = field(default_factory=dict)


@dataclass
class CliRun:
    label: str
    wall_seconds: float
    returncode: int
    trials_new: int | None
    statuses: dict[str, str]
    output_tail: str


@dataclass
class CliBench:
    cold: CliRun
    warm: CliRun
    warm_over_cold: float | None
    config_text: str


# --- the in-process benchmark ------------------------------------------------


class Bench:
    def __init__(self, config: Config, target: ResolvedTarget, budget_scale: float):
        self.config = config
        self.target = target
        self.budget_scale = budget_scale

    def budget(self, settings: ModelSettings) -> int:
        return max(1, round(settings.trials * self.budget_scale))

    def run_model(self, cfg: ModelConfig) -> ModelBench:
        name = cfg.name
        settings = ModelSettings.resolve(self.config, cfg, seconds=TUNE_SECONDS)
        timing = self.config.measure

        def time_tvm(pipeline: Pipeline, compiled: Compiled) -> tuple[Timing, Timing, measure.NumericsReport]:
            checked = pipeline.check(compiled, settings)
            measured = pipeline.measure(checked, timing)
            return Timing.of(measured.tvm_ms), Timing.of(measured.ort_ms), checked.numerics

        with tempfile.TemporaryDirectory(prefix=f"mlci-bench-{name}-") as tmp:
            # Untuned: the model built against an empty tuning cache (naive kernels on CPU).
            empty = Pipeline(self.target, tuning.TuningCache(Path(tmp) / "empty"), log_dir=Path(tmp) / "logs")
            _say(name, "importing")
            imported = empty.load_and_import(cfg)
            _say(name, f"{len(imported.kernels)} kernels; building untuned")
            untuned_build = empty.tune_and_build(imported, replace(settings, trials=0))
            untuned, ort, untuned_numerics = time_tvm(empty, untuned_build)
            _say(name, f"untuned TVM {untuned.median_ms:.3f} ms; ONNX Runtime {ort.median_ms:.3f} ms")

            budget = self.budget(settings)
            pipeline = Pipeline(self.target, tuning.TuningCache(Path(tmp) / "cache"), log_dir=Path(tmp) / "logs")
            runs = []
            for trials in (budget, BUDGET_MULTIPLIER * budget):
                _say(name, f"tuning to a budget of {trials} trials")
                compiled = pipeline.tune_and_build(imported, replace(settings, trials=trials))
                outcome = compiled.tuning
                assert outcome is not None and compiled.build_seconds is not None
                timing_, _, numerics = time_tvm(pipeline, compiled)
                runs.append(
                    TunedRun(
                        budget=trials,
                        trials_new=outcome.trials_new,
                        trials_valid_new=outcome.trials_valid_new,
                        trials_cached=outcome.trials_cached,
                        trials_planned=sum(outcome.planned),
                        tasks_from_cache=outcome.tasks_from_cache,
                        tune_seconds=round(outcome.seconds, 3),
                        deadline_hit=outcome.deadline_hit,
                        build_seconds=round(compiled.build_seconds, 3),
                        timing=timing_,
                        numerics_passed=numerics.passed,
                        max_abs_err=numerics.max_abs_err,
                    )
                )
                _say(
                    name,
                    f"budget {trials}: searched {outcome.trials_new} new ({outcome.trials_cached} cached) "
                    f"in {outcome.seconds:.1f} s -> {timing_.median_ms:.3f} ms",
                )

        tuned, tuned_4x = runs
        return ModelBench(
            name=name,
            kernels=len(imported.kernels),
            import_seconds=round(imported.seconds, 3),
            untuned=untuned,
            untuned_numerics_passed=untuned_numerics.passed,
            tuned=tuned,
            tuned_4x=tuned_4x,
            ort=ort,
            ratios={
                "tuned_over_untuned_speedup": speedup(untuned.median_ms, tuned.timing.median_ms),
                "tuned_4x_over_untuned_speedup": speedup(untuned.median_ms, tuned_4x.timing.median_ms),
                "ort_over_untuned_tvm": speedup(ort.median_ms, untuned.median_ms),
                "ort_over_tuned_tvm": speedup(ort.median_ms, tuned.timing.median_ms),
                "ort_over_tuned_4x_tvm": speedup(ort.median_ms, tuned_4x.timing.median_ms),
            },
        )


def _say(model: str, text: str) -> None:
    err.print(f"[{time.strftime('%H:%M:%S')}] {model}: {text}", markup=False)


# --- `mlci run`, cold vs warm --------------------------------------------------


def scaled_config_text(text: str, scale: float) -> str:
    """The config with every ``trials = N`` line scaled (flat example TOML; a quick-try helper)."""
    if scale == 1.0:
        return text

    def repl(match: re.Match[str]) -> str:
        return f"{match.group(1)}{max(1, round(int(match.group(2)) * scale))}"

    return re.sub(r"(?m)^(\s*trials\s*=\s*)(\d+)", repl, text)


def run_cli(workdir: Path, label: str, target: str, models: list[str]) -> CliRun:
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default, embedded sqlite
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # `prepare` runs `python`
    cmd = [sys.executable, "-m", "mlci.cli", "run", "-c", str(workdir / "mlci.toml"), "-t", target]
    for name in models:
        cmd += ["-m", name]
    _say("mlci run", f"{label}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    (workdir / f"mlci-run-{label}.log").write_text(output)

    trials_new: int | None = None
    statuses: dict[str, str] = {}
    results_path = workdir / ".mlci" / "results" / f"{target}.json"
    if results_path.is_file():
        data = json.loads(results_path.read_text())
        trials_new = sum(int((m.get("tuning") or {}).get("trials_new", 0)) for m in data.get("models", []))
        statuses = {m["name"]: m["status"] for m in data.get("models", [])}
    _say("mlci run", f"{label}: {wall:.1f} s, exit {proc.returncode}, {trials_new} new trials, {statuses}")
    return CliRun(label, round(wall, 3), proc.returncode, trials_new, statuses, output[-3000:])


def bench_cli(config: Config, target: str, models: list[str], budget_scale: float, keep: bool) -> CliBench:
    tmp = Path(tempfile.mkdtemp(prefix="mlci-bench-cli-"))
    failed = False
    try:
        config_text = scaled_config_text(config.path.read_text(encoding="utf-8"), budget_scale)
        (tmp / "mlci.toml").write_text(config_text, encoding="utf-8")
        for extra in ("make_models.py",):
            if (config.root / extra).is_file():
                shutil.copy2(config.root / extra, tmp / extra)
        cold = run_cli(tmp, "cold", target, models)
        warm = run_cli(tmp, "warm", target, models)
        failed = cold.returncode != 0 or warm.returncode != 0
        return CliBench(cold, warm, _ratio(warm.wall_seconds, cold.wall_seconds), config_text)
    finally:
        if keep or failed:
            err.print(f"kept the `mlci run` directory: {tmp}", markup=False)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


# --- output ---------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.3f}"


def _x(value: float | None, goal: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}x"
    if goal is None:
        return text
    return f"[green]{text}[/green]" if value >= goal else f"[red]{text}[/red]"


def models_table(rows: list[ModelBench]) -> Table:
    table = Table(title="TVM vs ONNX Runtime (median latency; ORT/TVM > 1: TVM faster)", title_justify="left")
    for header in (
        "model",
        "kernels",
        "untuned ms",
        "tuned ms (N)",
        "tuned ms (4N)",
        "ORT ms",
        "speedup vs untuned (N | 4N)",
        f"ORT/TVM N (>={ORT_OVER_TVM_GOAL} goal)",
        f"ORT/TVM 4N (>={ORT_OVER_TVM_GOAL} goal)",
        "trials searched (N | 4N)",
        "tune s (N | 4N)",
    ):
        table.add_column(header, justify="left" if header == "model" else "right")
    for r in rows:
        table.add_row(
            r.name,
            str(r.kernels),
            _ms(r.untuned.median_ms),
            f"{_ms(r.tuned.timing.median_ms)} (N={r.tuned.budget})",
            f"{_ms(r.tuned_4x.timing.median_ms)} ({r.tuned_4x.budget})",
            _ms(r.ort.median_ms),
            f"{_x(r.ratios['tuned_over_untuned_speedup'])} | {_x(r.ratios['tuned_4x_over_untuned_speedup'])}",
            _x(r.ratios["ort_over_tuned_tvm"], ORT_OVER_TVM_GOAL),
            _x(r.ratios["ort_over_tuned_4x_tvm"], ORT_OVER_TVM_GOAL),
            f"{r.tuned.trials_new} | {r.tuned_4x.trials_new}",
            f"{r.tuned.tune_seconds:.1f} | {r.tuned_4x.tune_seconds:.1f}",
        )
    return table


def cli_table(cli: CliBench) -> Table:
    table = Table(title="`mlci run` wall time, fresh directory then unchanged rerun", title_justify="left")
    for header in ("run", "wall s", "exit", "new trials", "statuses"):
        table.add_column(header, justify="left" if header in ("run", "statuses") else "right")
    for run in (cli.cold, cli.warm):
        trials = "-" if run.trials_new is None else str(run.trials_new)
        if run is cli.warm and run.trials_new is not None:
            trials = f"[green]{trials}[/green]" if run.trials_new == 0 else f"[red]{trials}[/red] (goal 0)"
        statuses = ", ".join(f"{k}={v}" for k, v in run.statuses.items()) or "-"
        table.add_row(run.label, f"{run.wall_seconds:.1f}", str(run.returncode), trials, statuses)
    ratio = cli.warm_over_cold
    if ratio is None:
        shown = "-"
    else:
        colour = "green" if ratio <= WARM_OVER_COLD_GOAL else "red"
        shown = f"[{colour}]{ratio:.3f}[/{colour}] (goal <={WARM_OVER_COLD_GOAL})"
    table.add_row("warm/cold", shown, "", "", "")
    return table


def notes(rows: list[ModelBench]) -> list[str]:
    """Anything that makes a row's numbers questionable."""
    out = []
    for r in rows:
        if not r.untuned_numerics_passed:
            out.append(f"{r.name}: untuned TVM outputs differ from ONNX Runtime")
        for run in (r.tuned, r.tuned_4x):
            if not run.numerics_passed:
                out.append(
                    f"{r.name}: TVM tuned at {run.budget} differs from ONNX Runtime (max abs err {run.max_abs_err:.3g})"
                )
            if run.deadline_hit:
                out.append(f"{r.name}: tuning at {run.budget} stopped at the {TUNE_SECONDS:.0f} s cap")
        expected = r.tuned_4x.budget - r.tuned.trials_new
        if r.tuned_4x.trials_new != expected:
            out.append(
                f"{r.name}: the 4N run searched {r.tuned_4x.trials_new} new trials, not the "
                f"{expected} still owed (4N - trials at N); {r.tuned_4x.trials_cached} counted as cached"
            )
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(payload), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


# --- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="mlci.toml (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME", help="only these models")
    parser.add_argument("--target", default=None, help="target name from [targets] (default: the first)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every trial budget (e.g. 0.25 for a quick try)"
    )
    parser.add_argument("--skip-cli", action="store_true", help="skip the `mlci run` cold/warm timing")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the `mlci run` temporary directory")
    args = parser.parse_args(argv)
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    unknown = sorted(set(args.models) - {m.name for m in config.models})
    if unknown:
        err.print(f"no such model(s) in {config.path}: {', '.join(unknown)}", markup=False)
        return 2
    selected = [m for m in config.models if not args.models or m.name in args.models]
    run_prepare(config)  # e.g. generate the example models
    target = select_target(config, args.target)

    started = dt.datetime.now(dt.UTC)
    payload: dict[str, Any] = {
        "benchmark": "tvm_vs_ort",
        "date": started.isoformat(timespec="seconds"),
        "config": str(config.path.resolve()),
        "target": target.name,
        "tvm_target": target.tvm_target,
        "fingerprint": environment_fingerprint(target).as_dict(),
        "budget_scale": args.budget_scale,
        "budget_multiplier": BUDGET_MULTIPLIER,
        "tune_seconds_cap": TUNE_SECONDS,
        "measure": asdict(config.measure),
        "trials_per_round": config.tuning.trials_per_round,
        "load_average_start": list(os.getloadavg()),
        "models": [],
        "cli": None,
    }
    bench = Bench(config, target, args.budget_scale)
    rows: list[ModelBench] = []
    for cfg in selected:
        row = bench.run_model(cfg)
        rows.append(row)
        payload["models"].append(asdict(row))
        write_json(args.out, payload)

    cli: CliBench | None = None
    if not args.skip_cli:
        cli = bench_cli(config, target.name, args.models, args.budget_scale, args.keep_tmp)
        payload["cli"] = asdict(cli)
    payload["load_average_end"] = list(os.getloadavg())
    payload["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    write_json(args.out, payload)

    console = Console() if Console().is_terminal or os.environ.get("COLUMNS") else Console(width=200)
    console.print(models_table(rows))
    for line in notes(rows):
        console.print(f"note: {line}", markup=False)
    if cli is not None:
        console.print(cli_table(cli))
    console.print(
        f"load average (1/5/15 min) at start {payload['load_average_start']}, at end {payload['load_average_end']}",
        markup=False,
    )
    console.print(f"JSON: {args.out}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
