"""`mlci run`: per model, on one target: load, import, tune, compile, check, benchmark, log.

A model that fails at any stage gets its status and message and the next
model runs. The results file is rewritten after every model, and fully written
before MLflow is contacted, so nothing computed is lost to a tracking outage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import subprocess
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci import compile as tvm_compile
from mlci import measure, tuning
from mlci.config import Config, ConfigError, ModelConfig, check_model_files
from mlci.console import RunReporter
from mlci.gitinfo import detect_git
from mlci.models import ModelError, prepare_model
from mlci.results import Latency, ModelResult, Results, TargetInfo, write_results
from mlci.stats import speedup, summarize
from mlci.targets import ResolvedTarget, environment_fingerprint, resolve_target, tvm_target_object

log = logging.getLogger("mlci")


@dataclass
class RunOptions:
    target: str | None = None
    models: list[str] = field(default_factory=list)
    trials: int | None = None
    tune_seconds: float | None = None
    output: Path | None = None
    tracking: bool = True
    tracking_uri: str | None = None


@dataclass
class RunOutcome:
    results: Results
    results_path: Path
    tracking_error: str | None = None

    @property
    def all_ok(self) -> bool:
        return all(m.ok for m in self.results.models)


def run_prepare(config: Config) -> None:
    """The config's `prepare` command (e.g. export models), run from the config's directory."""
    if not config.prepare:
        return
    try:
        proc = subprocess.run(config.prepare, cwd=config.root, capture_output=True, text=True)
    except OSError as exc:
        raise ConfigError(config.path, [f"prepare: cannot start {config.prepare[0]!r}: {exc}"]) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ConfigError(
            config.path,
            [f"prepare: {' '.join(config.prepare)!r} exited with {proc.returncode}: " + " | ".join(tail)],
        )


def pick_target(config: Config, name: str | None) -> ResolvedTarget:
    if name is None:
        name = next(iter(config.targets))
    if name not in config.targets:
        raise ConfigError(
            config.path, [f"targets.{name}: no such target; configured: {', '.join(config.targets)}"]
        )
    resolved = resolve_target(config.targets[name])
    try:
        tvm_target_object(resolved)
    except Exception as exc:  # TVM raises ValueError or its own errors for bad JSON
        raise ConfigError(config.path, [f"targets.{name}.tvm: TVM rejects this target: {exc}"]) from None
    return resolved


def cache_key(fingerprint: dict[str, Any]) -> str:
    """Tuning records are reusable only on the same target, hardware and compiler."""
    keyed = {k: fingerprint.get(k) for k in ("tvm_target", "cpu", "arch", "gpu", "tvm", "tvm_ffi", "llvm")}
    return hashlib.sha256(repr(sorted(keyed.items())).encode()).hexdigest()[:12]


class _Stage:
    """Maps an unexpected exception inside a stage to that stage's failure status."""

    def __init__(self, status: str, what: str):
        self.status, self.what = status, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, ModelError | KeyboardInterrupt):
            return False
        log.error("unexpected error while %s:\n%s", self.what, "".join(traceback.format_exception(exc)))
        raise ModelError(self.status, f"unexpected error while {self.what}: {type(exc).__name__}: {exc}") from exc


class ModelRunner:
    """Runs one target's stages for each model; holds what models share (cache, device)."""

    def __init__(self, config: Config, target: ResolvedTarget, options: RunOptions, reporter: RunReporter):
        self.config = config
        self.target = target
        self.options = options
        self.reporter = reporter
        self.tvm_target = tvm_target_object(target)
        self.fingerprint = environment_fingerprint(target)
        self.cache = tuning.TuningCache(config.cache_dir / f"{target.name}-{cache_key(self.fingerprint)}")
        self.work_dir = config.state_dir / "work" / target.name

    def _device(self) -> Any:
        import tvm

        return tvm.device("cpu" if self.target.kind == "llvm" else self.target.kind, 0)

    def _require_device(self) -> Any:
        device = self._device()
        if not device.exist:
            raise ModelError(
                "run_failed",
                f"compiled for {self.target.kind}, but no {self.target.kind} device is visible on this "
                "machine: not tuned, checked or measured (run this target on a runner that has one)",
            )
        return device

    def run(self, cfg: ModelConfig) -> ModelResult:
        result = ModelResult(name=cfg.name, path=str(_relative(cfg.path, self.config.root)))
        try:
            self._run(cfg, result)
        except ModelError as exc:
            result.status = str(exc.status)
            result.error = str(exc)
        self.reporter.finish(cfg.name, result.status)
        return result

    def _run(self, cfg: ModelConfig, result: ModelResult) -> None:
        report = self.reporter
        name = cfg.name
        budget_trials = self.options.trials if self.options.trials is not None else (
            cfg.trials if cfg.trials is not None else self.config.tuning.trials
        )
        budget_seconds = self.options.tune_seconds or cfg.seconds or self.config.tuning.seconds
        atol = cfg.atol if cfg.atol is not None else self.config.numerics.atol
        rtol = cfg.rtol if cfg.rtol is not None else self.config.numerics.rtol
        out_dir = self.work_dir / name

        report.stage(name, "loading")
        with _Stage("import_failed", "loading the model"):
            prepared = prepare_model(cfg)
        result.sha256 = prepared.sha256

        report.stage(name, "importing")
        start = time.monotonic()
        with _Stage("import_failed", "importing into Relax"):
            mod = tvm_compile.import_relax(prepared)
            fused = tvm_compile.fuse_for_tuning(mod, self.tvm_target)
            kernels = tuning.extract_kernels(fused, self.tvm_target)
        import_seconds = time.monotonic() - start

        if not self._device().exist:
            budget_trials = 0  # candidates cannot be measured here; compile with what is cached
        report.stage(name, "tuning")
        with _Stage("tune_failed", "tuning"), self.cache.lock():
            outcome = tuning.tune(
                kernels,
                self.tvm_target,
                self.cache,
                trials=budget_trials,
                seconds=budget_seconds,
                per_round=self.config.tuning.trials_per_round,
                log_dir=self.config.state_dir / "logs" / "tuning" / self.target.name / name,
                seed=self.config.measure.seed,
                on_progress=lambda done, total, kernel: report.trials(name, done, total, kernel),
            )
            result.tuning = {
                "trials_new": outcome.trials_new,
                "trials_valid_new": outcome.trials_valid_new,
                "trials_cached": outcome.trials_cached,
                "trials_budget": budget_trials,
                "seconds_budget": budget_seconds,
                "tasks": outcome.tasks,
                "tasks_from_cache": outcome.tasks_from_cache,
                "seconds": round(outcome.seconds, 3),
                "deadline_hit": outcome.deadline_hit,
            }
            if outcome.trials_new and not outcome.trials_valid_new:
                raise ModelError(
                    "tune_failed",
                    f"0 of {outcome.trials_new} tuning candidates built and ran; see "
                    f"{_relative(self.config.state_dir / 'logs' / 'tuning', self.config.root)}",
                )
            out_dir.mkdir(parents=True, exist_ok=True)
            self.cache.export_records(kernels, out_dir / "tuning_records.json")

        report.stage(name, "compiling")
        start = time.monotonic()
        with _Stage("compile_failed", "compiling"):
            executable = tvm_compile.build(mod, self.tvm_target, self.cache.database)
            tvm_compile.export_library(executable, out_dir / f"{name}.so")
        result.compile = {
            "seconds": round(time.monotonic() - start, 3),
            "import_seconds": round(import_seconds, 3),
            "kernels": len(kernels),
        }

        report.stage(name, "checking numerics")
        with _Stage("run_failed", "running the model"):
            device = self._require_device()
            compiled = measure.TvmModel(executable, device)
            reference = measure.OrtModel.load(prepared.original)
            inputs = measure.make_inputs(prepared.inputs, self.config.measure.seed)
            input_names = [s.name for s in prepared.inputs]
            expected = reference.run(inputs)
            got = compiled.run(inputs, input_names)
        numerics = measure.compare_outputs(got, expected, reference.output_names, atol, rtol)
        result.numerics = numerics.as_dict()
        if not numerics.passed:
            raise ModelError("numerics_failed", numerics.message)

        report.stage(name, "measuring")
        m = self.config.measure
        with _Stage("run_failed", "measuring"):
            timing = dict(warmup=m.warmup, samples=m.samples, min_sample_ms=m.min_sample_ms, max_seconds=m.max_seconds)
            tvm_samples = measure.time_callable(compiled.timer(inputs, input_names), sync=compiled.sync, **timing)
            ort_samples = measure.time_callable(reference.timer(inputs), **timing)
        tvm_summary = summarize(tvm_samples)
        ort_summary = summarize(ort_samples)
        result.latency_ms = Latency(samples=[round(s, 6) for s in tvm_samples], **tvm_summary.as_dict())
        result.peer = {
            "onnxruntime_median_ms": ort_summary.median,
            "onnxruntime_samples": [round(s, 6) for s in ort_samples],
            "speedup": speedup(ort_summary.median, tvm_summary.median),
        }


def _relative(path: Path, root: Path) -> Path:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path


def _setup_file_logging(config: Config) -> None:
    log_dir = config.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_dir / "mlci.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def execute(config: Config, options: RunOptions, reporter: RunReporter) -> RunOutcome:
    """The whole command; raises ConfigError for problems that stop everything."""
    run_prepare(config)
    selected = [m for m in config.models if not options.models or m.name in options.models]
    unknown = sorted(set(options.models) - {m.name for m in config.models})
    if unknown:
        raise ConfigError(config.path, [f"--model {n}: no such model in models[].name" for n in unknown])
    check_model_files(dataclasses.replace(config, models=selected))  # only the models this run uses
    target = pick_target(config, options.target)
    _setup_file_logging(config)
    tuning.speed_up_tensor_intrin_import()

    runner = ModelRunner(config, target, options, reporter)
    results = Results(
        git=detect_git(config.root),
        target=TargetInfo(name=target.name, tvm_target=target.tvm_target, fingerprint=runner.fingerprint),
    )
    path = options.output or config.results_dir / f"{target.name}.json"
    for cfg in selected:
        results.models.append(runner.run(cfg))
        write_results(results, path)  # after every model: a crash later loses nothing

    outcome = RunOutcome(results, path)
    if options.tracking:
        outcome.tracking_error = log_to_mlflow(config, options, results, runner, reporter)
        write_results(results, path)  # now with the MLflow run ids
    return outcome


def log_to_mlflow(
    config: Config, options: RunOptions, results: Results, runner: ModelRunner, reporter: RunReporter
) -> str | None:
    from mlci.tracking import Tracker

    uri = options.tracking_uri or config.tracking_uri()
    try:
        tracker = Tracker(uri, config.tracking.experiment, artifact_root=config.state_dir / "mlartifacts")
        invocation = results.git.run_id or uuid.uuid4().hex[:12]
        for model in results.models:
            reporter.stage(model.name, "logging to MLflow")
            out_dir = runner.work_dir / model.name
            single = Results(git=results.git, target=results.target, models=[model],
                             created_at=results.created_at)
            results_json = write_results(single, out_dir / "results.json")
            model.mlflow_run_id = tracker.log_model(
                results,
                model,
                job_key=f"{invocation}/{results.git.commit or 'nocommit'}/{results.target.name}/{model.name}",
                params={
                    "trials_budget": model.tuning.get("trials_budget"),
                    "tune_seconds_budget": model.tuning.get("seconds_budget"),
                    "samples": config.measure.samples,
                },
                artifacts=[
                    (results_json, None),
                    (out_dir / "tuning_records.json", "tuning"),
                    (out_dir / f"{model.name}.so", "compiled"),
                ],
            )
            reporter.finish(model.name, model.status)
    except Exception as exc:  # tracking is best effort; the results file already holds everything
        log.error("MLflow logging failed:\n%s", traceback.format_exc())
        return f"MLflow logging to {uri} failed: {type(exc).__name__}: {exc}"
    return None
