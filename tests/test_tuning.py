"""The tuning cache with real MetaSchedule tuning: miss, hit, partial hit, growing budget."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mlci import compile as tvm_compile
from mlci.compile import fuse_for_tuning
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

    # Schedules found are applied at build time, with the weights pre-packed: every record matches.
    cache = TuningCache(cache_dir)
    assert all(cache.valid_records(k) for k in kernels_a)
    pipeline = _pipeline(cache_dir, logs)
    fused = fuse_for_tuning(model_a.mod, pipeline.tvm_target)
    assert all("layout_free_buffers" in f.attrs for _, f in fused.functions_items() if hasattr(f, "buffer_map"))
    # Every record matches its kernel (with no defaults to prefer, each kernel runs its record) ...
    _, matched = tvm_compile.build(model_a.mod, pipeline.tvm_target, cache.database)
    assert len(matched.tuned) == len(matched.kernels) == len(kernels_a)
    assert not matched.fallbacks and not matched.naive
    # ... and the real build runs each kernel's record or, where that timed slower, its default schedule.
    _, report, _ = pipeline.build(model_a)
    assert sorted(report.tuned + report.kept_default) == sorted(report.kernels)
    assert not report.fallbacks and not report.naive

    # What the search learned is kept for the next run, and each kernel's default schedule was timed.
    assert cache.load_cost_model(cores=2, warmup=4).data_size >= miss.trials_valid_new
    assert set(cache.default_seconds()) >= {k.key for k in kernels_a}


def test_a_corrupt_saved_cost_model_starts_fresh_with_a_warning(tmp_path: Path, caplog) -> None:
    cache = TuningCache(tmp_path / "cache")
    cache.cost_model_path.write_bytes(b"not a tarball")
    with caplog.at_level(logging.WARNING, logger="mlci"):
        model = cache.load_cost_model(cores=2, warmup=16)
    assert model.data_size == 0 and model.booster is None
    assert "cost model could not be read" in caplog.text and "starting a fresh one" in caplog.text


def _commit_naive_records(pipeline: Pipeline, imported) -> None:
    """A 'tuned' record for every kernel that is the bare loop nest, claiming to be very fast."""
    from tvm import s_tir
    from tvm.s_tir import meta_schedule as ms
    from tvm.tirx import FloatImm

    db = pipeline.cache.database
    for kernel in imported.kernels:
        workload = kernel.task.dispatched[0]
        naive = s_tir.Schedule(workload)
        root = naive.get_sblock("root")
        # An empty trace is not a valid record: one annotation MetaSchedule itself writes.
        naive.annotate(naive.get_child_blocks(root)[0], "meta_schedule.unroll_explicit", 0)
        db.commit_tuning_record(ms.database.TuningRecord(
            naive.trace, db.commit_workload(workload), run_secs=[FloatImm("float64", 1e-9)],
            target=pipeline.tvm_target, args_info=ms.arg_info.ArgInfo.from_prim_func(workload["main"])))


def test_never_worse_than_the_default_schedules(tmp_path: Path) -> None:
    """A kernel whose default schedule timed faster keeps it; a tuned build that runs slower than
    the build with default schedules only is replaced by it, and the results say so."""
    model = _imported(tmp_path, (256, 512, 256), "wide")
    pipeline = _pipeline(tmp_path / "cache", tmp_path / "logs")
    _commit_naive_records(pipeline, model)
    settings = ModelSettings(trials=0, trials_per_round=4)

    # Kernel by kernel: the default schedule measured faster than the record, so the build keeps it.
    pipeline.cache.save_default_seconds({k.key: 1e-12 for k in model.kernels})
    compiled = pipeline.tune_and_build(model, settings)
    assert sorted(compiled.build_report.kept_default) == sorted(compiled.build_report.kernels)
    assert compiled.compile_info().kernels_tuned == 0 and compiled.compile_info().kernels_kept_default == 2

    # Whole build: with no default timings the naive records are used; the default build wins.
    (pipeline.cache.dir / "default_schedules.json").unlink()
    compiled = pipeline.tune_and_build(model, settings)
    choice = compiled.build_choice
    assert choice is not None and choice.default_ms < choice.tuned_ms
    info = compiled.compile_info()
    assert info.build == "default" and info.kernels_tuned == 0 and info.default_build_ms < info.tuned_build_ms


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


def test_kernels_with_no_tuned_record_run_a_default_schedule_not_plain_loops(tmp_path: Path) -> None:
    """With trials = 0 every kernel gets the rule-based CPU schedule: same numbers as ONNX Runtime,
    several times faster than the bare loop nests TVM would otherwise build."""
    import sys

    from mlci import measure

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import make_models
    finally:
        sys.path.pop(0)
    path = save(make_models.cnn(), tmp_path / "cnn.onnx")
    pipeline = _pipeline(tmp_path / "cache", tmp_path / "logs")
    imported = pipeline.load_and_import(ModelConfig(name="cnn", path=path, dims={"batch": 1}, key="models[0]"))
    settings = ModelSettings(trials=0)
    compiled = pipeline.tune_and_build(imported, settings)
    report = compiled.build_report
    assert sorted(report.default) == sorted(report.kernels) and not report.naive
    checked = pipeline.check(compiled, settings)
    assert checked.numerics.passed, checked.numerics.message

    plain, plain_report = tvm_compile.build(imported.mod, pipeline.tvm_target, tvm_compile.empty_database())
    assert sorted(plain_report.naive) == sorted(report.kernels)
    plain_model = measure.TvmModel(plain, pipeline.device)
    timing = dict(warmup=2, samples=5, min_sample_ms=5.0, max_seconds=5.0)
    default_ms = min(measure.time_callable(checked.tvm_timer(), **timing))
    plain_ms = min(measure.time_callable(plain_model.timer(checked.inputs, checked.input_names), **timing))
    assert default_ms * 3 < plain_ms


@pytest.mark.slow
def test_cpu_tuning_skips_gpu_tensor_intrinsics_and_a_gpu_target_gets_them_back() -> None:
    """A CPU run does not parse CUDA's tensor intrinsics (7 s of every cold run); a GPU target
    in the same process still finds them."""
    import subprocess
    import sys

    script = """
import sys, tvm
from mlci import tuning
from mlci.targets import detect_host_target, tvm_target_object, ResolvedTarget
tuning.load_tensor_intrinsics_for(tvm_target_object(ResolvedTarget("cpu", detect_host_target())))
import tvm.s_tir.tensor_intrin
from tvm.s_tir import TensorIntrin
print("cpu", getattr(sys.modules["tvm.s_tir.tensor_intrin.cuda"], "mlci_stand_in", False))
tuning.load_tensor_intrinsics_for(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}))
TensorIntrin.get("wmma_sync_16x16x16_f16f16f32")  # raises when CUDA's intrinsics are missing
print("cuda", getattr(sys.modules["tvm.s_tir.tensor_intrin.cuda"], "mlci_stand_in", False))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cpu", "True", "cuda", "False"]
