"""The action, the reusable workflow and the starter workflows: what no linter checks.

GitHub only finds reusable workflows directly in .github/workflows/, and inside one `uses: ./`
means the caller's repository: both mistakes pass every linter and break every
user. Also checked here: the files agree with each other (inputs, secrets, the mlci ref), and the
plan/report jobs' light install really needs no TVM.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlci.commands.matrix import build_matrix, default_runs_on
from mlci.config import TargetConfig, parse_config

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
        assert writes <= {"pull-requests", "statuses"}, f"{path}: job {name} writes {writes}"


def test_only_the_report_job_can_write():
    jobs = load(REUSABLE)["jobs"]
    assert jobs["plan"]["permissions"] == {"contents": "read"}
    assert jobs["bench"]["permissions"] == {"contents": "read"}
    assert jobs["report"]["permissions"]["pull-requests"] == "write"


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


def test_results_artifacts_are_uploaded_even_when_a_model_failed():
    bench = load(REUSABLE)["jobs"]["bench"]
    checkout, run, upload = bench["steps"][:3]
    assert checkout["with"]["fetch-depth"] == 0 and checkout["with"]["persist-credentials"] is False
    assert run["with"]["allow-failures"] == "true"
    assert upload["if"].startswith("always()")
    assert "${{ matrix.target }}" in upload["with"]["name"]


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
    assert plan == {"include": [
        {"target": "cpu", "runs-on": ["ubuntu-latest"], "kind": "llvm"},
        {"target": "arm", "runs-on": ["ubuntu-24.04-arm"], "kind": "llvm"},
        {"target": "gpu", "runs-on": ["self-hosted", "linux", "gpu"], "kind": "cuda"},
        {"target": "lab", "runs-on": ["self-hosted", "bench-box"], "kind": "llvm"},
    ]}
    assert build_matrix(config, only=["gpu"])["include"][0]["target"] == "gpu"
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
