"""A/B against the base commit: its tree, its builds, and when to measure again.

With a base ref, `mlci run` checks the merge-base out into a temporary git
worktree (running the config's `prepare` there too: exported models must come
from the base's code), builds each model's base version with the same target
and tuning cache, and measures it interleaved with the head. A cell whose
samples do not yet decide (inconclusive, or flagged) is measured again, up to
``[gate].remeasure`` more rounds, before anyone decides: `RemeasurePolicy`, which
`bench/gate_power.py` uses too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlci import gitinfo, measure
from mlci.config import Config, ConfigError, GateConfig, ModelConfig, load_config, relative_to_root
from mlci.models import ModelError
from mlci.pipeline import Compiled, ModelSettings, Pipeline, run_prepare
from mlci.results import Baseline, BaseStatus, Status, Verdict
from mlci.stats import cell_confidence, classify, median_ratio_ci

log = logging.getLogger("mlci")


@dataclass(frozen=True)
class RemeasurePolicy:
    """When an A/B cell's samples are enough to decide."""

    threshold: float
    confidence: float
    """Per cell: Bonferroni over the cells this job measures (`mlci compare` redoes it over the matrix)."""
    max_rounds: int

    @classmethod
    def from_gate(cls, gate: GateConfig, cells: int, threshold: float | None = None) -> RemeasurePolicy:
        return cls(threshold if threshold is not None else gate.threshold,
                   cell_confidence(cells, gate.confidence), 1 + gate.remeasure)

    def settled(self, base: list[float], head: list[float]) -> bool:
        """Only an `unchanged` interval is settled: an inconclusive or flagged cell gets more data."""
        return self.verdict(base, head) == Verdict.UNCHANGED

    def slower(self, base: list[float], head: list[float]) -> bool:
        """The gate's own rule says regression: worth timing each kernel to say which ones grew."""
        return self.verdict(base, head) == Verdict.REGRESSION

    def verdict(self, base: list[float], head: list[float]) -> Verdict:
        return classify(median_ratio_ci(base, head, paired=True, confidence=self.confidence), self.threshold)


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

    def removed_models(self, config: Config) -> list[str]:
        """Models the base commit's config lists and the head's does not."""
        base_config = self.root / config.path.name
        if not base_config.is_file():
            return []
        try:
            names = {m.name for m in load_config(base_config).models}
        except ConfigError as exc:
            log.warning("cannot read the base commit's config: %s", exc)
            return []
        return sorted(names - {m.name for m in config.models})


@contextlib.contextmanager
def base_checkout(config: Config, ref: str) -> Iterator[BaseCheckout]:
    """The merge-base of `ref` and HEAD in a temporary worktree, its `prepare` run there."""
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


class BaseBuilds:
    """Each model's base-commit build, through the same pipeline (target, tuning cache) as the head's."""

    def __init__(self, checkout: BaseCheckout, pipeline: Pipeline):
        self.checkout = checkout
        self.pipeline = pipeline

    def baseline(self, cfg: ModelConfig) -> tuple[Baseline, ModelConfig | None]:
        """The base record of a model, and its base config when there is a model to build
        (None when the file is missing at the base commit or its `prepare` failed)."""
        base_cfg = self.checkout.model(cfg)
        baseline = Baseline(commit=self.checkout.commit, path=str(relative_to_root(base_cfg.path, self.checkout.root)))
        if self.checkout.error:
            baseline.status, baseline.error = BaseStatus.IMPORT_FAILED, self.checkout.error
            return baseline, None
        if not base_cfg.path.is_file():
            baseline.status, baseline.path = BaseStatus.MISSING, None
            return baseline, None
        return baseline, base_cfg

    def build_for(self, cfg: ModelConfig, settings: ModelSettings,
                  head: Compiled) -> tuple[Baseline, measure.TvmModel | None]:
        """The base record, and the base build loaded on the device to measure against the head
        (None, the reason in the record, when there is none)."""
        baseline, base_cfg = self.baseline(cfg)
        if base_cfg is None:
            return baseline, None
        try:
            built = self.pipeline.compile(base_cfg, settings, " base", same_as=head)
            baseline.same_model = built is head
            baseline.sha256 = built.prepared.sha256 if built.prepared else None
            return baseline, self.pipeline.load_on_device(built)
        except ModelError as exc:
            if exc.partial is not None and exc.partial.prepared is not None:
                baseline.sha256 = exc.partial.prepared.sha256
            baseline.status, baseline.error = BaseStatus(exc.status), str(exc)
            return baseline, None

    def check_builds(self, cfg: ModelConfig, settings: ModelSettings, head_status: Status) -> Baseline:
        """The head failed to build or run: did the base build here? That decides whether the
        target *stopped* working (fails the build) or was already broken."""
        baseline, base_cfg = self.baseline(cfg)
        if base_cfg is None:
            return baseline
        try:
            self.pipeline.compile(base_cfg, settings, " base")
            if head_status == Status.RUN_FAILED:
                self.pipeline.require_device()
        except ModelError as exc:
            baseline.status, baseline.error = BaseStatus(exc.status), str(exc)
        return baseline
