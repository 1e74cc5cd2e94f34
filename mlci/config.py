"""`mlci.toml`: schema, defaults and validation.

Every error names the file and the dotted key (``models[1].inputs.x``) so a
user can fix the config without reading mlci's code. All errors of a file are
collected and reported together rather than one per run.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci.results import FailOn

DEFAULT_CONFIG_NAME = "mlci.toml"
HOST_TARGET = "host"


class ConfigError(Exception):
    """One or more problems in a config file; the message lists all of them."""

    def __init__(self, path: Path, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: invalid configuration\n{lines}")


@dataclass(frozen=True)
class TuningConfig:
    trials: int = 64
    """MetaSchedule trials per model (summed over its kernels)."""
    seconds: float = 600.0
    """Wall-clock cap on searching, per model."""
    trials_per_round: int = 16
    """Candidates generated and measured per search round of a kernel."""


@dataclass(frozen=True)
class MeasureConfig:
    warmup: int = 5
    samples: int = 60
    """Samples per implementation; with A/B, pairs per round."""
    min_sample_ms: float = 5.0
    """Calls are batched into one sample until it lasts at least this long."""
    max_seconds: float = 10.0
    """Cap on timing one implementation of one model (TVM or ONNX Runtime)."""
    seed: int = 0


@dataclass(frozen=True)
class NumericsConfig:
    atol: float = 1e-4
    rtol: float = 1e-3


FAIL_ON = tuple(FailOn)


@dataclass(frozen=True)
class GateConfig:
    threshold: float = 0.05
    """Relative change of median latency that counts (0.05: 5% slower is a regression)."""
    fail_on: FailOn = FailOn.REGRESSION
    """``regression`` (regressions and failures fail the build), ``failure`` or ``never``."""
    confidence: float = 0.95
    """Family-wise: the chance of any false alarm across the whole matrix is at most 1 - this."""
    remeasure: int = 1
    """Extra A/B rounds for a cell that is inconclusive or flagged after the first."""
    base: str | None = None
    """Default base ref for A/B when neither --base nor a pull-request event gives one."""


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None
    experiment: str = "mlci"
    register: bool | str = True
    """Which branch's runs register their builds in the MLflow model registry (``mlci-MODEL-TARGET``):
    true, the repository's default branch; a branch name; or false, none."""


@dataclass(frozen=True)
class CacheConfig:
    url: str | None = None
    """``s3://bucket/prefix``: the tuning cache's shared second level (None: the local cache only)."""
    pr_writes: bool = True
    """Pull requests write their own tier (``pr-N``, read by their later runs); false: they only read."""
    local_writes: bool = False
    """Runs outside GitHub Actions write the shared tier too (by default they only read it)."""


CACHE_URL_ENV = "MLCI_CACHE_URL"
CACHE_URL_OFF = "none"
"""The value of CACHE_URL_ENV that turns the S3 level off."""


def s3_url_problem(url: str) -> str | None:
    """What is wrong with a cache URL (None when it names an S3 bucket and prefix)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme != "s3":
        return f"{url!r} is not an s3:// URL (expected s3://bucket/prefix)"
    if not parsed.netloc:
        return f"{url!r} names no bucket (expected s3://bucket/prefix)"
    return None


LAUNCH_PROVIDERS = ("aws",)
MAX_LAUNCH_MINUTES = 24 * 60


@dataclass(frozen=True)
class LaunchConfig:
    """How a target's bench job gets its machine: one ephemeral cloud instance per job (`mlci runner start`)."""

    region: str
    instance_type: str
    image: str
    """The machine image (an AMI id); it must have the GitHub Actions runner installed in `runner_dir`."""
    subnets: tuple[str, ...]
    """Tried in order (spot in each, then on-demand in each): more subnets in more zones, more capacity."""
    provider: str = "aws"
    spot: bool = True
    """Try spot capacity first; on-demand of the same type and image when no subnet has any."""
    max_minutes: int = 60
    """The machine powers itself off this long after it boots, whatever the job is doing."""
    security_groups: tuple[str, ...] = ()
    instance_profile: str | None = None
    """An IAM instance profile name or ARN for the machine (e.g. to read the tuning cache); none by default."""
    volume_gb: int | None = None
    """Root volume size in GiB (None: the image's)."""
    runner_group_id: int = 1
    """The runner group the just-in-time runner joins (1: the repository's default group)."""
    runner_dir: str = "/opt/actions-runner"
    """Where the image has the runner unpacked (run.sh)."""
    runner_user: str = "runner"
    """The user the runner runs as (the runner refuses root unless told; root when the image has no such user)."""


@dataclass(frozen=True)
class TargetConfig:
    name: str
    tvm: str | dict[str, Any] = HOST_TARGET
    """``"host"`` (detect this machine's CPU) or a TVM Target JSON object."""
    runs_on: list[str] | None = None
    """GitHub Actions runner labels for this target's bench job (None: chosen from the target's kind)."""
    price_per_hour: float | None = None
    """USD per hour of this target's machine: prices a million inferences in the report (None: no cost shown)."""
    launch: LaunchConfig | None = None
    """How to get this target's machine for one job (None: the job runs on `runs_on` as it is)."""


DISTRIBUTIONS = ("normal", "uniform")


@dataclass(frozen=True)
class InputRule:
    """How to generate one input's values when no file gives them (`[models.inputs.NAME]`)."""

    value: float | None = None
    """Every element this value (a sample rate, a fixed length...)."""
    range: tuple[float, float] | None = None
    """Values in [low, high): integers low..high-1 for integer inputs (token ids, byte values)."""
    distribution: str | None = None
    """"uniform" (the default with a range) or "normal" (standard normal; with a range, centred
    in it with a sixth of its width as standard deviation, clipped to it)."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: Path
    inputs: dict[str, list[int]] = field(default_factory=dict)
    """Input name -> shape, for the inputs whose shape the config gives."""
    dims: dict[str, int] = field(default_factory=dict)
    input_rules: dict[str, InputRule] = field(default_factory=dict)
    """Input name -> how its generated values are drawn (default: by dtype and use)."""
    inputs_files: list[Path] = field(default_factory=list)
    """`.npz` files of real inputs, one input set each; numerics checks every set."""
    atol: float | None = None
    rtol: float | None = None
    trials: int | None = None
    seconds: float | None = None
    threshold: float | None = None
    key: str = ""
    """Where this model sits in the config (``models[2]``), for error messages."""


@dataclass(frozen=True)
class Config:
    path: Path
    root: Path
    """Directory of the config file: relative paths are resolved from here."""
    models: list[ModelConfig]
    targets: dict[str, TargetConfig]
    tuning: TuningConfig = TuningConfig()
    measure: MeasureConfig = MeasureConfig()
    numerics: NumericsConfig = NumericsConfig()
    tracking: TrackingConfig = TrackingConfig()
    gate: GateConfig = GateConfig()
    cache: CacheConfig = CacheConfig()
    prepare: list[str] = field(default_factory=list)
    cache_dir: Path = Path(".mlci/cache")
    results_dir: Path = Path(".mlci/results")
    state_dir: Path = Path(".mlci")

    def tracking_uri(self) -> str:
        """`MLFLOW_TRACKING_URI` wins (CI injects servers that way), then the config, then sqlite."""
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        if self.tracking.uri:
            return self.tracking.uri
        return f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"

    def cache_url(self) -> str | None:
        """`MLCI_CACHE_URL` wins (a workflow sets it per repository), then ``[cache] url``; raises
        ConfigError naming the variable when its value is no S3 URL. ``none`` turns the shared cache
        off whatever the config says (a fork's pull request, which has no credentials for it)."""
        env = os.environ.get(CACHE_URL_ENV, "").strip()
        if env.lower() == CACHE_URL_OFF:
            return None
        if env:
            problem = s3_url_problem(env)
            if problem:
                raise ConfigError(self.path, [f"{CACHE_URL_ENV}: {problem}"])
            return env
        return self.cache.url


# --- schema -----------------------------------------------------------------
# Each section maps key -> (accepted python types, human type name).

_NUM = (int, float)
_TOP_KEYS = {"prepare", "cache_dir", "results_dir", "tracking", "tuning", "measure",
             "numerics", "gate", "cache", "targets", "models"}
_CACHE_KEYS = {"url", "pr_writes", "local_writes"}
_SECTIONS: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "tuning": {
        "trials": ((int,), "a non-negative integer"),
        "seconds": (_NUM, "a number of seconds"),
        "trials_per_round": ((int,), "a positive integer"),
    },
    "measure": {
        "warmup": ((int,), "a non-negative integer"),
        "samples": ((int,), "a positive integer"),
        "min_sample_ms": (_NUM, "a number of milliseconds"),
        "max_seconds": (_NUM, "a number of seconds"),
        "seed": ((int,), "an integer"),
    },
    "numerics": {
        "atol": (_NUM, "a non-negative number"),
        "rtol": (_NUM, "a non-negative number"),
    },
    "tracking": {
        "uri": ((str,), "a string"),
        "experiment": ((str,), "a string"),
        "register": ((str,), "a branch name, true (the default branch) or false"),
    },
    "gate": {
        "threshold": (_NUM, "a fraction between 0 and 1, such as 0.05"),
        "fail_on": ((str,), "one of " + ", ".join(f'"{v}"' for v in FAIL_ON)),
        "confidence": (_NUM, "a fraction between 0 and 1, such as 0.95"),
        "remeasure": ((int,), "a non-negative integer"),
        "base": ((str,), "a git ref"),
    },
}
_MODEL_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "name": ((str,), "a string"),
    "path": ((str,), "a path string"),
    "inputs": ((dict,), "a table of input name -> shape list or input table"),
    "inputs_file": ((str, list), "an .npz path or a list of them"),
    "dims": ((dict,), "a table of dimension name -> integer"),
    "atol": (_NUM, "a non-negative number"),
    "rtol": (_NUM, "a non-negative number"),
    "trials": ((int,), "a non-negative integer"),
    "seconds": (_NUM, "a number of seconds"),
    "threshold": (_NUM, "a fraction between 0 and 1, such as 0.05"),
}
_INPUT_KEYS = {"shape", "value", "range", "distribution"}
_TARGET_KEYS = {"tvm", "runs_on", "price_per_hour", "launch"}
RESERVED_LABEL_PREFIX = "mlci-"
"""Runner labels mlci gives the machines it launches (see mlci.launch): never a target's `runs_on`."""
_LAUNCH_REQUIRED = ("region", "instance_type", "image", "subnets")
_LAUNCH_KEYS = {*_LAUNCH_REQUIRED, "provider", "spot", "max_minutes", "security_groups", "instance_profile", "volume_gb",
                "runner_group_id", "runner_dir", "runner_user"}
_AWS_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d+")
_AWS_ID = {"image": re.compile(r"ami-[0-9a-f]{8,17}"), "subnets": re.compile(r"subnet-[0-9a-f]{8,17}"),
           "security_groups": re.compile(r"sg-[0-9a-f]{8,17}")}
_INSTANCE_TYPE = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9]+")
_UNIX_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MODEL_NAME = _TARGET_NAME
"""A model's name becomes file and directory names under .mlci/: no separators, no leading dot."""
_FRACTIONS = {"threshold", "confidence"}
_BRANCH_OR_FLAG = {"register"}
"""Keys that take true, false or a branch name."""
_POSITIVE = {"samples", "trials_per_round", "min_sample_ms", "max_seconds", "seconds"}


def valid_name(name: object) -> bool:
    """A model or target name as the config accepts it (a results file from elsewhere may say anything)."""
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None


def seconds_from_env(name: str, default: float, environ: Mapping[str, str] | None = None, *,
                     zero_means_unlimited: bool = False) -> tuple[float, str | None]:
    """A duration setting from the environment variable `name` (`environ` defaults to os.environ):
    `default` when unset; with `zero_means_unlimited`, 0 is infinity. A value that is no positive
    number gives `default` and a note saying so: a timing setting is not worth failing a run for."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default, None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if zero_means_unlimited and seconds == 0:
        return math.inf, None
    if not (math.isfinite(seconds) and seconds > 0):
        unlimited = ", or 0 for no limit" if zero_means_unlimited else ""
        return default, f"{name}={raw!r} is not a positive number of seconds{unlimited}; using {default:g} s"
    return seconds, None


def model_name_from(stem: str) -> str:
    """A valid model name (see `_MODEL_NAME`) made from a file name: what `mlci init` proposes."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._-")
    return name or "model"


def _unknown(key: str, where: str, known: set[str] | dict) -> str:
    hint = difflib.get_close_matches(key, list(known), n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    return f"{where}{key}: unknown key{suggestion}; known keys: {', '.join(sorted(known))}"


def _type_ok(value: Any, types: tuple[type, ...]) -> bool:
    # bool is an int subclass in Python; `trials = true` is a mistake, not 1.
    return isinstance(value, types) and not isinstance(value, bool)


def _check_table(table: dict, schema: dict, where: str, problems: list[str]) -> dict:
    out = {}
    for key, value in table.items():
        if key not in schema:
            problems.append(_unknown(key, where, schema))
            continue
        types, type_name = schema[key]
        if key in _BRANCH_OR_FLAG and isinstance(value, bool):
            out[key] = value
            continue
        if key in _BRANCH_OR_FLAG and isinstance(value, str) and not value.strip():
            problems.append(f"{where}{key}: expected {type_name}, got an empty string")
            continue
        if not _type_ok(value, types):
            problems.append(f"{where}{key}: expected {type_name}, got {type(value).__name__} {value!r}")
            continue
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{where}{key}: expected {type_name}, got {value!r} (only finite numbers make sense here)")
            continue
        if isinstance(value, _NUM) and value < 0:
            problems.append(f"{where}{key}: must not be negative, got {value!r}")
            continue
        if key in _POSITIVE and value == 0:
            problems.append(f"{where}{key}: must be greater than 0")
            continue
        if key in _FRACTIONS and not 0 < value < 1:
            problems.append(f"{where}{key}: expected {type_name}, got {value!r}")
            continue
        if key == "fail_on" and value not in FAIL_ON:
            problems.append(f"{where}{key}: expected {type_name}, got {value!r}")
            continue
        out[key] = float(value) if float in types and int in types else FailOn(value) if key == "fail_on" else value
    return out


def _check_cache(raw: Any, problems: list[str]) -> CacheConfig:
    if not isinstance(raw, dict):
        problems.append(f"cache: expected a table [cache], got {type(raw).__name__}")
        return CacheConfig()
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _CACHE_KEYS:
            problems.append(_unknown(key, "cache.", _CACHE_KEYS))
        elif key == "url":
            problem = "expected a string" if not isinstance(value, str) else s3_url_problem(value)
            if problem:
                problems.append(f"cache.url: {problem}")
            else:
                values[key] = value
        elif not isinstance(value, bool):
            problems.append(f"cache.{key}: expected true or false, got {type(value).__name__} {value!r}")
        else:
            values[key] = value
    return CacheConfig(**values)


def _check_model(index: int, raw: Any, root: Path, problems: list[str]) -> ModelConfig | None:
    where = f"models[{index}]."
    if not isinstance(raw, dict):
        problems.append(f"models[{index}]: expected a table ([[models]]), got {type(raw).__name__}")
        return None
    n_before = len(problems)
    values = _check_table(raw, _MODEL_KEYS, where, problems)
    if "path" not in raw:
        problems.append(f"{where}path: required key is missing")
    inputs: dict[str, list[int]] = {}
    rules: dict[str, InputRule] = {}
    for name, spec in values.get("inputs", {}).items():
        if isinstance(spec, dict):
            shape, rule = _check_input_table(spec, f"{where}inputs.{name}.", problems)
            if rule != InputRule():
                rules[name] = rule
        else:
            shape = spec
        if shape is None:
            continue
        if not (isinstance(shape, list) and all(_type_ok(d, (int,)) and d > 0 for d in shape)):
            problems.append(f"{where}inputs.{name}: expected a list of positive integers, got {shape!r}")
        else:
            inputs[name] = list(shape)
    files = values.get("inputs_file", [])
    files = [files] if isinstance(files, str) else files
    if not all(isinstance(f, str) and f for f in files):
        problems.append(f"{where}inputs_file: expected an .npz path or a list of them, got {files!r}")
        files = []
    inputs_files = [p if p.is_absolute() else root / p for p in map(Path, files)]
    dims: dict[str, int] = {}
    for name, value in values.get("dims", {}).items():
        if not _type_ok(value, (int,)) or value <= 0:
            problems.append(f"{where}dims.{name}: expected a positive integer, got {value!r}")
        else:
            dims[name] = value
    if len(problems) > n_before or "path" not in values:
        return None
    path = Path(values["path"])
    path = path if path.is_absolute() else root / path
    name = values["name"] if "name" in values else path.stem
    if not _MODEL_NAME.fullmatch(name):
        # The name becomes directory and file names under .mlci/ (work/NAME, NAME.so).
        problems.append(f"{where}name: {name!r} is not usable as a model name: use letters, digits, '.', '_' "
                        "and '-', starting with a letter or digit" + ("" if "name" in values else " (set name = ...)"))
        return None
    return ModelConfig(
        name=name,
        path=path,
        inputs=inputs,
        dims=dims,
        input_rules=rules,
        inputs_files=inputs_files,
        atol=values.get("atol"),
        rtol=values.get("rtol"),
        trials=values.get("trials"),
        seconds=values.get("seconds"),
        threshold=values.get("threshold"),
        key=f"models[{index}]",
    )


def _check_input_table(raw: dict, where: str, problems: list[str]) -> tuple[Any, InputRule]:
    """`[models.inputs.NAME]`: an optional shape and how to draw the input's values."""
    for key in raw:
        if key not in _INPUT_KEYS:
            problems.append(_unknown(key, where, _INPUT_KEYS))

    def number(v: Any) -> bool:
        return _type_ok(v, _NUM) and math.isfinite(v)

    value, bounds, distribution = raw.get("value"), raw.get("range"), raw.get("distribution")
    if value is not None and not number(value):
        problems.append(f"{where}value: expected a finite number, got {value!r}")
        value = None
    if bounds is not None:
        if not (isinstance(bounds, list) and len(bounds) == 2 and all(number(b) for b in bounds)
                and bounds[0] < bounds[1]):
            problems.append(f"{where}range: expected [low, high] with low < high, such as [0, 256], got {bounds!r}")
            bounds = None
        else:
            bounds = (bounds[0], bounds[1])
    if distribution is not None and distribution not in DISTRIBUTIONS:
        problems.append(f"{where}distribution: expected one of "
                        + ", ".join(f'"{d}"' for d in DISTRIBUTIONS) + f", got {distribution!r}")
        distribution = None
    if value is not None and (bounds is not None or distribution is not None):
        problems.append(f"{where}value: a fixed value takes no range or distribution")
    return raw.get("shape"), InputRule(value=value, range=bounds, distribution=distribution)


def _check_target(name: str, raw: Any, problems: list[str]) -> TargetConfig | None:
    where = f"targets.{name}."
    if not _TARGET_NAME.fullmatch(name):
        # The name becomes a file name, an artifact name and part of a cache key.
        problems.append(f"targets.{name}: a target name may only use letters, digits, '.', '_' and '-'")
        return None
    if not isinstance(raw, dict):
        problems.append(f"targets.{name}: expected a table, got {type(raw).__name__}")
        return None
    for key in raw:
        if key not in _TARGET_KEYS:
            problems.append(_unknown(key, where, _TARGET_KEYS))
    runs_on = raw.get("runs_on")
    if isinstance(runs_on, str):
        runs_on = [runs_on]
    if runs_on is not None and not (
        isinstance(runs_on, list) and runs_on and all(isinstance(label, str) and label.strip() for label in runs_on)
    ):
        problems.append(
            f"{where}runs_on: expected a runner label or a list of labels such as "
            f"[\"self-hosted\", \"gpu\"], got {raw['runs_on']!r}"
        )
        return None
    reserved = [label for label in runs_on or [] if label.strip().lower().startswith(RESERVED_LABEL_PREFIX)]
    if reserved:
        problems.append(f"{where}runs_on: {reserved[0]!r}: labels starting with {RESERVED_LABEL_PREFIX!r} are "
                        "the runners mlci launches for one job each; a job naming one could take another's machine")
        return None
    price = raw.get("price_per_hour")
    if price is not None and not (_type_ok(price, _NUM) and math.isfinite(price) and price > 0):
        problems.append(f"{where}price_per_hour: expected the machine's price in USD per hour, a number greater "
                        f"than 0 such as 0.36, got {price!r}")
        return None
    launch = None
    if "launch" in raw:
        n_before = len(problems)
        launch = _check_launch(raw["launch"], f"{where}launch", problems)
        if runs_on is not None:
            problems.append(f"{where}runs_on: a target with launch runs on the machine it launches (its runner's "
                            "label is made for each job); remove runs_on or launch")
        if len(problems) > n_before:
            return None
    tvm = raw.get("tvm", HOST_TARGET)
    if isinstance(tvm, str):
        if tvm != HOST_TARGET:
            problems.append(
                f"{where}tvm: expected \"host\" or a TVM Target JSON table such as "
                f"{{ kind = \"llvm\", mcpu = \"znver3\" }}, got {tvm!r}"
            )
            return None
    elif isinstance(tvm, dict):
        if not isinstance(tvm.get("kind"), str):
            problems.append(f"{where}tvm.kind: required string (\"llvm\", \"cuda\", ...) is missing")
            return None
    else:
        problems.append(f"{where}tvm: expected \"host\" or a table, got {type(tvm).__name__}")
        return None
    return TargetConfig(name=name, tvm=tvm, runs_on=runs_on,
                        price_per_hour=float(price) if price is not None else None, launch=launch)


def _check_launch(raw: Any, where: str, problems: list[str]) -> LaunchConfig | None:
    """`[targets.NAME.launch]`: every problem named `targets.NAME.launch.KEY`."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table such as {{ provider = \"aws\", region = \"us-east-1\", "
                        f"instance_type = \"g5.xlarge\", image = \"ami-...\", subnets = [\"subnet-...\"] }}, "
                        f"got {type(raw).__name__}")
        return None
    n_before = len(problems)
    for key in raw:
        if key == "key_name":
            problems.append(f"{where}.key_name: mlci's runners take no SSH key: they are reached by nobody and "
                            "power off after one job (debug with a step in the job instead)")
        elif key not in _LAUNCH_KEYS:
            problems.append(_unknown(key, f"{where}.", _LAUNCH_KEYS))
    for key in _LAUNCH_REQUIRED:
        if key not in raw:
            problems.append(f"{where}.{key}: required key is missing")
    values: dict[str, Any] = {}

    def text(key: str, pattern: re.Pattern[str] | None, example: str) -> None:
        if key not in raw:
            return
        value = raw[key]
        if not isinstance(value, str) or not value.strip() or (pattern is not None and not pattern.fullmatch(value)):
            problems.append(f"{where}.{key}: expected {example}, got {value!r}")
        else:
            values[key] = value

    def ids(key: str, example: str, *, required: bool) -> None:
        if key not in raw:
            return
        value = raw[key]
        value = [value] if isinstance(value, str) else value
        if not (isinstance(value, list) and (value or not required)
                and all(isinstance(v, str) and _AWS_ID[key].fullmatch(v) for v in value)):
            problems.append(f"{where}.{key}: expected a list of {example}, got {raw[key]!r}")
        elif len(set(value)) != len(value):
            problems.append(f"{where}.{key}: lists an id twice: {raw[key]!r}")
        else:
            values[key] = tuple(value)

    def integer(key: str, low: int, high: int, meaning: str) -> None:
        if key not in raw:
            return
        value = raw[key]
        if not _type_ok(value, (int,)) or not low <= value <= high:
            problems.append(f"{where}.{key}: expected {meaning}, an integer from {low} to {high}, got {value!r}")
        else:
            values[key] = value

    if "provider" in raw and raw["provider"] not in LAUNCH_PROVIDERS:
        problems.append(f"{where}.provider: expected one of " + ", ".join(f'"{p}"' for p in LAUNCH_PROVIDERS)
                        + f", got {raw['provider']!r}")
    text("region", _AWS_REGION, 'an AWS region such as "us-east-1"')
    text("instance_type", _INSTANCE_TYPE, 'an EC2 instance type such as "g5.xlarge"')
    text("image", _AWS_ID["image"], 'an AMI id such as "ami-0123456789abcdef0"')
    text("instance_profile", None, "an IAM instance profile name or ARN")
    text("runner_dir", re.compile(r"/[A-Za-z0-9._/-]*"), 'an absolute path such as "/opt/actions-runner"')
    text("runner_user", _UNIX_NAME, 'a user name such as "runner"')
    ids("subnets", 'subnet ids such as ["subnet-0123456789abcdef0"]', required=True)
    ids("security_groups", 'security group ids such as ["sg-0123456789abcdef0"]', required=False)
    if "spot" in raw:
        if not isinstance(raw["spot"], bool):
            problems.append(f"{where}.spot: expected true or false, got {raw['spot']!r}")
        else:
            values["spot"] = raw["spot"]
    integer("max_minutes", 5, MAX_LAUNCH_MINUTES, "the minutes after which the machine powers itself off")
    integer("volume_gb", 8, 16384, "the root volume's size in GiB")
    integer("runner_group_id", 1, 2**31 - 1, "a runner group id")
    if len(problems) > n_before:
        return None
    return LaunchConfig(**values)


def parse_config(text: str, path: Path) -> Config:
    """Validate a config's text; raises ConfigError listing every problem found."""
    path = Path(path)
    root = path.resolve().parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from None

    problems: list[str] = []
    for key in data:
        if key not in _TOP_KEYS:
            problems.append(_unknown(key, "", _TOP_KEYS))

    sections = {}
    for section, schema in _SECTIONS.items():
        raw = data.get(section, {})
        if not isinstance(raw, dict):
            problems.append(f"{section}: expected a table [{section}], got {type(raw).__name__}")
            raw = {}
        sections[section] = _check_table(raw, schema, f"{section}.", problems)

    cache = _check_cache(data.get("cache", {}), problems)

    prepare = data.get("prepare", [])
    if isinstance(prepare, str):
        prepare = shlex.split(prepare)
    if not (isinstance(prepare, list) and all(isinstance(p, str) for p in prepare)):
        problems.append(f"prepare: expected a command as a string or list of strings, got {prepare!r}")
        prepare = []

    dirs = {}
    for key in ("cache_dir", "results_dir"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            problems.append(f"{key}: expected a path string, got {type(value).__name__} {value!r}")
            value = None
        if value is not None:
            p = Path(value)
            dirs[key] = p if p.is_absolute() else root / p

    raw_targets = data.get("targets", {})
    targets: dict[str, TargetConfig] = {}
    if not isinstance(raw_targets, dict):
        problems.append("targets: expected tables [targets.NAME]")
    else:
        for name, raw in raw_targets.items():
            target = _check_target(name, raw, problems)
            if target:
                targets[name] = target
    if not raw_targets:
        targets = {"cpu": TargetConfig(name="cpu", tvm=HOST_TARGET)}

    raw_models = data.get("models", [])
    models: list[ModelConfig] = []
    if not isinstance(raw_models, list):
        problems.append("models: expected an array of tables ([[models]])")
    else:
        for i, raw in enumerate(raw_models):
            model = _check_model(i, raw, root, problems)
            if model:
                models.append(model)
        if not raw_models:
            problems.append("models: no models configured; add a [[models]] table with a path")
    seen: dict[str, str] = {}
    for model in models:
        if model.name in seen:
            problems.append(f"{model.key}.name: duplicate model name {model.name!r} (also {seen[model.name]})")
        seen[model.name] = model.key

    if problems:
        raise ConfigError(path, problems)
    return Config(
        path=path,
        root=root,
        models=models,
        targets=targets,
        tuning=TuningConfig(**sections["tuning"]),
        measure=MeasureConfig(**sections["measure"]),
        numerics=NumericsConfig(**sections["numerics"]),
        tracking=TrackingConfig(**sections["tracking"]),
        gate=GateConfig(**sections["gate"]),
        cache=cache,
        prepare=prepare,
        cache_dir=dirs.get("cache_dir", root / ".mlci" / "cache"),
        results_dir=dirs.get("results_dir", root / ".mlci" / "results"),
        state_dir=root / ".mlci",
    )


def load_config(path: Path | str) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [f"cannot read: {exc}"]) from None
    return parse_config(text, path)


def relative_to_root(path: Path, root: Path) -> Path:
    """`path` relative to `root` for messages and results files; as given when outside it."""
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path


def check_model_files(config: Config) -> None:
    """Missing model files are config errors, checked after `prepare` has run."""
    problems = [
        f"{m.key}.path: model file not found: {m.path}"
        for m in config.models
        if not m.path.is_file()
    ]
    if problems:
        raise ConfigError(config.path, problems)
