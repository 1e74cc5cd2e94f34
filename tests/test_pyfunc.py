"""The tuned build as an MLflow model: `mlci run` on the default branch registers a servable version per
commit, which `mlflow.pyfunc.load_model` and `mlflow models serve` run like ONNX Runtime runs the ONNX file."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from mlci import tracking
from mlci.config import NumericsConfig
from mlci.results import GitInfo, Results, Status, read_results

from .conftest import git, new_git_repo, quick_project
from .servers import free_port, stop, wait_until_up

NAME = "mlci-tiny-cpu"


@dataclass
class Store:
    root: Path
    uri: str
    commit: str

    @property
    def results(self) -> Results:
        return read_results(self.root / ".mlci" / "results" / "cpu.json")

    def client(self):  # noqa: ANN201 - an MlflowClient
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def _mlci(root: Path, uri: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLFLOW_"))}
    env.update(MLFLOW_TRACKING_URI=uri, **env_vars)
    proc = subprocess.run([sys.executable, "-m", "mlci.cli", "run"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One untuned `mlci run` of a commit on main, into a sqlite store."""
    root = quick_project(new_git_repo(tmp_path_factory.mktemp("pyfunc")))
    git(root, "add", "-A")
    git(root, "commit", "-qm", "a tiny model")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    _mlci(root, uri)
    return Store(root, uri, git(root, "rev-parse", "HEAD"))


@pytest.fixture(scope="module")
def loaded(store: Store):  # noqa: ANN201 - an mlflow.pyfunc.PyFuncModel
    """Version 1 of the registered model, loaded by its registry URI as a user would."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(store.uri)
    try:
        return mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again


def reference(store: Store, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(store.root / "models" / "tiny.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def close_to(got: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(got, expected, atol=NumericsConfig.atol, rtol=NumericsConfig.rtol)


@pytest.mark.slow
def test_the_registered_version_predicts_what_onnx_runtime_does(store: Store, loaded) -> None:  # noqa: ANN001
    x = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    outputs = loaded.predict({"x": x})
    assert list(outputs) == ["fc1"]
    close_to(outputs["fc1"], reference(store, x))


@pytest.mark.slow
def test_the_version_carries_its_commit_and_pins_the_tvm_runtime_that_built_it(store: Store) -> None:
    from importlib.metadata import version

    from mlflow.artifacts import download_artifacts

    client = store.client()
    [v] = client.search_model_versions(f"name = '{NAME}'")
    assert v.tags["mlci.commit"] == store.commit and v.tags["mlci.branch"] == "main"
    run = client.get_run(v.run_id)
    assert run.data.tags["mlci.commit"] == store.commit and run.data.tags["mlci.registered_model"] == f"{NAME}/1"
    assert v.tags["mlci.fingerprint"] == store.results.target.fingerprint.hash
    model_dir = Path(download_artifacts(f"runs:/{v.run_id}/model", tracking_uri=store.uri))
    requirements = (model_dir / "requirements.txt").read_text().split()
    for name in ("apache-tvm", "apache-tvm-ffi", "numpy"):
        assert f"{name}=={version(name)}" in requirements
    # The run keeps the library once, inside the model.
    assert [a.path for a in client.list_artifacts(v.run_id)] == ["model", "results.json", "tuning"]


@pytest.mark.slow
def test_the_signature_names_each_tensor_and_a_wrong_shape_is_refused(loaded) -> None:  # noqa: ANN001
    from mlflow.exceptions import MlflowException

    signature = loaded.metadata.signature
    assert signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (1, 32)},
                                           "name": "x"}]
    assert signature.outputs.to_dict() == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (1, 8)},
                                            "name": "fc1"}]
    with pytest.raises(MlflowException, match=r"Shape of input \(1, 31\) does not match expected shape \(1, 32\)"):
        loaded.predict({"x": np.zeros((1, 31), np.float32)})


@pytest.mark.slow
def test_the_model_itself_refuses_a_wrong_shape_by_input_name(loaded) -> None:  # noqa: ANN001
    """Called without MLflow's schema check (the python model directly), the model names the input."""
    inner = loaded.unwrap_python_model()
    with pytest.raises(ValueError, match=r"input x: shape \[2, 32\] does not match the model's \[1, 32\]"):
        inner.predict(None, {"x": np.zeros((2, 32), np.float32)})
    with pytest.raises(ValueError, match=r"missing input\(s\) x; the model takes x float32\[1, 32\]"):
        inner.predict(None, {"y": np.zeros((1, 32), np.float32)})


@pytest.mark.slow
def test_an_interface_that_does_not_match_the_library_is_an_error_not_a_wrong_answer(loaded) -> None:  # noqa: ANN001
    inner = loaded.unwrap_python_model()
    outputs = inner.interface["outputs"]
    inner.interface["outputs"] = outputs + outputs
    try:
        with pytest.raises(RuntimeError, match="the library returned 1 outputs, its interface names 2"):
            inner.predict(None, {"x": np.zeros((1, 32), np.float32)})
    finally:
        inner.interface["outputs"] = outputs


@pytest.mark.slow
def test_loading_on_a_device_this_machine_lacks_says_so(store: Store) -> None:
    from mlflow.artifacts import download_artifacts
    from mlflow.pyfunc import load_model

    [v] = store.client().search_model_versions(f"name = '{NAME}'")
    model_dir = download_artifacts(f"runs:/{v.run_id}/model", tracking_uri=store.uri)
    with pytest.raises(Exception, match=r"this model runs on metal:0 .*this machine has no such device"):
        load_model(model_dir, model_config={"device": "metal"})


@pytest.mark.slow
def test_a_pull_request_run_logs_its_model_but_registers_nothing(store: Store, tmp_path: Path) -> None:
    root = store.root
    git(root, "checkout", "-qb", "feature")
    try:
        git(root, "commit", "-q", "--allow-empty", "-m", "a change under review")
        head = git(root, "rev-parse", "HEAD")
        event = tmp_path / "event.json"
        event.write_text(json.dumps({"number": 5, "pull_request": {"number": 5, "head": {"sha": head}},
                                     "repository": {"default_branch": "main"}}))
        _mlci(root, store.uri, GITHUB_EVENT_NAME="pull_request", GITHUB_EVENT_PATH=str(event),
              GITHUB_HEAD_REF="feature", GITHUB_SHA=head)
    finally:
        git(root, "checkout", "-q", "main")
    client = store.client()
    [pr_run] = client.search_runs([client.get_experiment_by_name("mlci").experiment_id],
                                  f"tags.`mlci.commit` = '{head}'")
    assert pr_run.data.tags["mlci.pr"] == "5"
    assert "model/MLmodel" in [a.path for a in client.list_artifacts(pr_run.info.run_id, "model")]
    assert "mlci.registered_model" not in pr_run.data.tags
    assert [v.tags["mlci.commit"] for v in client.search_model_versions(f"name = '{NAME}'")] == [store.commit]


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations_like_onnx_runtime(store: Store) -> None:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}/1", "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        wait_until_up(f"http://127.0.0.1:{port}/ping", timeout=60, proc=proc)
        x = np.random.default_rng(2).standard_normal((1, 32)).astype(np.float32)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": {"x": x.tolist()}}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
        close_to(np.asarray(answer["predictions"]["fc1"], np.float32), reference(store, x))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's workers are in the group it leads
        stop(proc)


# --- logging a build (the tracking library on the module's run) -------------------------------------


def _log_as(store: Store, tmp_path: Path, name: str, *, status: Status = Status.OK, register: bool | str = True,
            invocation: str = "inv", damage_interface: bool = False) -> Results:
    """Log the module's build again as model `name` (its own registry entry), as `mlci run` logs one."""
    results = store.results
    results.models = [dataclasses.replace(results.models[0], name=name, status=status, mlflow_run_id=None)]
    results.git = GitInfo(commit=store.commit, branch="main", default_branch="main")
    work = tmp_path / "work"
    if not (work / name).exists():
        shutil.copytree(store.root / ".mlci" / "work" / "cpu" / "tiny", work / name)
        (work / name / "tiny.so").rename(work / name / f"{name}.so")
    if damage_interface:
        (work / name / "interface.json").write_text("{not json")
    error = tracking.log_results(results, tmp_path / "cpu.json", uri=store.uri, experiment="mlci",
                                 artifact_root=tmp_path / "artifacts", artifacts_dir=work, params={},
                                 progress=_Quiet(), invocation=invocation, register=register)
    assert error is None
    return results


class _Quiet:
    def stage(self, model: str, text: str) -> None: ...

    def finish(self, model: str, status: str) -> None: ...


def _versions(store: Store, name: str) -> list:
    return store.client().search_model_versions(f"name = '{name}'")


@pytest.mark.slow
def test_register_false_logs_the_model_in_the_run_and_registers_nothing(store: Store, tmp_path: Path) -> None:
    results = _log_as(store, tmp_path, "unregistered", register=False)
    artifacts = [a.path for a in store.client().list_artifacts(results.models[0].mlflow_run_id, "model")]
    assert "model/MLmodel" in artifacts
    assert _versions(store, "mlci-unregistered-cpu") == []


@pytest.mark.slow
def test_a_build_that_failed_its_numerics_check_is_not_registered(store: Store, tmp_path: Path) -> None:
    _log_as(store, tmp_path, "wrong", status=Status.NUMERICS_FAILED)
    assert _versions(store, "mlci-wrong-cpu") == []


@pytest.mark.slow
def test_a_build_that_failed_logs_no_model_even_with_an_earlier_library_beside_it(store: Store, tmp_path: Path) -> None:
    results = _log_as(store, tmp_path, "broken", status=Status.COMPILE_FAILED)
    assert [a.path for a in store.client().list_artifacts(results.models[0].mlflow_run_id)] == ["results.json",
                                                                                               "tuning"]


@pytest.mark.slow
def test_a_retried_job_registers_its_run_once(store: Store, tmp_path: Path) -> None:
    first = _log_as(store, tmp_path, "retried")
    again = _log_as(store, tmp_path, "retried")
    assert first.models[0].mlflow_run_id == again.models[0].mlflow_run_id
    assert [str(v.version) for v in _versions(store, "mlci-retried-cpu")] == ["1"]


@pytest.mark.slow
def test_a_model_that_cannot_be_logged_is_one_warning_and_its_library_is_kept(
        store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mlci"):
        results = _log_as(store, tmp_path, "damaged", damage_interface=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "damaged: the build was not logged as an MLflow model" in warnings[0]
    assert "interface.json: not a model interface file" in warnings[0]
    run_id = results.models[0].mlflow_run_id
    client = store.client()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id, "compiled")] == ["compiled/damaged.so"]
    assert _versions(store, "mlci-damaged-cpu") == []
