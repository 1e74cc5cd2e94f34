"""`mlci matrix`: the plan job's target matrix, one bench job per target with its runner labels.

Pure: reads only the parsed config and the run's trust tier (mlci.policy), so the plan job needs
neither TVM nor a GPU to run it. A fork's pull request gets only the targets that run on GitHub's own
machines: a self-hosted runner would run the fork's code (its `prepare`, its models) on a machine of
this repository's owners, and a launched one gets a runner registered to this repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mlci.config import HOST_TARGET, Config, TargetConfig
from mlci.launch import launch_id, launch_id_problem
from mlci.policy import Tier, Trust
from mlci.targets import GPU_KINDS

GITHUB_X64 = "ubuntu-latest"
GITHUB_ARM = "ubuntu-24.04-arm"
_ARM_HINTS = ("aarch64", "arm64", "armv8", "armv9", "neoverse", "cortex-a", "apple-")
_GITHUB_HOSTED = re.compile(r"(ubuntu|windows|macos)-(latest|\d[\w.-]*)")
"""Labels of GitHub's standard hosted runners (ubuntu-latest, ubuntu-24.04-arm, macos-15, ...)."""


def github_hosted(labels: list[str]) -> bool:
    """Whether `runs-on` names one of GitHub's standard hosted machines (fresh for every job, owned by GitHub)."""
    return len(labels) == 1 and _GITHUB_HOSTED.fullmatch(labels[0]) is not None


@dataclass
class Plan:
    """The bench jobs of one run: the matrix entries, and the targets left out for this run's tier with why."""

    include: list[dict[str, Any]] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    def matrix(self) -> dict[str, Any]:
        return {"include": self.include}


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


def build_matrix(config: Config, only: list[str] | None = None, *, run_id: str = "local",
                 attempt: str = "1", trust: Trust | None = None, fork_self_hosted: bool = False) -> Plan:
    """The bench jobs, in config order: {"target", "runs-on", "kind"} per target, for `strategy.matrix`.

    A target with `launch` gets its machine from `mlci runner start`: its entry has the `launch-id`
    and no `runs-on` (its bench job runs on the label start outputs, see launch.runner_label). A fork's
    pull request (`trust`) gets no launched target, and no self-hosted one unless the workflow opts in
    (`fork_self_hosted`)."""
    names = list(config.targets)
    unknown = [name for name in only or [] if name not in config.targets]
    if unknown:
        raise MatrixError(
            f"{config.path}: unknown target(s) {', '.join(map(repr, unknown))}; the config has {', '.join(names)}"
        )
    fork = trust is not None and trust.tier is Tier.FORK
    plan = Plan()
    for name in [name for name in names if not only or name in only]:
        target = config.targets[name]
        entry: dict[str, Any] = {"target": name, "runs-on": list(target.runs_on or default_runs_on(target)),
                                 "kind": target_kind(target)}
        if target.launch is not None:
            if fork:
                plan.left_out[name] = "it launches a machine, and a fork's pull request never gets one"
                continue
            entry["launch-id"] = launch_id(run_id, attempt, name)
            problem = launch_id_problem(entry["launch-id"])
            if problem:
                raise MatrixError(f"{config.path}: targets.{name}: {problem} (shorten the target's name)")
            # Its runs-on is the label `mlci runner start` outputs for it (an HMAC nobody else can compute).
            del entry["runs-on"]
        elif fork and not fork_self_hosted and not github_hosted(entry["runs-on"]):
            plan.left_out[name] = (f"runs_on {entry['runs-on']} is not one of GitHub's hosted runners, and a fork's "
                                   "pull request runs only there (the workflow's fork-self-hosted input opts in)")
            continue
        plan.include.append(entry)
    return plan


def short_dead_man(config: Config, plan: Plan, job_minutes: int | None) -> list[str]:
    """One line per launched target whose dead-man timer (`max_minutes`) is shorter than its bench job may
    run (`job_minutes`, the workflow's timeout-minutes): the machine would power off under a long job, which
    the report could only show as a failed target."""
    if not job_minutes:
        return []
    lines = []
    for entry in plan.include:
        launch = config.targets[entry["target"]].launch
        if "launch-id" in entry and launch is not None and launch.max_minutes < job_minutes:
            lines.append(f"targets.{entry['target']}.launch.max_minutes = {launch.max_minutes} in {config.path} is "
                         f"shorter than the bench job's timeout-minutes ({job_minutes}): a job that runs that long "
                         "loses its machine; raise max_minutes or lower timeout-minutes")
    return lines


def split_launched(plan: Plan) -> tuple[dict[str, Any], dict[str, Any]]:
    """The matrix of targets on runners that exist, and that of targets whose machine is launched
    (their bench jobs wait for `mlci runner start`, and `mlci runner stop` follows them)."""
    include = plan.include
    return ({"include": [e for e in include if "launch-id" not in e]},
            {"include": [e for e in include if "launch-id" in e]})


def build_shard_matrix(config: Config, shards: int, only: list[str] | None = None,
                       trust: Trust | None = None, fork_self_hosted: bool = False) -> dict[str, Any]:
    """{"include": [{"target", "runs-on", "shard": "K/N"}, ...]}: one `mlci tune --shard K/N` job per
    target and shard, on the runners that target's bench job uses (tuning records are only valid on
    the machine kind that made them). Empty when `shards` is 0, or when the run gets no S3 cache URL (a
    fork's pull request: the shards' records could not meet); targets with `launch` are not sharded."""
    if shards < 0:
        raise MatrixError(f"--shards {shards}: expected 0 (no sharded tuning) or more")
    if trust is not None and not trust.uses_cache_url:
        return {"include": []}
    # A launched machine serves its bench job alone.
    targets, _ = split_launched(build_matrix(config, only, trust=trust, fork_self_hosted=fork_self_hosted))
    return {
        "include": [
            {"target": entry["target"], "runs-on": entry["runs-on"], "shard": f"{index}/{shards}"}
            for entry in targets["include"] for index in range(1, shards + 1)
        ]
    }
