"""`mlci run`: per model, on one target: load, import, tune, compile, check, benchmark, log.

With a base ref (A/B), each model's version at the merge-base is built too, from
a temporary worktree, with the same target and tuning cache, and both are
measured interleaved in this process; `mlci compare` decides from the samples.

A model that fails at any stage gets its status and message and the next
model runs. The results file is rewritten after every model, and fully written
before MLflow is contacted, so nothing computed is lost to a tracking outage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import subprocess
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci import compile as tvm_compile
from mlci import gitinfo, measure, tuning
from mlci.config import Config, ConfigError, ModelConfig, check_model_files, load_config
from mlci.console import RunReporter
from mlci.gitinfo import detect_git
from mlci.models import ModelError, prepare_model
from mlci.results import Baseline, Latency, ModelResult, Results, TargetInfo, write_results
from mlci.stats import cell_confidence, classify, median_ratio_ci, speedup, summarize
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
    base: str | None = None
    """Git ref to A/B against (resolved to the merge-base with HEAD)."""


@dataclass
class RunOutcome:
    results: Results
    results_path: Path
    tracking_error: str | None = None
    cache_changed: bool = False
    """The tuning cache gained records (the action saves it only then)."""

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

    def __init__(
        self,
        config: Config,
        target: ResolvedTarget,
        options: RunOptions,
        reporter: RunReporter,
        base: BaseCheckout | None = None,
        cells: int = 1,
    ):
        self.config = config
        self.base = base
        # Bonferroni over this job's models, for the re-measure decision (compare redoes it
        # over the whole matrix).
        self.cell_confidence = cell_confidence(cells, config.gate.confidence)
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
            if self.base is not None and result.base is None and result.status != "numerics_failed":
                self._base_builds(cfg, result)
        self.reporter.finish(cfg.name, result.status)
        return result

    def _budget(self, cfg: ModelConfig) -> tuple[int, float]:
        trials = self.options.trials if self.options.trials is not None else (
            cfg.trials if cfg.trials is not None else self.config.tuning.trials
        )
        return trials, self.options.tune_seconds or cfg.seconds or self.config.tuning.seconds

    def _build(self, cfg: ModelConfig, label: str, result: ModelResult | None) -> Built:
        """Load, import, tune (incrementally, through the shared cache) and compile one model.
        `result` (the head's) receives the stage details; the base build passes None."""
        report = self.reporter
        name = cfg.name
        budget_trials, budget_seconds = self._budget(cfg)
        out_dir = self.work_dir / (name if result is not None else f"{name}.base")

        report.stage(name, f"loading{label}")
        with _Stage("import_failed", "loading the model"):
            prepared = prepare_model(cfg)
        if result is not None:
            result.sha256 = prepared.sha256

        report.stage(name, f"importing{label}")
        start = time.monotonic()
        with _Stage("import_failed", "importing into Relax"):
            mod = tvm_compile.import_relax(prepared)
            fused = tvm_compile.fuse_for_tuning(mod, self.tvm_target)
            kernels = tuning.extract_kernels(fused, self.tvm_target)
        import_seconds = time.monotonic() - start

        if not self._device().exist:
            budget_trials = 0  # candidates cannot be measured here; compile with what is cached
        report.stage(name, f"tuning{label}")
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
            if result is not None:
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
            if result is not None:
                self.cache.export_records(kernels, out_dir / "tuning_records.json")

        report.stage(name, f"compiling{label}")
        start = time.monotonic()
        with _Stage("compile_failed", "compiling"):
            executable = tvm_compile.build(mod, self.tvm_target, self.cache.database)
            if result is not None:
                tvm_compile.export_library(executable, out_dir / f"{name}.so")
        if result is not None:
            result.compile = {
                "seconds": round(time.monotonic() - start, 3),
                "import_seconds": round(import_seconds, 3),
                "kernels": len(kernels),
            }
        return Built(prepared, executable)

    def _run(self, cfg: ModelConfig, result: ModelResult) -> None:
        report = self.reporter
        name = cfg.name
        atol = cfg.atol if cfg.atol is not None else self.config.numerics.atol
        rtol = cfg.rtol if cfg.rtol is not None else self.config.numerics.rtol
        result.threshold = cfg.threshold if cfg.threshold is not None else self.config.gate.threshold

        head = self._build(cfg, "", result)

        report.stage(name, "checking numerics")
        with _Stage("run_failed", "running the model"):
            device = self._require_device()
            compiled = measure.TvmModel(head.executable, device)
            reference = measure.OrtModel.load(head.prepared.original)
            inputs = measure.make_inputs(head.prepared.inputs, self.config.measure.seed)
            input_names = [s.name for s in head.prepared.inputs]
            expected = reference.run(inputs)
            got = compiled.run(inputs, input_names)
        numerics = measure.compare_outputs(got, expected, reference.output_names, atol, rtol)
        result.numerics = numerics.as_dict()
        if not numerics.passed:
            raise ModelError("numerics_failed", numerics.message)

        base_model = self._base(cfg, head, result) if self.base is not None else None

        report.stage(name, "measuring")
        m = self.config.measure
        timing = dict(warmup=m.warmup, samples=m.samples, min_sample_ms=m.min_sample_ms, max_seconds=m.max_seconds)
        with _Stage("run_failed", "measuring"):
            head_timer = compiled.timer(inputs, input_names)
            if base_model is not None:
                base_timer = base_model.timer(inputs, input_names)
                tvm_samples = self._measure_ab(name, base_timer, head_timer, compiled.sync, result)
            else:
                tvm_samples = measure.time_callable(head_timer, sync=compiled.sync, **timing)
            ort_samples = measure.time_callable(reference.timer(inputs), **timing)
        tvm_summary = summarize(tvm_samples)
        ort_summary = summarize(ort_samples)
        result.latency_ms = _latency(tvm_samples)
        result.peer = {
            "onnxruntime_median_ms": ort_summary.median,
            "onnxruntime_samples": [round(s, 6) for s in ort_samples],
            "speedup": speedup(ort_summary.median, tvm_summary.median),
        }

    def _new_baseline(self, cfg: ModelConfig, result: ModelResult) -> ModelConfig | None:
        """Attach the base record to `result`; the base model's config when there is a base
        model to build, None when there is none (missing file, failed base `prepare`)."""
        assert self.base is not None
        base_cfg = self.base.model(cfg)
        result.base = Baseline(commit=self.base.commit, path=str(_relative(base_cfg.path, self.base.root)))
        if self.base.error:
            result.base.status, result.base.error = "import_failed", self.base.error
            return None
        if not base_cfg.path.is_file():
            result.base.status, result.base.path = "missing", None
            return None
        return base_cfg

    def _base(self, cfg: ModelConfig, head: Built, result: ModelResult) -> measure.TvmModel | None:
        """Build the base commit's version of the model; record why when there is none."""
        base_cfg = self._new_baseline(cfg, result)
        if base_cfg is None:
            return None
        baseline = result.base
        assert baseline is not None
        try:
            with _Stage("import_failed", "loading the base model"):
                prepared = prepare_model(base_cfg)
            baseline.sha256 = prepared.sha256
            baseline.same_model = prepared.sha256 == head.prepared.sha256
            # The same bytes build the same code from the same cache: reuse the head's build.
            built = head if baseline.same_model else self._build(base_cfg, " base", None)
            with _Stage("run_failed", "loading the base model"):
                return measure.TvmModel(built.executable, self._require_device())
        except ModelError as exc:
            baseline.status, baseline.error = str(exc.status), str(exc)
            return None

    def _base_builds(self, cfg: ModelConfig, result: ModelResult) -> None:
        """The head failed to build or run: did the base build here? That decides whether
        the target *stopped* working (fails the build) or was already broken."""
        base_cfg = self._new_baseline(cfg, result)
        if base_cfg is None:
            return
        try:
            self._build(base_cfg, " base", None)
            if result.status == "run_failed":
                self._require_device()
        except ModelError as exc:
            assert result.base is not None
            result.base.status, result.base.error = str(exc.status), str(exc)

    def _measure_ab(self, name: str, base_timer: Any, head_timer: Any, sync: Any, result: ModelResult) -> list[float]:
        """Interleaved A/B rounds; a cell that is inconclusive or flagged after a round is
        measured again (up to gate.remeasure extra rounds) before anyone decides."""
        m = self.config.measure
        threshold = result.threshold or self.config.gate.threshold

        def settled(base: list[float], head: list[float]) -> bool:
            estimate = median_ratio_ci(base, head, paired=True, confidence=self.cell_confidence)
            return classify(estimate, threshold) == "unchanged"

        def on_round(n: int) -> None:
            if n:
                self.reporter.stage(name, f"re-measuring (round {n + 1})")

        base_samples, head_samples, rounds = measure.measure_ab(
            base_timer, head_timer, settled=settled, max_rounds=1 + self.config.gate.remeasure, on_round=on_round,
            warmup=m.warmup, samples=m.samples, min_sample_ms=m.min_sample_ms, max_seconds=m.max_seconds, sync=sync,
        )
        assert result.base is not None
        result.base.rounds = rounds
        result.base.latency_ms = _latency(base_samples)
        return head_samples


@dataclass
class Built:
    prepared: Any
    executable: Any


@dataclass
class BaseCheckout:
    """The base commit's tree, for A/B: model files are looked up at the same place."""

    commit: str
    root: Path
    """The worktree's directory that corresponds to the head config's directory."""
    head_root: Path
    error: str | None = None
    """Set when the base tree could not be prepared (its `prepare` failed)."""

    def model(self, cfg: ModelConfig) -> ModelConfig:
        try:
            rel = cfg.path.resolve().relative_to(self.head_root.resolve())
        except ValueError:
            return cfg  # outside the repository: the same file at both commits
        return dataclasses.replace(cfg, path=self.root / rel)


def _latency(samples: list[float]) -> Latency:
    return Latency(samples=[round(s, 6) for s in samples], **summarize(samples).as_dict())


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

    git = detect_git(config.root)
    base_ref = options.base or git.base_commit or config.gate.base
    with contextlib.ExitStack() as stack:
        base = None
        if base_ref:
            base = stack.enter_context(_base_checkout(config, base_ref))
            git.base_commit = base.commit
        runner = ModelRunner(config, target, options, reporter, base=base, cells=len(selected))
        cache_before = runner.cache.state()
        results = Results(
            git=git,
            target=TargetInfo(name=target.name, tvm_target=target.tvm_target, fingerprint=runner.fingerprint),
            base_ref=base_ref,
            removed_models=_removed_models(config, base) if base and not options.models else [],
            gate={"threshold": config.gate.threshold, "fail_on": config.gate.fail_on,
                  "confidence": config.gate.confidence},
        )
        path = options.output or config.results_dir / f"{target.name}.json"
        for cfg in selected:
            results.models.append(runner.run(cfg))
            write_results(results, path)  # after every model: a crash later loses nothing

    outcome = RunOutcome(results, path, cache_changed=runner.cache.state() != cache_before)
    if options.tracking:
        outcome.tracking_error = log_to_mlflow(config, options, results, runner, reporter, path)
        write_results(results, path)  # now with the MLflow run ids and history baselines
    return outcome


def run_outputs(outcome: RunOutcome) -> dict[str, str]:
    """Step outputs of `mlci run` in GitHub Actions (the action saves the tuning cache only when it changed)."""
    models = outcome.results.models
    return {
        "results-path": str(outcome.results_path),
        "target": outcome.results.target.name,
        "models": str(len(models)),
        "failures": str(sum(1 for m in models if not m.ok)),
        "cache-changed": "true" if outcome.cache_changed else "false",
    }


@contextlib.contextmanager
def _base_checkout(config: Config, ref: str) -> Iterator[BaseCheckout]:
    """The base commit in a temporary worktree, its `prepare` run there (exported models
    must be exported from the base's code too)."""
    try:
        commit = gitinfo.resolve_base(config.root, ref)
        top = gitinfo.toplevel(config.root)
        if top is None:
            raise gitinfo.BaseRefError(f"{config.root} is not in a git repository; A/B needs one")
        with gitinfo.checkout(top, commit) as tree:
            base = BaseCheckout(commit=commit, root=tree / config.root.resolve().relative_to(top.resolve()),
                                head_root=config.root)
            if config.prepare:
                try:
                    run_prepare(dataclasses.replace(config, root=base.root))
                except ConfigError as exc:
                    base.error = f"at the base commit {commit[:12]}: " + "; ".join(exc.problems)
            yield base
    except gitinfo.BaseRefError as exc:
        raise ConfigError(config.path, [f"base: {exc}"]) from None


def _removed_models(config: Config, base: BaseCheckout) -> list[str]:
    """Models the base commit's config lists and the head's does not."""
    base_config = base.root / config.path.name
    if not base_config.is_file():
        return []
    try:
        names = {m.name for m in load_config(base_config).models}
    except ConfigError as exc:
        log.warning("cannot read the base commit's config: %s", exc)
        return []
    return sorted(names - {m.name for m in config.models})


def log_to_mlflow(
    config: Config, options: RunOptions, results: Results, runner: ModelRunner, reporter: RunReporter, path: Path
) -> str | None:
    """Look up each model's history baseline, then log this run (history first, so a run
    never finds itself)."""
    from mlci.tracking import Tracker

    uri = options.tracking_uri or config.tracking_uri()
    try:
        tracker = Tracker(uri, config.tracking.experiment, artifact_root=config.state_dir / "mlartifacts")
        git = results.git
        for model in results.models:
            reporter.stage(model.name, "reading MLflow history")
            model.history = tracker.history(
                model.name, results.target.name, results.target.fingerprint,
                base_commit=git.base_commit, default_branch=git.default_branch, exclude_commit=git.commit,
            )
        write_results(results, path)
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
            model.mlflow_url = tracker.run_url(model.mlflow_run_id)
            reporter.finish(model.name, model.status)
    except Exception as exc:  # tracking is best effort; the results file already holds everything
        log.error("MLflow logging failed:\n%s", traceback.format_exc())
        return f"MLflow logging to {uri} failed: {type(exc).__name__}: {exc}"
    return None
