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
import sys
import types
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from mlci import __version__

SCHEMA = "mlci.results/1"
STATUSES = ("ok", "import_failed", "compile_failed", "tune_failed", "numerics_failed", "run_failed")
MAX_BYTES = 64 * 2**20
"""A results file larger than this is refused unread (they come from untrusted runs too)."""


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
    status: str = field(default="ok", metadata={"choices": ("missing", *STATUSES)})
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
    status: str = field(default="ok", metadata={"choices": STATUSES})
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
    def from_dict(cls, data: Any) -> Results:
        """Check `data` against the dataclasses' type hints (keys it does not know are
        ignored: newer mlci versions add optional fields) and build the Results."""
        if not isinstance(data, dict):
            raise ResultsError(f"expected a JSON object at the top level, got {_show(data)}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise ResultsError(f"unsupported results schema {_show(schema)} (this mlci reads {SCHEMA!r})")
        check = _Checker()
        for key in ("models", "mlci_version", "created_at"):  # defaulted in code, always in a file
            if key not in data:
                check.problem(key, "missing")
        results = check.convert(data, cls, "")
        if not check.count:
            _check_consistency(results, check)
        check.raise_problems()
        return results


def _check_consistency(results: Results, check: _Checker) -> None:
    """What the type hints cannot say but `mlci compare` relies on (`mlci run` never writes otherwise)."""
    from mlci.gate import FAIL_ON

    gate = results.gate
    if gate.get("fail_on") is not None and gate["fail_on"] not in FAIL_ON:
        check.problem("gate.fail_on", f"expected one of {', '.join(FAIL_ON)}, got {_show(gate['fail_on'])}")
    for key in ("threshold", "confidence"):
        value = gate.get(key)
        if value is not None and not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 1):
            check.problem(f"gate.{key}", f"expected a fraction between 0 and 1, got {_show(value)}")
    for i, m in enumerate(results.models):
        where = f"models[{i}]"
        if m.ok and m.latency_ms is not None and not m.latency_ms.samples:
            check.problem(f"{where}.latency_ms.samples", "an ok model needs at least one sample")
        for part, lat in (("", m.latency_ms), (".base", m.base and m.base.latency_ms),
                          (".history", m.history and m.history.latency_ms)):
            if lat is not None and lat.n != len(lat.samples):
                check.problem(f"{where}{part}.latency_ms.n", f"{lat.n}, but there are {len(lat.samples)} samples")
        for key, pair in (m.history.fingerprint_diff.items() if m.history else ()):
            if len(pair) != 2:
                check.problem(_join(f"{where}.history.fingerprint_diff", key), "expected [baseline, this run]")


class _Checker:
    """Converts parsed JSON into the results dataclasses, collecting every mismatch."""

    LIMIT = 10

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.count = 0

    def problem(self, path: str, message: str) -> None:
        self.count += 1
        if self.count <= self.LIMIT:
            self.problems.append(f"{path or '(top level)'}: {message}")

    def raise_problems(self) -> None:
        if self.count:
            more = f"; and {self.count - self.LIMIT} more" if self.count > self.LIMIT else ""
            raise ResultsError("; ".join(self.problems) + more)

    def convert(self, value: Any, hint: Any, path: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if hint is Any:
            return value
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            (inner,) = (a for a in args if a is not type(None))  # the schema's unions are all `X | None`
            return self.convert(value, inner, path)
        if dataclasses.is_dataclass(hint):
            return self.dataclass(value, hint, path)
        if origin is list:
            if not isinstance(value, list):
                return self.wrong(path, "a list", value)
            return [self.convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                return self.wrong(path, "an object", value)
            return {k: self.convert(v, args[1], _join(path, k)) for k, v in value.items()}
        if hint is float:  # an int will do; a bool, NaN, infinity or an int past float range will not
            ok = isinstance(value, int | float) and not isinstance(value, bool) and abs(value) <= sys.float_info.max
            return value if ok else self.wrong(path, "a number", value)
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        return self.wrong(path, _KINDS.get(hint, hint.__name__), value)

    def dataclass(self, value: Any, cls: Any, path: str) -> Any:
        if not isinstance(value, dict):
            return self.wrong(path, "an object", value)
        before, hints, kwargs = self.count, _hints(cls), {}
        for f in dataclasses.fields(cls):
            where = _join(path, f.name)
            if f.name not in value:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.problem(where, "missing")
                continue
            item = value[f.name]
            if item is None and hints[f.name] is float:
                kwargs[f.name] = None  # json_safe writes NaN (the summary of no samples) as null
                continue
            kwargs[f.name] = self.convert(item, hints[f.name], where)
            choices = f.metadata.get("choices")
            if choices and isinstance(item, str) and item not in choices:
                self.problem(where, f"unknown {f.name} {_show(item)} (expected one of {', '.join(choices)})")
        return cls(**kwargs) if self.count == before else value

    def wrong(self, path: str, expected: str, value: Any) -> Any:
        self.problem(path, f"expected {expected}, got {_show(value)}")
        return value


_KINDS = {str: "a string", int: "an integer", bool: "true or false"}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _join(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{_show(key)}]"


def _show(value: Any) -> str:
    """A short description of an untrusted value for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str) and len(value) > 40:
        return repr(value[:37]) + "..."
    return "null" if value is None else repr(value)


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
    path = Path(path)
    too_large = f"{path}: refusing a results file over {MAX_BYTES // 2**20} MiB"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ResultsError(too_large)
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)  # the file may have grown since
        if len(raw) > MAX_BYTES:
            raise ResultsError(too_large)
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deeply
        raise ResultsError(f"{path}: cannot read results: {exc}") from None
    try:
        return Results.from_dict(data)
    except ResultsError as exc:
        raise ResultsError(f"{path}: {exc}") from None
