"""The action, the reusable workflow and the starter workflows: what no linter checks.

GitHub only finds reusable workflows directly in .github/workflows/, and inside one `uses: ./`
means the caller's repository: both mistakes pass every linter and break every
user. Also checked here: the files agree with each other (inputs, secrets, the mlci ref), the
plan/report jobs' light install really needs no TVM, and, by evaluating the workflows' own
expressions for each kind of event (tests/gh_expr.py), who gets which AWS role and cache URL.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from mlci.commands.matrix import MatrixError, build_matrix, build_shard_matrix, default_runs_on, split_launched
from mlci.config import TargetConfig, parse_config

from .events import matrix_outputs, run_kinds
from .gh_expr import condition, render

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
REUSABLE = ROOT / ".github" / "workflows" / "mlci.yml"
STARTERS = sorted((ROOT / "workflows").glob("*.yml"))
MLCI_REPO = "mlci-dev/mlci"


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def all_workflow_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules", ".mlci"}
    return sorted(
        p for p in ROOT.rglob("*.y*ml")
        if p.suffix in (".yml", ".yaml") and not skip & set(p.relative_to(ROOT).parts)
    )


def steps_and_jobs(path: Path) -> list[dict]:
    """Every step and job mapping of a workflow or action (whatever may carry `uses:`)."""
    data = load(path)
    found = list(data.get("runs", {}).get("steps", []))
    for job in data.get("jobs", {}).values():
        found.append(job)
        found += job.get("steps", [])
    return found


def test_every_reusable_workflow_sits_directly_in_github_workflows():
    reusable = [p for p in all_workflow_files() if "tests" not in p.relative_to(ROOT).parts
                and isinstance(load(p).get("on"), dict) and "workflow_call" in load(p)["on"]]
    assert reusable, "the reusable workflow was not found"
    for path in reusable:
        assert path.parent == ROOT / ".github" / "workflows", f"{path}: GitHub only finds workflow_call workflows there"


@pytest.mark.parametrize("path", [ACTION, REUSABLE, *STARTERS], ids=lambda p: str(p.relative_to(ROOT)))
def test_mlci_is_called_by_owner_repo_at_one_ref_never_dot_slash(path: Path):
    for item in steps_and_jobs(path):
        uses = item.get("uses")
        if not uses:
            continue
        assert not uses.startswith("./"), f"{path}: `uses: {uses}` resolves in the caller's repository"
        if uses.startswith(MLCI_REPO):
            assert re.fullmatch(rf"{MLCI_REPO}(/\.github/workflows/mlci\.yml)?@v0", uses), uses


@pytest.mark.parametrize("path", [ACTION, REUSABLE, *STARTERS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_expression_is_pasted_into_a_script(path: Path):
    for item in steps_and_jobs(path):
        assert "${{" not in (item.get("run") or ""), f"{path}: pass values through env:, not into run:"


@pytest.mark.parametrize("path", [REUSABLE, *STARTERS], ids=lambda p: str(p.relative_to(ROOT)))
def test_least_privilege_permissions(path: Path):
    data = load(path)
    assert data.get("permissions") == {}, f"{path}: the workflow's default token should have no permission"
    for name, job in data["jobs"].items():
        assert "permissions" in job, f"{path}: job {name} must say which permissions it needs"
        assert "write-all" not in str(job["permissions"])
        writes = {k for k, v in job["permissions"].items() if v == "write"}
        assert writes <= {"pull-requests", "statuses", "id-token"}, f"{path}: job {name} writes {writes}"


def test_only_the_report_job_can_write():
    jobs = load(REUSABLE)["jobs"]
    assert jobs["plan"]["permissions"] == {"contents": "read"}
    assert jobs["bench"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert jobs["tune"]["permissions"] == {"contents": "read", "id-token": "write"}
    assert jobs["report"]["permissions"]["pull-requests"] == "write"


def test_only_bench_and_tune_jobs_may_mint_an_oidc_token():
    """id-token: write lets a job prove to AWS which repository and ref it runs for: only the jobs that
    assume a role get it. A caller must grant it to the reusable workflow (GitHub caps a called job's
    permissions by its caller's), and the fork stage, which handles a fork's data, never has it."""
    for name, job in load(REUSABLE)["jobs"].items():
        if job["permissions"].get("id-token") == "write":
            assert name in {"bench", "tune", "bench-launched", "start", "stop"}, f"job {name} can mint OIDC tokens"
    for path in STARTERS:
        for name, job in load(path)["jobs"].items():
            calls_reusable = str(job.get("uses", "")).startswith(f"{MLCI_REPO}/.github/workflows/")
            assumes_a_role = any(str(s.get("uses", "")).startswith("aws-actions/") for s in job.get("steps", []))
            assert (job["permissions"].get("id-token") == "write") == (calls_reusable or assumes_a_role), \
                f"{path.name}: job {name}"


def test_reusable_workflow_steps_pass_only_inputs_the_action_has():
    inputs = set(load(ACTION)["inputs"])
    for item in steps_and_jobs(REUSABLE):
        if str(item.get("uses", "")).startswith(f"{MLCI_REPO}@"):
            assert set(item.get("with", {})) <= inputs, set(item["with"]) - inputs


@pytest.mark.parametrize("path", STARTERS, ids=lambda p: p.name)
def test_starter_workflows_call_the_reusable_workflow_with_what_it_declares(path: Path):
    call = load(REUSABLE)["on"]["workflow_call"]
    action_inputs = set(load(ACTION)["inputs"])
    for job in load(path)["jobs"].values():
        if str(job.get("uses", "")).startswith(f"{MLCI_REPO}/"):
            assert set(job.get("with", {})) <= set(call["inputs"])
            assert set(job.get("secrets", {})) <= set(call["secrets"])
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith(f"{MLCI_REPO}@"):
                assert set(step.get("with", {})) <= action_inputs


def test_the_fork_stage_never_checks_out_or_runs_the_forks_code():
    comment = load(ROOT / "workflows" / "mlci-comment.yml")
    assert set(comment["on"]) == {"workflow_run"}
    for job in comment["jobs"].values():
        assert "head_repository.full_name != github.repository" in job["if"]
        for step in job["steps"]:
            assert not str(step.get("uses", "")).startswith("actions/checkout")
            assert "run" not in step
    pr = load(ROOT / "workflows" / "mlci.yml")
    assert "pull_request_target" not in pr["on"]


def step(job: dict, *, id: str | None = None, uses: str | None = None, name: str | None = None) -> dict:
    """The one step of `job` with this id, this `uses:` prefix or this name."""
    found = [s for s in job["steps"] if (id is None or s.get("id") == id)
             and (uses is None or str(s.get("uses", "")).startswith(uses)) and (name is None or s.get("name") == name)]
    assert len(found) == 1, (id, uses, name, found)
    return found[0]


def test_results_artifacts_are_uploaded_even_when_a_model_failed():
    bench = load(REUSABLE)["jobs"]["bench"]
    checkout = step(bench, uses="actions/checkout")
    run = step(bench, id="run")
    upload = step(bench, name="Upload the results")
    assert bench["steps"].index(checkout) < bench["steps"].index(run) < bench["steps"].index(upload)
    assert checkout["with"]["fetch-depth"] == 0 and checkout["with"]["persist-credentials"] is False
    assert run["with"]["allow-failures"] == "true"
    assert upload["if"].startswith("always()")
    assert "${{ matrix.target }}" in upload["with"]["name"]


def test_the_results_artifact_carries_the_mlflow_work_a_run_could_not_log():
    upload = step(load(REUSABLE)["jobs"]["bench"], name="Upload the results")
    paths = upload["with"]["path"].splitlines()
    assert paths == ["${{ steps.run.outputs.results-path }}", "${{ steps.run.outputs.results-path }}.mlflow-pending"]


def test_the_report_job_logs_pending_mlflow_work_before_it_compares():
    """So the comment links the runs; a sync that fails again leaves the work in the artifact and
    never keeps the verdict from being reported."""
    report = load(REUSABLE)["jobs"]["report"]
    sync = step(report, uses=f"{MLCI_REPO}@", name="Log to MLflow what a bench job could not")
    compare = step(report, id="compare")
    download = step(report, uses="actions/download-artifact")
    assert report["steps"].index(download) < report["steps"].index(sync) < report["steps"].index(compare)
    assert sync["with"]["command"] == "sync" and sync["with"]["results"] == download["with"]["path"]
    assert sync["if"] == f"hashFiles('{download['with']['path']}/**/*.mlflow-pending') != ''"
    assert sync["continue-on-error"] is True
    assert sync["with"]["tracking-uri"] == compare["with"]["tracking-uri"] == "${{ inputs.tracking-uri }}"
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"} <= set(sync["env"])
    assert "id-token" not in report["permissions"]


def test_starter_branch_marker_is_where_mlci_init_expects_it():
    text = (ROOT / "workflows" / "mlci.yml").read_text()
    assert text.count("[main]  # mlci init: the default branch") == 1


# -- mlci matrix ------------------------------------------------------------------------------------------------------


def test_matrix_one_entry_per_target_with_runner_labels(tmp_path: Path):
    config = parse_config(
        """
        [targets.cpu]
        tvm = "host"
        [targets.arm]
        tvm = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "neoverse-n1" }
        [targets.gpu]
        tvm = { kind = "cuda", arch = "sm_80" }
        [targets.lab]
        tvm = "host"
        runs_on = ["self-hosted", "bench-box"]
        [[models]]
        path = "m.onnx"
        """,
        tmp_path / "mlci.toml",
    )
    plan = build_matrix(config)
    assert plan.matrix() == {"include": [
        {"target": "cpu", "runs-on": ["ubuntu-latest"], "kind": "llvm"},
        {"target": "arm", "runs-on": ["ubuntu-24.04-arm"], "kind": "llvm"},
        {"target": "gpu", "runs-on": ["self-hosted", "linux", "gpu"], "kind": "cuda"},
        {"target": "lab", "runs-on": ["self-hosted", "bench-box"], "kind": "llvm"},
    ]}
    assert build_matrix(config, only=["gpu"]).include[0]["target"] == "gpu"
    assert default_runs_on(TargetConfig("x", {"kind": "llvm", "mcpu": "apple-m1"})) == ["ubuntu-24.04-arm"]


def test_matrix_cli_prints_json_and_writes_the_step_outputs(tmp_path: Path):
    (tmp_path / "mlci.toml").write_text('[targets.a]\n[targets.b]\nruns_on = "macos-14"\n[[models]]\npath = "m.onnx"\n')
    output = tmp_path / "out.txt"
    done = subprocess.run(
        [sys.executable, "-m", "mlci.cli", "matrix", "-c", str(tmp_path / "mlci.toml")],
        capture_output=True, text=True, env={"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(output), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["include"][1] == {"target": "b", "runs-on": ["macos-14"], "kind": "llvm"}
    assert "targets=a b\n" in output.read_text()
    bad = subprocess.run([sys.executable, "-m", "mlci.cli", "matrix", "-c", str(tmp_path / "mlci.toml"), "-t", "c"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown target(s) 'c'" in bad.stderr


def test_bad_runs_on_and_target_names_are_config_errors(tmp_path: Path):
    from mlci.config import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config('[targets.cpu]\nruns_on = []\n[targets."a b"]\n[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    text = str(err.value)
    assert "targets.cpu.runs_on: expected a runner label or a list of labels" in text
    assert "targets.a b: a target name may only use letters" in text


def test_plan_and_report_commands_need_no_tvm_mlflow_or_onnx():
    """The action installs only typer, rich, jinja2 and numpy for `matrix` and `compare` (action/install.sh)."""
    code = (
        "import sys, mlci.cli, mlci.commands.matrix, mlci.commands.compare, mlci.gate, mlci.report, mlci.github\n"
        "heavy = sorted(m for m in ('tvm', 'mlflow', 'onnx', 'onnxruntime', 'xgboost') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    install = (ROOT / "action" / "install.sh").read_text()
    assert '{"typer", "rich", "jinja2", "numpy"}' in install


# -- credentials follow trust: the workflows' expressions evaluated per event -----------------------------------------

CACHE_URL = "s3://tuning/widgets"
MAIN_ROLE = "arn:aws:iam::123456789012:role/mlci-cache-main"
PR_ROLE = "arn:aws:iam::123456789012:role/mlci-cache-pr"
REPOSITORY = {"full_name": "octo-org/widgets", "default_branch": "main"}


def github_context(kind: str) -> dict:
    """The `github` context of one kind of run (tests/events.py: GitHub's own example payloads)."""
    name, payload, ref, _ = run_kinds()[kind]
    return {"event_name": name, "ref": ref, "event": payload, "run_id": "4242",
            "repository": (payload.get("repository") or {}).get("full_name", "Codertocat/Hello-World")}


_MATRIX_OUTPUTS: dict[str, dict[str, str]] = {}


def plan_step_outputs(kind: str) -> dict[str, str]:
    """What the plan job's `mlci matrix` step outputs for a run of `kind` (really run, once per kind)."""
    if kind not in _MATRIX_OUTPUTS:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "mlci.toml"
            config.write_text(LAUNCH_CONFIG)
            _MATRIX_OUTPUTS[kind] = matrix_outputs(config, Path(tmp), kind)
    return _MATRIX_OUTPUTS[kind]


def reusable_inputs(**given) -> dict:
    """The reusable workflow's inputs: its defaults, then what the caller gave."""
    declared = load(REUSABLE)["on"]["workflow_call"]["inputs"]
    return {**{name: spec.get("default") for name, spec in declared.items()}, **given}


def plan_outputs(kind: str) -> dict:
    """The plan job as the later jobs see it (`needs.plan`): its outputs from the real `mlci matrix` step."""
    plan = load(REUSABLE)["jobs"]["plan"]
    context = {"steps": {"matrix": {"outputs": plan_step_outputs(kind)}}}
    return {"result": "success", "outputs": {name: render(value, context) for name, value in plan["outputs"].items()}}


def credentials(job_name: str, kind: str, tune_result: str = "skipped", secrets: dict | None = None, **given) -> dict:
    """What one bench or tune job of a run of `kind` is given: the role it assumes (None: no role step),
    the cache URL the action gets, the AWS keys the mlci step sees, and whether the job runs at all."""
    context = {"github": github_context(kind), "inputs": reusable_inputs(**given), "secrets": secrets or {}, "vars": {},
               "matrix": {"target": "cpu", "runs-on": ["ubuntu-latest"], "shard": "1/2"}}
    context["needs"] = {"plan": plan_outputs(kind), "tune": {"result": tune_result, "outputs": {}}}
    job = load(REUSABLE)["jobs"][job_name]
    runs = condition(job.get("if"), context)
    role_step = step(job, id="aws")
    role = None
    aws_outputs = {}
    if condition(role_step.get("if"), context):
        role = render(role_step["with"]["role-to-assume"], context)
        aws_outputs = {"aws-access-key-id": f"ASIA-{role}", "aws-secret-access-key": "s", "aws-session-token": "t"}
    context["steps"] = {"aws": {"outputs": aws_outputs, "outcome": "success" if role else "skipped"}}
    mlci = step(job, uses=f"{MLCI_REPO}@")
    assert job["steps"].index(role_step) < job["steps"].index(mlci)
    return {
        "runs": runs, "role": role, "cache-url": render(mlci["with"].get("cache-url", ""), context),
        "progressive": render(mlci["with"].get("progressive", "auto"), context),
        "env": {k: render(v, context) for k, v in mlci.get("env", {}).items()},
        "region": render(role_step["with"]["aws-region"], context),
    }


ROLES = {"cache-url": CACHE_URL, "aws-role": MAIN_ROLE, "aws-pr-role": PR_ROLE}


@pytest.mark.parametrize(("kind", "role", "cache_url"), [
    ("push to the default branch", MAIN_ROLE, CACHE_URL),
    ("schedule", MAIN_ROLE, CACHE_URL),
    ("manual run on the default branch", MAIN_ROLE, CACHE_URL),
    ("push of a tag", None, CACHE_URL),
    ("workflow_run of a fork", None, "none"),
    ("same-repository pull request", PR_ROLE, CACHE_URL),
    ("push to a branch", None, CACHE_URL),
    ("manual run on a branch", None, CACHE_URL),
    ("fork pull request", None, "none"),
    ("pull request from a deleted fork", None, "none"),
])
def test_each_trust_tier_assumes_its_own_role_and_a_fork_gets_the_s3_cache_turned_off_and_no_role(kind: str, role, cache_url):
    bench = credentials("bench", kind, **ROLES)
    assert bench["runs"] and (bench["role"], bench["cache-url"]) == (role, cache_url)
    if role is None:
        assert bench["env"]["AWS_ACCESS_KEY_ID"] in ("", None) and bench["env"]["AWS_SESSION_TOKEN"] in ("", None)
    tune = credentials("tune", kind, shards=2, **ROLES)
    assert tune["runs"] == (cache_url not in ("", "none"))
    if tune["runs"]:
        assert tune["role"] == role and tune["cache-url"] == CACHE_URL


def test_pull_requests_log_to_mlflow_with_their_own_credentials_and_only_the_default_branch_registers():
    both = {"MLFLOW_TRACKING_TOKEN": "main-token", "MLFLOW_PR_TRACKING_TOKEN": "pr-token"}
    for job in ("bench", "bench-launched"):
        assert credentials(job, "push to the default branch", secrets=both, **ROLES)["env"]["MLFLOW_TRACKING_TOKEN"] == "main-token"
        assert credentials(job, "same-repository pull request", secrets=both, **ROLES)["env"][
            "MLFLOW_TRACKING_TOKEN"] == "pr-token"
        # without the pull-request user, pull requests log as before (the README says what that allows)
        assert credentials(job, "same-repository pull request", secrets={"MLFLOW_TRACKING_TOKEN": "main-token"},
                           **ROLES)["env"]["MLFLOW_TRACKING_TOKEN"] == "main-token"
    sync = step(load(REUSABLE)["jobs"]["report"], name="Log to MLflow what a bench job could not")
    assert sync["with"]["command"] == "sync"
    for kind, registers in (("push to the default branch", True), ("schedule", True),
                            ("same-repository pull request", False), ("push to a branch", False)):
        assert render(sync["with"]["register"], {"needs": {"plan": plan_outputs(kind)}}) is registers, kind
    context = {"needs": {"plan": plan_outputs("same-repository pull request")}, "secrets": both}
    assert render(sync["env"]["MLFLOW_TRACKING_TOKEN"], context) == "pr-token"


def test_no_cache_url_means_no_role_and_a_missing_role_means_none_assumed():
    without_url = credentials("bench", "push to the default branch", **{"aws-role": MAIN_ROLE, "aws-pr-role": PR_ROLE})
    assert without_url["role"] is None and without_url["cache-url"] == ""
    # The PR role is never a stand-in for a missing main role, nor the other way round.
    only_pr = credentials("bench", "push to the default branch", **{"cache-url": CACHE_URL, "aws-pr-role": PR_ROLE})
    assert only_pr["role"] is None
    only_main = credentials("bench", "same-repository pull request", **{"cache-url": CACHE_URL, "aws-role": MAIN_ROLE})
    assert only_main["role"] is None
    assert credentials("bench", "push to the default branch", **ROLES)["region"] == "us-east-1"
    assert credentials("bench", "push to the default branch", **ROLES, **{"aws-region": "eu-west-1"})["region"] == "eu-west-1"


def test_the_roles_keys_win_over_static_keys_which_still_serve_where_no_role_is_assumed():
    """The static AWS secrets (an S3-compatible store, MLflow's artifacts) must not mask the role's
    credentials, which the role step also exports: the step's own env would win over those."""
    for name in ("bench", "tune"):
        job = load(REUSABLE)["jobs"][name]
        role_step = step(job, id="aws")
        assert role_step["with"]["output-credentials"] is True
        mlci_env_uses_the_roles_keys(step(job, uses=f"{MLCI_REPO}@"))


def mlci_env_uses_the_roles_keys(mlci: dict) -> None:
    for with_role in (True, False):
        outputs = {"aws-access-key-id": "ROLEKEY", "aws-secret-access-key": "ROLESECRET",
                   "aws-session-token": "ROLETOKEN"} if with_role else {}
        context = {"steps": {"aws": {"outputs": outputs}}, "inputs": reusable_inputs(),
                   "secrets": {"AWS_ACCESS_KEY_ID": "STATICKEY", "AWS_SECRET_ACCESS_KEY": "STATICSECRET"}}
        env = {k: render(v, context) for k, v in mlci["env"].items() if k.startswith("AWS_")}
        expected = ("ROLEKEY", "ROLESECRET", "ROLETOKEN") if with_role else ("STATICKEY", "STATICSECRET", None)
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env["AWS_SESSION_TOKEN"] or None) == expected


def test_the_starters_pass_the_cache_and_roles_from_repository_variables():
    names = {"cache-url": "MLCI_CACHE_URL", "aws-role": "MLCI_AWS_ROLE", "aws-region": "AWS_REGION"}
    for path in (ROOT / "workflows" / "mlci.yml", ROOT / "workflows" / "mlci-nightly.yml"):
        [job] = load(path)["jobs"].values()
        for given, var in names.items():
            assert job["with"][given] == f"${{{{ vars.{var} }}}}", (path.name, given)
    [job] = load(ROOT / "workflows" / "mlci.yml")["jobs"].values()
    assert job["with"]["aws-pr-role"] == "${{ vars.MLCI_AWS_PR_ROLE }}"
    [nightly] = load(ROOT / "workflows" / "mlci-nightly.yml")["jobs"].values()
    assert "aws-pr-role" not in nightly["with"]  # a schedule is never a pull request
    assert "id-token" not in str(load(ROOT / "workflows" / "mlci-comment.yml"))


# -- the nightly's shards ----------------------------------------------------------------------------------------------


def test_the_nightly_starter_shards_only_when_mlci_shards_is_set():
    [job] = load(ROOT / "workflows" / "mlci-nightly.yml")["jobs"].values()
    assert render(job["with"]["shards"], {"vars": {}}) == 0
    assert render(job["with"]["shards"], {"vars": {"MLCI_SHARDS": "4"}}) == 4
    shards = load(REUSABLE)["on"]["workflow_call"]["inputs"]["shards"]
    assert (shards["type"], shards["default"]) == ("number", 0)  # a number the tune job's `if` compares, off by default
    assert "cache-url" in shards["description"]  # says what else it needs


def test_shards_tune_before_the_bench_which_then_builds_without_searching_again():
    jobs = load(REUSABLE)["jobs"]
    plan, tune, bench, report = jobs["plan"], jobs["tune"], jobs["bench"], jobs["report"]
    # plan emits one tune job per target x shard, on that target's runners
    matrix_step = step(plan, id="matrix")
    assert matrix_step["with"]["shards"] == "${{ inputs.shards }}"
    assert plan["outputs"]["shard-matrix"] == "${{ steps.matrix.outputs.shard-matrix }}"
    assert tune["needs"] == "plan" and tune["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.shard-matrix) }}"
    assert tune["runs-on"] == "${{ matrix.runs-on }}" and tune["strategy"]["fail-fast"] is False
    mlci = step(tune, uses=f"{MLCI_REPO}@")
    assert mlci["with"]["command"] == "tune"
    assert (mlci["with"]["target"], mlci["with"]["shard"]) == ("${{ matrix.target }}", "${{ matrix.shard }}")
    # bench waits for the shards, but runs when there are none (tune skipped) or one failed
    assert set(bench["needs"]) == {"plan", "tune"} and report["needs"] == ["plan", "bench", "bench-launched", "stop"]
    for tune_result in ("skipped", "success", "failure"):
        context = {"needs": {"plan": {"result": "success", "outputs": {"hosted-targets": "cpu"}},
                             "tune": {"result": tune_result}}}
        assert condition(bench["if"], context, status="success" if tune_result == "success" else "failure")
    assert not condition(bench["if"], {"needs": {"plan": {"result": "failure", "outputs": {"hosted-targets": "cpu"}},
                                                 "tune": {"result": "skipped"}}},
                         status="failure")
    # tune runs only with shards and a cache URL; the bench after it searches nothing anew
    assert not credentials("tune", "schedule", **ROLES)["runs"]  # shards = 0
    assert not credentials("tune", "schedule", shards=2)["runs"]  # no S3: nowhere to meet
    assert credentials("tune", "schedule", shards=2, **ROLES)["runs"]
    assert credentials("bench", "schedule", tune_result="success", shards=2, **ROLES)["progressive"] == "false"
    assert credentials("bench", "schedule", tune_result="skipped", **ROLES)["progressive"] == "auto"
    assert credentials("bench", "schedule", tune_result="failure", shards=2, **ROLES)["progressive"] == "auto"


def test_the_action_takes_tune_sync_and_history_and_names_them_when_the_command_is_unknown(tmp_path: Path):
    """run.sh builds each command line from MLCI_* variables; a stand-in `mlci` on PATH echoes it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlci").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "mlci").chmod(0o755)
    results = tmp_path / "mlci-results"
    for target, pending in (("cpu", True), ("gpu", False), ("arm", True)):
        (results / f"mlci-results-{target}").mkdir(parents=True)
        (results / f"mlci-results-{target}" / f"{target}.json").write_text("{}")
        if pending:
            (results / f"mlci-results-{target}" / f"{target}.json.mlflow-pending").write_text("{}")

    def run_sh(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "action" / "run.sh")], capture_output=True, text=True,
                              env={"PATH": f"{bin_dir}:/usr/bin:/bin", "MLCI_CONFIG": "mlci.toml", **env})

    tune = run_sh(MLCI_COMMAND="tune", MLCI_TARGET="cpu", MLCI_SHARD="2/3", MLCI_TRIALS="64",
                  MLCI_INPUT_CACHE_URL="s3://b/p")
    assert tune.stdout.split() == ["tune", "--config", "mlci.toml", "--shard", "2/3", "--target", "cpu", "--trials", "64"]
    assert run_sh(MLCI_COMMAND="tune").returncode == 2  # no shard
    sync = run_sh(MLCI_COMMAND="sync", MLCI_RESULTS=str(results), MLCI_TRACKING_URI="http://mlflow:5000")
    assert sync.stdout.split() == ["sync", "--tracking-uri", "http://mlflow:5000",
                                   str(results / "mlci-results-arm" / "arm.json"), str(results / "mlci-results-cpu" / "cpu.json")]
    for pending in results.rglob("*.mlflow-pending"):
        pending.unlink()
    nothing = run_sh(MLCI_COMMAND="sync", MLCI_RESULTS=str(results))
    assert nothing.returncode == 0 and "no MLflow payload is waiting" in nothing.stdout
    matrix = run_sh(MLCI_COMMAND="matrix", MLCI_SHARDS="2")
    assert matrix.stdout.split() == ["matrix", "--config", "mlci.toml", "--shards", "2"]
    assert run_sh(MLCI_COMMAND="matrix", MLCI_SHARDS="0").stdout.split() == ["matrix", "--config", "mlci.toml"]
    output = tmp_path / "github-output"
    history = run_sh(MLCI_COMMAND="history", MLCI_BRANCH="trunk", MLCI_TRACKING_URI="http://mlflow:5000",
                     GITHUB_OUTPUT=str(output))
    assert history.stdout.split() == ["history", "--config", "mlci.toml", "--format", "html", "--output",
                                      ".mlci/history.html", "--branch", "trunk", "--tracking-uri", "http://mlflow:5000"]
    assert output.read_text() == "history-path=.mlci/history.html\n"
    unknown = run_sh(MLCI_COMMAND="bogus")
    assert unknown.returncode == 2
    assert "run, compare, matrix, tune, sync, history, runner-start, runner-stop, runner-reap, init or doctor" in unknown.stdout


def test_the_history_report_is_uploaded_after_the_report_job_on_the_default_branch_only_with_a_server():
    jobs = load(REUSABLE)["jobs"]
    history = jobs["history"]
    assert history["needs"] == ["plan", "report"] and history["permissions"] == {"contents": "read"}
    mlci = step(history, uses=f"{MLCI_REPO}@")
    assert mlci["with"]["command"] == "history" and mlci["continue-on-error"] is True  # informational
    upload = step(history, uses="actions/upload-artifact@")
    assert upload["with"]["name"] == "mlci-history"
    inputs = {"tracking-uri": "https://mlflow.example"}
    for kind, runs in (("push to the default branch", True), ("schedule", True), ("manual run on the default branch", True),
                       ("same-repository pull request", False), ("fork pull request", False)):
        context = {"needs": {"plan": plan_outputs(kind)}, "inputs": inputs, "github": github_context(kind)}
        assert condition(history["if"], context, status="success") is runs, kind
    no_server = {"needs": {"plan": plan_outputs("schedule")}, "inputs": {"tracking-uri": ""}}
    assert not condition(history["if"], no_server, status="success")  # a throwaway store has one run
    # a schedule's bare payload names no repository: the report is still the default branch's
    assert render(mlci["with"]["branch"], {"needs": {"plan": plan_outputs("schedule")}}) == "master"


def test_the_action_exports_the_cache_url_only_when_given(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "mlci").write_text('#!/bin/sh\necho "url=${MLCI_CACHE_URL-unset}"\n')
    (bin_dir / "mlci").chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin", "MLCI_CONFIG": "mlci.toml", "MLCI_COMMAND": "run"}
    given = subprocess.run(["bash", str(ROOT / "action" / "run.sh")], capture_output=True, text=True,
                           env={**base, "MLCI_INPUT_CACHE_URL": "s3://b/p"})
    assert given.stdout.strip() == "url=s3://b/p"
    runner_wide = subprocess.run(["bash", str(ROOT / "action" / "run.sh")], capture_output=True, text=True,
                                 env={**base, "MLCI_INPUT_CACHE_URL": "", "MLCI_CACHE_URL": "s3://runner/x"})
    assert runner_wide.stdout.strip() == "url=s3://runner/x"


def test_the_action_saves_the_tuning_cache_from_run_only():
    """Every shard of a target, and its bench job, would save under one key (it ends in the run id):
    the first shard to finish would keep the bench job's cache out of the Actions cache."""
    steps = {s.get("name"): s for s in load(ACTION)["runs"]["steps"]}
    assert "inputs.command == 'tune'" in steps["Tuning cache key"]["if"]
    assert "inputs.command == 'run'" in steps["Save the tuning cache"]["if"]
    assert "'tune'" not in steps["Save the tuning cache"]["if"]


def test_the_expression_evaluator_follows_githubs_rules():
    """The tests above are only as good as tests/gh_expr.py: GitHub's rules it relies on."""
    from .gh_expr import ExpressionError, evaluate

    ctx = {"github": {"repository": "Octo-Org/Widgets", "event": {}}, "inputs": {"a": "", "b": "x", "n": 0}}
    assert evaluate("inputs.a && 'yes' || 'no'", ctx) == "no"  # && and || return an operand
    assert evaluate("inputs.b && 'yes' || 'no'", ctx) == "yes"
    assert evaluate("github.repository == 'octo-org/widgets'", ctx) is True  # strings: case-insensitive
    assert evaluate("github.event.pull_request.head.repo.full_name", ctx) is None  # a missing property is null
    assert evaluate("!github.event.pull_request", ctx) is True
    assert evaluate("inputs.n > 0", ctx) is False and evaluate("inputs.n == ''", ctx) is True  # '' and 0 coerce to 0
    assert evaluate("format('refs/heads/{0}', 'main')", ctx) == "refs/heads/main"
    assert evaluate("fromJSON('2') > 1", ctx) is True
    assert condition("inputs.b != ''", ctx) and not condition("inputs.b != ''", ctx, status="failure")
    assert condition("always()", ctx, status="failure")
    with pytest.raises(ExpressionError):
        evaluate("hashFiles('x')", ctx)


# -- targets with launch: start -> bench -> stop -------------------------------------------------------------------------


LAUNCH_CONFIG = """
[targets.cpu]
[targets.gpu]
tvm = { kind = "cuda", arch = "sm_86" }
launch = { region = "us-east-1", instance_type = "g5.xlarge", image = "ami-0123456789abcdef0", subnets = ["subnet-0a1b2c3d"] }
[[models]]
path = "m.onnx"
"""


def test_matrix_gives_a_launched_target_its_launch_id_and_no_tuning_shards(tmp_path: Path):
    config = parse_config(LAUNCH_CONFIG, tmp_path / "mlci.toml")
    plan = build_matrix(config, run_id="9876", attempt="2")
    # no runs-on: the bench job runs on the label `mlci runner start` outputs for it, which no plan can predict
    assert plan.include[1] == {"target": "gpu", "kind": "cuda", "launch-id": "9876-2-gpu"}
    hosted, launched = split_launched(plan)
    assert [e["target"] for e in hosted["include"]] == ["cpu"] and [e["target"] for e in launched["include"]] == ["gpu"]
    assert {e["target"] for e in build_shard_matrix(config, 2)["include"]} == {"cpu"}


def test_a_launched_target_whose_name_makes_too_long_a_runner_label_is_named_at_plan_time(tmp_path: Path):
    config = parse_config(LAUNCH_CONFIG.replace("[targets.gpu]", "[targets.gpu-" + "x" * 40 + "]"), tmp_path / "mlci.toml")
    with pytest.raises(MatrixError, match=r"targets\.gpu-x+: launch id '9876543210-1-gpu-x+' is not usable"):
        build_matrix(config, run_id="9876543210", attempt="1")


def test_matrix_cli_outputs_the_launch_matrix_for_this_run(tmp_path: Path):
    (tmp_path / "mlci.toml").write_text(LAUNCH_CONFIG)
    output = tmp_path / "out.txt"
    env = {"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(output), "PATH": "/usr/bin:/bin", "GITHUB_RUN_ID": "55",
           "GITHUB_RUN_ATTEMPT": "1"}
    done = subprocess.run([sys.executable, "-m", "mlci.cli", "matrix", "-c", str(tmp_path / "mlci.toml")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    text = output.read_text()
    assert "targets=cpu gpu\n" in text and "hosted-targets=cpu\n" in text and "launch-targets=gpu\n" in text
    assert 'launch-matrix={"include":[{"target":"gpu","kind":"cuda","launch-id":"55-1-gpu"}]}' in text
    assert "mlci-55-1-gpu" not in done.stdout + done.stderr + text  # no label is made, let alone printed, here


def launch_context(kind: str, labels: str = "", **results: str) -> dict:
    return {"github": github_context(kind), "inputs": reusable_inputs(), "secrets": {}, "vars": {},
            "matrix": {"target": "gpu", "launch-id": "4242-1-gpu"},
            "needs": {"plan": plan_outputs(kind), "start": {"result": results.get("start", "skipped"),
                                                            "outputs": {"labels": labels}},
                      **{job: {"result": result, "outputs": {}} for job, result in results.items() if job != "start"}}}


def test_a_launched_target_runs_start_then_bench_on_its_machine_then_stop_whatever_happened():
    jobs = load(REUSABLE)["jobs"]
    start, bench, stop = jobs["start"], jobs["bench-launched"], jobs["stop"]
    assert start["needs"] == "plan" and bench["needs"] == ["plan", "start"]
    assert stop["needs"] == ["plan", "start", "bench-launched"]
    for job in (bench, stop):
        assert job["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.launch-matrix) }}"
    assert start["runs-on"] == stop["runs-on"] == "ubuntu-latest"
    mlci = step(start, uses=f"{MLCI_REPO}@")
    assert mlci["with"]["command"] == "runner-start"
    assert step(stop, uses=f"{MLCI_REPO}@")["with"]["command"] == "runner-stop"
    kind = "same-repository pull request"
    assert render(mlci["with"]["target"], launch_context(kind)) == "gpu"  # one job starts every launched target
    label = '{"gpu": "mlci-4242-1-gpu-0123456789abcdef0123"}'
    started = launch_context(kind, labels=label, start="success")
    assert condition(start["if"], started) and condition(bench["if"], started)
    assert render(bench["runs-on"], started) == "mlci-4242-1-gpu-0123456789abcdef0123"  # only its runner has it
    no_machine = step(bench, name="No machine started for this target")
    assert not condition(no_machine["if"], started)
    for start_result, bench_result, status in (("success", "success", "success"), ("success", "failure", "failure"),
                                               ("failure", "skipped", "failure"), ("cancelled", "skipped", "cancelled"),
                                               ("success", "cancelled", "cancelled")):
        assert condition(stop["if"], launch_context(kind, start=start_result, **{"bench-launched": bench_result}),
                         status=status), (start_result, bench_result)


def test_a_target_whose_machine_did_not_start_fails_at_once_and_the_others_still_bench():
    """One start job for every launched target: its result is "failure" when one machine did not start, and
    the labels it output name only those that did. No bench job is skipped for another's machine, and none
    waits for a machine that will never come (GitHub never times out a queued job before 24 hours)."""
    jobs = load(REUSABLE)["jobs"]
    bench = jobs["bench-launched"]
    kind = "push to the default branch"
    partly = launch_context(kind, labels='{"other": "mlci-4242-1-other-aaaa"}', start="failure")
    assert condition(bench["if"], partly, status="failure")  # the started target's bench job runs
    assert render(bench["runs-on"], partly) == "ubuntu-latest"  # gpu's: on a hosted runner, to fail at once
    no_machine = step(bench, name="No machine started for this target")
    assert condition(no_machine["if"], partly) and "exit 1" in no_machine["run"]
    assert bench["steps"][0] is no_machine  # before anything could run the target's code
    nothing = launch_context(kind, labels="", start="failure")
    assert render(bench["runs-on"], nothing) == "ubuntu-latest" and condition(no_machine["if"], nothing)
    assert not condition(bench["if"], launch_context(kind, start="skipped"), status="success")


def test_a_forks_pull_request_launches_no_machine_and_is_not_expected_to_bench_there():
    jobs = load(REUSABLE)["jobs"]
    context = launch_context("fork pull request")
    assert context["needs"]["plan"]["outputs"]["launch-targets"] == ""  # mlci matrix left gpu out
    assert not condition(jobs["start"]["if"], context) and not condition(jobs["stop"]["if"], context)
    compare = step(jobs["report"], id="compare")
    assert render(compare["with"]["expect-targets"], context).split() == ["cpu"]
    assert render(compare["with"]["expect-targets"], launch_context("same-repository pull request")).split() == ["cpu", "gpu"]


def test_the_runner_token_reaches_only_the_start_and_stop_steps():
    for name, job in load(REUSABLE)["jobs"].items():
        for item in job.get("steps", []):
            if "MLCI_RUNNER_TOKEN" in json.dumps(item):
                assert name in {"start", "stop"}, name
                assert item["with"]["command"] in {"runner-start", "runner-stop"}
    [reap] = load(ROOT / "workflows" / "mlci-reap.yml")["jobs"].values()
    assert reap["if"] == "vars.MLCI_RUNNER_ROLE != ''"  # idle until a repository sets up launching
    assert step(reap, uses=f"{MLCI_REPO}@")["with"]["command"] == "runner-reap"
    assert "schedule" in load(ROOT / "workflows" / "mlci-reap.yml")["on"]


def test_an_interruption_reaches_the_report_as_the_targets_results():
    """stop's results file (every model `interrupted`) goes up under the name the bench job's would have had,
    so the report job reads it like any target's results, and a bench job's own upload stands where there was one."""
    jobs = load(REUSABLE)["jobs"]
    upload = step(jobs["stop"], name="Upload the interruption")
    assert upload["if"] == "steps.stop.outputs.outcome == 'interrupted'" and upload["continue-on-error"] is True
    bench_upload = step(jobs["bench-launched"], name="Upload the results")
    assert upload["with"]["name"] == bench_upload["with"]["name"] == "mlci-results-${{ matrix.target }}"
    assert upload["with"]["path"] == ".mlci/results/${{ matrix.target }}.json"
    assert step(jobs["report"], uses="actions/download-artifact@")["with"]["pattern"] == "mlci-results-*"
    run_sh = (ROOT / "action" / "run.sh").read_text()
    assert "--report .mlci/runner-stop.json --results-dir .mlci/results" in run_sh


def test_the_actions_install_step_runs_no_python_from_the_checkout(tmp_path: Path) -> None:
    """The install step runs in the repository's checkout, a pull request's code, with the job's tokens
    in its environment: its Python must not import a `tomllib.py` or `pip/` it finds there."""
    import re

    script = (ROOT / "action" / "install.sh").read_text()
    calls = re.findall(r"(?m)^[^#\n]*\bpython\b[^\n]*", script)
    assert calls and all(re.search(r"\bpython -I\b", call) for call in calls), calls
    (tmp_path / "tomllib.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nfrom tomli import *\n")
    reader = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    isolated = subprocess.run([sys.executable, "-I", "-", str(ROOT / "pyproject.toml"), "matrix"], input=reader,
                              cwd=tmp_path, capture_output=True, text=True, check=True)
    assert not (tmp_path / "ran").exists() and any(line.startswith("typer") for line in isolated.stdout.split())
    subprocess.run([sys.executable, "-", str(ROOT / "pyproject.toml"), "matrix"], input=reader, cwd=tmp_path,
                   capture_output=True, text=True)
    assert (tmp_path / "ran").exists()  # without -I the checkout's module runs: the check above can fail
