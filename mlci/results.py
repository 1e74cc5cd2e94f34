"""The results file: the one contract between `mlci run` and `mlci compare`.

Every section is a dataclass; statuses and verdicts are string enums. The file
carries an integer ``schema_version``: a reader lifts older versions through
MIGRATIONS (files written by earlier mlci releases keep loading) and refuses
newer ones or other schemas rather than guessing. `write_results` is the one
writer: atomic, and called before anything is sent anywhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from mlci import __version__

SCHEMA = "mlci.results"
SCHEMA_VERSION = 5
"""Bumped when a field changes meaning or shape; every older version has a migration below."""
MAX_BYTES = 64 * 2**20
"""A results file larger than this is refused unread (they come from untrusted runs too)."""


class ResultsError(Exception):
    pass


class Status(StrEnum):
    """How far one model got on one target: ``ok`` or the stage that failed."""

    OK = "ok"
    IMPORT_FAILED = "import_failed"
    COMPILE_FAILED = "compile_failed"
    TUNE_FAILED = "tune_failed"
    NUMERICS_FAILED = "numerics_failed"
    RUN_FAILED = "run_failed"
    INTERRUPTED = "interrupted"
    """The target's machine went away mid-run (a spot interruption): nothing known about the model."""


class BaseStatus(StrEnum):
    """The base commit's build of a model: a Status, or ``missing`` (no such file at the base commit)."""

    OK = "ok"
    MISSING = "missing"
    IMPORT_FAILED = "import_failed"
    COMPILE_FAILED = "compile_failed"
    TUNE_FAILED = "tune_failed"
    NUMERICS_FAILED = "numerics_failed"
    RUN_FAILED = "run_failed"


class Verdict(StrEnum):
    """The gate's word on one model x target; declared worst first (the report's order)."""

    FAILED = "failed"
    REGRESSION = "regression"
    INCONCLUSIVE = "inconclusive"
    INTERRUPTED = "interrupted"
    IMPROVEMENT = "improvement"
    NEW = "new"
    COMPILED = "compiled"
    REMOVED = "removed"
    UNCHANGED = "unchanged"


class Execution(StrEnum):
    """How a target's builds were exercised: on its own hardware, or on a runner without it."""

    NATIVE = "native"
    """Tuned, checked and timed on the target's hardware."""
    EMULATED = "emulated"
    """Cross-compiled; numerics checked under user-mode emulation; never timed."""
    COMPILE_ONLY = "compile_only"
    """Cross-compiled (the portability gate); not run here."""


class FailOn(StrEnum):
    """Which verdicts fail the build: regressions and failures, failures only, or nothing."""

    REGRESSION = "regression"
    FAILURE = "failure"
    NEVER = "never"


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
class Fingerprint:
    """What a latency was measured on. Results are compared only when `hash` matches."""

    cpu: str | None = None
    arch: str | None = None
    cores: int | None = None
    gpu: str | None = None
    driver: str | None = None
    os: str | None = None
    python: str | None = None
    tvm: str | None = None
    tvm_ffi: str | None = None
    llvm: str | None = None
    onnxruntime: str | None = None
    threads: int | None = None
    """CPU threads TVM reported in the measuring process (ONNX Runtime and the tuning runner use as many)."""
    tvm_target: dict[str, Any] = field(default_factory=dict)
    """TVM's own Target JSON (its keys are TVM's, not mlci's)."""
    hash: str | None = None
    """Over every field but `os` and `python` (a kernel update does not make numbers incomparable)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TargetInfo:
    name: str
    tvm_target: dict[str, Any]
    """TVM Target JSON, e.g. {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}."""
    fingerprint: Fingerprint
    price_per_hour: float | None = None
    """What an hour of this machine costs (USD), from the config; prices each model's inferences."""
    execution: Execution = Execution.NATIVE
    execution_note: str | None = None
    """Why the target was not native here and what was done instead (one line)."""


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
class CompileInfo:
    seconds: float
    """Building the library with the tuned schedules."""
    import_seconds: float | None = None
    """Importing into Relax and extracting the kernels."""
    kernels: int | None = None
    kernels_tuned: int | None = None
    """Kernels built with a tuned schedule from the cache; the rest ran a default schedule or plain loops."""
    kernels_default: int | None = None
    """Kernels with no tuned record yet, built with the rule-based default schedule."""
    fallbacks: dict[str, str] = field(default_factory=dict)
    """Kernel -> why its tuned schedule could not be applied (that kernel alone fell back)."""
    kernels_kept_default: int | None = None
    """Kernels whose default schedule measured faster than their best tuned record, so kept it."""
    build: str | None = None
    """The build kept: "tuned", or "default" when the build with default schedules only measured faster."""
    tuned_build_ms: float | None = None
    """The quick check's median for the tuned build (ms per call), when both builds were timed."""
    default_build_ms: float | None = None
    """The same check's median for the build with default schedules only."""
    build_cached: bool = False
    """The library came from the build cache: the same model, tuning records and compiler were built
    before (`seconds` is then the load, and the two medians above are that build's)."""


@dataclass
class TuningInfo:
    trials_new: int
    """Candidates this run measured."""
    trials_cached: int
    """Trials the model's kernels already had in the tuning cache (up to their share of the budget)."""
    tasks: int
    tasks_from_cache: int
    """Kernels that needed no search: the cache held their share."""
    seconds: float
    trials_valid_new: int | None = None
    """Of trials_new, those that built and ran."""
    trials_budget: int | None = None
    seconds_budget: float | None = None
    deadline_hit: bool = False
    """Tuning stopped at its time cap; the next run continues."""
    progressive: bool = False
    """The run searched `trials_budget` new trials where the most was left to gain (default-branch runs),
    rather than only what the budget still owed each kernel."""
    kernels_from_remote: int = 0
    """Kernels whose records came from the tuning cache on S3 (another runner had searched them more)."""


@dataclass
class NumericsInfo:
    """Compiled outputs against ONNX Runtime: |tvm - ort| <= atol + rtol * |ort|."""

    max_abs_err: float | None
    """None: nothing to compare with (`no_reference`)."""
    max_rel_err: float | None
    atol: float
    rtol: float
    passed: bool
    input_sets: int | None = None
    """How many input sets both ran (each compared)."""
    vacuous: str | None = None
    """Why the check proves nothing, when it does not: no output changed (beyond the tolerance)
    between different input sets, so a build that ignored its inputs would pass too."""
    emulated: bool = False
    """The build ran under user-mode emulation (the target's CPU is not on this runner)."""
    no_reference: str | None = None
    """Why the outputs were not compared: ONNX Runtime cannot run the model (an operator, opset or
    IR version it lacks). The build compiled and ran; `passed` is then true, and proves nothing."""


@dataclass
class PeerInfo:
    """ONNX Runtime on the same machine, same inputs, same harness."""

    onnxruntime_median_ms: float | None
    """None: not timed on this target (`note` says why)."""
    onnxruntime_samples: list[float] = field(default_factory=list)
    speedup: float | None = None
    """ONNX Runtime's median over TVM's: above 1, TVM is faster."""
    threads: int | None = None
    """ONNX Runtime's intra-op threads: the same count as TVM's, so the comparison is fair."""
    faster: str | None = None
    """What to ship on this target: ``tvm`` or ``onnxruntime``, whichever ran faster ..."""
    faster_by: float | None = None
    """... and how many times faster than the other."""
    provider: str | None = None
    """ONNX Runtime's execution provider (``CPUExecutionProvider``, ``CUDAExecutionProvider``): the
    target's kind of device, never the CPU beside a GPU build."""
    note: str | None = None
    """Why ONNX Runtime was not timed on this target (a GPU target without a matching provider)."""


@dataclass
class CostInfo:
    """USD per million inferences at the target's price per hour, from the measured medians, with
    the machine busy with one inference at a time: price x median seconds x 1e6 / 3600."""

    per_million_usd: float | None = None
    """The TVM build's."""
    onnxruntime_per_million_usd: float | None = None
    """ONNX Runtime's, on the same machine."""


@dataclass
class KernelTime:
    """One kernel's share of an inference, from TVM's VM instrumented call by call."""

    name: str
    """The kernel's symbol in the built library (e.g. ``fused_matmul_add_relu``)."""
    calls: int
    """Invocations per inference."""
    total_us: float
    """Microseconds spent in it per inference (over all its calls), averaged over the profiled inferences."""


@dataclass
class KernelProfile:
    """Per-kernel time of one build: taken only for a cell the run's own A/B flagged as slower, to
    say which kernels grew. Informational: no verdict depends on it."""

    kernels: list[KernelTime] = field(default_factory=list)
    """Slowest first; the VM's own builtins (allocation, shape checks) are left out."""
    inferences: int = 0
    """Profiled inferences the times are averaged over."""


@dataclass
class GateSettings:
    """The config's gate settings, recorded for `mlci compare`."""

    threshold: float | None = None
    fail_on: FailOn | None = None
    confidence: float | None = None


@dataclass
class Baseline:
    """The same model built from the base commit and measured interleaved with the head
    (A/B in one process): sample i of each side comes from the same moment."""

    commit: str
    path: str | None = None
    sha256: str | None = None
    status: BaseStatus = BaseStatus.OK
    error: str | None = None
    latency_ms: Latency | None = None
    """Paired with the head's ``latency_ms``: sample i of each was taken in the same block."""
    rounds: int = 0
    """Measuring rounds; more than one when an inconclusive or flagged cell was re-measured."""
    same_model: bool = False
    profile: KernelProfile | None = None
    """Per-kernel time of the base build, when the head measured slower (see ModelResult.profile)."""


@dataclass
class TrendPoint:
    commit: str | None
    median: float | None
    created_at: str | None = None


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
    trend: list[TrendPoint] = field(default_factory=list)
    """Recent default-branch runs, oldest first."""
    trend_url: str | None = None
    """The trend's runs side by side on the MLflow server (None: no web UI, e.g. a sqlite store)."""


@dataclass
class ModelResult:
    name: str
    path: str
    sha256: str | None = None
    status: Status = Status.OK
    error: str | None = None
    compile: CompileInfo | None = None
    tuning: TuningInfo | None = None
    numerics: NumericsInfo | None = None
    latency_ms: Latency | None = None
    """With an A/B base: the head's interleaved samples, paired index by index with base.latency_ms."""
    peer: PeerInfo | None = None
    mlflow_run_id: str | None = None
    mlflow_url: str | None = None
    threshold: float | None = None
    """Relative change that counts as a regression or improvement (from the config)."""
    base: Baseline | None = None
    history: History | None = None
    cost: CostInfo | None = None
    """What a million inferences cost on this target; None when the target states no price."""
    profile: KernelProfile | None = None
    """Per-kernel time of the head build, when the A/B measured it slower than the base (base.profile
    holds the base's): which kernels grew."""

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


@dataclass
class Results:
    git: GitInfo
    target: TargetInfo
    models: list[ModelResult] = field(default_factory=list)
    config: str | None = None
    """The config file, relative to the repository's top level: it keys the PR comment."""
    base_ref: str | None = None
    """The ref A/B compared against (resolved to git.base_commit, the merge-base)."""
    removed_models: list[str] = field(default_factory=list)
    """Models configured at the base commit that the head no longer has."""
    gate: GateSettings | None = None
    interrupted: str | None = None
    """Why the target's machine went away before the run finished (a spot interruption): its models
    are `interrupted`, which is neither a regression nor a failure of theirs."""
    schema: str = SCHEMA
    schema_version: int = SCHEMA_VERSION
    mlci_version: str = __version__
    created_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )

    def to_dict(self) -> dict[str, Any]:
        return json_safe(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> Results:
        """Migrate `data` to this version, check it against the dataclasses' type hints (keys
        it does not know are ignored: newer mlci versions add optional fields) and build it."""
        if not isinstance(data, dict):
            raise ResultsError(f"expected a JSON object at the top level, got {_show(data)}")
        data = migrate(data)
        check = _Checker()
        for key in ("models", "mlci_version", "created_at"):  # defaulted in code, always in a file
            if key not in data:
                check.problem(key, "missing")
        results = check.convert(data, cls, "")
        if not check.count:
            _check_consistency(results, check)
        check.raise_problems()
        return results


# --- versions -----------------------------------------------------------------


def schema_version(data: dict[str, Any]) -> int:
    """The version a parsed results file was written in; raises ResultsError for anything else."""
    schema, version = data.get("schema"), data.get("schema_version")
    if schema == "mlci.results/1" and version is None:
        return 1
    if schema == SCHEMA and isinstance(version, int) and not isinstance(version, bool) and version >= 2:
        if version > SCHEMA_VERSION:
            raise ResultsError(f"results schema version {version} is newer than this mlci reads ({SCHEMA_VERSION}): "
                               "upgrade mlci")
        return version
    shown = _show(schema) if version is None else f"{_show(schema)} version {_show(version)}"
    raise ResultsError(f"unsupported results schema {shown} (this mlci reads {SCHEMA!r} up to version {SCHEMA_VERSION})")


def update_to_2(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (``"schema": "mlci.results/1"``) kept the stage sections as free-form objects,
    written as ``{}`` for a stage the model never reached; version 2 types them and writes null."""
    out = {**data, "schema": SCHEMA, "schema_version": 2}
    if out.get("gate") == {}:
        out["gate"] = None
    models = out.get("models")
    if isinstance(models, list):
        out["models"] = [
            {**m, **{key: None for key in ("compile", "tuning", "numerics", "peer") if m.get(key) == {}}}
            if isinstance(m, dict) else m
            for m in models
        ]
    return out


def update_to_3(data: dict[str, Any]) -> dict[str, Any]:
    """Version 3 adds the target's price per hour, each model's cost per million inferences and the
    per-kernel profiles of slower cells; a version 2 file has none of them (all optional)."""
    return {**data, "schema_version": 3}


def update_to_4(data: dict[str, Any]) -> dict[str, Any]:
    """Version 4 adds how a target was exercised (native, emulated, compile only), emulated numerics
    and interrupted runs; every version 3 file was a native run that finished."""
    return {**data, "schema_version": 4}


def update_to_5(data: dict[str, Any]) -> dict[str, Any]:
    """Version 5 adds numerics without a reference (errors null, `no_reference` saying why); every
    version 4 file compared its outputs with ONNX Runtime."""
    return {**data, "schema_version": 5}


MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {
    1: update_to_2, 2: update_to_3, 3: update_to_4, 4: update_to_5}
"""version -> the function that lifts a file of that version to the next."""


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A parsed results file of any supported version, as the current version."""
    version = schema_version(data)
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return data


def _check_consistency(results: Results, check: _Checker) -> None:
    """What the type hints cannot say but `mlci compare` relies on (`mlci run` never writes otherwise)."""
    gate = results.gate
    price = results.target.price_per_hour
    if price is not None and not price > 0:
        check.problem("target.price_per_hour", f"expected a price greater than 0, got {_show(price)}")
    for key in ("threshold", "confidence"):
        value = getattr(gate, key) if gate else None
        if value is not None and not 0 < value < 1:
            check.problem(f"gate.{key}", f"expected a fraction between 0 and 1, got {_show(value)}")
    for i, m in enumerate(results.models):
        where = f"models[{i}]"
        if m.threshold is not None and not 0 < m.threshold < 1:
            check.problem(f"{where}.threshold", f"expected a fraction between 0 and 1, got {_show(m.threshold)}")
        if m.ok and m.latency_ms is not None and not m.latency_ms.samples:
            check.problem(f"{where}.latency_ms.samples", "an ok model needs at least one sample")
        for part, lat in (("", m.latency_ms), (".base", m.base and m.base.latency_ms),
                          (".history", m.history and m.history.latency_ms)):
            if lat is not None and lat.n != len(lat.samples):
                check.problem(f"{where}{part}.latency_ms.n", f"{lat.n}, but there are {len(lat.samples)} samples")
        for key in ("per_million_usd", "onnxruntime_per_million_usd"):
            value = getattr(m.cost, key) if m.cost else None
            if value is not None and value < 0:
                check.problem(f"{where}.cost.{key}", f"expected a cost of at least 0, got {_show(value)}")
        for part, profile in (("", m.profile), (".base", m.base and m.base.profile)):
            for j, kernel in enumerate(profile.kernels if profile else ()):
                if kernel.calls < 0 or kernel.total_us < 0:
                    check.problem(f"{where}{part}.profile.kernels[{j}]",
                                  f"expected calls and total_us of at least 0, got {kernel.calls} and {kernel.total_us}")
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
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            choices = ", ".join(member.value for member in hint)
            if not isinstance(value, str):
                return self.wrong(path, f"one of {choices}", value)
            if value not in hint._value2member_map_:
                name = path.rsplit(".", 1)[-1]
                self.problem(path, f"unknown {name} {_show(value)} (expected one of {choices})")
                return value
            return hint(value)
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


# --- documentation ----------------------------------------------------------------


def _outline(cls: type) -> str:
    parts = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in get_args(hint) if a is not type(None)]
        inner = args[0] if get_origin(hint) in (Union, types.UnionType) and len(args) == 1 else hint
        if get_origin(inner) is list and dataclasses.is_dataclass(get_args(inner)[0]):
            parts.append(f"{f.name}[{_outline(get_args(inner)[0])}]")
        elif dataclasses.is_dataclass(inner) and inner is not Latency:
            parts.append(f"{f.name}{_outline(inner)}")
        elif isinstance(inner, type) and issubclass(inner, enum.Enum):
            parts.append(f"{f.name}: {'|'.join(m.value for m in inner)}")
        else:
            parts.append(f.name)
    return "{" + ", ".join(parts) + "}"


def schema_outline(width: int = 100) -> str:
    """The README's description of the results file, generated from the dataclasses above."""
    latency = ", ".join(f.name for f in dataclasses.fields(Latency))
    text = (f"schema {SCHEMA!r}, schema_version {SCHEMA_VERSION}: {_outline(Results)}\n"
            f"where every latency_ms is {{{latency}}}; a section a model never reached is null.")
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    print(schema_outline())
