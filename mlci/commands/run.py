"""`mlci run`: every model of the config through the pipeline on one target, then MLflow.

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
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlci import ab, emulation, interrupt, tracking
from mlci.actions import GitHubContext
from mlci.config import Config, ConfigError, ModelConfig, check_model_files, relative_to_root
from mlci.console import RunReporter
from mlci.gitinfo import detect_git, toplevel
from mlci.measure import TvmModel, use_threads
from mlci.pipeline import Compiled, Emulator, Evaluation, ModelSettings, Pipeline, run_prepare
from mlci.remote_cache import RemoteCache
from mlci.results import (
    CostInfo,
    GateSettings,
    Latency,
    ModelResult,
    Results,
    Status,
    TargetInfo,
    write_results,
)
from mlci.stats import cost_per_million, summarize
from mlci.targets import ResolvedTarget, environment_fingerprint, select_target
from mlci.tuning import TuningCache, cache_directory

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
    progressive: bool | None = None
    """Spend the trial budget anew on every run (see ModelSettings.progressive); None: only on a push
    or schedule to the default branch in GitHub Actions, so the cache pull requests read converges."""


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


class ModelRunner:
    """One target's pipeline, applied to each model, its evaluation turned into a ModelResult."""

    def __init__(self, config: Config, pipeline: Pipeline, options: RunOptions,
                 base: ab.BaseCheckout | None = None, cells: int = 1):
        self.config = config
        self.pipeline = pipeline
        self.options = options
        self.base_builds = ab.BaseBuilds(base, pipeline) if base is not None else None
        self.policy = ab.RemeasurePolicy.from_gate(config.gate, cells)
        self.work_dir = config.state_dir / "work" / pipeline.target.name
        target = config.targets.get(pipeline.target.name)
        self.price_per_hour = target.price_per_hour if target else None

    def run(self, cfg: ModelConfig, progress: RunReporter) -> ModelResult:
        settings = ModelSettings.resolve(self.config, cfg, trials=self.options.trials, seconds=self.options.tune_seconds,
                                         progressive=bool(self.options.progressive))
        policy = dataclasses.replace(self.policy, threshold=settings.threshold)
        base_record = None

        def base_model_for(head: Compiled) -> TvmModel | None:  # asked once the head is built and checked
            nonlocal base_record
            base_record, model = self.base_builds.build_for(cfg, settings, head)
            return model

        def slower(base: list[float], head: list[float]) -> bool:  # one build measured twice has no kernel to blame
            return not (base_record is not None and base_record.same_model) and policy.slower(base, head)

        evaluation = self.pipeline.evaluate(
            cfg, settings, self.config.measure,
            out_dir=self.work_dir / cfg.name,
            base_model_for=base_model_for if self.base_builds else None,
            settled=policy.settled, max_rounds=policy.max_rounds, profile_if=slower,
        )
        if self.base_builds is not None and base_record is None and evaluation.status not in (Status.OK, Status.NUMERICS_FAILED):
            # The head failed before A/B: whether the base builds here decides "stopped working" vs "already broken".
            base_record = self.base_builds.check_builds(cfg, settings, evaluation.status)
        result = model_result(cfg, self.config.root, settings, evaluation, self.price_per_hour)
        result.base = base_record
        if base_record is not None and evaluation.measured is not None and evaluation.measured.base_ms is not None:
            base_record.latency_ms = latency(evaluation.measured.base_ms)
            base_record.rounds = evaluation.measured.rounds
            base_record.profile = evaluation.measured.base_profile
        progress.finish(cfg.name, result.status)
        return result


def model_result(cfg: ModelConfig, root: Path, settings: ModelSettings, evaluation: Evaluation,
                 price_per_hour: float | None = None) -> ModelResult:
    """The results file's record of one model's evaluation."""
    compiled, checked, measured = evaluation.compiled, evaluation.checked, evaluation.measured
    result = ModelResult(
        name=cfg.name,
        path=str(relative_to_root(cfg.path, root)),
        sha256=compiled.prepared.sha256 if compiled.prepared else None,
        status=evaluation.status,
        error=evaluation.error,
        compile=compiled.compile_info(),
        tuning=compiled.tuning.info() if compiled.tuning else None,
        numerics=checked.numerics.info() if checked else None,
        latency_ms=latency(measured.tvm_ms) if measured else None,
        peer=measured.peer_info() if measured else None,
        threshold=settings.threshold,
        profile=measured.head_profile if measured else None,
    )
    if price_per_hour is not None and result.latency_ms is not None:
        result.cost = CostInfo(
            per_million_usd=cost_per_million(price_per_hour, result.latency_ms.median),
            onnxruntime_per_million_usd=cost_per_million(
                price_per_hour, result.peer.onnxruntime_median_ms if result.peer else None),
        )
    return result


def latency(samples: list[float]) -> Latency:
    return Latency(samples=[round(s, 6) for s in samples], **summarize(samples).as_dict())


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes: rich swaps it while progress bars
    are drawn, and lines written there appear above the bars."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - the base class's attribute
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_logging(config: Config) -> None:
    """mlci's log: everything from INFO on to .mlci/logs/mlci.log, warnings also on stderr (a
    damaged cache moved aside, a check that proves nothing): a user should not have to open the
    log file to learn them. Calling it again replaces the handlers it added."""
    for handler in [h for h in log.handlers if getattr(h, "mlci_run", False)]:
        log.removeHandler(handler)
        handler.close()
    log_dir = config.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_dir / "mlci.log")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_stderr = _Stderr()
    to_stderr.setLevel(logging.WARNING)
    to_stderr.setFormatter(logging.Formatter("warning: %(message)s"))
    for handler in (to_file, to_stderr):
        handler.mlci_run = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def remote_cache_for(config: Config, ctx: GitHubContext) -> RemoteCache | None:
    """The tuning cache's second level on S3 when one is configured (None: the local cache only). The
    run's trust tier (mlci.policy) says which tier it reads besides the shared one and whether it writes."""
    url = config.cache_url()
    if not url:
        return None
    tier, writes = ctx.trust.cache_tier(pr_writes=config.cache.pr_writes, local_writes=config.cache.local_writes)
    return RemoteCache(url, tier, writes=writes)


def _unusable_directory(directory: Path, writable: bool) -> str | None:
    """Why `directory` cannot serve (None when it can): a file in its place or on its path, or,
    when `writable`, no way to create it or write in it."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not writable:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".mlci-probe-"):
            pass
    except OSError as exc:
        return f"cannot write there ({exc.strerror or exc})"
    return None


def check_output_paths(config: Config, options: RunOptions) -> None:
    """Refuse, before any work, a results file, results or cache directory that cannot be used:
    finding out after every model is built and measured would throw that work away. A cache
    directory that exists but is read-only is fine (nothing may need writing)."""
    problems = []
    checks = [("results_dir", config.results_dir, True), ("cache_dir", config.cache_dir, False)]
    if options.output is not None:
        if options.output.is_dir():
            problems.append(f"--output {options.output}: is a directory; give a file path such as results.json")
        checks.append(("--output", options.output.parent, True))
    for what, directory, writable in checks:
        why = _unusable_directory(directory.resolve(), writable)
        if why:
            problems.append(f"{what} {directory}: {why}")
    if problems:
        raise ConfigError(config.path, problems)


def cross_tools(target: ResolvedTarget, config: Config) -> tuple[str | None, Emulator | None, str | None]:
    """For a target of another CPU architecture than this machine's: the compiler that links its
    libraries, the emulator that runs them, and why either is missing (None, None, None: a native target)."""
    try:
        toolchain = emulation.cross_toolchain(target.tvm_target)
    except emulation.EmulationError as exc:
        return None, None, str(exc)
    if toolchain is None:
        return None, None, None
    emulator = emulation.Emulator(toolchain, config.cache_dir / "emulation")
    try:  # before any model: a runtime that cannot be had (offline, no qemu) leaves numerics unchecked, said so
        toolchain.emulation_tools()
        emulator.runtime()
    except emulation.EmulationError as exc:
        return toolchain.cc, None, str(exc)
    return toolchain.cc, emulator, None


def select_models(config: Config, names: list[str]) -> list[ModelConfig]:
    """The models `--model` names (all of them when none is named); ConfigError for a name the config lacks."""
    unknown = sorted(set(names) - {m.name for m in config.models})
    if unknown:
        raise ConfigError(config.path, [f"--model {n}: no such model in models[].name" for n in unknown])
    return [m for m in config.models if not names or m.name in names]


def execute(config: Config, options: RunOptions, reporter: RunReporter) -> RunOutcome:
    """The whole command; raises ConfigError for problems that stop everything."""
    check_output_paths(config, options)
    run_prepare(config)
    selected = select_models(config, options.models)
    check_model_files(dataclasses.replace(config, models=selected))  # only the models this run uses
    target = select_target(config, options.target)
    setup_logging(config)

    ctx = GitHubContext.from_env()
    git = detect_git(config.root, ctx)
    if options.progressive is None:
        options = dataclasses.replace(options, progressive=ctx.trust.progressive)
    base_ref = options.base or git.base_commit or config.gate.base
    # Threads first: TVM sizes its pool once, and the fingerprint records what it reports.
    fingerprint = environment_fingerprint(target, threads=use_threads(target.threads))
    cache = TuningCache(cache_directory(config.cache_dir, target.name, fingerprint))
    cross_cc, emulator, emulation_problem = cross_tools(target, config)
    pipeline = Pipeline(target, cache, log_dir=config.state_dir / "logs" / "tuning" / target.name,
                        cross_cc=cross_cc, emulator=emulator, emulation_problem=emulation_problem,
                        progress=reporter, root=config.root, remote=remote_cache_for(config, ctx))
    with contextlib.ExitStack() as stack:
        base = None
        if base_ref:
            base = stack.enter_context(ab.base_checkout(config, base_ref))
            git.base_commit = base.commit
        runner = ModelRunner(config, pipeline, options, base=base, cells=len(selected))
        cache_before = pipeline.cache.state()
        results = Results(
            git=git,
            target=TargetInfo(name=target.name, tvm_target=target.tvm_target, fingerprint=fingerprint,
                              price_per_hour=runner.price_per_hour, execution=pipeline.execution,
                              execution_note=pipeline.execution_note),
            config=_config_key(config),
            base_ref=base_ref,
            removed_models=base.removed_models(config) if base and not options.models else [],
            gate=GateSettings(threshold=config.gate.threshold, fail_on=config.gate.fail_on,
                              confidence=config.gate.confidence),
        )
        path = options.output or config.results_dir / f"{target.name}.json"
        try:
            for cfg in selected:
                results.models.append(runner.run(cfg, reporter))
                write_results(results, path)  # after every model: a crash later loses nothing
        except interrupt.Interrupted as stop:
            # What finished stays as it was; the rest is interrupted, neither a regression nor a failure.
            results.interrupted = (f"mlci run was stopped by {stop} after {len(results.models)} of "
                                   f"{len(selected)} model(s)")
            results.models += [
                ModelResult(name=m.name, path=str(relative_to_root(m.path, config.root)), status=Status.INTERRUPTED,
                            error=f"stopped by {stop} before it finished",
                            threshold=m.threshold if m.threshold is not None else config.gate.threshold)
                for m in selected[len(results.models):]]
            write_results(results, path)
            raise

    outcome = RunOutcome(results, path, cache_changed=pipeline.cache.state() != cache_before)
    if options.tracking:
        outcome.tracking_error = tracking.log_results(
            results, path,
            uri=options.tracking_uri or config.tracking_uri(),
            experiment=config.tracking.experiment,
            artifact_root=config.state_dir / "mlartifacts",
            artifacts_dir=runner.work_dir,
            params={"samples": config.measure.samples},
            progress=reporter,
            register=config.tracking.register if ctx.trust.may_register else False,
        )
        write_results(results, path)  # now with the MLflow run ids and history baselines
    return outcome


def _config_key(config: Config) -> str:
    """The config's path relative to the repository's top level (its directory when not in git)."""
    top = toplevel(config.root) or config.root
    return str(relative_to_root(config.path, top).as_posix())


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
