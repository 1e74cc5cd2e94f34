"""Pure logic: budget spreading, summaries, numerics comparison, the results schema."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlci.budget import KernelState, allocate_trials, progressive_trials, trials_to_search
from mlci.measure import compare_outputs
from mlci.results import (
    SCHEMA,
    CompileInfo,
    Fingerprint,
    GitInfo,
    Latency,
    ModelResult,
    NumericsInfo,
    PeerInfo,
    Results,
    ResultsError,
    TargetInfo,
    TuningInfo,
    read_results,
    write_results,
)
from mlci.stats import faster_backend, speedup, summarize


def test_every_kernel_is_searched_and_cost_gets_the_rest() -> None:
    costs = [1.0] * 28 + [500.0, 100.0]
    alloc = allocate_trials(costs, total=192, per_round=16)
    assert sum(alloc) == 192
    assert min(alloc) >= 1  # every kernel leaves naive loops behind
    assert alloc[28] > alloc[29] > alloc[0]  # the costliest kernels get the most


def test_budget_smaller_than_kernel_count_goes_to_costliest() -> None:
    alloc = allocate_trials([1.0, 9.0, 5.0], total=2, per_round=16)
    assert alloc == [0, 1, 1]


def test_progressive_tuning_spends_a_fixed_budget_where_the_time_is() -> None:
    kernels = [
        KernelState(cost=1e6, trials=64, seconds=0.001),  # tuned a lot, cheap now
        KernelState(cost=5e6, trials=16, seconds=0.004),  # slow and barely searched
        KernelState(cost=2e6, trials=0),  # never measured: priced as if naive
    ]
    alloc = progressive_trials(kernels, total=64, per_round=16)
    assert sum(alloc) == 64 and all(a % 16 == 0 for a in alloc)
    assert alloc[1] > alloc[0] and alloc[2] > 0
    assert alloc == progressive_trials(kernels, total=64, per_round=16)


def test_progressive_tuning_moves_on_as_a_kernel_collects_trials() -> None:
    """Diminishing returns: after enough rounds, a kernel with less at stake gets its turn."""
    kernels = [KernelState(cost=1.0, trials=0, seconds=0.010), KernelState(cost=1.0, trials=0, seconds=0.002)]
    assert progressive_trials(kernels, total=16, per_round=16) == [16, 0]
    assert progressive_trials(kernels, total=160, per_round=16)[1] > 0
    assert progressive_trials([], 64, 16) == [] and progressive_trials(kernels, 0, 16) == [0, 0]


def test_allocation_is_deterministic_and_handles_edges() -> None:
    assert allocate_trials([], 10, 4) == []
    assert allocate_trials([3.0, 3.0], 0, 4) == [0, 0]
    assert allocate_trials([0.0, 0.0], 8, 4) == [4, 4]  # kernels with no cost estimate share evenly
    assert allocate_trials([2.0, 1.0, 1.0], 7, 16) == [3, 2, 2]  # the costliest gets the odd trial
    assert allocate_trials([1.0, 1.0, 1.0], 2, 4) == [1, 1, 0]  # fewer trials than kernels: ties to the earlier
    assert allocate_trials([1.0, 3.0], 1, 4) == [0, 1]  # ... after the costlier
    # the same in another process with another hash seed (shards in separate jobs must agree)
    code = "from mlci.budget import allocate_trials as a; print(a([2.0, 1.0, 1.0], 7, 16), a([0.5] * 5, 3, 4))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert runs == {"[3, 2, 2] [1, 1, 1, 0, 0]\n"}


def test_larger_budget_only_owes_the_difference() -> None:
    small = allocate_trials([5.0, 1.0], 16, 8)
    big = allocate_trials([5.0, 1.0], 64, 8)
    owed = trials_to_search(big, small)
    assert sum(owed) == 64 - 16
    assert trials_to_search(small, small) == [0, 0]


def test_summary_statistics() -> None:
    s = summarize([4.0, 1.0, 3.0, 2.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert s.median == 5.5
    assert s.min == 1.0
    assert s.mean == 5.5
    assert s.p90 == pytest.approx(9.1)
    assert s.std == pytest.approx(np.std(np.arange(1, 11), ddof=1))
    assert s.n == 10
    assert summarize([]).n == 0
    assert speedup(2.0, 1.0) == 2.0
    assert speedup(None, 1.0) is None


def test_numerics_mismatch_names_output_index_and_values() -> None:
    expected = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
    got = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
    got[1][2] = 1.5
    report = compare_outputs(got, expected, ["logits", "probs"], atol=1e-4, rtol=1e-3)
    assert not report.passed
    assert "output 'probs' at index (2,)" in report.message
    assert report.max_abs_err == pytest.approx(0.5)
    ok = compare_outputs(expected, expected, ["logits", "probs"], atol=0, rtol=0)
    assert ok.passed and ok.max_abs_err == 0


def test_numerics_nan_and_shape_mismatch() -> None:
    nan = np.array([np.nan, 1.0], np.float32)
    assert compare_outputs([nan], [nan.copy()], ["y"], 1e-4, 1e-3).passed
    assert not compare_outputs([np.array([np.nan, 1.0])], [np.array([0.0, 1.0])], ["y"], 1e-4, 1e-3).passed
    report = compare_outputs([np.zeros((2, 2))], [np.zeros(4)], ["y"], 1e-4, 1e-3)
    assert not report.passed and "shape" in report.message


def _results() -> Results:
    return Results(
        git=GitInfo(commit="abc", branch="main", pr=7, repository="o/r", run_id="1"),
        target=TargetInfo(name="cpu", tvm_target={"kind": "llvm", "num-cores": 2}, fingerprint=Fingerprint(hash="f", cpu="x")),
        models=[
            ModelResult(
                name="mlp", path="m.onnx", sha256="00", status="ok",
                compile=CompileInfo(seconds=1.5),
                tuning=TuningInfo(trials_new=3, trials_cached=5, tasks=2, tasks_from_cache=1, seconds=4.0),
                numerics=NumericsInfo(max_abs_err=1e-6, max_rel_err=1e-5, atol=1e-4, rtol=1e-3, passed=True),
                latency_ms=Latency(samples=[1.0, 2.0], median=1.5, mean=1.5, std=0.7, min=1.0, p90=1.9, n=2),
                peer=PeerInfo(onnxruntime_median_ms=2.0, speedup=1.33),
            ),
            ModelResult(name="lstm", path="l.onnx", status="import_failed", error="unsupported: LSTM",
                        numerics=NumericsInfo(max_abs_err=math.inf, max_rel_err=math.inf, atol=0, rtol=0, passed=False)),
        ],
    )


def test_results_round_trip(tmp_path: Path) -> None:
    original = _results()
    path = write_results(original, tmp_path / "out" / "cpu.json")
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA
    assert data["models"][1]["numerics"]["max_abs_err"] is None  # JSON has no infinity
    back = read_results(path)
    assert back.models[0] == original.models[0]
    assert back.git == original.git
    assert back.target == original.target
    assert back.models[1].status == "import_failed"
    assert back.to_dict() == data


def test_results_refuse_unknown_schema_and_status(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**_results().to_dict(), "schema": "mlci.results/99", "schema_version": None}))
    with pytest.raises(ResultsError, match="unsupported results schema"):
        read_results(path)
    bad = _results().to_dict()
    bad["models"][0]["status"] = "great"
    path.write_text(json.dumps(bad))
    with pytest.raises(ResultsError, match="unknown status"):
        read_results(path)


def test_the_faster_backend_and_by_how_much() -> None:
    assert faster_backend(3.1) == ("tvm", 3.1)
    assert faster_backend(0.25) == ("onnxruntime", 4.0)
    assert faster_backend(1.0) == ("tvm", 1.0)
    assert faster_backend(None) is None and faster_backend(math.nan) is None and faster_backend(0.0) is None

