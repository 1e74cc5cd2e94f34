"""Benchmark: TVM over a ladder of tuning budgets vs ONNX Runtime, and `mlci run` cold vs warm.

For every model of an mlci config (default: the bundled examples), in one process, with one fresh
temporary tuning cache per model:

1. TVM at 0 trials: built against the still empty cache, so every kernel gets the rule-based
   default schedule (no tuned record);
2. TVM at each step of the trial ladder (``--ladder``, default 64 256 1024, times
   ``--budget-scale``), each step tuned into that same cache and continuing from the step before:
   the budget is a total per model, so going from 64 to 256 searches only the 192 trials the cache
   does not hold yet. A model's goal budget (below) is added as a step when the ladder passes it
   without stopping there;
3. ONNX Runtime (CPU provider, I/O binding) on the original model file, timed again at every step.

All latencies come from the same harness as `mlci run` (``Pipeline.measure`` with the config's
``[measure]`` settings); the tables report medians. "ORT/TVM" is ONNX Runtime's median divided by
TVM's at the same step (higher is better; above 1 means TVM is faster). Each build also reports how
many of its kernels got a tuned record ("tuned/total"; the rest got the default schedule), and the
thread counts of TVM's runtime and of ONNX Runtime (a loud warning when they differ: the ratio would
compare unequal machines).

Goals (``GOALS``; ORT/TVM at the best step within a trial budget): mlp >= 1.0 by 192 trials, cnn and
squeezenet >= 0.9 by 1024, any other model >= 0.9 by the top of its ladder, and every model >= 0.2 at
0 trials (TVM within 5x of ONNX Runtime untuned). A goal whose budget the ladder does not reach and
that is not met yet is reported "not reached", not "missed".

Where the top step misses the model's goal (or always, ``--breakdown always``), "where the time
goes": each kernel's best time from the tuning cache (the MetaSchedule runner's measurement, in its
own process on the same thread count) times its calls per inference, with GFLOP/s, beside ONNX
Runtime's profiler time per op type over ``PROFILE_RUNS`` runs on the same inputs and threads.

The plot (the JSON's path with ``.png``) has one panel per model: TVM's median latency against
trials, ONNX Runtime's median (dashed) and the latency the goal asks for (dotted).

Then, unless ``--skip-cli``, the wall time of the real command: the config (its ``trials`` scaled by
``--budget-scale``) and ``make_models.py`` are copied into an empty temporary directory (no
``.mlci/``), ``mlci run`` is run there twice as a subprocess (MLflow tracking on, embedded sqlite),
and the new tuning trials of each run are read from its results file. Goals: warm/cold <= 0.25 and
0 new trials when warm.

Timings are wall-clock on a shared machine: other load on the CPU shows up as noise (the load
average before and after is recorded in the JSON).

Run (from the repository root, in the project's virtualenv)::

    python bench/tvm_vs_ort.py                       # everything (see below)
    python bench/tvm_vs_ort.py --models mlp --ladder 8 16 --skip-cli     # a quick try, about a minute
    python bench/tvm_vs_ort.py --budget-scale 0.25   # the ladder at 16 64 256 (goals' budgets unchanged)

Tuning dominates: on 2 cores a trial costs roughly 0.5-1 s, so the default ladder (1024 trials in
all per model) takes several minutes to a quarter of an hour per model, plus the `mlci run` part.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from mlci import tuning
from mlci.config import Config, ModelConfig, load_config
from mlci.models import ModelError
from mlci.pipeline import Checked, Compiled, Imported, Measured, ModelSettings, Pipeline, run_prepare
from mlci.results import json_safe
from mlci.stats import speedup, summarize
from mlci.targets import ResolvedTarget, environment_fingerprint, select_target

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "examples" / "mlci.toml"
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "tvm_vs_ort.json"
DEFAULT_LADDER = (64, 256, 1024)
TUNE_SECONDS = 3600.0
"""Wall-clock cap per tuning call: large, so the trial budget and not the clock ends the search."""
GOALS: dict[str, tuple[int, float]] = {"mlp": (192, 1.0), "cnn": (1024, 0.9), "squeezenet": (1024, 0.9)}
"""Model -> (most trials, least ORT/TVM): the ratio must be reached by a step within that budget."""
DEFAULT_GOAL_RATIO = 0.9
"""For a model not in GOALS, reached by the top of its ladder."""
ZERO_TRIALS_GOAL = 0.2
"""ORT/TVM at 0 trials: TVM's default schedules within 5x of ONNX Runtime."""
WARM_OVER_COLD_GOAL = 0.25
PROFILE_RUNS = 20
"""ONNX Runtime runs profiled for the breakdown (after one unprofiled-in-the-sum warm-up run)."""
TOP_KERNELS = 12

err = Console(stderr=True, highlight=False, soft_wrap=True)


# --- results ----------------------------------------------------------------


@dataclass
class Timing:
    """Latency of one implementation of one model, in milliseconds."""

    median_ms: float
    min_ms: float
    p90_ms: float
    std_ms: float
    n: int
    samples_ms: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        s = summarize(samples)
        return cls(s.median, s.min, s.p90, s.std, s.n, [round(v, 6) for v in samples])


@dataclass
class LadderStep:
    """One rung: tune the model's cache up to `trials` in total, build, check, time TVM and ORT."""

    trials: int
    """The budget: trials in total for the model, counting what earlier steps searched."""
    trials_new: int
    trials_valid_new: int
    trials_cached: int
    trials_planned: int
    tasks_from_cache: int
    tune_seconds: float
    deadline_hit: bool
    build_seconds: float
    kernels_total: int | None
    """Kernels in the build (`compiled.build_report.kernels`); None when the build has no report."""
    kernels_tuned: int | None
    """Of those, compiled from a tuned record; the others got the default schedule."""
    kernels_default: int | None
    kernels_kept_default: int | None
    """Kernels with a tuned record that the build still gave the default schedule (it timed faster)."""
    fallbacks: dict[str, str]
    build_kept: str | None
    """"tuned", or "default" when the pipeline timed the all-default build faster and kept it
    (`compiled.build_choice`); None when no such comparison ran."""
    build_choice_ms: dict[str, float] | None
    tvm: Timing
    ort: Timing
    ort_over_tvm: float | None
    """ORT median / TVM median, both timed at this step (higher is better)."""
    speedup_vs_zero: float | None
    """TVM at 0 trials / TVM here."""
    numerics_passed: bool
    max_abs_err: float


@dataclass
class Goal:
    label: str
    max_trials: int
    min_ratio: float
    best_ratio: float | None
    """The best ORT/TVM at a step with at most `max_trials` trials."""
    best_at: int | None
    status: str
    """met, missed, or "not reached" (not met, and the ladder stopped short of the goal's budget)."""


@dataclass
class ModelBench:
    name: str
    kernels: int
    """Tuning tasks MetaSchedule extracted."""
    import_seconds: float
    tvm_threads: int
    ort_threads: int | None
    ladder: list[int]
    steps: list[LadderStep]
    ort: Timing
    """ONNX Runtime's samples of every step, pooled."""
    goal: tuple[int, float]
    """(max trials, min ORT/TVM) of the model's main goal."""
    goals: list[Goal] = field(default_factory=list)
    breakdown: dict[str, Any] | None = None
    """Where the time goes at the top step (see `where_time_goes`); None when not asked for."""
    error: str | None = None
    """Why the ladder stopped early, if it did."""


@dataclass
class CliRun:
    label: str
    wall_seconds: float
    returncode: int
    trials_new: int | None
    statuses: dict[str, str]
    output_tail: str


@dataclass
class CliBench:
    cold: CliRun
    warm: CliRun
    warm_over_cold: float | None
    config_text: str


# --- goals ---------------------------------------------------------------------


def model_goal(name: str, top: int) -> tuple[int, float]:
    """(max trials, min ORT/TVM) for a model: from GOALS, else the default at the top of its ladder."""
    return GOALS.get(name, (top, DEFAULT_GOAL_RATIO))


def scaled_ladder(ladder: list[int], scale: float) -> list[int]:
    return sorted({max(1, round(t * scale)) for t in ladder})


def model_ladder(ladder: list[int], goal_trials: int) -> list[int]:
    """The ladder plus the goal's budget when the ladder passes it without a step there, so the
    goal is judged at exactly its budget."""
    if 0 < goal_trials < ladder[-1] and goal_trials not in ladder:
        return sorted([*ladder, goal_trials])
    return list(ladder)


def judge(label: str, steps: list[LadderStep], max_trials: int, min_ratio: float) -> Goal:
    """The best ratio at a step within the budget decides; "not reached" when the ladder ended
    below the budget and the goal is not met yet."""
    within = [s for s in steps if s.trials <= max_trials and s.ort_over_tvm is not None]
    best = max(within, key=lambda s: s.ort_over_tvm or 0.0, default=None)
    ratio = best.ort_over_tvm if best else None
    if ratio is not None and ratio >= min_ratio:
        status = "met"
    elif not steps or steps[-1].trials < max_trials:
        status = "not reached"
    else:
        status = "missed"
    return Goal(label, max_trials, min_ratio, ratio, best.trials if best else None, status)


def judge_goals(steps: list[LadderStep], goal: tuple[int, float]) -> list[Goal]:
    max_trials, min_ratio = goal
    return [
        judge(f"ORT/TVM >= {float(ZERO_TRIALS_GOAL)} at 0 trials", steps, 0, ZERO_TRIALS_GOAL),
        judge(f"ORT/TVM >= {float(min_ratio)} by {max_trials} trials", steps, max_trials, min_ratio),
    ]


def step_goal(step: LadderStep, goal: tuple[int, float]) -> tuple[float, int] | None:
    """(min ratio, max trials) of the goal this step counts for; None past the goal's budget."""
    if step.trials == 0:
        return ZERO_TRIALS_GOAL, 0
    if step.trials <= goal[0]:
        return goal[1], goal[0]
    return None


# --- the in-process benchmark ------------------------------------------------


class Bench:
    def __init__(self, config: Config, target: ResolvedTarget, ladder: list[int], breakdown: str):
        self.config = config
        self.target = target
        self.ladder = ladder
        self.breakdown = breakdown

    def run_model(self, cfg: ModelConfig) -> ModelBench:
        name = cfg.name
        settings = ModelSettings.resolve(self.config, cfg, seconds=TUNE_SECONDS)
        goal = model_goal(name, self.ladder[-1])
        ladder = model_ladder(self.ladder, goal[0])

        with tempfile.TemporaryDirectory(prefix=f"mlci-bench-{name}-") as tmp:
            pipeline = Pipeline(self.target, tuning.TuningCache(Path(tmp) / "cache"), log_dir=Path(tmp) / "logs")
            _say(name, "importing")
            imported = pipeline.load_and_import(cfg)
            _say(name, f"{len(imported.kernels)} kernels; TVM on {pipeline.threads} threads; ladder 0 {' '.join(map(str, ladder))}")
            row = ModelBench(
                name=name, kernels=len(imported.kernels), import_seconds=round(imported.seconds, 3),
                tvm_threads=pipeline.threads, ort_threads=None, ladder=[0, *ladder], steps=[],
                ort=Timing.of([]), goal=goal,
            )
            last: tuple[Compiled, Checked] | None = None
            for trials in (0, *ladder):
                try:
                    step, compiled, checked, measured = self.step(pipeline, imported, settings, trials, row.steps)
                except ModelError as exc:
                    row.error = f"at {trials} trials ({exc.status.value}): {exc}"
                    _say(name, f"[stopped] {row.error}")
                    break
                row.steps.append(step)
                last = compiled, checked
                if row.ort_threads is None:
                    row.ort_threads = measured.ort_threads
                    if measured.ort_threads != pipeline.threads:
                        warn_threads(name, pipeline.threads, measured.ort_threads)
            row.ort = Timing.of([v for s in row.steps for v in s.ort.samples_ms])
            row.goals = judge_goals(row.steps, goal)

            if last is not None:
                top = row.steps[-1]
                missed = top.ort_over_tvm is None or top.ort_over_tvm < goal[1]
                if self.breakdown == "always" or (self.breakdown == "auto" and missed):
                    why = f"ORT/TVM {_num(top.ort_over_tvm)} < {float(goal[1])}" if missed else "asked for"
                    _say(name, f"where the time goes at {top.trials} trials ({why})")
                    row.breakdown = safe_breakdown(pipeline, imported, *last, top, row.ort_threads or pipeline.threads)
        return row

    def step(self, pipeline: Pipeline, imported: Imported, settings: ModelSettings, trials: int,
             before: list[LadderStep]) -> tuple[LadderStep, Compiled, Checked, Measured]:
        name = imported.prepared.name
        if trials:
            _say(name, f"tuning to {trials} trials in total")
        compiled = pipeline.tune_and_build(imported, replace(settings, trials=trials))
        outcome = compiled.tuning
        assert outcome is not None and compiled.build_seconds is not None
        checked = pipeline.check(compiled, settings)
        measured = pipeline.measure(checked, self.config.measure)
        tvm, ort = Timing.of(measured.tvm_ms), Timing.of(measured.ort_ms)
        report = getattr(compiled, "build_report", None)
        choice = getattr(compiled, "build_choice", None)
        step = LadderStep(
            trials=trials,
            trials_new=outcome.trials_new,
            trials_valid_new=outcome.trials_valid_new,
            trials_cached=outcome.trials_cached,
            trials_planned=sum(outcome.planned),
            tasks_from_cache=outcome.tasks_from_cache,
            tune_seconds=round(outcome.seconds, 3),
            deadline_hit=outcome.deadline_hit,
            build_seconds=round(compiled.build_seconds, 3),
            kernels_total=len(report.kernels) if report is not None else None,
            kernels_tuned=len(report.tuned) if report is not None else None,
            kernels_default=len(report.default) if report is not None else None,
            kernels_kept_default=len(report.kept_default) if hasattr(report, "kept_default") else None,
            fallbacks=dict(getattr(report, "fallbacks", {}) or {}),
            build_kept=getattr(choice, "kept", None),
            build_choice_ms={"tuned": choice.tuned_ms, "default": choice.default_ms} if choice is not None else None,
            tvm=tvm,
            ort=ort,
            ort_over_tvm=speedup(ort.median_ms, tvm.median_ms),
            speedup_vs_zero=speedup(before[0].tvm.median_ms, tvm.median_ms) if before else 1.0,
            numerics_passed=checked.numerics.passed,
            max_abs_err=checked.numerics.max_abs_err,
        )
        searched = f"searched {outcome.trials_new} new ({outcome.trials_cached} cached) in {outcome.seconds:.1f} s; " if trials else ""
        _say(
            name,
            f"{trials} trials: {searched}kernels tuned {_frac(step)}; TVM {tvm.median_ms:.3f} ms, "
            f"ORT {ort.median_ms:.3f} ms, ORT/TVM {_num(step.ort_over_tvm)}",
        )
        return step, compiled, checked, measured


def warn_threads(name: str, tvm_threads: int, ort_threads: int | None) -> None:
    err.print(
        f"[bold red]WARNING: {name}: TVM runs {tvm_threads} threads but ONNX Runtime {ort_threads}: "
        "ORT/TVM compares unequal resources[/bold red]"
    )


def _say(model: str, text: str) -> None:
    err.print(f"[{time.strftime('%H:%M:%S')}] {model}: {text}", markup=False)


# --- where the time goes --------------------------------------------------------------


def safe_breakdown(pipeline: Pipeline, imported: Imported, compiled: Compiled, checked: Checked,
                   step: LadderStep, ort_threads: int) -> dict[str, Any] | None:
    """`where_time_goes`, never failing the benchmark: a failure becomes a note."""
    try:
        return where_time_goes(pipeline, imported, compiled, checked, step, ort_threads)
    except Exception as exc:  # noqa: BLE001 - a diagnostic; the numbers above stand without it
        err.print(f"note: {imported.prepared.name}: the time breakdown failed: {type(exc).__name__}: {exc}", markup=False)
        return {"error": f"{type(exc).__name__}: {exc}"}


def where_time_goes(pipeline: Pipeline, imported: Imported, compiled: Compiled, checked: Checked,
                    step: LadderStep, ort_threads: int) -> dict[str, Any]:
    """TVM's kernels from the tuning cache beside ONNX Runtime's op types from its profiler, so a
    missed goal points at the kernels worth more trials or a better schedule."""
    out: dict[str, Any] = {
        "trials": step.trials,
        "tvm_median_ms": step.tvm.median_ms,
        "ort_median_ms": step.ort.median_ms,
        "tvm": None,
        "ort": None,
        "by_kind": None,
        "notes": [],
    }
    try:
        out["tvm"] = tvm_kernel_times(pipeline.cache, imported.kernels, compiled)
    except Exception as exc:  # noqa: BLE001
        out["notes"].append(f"TVM kernel times failed: {type(exc).__name__}: {exc}")
    try:
        out["ort"] = ort_op_times(imported.prepared.original, checked.inputs, ort_threads)
    except Exception as exc:  # noqa: BLE001
        out["notes"].append(f"ONNX Runtime profiling failed: {type(exc).__name__}: {exc}")
    flops: dict[str, float] = {}
    try:
        flops = model_flops_by_kind(imported.prepared.folded)
    except Exception as exc:  # noqa: BLE001
        out["notes"].append(f"FLOPs from the ONNX graph failed: {type(exc).__name__}: {exc}")
    if out["tvm"] and out["ort"]:
        kinds: dict[str, dict[str, float]] = defaultdict(lambda: {"tvm_ms": 0.0, "ort_ms": 0.0})
        for k in out["tvm"]["kernels"]:
            kinds[op_class(k["name"])]["tvm_ms"] += k["ms_per_inference"] or 0.0
        for o in out["ort"]["ops"]:
            kinds[op_class(o["op_type"])]["ort_ms"] += o["ms_per_inference"]
        out["by_kind"] = {}
        for kind, d in sorted(kinds.items()):
            gflop = flops.get(kind, 0.0) / 1e9
            out["by_kind"][kind] = {
                "tvm_ms": round(d["tvm_ms"], 6),
                "ort_ms": round(d["ort_ms"], 6),
                "gflop": gflop or None,
                "tvm_gflops": gflop / (d["tvm_ms"] / 1e3) if gflop and d["tvm_ms"] else None,
                "ort_gflops": gflop / (d["ort_ms"] / 1e3) if gflop and d["ort_ms"] else None,
            }
    return out


def op_class(name: str) -> str:
    """conv, matmul or other, for TVM kernel names (fused_conv2d_add_relu) and ORT op types (FusedConv, Gemm)."""
    low = name.lower()
    if "conv" in low:
        return "conv"
    if any(word in low for word in ("matmul", "dense", "gemm")):
        return "matmul"
    return "other"


def _seconds(value: Any) -> float:
    """A run_secs entry: a TVM FloatImm or a float."""
    return float(getattr(value, "value", value))


def schedule_of(name: str, report: Any, tuned: set[str], default: set[str]) -> str:
    """tuned, default, other (neither: plain loops or not in the build), or ? without a build report."""
    if report is None:
        return "?"
    return "tuned" if name in tuned else "default" if name in default else "other"


def tvm_kernel_times(cache: tuning.TuningCache, kernels: list[tuning.Kernel], compiled: Compiled) -> dict[str, Any]:
    """Per kernel: its best record's median run time (seconds per call, as the tuning runner measured
    it) x calls per inference, and FLOPs / time. Kernels without a record have no time here."""
    report = getattr(compiled, "build_report", None)
    tuned = set(getattr(report, "tuned", []) or [])
    default = set(getattr(report, "default", []) or [])
    ledger = cache.ledger()
    rows = []
    for kernel in kernels:
        records = cache.valid_records(kernel)
        secs = [_seconds(v) for v in records[0].run_secs] if records else []
        per_call = statistics.median(secs) if secs else None
        rows.append({
            "name": kernel.name,
            "calls": kernel.weight,
            "flops_per_call": kernel.flops,
            "trials": ledger.get(kernel.key, 0),
            "records": len(records),
            "schedule": schedule_of(kernel.name, report, tuned, default),
            "ms_per_call": per_call * 1e3 if per_call is not None else None,
            "ms_per_inference": per_call * 1e3 * kernel.weight if per_call is not None else None,
            "gflops": kernel.flops / per_call / 1e9 if per_call and kernel.flops > 1 else None,
        })
    timed = sum(r["ms_per_inference"] for r in rows if r["ms_per_inference"] is not None)
    for r in rows:
        r["share"] = r["ms_per_inference"] / timed if r["ms_per_inference"] is not None and timed else None
    rows.sort(key=lambda r: (r["ms_per_inference"] is None, -(r["ms_per_inference"] or 0.0), -r["flops_per_call"] * r["calls"]))
    return {
        "kernels": rows,
        "timed_ms": round(timed, 6),
        "untimed": sum(1 for r in rows if r["ms_per_inference"] is None),
        "source": "tuning cache: best record's median run_secs (MetaSchedule runner, same threads) x calls",
    }


def _shape_size(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def _shapes(arg: Any) -> list[list[int]]:
    """ORT's input_type_shape / output_type_shape: [{"float": [1, 3, 32, 32]}, ...]."""
    return [list(next(iter(d.values()))) for d in arg or [] if isinstance(d, dict) and d]


def node_flops(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float | None:
    """2 x multiply-adds of a Conv/Gemm/MatMul node from the shapes ORT's profiler lists; None when
    they do not give it (the profiler leaves out some weights, e.g. a Conv's prepacked one: then its
    kernel size is unknown). `model_flops_by_kind` counts from the ONNX graph instead."""
    if not outputs or not inputs or not inputs[0]:
        return None
    out, a = outputs[0], inputs[0]
    if op_class(op) == "conv":
        if len(inputs) > 1 and len(inputs[1]) >= 3:  # a weight fed as a graph input
            return 2.0 * _shape_size(out) * _shape_size(inputs[1][1:])  # [M, C/groups, kh, kw]
        return None
    if op.endswith("Gemm") and len(out) == 2 and out[0]:
        return 2.0 * _shape_size(out) * (_shape_size(a) // out[0])  # K = |A| / M, transposed or not
    if op.endswith("MatMul"):
        return 2.0 * _shape_size(out) * a[-1]
    return None


def model_flops_by_kind(model: Any) -> dict[str, float]:
    """FLOPs per inference of the model's Conv, Gemm and MatMul nodes (kind conv / matmul), from the
    ONNX graph with its shapes bound (what TVM imports): the work both engines do, so GFLOP/s by
    kind compare like with like whatever each engine fused."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes: dict[str, list[int]] = {init.name: list(init.dims) for init in graph.initializer}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes.setdefault(info.name, [d.dim_value if d.HasField("dim_value") else 0 for d in dims])
    flops: dict[str, float] = defaultdict(float)
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        a, w, out = shapes.get(node.input[0]), shapes.get(node.input[1]), shapes.get(node.output[0])
        if not a or not w or not out or 0 in out or 0 in a or 0 in w:
            continue
        if node.op_type == "Conv":
            flops["conv"] += 2.0 * _shape_size(out) * _shape_size(w[1:])
        elif node.op_type == "Gemm":
            flops["matmul"] += 2.0 * _shape_size(out) * (_shape_size(a) // out[0])
        else:
            flops["matmul"] += 2.0 * _shape_size(out) * a[-1]
    return dict(flops)


def ort_op_times(model_bytes: bytes, inputs: dict[str, np.ndarray], threads: int) -> dict[str, Any]:
    """ONNX Runtime's profiler on the model file with `measure.OrtModel`'s options and thread count:
    per op type, kernel time per inference (median over the profiled runs, robust to a neighbour's
    burst) and GFLOP/s where the shapes give FLOPs. Warm-up runs are left out."""
    import onnxruntime as ort

    warmup = 3
    with tempfile.TemporaryDirectory(prefix="mlci-bench-ortprof-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        for _ in range(warmup + PROFILE_RUNS):
            session.run(names, inputs)
        trace = json.loads(Path(session.end_profiling()).read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace

    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[warmup:]
    if not runs:
        raise RuntimeError("the profile has no model_run events")
    nodes = [e for e in events if e.get("cat") == "Node"]
    if any(e.get("name", "").endswith("_kernel_time") for e in nodes):
        nodes = [e for e in nodes if e["name"].endswith("_kernel_time")]  # not fence events, where present

    per_run: list[dict[str, float]] = [defaultdict(float) for _ in runs]
    node_names: dict[str, set[str]] = defaultdict(set)
    flops: dict[str, float] = defaultdict(float)
    flops_us: dict[str, float] = defaultdict(float)
    starts = [r["ts"] for r in runs]
    for e in nodes:
        index = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if index < 0 or e["ts"] > runs[index]["ts"] + runs[index]["dur"]:
            continue  # a warm-up run's node
        args = e.get("args", {})
        op = args.get("op_name", "?")
        dur = float(e.get("dur", 0))
        per_run[index][op] += dur
        node_names[op].add(e.get("name", ""))
        f = node_flops(op, _shapes(args.get("input_type_shape")), _shapes(args.get("output_type_shape")))
        if f:
            flops[op] += f
            flops_us[op] += dur
    medians = {op: statistics.median(run.get(op, 0.0) for run in per_run) / 1e3 for op in node_names}
    node_ms = statistics.median(sum(run.values()) for run in per_run) / 1e3
    ops = [
        {
            "op_type": op,
            "nodes": len(node_names[op]),
            "ms_per_inference": ms,
            "share": ms / sum(medians.values()) if sum(medians.values()) else None,
            "gflops": flops[op] / (flops_us[op] * 1e-6) / 1e9 if flops_us[op] else None,
        }
        for op, ms in medians.items()
    ]
    ops.sort(key=lambda o: -o["ms_per_inference"])
    return {
        "ops": ops,
        "node_ms": round(node_ms, 6),
        "run_ms": round(statistics.median(r["dur"] for r in runs) / 1e3, 6),
        "runs": len(runs),
        "threads": threads,
        "source": "onnxruntime profiler: Node events' dur summed by args.op_name per run, median over runs",
    }


# --- `mlci run`, cold vs warm --------------------------------------------------


def scaled_config_text(text: str, scale: float) -> str:
    """The config with every ``trials = N`` line scaled (flat example TOML; a quick-try helper)."""
    if scale == 1.0:
        return text

    def repl(match: re.Match[str]) -> str:
        return f"{match.group(1)}{max(1, round(int(match.group(2)) * scale))}"

    return re.sub(r"(?m)^(\s*trials\s*=\s*)(\d+)", repl, text)


def run_cli(workdir: Path, label: str, target: str, models: list[str]) -> CliRun:
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default, embedded sqlite
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")  # `prepare` runs `python`
    cmd = [sys.executable, "-m", "mlci.cli", "run", "-c", str(workdir / "mlci.toml"), "-t", target]
    for name in models:
        cmd += ["-m", name]
    _say("mlci run", f"{label}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    (workdir / f"mlci-run-{label}.log").write_text(output)

    trials_new: int | None = None
    statuses: dict[str, str] = {}
    results_path = workdir / ".mlci" / "results" / f"{target}.json"
    if results_path.is_file():
        data = json.loads(results_path.read_text())
        trials_new = sum(int((m.get("tuning") or {}).get("trials_new", 0)) for m in data.get("models", []))
        statuses = {m["name"]: m["status"] for m in data.get("models", [])}
    _say("mlci run", f"{label}: {wall:.1f} s, exit {proc.returncode}, {trials_new} new trials, {statuses}")
    return CliRun(label, round(wall, 3), proc.returncode, trials_new, statuses, output[-3000:])


def bench_cli(config: Config, target: str, models: list[str], budget_scale: float, keep: bool) -> CliBench:
    tmp = Path(tempfile.mkdtemp(prefix="mlci-bench-cli-"))
    failed = False
    try:
        config_text = scaled_config_text(config.path.read_text(encoding="utf-8"), budget_scale)
        (tmp / "mlci.toml").write_text(config_text, encoding="utf-8")
        for extra in ("make_models.py",):
            if (config.root / extra).is_file():
                shutil.copy2(config.root / extra, tmp / extra)
        cold = run_cli(tmp, "cold", target, models)
        warm = run_cli(tmp, "warm", target, models)
        failed = cold.returncode != 0 or warm.returncode != 0
        return CliBench(cold, warm, _ratio(warm.wall_seconds, cold.wall_seconds), config_text)
    finally:
        if keep or failed:
            err.print(f"kept the `mlci run` directory: {tmp}", markup=False)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


# --- output ---------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None, goal: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.2f}x"
    if goal is None:
        return text
    return f"[green]{text}[/green]" if value >= goal else f"[red]{text}[/red]"


def _frac(step: LadderStep) -> str:
    if step.kernels_total is None:
        return "? (no build_report)"
    text = f"{step.kernels_tuned}/{step.kernels_total}"
    if step.build_kept == "default":
        text += " (all-default build kept: faster)"
    elif step.kernels_kept_default:
        text += f" ({step.kernels_kept_default} kept default)"
    return text


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _status(status: str) -> str:
    colour = {"met": "green", "missed": "red"}.get(status, "yellow")
    return f"[{colour}]{status}[/{colour}]"


def threads_text(rows: list[ModelBench]) -> str:
    tvm = sorted({r.tvm_threads for r in rows})
    ort = sorted({r.ort_threads for r in rows if r.ort_threads is not None})
    text = f"threads: TVM {'/'.join(map(str, tvm))}, ORT {'/'.join(map(str, ort)) or '?'}"
    if any(r.ort_threads is not None and r.ort_threads != r.tvm_threads for r in rows):
        text += " [bold red](DIFFER!)[/bold red]"
    return text


def models_table(rows: list[ModelBench]) -> Table:
    table = Table(
        title=f"TVM vs ONNX Runtime by tuning trials (median ms; ORT/TVM higher is better, >1: TVM faster; {threads_text(rows)})",
        title_justify="left",
    )
    for header in ("model", "trials", "TVM ms", "ORT ms", "ORT/TVM", "goal", "kernels tuned/total",
                   "vs 0 trials", "new (cached) trials", "tune s"):
        table.add_column(header, justify="left" if header in ("model", "goal") else "right")
    for r in rows:
        for i, s in enumerate(r.steps):
            g = step_goal(s, r.goal)
            if g is None:
                goal, ratio = f"(past {r.goal[0]}-trial goal)", _x(s.ort_over_tvm, r.goal[1])
            else:
                met = s.ort_over_tvm is not None and s.ort_over_tvm >= g[0]
                goal, ratio = f">={float(g[0])} by {g[1]}: {_status('met' if met else 'missed')}", _x(s.ort_over_tvm, g[0])
            table.add_row(
                r.name if i == 0 else "",
                str(s.trials),
                _ms(s.tvm.median_ms),
                _ms(s.ort.median_ms),
                ratio,
                goal,
                _frac(s),
                _x(s.speedup_vs_zero) if s.trials else "",
                f"{s.trials_new} ({s.trials_cached})" if s.trials else "",
                f"{s.tune_seconds:.1f}" if s.trials else "",
            )
        if r.error:
            table.add_row("", "[red]stopped[/red]", r.error[:80], *[""] * 7)
        table.add_section()
    return table


def goals_summary(rows: list[ModelBench]) -> list[str]:
    lines = []
    for r in rows:
        for g in r.goals:
            best = f"best {_num(g.best_ratio)} at {g.best_at} trials" if g.best_at is not None else "no step within budget"
            lines.append(f"  {r.name}: {g.label}: {_status(g.status)} ({best})")
    met = sum(g.status == "met" for r in rows for g in r.goals)
    total = sum(len(r.goals) for r in rows)
    return [f"goals met: {met}/{total}", *lines]


def breakdown_tables(name: str, data: dict[str, Any]) -> list[Table | str]:
    """Rich tables for `where_time_goes`' result: top TVM kernels, ORT op types, conv/matmul totals."""
    out: list[Table | str] = []
    if "error" in data:
        return [f"{name}: time breakdown failed: {data['error']}"]
    tvm, ort = data.get("tvm"), data.get("ort")
    if tvm:
        out.append(
            f"{name} at {data['trials']} trials, where the time goes. TVM kernels: the tuning runner's best time per call "
            f"x calls per inference (end-to-end {_ms(data['tvm_median_ms'])} ms; timed kernels sum {_ms(tvm['timed_ms'])} ms)"
        )
        table = Table(title=f"{name}: TVM kernels", title_justify="left")
        for header in ("kernel", "calls", "trials", "schedule", "ms/call", "ms/inference", "share", "GFLOP/s"):
            table.add_column(header, justify="left" if header in ("kernel", "schedule") else "right")
        for k in tvm["kernels"][:TOP_KERNELS]:
            table.add_row(k["name"], str(k["calls"]), str(k["trials"]), k["schedule"], _ms(k["ms_per_call"]),
                          _ms(k["ms_per_inference"]), _pct(k["share"]), _num(k["gflops"]))
        hidden = len(tvm["kernels"]) - TOP_KERNELS
        if hidden > 0:
            rest = sum(k["ms_per_inference"] or 0.0 for k in tvm["kernels"][TOP_KERNELS:])
            table.add_row(f"... {hidden} more", "", "", "", "", _ms(rest), "", "")
        out.append(table)
        if tvm["untimed"]:
            out.append(f"{name}: {tvm['untimed']} kernel(s) have no tuning record, so no time here (default schedule)")
        untuned = [k["name"] for k in tvm["kernels"] if k["schedule"] == "default" and k["records"]]
        if untuned:
            out.append(f"{name}: {len(untuned)} kernel(s) with records run the default schedule in this build; their "
                       "times above are the best tuned record's, not the code that ran")
    if ort:
        out.append(
            f"{name}: ONNX Runtime by op type, from its profiler ({ort['runs']} runs on {ort['threads']} threads, medians; "
            f"end-to-end {_ms(data['ort_median_ms'])} ms unprofiled, {_ms(ort['run_ms'])} ms profiled, "
            f"node sum {_ms(ort['node_ms'])} ms)"
        )
        table = Table(title=f"{name}: ONNX Runtime op types", title_justify="left")
        for header in ("op type", "nodes", "ms/inference", "share", "GFLOP/s"):
            table.add_column(header, justify="left" if header == "op type" else "right")
        for o in ort["ops"]:
            table.add_row(o["op_type"], str(o["nodes"]), _ms(o["ms_per_inference"]), _pct(o["share"]), _num(o["gflops"]))
        out.append(table)
    if data.get("by_kind"):
        table = Table(title=f"{name}: by kind of op (ms per inference; GFLOP from the ONNX graph)", title_justify="left")
        for header in ("kind", "GFLOP", "TVM ms", "ORT ms", "TVM/ORT time", "TVM GFLOP/s", "ORT GFLOP/s"):
            table.add_column(header, justify="left" if header == "kind" else "right")
        for kind, d in data["by_kind"].items():
            table.add_row(kind, "-" if d["gflop"] is None else f"{d['gflop']:.4f}", _ms(d["tvm_ms"]), _ms(d["ort_ms"]),
                          _x(_ratio(d["tvm_ms"], d["ort_ms"])), _num(d["tvm_gflops"]), _num(d["ort_gflops"]))
        out.append(table)
    out += [f"{name}: {note}" for note in data.get("notes", [])]
    return out


def write_plot(rows: list[ModelBench], path: Path) -> Path | None:
    """One panel per model: TVM latency against trials, ORT's (dashed) and the goal's (dotted)."""
    rows = [r for r in rows if r.steps]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullLocator

    fig, axes = plt.subplots(1, len(rows), figsize=(4.8 * len(rows), 4.0), squeeze=False)
    for ax, r in zip(axes[0], rows):
        xs = [s.trials for s in r.steps]
        ys = [s.tvm.median_ms for s in r.steps]
        ax.plot(xs, ys, "o-", color="C0", label="TVM median")
        for x, y, s in zip(xs, ys, r.steps):
            ax.annotate(_x(s.ort_over_tvm), (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
        ort = r.ort.median_ms
        ax.axhline(ort, ls="--", color="C1", label=f"ORT median {ort:.3f} ms")
        max_trials, min_ratio = r.goal
        ax.axhline(ort / min_ratio, ls=":", color="C2", label=f"goal: ORT/TVM >= {float(min_ratio)} by {max_trials} trials")
        if max_trials <= max(xs):
            ax.axvline(max_trials, ls=":", color="C2", alpha=0.4)
        positive = [x for x in xs if x > 0]
        ax.set_xscale("symlog", base=2, linthresh=min(positive) if positive else 1, linscale=0.5)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("tuning trials (total for the model)")
        plain = FuncFormatter(lambda v, _: f"{v:.3g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("latency, ms (log); labels: ORT/TVM")
        ax.set_title(f"{r.name} (threads TVM {r.tvm_threads}, ORT {r.ort_threads})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cli_table(cli: CliBench) -> Table:
    table = Table(title="`mlci run` wall time, fresh directory then unchanged rerun", title_justify="left")
    for header in ("run", "wall s", "exit", "new trials", "statuses"):
        table.add_column(header, justify="left" if header in ("run", "statuses") else "right")
    for run in (cli.cold, cli.warm):
        trials = "-" if run.trials_new is None else str(run.trials_new)
        if run is cli.warm and run.trials_new is not None:
            trials = f"[green]{trials}[/green]" if run.trials_new == 0 else f"[red]{trials}[/red] (goal 0)"
        statuses = ", ".join(f"{k}={v}" for k, v in run.statuses.items()) or "-"
        table.add_row(run.label, f"{run.wall_seconds:.1f}", str(run.returncode), trials, statuses)
    ratio = cli.warm_over_cold
    if ratio is None:
        shown = "-"
    else:
        colour = "green" if ratio <= WARM_OVER_COLD_GOAL else "red"
        shown = f"[{colour}]{ratio:.3f}[/{colour}] (goal <={WARM_OVER_COLD_GOAL})"
    table.add_row("warm/cold", shown, "", "", "")
    return table


def notes(rows: list[ModelBench]) -> list[str]:
    """Anything that makes a row's numbers questionable."""
    out = []
    for r in rows:
        if r.ort_threads is not None and r.ort_threads != r.tvm_threads:
            out.append(f"{r.name}: THREADS DIFFER: TVM {r.tvm_threads}, ONNX Runtime {r.ort_threads}")
        if r.error:
            out.append(f"{r.name}: the ladder stopped {r.error}")
        previous = 0
        for s in r.steps:
            if not s.numerics_passed:
                out.append(f"{r.name}: TVM at {s.trials} trials differs from ONNX Runtime (max abs err {s.max_abs_err:.3g})")
            if s.deadline_hit:
                out.append(f"{r.name}: tuning to {s.trials} stopped at the {TUNE_SECONDS:.0f} s cap")
            if s.kernels_total is None:
                out.append(f"{r.name}: the build at {s.trials} trials has no build_report (kernels tuned/total unknown)")
            if s.build_kept == "default" and s.build_choice_ms:
                out.append(
                    f"{r.name}: at {s.trials} trials the build with default schedules only timed faster "
                    f"({s.build_choice_ms['default']:.3f} vs {s.build_choice_ms['tuned']:.3f} ms tuned) and was kept"
                )
            for kernel, why in s.fallbacks.items():
                out.append(f"{r.name}: at {s.trials} trials, {kernel}'s tuned record failed to apply: {why}")
            if s.trials and s.trials_new != s.trials - previous:
                out.append(
                    f"{r.name}: going to {s.trials} trials searched {s.trials_new} new, not the {s.trials - previous} "
                    f"still owed ({s.trials_cached} counted as cached; an exhausted search space or a re-split budget)"
                )
            previous = s.trials
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(payload), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


# --- main -------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="mlci.toml (default: %(default)s)")
    parser.add_argument("--models", nargs="+", default=[], metavar="NAME", help="only these models")
    parser.add_argument("--target", default=None, help="target name from [targets] (default: the first)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON output; the plot goes next to it as .png (default: %(default)s)")
    parser.add_argument("--ladder", type=int, nargs="+", default=list(DEFAULT_LADDER), metavar="TRIALS",
                        help="total trial budgets per model, tuned in turn into one cache (default: %(default)s)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply the ladder and the `mlci run` config's trials (e.g. 0.25 for a quick try); "
                             "the goals' budgets stay as they are")
    parser.add_argument("--breakdown", choices=("auto", "always", "never"), default="auto",
                        help="where the time goes: when the top step misses the model's goal (auto), always, or never")
    parser.add_argument("--skip-cli", action="store_true", help="skip the `mlci run` cold/warm timing")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the `mlci run` temporary directory")
    args = parser.parse_args(argv)
    if args.budget_scale <= 0:
        parser.error("--budget-scale must be positive")
    if any(t <= 0 for t in args.ladder):
        parser.error("--ladder steps must be positive (0 trials is always measured)")
    return args


def selected_models(config: Config, names: list[str]) -> list[ModelConfig] | None:
    """The config's models named on the command line (all of them when none is); None, after
    saying which, when a name is not in the config."""
    unknown = sorted(set(names) - {m.name for m in config.models})
    if unknown:
        err.print(f"no such model(s) in {config.path}: {', '.join(unknown)}", markup=False)
        return None
    return [m for m in config.models if not names or m.name in names]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config)
    selected = selected_models(config, args.models)
    if selected is None:
        return 2
    run_prepare(config)  # e.g. generate the example models
    target = select_target(config, args.target)
    ladder = scaled_ladder(args.ladder, args.budget_scale)

    started = dt.datetime.now(dt.UTC)
    payload: dict[str, Any] = {
        "benchmark": "tvm_vs_ort",
        "date": started.isoformat(timespec="seconds"),
        "config": str(config.path.resolve()),
        "target": target.name,
        "tvm_target": target.tvm_target,
        "fingerprint": environment_fingerprint(target).as_dict(),
        "ladder": ladder,
        "ladder_asked": args.ladder,
        "budget_scale": args.budget_scale,
        "goals": {
            "per_model": {k: {"max_trials": t, "min_ort_over_tvm": g} for k, (t, g) in GOALS.items()},
            "default": {"max_trials": "top of the ladder", "min_ort_over_tvm": DEFAULT_GOAL_RATIO},
            "zero_trials": {"max_trials": 0, "min_ort_over_tvm": ZERO_TRIALS_GOAL},
        },
        "tune_seconds_cap": TUNE_SECONDS,
        "measure": asdict(config.measure),
        "trials_per_round": config.tuning.trials_per_round,
        "load_average_start": list(os.getloadavg()),
        "threads": {"tvm": None, "ort": None, "differ": None},
        "models": [],
        "plot": None,
        "cli": None,
    }
    bench = Bench(config, target, ladder, args.breakdown)
    rows: list[ModelBench] = []
    for cfg in selected:
        row = bench.run_model(cfg)
        rows.append(row)
        payload["models"].append(asdict(row))
        payload["threads"] = {
            "tvm": sorted({r.tvm_threads for r in rows}),
            "ort": sorted({r.ort_threads for r in rows if r.ort_threads is not None}),
            "differ": any(r.ort_threads is not None and r.ort_threads != r.tvm_threads for r in rows),
        }
        write_json(args.out, payload)

    plot_path = args.out.with_suffix(".png")
    try:
        payload["plot"] = str(write_plot(rows, plot_path) or "") or None
    except Exception as exc:  # noqa: BLE001 - the numbers are in the JSON either way
        err.print(f"note: the plot failed: {type(exc).__name__}: {exc}", markup=False)

    cli: CliBench | None = None
    if not args.skip_cli:
        cli = bench_cli(config, target.name, args.models, args.budget_scale, args.keep_tmp)
        payload["cli"] = asdict(cli)
    payload["load_average_end"] = list(os.getloadavg())
    payload["seconds"] = round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1)
    write_json(args.out, payload)

    console = Console() if Console().is_terminal or os.environ.get("COLUMNS") else Console(width=200)
    console.print(models_table(rows))
    for line in goals_summary(rows):
        console.print(line)
    for r in rows:
        if r.breakdown:
            for item in breakdown_tables(r.name, r.breakdown):
                if isinstance(item, str):
                    console.print(item, markup=False)
                else:
                    console.print(item)
    for line in notes(rows):
        console.print(f"note: {line}", markup=False)
    if payload["threads"]["differ"]:
        console.print(f"[bold red]WARNING: TVM and ONNX Runtime ran on different thread counts: {payload['threads']}[/bold red]")
    if cli is not None:
        console.print(cli_table(cli))
    console.print(
        f"load average (1/5/15 min) at start {payload['load_average_start']}, at end {payload['load_average_end']}",
        markup=False,
    )
    console.print(f"JSON: {args.out}", markup=False)
    if payload["plot"]:
        console.print(f"plot: {payload['plot']}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
