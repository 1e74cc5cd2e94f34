"""MLflow store behaviour that matters in CI: many processes on a new sqlite store, idempotent runs."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from pathlib import Path

import pytest

from mlci.results import Fingerprint, GitInfo, Latency, ModelResult, PeerInfo, Results, TargetInfo


def _results(model: str) -> tuple[Results, ModelResult]:
    m = ModelResult(
        name=model, path=f"{model}.onnx", sha256="0" * 64,
        latency_ms=Latency(samples=[1.0], median=1.0, mean=1.0, std=0.0, min=1.0, p90=1.0, n=1),
        peer=PeerInfo(onnxruntime_median_ms=2.0, speedup=2.0),
    )
    r = Results(git=GitInfo(commit="c0ffee", branch="main"),
                target=TargetInfo(name="cpu", tvm_target={"kind": "llvm"}, fingerprint=Fingerprint(hash="fp")),
                models=[m])
    return r, m


def _log_one(args: tuple[str, str, str]) -> str:
    uri, root, model = args
    from mlci.tracking import Tracker

    tracker = Tracker(uri, "mlci", artifact_root=Path(root) / "artifacts")
    results, m = _results(model)
    return tracker.log_model(results, m, job_key=f"job/{model}", params={}, artifacts=[])


def test_processes_starting_together_on_a_new_store(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    jobs = [(uri, str(tmp_path), f"model{i}") for i in range(4)]
    with mp.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(_log_one, jobs)
    assert len(set(run_ids)) == 4

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("mlci")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["mlci.model"] for r in runs) == [f"model{i}" for i in range(4)]
    assert all(r.info.status == "FINISHED" for r in runs)


def test_same_job_key_reuses_the_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _log_one((uri, str(tmp_path), "m"))
    again = _log_one((uri, str(tmp_path), "m"))  # e.g. a retried job step
    assert first == again


def test_history_baseline_trend_and_fingerprint_mismatch(tmp_path: Path) -> None:
    """The merge-base run wins; else the newest default-branch run; a changed environment is
    reported with the keys that differ, never marked comparable."""
    import json

    from mlci.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "mlci", artifact_root=tmp_path / "artifacts")
    fingerprint = Fingerprint(hash="fp", tvm="0.27", cpu="znver5")
    for i, commit in enumerate(["c1", "c2", "c3"]):
        results, m = _results("m")
        results.git = GitInfo(commit=commit, branch="main")
        results.target.fingerprint = fingerprint
        m.latency_ms = Latency(samples=[1.0 + i, 1.1 + i], median=1.05 + i, mean=1.05 + i, std=0.05, min=1.0 + i,
                               p90=1.1 + i, n=2)
        stored = tmp_path / f"{commit}.json"
        stored.write_text(json.dumps(results.to_dict()))
        tracker.log_model(results, m, job_key=f"j/{commit}", params={}, artifacts=[(stored.rename(tmp_path / "results.json"), None)])

    # A fork's pull request from its own main: tagged branch main, but no baseline and no trend point.
    results, m = _results("m")
    results.git = GitInfo(commit="fork1", branch="main", pr=9)
    results.target.fingerprint = fingerprint
    m.latency_ms = Latency(samples=[9.0, 9.1], median=9.05, mean=9.05, std=0.05, min=9.0, p90=9.1, n=2)
    tracker.log_model(results, m, job_key="j/fork1", params={}, artifacts=[])

    newest = tracker.history("m", "cpu", fingerprint, base_commit=None, default_branch="main", exclude_commit="c4")
    assert newest.commit == "c3" and newest.fingerprint_match and newest.latency_ms.samples == [3.0, 3.1]
    assert [p.commit for p in newest.trend] == ["c1", "c2", "c3"]
    merge_base = tracker.history("m", "cpu", fingerprint, base_commit="c1", default_branch="main", exclude_commit="c3")
    assert merge_base.commit == "c1" and [p.commit for p in merge_base.trend] == ["c1", "c2"]

    upgraded = dataclasses.replace(fingerprint, hash="fp2", tvm="0.28")
    other = tracker.history("m", "cpu", upgraded, base_commit=None, default_branch="main", exclude_commit=None)
    assert not other.fingerprint_match and other.fingerprint_diff == {"tvm": ["0.27", "0.28"]}
    assert tracker.history("m", "gpu", fingerprint, base_commit=None, default_branch="main", exclude_commit=None) is None
    assert tracker.run_url("abc") is None and tracker.compare_url(["a", "b"]) is None  # sqlite: no web UI
    assert newest.trend_url is None


def test_a_vacuous_numerics_check_is_tagged() -> None:
    from mlci.results import NumericsInfo
    from mlci.tracking import model_tags

    results, m = _results("zoo")
    m.numerics = NumericsInfo(0.0, 0.0, 1e-4, 1e-3, True, input_sets=2, vacuous="the check proves nothing: ...")
    tags = model_tags(results, m, job_key="k")
    assert tags["mlci.numerics_vacuous"] == "true" and tags["mlci.numerics_note"].startswith("the check proves")
    m.numerics = dataclasses.replace(m.numerics, vacuous=None)
    assert model_tags(results, m, job_key="k")["mlci.numerics_vacuous"] == "false"


def test_a_run_without_the_targets_hardware_is_tagged_with_how_it_ran() -> None:
    """MLflow's run list tells an emulated or compile-only run (no latency) from a measured one."""
    from mlci.results import Execution
    from mlci.tracking import model_tags

    results, m = _results("zoo")
    assert model_tags(results, m, job_key="k")["mlci.execution"] == "native"
    results.target = dataclasses.replace(results.target, execution=Execution.EMULATED)
    assert model_tags(results, m, job_key="k")["mlci.execution"] == "emulated"


@pytest.mark.parametrize(("git_info", "register", "expected"), [
    (GitInfo(branch="main"), True, True),
    (GitInfo(branch="master", default_branch="master"), True, True),
    (GitInfo(branch="main", default_branch="master"), True, False),
    (GitInfo(branch="release"), "release", True),
    (GitInfo(branch="main"), "release", False),
    (GitInfo(branch="main"), False, False),
    (GitInfo(branch="main", pr=3), True, False),  # a pull request from a fork's main
    (GitInfo(branch=None), True, False),  # a detached HEAD outside CI
])
def test_which_runs_register_their_build(git_info: GitInfo, register: bool | str, expected: bool) -> None:
    from mlci.tracking import registers

    assert registers(git_info, register) is expected


def test_mlci_sync_registers_as_the_run_was_configured_to(tmp_path: Path) -> None:
    """The pending file keeps `[tracking] register`; one written before the key existed means the default."""
    from mlci.tracking import PendingLog, _recorded_register

    pending = tmp_path / "cpu.json.mlflow-pending"
    PendingLog(uri="sqlite://", experiment="mlci", artifact_root="a", artifacts_dir="w", params={},
               invocation="i", register=False).write(pending)
    assert PendingLog.read(pending).register is False and _recorded_register(pending) is False
    older = json.loads(pending.read_text())
    del older["register"]
    pending.write_text(json.dumps(older))
    assert PendingLog.read(pending).register is True
    assert _recorded_register(tmp_path / "none") is True


@pytest.mark.parametrize("uri, shown", [
    ("https://user:pw@mlflow.example/", "https://mlflow.example/"),
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("https://mlflow.example/?access_token=abc&team=ml", "https://mlflow.example/?access_token=***&team=ml"),
    ("https://h/p?X-Amz-Signature=zz&v=2", "https://h/p?X-Amz-Signature=***&v=2"),
    ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
    ("databricks", "databricks"),
])
def test_a_tracking_uri_is_shown_without_its_credentials_whatever_its_scheme(uri: str, shown: str) -> None:
    from mlci.tracking import without_credentials

    assert without_credentials(uri) == shown
