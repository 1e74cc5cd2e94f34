"""`mlci matrix`: the plan job's target matrix, one bench job per target with its runner labels.

Pure: reads only the parsed config, so the plan job needs neither TVM nor a GPU to run it.
"""

from __future__ import annotations

from typing import Any

from mlci.config import HOST_TARGET, Config, TargetConfig
from mlci.targets import GPU_KINDS

GITHUB_X64 = "ubuntu-latest"
GITHUB_ARM = "ubuntu-24.04-arm"
_ARM_HINTS = ("aarch64", "arm64", "armv8", "armv9", "neoverse", "cortex-a", "apple-")


class MatrixError(Exception):
    """A target asked for on the command line is not in the config."""


def default_runs_on(target: TargetConfig) -> list[str]:
    """Runner labels when the config names none: GitHub-hosted x64 or Arm for CPUs, a self-hosted GPU runner for GPUs."""
    if target.tvm == HOST_TARGET or not isinstance(target.tvm, dict):
        return [GITHUB_X64]
    kind = str(target.tvm.get("kind", ""))
    if kind in GPU_KINDS:
        # GitHub's GPU runners are larger runners whose labels each organisation names itself.
        return ["self-hosted", "linux", "gpu"]
    described = " ".join(str(target.tvm.get(key, "")) for key in ("mtriple", "mcpu", "mattr")).lower()
    if any(hint in described for hint in _ARM_HINTS):
        return [GITHUB_ARM]
    return [GITHUB_X64]


def target_kind(target: TargetConfig) -> str:
    return "llvm" if target.tvm == HOST_TARGET else str(target.tvm.get("kind", "llvm"))  # type: ignore[union-attr]


def build_matrix(config: Config, only: list[str] | None = None) -> dict[str, Any]:
    """{"include": [{"target", "runs-on", "kind"}, ...]} in config order, for `strategy.matrix: fromJSON(...)`."""
    names = list(config.targets)
    unknown = [name for name in only or [] if name not in config.targets]
    if unknown:
        raise MatrixError(
            f"{config.path}: unknown target(s) {', '.join(map(repr, unknown))}; the config has {', '.join(names)}"
        )
    chosen = [name for name in names if not only or name in only]
    return {
        "include": [
            {
                "target": name,
                "runs-on": list(config.targets[name].runs_on or default_runs_on(config.targets[name])),
                "kind": target_kind(config.targets[name]),
            }
            for name in chosen
        ]
    }


def build_shard_matrix(config: Config, shards: int, only: list[str] | None = None) -> dict[str, Any]:
    """{"include": [{"target", "runs-on", "shard": "K/N"}, ...]}: one `mlci tune --shard K/N` job per
    target and shard, on the runners that target's bench job uses (tuning records are only valid on
    the machine kind that made them). Empty when `shards` is 0."""
    if shards < 0:
        raise MatrixError(f"--shards {shards}: expected 0 (no sharded tuning) or more")
    targets = build_matrix(config, only)["include"]
    return {
        "include": [
            {"target": entry["target"], "runs-on": entry["runs-on"], "shard": f"{index}/{shards}"}
            for entry in targets for index in range(1, shards + 1)
        ]
    }
