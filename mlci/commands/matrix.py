"""`mlci matrix`: the plan job's target matrix, one bench job per target with its runner labels.

Pure: reads only the parsed config, so the plan job needs neither TVM nor a GPU to run it.
"""

from __future__ import annotations

from typing import Any

from mlci.config import HOST_TARGET, Config, TargetConfig
from mlci.launch import launch_id_problem, runner_label
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


def launch_id(run_id: str, attempt: str, target: str) -> str:
    """The id of one launched machine: this workflow run, this attempt, this target (a rerun launches anew)."""
    return f"{run_id}-{attempt}-{target}"


def build_matrix(config: Config, only: list[str] | None = None, *, run_id: str = "local",
                 attempt: str = "1") -> dict[str, Any]:
    """{"include": [{"target", "runs-on", "kind"}, ...]} in config order, for `strategy.matrix: fromJSON(...)`.

    A target with `launch` gets its machine from `mlci runner start`: its entry has the `launch-id`
    and, as `runs-on`, the one label the machine's just-in-time runner carries."""
    names = list(config.targets)
    unknown = [name for name in only or [] if name not in config.targets]
    if unknown:
        raise MatrixError(
            f"{config.path}: unknown target(s) {', '.join(map(repr, unknown))}; the config has {', '.join(names)}"
        )
    chosen = [name for name in names if not only or name in only]
    include = []
    for name in chosen:
        target = config.targets[name]
        entry: dict[str, Any] = {"target": name, "runs-on": list(target.runs_on or default_runs_on(target)),
                                 "kind": target_kind(target)}
        if target.launch is not None:
            entry["launch-id"] = launch_id(run_id, attempt, name)
            problem = launch_id_problem(entry["launch-id"])
            if problem:
                raise MatrixError(f"{config.path}: targets.{name}: {problem} (shorten the target's name)")
            entry["runs-on"] = [runner_label(entry["launch-id"])]
        include.append(entry)
    return {"include": include}


def split_launched(plan: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The matrix of targets on runners that exist, and that of targets whose machine is launched
    (their bench jobs wait for `mlci runner start`, and `mlci runner stop` follows them)."""
    include = plan["include"]
    return ({"include": [e for e in include if "launch-id" not in e]},
            {"include": [e for e in include if "launch-id" in e]})


def build_shard_matrix(config: Config, shards: int, only: list[str] | None = None) -> dict[str, Any]:
    """{"include": [{"target", "runs-on", "shard": "K/N"}, ...]}: one `mlci tune --shard K/N` job per
    target and shard, on the runners that target's bench job uses (tuning records are only valid on
    the machine kind that made them). Empty when `shards` is 0; targets with `launch` are not sharded."""
    if shards < 0:
        raise MatrixError(f"--shards {shards}: expected 0 (no sharded tuning) or more")
    targets, _ = split_launched(build_matrix(config, only))  # a launched machine serves its bench job alone
    return {
        "include": [
            {"target": entry["target"], "runs-on": entry["runs-on"], "shard": f"{index}/{shards}"}
            for entry in targets["include"] for index in range(1, shards + 1)
        ]
    }
