"""Benchmark: the ONNX backend node tests through mlci's own chain, at 0 trials.

The `onnx` package carries a conformance suite, `onnx.backend.test.case.node`: about 1900 one-operator
models (and their function expansions) with inputs and the outputs ONNX's reference implementation
computes. Each case is generated in memory from the installed package (nothing is downloaded), saved,
and run the way `mlci run` builds a model: `Pipeline.load -> import -> tune (0 trials) -> build`,
then the compiled model runs on the case's inputs and its outputs are compared with the expected ones
(shape and dtype exactly; integers and booleans exactly; floats with the case's own tolerances, NaN
where NaN is expected).

Each case runs in its own process, forked from this one (TVM and mlci imported once), with a time
limit and a memory cap, so a case that hangs, runs out of memory or kills its process (a SIGFPE in
generated code) is counted as such and the rest go on.

Classes:
  pass               outputs as expected
  mismatch           compiled and ran, wrong shape, dtype or values: a silent wrong answer
  unsupported        refused before import, naming the operator (no converter, or refused by mlci)
  error              failed at a stage (load, import, compile, run); `names_op` says whether the
                     message names the case's operator
  timeout, crash     over the time limit; killed by a signal (or the memory cap)
  refused_by_design  types mlci does not take (strings, bfloat16, float8, 4- and 2-bit, complex,
                     sequences, maps, optionals): not run, the reason recorded

Goal: no mismatch, no crash, at least 80% of the cases not refused by design pass, every failure
names its operator.

Run (from the repository root, in the project's virtualenv)::

    python bench/onnx_conformance.py                  # the whole suite: ~10-20 minutes on 2 cores
    python bench/onnx_conformance.py --only layer_norm --only attention -v
    python bench/onnx_conformance.py --limit 100 --jobs 2
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import re
import resource
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "onnx_conformance.json"
PASS_GOAL = 0.80

err = Console(stderr=True, highlight=False, soft_wrap=True)

T = onnx.TensorProto
REFUSED_TYPES = {
    T.STRING: "string tensors",
    T.BFLOAT16: "bfloat16",
    T.FLOAT8E4M3FN: "float8", T.FLOAT8E4M3FNUZ: "float8", T.FLOAT8E5M2: "float8", T.FLOAT8E5M2FNUZ: "float8",
    T.INT4: "int4", T.UINT4: "uint4",
    T.COMPLEX64: "complex", T.COMPLEX128: "complex",
}
for _name, _label in (("FLOAT4E2M1", "float4"), ("INT2", "int2"), ("UINT2", "uint2"), ("FLOAT8E8M0", "float8")):
    if hasattr(T, _name):
        REFUSED_TYPES[getattr(T, _name)] = _label


@dataclass
class CaseResult:
    name: str
    op: str
    cls: str
    stage: str | None = None
    message: str = ""
    names_op: bool | None = None
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)


# --- which cases, and what they are about ---------------------------------------------------------


def collect() -> list[Any]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases() if c.kind == "node"]


def primary_ops(cases: list[Any]) -> dict[str, str]:
    """Case name -> the operator it is about: the single node's op, or for a function expansion
    (`test_x_expanded`, `test_x_expanded_ver18`) the op of the case it expands."""
    single = {c.name: c.model.graph.node[0].op_type for c in cases if len(c.model.graph.node) == 1}
    ops = {}
    for case in cases:
        if case.name in single:
            ops[case.name] = single[case.name]
            continue
        base = re.sub(r"_expanded.*$", "", case.name)
        ops[case.name] = single.get(base) or _op_from_name(case, single) or case.model.graph.node[0].op_type
    return ops


def _op_from_name(case: Any, single: dict[str, str]) -> str | None:
    """The op of the longest single-node case whose name prefixes this one's."""
    best = ""
    for name in single:
        if case.name.startswith(name) and len(name) > len(best):
            best = name
    return single.get(best)


def _value_types(graph: onnx.GraphProto) -> list[onnx.TypeProto]:
    types = [v.type for v in (*graph.input, *graph.output, *graph.value_info)]
    from mlci.models import walk_nodes

    for node in walk_nodes(graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                types += _value_types(attr.g)
    return types


def refusal(model: onnx.ModelProto) -> str | None:
    """Why mlci does not take this model by design (its types), or None."""
    for tp in _value_types(model.graph):
        which = tp.WhichOneof("value")
        if which is None:
            continue
        if which != "tensor_type":
            return f"non-tensor {which.replace('_type', '')} values"
        if tp.tensor_type.elem_type in REFUSED_TYPES:
            return REFUSED_TYPES[tp.tensor_type.elem_type]
    for init in model.graph.initializer:
        if init.data_type in REFUSED_TYPES:
            return REFUSED_TYPES[init.data_type]
    from mlci.models import walk_nodes

    for node in walk_nodes(model.graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type in REFUSED_TYPES:
                return REFUSED_TYPES[attr.t.data_type]
            if node.op_type in ("Cast", "CastLike") and attr.name == "to" and attr.i in REFUSED_TYPES:
                return REFUSED_TYPES[attr.i]
    return None


# Inputs that set a node's shape, axes, sizes or counts: exporters write them as constants (torch.onnx,
# tf2onnx, onnx's own helpers), the suite feeds them as graph inputs. mlci binds every shape before
# compiling, so those inputs are made initializers holding the case's values (`detail["frozen"]`);
# `--no-freeze` runs the cases as written.
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Pad": (1, 2, 3), "Slice": (1, 2, 3, 4), "TopK": (1,),
    "Range": (0, 1, 2), "ConstantOfShape": (0,), "Resize": (1, 2, 3), "Upsample": (1,), "OneHot": (1,),
    "CumSum": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,), "NonMaxSuppression": (2, 3, 4),
    "Clip": (1, 2), "Trilu": (1,), "CenterCropPad": (1,), "Col2Im": (1, 2), "AffineGrid": (1,),
    "DFT": (1, 2), "STFT": (1, 2, 3), "BlackmanWindow": (0,), "HannWindow": (0,), "HammingWindow": (0,),
    "MaxUnpool": (2,), "Dropout": (1, 2), "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,),
    "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,), "CumProd": (1,), "Bernoulli": (),
}


def _array(value: Any) -> np.ndarray:
    """A case's input or expected output: a NumPy array, or a TensorProto (the Cast cases keep theirs so)."""
    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def freeze_parameters(case: Any) -> tuple[onnx.ModelProto, list[str]]:
    """The case's model with its parameter-only inputs made initializers (see PARAMETER_INPUTS)."""
    from mlci.models import walk_nodes

    graph = case.model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initializers]
    uses: dict[str, list[bool]] = collections.defaultdict(list)
    for node in walk_nodes(graph):
        slots = PARAMETER_INPUTS.get(node.op_type, ())
        for index, name in enumerate(node.input):
            uses[name].append(index in slots)
    frozen = []
    for position, name in enumerate(inputs):
        if not uses.get(name) or not all(uses[name]):
            continue
        values = [_array(inputs_[position]) for inputs_, _ in case.data_sets]
        if any(v.shape != values[0].shape or not np.array_equal(v, values[0]) for v in values[1:]):
            continue
        frozen.append(name)
    if not frozen:
        return case.model, []
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    for name in frozen:
        value = _array(case.data_sets[0][0][inputs.index(name)])
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    kept = [i for i in model.graph.input if i.name not in frozen]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model, frozen


# --- one case, in its own process -------------------------------------------------------------------


def names_op(message: str, model: onnx.ModelProto, op: str) -> bool:
    """The message says what failed: the case's operator, an operator and node of the model as mlci
    imports it (ONNX Runtime may have expanded a function op into others), or the model input at fault."""
    if re.search(r"\b[A-Z][A-Za-z0-9.]* node '[^']+'", message):
        return True
    if any(re.search(rf"input '{re.escape(i.name)}'", message) for i in model.graph.input):
        return True
    ops = {op} | {n.op_type for n in model.graph.node}
    return any(re.search(rf"(?<![A-Za-z]){re.escape(o)}(?![a-z])", message) for o in ops)


def compare(got: list[np.ndarray], expected: list[np.ndarray], names: list[str], rtol: float, atol: float) -> str | None:
    """Why the outputs are wrong, or None."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for name, g, e in zip(names, got, expected):
        e = np.asarray(e)
        g = np.asarray(g)
        if g.shape != e.shape:
            return f"output {name!r}: shape {list(g.shape)}, expected {list(e.shape)}"
        if g.dtype != e.dtype:
            return f"output {name!r}: dtype {g.dtype}, expected {e.dtype}"
        if e.dtype.kind in "iub":
            bad = int(np.count_nonzero(g != e))
            if bad:
                return f"output {name!r}: {bad} of {e.size} values differ"
            continue
        # float16 keeps 11 significant bits: a relative tolerance under two of its epsilons (the suite's
        # 1e-3 is one) asks for ONNX's reference's exact rounding order, not for a right answer.
        tolerance = max(rtol, 2 * float(np.finfo(np.float16).eps)) if e.dtype == np.float16 else rtol
        try:
            np.testing.assert_allclose(g, e, rtol=tolerance, atol=atol, equal_nan=True)
        except AssertionError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            return f"output {name!r}: " + "; ".join(lines[1:4])
    return None


def run_case(case: Any, op: str, workdir: Path, tvm_target: dict[str, Any], freeze: bool = True) -> CaseResult:
    """The chain `mlci run` uses, on one case: load -> import -> tune (0 trials) -> build -> run."""
    from mlci import tuning
    from mlci.config import ModelConfig
    from mlci.measure import TvmModel
    from mlci.models import ModelError
    from mlci.pipeline import ModelSettings, Pipeline
    from mlci.targets import ResolvedTarget

    result = CaseResult(case.name, op, "pass")
    path = workdir / f"{case.name}.onnx"
    model_proto, frozen = freeze_parameters(case) if freeze else (case.model, [])
    if frozen:
        result.detail["frozen"] = frozen
    onnx.save(model_proto, path)
    pipeline = Pipeline(ResolvedTarget(name="cpu", tvm_target=tvm_target), tuning.TuningCache(workdir / "cache"),
                        log_dir=workdir / "logs")
    stage = "compile"
    try:
        compiled = pipeline.compile(ModelConfig(name=case.name, path=path, key=case.name), ModelSettings(trials=0))
        stage = "run"
        prepared = compiled.prepared
        names = [spec.name for spec in prepared.inputs]
        graph_inputs = [i.name for i in case.model.graph.input
                        if i.name not in {init.name for init in case.model.graph.initializer}]
        names = [n for n in names if n not in frozen]
        output_names = [o.name for o in case.model.graph.output]
        model = TvmModel(compiled.executable, pipeline.device)
        for inputs, expected in case.data_sets:
            given = dict(zip(graph_inputs, map(_array, inputs)))
            got = model.run({n: given[n] for n in names}, names)
            why = compare(got, [_array(e) for e in expected], output_names, case.rtol, case.atol)
            if why is not None:
                result.cls, result.stage, result.message = "mismatch", "compare", why
                break
    except ModelError as exc:
        message = str(exc)
        result.message = message
        if "unsupported ONNX operator" in message or "refused by mlci" in message:
            result.cls = "unsupported"
        else:
            result.cls, result.stage = "error", exc.status.value
        result.names_op = names_op(message, case.model, op)
    except Exception as exc:  # noqa: BLE001 - a failure outside mlci's own errors is a finding too
        message = f"{type(exc).__name__}: {exc}"
        result.cls, result.stage, result.message = "error", stage, message
        result.names_op = names_op(message, case.model, op)
        result.detail["traceback"] = traceback.format_exc()[-2000:]
    return result


def _child(case: Any, op: str, workdir: Path, tvm_target: dict[str, Any], out: Path, memory_gb: float,
           freeze: bool) -> None:
    if memory_gb > 0:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.environ["TVM_NUM_THREADS"] = "1"
    start = time.monotonic()
    try:
        result = run_case(case, op, workdir, tvm_target, freeze)
    except BaseException as exc:  # noqa: BLE001 - MemoryError under the cap, anything else
        result = CaseResult(case.name, op, "error", "harness", f"{type(exc).__name__}: {exc}")
    result.seconds = round(time.monotonic() - start, 3)
    result.message = result.message[:2000]
    out.write_text(json.dumps(asdict(result)))


# --- the scheduler --------------------------------------------------------------------------------


def run_all(cases: list[Any], ops: dict[str, str], args: argparse.Namespace, tvm_target: dict[str, Any],
            on_result: Any) -> None:
    """Fork one process per case, at most `args.jobs` at once; each is killed past `args.timeout`."""
    import shutil

    running: dict[int, tuple[Any, Path, float]] = {}
    queue = list(cases)
    with tempfile.TemporaryDirectory(prefix="mlci-conformance-") as tmp:
        root = Path(tmp)
        while queue or running:
            while queue and len(running) < args.jobs:
                case = queue.pop(0)
                workdir = root / case.name
                workdir.mkdir()
                out = workdir / "result.json"
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        os.setpgid(0, 0)
                        _child(case, ops[case.name], workdir, tvm_target, out, args.memory_gb, args.freeze)
                    except BaseException:  # noqa: BLE001
                        code = 1
                    finally:
                        os._exit(code)
                running[pid] = (case, workdir, time.monotonic())
            time.sleep(0.02)
            for pid, (case, workdir, started) in list(running.items()):
                done, status = os.waitpid(pid, os.WNOHANG)
                elapsed = time.monotonic() - started
                if done == 0:
                    if elapsed > args.timeout:
                        _kill_group(pid)
                        os.waitpid(pid, 0)
                        result = CaseResult(case.name, ops[case.name], "timeout", message=f"over {args.timeout:.0f} s")
                    else:
                        continue
                else:
                    _kill_group(pid)  # anything the case left behind
                    out = workdir / "result.json"
                    if os.WIFSIGNALED(status):
                        sig = signal.Signals(os.WTERMSIG(status)).name
                        result = CaseResult(case.name, ops[case.name], "crash", message=f"killed by {sig}")
                    elif out.exists():
                        result = CaseResult(**json.loads(out.read_text()))
                    else:
                        result = CaseResult(case.name, ops[case.name], "crash",
                                            message=f"exited {os.WEXITSTATUS(status)} without a result")
                result.seconds = result.seconds or round(elapsed, 3)
                del running[pid]
                shutil.rmtree(workdir, ignore_errors=True)
                on_result(result)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# --- reporting ---------------------------------------------------------------------------------------


CLASSES = ("pass", "mismatch", "unsupported", "error", "timeout", "crash", "refused_by_design")


def summary(results: list[CaseResult]) -> dict[str, Any]:
    by_class = collections.Counter(r.cls for r in results)
    considered = [r for r in results if r.cls != "refused_by_design"]
    failures = [r for r in considered if r.cls != "pass"]
    unnamed = [r.name for r in failures if r.cls in ("error", "unsupported") and not r.names_op]
    return {
        "cases": len(results),
        "by_class": {c: by_class.get(c, 0) for c in CLASSES},
        "considered": len(considered),
        "pass_rate": round(by_class.get("pass", 0) / len(considered), 4) if considered else None,
        "failures_naming_op": len(failures) - len(unnamed) - sum(1 for r in failures if r.cls not in ("error", "unsupported")),
        "failures_not_naming_op": unnamed,
        "goal": {"pass_rate": PASS_GOAL, "mismatch": 0, "crash": 0},
    }


def error_groups(results: list[CaseResult], top: int = 25) -> list[tuple[str, int, str]]:
    """The most common failure messages, numbers and names blurred, with one example case each."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if r.cls in ("pass", "refused_by_design"):
            continue
        key = re.sub(r"\b(node|input|output) '[^']*'", r"\1 '…'", r.message.splitlines()[0] if r.message else "")
        key = re.sub(r"(?<![A-Za-z_])\d+", "N", key)[:160]
        groups[f"{r.cls}/{r.stage or '-'}: {key}"].append(r.name)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:top]
    return [(k, len(v), v[0]) for k, v in ranked]


def print_tables(results: list[CaseResult], verbose: bool) -> None:
    out = Console(highlight=False, soft_wrap=True, width=max(Console().width, 160))
    s = summary(results)
    table = Table(title=f"ONNX backend node tests through mlci (onnx {onnx.__version__})")
    table.add_column("class")
    table.add_column("cases", justify="right")
    for c in CLASSES:
        table.add_row(c, str(s["by_class"][c]))
    table.add_row("pass rate (not refused by design)",
                  f"{s['pass_rate'] * 100:.1f}% of {s['considered']}" if s["pass_rate"] is not None else "-")
    table.add_row("failures not naming their op", str(len(s["failures_not_naming_op"])))
    out.print(table)

    by_op: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        by_op[r.op][r.cls] += 1
    ops = Table(title="Operators with a case that does not pass")
    ops.add_column("op")
    for c in CLASSES:
        ops.add_column(c, justify="right")
    for op in sorted(by_op):
        counts = by_op[op]
        if verbose or any(counts[c] for c in CLASSES if c not in ("pass", "refused_by_design")):
            ops.add_row(op, *(str(counts[c] or "") for c in CLASSES))
    out.print(ops)

    groups = Table(title="Most common failures")
    groups.add_column("cases", justify="right")
    groups.add_column("failure")
    groups.add_column("e.g.")
    for key, n, example in error_groups(results):
        groups.add_row(str(n), key, example)
    out.print(groups)
    if verbose:
        for r in results:
            if r.cls == "mismatch":
                out.print(f"[mismatch] {r.name} ({r.op}): {r.message}")


def write_json(path: Path, results: list[CaseResult], meta: dict[str, Any], done: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**meta, "complete": done, "summary": summary(results),
                               "top_failures": error_groups(results),
                               "cases": [asdict(r) for r in results]}, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", default=[], help="Cases whose name contains this (repeatable).")
    parser.add_argument("--exclude", action="append", default=[], help="Skip cases whose name contains this.")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="Cases at once (one thread each).")
    parser.add_argument("--timeout", type=float, default=120.0, help="Seconds per case.")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="Address-space cap per case (0: none).")
    parser.add_argument("--limit", type=int, default=0, help="At most this many cases.")
    parser.add_argument("--mcpu", default=None, help="Build for this LLVM CPU (default: the host's).")
    parser.add_argument("--no-freeze", dest="freeze", action="store_false",
                        help="Feed shape-setting inputs at run time as the suite writes them (see PARAMETER_INPUTS).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    from mlci.targets import detect_host_target

    tvm_target = {**detect_host_target(), "num-cores": 1}
    if args.mcpu:
        tvm_target["mcpu"] = args.mcpu
    cases = collect()
    ops = primary_ops(cases)
    cases = [c for c in cases if (not args.only or any(o in c.name for o in args.only))
             and not any(x in c.name for x in args.exclude)]
    if args.limit:
        cases = cases[:args.limit]
    meta = {"benchmark": "onnx_conformance", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "onnx": onnx.__version__, "tvm_target": tvm_target, "jobs": args.jobs, "timeout_s": args.timeout,
            "memory_gb": args.memory_gb, "cpu_threads_per_case": 1,
            "parameters_frozen": args.freeze}
    results: list[CaseResult] = []
    runnable = []
    for case in cases:
        why = refusal(case.model)
        if why is None:
            runnable.append(case)
        else:
            results.append(CaseResult(case.name, ops[case.name], "refused_by_design", message=why))
    err.print(f"{len(cases)} cases ({len(results)} refused by design), {args.jobs} at a time, "
              f"target {tvm_target}")
    start = time.monotonic()
    last_write = [0.0]

    def on_result(result: CaseResult) -> None:
        results.append(result)
        if args.verbose or result.cls not in ("pass",):
            err.print(f"[{len(results)}/{len(cases)}] {result.cls:<11} {result.name}: {result.message[:200]}")
        if time.monotonic() - last_write[0] > 10:
            write_json(args.out, results, meta, done=False)
            last_write[0] = time.monotonic()

    run_all(runnable, ops, args, tvm_target, on_result)
    results.sort(key=lambda r: r.name)
    meta["seconds"] = round(time.monotonic() - start, 1)
    write_json(args.out, results, meta, done=True)
    print_tables(results, args.verbose)
    err.print(f"{meta['seconds']:.0f} s; JSON in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
