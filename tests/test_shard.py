"""Sharded tuning: N `mlci tune --shard K/N` jobs search every kernel of a run exactly once between
them, through one S3 bucket, and the run's `mlci run` then searches nothing and builds from their
records. Real TVM, a real moto_server, tiny models."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlci.budget import ShardKernel, assign_shards
from mlci.cli import app

from .conftest import save, tiny_mlp, write_config
from .servers import moto_server

# --- the assignment, pure -------------------------------------------------------------------


def _kernels(n: int, seed: int) -> list[ShardKernel]:
    rng = random.Random(seed)
    return [ShardKernel(f"{i:016x}", rng.choice([0, 1, 2, 5, 16, 40]), tie=f"{i:016x}") for i in range(n)]


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 5])
def test_every_kernel_lands_in_exactly_one_shard(shards: int) -> None:
    kernels = _kernels(23, seed=shards)
    assignment = assign_shards(kernels, shards)
    assert set(assignment) == {k.key for k in kernels}  # every kernel, and a dict: each once
    assert set(assignment.values()) <= set(range(1, shards + 1))
    assert len(set(assignment.values())) == min(shards, len(kernels))  # no shard left idle


@pytest.mark.parametrize("shards", [2, 3, 4, 5])
def test_shards_are_balanced_by_planned_trials(shards: int) -> None:
    kernels = _kernels(40, seed=7 + shards)
    assignment = assign_shards(kernels, shards)
    loads = [sum(k.trials for k in kernels if assignment[k.key] == s) for s in range(1, shards + 1)]
    # Longest-first greedy: no shard carries more than one kernel's worth over the lightest.
    assert max(loads) - min(loads) <= max(k.trials for k in kernels)
    assert max(loads) <= sum(loads) / shards + max(k.trials for k in kernels)


def test_the_assignment_is_the_same_whatever_order_the_kernels_come_in() -> None:
    kernels = _kernels(30, seed=1)
    expected = assign_shards(kernels, 3)
    for seed in range(5):
        shuffled = kernels[:]
        random.Random(seed).shuffle(shuffled)
        assert assign_shards(shuffled, 3) == expected


def test_a_kernel_two_models_share_is_assigned_once_at_its_larger_plan() -> None:
    shared_small, shared_large = ShardKernel("aa", 2, "aa"), ShardKernel("aa", 30, "aa")
    others = [ShardKernel("bb", 20, "bb"), ShardKernel("cc", 12, "cc")]
    assignment = assign_shards([shared_small, *others, shared_large], 2)
    assert assignment == {"aa": 1, "bb": 2, "cc": 2}  # 30 alone against 20 + 12
    with pytest.raises(ValueError, match="shards must be 1 or more"):
        assign_shards(others, 0)


def test_the_shard_matrix_has_one_job_per_target_and_shard_on_the_bench_runners(tmp_path: Path) -> None:
    from mlci.commands.matrix import build_shard_matrix
    from mlci.config import parse_config

    config = parse_config('[targets.cpu]\n[targets.gpu]\ntvm = { kind = "cuda" }\n[[models]]\npath = "m.onnx"\n',
                          tmp_path / "mlci.toml")
    assert build_shard_matrix(config, 2) == {"include": [
        {"target": "cpu", "runs-on": ["ubuntu-latest"], "shard": "1/2"},
        {"target": "cpu", "runs-on": ["ubuntu-latest"], "shard": "2/2"},
        {"target": "gpu", "runs-on": ["self-hosted", "linux", "gpu"], "shard": "1/2"},
        {"target": "gpu", "runs-on": ["self-hosted", "linux", "gpu"], "shard": "2/2"},
    ]}
    assert build_shard_matrix(config, 0) == {"include": []}
    assert [e["shard"] for e in build_shard_matrix(config, 3, only=["gpu"])["include"]] == ["1/3", "2/3", "3/3"]


def test_mlci_matrix_shards_writes_the_shard_matrix_step_output(tmp_path: Path) -> None:
    (tmp_path / "mlci.toml").write_text('[targets.cpu]\n[[models]]\npath = "m.onnx"\n')
    output = tmp_path / "out.txt"
    done = CliRunner().invoke(app, ["matrix", "--config", str(tmp_path / "mlci.toml"), "--shards", "2"],
                              env={"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(output)})
    assert done.exit_code == 0, done.output
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines() if "=" in line)
    assert json.loads(outputs["shard-matrix"]) == {"include": [
        {"target": "cpu", "runs-on": ["ubuntu-latest"], "shard": f"{k}/2"} for k in (1, 2)]}
    assert json.loads(outputs["matrix"])["include"][0]["target"] == "cpu"  # unchanged beside it


# --- the command's refusals -----------------------------------------------------------------


def _project(root: Path, cache: str = "") -> Path:
    """Two tiny models that share their first kernel (3 distinct kernels); 2 trials each, so the
    plan gives every kernel 1 trial; one core, so every shard tunes for the same fingerprint."""
    save(tiny_mlp((32, 64, 8)), root / "models" / "a.onnx")
    save(tiny_mlp((32, 64, 16)), root / "models" / "b.onnx")
    write_config(root, f"""
        [tuning]
        trials = 2
        trials_per_round = 2
        [measure]
        samples = 5
        min_sample_ms = 0.2
        [targets.cpu]
        tvm = {{ kind = "llvm", num-cores = 1 }}
        [[models]]
        name = "a"
        path = "models/a.onnx"
        dims = {{ batch = 1 }}
        [[models]]
        name = "b"
        path = "models/b.onnx"
        dims = {{ batch = 1 }}
        {cache}
    """)
    return root


@pytest.mark.parametrize("shard, message", [
    ("0/2", "K must be between 1 and N"),
    ("3/2", "K must be between 1 and N"),
    ("1/0", "K must be between 1 and N"),
    ("x/y", "expected K/N"),
    ("2", "expected K/N"),
])
def test_a_shard_that_names_no_shard_exits_2(shard: str, message: str, tmp_path: Path) -> None:
    _project(tmp_path)
    done = CliRunner().invoke(app, ["tune", "-c", str(tmp_path / "mlci.toml"), "--shard", shard])
    assert done.exit_code == 2
    assert message in done.output and repr(shard) in done.output
    assert not (tmp_path / ".mlci").exists()  # refused before any work


def test_several_shards_without_a_shared_cache_exit_2_saying_their_records_would_never_meet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLCI_CACHE_URL", raising=False)
    for name in ("GITHUB_ACTIONS", "GITHUB_EVENT_NAME", "GITHUB_EVENT_PATH"):
        monkeypatch.delenv(name, raising=False)
    _project(tmp_path / "none")
    done = CliRunner().invoke(app, ["tune", "-c", str(tmp_path / "none" / "mlci.toml"), "--shard", "1/2"])
    assert done.exit_code == 2
    assert "no shared tuning cache is configured" in done.output and "never meet" in done.output

    # A shared cache this run may only read is no better: nothing a shard searched would reach it.
    _project(tmp_path / "read-only", cache='[cache]\nurl = "s3://bucket/team"')
    done = CliRunner().invoke(app, ["tune", "-c", str(tmp_path / "read-only" / "mlci.toml"), "--shard", "2/2"])
    assert done.exit_code == 2
    assert "may not write the shared tuning cache" in done.output and "local_writes = false" in done.output


def test_a_shard_on_a_machine_without_the_targets_device_exits_2_rather_than_search_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tvm

    if tvm.device("cuda", 0).exist:
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setenv("MLCI_CACHE_URL", "s3://bucket/team")
    _project(tmp_path)
    config = (tmp_path / "mlci.toml").read_text()
    (tmp_path / "mlci.toml").write_text(config.replace('tvm = { kind = "llvm", num-cores = 1 }',
                                                       'tvm = { kind = "cuda", arch = "sm_80" }'))
    done = CliRunner().invoke(app, ["tune", "-c", str(tmp_path / "mlci.toml"), "--shard", "1/1"])
    assert done.exit_code == 2, done.output
    assert "needs a cuda device to time tuning candidates on" in " ".join(done.output.split())


# --- two shards, one bucket, then the run --------------------------------------------------


def _mlci(cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlci.cli", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_shards_search_every_kernel_once_and_the_run_then_searches_nothing(tmp_path: Path) -> None:
    from mlci.config import load_config
    from mlci.pipeline import Pipeline
    from mlci.targets import select_target
    from mlci.tuning import TuningCache

    cache = '[cache]\nurl = "s3://shared/team"\nlocal_writes = true'
    runners = {name: _project(tmp_path / name, cache) for name in ("shard1", "shard2", "run")}
    with moto_server() as s3:
        s3.s3().create_bucket(Bucket="shared")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLCI_", "AWS_"))}
        env.update(s3.env, MLCI_PROGRESS_INTERVAL="600")
        jobs = {k: _mlci(runners[f"shard{k}"], env, "tune", "--shard", f"{k}/2") for k in (1, 2)}
        for job in jobs.values():  # two processes at once, one bucket
            output = job.communicate(timeout=300)[0]
            assert job.returncode == 0, output
        entries = s3.s3().list_objects_v2(Bucket="shared").get("Contents", [])
        run = _mlci(runners["run"], env, "run", "--no-tracking")
        run_output = run.communicate(timeout=300)[0]
        assert run.returncode == 0, run_output

    reports = [json.loads((runners[f"shard{k}"] / ".mlci" / "results" / f"tune-cpu-shard{k}-of-2.json").read_text())
               for k in (1, 2)]
    owned = [k["key"] for report in reports for k in report["kernels"]]
    assert len(owned) == len(set(owned)) == reports[0]["kernels_in_run"] == 3  # each kernel in one shard
    assert all(k["searched"] == k["planned"] == 1 for report in reports for k in report["kernels"])
    # ... and searched nothing else (a shard searching the whole plan would search 3 trials).
    assert [sum(m["trials_searched"] for m in r["models"]) for r in reports] == [len(r["kernels"]) for r in reports]
    assert sum(r["pushed"] for r in reports) == len(entries) == 3  # one entry per kernel, from its shard
    assert all(len(r["kernels"]) >= 1 for r in reports)

    results = json.loads((runners["run"] / ".mlci" / "results" / "cpu.json").read_text())
    assert [m["status"] for m in results["models"]] == ["ok", "ok"]
    assert [m["tuning"]["trials_new"] for m in results["models"]] == [0, 0]
    assert sum(m["tuning"]["kernels_from_remote"] for m in results["models"]) == 3

    # The run built from each kernel's record as its shard left it (the cache it built from).
    [run_cache] = (runners["run"] / ".mlci" / "cache").iterdir()
    shard_caches = {k: TuningCache(runners[f"shard{k}"] / ".mlci" / "cache" / run_cache.name) for k in (1, 2)}
    owner = {k["key"]: report["index"] for report in reports for k in report["kernels"]}
    merged = TuningCache(run_cache)
    config = load_config(runners["run"] / "mlci.toml")
    pipeline = Pipeline(select_target(config, None), merged, log_dir=tmp_path / "logs")
    for model in config.models:
        for kernel in pipeline.load_and_import(model).kernels:
            assert merged.best_record_json(kernel) == shard_caches[owner[kernel.key]].best_record_json(kernel)
            assert merged.ledger()[kernel.key] == 1


@pytest.mark.slow
def test_a_shard_killed_while_tuning_its_second_model_has_left_the_first_models_kernels_on_s3(tmp_path: Path) -> None:
    """The second model is given a budget that keeps the shard busy for minutes; it is killed (SIGKILL: no
    chance to push anything more) once S3 holds entries, which must already name the first model's kernels."""
    from mlci.config import load_config
    from mlci.pipeline import Pipeline
    from mlci.targets import select_target
    from mlci.tuning import TuningCache

    root = _project(tmp_path / "shard", '[cache]\nurl = "s3://shared/team"\nlocal_writes = true')
    config_text = (root / "mlci.toml").read_text()
    (root / "mlci.toml").write_text(config_text.replace('name = "b"', 'name = "b"\ntrials = 5000\nseconds = 600'))
    with moto_server() as s3:
        s3.s3().create_bucket(Bucket="shared")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLCI_", "AWS_"))}
        env.update(s3.env, MLCI_PROGRESS_INTERVAL="600")
        job = _mlci(root, env, "tune", "--shard", "1/1")
        try:
            deadline = time.monotonic() + 240
            entries: list = []
            while not entries and time.monotonic() < deadline and job.poll() is None:
                time.sleep(0.5)
                entries = s3.s3().list_objects_v2(Bucket="shared").get("Contents", [])
            still_tuning = job.poll() is None
        finally:
            job.kill()
            output = job.communicate(timeout=30)[0]
        assert entries and still_tuning, output  # on S3 while the shard was still busy with model b
        keys = [entry["Key"] for entry in entries]
    config = load_config(root / "mlci.toml")
    pipeline = Pipeline(select_target(config, None), TuningCache(tmp_path / "unused"), log_dir=tmp_path / "logs")
    from mlci.remote_cache import workload_line, workload_sha

    first = {workload_sha(workload_line(kernel)[1]) for kernel in pipeline.load_and_import(config.models[0]).kernels}
    assert {key.split("/")[-2] for key in keys} == first  # every kernel of model a, one entry each


def test_a_model_name_the_config_lacks_is_refused_by_run_and_tune_alike(tmp_path: Path) -> None:
    from mlci.commands.run import select_models
    from mlci.config import ConfigError, load_config

    config = load_config(_project(tmp_path) / "mlci.toml")
    assert [m.name for m in select_models(config, [])] == ["a", "b"]
    assert [m.name for m in select_models(config, ["b"])] == ["b"]
    with pytest.raises(ConfigError, match="--model c: no such model in models"):
        select_models(config, ["b", "c"])
    done = CliRunner().invoke(app, ["tune", "-c", str(tmp_path / "mlci.toml"), "--shard", "1/1", "--model", "c"])
    assert done.exit_code == 2 and "--model c: no such model" in " ".join(done.output.split())


def test_tuning_whose_candidates_all_failed_is_a_tune_failure_naming_the_logs(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mlci.pipeline import Pipeline
    from mlci.results import Status
    from mlci.tuning import TuningOutcome

    here = SimpleNamespace(log_dir=tmp_path / "logs", root=tmp_path)
    broken = Pipeline.no_candidate_ran(here, TuningOutcome(4, 60.0, trials_new=4, trials_valid_new=0))  # type: ignore[arg-type]
    assert broken is not None and broken.status == Status.TUNE_FAILED
    assert str(broken).endswith("0 of 4 tuning candidates built and ran; see logs")
    assert Pipeline.no_candidate_ran(here, TuningOutcome(4, 60.0, trials_new=4, trials_valid_new=1)) is None  # type: ignore[arg-type]
    assert Pipeline.no_candidate_ran(here, TuningOutcome(4, 60.0, trials_new=0)) is None  # type: ignore[arg-type]
