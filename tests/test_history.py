"""`mlci history`: a branch's benchmark over commits from MLflow, as a table, JSON and an HTML report.

The end-to-end history is real: a tiny model run by `mlci run` (no tuning, five samples) on three
commits of main and one pull request, logged to the project's sqlite store, later served by a real
MLflow server; the report is opened in headless Chromium. Environment changes, regressions and
missing samples are set up by logging runs the way `mlci run` does (`Tracker.log_model` with a
results.json), which costs no compile.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlci.cli import app
from mlci.results import Fingerprint, GitInfo, Latency, ModelResult, PeerInfo, Results, TargetInfo
from tests.conftest import git, new_git_repo, quick_project, write_config
from tests.servers import free_port, mlflow_server

ROW_KEYS = {
    "model", "target", "commit", "short_sha", "created_at", "run_id", "run_url", "status", "median_ms",
    "median_low_ms", "median_high_ms", "samples", "onnxruntime_median_ms", "speedup_vs_onnxruntime",
    "cost_per_million_usd", "onnxruntime_cost_per_million_usd", "trials_new",
    "fingerprint", "tvm_version", "segment", "environment_changed", "environment_diff", "previous_commit", "change",
    "change_low", "change_high", "verdict", "threshold", "note",
}
# Outside GitHub Actions, whatever the machine running the tests has set.
LOCAL = {**{k: None for k in os.environ if k.startswith("GITHUB_")}, "MLFLOW_TRACKING_URI": None}


def mlci(*args: str, env: dict[str, str | None] | None = None):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(app, list(args), env={**LOCAL, **(env or {})})


@dataclass
class Project:
    root: Path
    main: list[str]
    """The three commits of main, oldest first."""
    pr: str

    @property
    def config(self) -> str:
        return str(self.root / "mlci.toml")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """Three commits on main and one pull request commit, each measured by `mlci run` into .mlci/mlflow.db."""
    root = new_git_repo(tmp_path_factory.mktemp("history"))
    quick_project(root)
    (root / ".gitignore").write_text(".mlci/\n")
    main = []
    for i in range(3):
        (root / "notes.txt").write_text(f"change {i}\n")
        git(root, "add", "-A")
        git(root, "commit", "-qm", f"commit {i}")
        main.append(git(root, "rev-parse", "HEAD"))
        done = mlci("run", "-c", str(root / "mlci.toml"))
        assert done.exit_code == 0, done.output
    git(root, "checkout", "-qb", "feature")
    (root / "notes.txt").write_text("the pull request\n")
    git(root, "commit", "-qam", "pull request")
    pr = git(root, "rev-parse", "HEAD")
    event = root.parent / "event.json"
    event.write_text(json.dumps({"number": 7, "pull_request": {"number": 7, "head": {"sha": pr}}}))
    done = mlci("run", "-c", str(root / "mlci.toml"),
                env={"GITHUB_EVENT_PATH": str(event), "GITHUB_EVENT_NAME": "pull_request", "GITHUB_HEAD_REF": "feature",
                     "GITHUB_SHA": pr})
    assert done.exit_code == 0, done.output
    git(root, "checkout", "-q", "main")
    return Project(root, main, pr)


# --- what MLflow holds, end to end ------------------------------------------------------


@pytest.mark.slow
def test_the_table_shows_mains_three_commits_oldest_first_and_not_the_pull_request(project: Project) -> None:
    done = mlci("history", "-c", project.config, env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    shown = [sha[:7] for sha in project.main]
    positions = [done.output.index(sha) for sha in shown]
    assert positions == sorted(positions)
    assert project.pr[:7] not in done.output
    assert "tiny on cpu" in done.output


@pytest.mark.slow
def test_json_has_the_same_rows_typed_with_each_run_id_of_its_commit(project: Project) -> None:
    from mlflow import MlflowClient

    done = mlci("history", "-c", project.config, "--format", "json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["branch"] == "main" and report["experiment"] == "mlci"
    [series] = report["series"]
    assert (series["model"], series["target"]) == ("tiny", "cpu")
    rows = series["rows"]
    assert [r["commit"] for r in rows] == project.main
    assert all(set(r) == ROW_KEYS for r in rows)
    client = MlflowClient(tracking_uri=report["tracking_uri"])
    for row in rows:
        assert row["samples"] == 5 and row["median_low_ms"] <= row["median_ms"] <= row["median_high_ms"]
        assert isinstance(row["trials_new"], int) and row["onnxruntime_median_ms"] > 0
        assert client.get_run(row["run_id"]).data.tags["mlci.commit"] == row["commit"]
    assert rows[0]["verdict"] is None and rows[0]["note"] == "first measured commit of this environment"
    assert all(r["verdict"] in ("regression", "improvement", "unchanged", "inconclusive") for r in rows[1:])
    assert [r["previous_commit"] for r in rows[1:]] == project.main[:2]
    assert len(series["sparkline"]) == 3


@pytest.mark.slow
def test_the_html_report_has_one_chart_with_a_point_per_commit_in_chromium(project: Project, tmp_path: Path) -> None:
    report = tmp_path / "history.html"
    done = mlci("history", "-c", project.config, "--format", "html", "-o", str(report))
    assert done.exit_code == 0, done.output
    page = dom(report)
    [figure] = page.figures
    assert figure["data-model"] == "tiny" and figure["data-target"] == "cpu"
    assert page.uses_in("points-tiny@cpu") == 3
    assert page.row_run_ids == _run_ids(project)  # the sqlite store has no run pages: the run ids are listed
    assert page.links == []
    assert page.external_resources == []


@pytest.mark.slow
def test_points_link_to_their_runs_on_an_mlflow_server(project: Project, tmp_path: Path) -> None:
    with mlflow_server(project.root / ".mlci", artifacts_destination=(tmp_path / "served").as_uri()) as server:
        report = tmp_path / "history.html"
        done = mlci("history", "-c", project.config, "--format", "html", "-o", str(report), "--tracking-uri", server.url)
        assert done.exit_code == 0, done.output
        page = dom(report)
        links = page.links_in("points-tiny@cpu")
        assert len(links) == 3
        for link, commit in zip(links, project.main, strict=True):
            assert link.startswith(f"{server.url}/#/experiments/")
            run_id = link.rsplit("/", 1)[1]
            assert server.client().get_run(run_id).data.tags["mlci.commit"] == commit
            # The fragment never reaches the server: what makes the link right is that MLflow knows that run
            # (checked above) under the experiment the link names.
            experiment = link.split("/#/experiments/", 1)[1].split("/", 1)[0]
            assert server.client().get_run(run_id).info.experiment_id == experiment


@pytest.mark.slow
def test_an_unknown_model_is_refused_naming_the_known_ones(project: Project) -> None:
    done = mlci("history", "-c", project.config, "--model", "tinny")
    assert done.exit_code == 2
    assert "--model tinny: no such model" in done.output and "known: tiny" in done.output
    done = mlci("history", "-c", project.config, "--target", "gpu")
    assert done.exit_code == 2 and "--target gpu: no such target" in done.output and "known: cpu" in done.output


# --- cost per million inferences (pure: rows from run records) ------------------------------------


def test_rows_price_a_million_inferences_at_the_price_each_run_recorded() -> None:
    from mlci.trend import RunRecord, series_rows

    def record(commit: str, started: int, price: float | None) -> RunRecord:
        return RunRecord(run_id=commit, model="m", target="cpu", commit=commit, started_ms=started, fingerprint="fp",
                         samples=_steady(10.0), median_ms=10.0, onnxruntime_median_ms=20.0, price_per_hour=price)

    rows = series_rows([record("c1", 1, 0.36), record("c2", 2, None), record("c3", 3, 1.006)])
    assert [r.cost_per_million_usd for r in rows] == [pytest.approx(1.0), None, pytest.approx(1.006 * 10 / 3.6)]
    assert [r.onnxruntime_cost_per_million_usd for r in rows] == [pytest.approx(2.0), None, pytest.approx(1.006 * 20 / 3.6)]
    assert rows[0].as_dict()["cost_per_million_usd"] == pytest.approx(1.0)  # `--format json` carries it


# --- environment changes, regressions, missing samples (runs logged as mlci run logs them) ----


def _log(tracker, tmp: Path, commit: str, samples: list[float] | None, *, fingerprint: str = "fp", tvm: str = "0.27",
         model: str = "m", pr: int | None = None, price: float | None = None) -> str:
    """One run of `commit` as `mlci run` logs it: tags, metrics, and a results.json (unless `samples` is None)."""
    median = sorted(samples)[len(samples) // 2] if samples else 1.0
    m = ModelResult(name=model, path=f"{model}.onnx", sha256="0" * 64, threshold=0.05,
                    latency_ms=Latency(samples=samples or [median], median=median, mean=median, std=0.0, min=median,
                                       p90=median, n=len(samples or [median])),
                    peer=PeerInfo(onnxruntime_median_ms=2.0, speedup=2.0 / median))
    results = Results(git=GitInfo(commit=commit, branch="main", pr=pr),
                      target=TargetInfo(name="cpu", tvm_target={"kind": "llvm"},
                                        fingerprint=Fingerprint(hash=fingerprint, tvm=tvm, cpu="znver5"),
                                        price_per_hour=price),
                      models=[m])
    artifacts = []
    if samples is not None:
        stored = tmp / uuid.uuid4().hex / "results.json"  # the artifact's name: results.json
        stored.parent.mkdir(parents=True)
        stored.write_text(json.dumps(results.to_dict()))
        artifacts = [(stored, None)]
    run = tracker.log_model(results, m, job_key=f"job/{commit}/{model}", params={}, artifacts=artifacts)
    time.sleep(0.01)  # distinct start times: the commits' order
    return run


def _steady(level: float, n: int = 30) -> list[float]:
    return [level * (1 + 0.002 * ((i * 7) % 5 - 2)) for i in range(n)]


@pytest.fixture(scope="module")
def new_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store with mlci's experiment and no runs. Creating one runs MLflow's migrations
    (seconds); each test starts from a copy. The copies share the experiment's artifact directory,
    where each run has its own."""
    from mlci.tracking import Tracker

    root = tmp_path_factory.mktemp("store")
    Tracker(f"sqlite:///{root / 'mlflow.db'}", "mlci", artifact_root=root / "mlartifacts")
    return root / "mlflow.db"


@pytest.fixture
def store(tmp_path: Path, new_store: Path):  # noqa: ANN201 - (config path, tracker, directory)
    from mlci.tracking import Tracker

    write_config(tmp_path, '[[models]]\nname = "m"\npath = "m.onnx"\n')
    (tmp_path / ".mlci").mkdir()
    shutil.copy(new_store, tmp_path / ".mlci" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / '.mlci' / 'mlflow.db'}"
    return str(tmp_path / "mlci.toml"), Tracker(uri, "mlci", artifact_root=tmp_path / ".mlci" / "mlartifacts"), tmp_path


def _json(config: str) -> dict:
    done = mlci("history", "-c", config, "--format", "json")
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)


def test_an_environment_change_breaks_the_line_and_is_never_compared_across(store, tmp_path: Path) -> None:
    config, tracker, root = store
    for commit, level, fp, tvm in (("c1", 1.0, "fp", "0.27"), ("c2", 1.0, "fp", "0.27"),
                                   ("c3", 2.0, "fp2", "0.28"), ("c4", 2.0, "fp2", "0.28")):
        _log(tracker, root, commit, _steady(level), fingerprint=fp, tvm=tvm)
    [series] = _json(config)["series"]
    rows = series["rows"]
    assert [r["environment_changed"] for r in rows] == [False, False, True, False]
    assert [r["segment"] for r in rows] == [0, 0, 1, 1]
    changed = rows[2]
    assert changed["environment_diff"] == {"tvm": ["0.27", "0.28"]} and changed["verdict"] is None
    assert changed["change"] is None and "environment changed (tvm 0.27 -> 0.28)" in changed["note"]
    assert rows[3]["previous_commit"] == "c3" and rows[3]["verdict"] == "unchanged"  # 2x slower, but not a regression
    assert series["sparkline"] == "▁▁┊██"

    report = tmp_path / "report.html"
    assert mlci("history", "-c", config, "--format", "html", "-o", str(report)).exit_code == 0
    page = dom(report)
    assert page.ids_starting("median-m@cpu-") == ["median-m@cpu-0", "median-m@cpu-1"]  # two lines, not one
    assert page.ids_starting("environment-change-m@cpu-") == ["environment-change-m@cpu-2"]
    assert page.ids_starting("regressions-") == []

    table = mlci("history", "-c", config, env={"COLUMNS": "200"})
    assert "c3 env" in table.output and "c4 env" not in table.output
    assert "environment changed (tvm 0.27 -> 0.28)" in table.output


def test_a_regression_between_consecutive_commits_is_flagged_by_the_gates_rule(store, tmp_path: Path) -> None:
    config, tracker, root = store
    for commit, level in (("a" * 40, 1.0), ("b" * 40, 1.001), ("c" * 40, 1.3), ("d" * 40, 1.0)):
        _log(tracker, root, commit, _steady(level))
    rows = _json(config)["series"][0]["rows"]
    assert [r["verdict"] for r in rows] == [None, "unchanged", "regression", "improvement"]
    assert 0.29 < rows[2]["change"] < 0.31 and rows[2]["change_low"] > 0.05

    report = tmp_path / "report.html"
    assert mlci("history", "-c", config, "--format", "html", "-o", str(report)).exit_code == 0
    page = dom(report)
    assert page.uses_in("regressions-m@cpu") == 1 and page.uses_in("points-m@cpu") == 4
    table = mlci("history", "-c", config, env={"COLUMNS": "200"})
    assert "regression" in table.output and "+29.9% [+29.5, +30.1]" in table.output


def test_a_run_without_samples_is_shown_but_not_compared(store) -> None:
    config, tracker, root = store
    _log(tracker, root, "c1", _steady(1.0))
    _log(tracker, root, "c2", None)  # an old run without results.json: its median metric only
    _log(tracker, root, "c3", _steady(1.5))
    rows = _json(config)["series"][0]["rows"]
    assert rows[1]["median_ms"] == 1.0 and rows[1]["samples"] == 0 and rows[1]["verdict"] is None
    assert rows[1]["note"] == "the MLflow run's results.json is missing or could not be downloaded: not compared"
    assert rows[2]["previous_commit"] == "c1" and rows[2]["verdict"] == "regression"  # against the last one with samples


def test_a_pull_requests_runs_stay_out_even_from_a_branch_named_main(store) -> None:
    """A fork's pull request from its own main is tagged branch main: its runs are the PR's, not main's history."""
    config, tracker, root = store
    _log(tracker, root, "c1", _steady(1.0))
    _log(tracker, root, "fork", _steady(5.0), pr=7)
    _log(tracker, root, "c2", _steady(1.0))
    rows = _json(config)["series"][0]["rows"]
    assert [r["commit"] for r in rows] == ["c1", "c2"] and rows[1]["verdict"] == "unchanged"


def test_n_keeps_the_newest_commits_and_each_model_gets_its_own_series(store) -> None:
    config, tracker, root = store
    for i in range(5):
        _log(tracker, root, f"c{i}", _steady(1.0))
        _log(tracker, root, f"c{i}", _steady(2.0), model="other")
    done = mlci("history", "-c", config, "--format", "json", "-n", "2")
    report = json.loads(done.stdout)
    assert [(s["model"], [r["commit"] for r in s["rows"]]) for s in report["series"]] == [
        ("m", ["c3", "c4"]), ("other", ["c3", "c4"])]
    only = json.loads(mlci("history", "-c", config, "--format", "json", "--model", "other").stdout)
    assert [s["model"] for s in only["series"]] == ["other"]


def test_no_runs_says_so_and_creates_no_store(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[models]]\nname = "m"\npath = "m.onnx"\n')
    done = mlci("history", "-c", str(config))
    assert done.exit_code == 0
    assert "no runs in MLflow at sqlite:///" in done.output and "nothing logged there yet" in done.output
    assert not (tmp_path / ".mlci").exists()


def test_a_model_in_the_config_without_runs_is_no_error(store) -> None:
    config, tracker, root = store
    _log(tracker, root, "c1", _steady(1.0), model="other")
    done = mlci("history", "-c", config, "--model", "m")
    assert done.exit_code == 0 and "no runs of model 'm' on branch 'main'" in done.output


def test_an_unreachable_server_is_an_error_in_bounded_time(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[models]]\nname = "m"\npath = "m.onnx"\n')
    started = time.monotonic()
    done = mlci("history", "-c", str(config), "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert done.exit_code == 2
    assert "cannot read MLflow at http://127.0.0.1:" in done.output
    assert time.monotonic() - started < 20


def test_a_server_that_never_answers_is_given_up_after_the_deadline(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[models]]\nname = "m"\npath = "m.onnx"\n')
    with _silent_server() as url:
        started = time.monotonic()
        done = mlci("history", "-c", str(config), "--tracking-uri", f"http://user:secret@{url[7:]}",
                    env={"MLCI_MLFLOW_DEADLINE": "1"})
    assert done.exit_code == 2
    assert f"MLflow at {url} did not answer within 1 s" in done.output and "secret" not in done.output
    assert time.monotonic() - started < 10


def test_model_names_and_commits_are_escaped_in_the_html(store, tmp_path: Path) -> None:
    """Text from runs (a model name, a commit as MLflow stores it) is shown as text: no element, script or
    event handler of its own reaches the page Chromium builds."""
    config, tracker, root = store
    _log(tracker, root, '<script>document.title="pwned"</script>c1', _steady(1.0),
         model='<img src=x onerror="alert(1)">$x$')
    _log(tracker, root, 'c2"><svg onload=alert(2)>', _steady(1.0), model='<img src=x onerror="alert(1)">$x$')
    report = tmp_path / "report.html"
    assert mlci("history", "-c", config, "--format", "html", "-o", str(report)).exit_code == 0
    page = dom(report)
    assert page.external_resources == [] and [f["data-model"] for f in page.figures] == [
        '<img src=x onerror="alert(1)">$x$']
    assert page.active == [], page.active  # the payloads stayed text
    assert [r["data-commit"] for r in page.rows] == ['<script>document.title="pwned"</script>c1', 'c2"><svg onload=alert(2)>']


# --- helpers ------------------------------------------------------------------------------


@dataclass
class Page:
    """What a test needs from the DOM Chromium built."""

    figures: list[dict[str, str]]
    groups: dict[str, list[tuple[str, dict[str, str]]]]
    """id -> the (tag, attributes) inside the element with that id."""
    rows: list[dict[str, str]]
    links: list[str]
    """The hrefs of <a> elements outside the charts."""
    external_resources: list[str]
    active: list[str] = field(default_factory=list)
    """Scripts and event handlers in the page: the report has none of its own."""

    def uses_in(self, gid: str) -> int:
        return sum(1 for tag, _ in self.groups.get(gid, []) if tag == "use")

    def links_in(self, gid: str) -> list[str]:
        return [a.get("xlink:href") or a.get("href", "") for tag, a in self.groups.get(gid, []) if tag == "a"]

    def ids_starting(self, prefix: str) -> list[str]:
        return sorted(i for i in self.groups if i.startswith(prefix))

    @property
    def row_run_ids(self) -> list[str]:
        return [r["data-run-id"] for r in self.rows]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.figures: list[dict[str, str]] = []
        self.groups: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.rows: list[dict[str, str]] = []
        self.links: list[str] = []
        self.external: list[str] = []
        self.active: list[str] = []
        """What would run in a browser: every <script> element and every on* event-handler attribute."""
        self.open: list[tuple[str, str | None]] = []  # (tag, id) of the elements we are inside

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        for _, gid in self.open:
            if gid:
                self.groups[gid].append((tag, a))
        if "id" in a:
            self.groups.setdefault(a["id"], [])
        if tag == "script":
            self.active.append("<script>")
        self.active += [f"{tag} {key}" for key in a if key.lower().startswith("on")]
        if tag == "figure":
            self.figures.append(a)
        if tag == "tr" and "data-run-id" in a:
            self.rows.append(a)
        if tag == "a" and not any(gid for _, gid in self.open):
            self.links.append(a.get("href", ""))
        for key in ("src", "data"):
            if key in a:
                self.external.append(a[key])
        if tag == "link" or (tag == "script" and "src" in a):
            self.external.append(a.get("href") or a.get("src", ""))
        if tag not in ("use", "path", "meta", "br", "img", "input", "link", "stop", "rect", "circle", "ellipse",
                       "line", "polyline", "polygon", "image"):
            self.open.append((tag, a.get("id")))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if self.open and self.open[-1][0] == tag:
            self.open.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i][0] == tag:
                del self.open[i:]
                break


def dom(report: Path) -> Page:
    """The report as headless Chromium builds it (nothing to fetch: the file must stand alone)."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is needed to check the HTML report: apt-get install chromium")
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", report.as_uri()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and ("<figure" in proc.stdout or "No runs" in proc.stdout), proc.stderr[-2000:]
    collector = _Collector()
    collector.feed(proc.stdout)
    return Page(collector.figures, collector.groups, collector.rows, collector.links, collector.external,
                collector.active)


def _run_ids(project: Project) -> list[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project.root / '.mlci' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlci").experiment_id
    ids = []
    for commit in project.main:
        [run] = client.search_runs([experiment], f"tags.`mlci.commit` = '{commit}'")
        ids.append(run.info.run_id)
    return ids


class _Silent:
    """A TCP server that accepts connections and never answers: a hung tracking server."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.conns: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                continue


@contextmanager
def _silent_server() -> Iterator[str]:
    server = _Silent()
    try:
        yield f"http://127.0.0.1:{server.sock.getsockname()[1]}"
    finally:
        server.stop.set()
        server.thread.join()
        for conn in server.conns:
            conn.close()
        server.sock.close()


def test_the_history_prices_each_commit_at_the_price_its_run_recorded(store) -> None:
    config, tracker, root = store
    for commit, price in (("c1", None), ("c2", 0.36)):
        _log(tracker, root, commit, _steady(10.0), price=price)
    [series] = _json(config)["series"]
    assert [r["cost_per_million_usd"] for r in series["rows"]] == [None, pytest.approx(0.36 * 10.0 / 3.6, rel=0.01)]
    assert series["rows"][1]["onnxruntime_cost_per_million_usd"] == pytest.approx(0.36 * 2.0 / 3.6)
    table = mlci("history", "-c", config, env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "$ per 1M inferences" in table.output and "$1.00 (ORT $0.20)" in table.output
