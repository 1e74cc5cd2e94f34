"""The tuning cache with real MetaSchedule tuning: miss, hit, partial hit, growing budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlci.config import ModelConfig
from mlci.pipeline import ModelSettings, Pipeline
from mlci.targets import ResolvedTarget, detect_host_target
from mlci.tuning import TuningCache, TuningOutcome

from .conftest import save, tiny_mlp

pytestmark = pytest.mark.slow


def _pipeline(cache_dir: Path, log_dir: Path) -> Pipeline:
    # A fresh TuningCache object each time: what a new `mlci run` process sees.
    return Pipeline(ResolvedTarget("cpu", detect_host_target()), TuningCache(cache_dir), log_dir=log_dir)


def _imported(tmp_path: Path, widths, name: str):
    path = save(tiny_mlp(widths), tmp_path / f"{name}.onnx")
    pipeline = _pipeline(tmp_path / "scratch-cache", tmp_path / "logs")
    return pipeline.load_and_import(ModelConfig(name=name, path=path, dims={"batch": 1}, key="models[0]"))


def _tune(imported, cache_dir: Path, trials: int, log_dir: Path, seconds: float = 300) -> TuningOutcome:
    settings = ModelSettings(trials=trials, seconds=seconds, trials_per_round=4)
    return _pipeline(cache_dir, log_dir).tune(imported, settings)


def test_cache_miss_hit_partial_hit_and_growing_budget(tmp_path: Path) -> None:
    cache_dir, logs = tmp_path / "cache", tmp_path / "logs"
    model_a = _imported(tmp_path, (32, 64, 8), "a")
    kernels_a = model_a.kernels
    assert len(kernels_a) == 2

    miss = _tune(model_a, cache_dir, 8, logs)
    assert miss.trials_new > 0 and miss.trials_valid_new > 0
    assert miss.trials_cached == 0 and miss.tasks_from_cache == 0

    hit = _tune(model_a, cache_dir, 8, logs)
    assert hit.trials_new == 0  # an unchanged model searches nothing
    assert hit.tasks_from_cache == 2
    assert hit.trials_cached == 8

    # Change the last layer only: the first layer's kernel is found again by its structure.
    model_b = _imported(tmp_path, (32, 64, 16), "b")
    kernels_b = model_b.kernels
    shared = {k.key for k in kernels_a} & {k.key for k in kernels_b}
    assert len(shared) == 1
    partial = _tune(model_b, cache_dir, 8, logs)
    assert partial.tasks_from_cache == 1
    changed = [p for k, p in zip(kernels_b, partial.planned) if k.key not in shared]
    assert 0 < partial.trials_new <= sum(changed)

    # A larger budget continues from what is cached instead of starting over.
    grown = _tune(model_a, cache_dir, 16, logs)
    assert grown.trials_cached == 8
    assert 0 < grown.trials_new <= 8

    # Schedules found are applied at build time.
    cache = TuningCache(cache_dir)
    assert all(cache.valid_records(k) for k in kernels_a)


def test_the_tuning_runner_runs_candidates_on_the_targets_threads() -> None:
    """Schedules are ranked by timing them in the runner's worker: on as many threads as the build gets."""
    from mlci import tuning

    for threads in (1, 2):
        assert tuning.shared_runner(threads).pool.submit(tuning.worker_threads).result() == threads


def test_time_cap_stops_tuning_and_the_next_run_continues(tmp_path: Path) -> None:
    cache_dir, logs = tmp_path / "cache", tmp_path / "logs"
    model = _imported(tmp_path, (16, 48, 4), "capped")
    capped = _tune(model, cache_dir, 64, logs, seconds=4.0)
    assert capped.deadline_hit
    assert 0 < capped.trials_new < 64  # at least one chunk ran, far from the budget
    resumed = _tune(model, cache_dir, 64, logs, seconds=4.0)
    assert resumed.trials_cached == capped.trials_new  # only what was searched is credited
    assert resumed.trials_new > 0
