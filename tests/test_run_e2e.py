"""`mlci run` end to end in a subprocess: real TVM tuning, ONNX Runtime, MLflow sqlite store.

What a tuned model looks like is checked on the quick start's cold run (the suite's one
cold tuning run). The failure cases run untuned (`trials = 0`): one config holds a tiny
model that must pass, a model with an operator nobody converts (AttnLSTM) and a model checked with zero
tolerance (TVM and ONNX Runtime sum in different orders): the failures are reported and
the good model still finishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Quickstart, attn_lstm_model, save, tiny_mlp, write_config

pytestmark = pytest.mark.slow


def mlci(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlci.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    save(tiny_mlp((32, 64, 8)), root / "models" / "tiny.onnx")
    save(attn_lstm_model(), root / "models" / "lstm.onnx")
    save(tiny_mlp((256, 512, 16), seed=5), root / "models" / "strict.onnx")
    write_config(root, """
        [tuning]
        trials = 0
        [measure]
        samples = 10
        min_sample_ms = 0.5
        [[models]]
        name = "tiny"
        path = "models/tiny.onnx"
        dims = { batch = 1 }
        seconds = 300
        [[models]]
        name = "lstm"
        path = "models/lstm.onnx"
        [[models]]
        name = "strict"
        path = "models/strict.onnx"
        dims = { batch = 1 }
        atol = 0.0
        rtol = 0.0
    """)
    return root


@pytest.fixture(scope="module")
def cold(project: Path) -> subprocess.CompletedProcess:
    return mlci("run", cwd=project)


@pytest.fixture(scope="module")
def results(cold: subprocess.CompletedProcess, project: Path) -> dict:
    return json.loads((project / ".mlci" / "results" / "cpu.json").read_text())


def _model(results: dict, name: str) -> dict:
    return next(m for m in results["models"] if m["name"] == name)


def test_failures_fail_the_run_but_every_model_is_reported(cold, results) -> None:
    assert cold.returncode == 1, cold.stderr
    assert [m["name"] for m in results["models"]] == ["tiny", "lstm", "strict"]
    for name in ("tiny", "lstm", "strict"):
        assert name in cold.stdout  # the final table
    assert "2 model(s) failed: lstm, strict" in cold.stderr


def test_good_model_is_tuned_checked_and_benchmarked(quickstart: Quickstart) -> None:
    results = quickstart.results
    mlp = _model(results, "mlp")
    assert mlp["status"] == "ok", mlp["error"]
    assert mlp["tuning"]["trials_new"] > 0 and mlp["tuning"]["trials_valid_new"] == mlp["tuning"]["trials_new"]
    assert mlp["tuning"]["trials_budget"] == 64 and mlp["tuning"]["seconds_budget"] == 600
    assert mlp["compile"]["seconds"] > 0 and mlp["compile"]["kernels"] >= 2
    assert mlp["numerics"]["passed"] is True
    lat = mlp["latency_ms"]
    assert lat["n"] == len(lat["samples"]) >= 3
    assert lat["min"] <= lat["median"] <= lat["p90"]
    assert mlp["peer"]["onnxruntime_median_ms"] > 0
    assert mlp["peer"]["speedup"] > 0
    # what to ship on this target, and by how much
    assert mlp["peer"]["faster"] == ("tvm" if mlp["peer"]["speedup"] >= 1 else "onnxruntime")
    assert mlp["peer"]["faster_by"] == pytest.approx(max(mlp["peer"]["speedup"], 1 / mlp["peer"]["speedup"]))
    assert len(mlp["sha256"]) == 64
    assert results["schema"] == "mlci.results" and results["schema_version"] >= 2
    assert results["config"] == "mlci.toml"  # not in git: relative to its own directory
    fp = results["target"]["fingerprint"]
    assert fp["tvm"].startswith("0.27") and fp["cores"] >= 1 and fp["hash"]
    assert results["target"]["tvm_target"]["kind"] == "llvm"


def test_tvm_and_onnx_runtime_measure_on_the_targets_threads(results) -> None:
    """TVM's default pool takes half the hardware threads; mlci gives it (and ONNX Runtime) the target's."""
    cores = results["target"]["tvm_target"]["num-cores"]
    assert results["target"]["fingerprint"]["threads"] == cores  # as TVM reported it in the measuring process
    assert _model(results, "tiny")["peer"]["threads"] == cores


def test_lstm_is_unsupported_with_node_named(results) -> None:
    lstm = _model(results, "lstm")
    assert lstm["status"] == "import_failed"
    assert "com.microsoft.AttnLSTM (node 'encoder/lstm_1')" in lstm["error"]


def test_numerics_mismatch_is_detected(results) -> None:
    strict = _model(results, "strict")
    assert strict["status"] == "numerics_failed"
    assert strict["error"].startswith("numerics mismatch: output ")
    assert "at index (0, " in strict["error"]
    assert strict["numerics"]["passed"] is False and strict["numerics"]["max_abs_err"] > 0


def test_mlflow_runs_read_back_from_sqlite(results, project: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / '.mlci' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mlci")
    assert experiment.artifact_location.startswith("file://")
    runs = {r.data.tags["mlci.model"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny", "lstm", "strict"}

    tiny = runs["tiny"]
    assert tiny.info.status == "FINISHED"
    assert tiny.info.run_id == _model(results, "tiny")["mlflow_run_id"]
    tags = tiny.data.tags
    assert tags["mlci.target"] == "cpu"
    assert tags["mlci.status"] == "ok"
    assert tags["mlci.fingerprint"] == results["target"]["fingerprint"]["hash"]
    assert tags["mlflow.runName"] == "tiny@cpu"
    assert tags["mlci.job_key"]
    assert tags["mlci.build"] == "tuned" and tags["mlci.build_cached"] == "false"  # the first run builds
    metrics = tiny.data.metrics
    assert metrics["latency_ms_median"] == pytest.approx(_model(results, "tiny")["latency_ms"]["median"])
    assert metrics["speedup_vs_onnxruntime"] > 0
    assert {"compile_s", "tune_s", "trials_new", "onnxruntime_median_ms"} <= set(metrics)
    assert tiny.data.params["tvm_version"].startswith("0.27")
    assert tiny.data.params["trials_budget"] == "0"
    assert tiny.data.params["tune_seconds_budget"] == "300.0"  # the model's own cap, not the global one
    artifacts = {a.path for a in client.list_artifacts(tiny.info.run_id)}
    assert {"results.json", "tuning", "model"} <= artifacts  # the build as an MLflow model
    assert "model/artifacts/tiny.so" in [a.path for a in client.list_artifacts(tiny.info.run_id, "model/artifacts")]
    assert client.list_artifacts(tiny.info.run_id, "tuning")[0].path == "tuning/tuning_records.json"

    assert runs["lstm"].info.status == "FAILED"
    assert runs["lstm"].data.tags["mlci.status"] == "import_failed"
    assert "encoder/lstm_1" in runs["lstm"].data.tags["mlci.error"]


def test_warm_rerun_searches_and_compiles_nothing(quickstart: Quickstart) -> None:
    """An unchanged model re-runs from the caches: no trials, and the library the cold run built and
    checked never worse, with the same choice."""
    warm = quickstart.mlci("run", "-c", "examples/mlci.toml", "--model", "mlp", "--no-tracking", "-o", "warm.json")
    assert warm.returncode == 0, warm.stderr
    mlp = _model(json.loads((quickstart.cwd / "warm.json").read_text()), "mlp")
    assert mlp["tuning"]["trials_new"] == 0
    assert mlp["tuning"]["trials_cached"] == 64
    assert mlp["status"] == "ok"
    cold = _model(quickstart.results, "mlp")["compile"]
    assert not cold["build_cached"] and mlp["compile"]["build_cached"]
    assert (mlp["compile"]["build"], mlp["compile"]["kernels_tuned"]) == (cold["build"], cold["kernels_tuned"])
