"""The README's quick start stays true: its first command runs the example to the end."""

from __future__ import annotations

import pytest

from .conftest import REPO, Quickstart, quickstart_commands

pytestmark = pytest.mark.slow


def test_readme_has_two_quickstart_commands_and_ci_runs_the_second() -> None:
    run, tests = quickstart_commands()
    assert run.startswith("mlci run ")
    assert tests in REPO.joinpath(".ci/run").read_text()


def test_readme_first_command_runs_the_example(quickstart: Quickstart) -> None:
    proc = quickstart.proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [m["status"] for m in quickstart.results["models"]] == ["ok", "ok", "ok"]
    # Every example's check proves something: its outputs change with its inputs.
    assert [(m["numerics"]["vacuous"], m["numerics"]["input_sets"]) for m in quickstart.results["models"]] == [
        (None, 2)] * 3

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{quickstart.project / '.mlci/mlflow.db'}")
    experiment = client.get_experiment_by_name("mlci")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["mlci.model"] for r in runs) == ["cnn", "mlp", "squeezenet"]
    for run_ in runs:
        assert run_.info.status == "FINISHED"
        assert run_.data.metrics["latency_ms_median"] > 0
        assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {"results.json", "model", "tuning"}
