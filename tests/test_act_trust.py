"""The plan job under act on the events whose trust tier matters most: the nightly's bare `schedule`
payload and a fork's pull request.

The starter workflows call the reusable workflow as a consumer's repository does; the reusable
workflow is this tree's, cut down to its real `plan` job (the jobs after it are what the other act
tests run), so each run costs seconds. What is asserted is what the plan hands the later jobs:
the tier, the AWS role, whether the cache URL and a machine are given, and which targets run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import git, new_git_repo
from .events import FORK, MIXED_TARGETS
from .test_act_e2e import REPOSITORY, ROOT, run_act, tail, world  # noqa: F401 - world is a fixture

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def plan_only(world: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # noqa: F811
    """A consumer repository with the starters, and an action tree whose reusable workflow is its plan job alone."""
    action = tmp_path_factory.mktemp("action") / "mlci"
    shutil.copytree(world["action"], action)
    reusable = action / ".github" / "workflows" / "mlci.yml"
    workflow = yaml.safe_load(reusable.read_text())
    workflow["jobs"] = {"plan": workflow["jobs"]["plan"]}
    workflow[True]["workflow_call"]["outputs"] = {}  # they name the report job
    reusable.write_text(yaml.safe_dump(workflow, sort_keys=False).replace("true:", "on:", 1))
    root = tmp_path_factory.mktemp("trust")
    new_git_repo(root)
    (root / ".github" / "workflows").mkdir(parents=True)
    for name in ("mlci.yml", "mlci-nightly.yml"):
        shutil.copyfile(ROOT / "workflows" / name, root / ".github" / "workflows" / name)
    (root / "mlci.toml").write_text(MIXED_TARGETS)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "three targets")
    return root, {**world, "action": action}


def plan_outputs(log: str) -> dict[str, str]:
    """The outputs act saw the plan job's matrix step set (act logs each one)."""
    found = {}
    for line in log.splitlines():
        if "/plan]" in line and "::set-output:: " in line:
            key, _, value = line.split("::set-output:: ", 1)[1].partition("=")
            found.setdefault(key, value)
    return found


def test_the_nightly_on_a_bare_schedule_payload_is_the_default_branch(plan_only: tuple[Path, dict]) -> None:
    root, trimmed = plan_only
    done = run_act(root, trimmed, "main", "schedule", event=("schedule", {"schedule": "17 3 * * *"}),
                   workflow=".github/workflows/mlci-nightly.yml")
    outputs = plan_outputs(done.stdout + done.stderr)
    assert done.returncode == 0, tail(done, 80)
    assert (outputs.get("trust"), outputs.get("role"), outputs.get("cache"), outputs.get("launch")) == (
        "default-branch", "default-branch", "true", "true"), tail(done, 80)
    assert outputs["default-branch"] == "main" and outputs["targets"] == "cpu arm lab gpu"


def test_a_forks_pull_request_gets_no_role_no_cache_url_no_machine_and_only_hosted_targets(
        plan_only: tuple[Path, dict]) -> None:
    root, trimmed = plan_only
    head = git(root, "rev-parse", "main")
    event = {"action": "synchronize", "number": 9, "repository": REPOSITORY, "pull_request": {
        "number": 9, "head": {"sha": head, "ref": "patch-1", "repo": FORK},
        "base": {"sha": head, "ref": "main", "repo": REPOSITORY}}}
    done = run_act(root, trimmed, "main", "fork", event=("pull_request", event), workflow=".github/workflows/mlci.yml")
    log = done.stdout + done.stderr
    outputs = plan_outputs(log)
    assert done.returncode == 0, tail(done, 80)
    assert (outputs.get("trust"), outputs.get("role"), outputs.get("cache"), outputs.get("launch")) == (
        "fork", "none", "false", "false"), tail(done, 80)
    assert outputs["targets"] == "cpu arm" and outputs["launch-targets"] == "" and outputs["hosted-targets"] == "cpu arm"
    assert "target lab does not run for this fork run" in log and "target gpu does not run for this fork run" in log
