"""`mlci tune --shard K/N`: one of N jobs that together tune every kernel of a run once.

Every shard loads and imports every model, plans each model's budget as an unsharded run would
(`budget.allocate_trials`), and assigns the run's kernels to shards by that plan
(`budget.assign_shards`): the same assignment in every job, with no coordination. It then searches
only its own kernels, non-progressively, and writes their records to the shared tuning cache on
S3, where the run's `mlci run` jobs find them: they search nothing the shards searched. Nothing is
built, checked or measured here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from mlci import remote_cache
from mlci.actions import GitHubContext
from mlci.budget import ShardKernel, allocate_trials, assign_shards
from mlci.commands.run import RunOptions, check_output_paths, remote_cache_for, select_models, setup_logging
from mlci.config import Config, check_model_files
from mlci.console import RunReporter
from mlci.measure import use_threads
from mlci.models import ModelError
from mlci.pipeline import Imported, ModelSettings, Pipeline, run_prepare, target_device
from mlci.remote_cache import RemoteCache
from mlci.targets import environment_fingerprint, select_target
from mlci.tuning import TuningCache, cache_directory

log = logging.getLogger("mlci")


class ShardError(Exception):
    """A --shard that names no shard, or sharding that could not work (no shared cache)."""


@dataclass(frozen=True)
class Shard:
    index: int
    """1..count."""
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """'K/N' with 1 <= K <= N."""
        match = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text)
        if not match:
            raise ShardError(f"--shard {text!r}: expected K/N, e.g. 1/4 (this job is shard K of N)")
        index, count = int(match.group(1)), int(match.group(2))
        if count < 1 or not 1 <= index <= count:
            raise ShardError(f"--shard {text!r}: K must be between 1 and N (N at least 1), e.g. 1/{max(count, 2)}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass
class TuneOptions:
    shard: Shard = Shard(1, 1)
    target: str | None = None
    models: list[str] = field(default_factory=list)
    trials: int | None = None
    tune_seconds: float | None = None


@dataclass
class ShardKernelResult:
    """One kernel this shard owns."""

    key: str
    name: str
    model: str
    """The first model (config order) it is a kernel of."""
    planned: int
    """Trials the unsharded plan gives it."""
    searched: int = 0
    """Trials measured for it by this job (0 when the caches already held its plan)."""


@dataclass
class ModelShardResult:
    name: str
    status: str = "ok"
    error: str | None = None
    kernels: int = 0
    """All of the model's kernels."""
    kernels_assigned: int = 0
    """Those this shard owns."""
    trials_searched: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class TuneOutcome:
    shard: Shard
    target: str
    cache_dir: Path
    report_path: Path
    models: list[ModelShardResult] = field(default_factory=list)
    kernels: list[ShardKernelResult] = field(default_factory=list)
    kernels_in_run: int = 0
    """Distinct kernels over every model that imported, across all shards."""
    pulled: int = 0
    """Kernels whose records came from S3 before searching."""
    pushed: int | None = None
    """Entries written to S3 (None: not pushed yet, or no shared cache)."""
    remote_url: str | None = None
    remote_error: str | None = None
    """Why S3 was given up on (the records stayed local)."""
    seconds: float = 0.0

    @property
    def all_ok(self) -> bool:
        return all(m.ok for m in self.models)

    def report(self) -> dict[str, Any]:
        return {
            "shard": str(self.shard), "index": self.shard.index, "count": self.shard.count,
            "target": self.target, "cache": self.cache_dir.name,
            "kernels_in_run": self.kernels_in_run,
            "kernels": [dataclasses.asdict(k) for k in self.kernels],
            "models": [dataclasses.asdict(m) for m in self.models],
            "trials_searched": sum(k.searched for k in self.kernels),
            "seconds": round(self.seconds, 3),
            "remote": self.remote_url, "pulled": self.pulled, "pushed": self.pushed,
            "remote_error": self.remote_error,
        }


def report_path(config: Config, target: str, shard: Shard) -> Path:
    return config.results_dir / f"tune-{target}-shard{shard.index}-of-{shard.count}.json"


def write_report(outcome: TuneOutcome) -> None:
    outcome.report_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = outcome.report_path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(outcome.report(), indent=2) + "\n")
    temporary.replace(outcome.report_path)


def shared_remote(config: Config, shard: Shard) -> RemoteCache | None:
    """The shared cache this job reads and writes; raises ShardError when there are several shards
    and their records could not meet (no shared cache, or one this run may not write)."""
    ctx = GitHubContext.from_env()
    remote = remote_cache_for(config, ctx)
    if shard.count > 1 and remote is None:
        raise ShardError(
            f"--shard {shard}: no shared tuning cache is configured ([cache] url in {config.path}, or "
            "MLCI_CACHE_URL): each shard's records would stay on its own runner and never meet")
    if shard.count > 1 and remote is not None and not remote.writes:
        trust = ctx.trust
        why = {"pull-request": f"[cache] pr_writes = false in {config.path}",
               "local": f"[cache] local_writes = false in {config.path}"}.get(trust.tier, f"a {trust.tier} run: {trust.reason}")
        raise ShardError(
            f"--shard {shard}: this run may not write the shared tuning cache (tier {remote.tier!r}; {why}), "
            "so the shards' records would never meet")
    return remote


def plan_kernels(imported: list[tuple[Imported, ModelSettings]]) -> list[ShardKernel]:
    """Every kernel of the run with the trials the unsharded plan gives it."""
    kernels = []
    for model, settings in imported:
        planned = allocate_trials([k.cost for k in model.kernels], settings.trials, settings.trials_per_round)
        kernels += [ShardKernel(k.key, p, tie=k.key) for k, p in zip(model.kernels, planned)]
    return kernels


def execute(config: Config, options: TuneOptions, reporter: RunReporter) -> TuneOutcome:
    """The whole command; raises ConfigError or ShardError for problems that stop everything."""
    start = time.monotonic()
    shard = options.shard
    check_output_paths(config, RunOptions())
    remote = shared_remote(config, shard)  # before any work: without it sharding is pointless
    selected = select_models(config, options.models)
    run_prepare(config)
    check_model_files(dataclasses.replace(config, models=selected))
    target = select_target(config, options.target)
    if not target_device(target).exist:  # a shard times candidates: without the hardware it would search nothing
        raise ShardError(f"target {target.name!r} needs a {target.kind} device to time tuning candidates on, and "
                         "none is visible on this machine: run its shards on the target's runners")
    setup_logging(config)

    fingerprint = environment_fingerprint(target, threads=use_threads(target.threads))
    cache = TuningCache(cache_directory(config.cache_dir, target.name, fingerprint))
    pipeline = Pipeline(target, cache, log_dir=config.state_dir / "logs" / "tuning" / target.name,
                        progress=reporter, root=config.root)
    outcome = TuneOutcome(shard=shard, target=target.name, cache_dir=cache.dir,
                          report_path=report_path(config, target.name, shard),
                          remote_url=remote.url if remote else None)

    imported: list[tuple[Imported, ModelSettings]] = []
    results: dict[str, ModelShardResult] = {}
    for cfg in selected:
        result = results[cfg.name] = ModelShardResult(cfg.name)
        outcome.models.append(result)
        settings = ModelSettings.resolve(config, cfg, trials=options.trials, seconds=options.tune_seconds,
                                         progressive=False)
        try:
            model = pipeline.load_and_import(cfg)
        except ModelError as exc:
            result.status, result.error = str(exc.status), str(exc)
            reporter.finish(cfg.name, result.status)
            continue
        result.kernels = len(model.kernels)
        imported.append((model, settings))

    assignment = assign_shards(plan_kernels(imported), shard.count)
    outcome.kernels_in_run = len(assignment)
    mine = frozenset(key for key, owner in assignment.items() if owner == shard.index)
    owned: dict[str, ShardKernelResult] = {}
    for model, settings in imported:
        planned = allocate_trials([k.cost for k in model.kernels], settings.trials, settings.trials_per_round)
        for kernel, trials in zip(model.kernels, planned):
            if kernel.key in mine:
                known = owned.setdefault(kernel.key, ShardKernelResult(kernel.key, kernel.name, model.prepared.name, 0))
                known.planned = max(known.planned, trials)
    outcome.kernels = list(owned.values())
    my_kernels = list({k.key: k for model, _ in imported for k in model.kernels if k.key in mine}.values())

    before = None
    if remote is not None and my_kernels:  # what any runner searched already is not searched again
        with cache.lock():
            outcome.pulled = len(remote_cache.pull(cache, my_kernels, remote).kernels_from_remote)
            before = cache.ledger()

    for model, settings in imported:
        result = results[model.prepared.name]
        keys = {k.key for k in model.kernels} & mine
        result.kernels_assigned = len(keys)
        if not keys:
            reporter.stage(result.name, "no kernel of this shard")
            reporter.finish(result.name, result.status)
            continue
        started = time.monotonic()
        try:
            tuned = pipeline.tune(model, settings, only=keys)
            error = pipeline.no_candidate_ran(tuned)
            if error is not None:
                raise error
        except ModelError as exc:
            result.status, result.error = str(exc.status), str(exc)
        else:
            for key, trials in tuned.searched.items():
                owned[key].searched += trials
            result.trials_searched = sum(tuned.searched.values())
        result.seconds = round(time.monotonic() - started, 3)
        outcome.seconds = time.monotonic() - start
        write_report(outcome)  # before anything is sent: what was searched is known even if S3 hangs
        if remote is not None and before is not None:
            # After each model, not once at the end: a shard killed later (a timeout, expired credentials)
            # leaves what it finished on S3 for the bench job.
            mine_here = [k for k in model.kernels if k.key in keys]
            outcome.pushed = (outcome.pushed or 0) + len(remote_cache.push(cache, mine_here, remote, before))
            with cache.lock():
                before = {**before, **{k: v for k, v in cache.ledger().items() if k in keys}}
        reporter.finish(result.name, result.status)

    outcome.seconds = time.monotonic() - start
    if remote is not None:
        outcome.pushed, outcome.remote_error = outcome.pushed or 0, remote.failed
    write_report(outcome)
    return outcome


def shard_table(outcome: TuneOutcome) -> Table:
    """Per model: kernels this shard owns of its kernels, trials searched, seconds."""
    table = Table(title=f"mlci tune: target {escape(outcome.target)}, shard {outcome.shard}",
                  title_justify="left")
    table.add_column("model")
    table.add_column("kernels assigned", justify="right")
    table.add_column("trials searched", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("status")
    for model in outcome.models:
        status = "[green]ok[/green]" if model.ok else f"[red]{escape(model.status)}[/red]"
        table.add_row(escape(model.name), f"{model.kernels_assigned}/{model.kernels}", str(model.trials_searched),
                      f"{model.seconds:.1f}", status)
    return table


def tune_outputs(outcome: TuneOutcome) -> dict[str, str]:
    """Step outputs of `mlci tune` in GitHub Actions."""
    return {
        "tune-report": str(outcome.report_path),
        "shard": str(outcome.shard),
        "kernels": str(len(outcome.kernels)),
        "trials-searched": str(sum(k.searched for k in outcome.kernels)),
        "pushed": str(outcome.pushed or 0),
        "failures": str(sum(1 for m in outcome.models if not m.ok)),
    }
