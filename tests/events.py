"""GitHub event payloads for the trust tests, and `mlci matrix` run on one as the plan job runs it.

The payloads are GitHub's documented examples (tests/data/events, see its README); a fork's pull
request or workflow_run is derived from them by changing only the head repository.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from typer.testing import CliRunner

EVENTS = Path(__file__).resolve().parent / "data" / "events"
FORK = {"id": 99, "name": "Hello-World", "full_name": "mallory/Hello-World", "fork": True,
        "owner": {"login": "mallory", "id": 99, "type": "User"}}


def event(name: str) -> dict:
    return json.loads((EVENTS / f"{name}.json").read_text())


def from_fork(payload: dict, head_repo: dict | None = FORK) -> dict:
    """The same pull_request or workflow_run payload, its head in another repository (None: a deleted one)."""
    forked = copy.deepcopy(payload)
    if "pull_request" in forked:
        forked["pull_request"]["head"]["repo"] = copy.deepcopy(head_repo)
    if "workflow_run" in forked:
        forked["workflow_run"]["head_repository"] = copy.deepcopy(head_repo)
    return forked


# kind -> (GITHUB_EVENT_NAME, payload, GITHUB_REF, GITHUB_REF_TYPE): every kind of run the tests reason about.
def run_kinds() -> dict[str, tuple[str, dict, str, str]]:
    push, tag, pr, dispatch, run = (event(n) for n in ("push", "push-tag", "pull_request", "workflow_dispatch",
                                                        "workflow_run"))
    default = push["repository"]["default_branch"]
    branch_push = {**push, "ref": "refs/heads/topic"}
    pr_ref = f"refs/pull/{pr['number']}/merge"
    return {
        "push to the default branch": ("push", push, push["ref"], "branch"),
        "push to a branch": ("push", branch_push, "refs/heads/topic", "branch"),
        "push of a tag": ("push", tag, tag["ref"], "tag"),
        "schedule": ("schedule", {"schedule": "17 3 * * *"}, f"refs/heads/{default}", "branch"),
        "manual run on the default branch": ("workflow_dispatch", dispatch, dispatch["ref"], "branch"),
        "manual run on a branch": ("workflow_dispatch", {**dispatch, "ref": "refs/heads/topic"}, "refs/heads/topic",
                                   "branch"),
        "same-repository pull request": ("pull_request", pr, pr_ref, "branch"),
        "fork pull request": ("pull_request", from_fork(pr), pr_ref, "branch"),
        "pull request from a deleted fork": ("pull_request", from_fork(pr, None), pr_ref, "branch"),
        "workflow_run of the default branch": ("workflow_run", run, f"refs/heads/{run['repository']['default_branch']}",
                                               "branch"),
        "workflow_run of a fork": ("workflow_run", from_fork(run), f"refs/heads/{run['repository']['default_branch']}",
                                   "branch"),
    }


def actions_env(tmp: Path, kind: str, **extra: str) -> dict[str, str]:
    """The GITHUB_* variables of one run of `kind`, its payload written under `tmp`."""
    name, payload, ref, ref_type = run_kinds()[kind]
    path = tmp / f"event-{abs(hash(kind))}.json"
    path.write_text(json.dumps(payload))
    repository = (payload.get("repository") or {}).get("full_name") or "Codertocat/Hello-World"
    return {"GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": name, "GITHUB_EVENT_PATH": str(path), "GITHUB_REF": ref,
            "GITHUB_REF_TYPE": ref_type, "GITHUB_REF_NAME": ref.rsplit("/", 1)[-1] if ref_type == "tag" else
            ref.removeprefix("refs/heads/"), "GITHUB_REPOSITORY": repository, "GITHUB_RUN_ID": "4242",
            "GITHUB_RUN_ATTEMPT": "1", **extra}


def matrix_outputs(config: Path, tmp: Path, kind: str, *args: str, **extra: str) -> dict[str, str]:
    """Run `mlci matrix` as the plan job does for a run of `kind`; its step outputs (GITHUB_OUTPUT)."""
    from mlci.cli import app

    output = tmp / f"outputs-{abs(hash((kind, args)))}.txt"
    output.write_text("")
    env = actions_env(tmp, kind, GITHUB_OUTPUT=str(output), **extra)
    done = CliRunner().invoke(app, ["matrix", "-c", str(config), *args], env=env)
    assert done.exit_code == 0, done.output
    found = {}
    for line in output.read_text().splitlines():
        key, _, value = line.partition("=")
        found[key] = value
    return found


MIXED_TARGETS = """
[targets.cpu]
[targets.arm]
tvm = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "neoverse-n1" }
[targets.lab]
runs_on = ["self-hosted", "bench-box"]
[targets.gpu]
tvm = { kind = "cuda", arch = "sm_86" }
launch = { region = "us-east-1", instance_type = "g5.xlarge", image = "ami-0123456789abcdef0", subnets = ["subnet-0a1b2c3d"] }
[[models]]
path = "m.onnx"
"""
"""A config with a target of every kind of runner: GitHub-hosted x64 and Arm, self-hosted, launched."""
