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
    peer: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Results:
    git: GitInfo
    target: TargetInfo
    models: list[ModelResult] = field(default_factory=list)
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
            models = []
            for m in data["models"]:
                m = dict(m)
                latency = m.pop("latency_ms", None)
                if m.get("status") not in STATUSES:
                    raise ResultsError(f"model {m.get('name')!r}: unknown status {m.get('status')!r}")
                models.append(ModelResult(**m, latency_ms=Latency(**latency) if latency else None))
            return cls(
                git=GitInfo(**data["git"]),
                target=TargetInfo(**data["target"]),
                models=models,
                schema=schema,
                mlci_version=data["mlci_version"],
                created_at=data["created_at"],
            )
        except (KeyError, TypeError) as exc:
            raise ResultsError(f"malformed results file: {exc}") from None


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
