"""The results file: the one contract between `mlci run` and `mlci compare`.

Versioned by its ``schema`` string. A reader refuses a schema it does not know
rather than guessing. Written atomically, before anything is sent anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci import __version__

SCHEMA = "mlci.results/1"
STATUSES = ("ok", "import_failed", "compile_failed", "tune_failed", "numerics_failed", "run_failed")


class ResultsError(Exception):
    pass


@dataclass
class GitInfo:
    commit: str | None = None
    branch: str | None = None
    base_commit: str | None = None
    pr: int | None = None
    repository: str | None = None
    run_id: str | None = None
    default_branch: str | None = None


@dataclass
class TargetInfo:
    name: str
    tvm_target: dict[str, Any]
    fingerprint: dict[str, Any]


@dataclass
class Latency:
    samples: list[float]
    median: float
    mean: float
    std: float
    min: float
    p90: float
    n: int


@dataclass
class Baseline:
    """The same model built from the base commit and measured interleaved with the head
    (A/B in one process): sample i of each side comes from the same moment."""

    commit: str
    path: str | None = None
    sha256: str | None = None
    status: str = "ok"
    """``ok``, ``missing`` (no such file at the base commit) or one of STATUSES."""
    error: str | None = None
    latency_ms: Latency | None = None
    """Paired with the head's ``latency_ms``: sample i of each was taken in the same block."""
    rounds: int = 0
    """Measuring rounds; more than one when an inconclusive or flagged cell was re-measured."""
    same_model: bool = False


@dataclass
class History:
    """The MLflow baseline: this model x target on the merge-base or default branch."""

    commit: str | None
    branch: str | None
    run_id: str
    created_at: str | None = None
    fingerprint: str | None = None
    fingerprint_match: bool = True
    fingerprint_diff: dict[str, list[Any]] = field(default_factory=dict)
    """key -> [baseline value, this run's value] for every differing fingerprint entry."""
    latency_ms: Latency | None = None
    trend: list[dict[str, Any]] = field(default_factory=list)
    """Recent default-branch runs, oldest first: {commit, median, created_at}."""


@dataclass
class ModelResult:
    name: str
    path: str
    sha256: str | None = None
    status: str = "ok"
    error: str | None = None
    compile: dict[str, Any] = field(default_factory=dict)
    tuning: dict[str, Any] = field(default_factory=dict)
    numerics: dict[str, Any] = field(default_factory=dict)
    latency_ms: Latency | None = None
    """With an A/B base: the head's interleaved samples, paired index by index with base.latency_ms."""
    peer: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    mlflow_url: str | None = None
    threshold: float | None = None
    """Relative change that counts as a regression or improvement (from the config)."""
    base: Baseline | None = None
    history: History | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Results:
    git: GitInfo
    target: TargetInfo
    models: list[ModelResult] = field(default_factory=list)
    base_ref: str | None = None
    """The ref A/B compared against (resolved to git.base_commit, the merge-base)."""
    removed_models: list[str] = field(default_factory=list)
    """Models configured at the base commit that the head no longer has."""
    gate: dict[str, Any] = field(default_factory=dict)
    """The config's gate settings (threshold, fail_on, confidence) for `mlci compare`."""
    schema: str = SCHEMA
    mlci_version: str = __version__
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Results:
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ResultsError(f"unsupported results schema {schema!r} (this mlci reads {SCHEMA!r})")
        try:
            models = [_model_from_dict(m) for m in data["models"]]
            return cls(
                git=GitInfo(**data["git"]),
                target=TargetInfo(**data["target"]),
                models=models,
                base_ref=data.get("base_ref"),
                removed_models=list(data.get("removed_models") or []),
                gate=dict(data.get("gate") or {}),
                schema=schema,
                mlci_version=data["mlci_version"],
                created_at=data["created_at"],
            )
        except (KeyError, TypeError) as exc:
            raise ResultsError(f"malformed results file: {exc}") from None


def _latency(data: dict[str, Any] | None) -> Latency | None:
    return Latency(**data) if data else None


def _model_from_dict(data: dict[str, Any]) -> ModelResult:
    m = dict(data)
    if m.get("status") not in STATUSES:
        raise ResultsError(f"model {m.get('name')!r}: unknown status {m.get('status')!r}")
    latency = _latency(m.pop("latency_ms", None))
    base = m.pop("base", None)
    if base:
        base = Baseline(**{**base, "latency_ms": _latency(base.get("latency_ms"))})
    history = m.pop("history", None)
    if history:
        history = History(**{**history, "latency_ms": _latency(history.get("latency_ms"))})
    return ModelResult(**m, latency_ms=latency, base=base, history=history)


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null (used for every JSON mlci writes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_results(results: Results, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results.to_dict(), indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def read_results(path: Path) -> Results:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: cannot read results: {exc}") from None
    try:
        return Results.from_dict(data)
    except ResultsError as exc:
        raise ResultsError(f"{path}: {exc}") from None
