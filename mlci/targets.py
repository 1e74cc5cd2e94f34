"""Named targets -> TVM Target JSON, host detection, environment fingerprint.

The fingerprint says what a latency was measured on. Two results are only
comparable when their fingerprints match, and the tuning cache is keyed by it:
schedules tuned on one CPU or TVM version are not reused on another.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from typing import Any

from mlci.config import HOST_TARGET, Config, ConfigError, TargetConfig
from mlci.results import Fingerprint

GPU_KINDS = {"cuda", "rocm", "vulkan", "metal", "opencl"}


@dataclass(frozen=True)
class ResolvedTarget:
    name: str
    tvm_target: dict[str, Any]
    """TVM Target JSON, e.g. {"kind": "llvm", "mcpu": "znver3", "num-cores": 2}."""

    @property
    def kind(self) -> str:
        return str(self.tvm_target["kind"])

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @property
    def threads(self) -> int:
        """CPU threads for TVM's runtime, its tuning runner and ONNX Runtime: the target's
        `num-cores` (detected for `host`), else every core this process may use."""
        cores = self.tvm_target.get("num-cores")
        return int(cores) if isinstance(cores, int) and cores > 0 else usable_cores()


def usable_cores() -> int:
    """Cores this process may run on (cgroups and affinity included), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def detect_host_target() -> dict[str, Any]:
    from tvm.target import codegen

    target: dict[str, Any] = {"kind": "llvm", "num-cores": usable_cores()}
    cpu = codegen.llvm_get_system_cpu()
    if cpu and cpu != "generic":
        target["mcpu"] = cpu
    return target


def resolve_target(cfg: TargetConfig) -> ResolvedTarget:
    if cfg.tvm == HOST_TARGET:
        return ResolvedTarget(cfg.name, detect_host_target())
    tvm_target = dict(cfg.tvm)
    if tvm_target.get("kind") == "llvm":
        tvm_target.setdefault("num-cores", usable_cores())
    return ResolvedTarget(cfg.name, tvm_target)


_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def normalize_arch(name: str) -> str:
    """A CPU architecture in LLVM's spelling (``arm64`` -> ``aarch64``)."""
    return _ARCH_ALIASES.get(name.lower(), name.lower())


def machine_arch() -> str:
    """This machine's CPU architecture in LLVM's spelling (``x86_64``, ``aarch64``)."""
    return normalize_arch(platform.machine())


def triple_arch(triple: str) -> str:
    """The CPU architecture an LLVM target triple names (``aarch64-linux-gnu`` -> ``aarch64``)."""
    return normalize_arch(triple.split("-", 1)[0])


def foreign_arch(target: ResolvedTarget) -> str | None:
    """The CPU architecture of an LLVM target whose `mtriple` names another than this machine's
    (its builds cannot run here natively); None for targets this CPU runs and for non-CPU targets."""
    triple = target.tvm_target.get("mtriple")
    if target.kind != "llvm" or not isinstance(triple, str) or not triple:
        return None
    arch = triple_arch(triple)
    return arch if arch != machine_arch() else None


def tvm_target_object(target: ResolvedTarget):
    """Build the tvm.target.Target; raises ValueError naming the bad field."""
    import tvm

    return tvm.target.Target(target.tvm_target)


def select_target(config: Config, name: str | None) -> ResolvedTarget:
    """The config's target `name` (default: the first), resolved on this machine; a name the
    config lacks, or a target TVM rejects, is a ConfigError naming the key."""
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


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "CPU part")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def _gpu() -> tuple[str | None, str | None]:
    """(GPU name, driver version) from nvidia-smi, or (None, None) when none is visible."""
    if not shutil.which("nvidia-smi"):
        return None, None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, None
    if not out:
        return None, None
    name, _, driver = out[0].partition(",")
    return name.strip(), driver.strip()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def llvm_version() -> str | None:
    """LLVM major version TVM was built with (the wheel's libinfo has no full version)."""
    import tvm
    from tvm.target import codegen

    info = tvm.support.libinfo()
    if info.get("LLVM_VERSION"):
        return str(info["LLVM_VERSION"])
    if info.get("USE_LLVM", "OFF") in ("OFF", ""):
        return None
    major = codegen.llvm_version_major(allow_none=True)
    return str(major) if major else None


def environment_fingerprint(target: ResolvedTarget, threads: int | None = None) -> Fingerprint:
    """What the numbers depend on: hardware, toolchain, the target itself, and the threads the
    measuring process runs (`threads`: what TVM reports there; the target's count when not given)."""
    import onnxruntime
    import tvm

    gpu, driver = _gpu() if target.is_gpu else (None, None)
    fingerprint = Fingerprint(
        cpu=_cpu_model(),
        arch=platform.machine(),
        cores=usable_cores(),
        gpu=gpu,
        driver=driver,
        os=f"{platform.system()} {platform.release()}",
        python=platform.python_version(),
        tvm=tvm.__version__,
        tvm_ffi=_version("apache-tvm-ffi"),
        llvm=llvm_version(),
        onnxruntime=onnxruntime.__version__,
        tvm_target=target.tvm_target,
        threads=threads if threads is not None else target.threads,
    )
    fingerprint.hash = fingerprint_hash(fingerprint.as_dict())
    return fingerprint


def fingerprint_hash(fields: dict[str, Any]) -> str:
    """Stable short hash over the fields that decide comparability (kernel release excluded)."""
    keyed = {k: v for k, v in fields.items() if k not in ("hash", "os", "python")}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]

