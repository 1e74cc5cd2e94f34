"""Benchmark: how well the regression gate catches real slowdowns, and how often it cries wolf.

A chain of identical MatMul+Relu layers is the base model; the variants have more
layers, calibrated so that they really cost 3%, 5% and 10% more on this machine
(more compute, no sleeps). Every model
is tuned once through one shared tuning cache (all layers are one kernel) and built
with TVM, exactly as `mlci run` builds it. Then each pair is compared many times the
way `mlci run --base` + `mlci compare` do it: interleaved A/B rounds
(`mlci.measure.measure_ab` with `mlci.ab.RemeasurePolicy`, re-measuring an unsettled cell), then the gate's verdict
(`mlci.gate.decide` on a results object holding those samples). Identical pairs (the
base against itself, two VMs of one build) give the false-alarm rate.

The "true" cost of each variant is measured once more with a long interleaved run
and reported beside the nominal size: the gate is judged against what the variant
really costs on this machine.

Goal: >= 95% of 5% slowdowns detected, <= 1% false alarms, <= 30 s of
measuring per model.

Run (from the repository root, in the project's virtualenv)::

    python bench/gate_power.py                      # ~5-10 minutes on 2 cores
    python bench/gate_power.py --repeats 5 --null-repeats 20   # a quick try
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from mlci import gate, measure, tuning
from mlci.ab import RemeasurePolicy
from mlci.config import GateConfig, MeasureConfig, ModelConfig
from mlci.pipeline import ModelSettings, Pipeline
from mlci.results import Baseline, Fingerprint, GitInfo, Latency, ModelResult, Results, TargetInfo, json_safe
from mlci.stats import summarize
from mlci.targets import ResolvedTarget, detect_host_target

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "gate_power.json"
SIZES = (0.03, 0.05, 0.10)
DETECTION_GOAL, FALSE_ALARM_GOAL, SECONDS_GOAL = 0.95, 0.01, 30.0

err = Console(stderr=True, highlight=False, soft_wrap=True)


def chain_model(layers: int, width: int, batch: int) -> onnx.ModelProto:
    """`layers` x (MatMul with one shared weight, Relu): cost grows exactly with `layers`."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) * np.sqrt(2.0 / width)).astype(np.float32)
    nodes, prev = [], "x"
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"mm{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"mm{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    graph = helper.make_graph(
        nodes, f"chain{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [batch, width])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@dataclass
class Built:
    layers: int
    timer: Any
    sync: Any


def build(layers: int, width: int, batch: int, workdir: Path, pipeline: Pipeline, trials: int) -> Built:
    """One chain model through the same pipeline `mlci run` uses (all layers share one kernel)."""
    path = workdir / f"chain{layers}.onnx"
    onnx.save(chain_model(layers, width, batch), path)
    settings = ModelSettings(trials=trials, seconds=600, trials_per_round=16, seed=0)
    compiled = pipeline.compile(ModelConfig(name=path.stem, path=path), settings)
    checked = pipeline.check(compiled, settings)
    return Built(layers, checked.tvm_timer(), checked.model.sync)


@dataclass
class Comparison:
    verdict: str
    ratio: float
    low: float
    high: float
    rounds: int
    pairs: int
    seconds: float


@dataclass
class Row:
    label: str
    nominal: float
    base_layers: int
    head_layers: int
    true_ratio: float
    comparisons: list[Comparison] = field(default_factory=list)

    def rate(self, *verdicts: str) -> float:
        return sum(c.verdict in verdicts for c in self.comparisons) / max(len(self.comparisons), 1)

    @property
    def seconds(self) -> list[float]:
        return [c.seconds for c in self.comparisons]


def compare_once(base: Built, head: Built, m: MeasureConfig, g: GateConfig, cells: int) -> Comparison:
    """One gate decision, measured and decided the way `mlci run --base` + `mlci compare` do."""
    policy = RemeasurePolicy.from_gate(g, cells)
    start = time.perf_counter()
    b, h, rounds = measure.measure_ab(
        base.timer, head.timer, settled=policy.settled, max_rounds=policy.max_rounds, sync=head.sync,
        **measure.timing_args(m),
    )
    seconds = time.perf_counter() - start

    def latency(samples: list[float]) -> Latency:
        return Latency(samples=samples, **summarize(samples).as_dict())

    result = Results(
        git=GitInfo(commit="head", base_commit="base"),
        target=TargetInfo(name="cpu", tvm_target={}, fingerprint=Fingerprint()),
        models=[ModelResult(name="chain", path="chain.onnx", latency_ms=latency(h), threshold=g.threshold,
                            base=Baseline(commit="base", status="ok", latency_ms=latency(b), rounds=rounds))],
    )
    # `cells` stands for the matrix size: the gate's Bonferroni correction uses it.
    decision = gate.decide([result] * cells, threshold=g.threshold, family_confidence=g.confidence)
    cell = decision.cells[0]
    est = cell.estimate
    assert est is not None
    return Comparison(cell.verdict, est.ratio, est.low, est.high, rounds, len(b), seconds)


def true_ratio(base: Built, head: Built, m: MeasureConfig) -> float:
    """A long interleaved run (10x the samples) for the variant's real cost on this machine."""
    b, h = measure.time_interleaved(base.timer, head.timer, warmup=m.warmup, samples=m.samples * 10,
                                    min_sample_ms=m.min_sample_ms, max_seconds=120, sync=head.sync)
    return float(np.median(h) / np.median(b))


def table(rows: list[Row], m: MeasureConfig, g: GateConfig, cells: int) -> Table:
    t = Table(title=f"gate power: threshold {g.threshold:.0%}, family confidence {g.confidence:.0%} over {cells} cell(s), "
                    f"{m.samples} pairs x {m.min_sample_ms:g} ms/sample a round, up to {1 + g.remeasure} rounds",
              title_justify="left")
    for col in ("slowdown", "layers", "true cost", "compared", "regression", "inconclusive", "unchanged", "improvement",
                "s/model median", "s/model max"):
        t.add_column(col, justify="left" if col == "slowdown" else "right")
    for row in rows:
        secs = row.seconds
        t.add_row(
            row.label, f"{row.base_layers}->{row.head_layers}", f"{(row.true_ratio - 1) * 100:+.1f}%",
            str(len(row.comparisons)),
            f"{row.rate('regression'):.0%}", f"{row.rate('inconclusive'):.0%}", f"{row.rate('unchanged'):.0%}",
            f"{row.rate('improvement'):.0%}", f"{float(np.median(secs)):.1f}", f"{max(secs):.1f}",
        )
    return t


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20, help="comparisons per slowdown size")
    p.add_argument("--null-repeats", type=int, default=100, help="comparisons of identical pairs")
    p.add_argument("--layers", type=int, default=100, help="layers of the base model")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--trials", type=int, default=32, help="tuning trials (one kernel, shared by every model)")
    p.add_argument("--cells", type=int, default=1, help="matrix size the Bonferroni correction assumes")
    p.add_argument("--samples", type=int, help="override [measure].samples")
    p.add_argument("--min-sample-ms", type=float, help="override [measure].min_sample_ms")
    p.add_argument("--threshold", type=float, help="override [gate].threshold")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    m = MeasureConfig()
    if args.samples:
        m = MeasureConfig(**{**asdict(m), "samples": args.samples})
    if args.min_sample_ms:
        m = MeasureConfig(**{**asdict(m), "min_sample_ms": args.min_sample_ms})
    g = GateConfig(threshold=args.threshold) if args.threshold else GateConfig()
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="mlci-gate-power-") as tmp:
        workdir = Path(tmp)
        pipeline = Pipeline(ResolvedTarget(name="cpu", tvm_target=detect_host_target()),
                            tuning.TuningCache(workdir / "cache"), log_dir=workdir / "logs")
        err.print(f"building base ({args.layers} layers) and variants; tuning {args.trials} trials once")
        base = build(args.layers, args.width, args.batch, workdir, pipeline, args.trials)
        # Calibrate: fixed costs (the VM call, argument setup) dilute extra layers, so pick the
        # layer counts that really cost 3/5/10% more here, from a probe with 20% more layers.
        probe_layers = round(args.layers * 1.2)
        probe = build(probe_layers, args.width, args.batch, workdir, pipeline, args.trials)
        per_layer = (true_ratio(base, probe, m) - 1) / (probe_layers - args.layers)
        err.print(f"one layer costs {per_layer * 100:.3f}% of the base model")
        pairs = [("identical", 0.0, base)]
        for size in SIZES:
            layers = args.layers + max(1, round(size / per_layer))
            pairs.append((f"+{size:.0%}", size, build(layers, args.width, args.batch, workdir, pipeline, args.trials)))
        for label, size, head in pairs:
            row = Row(label, size, base.layers, head.layers, true_ratio(base, head, m))
            repeats = args.null_repeats if size == 0 else args.repeats
            for i in range(repeats):
                row.comparisons.append(compare_once(base, head, m, g, args.cells))
                err.print(f"{label}: {i + 1}/{repeats} {row.comparisons[-1].verdict} "
                          f"({(row.comparisons[-1].ratio - 1) * 100:+.1f}%)", end="\r")
            err.print()
            rows.append(row)

    out = Console(highlight=False, width=160)
    out.print(table(rows, m, g, args.cells))
    null = rows[0]
    five = next(r for r in rows if r.nominal == 0.05)
    worst_seconds = max(max(r.seconds) for r in rows)
    goals = {
        "detected_at_5pct": five.rate("regression"),
        "false_alarms": null.rate("regression", "improvement"),
        "max_measuring_seconds_per_model": worst_seconds,
        "met": five.rate("regression") >= DETECTION_GOAL and null.rate("regression", "improvement") <= FALSE_ALARM_GOAL
        and worst_seconds <= SECONDS_GOAL,
    }
    out.print(f"detected at +5%: {goals['detected_at_5pct']:.0%} (goal >= {DETECTION_GOAL:.0%}); "
              f"false alarms: {goals['false_alarms']:.1%} (goal <= {FALSE_ALARM_GOAL:.0%}); "
              f"measuring per model <= {worst_seconds:.1f} s (goal <= {SECONDS_GOAL:g} s)")
    payload = {
        "benchmark": "gate_power",
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "measure": asdict(m),
        "gate": asdict(g),
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "rows": [
            {"label": r.label, "nominal": r.nominal, "base_layers": r.base_layers, "head_layers": r.head_layers,
             "true_ratio": r.true_ratio,
             "rates": {v: r.rate(v) for v in ("regression", "inconclusive", "unchanged", "improvement")},
             "comparisons": [asdict(c) for c in r.comparisons]}
            for r in rows
        ],
        "goals": goals,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(payload), indent=2) + "\n", encoding="utf-8")
    out.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
