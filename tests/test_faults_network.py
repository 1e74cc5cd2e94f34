"""Servers that misbehave, and comments that are not mlci's.

Real misbehaving servers on 127.0.0.1: one accepts connections and never answers, one answers a byte at a
time, every few tenths of a second, so that no read ever times out. Whatever they do, GitHub delivery and
MLflow logging give up at their deadline (small ones here, a minute by default), and the run's exit code,
results file and report stay what they would have been. And the sticky comment: only a comment written
by the identity mlci posts as is ever updated, whoever else writes mlci's marker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlci.actions import GitHubContext
from mlci.cli import app
from mlci.delivery import deliver, github_deadline
from mlci.github import DEADLINE_S, GitHubClient, GitHubError
from mlci.report import comment_marker
from mlci.results import (
    Baseline,
    Fingerprint,
    GitInfo,
    Latency,
    ModelResult,
    Results,
    TargetInfo,
    read_results,
    write_results,
)
from mlci.stats import summarize
from mlci.tracking import DEADLINE_ENV, log_results, tracking_deadline

from .conftest import quick_project
from .github_server import FakeGitHub

TOKEN = "ghs_SECRET_network_fault_token_51c2"
REPO = "octo-org/widgets"
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
MARKER = comment_marker(None)


# --- misbehaving servers ------------------------------------------------------------------------------------


class _Server:
    """A TCP server on 127.0.0.1 that hands each connection to `serve` in a thread; stopping closes them all."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self._stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()
        for conn in self._connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class SilentServer(_Server):
    """Accepts every connection and never sends a byte."""

    def serve(self, conn: socket.socket) -> None:
        self._stopped.wait()


class DripServer(_Server):
    """Reads the request, then answers a status line and an endless header one byte every `interval` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        super().__init__()

    def serve(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Drip: "
            i = 0
            while not self._stopped.is_set():
                conn.sendall(answer[i:i + 1] if i < len(answer) else b"a")
                i += 1
                time.sleep(self.interval)
        except OSError:
            pass


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.stop()


@pytest.fixture
def drip() -> Iterator[DripServer]:
    server = DripServer()
    yield server
    server.stop()


def _closed_port_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# --- GitHub: a total deadline ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["silent", "drip"])
def test_a_github_api_that_hangs_costs_the_deadline_not_minutes(kind: str, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue(kind)
    client = GitHubClient(server.url, TOKEN, deadline=1.5, timeout=5.0)  # the read timeout alone would never fire
    start = time.monotonic()
    with pytest.raises(GitHubError) as info:
        client.upsert_comment(REPO, 42, "report", MARKER)
    took = time.monotonic() - start
    assert took < 3.5, f"took {took:.1f} s"
    assert info.value.status is None and "gave up" in str(info.value) and "1.5 s" in str(info.value)
    start = time.monotonic()  # the deadline is the client's, all calls together: the next one gives up at once
    with pytest.raises(GitHubError, match="gave up"):
        client.set_status(REPO, SHA, "success", "ok")
    assert time.monotonic() - start < 0.5


def test_retries_and_their_waits_stop_at_the_deadline(silent: SilentServer) -> None:
    """Backoff sleeps count too: a wait that would end past the deadline is not begun."""
    sleeps: list[float] = []
    client = GitHubClient(_closed_port_url(), TOKEN, deadline=3.0, backoff=2.0, retries=6, sleep=sleeps.append)
    with pytest.raises(GitHubError) as info:
        client.request("GET", f"/repos/{REPO}/issues/1/comments")
    assert "could not reach" in str(info.value)
    assert sum(sleeps) < 3.0 and len(sleeps) < 6


def test_github_deadline_defaults_to_a_minute_and_reads_the_environment() -> None:
    assert GitHubClient("https://api.github.com", TOKEN).deadline == DEADLINE_S == 60.0
    assert github_deadline({}) == (60.0, None)
    assert github_deadline({"MLCI_GITHUB_DEADLINE": "2.5"}) == (2.5, None)
    seconds, problem = github_deadline({"MLCI_GITHUB_DEADLINE": "soon"})
    assert seconds == 60.0 and "MLCI_GITHUB_DEADLINE='soon' is not a positive number of seconds" in problem


def _results(target: str = "cpu") -> Results:
    samples = [2.0, 2.01, 1.99, 2.0, 2.02, 1.98, 2.0, 2.01]
    latency = Latency(samples=samples, **summarize(samples).as_dict())
    model = ModelResult(name="resnet", path="models/resnet.onnx", latency_ms=latency,
                        base=Baseline(commit="4b825dc642cb6eb9a060e54bf8d69288fbee4904", latency_ms=latency, rounds=1))
    return Results(git=GitInfo(commit=SHA, branch="feature", repository=REPO, pr=42),
                   target=TargetInfo(name=target, tvm_target={"kind": "llvm"}, fingerprint=Fingerprint(hash="fp")),
                   models=[model])


@pytest.mark.parametrize("kind", ["silent", "drip"])
def test_compare_with_a_hung_github_keeps_its_verdict_and_reports_within_the_deadline(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue(kind)
    results = write_results(_results(), tmp_path / "results" / "cpu.json")
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"number": 42, "pull_request": {"number": 42, "head": {"sha": SHA}}}))
    env = {
        "GITHUB_ACTIONS": "true", "GITHUB_API_URL": server.url, "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": REPO, "GITHUB_TOKEN": TOKEN, "GITHUB_SHA": SHA, "GITHUB_EVENT_NAME": "pull_request",
        "GITHUB_EVENT_PATH": str(event), "GITHUB_RUN_ID": "7", "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_OUTPUT": str(tmp_path / "output.txt"), "MLCI_GITHUB_DEADLINE": "2", "MLFLOW_TRACKING_URI": None,
    }
    start = time.monotonic()
    result = CliRunner().invoke(app, ["compare", str(results), "--report-dir", str(tmp_path / "report")], env=env)
    took = time.monotonic() - start
    assert result.exit_code == 0, result.output  # GitHub trouble never changes the verdict
    assert took < 6, f"took {took:.1f} s"
    printed = " ".join(result.output.split())
    assert "could not post the PR comment: gave up on" in printed and "could not set the commit status: gave up" in printed
    assert TOKEN not in result.output
    assert (tmp_path / "report" / "comment.md").read_text().startswith(MARKER)
    assert "### mlci PASS" in (tmp_path / "summary.md").read_text()
    assert "verdict=pass" in (tmp_path / "output.txt").read_text()


# --- MLflow: a deadline around the whole tracking phase ---------------------------------------------------------


class _Progress:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def stage(self, model: str, text: str) -> None:
        self.lines.append(f"{model}: {text}")

    def finish(self, model: str, status: str) -> None:
        self.lines.append(f"{model}: {status}")


def _log(uri: str, tmp_path: Path, deadline: float | None) -> tuple[str | None, float, Results, Path]:
    results = _results()
    path = write_results(results, tmp_path / "results.json")  # as `mlci run` does before tracking
    start = time.monotonic()
    message = log_results(results, path, uri=uri, experiment="mlci", artifact_root=tmp_path / "artifacts",
                          artifacts_dir=tmp_path / "work", params={}, progress=_Progress(), deadline=deadline)
    return message, time.monotonic() - start, results, path


@pytest.mark.parametrize("kind", ["silent", "drip"])
def test_an_mlflow_server_that_hangs_costs_the_deadline_and_the_results_stay(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = request.getfixturevalue(kind)
    message, took, results, path = _log(server.url, tmp_path, deadline=2.0)
    assert took < 3.5, f"took {took:.1f} s"
    assert message is not None and "gave up after 2 s" in message and DEADLINE_ENV in message
    assert "0 of 1 runs logged" in message
    on_disk = read_results(path)
    assert [m.name for m in on_disk.models] == ["resnet"] and on_disk.models[0].latency_ms.median == 2.0
    time.sleep(0.3)  # the worker left behind changes nothing any more
    assert results.models[0].mlflow_run_id is None and results.models[0].history is None
    assert read_results(path).to_dict() == on_disk.to_dict()


def test_an_mlflow_server_that_is_down_fails_in_seconds_with_mlcis_http_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own defaults (7 retries, backoff factor 2) spent about four minutes on a refused connection."""
    for name in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.delenv(name, raising=False)
    message, took, _, _ = _log(_closed_port_url(), tmp_path, deadline=float("inf"))  # no deadline: the defaults alone
    assert took < 20, f"took {took:.1f} s"
    assert message is not None and "failed" in message and "Connection refused" in message
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


def test_mlflow_deadline_defaults_to_a_minute_and_reads_the_environment(tmp_path: Path) -> None:
    assert tracking_deadline({}) == (60.0, None)
    assert tracking_deadline({DEADLINE_ENV: "5"}) == (5.0, None)
    assert tracking_deadline({DEADLINE_ENV: "0"}) == (float("inf"), None)
    seconds, problem = tracking_deadline({DEADLINE_ENV: "-1"})
    assert seconds == 60.0 and "MLCI_MLFLOW_DEADLINE='-1' is not a positive number of seconds, or 0" in problem


@pytest.mark.slow
def test_mlci_run_with_a_hung_mlflow_server_passes_warns_once_and_a_later_sync_logs_it_once(
    silent: SilentServer, tmp_path: Path
) -> None:
    quick_project(tmp_path, (16, 32, 4))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=silent.url, MLCI_MLFLOW_DEADLINE="3")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mlci.cli", "run"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    took = time.monotonic() - start
    assert done.returncode == 0, done.stdout + done.stderr
    stderr = " ".join(done.stderr.split())
    assert stderr.count("warning:") == 1, done.stderr
    assert f"MLflow logging to {silent.url} gave up after 3 s" in stderr and "(results kept in the file above)" in stderr
    results = read_results(tmp_path / ".mlci" / "results" / "cpu.json")
    [model] = results.models
    assert model.ok and model.latency_ms is not None and model.mlflow_run_id is None
    print(f"mlci run with a hung MLflow server: {took:.1f} s")

    # Nothing is lost: once a server answers, `mlci sync` logs the run, once however often it is repeated.
    from mlflow import MlflowClient

    from mlci.commands.sync import sync

    results_file = tmp_path / ".mlci" / "results" / "cpu.json"
    payload = results_file.with_name("cpu.json.mlflow-pending").read_text()
    store = f"sqlite:///{tmp_path / 'later.db'}"
    [first] = sync([results_file], tracking_uri=store)
    results_file.with_name("cpu.json.mlflow-pending").write_text(payload)  # as if that sync died before saying so
    [second] = sync([results_file], tracking_uri=store)
    assert (first.error, first.runs, second.error, second.runs) == (None, 1, None, 1)
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.data.tags["mlci.model"] for r in runs] == [model.name]


# --- the sticky comment is mlci's own -------------------------------------------------------------------------


@pytest.fixture
def gh() -> Iterator[FakeGitHub]:
    with FakeGitHub(token=TOKEN, repository=REPO) as server:
        yield server
    assert server.errors == [], "fake GitHub found invalid requests/responses:\n" + "\n".join(server.errors)


def test_a_marker_planted_by_someone_else_is_never_updated(gh: FakeGitHub) -> None:
    """Were mallory's comment taken for mlci's, the report would appear under mallory's name, editable by mallory."""
    planted = gh.add_comment(42, f"{MARKER}\nmlci says: all good, merge it", login="mallory")
    url, action = GitHubClient(gh.url, TOKEN).upsert_comment(REPO, 42, f"{MARKER}\nreport 1", MARKER)
    assert action == "created"
    mallory, ours = gh.comments[42]
    assert mallory == planted and mallory["body"].endswith("all good, merge it")
    assert ours["user"]["login"] == "github-actions[bot]" and url == ours["html_url"]

    # the next run (a new client, as in a new job) updates mlci's comment, not the first marker it sees
    url2, action2 = GitHubClient(gh.url, TOKEN).upsert_comment(REPO, 42, f"{MARKER}\nreport 2", MARKER)
    assert (url2, action2) == (url, "updated")
    assert [c["body"] for c in gh.comments[42]] == [planted["body"], f"{MARKER}\nreport 2"]
    assert ("GET", "/user", 403) in [(r.method, r.path, r.status) for r in gh.requests]  # a workflow token: the bot


def test_with_a_personal_token_only_that_users_comment_is_mlcis(tmp_path: Path) -> None:
    with FakeGitHub(token=TOKEN, repository=REPO, token_user="release-bot") as gh:
        bots = gh.add_comment(5, f"{MARKER}\nposted by another workflow", login="github-actions[bot]", kind="Bot")
        mine = gh.add_comment(5, f"{MARKER}\nposted with this token", login="release-bot")
        _, action = GitHubClient(gh.url, TOKEN).upsert_comment(REPO, 5, "new report", MARKER)
        assert action == "updated"
        assert [c["body"] for c in gh.comments[5]] == [bots["body"], f"{MARKER}\nnew report"]
        assert gh.comments[5][1]["id"] == mine["id"]
        assert ("GET", "/user", 200) in [(r.method, r.path, r.status) for r in gh.requests]
        assert gh.errors == []


def test_an_app_token_names_its_bot_and_needs_no_user_lookup(gh: FakeGitHub) -> None:
    planted = gh.add_comment(9, f"{MARKER}\nplanted", login="mallory")
    app_comment = gh.add_comment(9, f"{MARKER}\nthe app's report", login="acme-ci[bot]", kind="Bot")
    _, action = GitHubClient(gh.url, TOKEN, author="acme-ci[bot]").upsert_comment(REPO, 9, "new", MARKER)
    assert action == "updated"
    assert [(c["id"], c["body"]) for c in gh.comments[9]] == [
        (planted["id"], f"{MARKER}\nplanted"), (app_comment["id"], f"{MARKER}\nnew")]
    assert all(r.path != "/user" for r in gh.requests)


def _pull_request_42(gh: FakeGitHub, tmp_path: Path) -> GitHubContext:
    """A pull_request job's context on pull request 42 of the fake GitHub."""
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"number": 42, "pull_request": {"number": 42, "head": {"sha": SHA}}}))
    return GitHubContext.from_env({
        "GITHUB_ACTIONS": "true", "GITHUB_API_URL": gh.url, "GITHUB_REPOSITORY": REPO, "GITHUB_TOKEN": TOKEN,
        "GITHUB_SHA": SHA, "GITHUB_EVENT_NAME": "pull_request", "GITHUB_EVENT_PATH": str(event),
    })


def test_deliver_posts_its_own_comment_beside_a_planted_one(gh: FakeGitHub, tmp_path: Path) -> None:
    planted = gh.add_comment(42, f"{MARKER}\nfake report", login="mallory")
    ctx = _pull_request_42(gh, tmp_path)
    done = deliver(ctx, comment=f"{MARKER}\nreal report", marker=MARKER, summary="s", outputs={}, annotations=[],
                   state="success", description="ok", print_line=lambda _line: None)
    assert done.comment_action == "created" and done.status_set
    assert [c["body"] for c in gh.comments[42]] == [planted["body"], f"{MARKER}\nreal report"]


def test_deliver_with_an_app_token_updates_the_comment_of_the_bot_named_in_the_environment(
        gh: FakeGitHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    planted = gh.add_comment(42, f"{MARKER}\nplanted", login="mallory")
    ours = gh.add_comment(42, f"{MARKER}\nlast report", login="acme-ci[bot]", kind="Bot")
    monkeypatch.setenv("MLCI_COMMENT_AUTHOR", "acme-ci[bot]")
    ctx = _pull_request_42(gh, tmp_path)
    done = deliver(ctx, comment=f"{MARKER}\nnew report", marker=MARKER, summary="s", outputs={}, annotations=[],
                   state="success", description="ok", print_line=lambda _line: None)
    assert done.comment_action == "updated"
    assert [(c["id"], c["body"]) for c in gh.comments[42]] == [
        (planted["id"], planted["body"]), (ours["id"], f"{MARKER}\nnew report")]


def test_credentials_in_the_tracking_uri_reach_neither_the_message_nor_the_pending_file(
        request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """The pending file travels as a run artifact, which anyone may download from a public repository."""
    from mlci.tracking import pending_path

    server = request.getfixturevalue("silent")
    uri = server.url.replace("http://", "http://mlci-user:s3cret-pw@", 1).rstrip("/") + "/?access_token=t0ken&v=1"
    message, _, _, path = _log(uri, tmp_path, deadline=1.0)
    assert message is not None and "gave up" in message
    pending = pending_path(path).read_text()
    for text in (message, pending):
        assert "s3cret-pw" not in text and "t0ken" not in text and "mlci-user" not in text
    assert "access_token=***" in pending and server.url.split("//")[1].rstrip("/") in pending
