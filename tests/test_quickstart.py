"""The README's quick start stays true: its first command runs the example to the end."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


def quickstart_commands() -> list[str]:
    """The commands of the README's second code block under '## Quick start'."""
    section = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.strip() for line in blocks[1].splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_two_quickstart_commands_and_ci_runs_the_second() -> None:
    run, tests = quickstart_commands()
    assert run.startswith("mlci run ")
    assert tests in REPO.joinpath(".ci/run").read_text()


def test_readme_first_command_runs_the_example(tmp_path: Path) -> None:
    run, _ = quickstart_commands()
    shutil.copytree(REPO / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns(".mlci", "models", "__pycache__"))
    argv = shlex.split(run)
    assert argv[0] == "mlci"
    proc = subprocess.run([sys.executable, "-m", "mlci.cli", *argv[1:]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    results = json.loads((tmp_path / "examples/.mlci/results/cpu.json").read_text())
    assert [m["status"] for m in results["models"]] == ["ok", "ok", "ok"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'examples/.mlci/mlflow.db'}")
    experiment = client.get_experiment_by_name("mlci")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["mlci.model"] for r in runs) == ["cnn", "mlp", "squeezenet"]
    for run_ in runs:
        assert run_.info.status == "FINISHED"
        assert run_.data.metrics["latency_ms_median"] > 0
        assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {"results.json", "compiled", "tuning"}
