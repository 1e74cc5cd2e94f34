"""The matrix decision (`mlci.gate.decide`): verdict per model x target, fail-on policy,
matrix-wide false-alarm control; unit and property-based. No TVM, no I/O."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mlci.gate import decide
from mlci.results import (
    Baseline,
    Fingerprint,
    GateSettings,
    GitInfo,
    History,
    Latency,
    ModelResult,
    Results,
    TargetInfo,
    TrendPoint,
)
from mlci.stats import summarize


def lat(samples: list[float]) -> Latency:
    return Latency(samples=list(samples), **summarize(list(samples)).as_dict())


def noisy(centre: float, n: int = 40, noise: float = 0.004, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(centre * (1 + noise * rng.standard_normal(n)))


def ab_model(name: str, base_ms: float, head_ms: float, *, seed: int = 0, **kw) -> ModelResult:
    return ModelResult(
        name=name, path=f"{name}.onnx", latency_ms=lat(noisy(head_ms, seed=seed)),
        base=Baseline(commit="b" * 40, status="ok", latency_ms=lat(noisy(base_ms, seed=seed + 1000)), rounds=1), **kw,
    )


def results(*models: ModelResult, target: str = "cpu", removed: list[str] | None = None, gate=None) -> Results:
    return Results(
        git=GitInfo(commit="h" * 40, base_commit="b" * 40, branch="feature"),
        target=TargetInfo(name=target, tvm_target={"kind": "llvm"}, fingerprint=Fingerprint(hash="f1", tvm="0.27")),
        models=list(models), removed_models=removed or [], gate=gate,
    )


def verdicts(decision) -> dict[tuple[str, str], str]:
    return {(c.model, c.target): c.verdict for c in decision.cells}


def test_every_verdict_and_who_fails_the_build():
    cpu = results(
        ab_model("slower", 1.0, 1.2),
        ab_model("faster", 1.0, 0.8),
        ab_model("same", 1.0, 1.0),
        ModelResult(name="broken", path="b.onnx", status="compile_failed", error="TVM: no rule for op",
                    base=Baseline(commit="b" * 40, status="ok")),
        ModelResult(name="wrong", path="w.onnx", status="numerics_failed", error="numerics mismatch: output 'y'"),
        ModelResult(name="fresh", path="f.onnx", latency_ms=lat(noisy(1.0)), base=Baseline(commit="b" * 40, status="missing")),
        removed=["gone"],
    )
    d = decide([cpu])
    assert verdicts(d) == {
        ("slower", "cpu"): "regression", ("faster", "cpu"): "improvement", ("same", "cpu"): "unchanged",
        ("broken", "cpu"): "failed", ("wrong", "cpu"): "failed", ("fresh", "cpu"): "new", ("gone", "cpu"): "removed",
    }
    assert [c.model for c in d.cells][:3] == ["broken", "wrong", "slower"]  # worst first
    assert {c.model for c in d.blocking} == {"broken", "wrong", "slower"}
    assert d.failed and d.verdict == "failed"
    assert d.headline == "2 failures on cpu; 1 regression on cpu; 1 improvement on cpu"
    slower = next(c for c in d.cells if c.model == "slower")
    assert slower.baseline == "ab" and 0.19 < slower.change < 0.21
    assert slower.estimate.low > 1.0 and "same-runner A/B" in slower.reason

    assert decide([cpu], fail_on="failure").verdict == "failed"
    assert {c.model for c in decide([cpu], fail_on="failure").blocking} == {"broken", "wrong"}
    never = decide([cpu], fail_on="never")
    assert not never.failed and never.verdict == "pass" and not never.blocking


def test_regression_alone_fails_only_under_fail_on_regression():
    res = results(ab_model("slower", 1.0, 1.2), gate=GateSettings(fail_on="failure"))
    assert not decide([res]).failed  # the config recorded by `mlci run` says failures only
    assert decide([res], fail_on="regression").verdict == "regression"


def test_a_target_that_was_already_broken_is_shown_but_does_not_block():
    res = results(ModelResult(name="m", path="m.onnx", status="compile_failed", error="no cuda",
                              base=Baseline(commit="b" * 40, status="compile_failed", error="no cuda")))
    cell = decide([res]).cells[0]
    assert cell.verdict == "failed" and cell.known_failure and not cell.blocking
    assert not decide([res]).failed


def test_threshold_per_model_and_override():
    res = results(ab_model("m", 1.0, 1.03), ab_model("strict", 1.0, 1.03, threshold=0.01))
    assert verdicts(decide([res])) == {("m", "cpu"): "unchanged", ("strict", "cpu"): "regression"}
    assert verdicts(decide([res], threshold=0.01))[("m", "cpu")] == "regression"


def test_many_cells_widen_each_interval():
    one = decide([results(ab_model("m", 1.0, 1.0))])
    many = decide([results(*(ab_model(f"m{i}", 1.0, 1.0, seed=i) for i in range(10)), target=t) for t in ("a", "b")])
    assert one.cell_confidence == 0.95
    assert abs(many.cell_confidence - (1 - 0.05 / 20)) < 1e-12
    width = {c.model: c.estimate.high - c.estimate.low for c in many.cells if c.target == "a"}
    assert width["m0"] > one.cells[0].estimate.high - one.cells[0].estimate.low


def _history(match: bool, samples: list[float]) -> History:
    return History(commit="c" * 40, branch="main", run_id="r1", fingerprint="f1" if match else "f0",
                   fingerprint_match=match, fingerprint_diff={} if match else {"tvm": ["0.26", "0.27"]},
                   latency_ms=lat(samples), trend=[TrendPoint(commit="c" * 40, median=1.0)])


def test_history_decides_without_ab_only_when_the_environment_matches():
    head = noisy(1.3)
    same_env = ModelResult(name="m", path="m.onnx", latency_ms=lat(head), history=_history(True, noisy(1.0, seed=7)))
    cell = decide([results(same_env)]).cells[0]
    assert cell.verdict == "regression" and cell.baseline == "history"

    other_env = ModelResult(name="m", path="m.onnx", latency_ms=lat(head), history=_history(False, noisy(1.0, seed=7)))
    cell = decide([results(other_env)]).cells[0]
    assert cell.verdict == "new" and "tvm 0.26 -> 0.27" in cell.reason
    assert cell.history is not None and not cell.history.comparable and cell.history.ratio is None


def test_ab_wins_over_history_and_history_is_kept_as_a_note():
    model = ab_model("m", 1.0, 1.0)
    model.history = _history(False, noisy(0.5))
    cell = decide([results(model)]).cells[0]
    assert cell.verdict == "unchanged" and cell.baseline == "ab" and cell.history.fingerprint_diff == {"tvm": ["0.26", "0.27"]}


def test_unreadable_input_fails_the_gate_and_says_so():
    d = decide([results(ab_model("m", 1.0, 1.0))], problems=["x.json: unsupported results schema 'v9'"])
    assert d.failed and d.verdict == "failed" and "1 missing or unreadable results file" in d.headline
    assert not decide([results(ab_model("m", 1.0, 1.0))], problems=["x"], fail_on="never").failed


def test_nothing_to_compare():
    d = decide([results(ModelResult(name="m", path="m.onnx", latency_ms=lat(noisy(1.0))))])
    assert d.cells[0].verdict == "new" and not d.failed and d.headline == "Nothing compared"


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=0.05, max_value=50.0), min_size=5, max_size=25),
    st.floats(min_value=0.5, max_value=2.0),
)
def test_swapping_base_and_head_mirrors_the_matrix(samples: list[float], factor: float):
    head = [s * factor for s in samples]

    def model(b: list[float], h: list[float]) -> ModelResult:
        return ModelResult(name="m", path="m.onnx", latency_ms=lat(h), base=Baseline(commit="b", latency_ms=lat(b)))

    forward = decide([results(model(samples, head))]).cells[0].verdict
    backward = decide([results(model(head, samples))]).cells[0].verdict
    mirror = {"regression": "improvement", "improvement": "regression"}
    assert backward == mirror.get(forward, forward)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(min_value=0.05, max_value=50.0), min_size=3, max_size=25), st.integers(1, 30))
def test_identical_pairs_never_fail_the_build(samples: list[float], cells: int):
    res = results(*(
        ModelResult(name=f"m{i}", path="m.onnx", latency_ms=lat(samples), base=Baseline(commit="b", latency_ms=lat(samples)))
        for i in range(cells)
    ))
    d = decide([res])
    assert not d.failed and {c.verdict for c in d.cells} <= {"unchanged", "inconclusive"}
