"""One trust policy: the tier of a run, computed once from GitHub's own event payloads, decides the
S3 tier it writes, progressive tuning, registration, launching, its AWS role and cache URL, and the
targets a fork may run on; `mlci matrix` hands the same answer to the workflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlci.actions import GitHubContext
from mlci.policy import Tier, trust_of

from .events import MIXED_TARGETS, actions_env, matrix_outputs, run_kinds

EXPECTED = {
    # kind: (tier, role, cache URL given, may launch, writes the shared tier, registers)
    "push to the default branch": ("default-branch", "default-branch", True, True, True, True),
    "schedule": ("default-branch", "default-branch", True, True, True, True),
    "manual run on the default branch": ("default-branch", "default-branch", True, True, True, True),
    "push to a branch": ("other", "none", True, True, False, True),  # registers only if [tracking] register names it
    "manual run on a branch": ("other", "none", True, True, False, True),
    "push of a tag": ("other", "none", True, True, False, False),
    "same-repository pull request": ("pull-request", "pull-request", True, True, False, False),
    "fork pull request": ("fork", "none", False, False, False, False),
    "pull request from a deleted fork": ("fork", "none", False, False, False, False),
    "workflow_run of the default branch": ("default-branch", "default-branch", True, True, True, True),
    "workflow_run of a fork": ("fork", "none", False, False, False, False),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_each_kind_of_run_gets_its_tier_from_githubs_own_payload(kind: str, tmp_path: Path) -> None:
    tier, role, cache, launch, writes, registers = EXPECTED[kind]
    trust = GitHubContext.from_env(actions_env(tmp_path, kind)).trust
    assert (trust.tier, trust.role, trust.uses_cache_url, trust.may_launch, trust.writes_shared_cache,
            trust.may_register) == (tier, role, cache, launch, writes, registers), trust.reason
    assert trust.progressive is writes  # only the runs that fill the shared tier spend the budget anew


def test_a_schedule_whose_payload_names_no_repository_is_the_default_branch(tmp_path: Path) -> None:
    """GitHub may give a schedule the bare {"schedule": CRON}: it runs on the default branch, which GITHUB_REF names."""
    ctx = GitHubContext.from_env(actions_env(tmp_path, "schedule"))
    assert ctx.event == {"schedule": "17 3 * * *"}
    assert ctx.trust.tier is Tier.DEFAULT_BRANCH and ctx.default_branch == "master"
    tier, writes = ctx.trust.cache_tier(pr_writes=True, local_writes=False)
    assert (tier, writes) == ("main", True)  # the nightly fills the shared tier


def test_a_tag_named_like_the_default_branch_is_not_that_branch(tmp_path: Path) -> None:
    env = actions_env(tmp_path, "push of a tag", GITHUB_REF="refs/tags/master", GITHUB_REF_NAME="master")
    ctx = GitHubContext.from_env(env)
    assert ctx.trust.tier is Tier.OTHER and ctx.branch is None and not ctx.trust.may_register


def test_pull_requests_read_the_shared_tier_and_write_their_own(tmp_path: Path) -> None:
    trust = GitHubContext.from_env(actions_env(tmp_path, "same-repository pull request")).trust
    assert trust.cache_tier(pr_writes=True, local_writes=True) == ("pr-2", True)
    assert trust.cache_tier(pr_writes=False, local_writes=True) == ("pr-2", False)
    for kind in ("push to a branch", "fork pull request", "push of a tag"):
        assert GitHubContext.from_env(actions_env(tmp_path, kind)).trust.cache_tier(
            pr_writes=True, local_writes=True) == ("main", False), kind
    local = trust_of(None, {}, in_actions=False)
    assert local.tier is Tier.LOCAL and local.cache_tier(pr_writes=False, local_writes=True) == ("main", True)
    assert local.cache_tier(pr_writes=True, local_writes=False) == ("main", False) and not local.progressive


def test_unknown_events_and_missing_payloads_are_never_trusted() -> None:
    assert trust_of("issue_comment", {"issue": {"number": 3, "pull_request": {}}}, ref="refs/heads/main").tier is Tier.OTHER
    assert not trust_of("issue_comment", {}, ref="refs/heads/main").may_register
    # a push whose payload lost its repository: the default branch cannot be told, so not the default branch
    assert trust_of("push", {}, ref="refs/heads/main").tier is Tier.OTHER
    assert trust_of("pull_request", {}, ref="refs/pull/1/merge").tier is Tier.FORK  # no head repository: a fork


CONFIG = MIXED_TARGETS


def test_mlci_matrix_hands_the_workflow_the_tier_and_role(tmp_path: Path) -> None:
    config = tmp_path / "mlci.toml"
    config.write_text(CONFIG)
    for kind, (tier, role, cache, launch, _, _) in EXPECTED.items():
        outputs = matrix_outputs(config, tmp_path, kind)
        assert (outputs["trust"], outputs["role"], outputs["cache"], outputs["launch"]) == (
            tier, role, str(cache).lower(), str(launch).lower()), kind
    assert matrix_outputs(config, tmp_path, "schedule")["default-branch"] == "master"


def test_a_forks_pull_request_runs_only_on_githubs_hosted_runners_unless_the_workflow_opts_in(tmp_path: Path) -> None:
    config = tmp_path / "mlci.toml"
    config.write_text(CONFIG)
    fork = matrix_outputs(config, tmp_path, "fork pull request")
    assert fork["targets"] == "cpu arm" and fork["launch-targets"] == "" and fork["shard-matrix"] == '{"include":[]}'
    assert '"lab"' not in fork["matrix"] and '"gpu"' not in fork["matrix"]
    opted_in = matrix_outputs(config, tmp_path, "fork pull request", "--fork-self-hosted")
    assert opted_in["targets"] == "cpu arm lab" and opted_in["launch-targets"] == ""  # a launched machine: never
    same = matrix_outputs(config, tmp_path, "same-repository pull request")
    assert same["targets"] == "cpu arm lab gpu" and same["launch-targets"] == "gpu"
    # shards meet on S3, which a fork's pull request is never given: it gets none, whatever is asked
    assert matrix_outputs(config, tmp_path, "fork pull request", "--shards", "2")["shard-matrix"] == '{"include":[]}'
    assert '"shard":"2/2"' in matrix_outputs(config, tmp_path, "same-repository pull request", "--shards", "2")["shard-matrix"]


def test_the_plan_log_says_the_tier_and_which_targets_a_fork_does_not_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlci.cli import app

    config = tmp_path / "mlci.toml"
    config.write_text(CONFIG)
    done = CliRunner().invoke(app, ["matrix", "-c", str(config)], env=actions_env(tmp_path, "fork pull request"))
    assert "trust: fork (pull_request from mallory/Hello-World into Codertocat/Hello-World)" in done.output
    assert "target gpu does not run for this fork run: it launches a machine" in done.output
    assert "target lab does not run for this fork run: runs_on ['self-hosted', 'bench-box']" in done.output


def test_every_kind_the_tests_use_is_expected() -> None:
    assert set(run_kinds()) == set(EXPECTED)


def test_the_plan_warns_where_a_launched_machine_would_power_off_before_its_bench_job_may_end(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mlci.cli import app

    config = tmp_path / "mlci.toml"
    config.write_text(CONFIG.replace('subnets = ["subnet-0a1b2c3d"] }', 'subnets = ["subnet-0a1b2c3d"], max_minutes = 60 }'))
    env = actions_env(tmp_path, "push to the default branch")
    long_jobs = CliRunner().invoke(app, ["matrix", "-c", str(config), "--job-minutes", "120"], env=env)
    assert long_jobs.exit_code == 0
    assert "::warning title=mlci::targets.gpu.launch.max_minutes = 60" in long_jobs.output
    assert "shorter than the bench job's timeout-minutes (120)" in long_jobs.output
    short_jobs = CliRunner().invoke(app, ["matrix", "-c", str(config), "--job-minutes", "45"], env=env)
    assert short_jobs.exit_code == 0 and "max_minutes" not in short_jobs.output
