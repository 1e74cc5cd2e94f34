"""`mlci run` end to end in a subprocess: real TVM tuning, ONNX Runtime, MLflow sqlite store.

What a tuned model looks like is checked on the quick start's cold run (the suite's one
cold tuning run). The failure cases run untuned (`trials = 0`): one config holds a tiny
model that must pass, a model with an operator nobody converts (AttnLSTM) and a model checked with zero
tolerance (TVM and ONNX Runtime sum in different orders): the failures are reported and
the good model still finishes. Beside them, models as current exporters write them (IR version
14, which ONNX Runtime 1.31 refuses as written), one whose convolution's neighbour TVM's
channels-last pass cannot convert, one without convolutions that the pass broke before it ran
only on convolutions, and one ONNX Runtime cannot run at all: each compiles and runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from .conftest import Quickstart, attn_lstm_model, save, tiny_mlp, write_config

pytestmark = pytest.mark.slow


def mlci(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlci.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def as_exported(nodes: list[onnx.NodeProto], x: tuple[int, list[int]], y: tuple[int, list[int]],
                weights: dict[str, np.ndarray], path: Path) -> Path:
    """A model saved as onnx 1.23 saves it by default: IR version 14."""
    graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", x[0], x[1])],
                              [helper.make_tensor_value_info("y", y[0], y[1])],
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert model.ir_version == 14
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def exported_models(root: Path) -> None:
    rng = np.random.default_rng(2)
    f32 = TensorProto.FLOAT
    # A convolution whose output meets a per-channel Max: ConvertLayout's inference fails on it.
    as_exported([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                 helper.make_node("Max", ["c", "floor"], ["y"], name="floor_max")],
                (f32, [1, 3, 8, 8]), (f32, [1, 4, 6, 6]),
                {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
                 "floor": rng.standard_normal((4, 1, 1)).astype(np.float32)}, root / "models" / "conv_max.onnx")
    # No convolution: a broadcast Max that the channels-last pass crashed on ("Invalid SLayout").
    as_exported([helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
                 helper.make_node("Max", ["h", "floor"], ["y"], name="floor_max")],
                (f32, [2, 5, 8]), (f32, [2, 5, 6]),
                {"w": rng.standard_normal((8, 6)).astype(np.float32),
                 "floor": rng.standard_normal((5, 1)).astype(np.float32)}, root / "models" / "no_conv.onnx")
    # The output declared with a rank it does not have (as a real OCR export declares [1, N] for a
    # [16, 1, N] output): ONNX Runtime runs it, but refuses to run its I/O binding twice.
    as_exported([helper.make_node("Relu", ["x"], ["y"], name="act")], (f32, [2, 3, 4]), (f32, [2, "n"]), {},
                root / "models" / "badrank.onnx")
    # ONNX Runtime has no int16 Max kernel: valid ONNX, which it refuses to load.
    as_exported([helper.make_node("Max", ["x", "floor"], ["y"], name="clamp16")],
                (TensorProto.INT16, [2, 3]), (TensorProto.INT16, [2, 3]),
                {"floor": np.array([[1, -2, 3]], np.int16)}, root / "models" / "int16.onnx")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("project")
    save(tiny_mlp((32, 64, 8)), root / "models" / "tiny.onnx")
    save(attn_lstm_model(), root / "models" / "lstm.onnx")
    save(tiny_mlp((256, 512, 16), seed=5), root / "models" / "strict.onnx")
    exported_models(root)
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
        [[models]]
        path = "models/conv_max.onnx"
        [[models]]
        path = "models/no_conv.onnx"
        [[models]]
        path = "models/int16.onnx"
        [[models]]
        path = "models/badrank.onnx"
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
    assert [m["name"] for m in results["models"]] == ["tiny", "lstm", "strict", "conv_max", "no_conv", "int16",
                                                       "badrank"]
    for name in ("tiny", "lstm", "strict", "conv_max", "no_conv", "int16", "badrank"):
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


def test_models_as_current_exporters_write_them_compile_and_match_onnx_runtime(cold, results) -> None:
    """IR version 14, a layout pass that cannot convert the model, no convolution at all."""
    for name in ("conv_max", "no_conv"):
        model = _model(results, name)
        assert model["status"] == "ok", model["error"]
        assert model["numerics"]["passed"] and model["numerics"]["no_reference"] is None
        assert model["numerics"]["max_abs_err"] is not None and model["peer"]["onnxruntime_median_ms"] > 0
    # The failed layout pass is named once (tuning and build run it on the same model) and costs nothing else.
    assert cold.stderr.count("the channels-last layout pass (ConvertLayout to NHWC) failed") == 1, cold.stderr


def test_a_model_onnx_runtime_cannot_load_compiles_and_runs_with_no_reference(cold, results) -> None:
    model = _model(results, "int16")
    assert model["status"] == "ok", model["error"]
    numerics = model["numerics"]
    assert numerics["passed"] is True and numerics["max_abs_err"] is None
    assert "ONNX Runtime 1.31.1 cannot load the model" in numerics["no_reference"]
    assert "Max(13) node with name 'clamp16'" in numerics["no_reference"]
    assert model["latency_ms"]["n"] >= 3  # TVM's build was timed ...
    assert model["peer"]["onnxruntime_median_ms"] is None and "not compared" in model["peer"]["note"]  # ... ORT's not
    assert "no reference" in cold.stdout
    assert "int16: numerics not checked (no reference): ONNX Runtime" in " ".join(cold.stdout.split())


def test_onnx_runtime_refusing_its_io_binding_is_timed_without_it(results) -> None:
    """The peer is a comparison: a model ONNX Runtime runs but cannot bind is timed on plain runs."""
    model = _model(results, "badrank")
    assert model["status"] == "ok", model["error"]
    assert model["numerics"]["passed"] and model["peer"]["onnxruntime_median_ms"] > 0


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
    assert set(runs) == {"tiny", "lstm", "strict", "conv_max", "no_conv", "int16", "badrank"}
    assert runs["int16"].data.tags["mlci.numerics_reference"] == "none"
    assert runs["tiny"].data.tags["mlci.numerics_reference"] == "onnxruntime"

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
