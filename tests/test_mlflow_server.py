"""MLflow as teams run it: `mlflow server` over HTTP with the artifacts it serves kept in S3 (moto).

One server (and one S3) for the whole file: its start is most of the file's time. A run of
`mlci run` lands as one MLflow run with its tags, metrics and artifacts in the bucket; a retried
job and a create request whose reply is lost (a proxy drops it) still leave one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from mlci.results import Fingerprint, GitInfo, Latency, ModelResult, Results, TargetInfo

from .conftest import quick_project
from .servers import (
    ForwardingHandler,
    MlflowServer,
    MotoServer,
    forwarding_to,
    free_port,
    http_server,
    mlflow_server,
    moto_server,
)

BUCKET = "bucket"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with moto_server() as server:
        server.s3().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="module")
def server(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow"), f"s3://{BUCKET}/mlartifacts", env=moto.env) as srv:
        yield srv


def _objects(moto: MotoServer) -> list[str]:
    listing = moto.s3().list_objects_v2(Bucket=BUCKET, Prefix="mlartifacts/")
    return [o["Key"] for o in listing.get("Contents", [])]


def _runs(server: MlflowServer, filter_string: str) -> list:
    client = server.client()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, filter_string=filter_string)


# --- mlci run against the server --------------------------------------------------------------


def _project(root: Path) -> Path:
    return quick_project(root)


def _mlci(*args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    """`mlci` as a CI job runs it: the tracking server by URL, no S3 credentials of its own."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "GITHUB_"))}  # the server alone talks to S3
    env.update(GITHUB_REPOSITORY="acme/models", GITHUB_SHA="c0ffee0000000000000000000000000000000000", **env_vars)
    return subprocess.run([sys.executable, "-m", "mlci.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ci_run(server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess:
    proc = _mlci("run", cwd=_project(tmp_path_factory.mktemp("project")), MLFLOW_TRACKING_URI=server.url,
                 GITHUB_RUN_ID="9001")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.slow
def test_mlci_run_logs_one_run_to_the_server_with_its_artifacts_in_s3(ci_run, server, moto) -> None:
    [run] = _runs(server, "tags.`mlci.model` = 'tiny'")
    tags = run.data.tags
    assert tags["mlci.repository"] == "acme/models" and tags["mlci.target"] == "cpu"
    assert tags["mlci.job_key"] == "acme/models/9001/c0ffee0000000000000000000000000000000000/cpu/tiny"
    assert run.info.status == "FINISHED" and run.data.metrics["latency_ms_median"] > 0
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # served, not a path on the runner

    keys = _objects(moto)
    mine = [k for k in keys if f"/{run.info.run_id}/artifacts/" in k]
    names = sorted(k.split("/artifacts/", 1)[1] for k in mine)
    assert names == ["model/MLmodel", "model/artifacts/interface.json", "model/artifacts/tiny.so", "model/conda.yaml",
                     "model/python_env.yaml", "model/requirements.txt", "model/serving.py", "results.json",
                     "tuning/tuning_records.json"], keys


# --- idempotent runs (the tracking library against the same server) ----------------------------


def _results(repository: str, run_id: str | None, model: str = "m") -> Results:
    m = ModelResult(name=model, path=f"{model}.onnx", sha256="0" * 64,
                    latency_ms=Latency(samples=[1.0], median=1.0, mean=1.0, std=0.0, min=1.0, p90=1.0, n=1))
    return Results(git=GitInfo(commit="c1", branch="main", repository=repository, run_id=run_id),
                   target=TargetInfo(name="cpu", tvm_target={"kind": "llvm"}, fingerprint=Fingerprint(hash="fp")),
                   models=[m])


class _Quiet:
    def stage(self, model: str, text: str) -> None: ...

    def finish(self, model: str, status: str) -> None: ...


def _log(results: Results, uri: str, tmp_path: Path, params: dict | None = None) -> str | None:
    from mlci.tracking import log_results

    return log_results(results, tmp_path / "results.json", uri=uri, experiment="mlci", artifact_root=tmp_path / "art",
                       artifacts_dir=tmp_path / "work", params=params or {}, progress=_Quiet(), deadline=60)


def test_a_retried_job_logs_into_the_run_it_made_before(server, tmp_path: Path) -> None:
    first, again = _results("acme/retry", "77"), _results("acme/retry", "77")
    again.models[0].latency_ms = Latency(samples=[2.0], median=2.0, mean=2.0, std=0.0, min=2.0, p90=2.0, n=1)
    assert _log(first, server.url, tmp_path, {"samples": 5}) is None
    # The same workflow run again (its second attempt), with a setting MLflow will not let change.
    assert _log(again, server.url, tmp_path, {"samples": 10}) is None
    [run] = _runs(server, "tags.`mlci.job_key` = 'acme/retry/77/c1/cpu/m'")
    assert first.models[0].mlflow_run_id == again.models[0].mlflow_run_id == run.info.run_id
    assert run.data.metrics["latency_ms_median"] == 2.0  # the latest attempt's numbers
    assert run.data.params["samples"] == "5"


def test_another_workflow_run_of_the_same_commit_is_another_run(server, tmp_path: Path) -> None:
    assert _log(_results("acme/other", "1"), server.url, tmp_path) is None
    assert _log(_results("acme/other", "2"), server.url, tmp_path) is None
    assert len(_runs(server, "tags.`mlci.repository` = 'acme/other'")) == 2


class _DropFirstCreateReply(ForwardingHandler):
    """The first `runs/create` reaches the server, but its reply never comes back: the connection is
    closed instead, as a proxy that times out does."""

    dropped: list[str]

    def drop_reply(self) -> bool:
        if self.path.endswith("/runs/create") and not self.dropped:
            self.dropped.append(self.path)
            return True
        return False


@contextmanager
def _proxy(server: MlflowServer, port: int = 0, drop_a_create: bool = True) -> Iterator[tuple[str, list[str]]]:
    """A forwarding proxy in front of `server` on 127.0.0.1 (`port` 0: any free one); the paths
    whose reply it dropped."""
    dropped: list[str] = [] if drop_a_create else ["(none: dropping is off)"]
    handler = forwarding_to(lambda: server.url, _DropFirstCreateReply, dropped=dropped)
    with http_server(handler, port) as proxy:
        yield f"http://127.0.0.1:{proxy.server_address[1]}", dropped


@pytest.fixture
def lossy_proxy(server: MlflowServer) -> Iterator[tuple[str, list[str]]]:
    with _proxy(server) as proxy:
        yield proxy


def test_mlflows_own_retry_of_a_lost_create_makes_a_second_run(server, lossy_proxy) -> None:
    """The hazard: MLflow's client resends a create whose reply it lost, and the server creates again."""
    url, dropped = lossy_proxy
    client = server.client()
    experiment = client.get_experiment_by_name("mlci") or client.get_experiment(client.create_experiment("mlci"))
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=url).create_run(experiment.experiment_id, tags={"mlci.job_key": "plain/create"})
    assert dropped
    assert len(_runs(server, "tags.`mlci.job_key` = 'plain/create'")) == 2


def test_a_lost_create_reply_still_leaves_one_run(server, lossy_proxy, tmp_path: Path) -> None:
    url, dropped = lossy_proxy
    results = _results("acme/lossy", "5")
    assert _log(results, url, tmp_path) is None
    assert dropped  # the proxy did lose a reply
    # By the key that the create itself carries: a second run made by the create alone has no other tags.
    [run] = _runs(server, "tags.`mlci.job_key` = 'acme/lossy/5/c1/cpu/m'")
    assert results.models[0].mlflow_run_id == run.info.run_id and run.info.status == "FINISHED"


def test_two_jobs_that_raced_past_the_lookup_go_on_with_the_first_run(server) -> None:
    from mlci.tracking import Tracker

    tracker = Tracker(server.url, "mlci")
    first = tracker.create_run_once("acme/race/1/c1/cpu/m", "m@cpu")
    second = tracker.create_run_once("acme/race/1/c1/cpu/m", "m@cpu")  # as a job that looked before `first` existed
    assert second == first
    assert [r.info.run_id for r in _runs(server, "tags.`mlci.job_key` = 'acme/race/1/c1/cpu/m'")] == [first]


def test_run_and_trend_links_never_carry_the_tracking_uris_password(server) -> None:
    """Run links go into the public PR comment: credentials in the tracking URI stay out of them."""
    from mlci.tracking import Tracker

    with_password = server.url.replace("http://", "http://ci-bot:s3cret@")
    tracker = Tracker(with_password, "mlci")
    url = tracker.run_url("0123abcd")
    assert url == f"{server.url}/#/experiments/{tracker.experiment_id}/runs/0123abcd"
    assert "s3cret" not in url and "ci-bot" not in url
    experiments = f"%5B%22{tracker.experiment_id}%22%5D"
    assert tracker.compare_url(["a", "b"]) == (
        f"{server.url}/#/compare-runs?runs=%5B%22a%22%2C%20%22b%22%5D&experiments={experiments}")


# --- nothing lost: a run while the server is down, synced later ------------------------------


@pytest.mark.slow
def test_a_run_while_the_server_is_down_is_kept_and_synced_into_one_run(server, tmp_path_factory) -> None:
    port = free_port()  # nothing listens here yet: the server is down
    root = _project(tmp_path_factory.mktemp("offline"))
    down = _mlci("run", cwd=root, MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}", GITHUB_RUN_ID="9002")
    assert down.returncode == 0, down.stdout + down.stderr  # tracking is best effort
    pending = root / ".mlci" / "results" / "cpu.json.mlflow-pending"
    assert pending.is_file() and "mlci sync" in down.stderr
    payload = pending.read_text()
    from mlci.commands.compare import find_results

    assert find_results([pending.parent]) == [pending.parent / "cpu.json"]  # not taken for a results file
    key = "tags.`mlci.job_key` = 'acme/models/9002/c0ffee0000000000000000000000000000000000/cpu/tiny'"
    assert _runs(server, key) == []

    uri = f"http://127.0.0.1:{port}"
    with _proxy(server, port, drop_a_create=False):  # the server is back, at the address the run tried
        synced = _mlci("sync", ".mlci/results/cpu.json", cwd=root, MLFLOW_TRACKING_URI=uri)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert "1 MLflow run(s) logged" in synced.stdout and not pending.exists()
        again = _mlci("sync", ".mlci/results/cpu.json", cwd=root, MLFLOW_TRACKING_URI=uri)
        assert again.returncode == 0 and "nothing pending" in again.stdout
        pending.write_text(payload)  # a sync that died after logging, before it could say so
        replayed = _mlci("sync", ".mlci/results/cpu.json", cwd=root, MLFLOW_TRACKING_URI=uri)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr

    [run] = _runs(server, key)
    assert run.info.status == "FINISHED" and run.data.tags["mlci.model"] == "tiny"
    results = json.loads((root / ".mlci" / "results" / "cpu.json").read_text())
    assert results["models"][0]["mlflow_run_id"] == run.info.run_id


def test_sync_names_a_results_file_that_is_not_there(tmp_path: Path) -> None:
    from mlci.commands.sync import sync

    [outcome] = sync([tmp_path / "cpu.json"])
    assert outcome.error == f"{tmp_path / 'cpu.json'}: no such results file"


def test_sync_names_a_damaged_payload(tmp_path: Path) -> None:
    from mlci.commands.sync import sync

    (tmp_path / "cpu.json").write_text("{}")
    (tmp_path / "cpu.json.mlflow-pending").write_text('{"uri": "http://127.0.0.1:1"}')
    [outcome] = sync([tmp_path / "cpu.json"])
    assert outcome.error.startswith(f"{tmp_path / 'cpu.json.mlflow-pending'}: MLflow payload lacks experiment")


def test_a_local_run_synced_twice_is_one_run(server, tmp_path: Path) -> None:
    """Outside CI the job key holds an id of the `mlci run` invocation: the payload keeps it."""
    from mlci.commands.sync import sync
    from mlci.results import write_results

    results = _results("acme/local", None)
    path = write_results(results, tmp_path / "results.json")
    message = _log(results, f"http://127.0.0.1:{free_port()}", tmp_path)
    assert message is not None and f"kept for `mlci sync {path}`" in message
    payload = (tmp_path / "results.json.mlflow-pending").read_text()
    [first] = sync([path], tracking_uri=server.url)
    (tmp_path / "results.json.mlflow-pending").write_text(payload)
    [second] = sync([path], tracking_uri=server.url)
    assert first.error is None and second.error is None and first.runs == second.runs == 1
    assert len(_runs(server, "tags.`mlci.repository` = 'acme/local'")) == 1


def _hostile_pair(directory: Path, uri: str, model: str = "tiny", outside: Path | None = None) -> Path:
    """A results file and its pending file as a fork's artifact could carry them."""
    from mlci.results import write_results
    from mlci.tracking import PendingLog, pending_path

    results = _results("acme/models", None)
    results.models[0].name = model
    path = write_results(results, directory / ".mlci" / "results" / "cpu.json")
    elsewhere = str(outside or directory / ".mlci" / "work" / "cpu")
    PendingLog(uri=uri, experiment="mlci", artifact_root=elsewhere, artifacts_dir=elsewhere, params={},
               invocation="x", register=True).write(pending_path(path))
    return path


def test_sync_never_sends_runs_or_credentials_to_a_server_only_the_pending_file_names(tmp_path: Path) -> None:
    from mlci.commands.sync import sync

    with _recording_server() as (attacker, requests):
        path = _hostile_pair(tmp_path, attacker)
        [unconfigured] = sync([path])
        [configured] = sync([path], configured_uri=f"sqlite:///{tmp_path / 'mine.db'}")
    assert requests == []
    assert unconfigured.runs == configured.runs == 0
    assert "--tracking-uri" in unconfigured.error and "never sends runs" in configured.error


def test_sync_refuses_a_model_name_that_is_a_path_and_writes_nothing_outside_the_project(tmp_path: Path) -> None:
    from mlci.commands.sync import sync

    project, outside = tmp_path / "project", tmp_path / "outside"
    store = f"sqlite:///{tmp_path / 'mine.db'}"
    [bad] = sync([_hostile_pair(project, store, model="../../../outside/x")], tracking_uri=store)
    assert bad.runs == 0 and "not a name mlci writes" in bad.error
    [elsewhere] = sync([_hostile_pair(project, store, outside=outside)], tracking_uri=store)
    assert elsewhere.error is None and elsewhere.runs == 1
    assert not outside.exists()


@contextmanager
def _recording_server():
    import http.server

    requests: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requests.append(f"{self.command} {self.path} {self.headers.get('Authorization')}")
            self.send_response(500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args) -> None:
            pass

    with http_server(Record) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", requests
