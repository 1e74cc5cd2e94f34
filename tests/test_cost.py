"""What a million inferences cost, and which kernels grew: the arithmetic, the formatting, the gate's
cells, the MLflow metrics and the terminal tables. No TVM, no I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
from rich.console import Console

from mlci.console import results_table, terminal_table
from mlci.formatting import format_cost, format_cost_change, format_us, format_us_change, format_usd
from mlci.gate import KernelChange, decide, kernel_growth
from mlci.results import (
    Baseline,
    CostInfo,
    Fingerprint,
    GitInfo,
    KernelProfile,
    KernelTime,
    Latency,
    ModelResult,
    PeerInfo,
    Results,
    TargetInfo,
)
from mlci.stats import cost_per_million, summarize
from mlci.tracking import model_metrics


def lat(samples: list[float]) -> Latency:
    return Latency(samples=list(samples), **summarize(list(samples)).as_dict())


def noisy(centre: float, n: int = 40, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(centre * (1 + 0.004 * rng.standard_normal(n)))


def ab_model(name: str, base_ms: float, head_ms: float, ort_ms: float = 3.0, **kw) -> ModelResult:
    return ModelResult(
        name=name, path=f"{name}.onnx", latency_ms=lat(noisy(head_ms)), peer=PeerInfo(onnxruntime_median_ms=ort_ms),
        base=Baseline(commit="b" * 40, latency_ms=lat(noisy(base_ms, seed=1)), rounds=1, **kw.pop("base", {})), **kw,
    )


def results(*models: ModelResult, target: str = "cpu", price: float | None = None) -> Results:
    return Results(
        git=GitInfo(commit="h" * 40, base_commit="b" * 40),
        target=TargetInfo(name=target, tvm_target={"kind": "llvm"}, fingerprint=Fingerprint(hash="f"),
                          price_per_hour=price),
        models=list(models),
    )


# --- arithmetic -------------------------------------------------------------------------


def test_a_million_inferences_cost_the_price_times_the_median_in_hours() -> None:
    # 10 ms each on a $0.36/h runner: 1e6 x 0.01 s = 10,000 s = 2.78 h -> $1.00
    assert cost_per_million(0.36, 10.0) == pytest.approx(1.0)
    assert cost_per_million(1.006, 2.0) == pytest.approx(1.006 * 2e-3 * 1e6 / 3600)
    assert cost_per_million(0.089, 0.0) == 0.0


@pytest.mark.parametrize("price, median", [(None, 1.0), (0.36, None), (0.0, 1.0), (-1.0, 1.0), (math.nan, 1.0),
                                           (0.36, math.inf), (0.36, -1.0)])
def test_no_cost_without_a_price_and_a_plausible_median(price, median) -> None:
    assert cost_per_million(price, median) is None


def test_money_reads_in_cents_above_a_dollar_and_two_significant_digits_below() -> None:
    assert [format_usd(v) for v in (1234.5, 12.345, 1.0, 0.996, 0.42, 0.1, 0.0999, 0.0051234, 0.000012, 0.0, None)] == [
        "$1,234.50", "$12.35", "$1.00", "$1.00", "$0.42", "$0.10", "$0.10", "$0.0051", "$0.000012", "$0", "—"]
    assert format_cost_change(0.42) == "+$0.42 per million inferences"
    assert format_cost_change(-0.0031) == "-$0.0031 per million inferences"
    assert format_cost_change(None) == ""
    assert format_cost(0.31, 0.95) == "$0.31 (ORT $0.95)"
    assert format_cost(0.31) == "$0.31" and format_cost(None) == "—"
    assert format_us(812.3) == "812 µs" and format_us(1200.0) == "1.20 ms"
    assert format_us_change(73.14) == "+73.1 µs" and format_us_change(-1200.0) == "-1.20 ms"


# --- the gate's cells -------------------------------------------------------------------------


def test_a_regressed_cell_carries_the_cost_change_at_its_targets_price() -> None:
    decision = decide([results(ab_model("net", 1.0, 1.5, ort_ms=3.0), price=0.36)])
    [cell] = decision.cells
    assert cell.verdict == "regression" and cell.price_per_hour == 0.36
    assert cell.head_cost == pytest.approx(cost_per_million(0.36, cell.head_ms))
    assert cell.base_cost == pytest.approx(cost_per_million(0.36, cell.base_ms))
    assert cell.ort_cost == pytest.approx(0.3)  # 3 ms at $0.36/h
    assert cell.cost_change == pytest.approx(0.36 * (cell.head_ms - cell.base_ms) / 3.6)
    assert 0.049 < cell.cost_change < 0.051  # +0.5 ms per inference: +$0.05 per million


def test_a_target_without_a_price_has_no_costs() -> None:
    [cell] = decide([results(ab_model("net", 1.0, 1.5))]).cells
    assert (cell.price_per_hour, cell.head_cost, cell.base_cost, cell.ort_cost, cell.cost_change) == (None,) * 5


def profile(*kernels: tuple[str, int, float]) -> KernelProfile:
    return KernelProfile([KernelTime(name, calls, us) for name, calls, us in kernels], inferences=3)


def test_the_kernels_that_grew_most_come_first_with_new_and_gone_ones_marked() -> None:
    base = profile(("matmul_a", 1, 100.0), ("relu", 1, 10.0), ("add", 2, 5.0), ("softmax_old", 1, 30.0),
                   ("steady", 1, 50.0))
    head = profile(("matmul_a", 1, 400.0), ("relu", 1, 12.0), ("add", 2, 4.0), ("softmax_new", 1, 45.0),
                   ("steady", 1, 50.0))
    growth = kernel_growth(base, head)
    assert [(k.name, k.side) for k in growth] == [("matmul_a", None), ("softmax_new", "new"), ("relu", None),
                                                  ("softmax_old", "gone")]
    top = growth[0]
    assert (top.base_us, top.head_us, top.growth_us) == (100.0, 400.0, 300.0) and top.change == pytest.approx(3.0)
    assert growth[1].growth_us == 45.0 and growth[1].change is None
    assert growth[3].growth_us == -30.0
    assert len(kernel_growth(base, head, limit=2)) == 2


def test_no_kernels_are_named_unless_both_builds_were_profiled() -> None:
    assert kernel_growth(None, profile(("a", 1, 1.0))) == [] and kernel_growth(profile(), None) == []
    slower = ab_model("net", 1.0, 1.5, profile=profile(("k", 1, 150.0)), base={"profile": profile(("k", 1, 100.0))})
    only_head = ab_model("other", 1.0, 1.5, profile=profile(("k", 1, 150.0)))
    cells = {c.model: c for c in decide([results(slower, only_head)]).cells}
    assert cells["net"].kernels == (KernelChange("k", 100.0, 150.0, 1, 1),)
    assert cells["other"].kernels == ()


# --- MLflow and the terminal ----------------------------------------------------------------


def test_mlflow_gets_both_costs_per_million_inferences() -> None:
    model = ab_model("net", 1.0, 1.0)
    assert "cost_per_million_usd" not in model_metrics(model)
    model.cost = CostInfo(per_million_usd=0.1, onnxruntime_per_million_usd=0.3)
    metrics = model_metrics(model)
    assert metrics["cost_per_million_usd"] == 0.1 and metrics["onnxruntime_cost_per_million_usd"] == 0.3


def render(table) -> str:
    console = Console(record=True, width=220)
    console.print(table)
    return console.export_text()


def test_the_terminal_tables_get_a_cost_column_only_when_a_target_has_a_price() -> None:
    priced = results(ab_model("net", 1.0, 1.5, ort_ms=3.0), price=0.36)
    priced.models[0].cost = CostInfo(per_million_usd=0.15, onnxruntime_per_million_usd=0.3)
    out = render(results_table(priced))
    assert "$ per 1M inferences (at $0.36/h)" in out and "$0.15 (ORT $0.30)" in out
    assert "per 1M" not in render(results_table(results(ab_model("net", 1.0, 1.5))))

    out = render(terminal_table(decide([priced, results(ab_model("net", 1.0, 1.0), target="gpu")])))
    assert "$ per 1M inferences" in out and "$0.15 (ORT $0.30)" in out
    assert "+$0.050 per million inferences" in out  # the regression's cost, next to its percent
    assert "per 1M" not in render(terminal_table(decide([results(ab_model("net", 1.0, 1.5))])))
