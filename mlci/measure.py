"""Timing harness, ONNX Runtime reference and peer latency, numerics check.

TVM and ONNX Runtime are timed by the same harness, from the same Python
loop, with the cheapest call each offers (a VM function on prebuilt tensors;
ONNX Runtime with I/O binding), so the speedup compares the engines rather
than their Python overheads.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlci.config import MeasureConfig
from mlci.models import InputSpec
from mlci.results import KernelProfile, KernelTime, NumericsInfo

log = logging.getLogger("mlci")


def timing_args(m: MeasureConfig) -> dict[str, Any]:
    """The [measure] settings as the keyword arguments of the timing functions below."""
    return dict(warmup=m.warmup, samples=m.samples, min_sample_ms=m.min_sample_ms, max_seconds=m.max_seconds)


def use_threads(threads: int) -> int:
    """Make TVM's runtime in this process (and the processes it starts) run `threads` threads;
    returns the count TVM then reports. TVM sizes its pool once, when it is first used, from
    TVM_NUM_THREADS (by default it takes half the hardware threads on x86-64): call this before
    anything runs a compiled model. A pool already started keeps its size, which the returned
    count shows."""
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(threads)
    reported = int(tvm.runtime.num_threads())
    if reported != threads:
        log.warning("TVM's thread pool already runs %d threads; %d were asked for", reported, threads)
    return reported


def make_inputs(specs: list[InputSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs. By default: standard normal floats, random bools, and integers that index a
    table drawn across its rows (else 0 or 1, safe as any index); a config rule sets a fixed value,
    a range or a distribution instead."""
    rng = np.random.default_rng(seed)
    return {spec.name: _generate(spec, rng) for spec in specs}


def _generate(spec: InputSpec, rng: np.random.Generator) -> np.ndarray:
    rule = spec.rule
    integer = np.issubdtype(spec.dtype, np.integer)
    if spec.dtype == np.bool_:
        if rule is not None and rule.value is not None:
            return np.full(spec.shape, bool(rule.value))
        return rng.integers(0, 2, size=spec.shape).astype(np.bool_)
    if not (integer or np.issubdtype(spec.dtype, np.floating)):
        raise ValueError(f"input {spec.name!r}: cannot generate data of type {spec.dtype}")
    if rule is not None and rule.value is not None:
        return np.full(spec.shape, rule.value, dtype=spec.dtype)
    bounds = rule.range if rule is not None and rule.range is not None else spec.index_range
    if bounds is None:
        if integer:
            return rng.integers(0, 2, size=spec.shape).astype(spec.dtype)
        return rng.standard_normal(spec.shape).astype(spec.dtype)
    low, high = bounds
    if integer and np.ceil(low) >= np.ceil(high):
        raise ValueError(f"input {spec.name!r}: the range [{low}, {high}) holds no integer")
    if rule is not None and rule.distribution == "normal":
        values = np.clip(rng.normal((low + high) / 2, (high - low) / 6, size=spec.shape), low, high)
        if integer:
            values = np.minimum(np.floor(values), np.ceil(high) - 1)
    elif integer:
        values = rng.integers(int(np.ceil(low)), int(np.ceil(high)), size=spec.shape)
    else:
        values = rng.uniform(low, high, size=spec.shape)
    return values.astype(spec.dtype)


def _calls_per_sample(
    fns: list[Callable[[], Any]], warmup: int, min_sample_ms: float, sync: Callable[[], None]
) -> int:
    """Warm each callable up, time one call, and batch enough calls (the same number for
    all, sized by the slowest) that a sample lasts at least `min_sample_ms`."""
    singles = []
    for fn in fns:
        for _ in range(max(warmup, 1)):
            fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        singles.append(max(time.perf_counter() - t0, 1e-7))
    return max(1, math.ceil(min_sample_ms / 1e3 / max(singles)))


def _sample(fn: Callable[[], Any], number: int, sync: Callable[[], None]) -> float:
    """Milliseconds per call over `number` back-to-back calls."""
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / number


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int,
    samples: int,
    min_sample_ms: float,
    max_seconds: float,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Milliseconds per call, one value per sample; fast calls are batched into a sample
    lasting at least `min_sample_ms`. Stops early at `max_seconds` (keeping >= 3 samples)."""
    sync = sync or (lambda: None)
    number = _calls_per_sample([fn], warmup, min_sample_ms, sync)
    out: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(samples):
        out.append(_sample(fn, number, sync))
        if len(out) >= 3 and time.perf_counter() > deadline:
            break
    return out


def time_interleaved(
    base: Callable[[], Any],
    head: Callable[[], Any],
    *,
    warmup: int,
    samples: int,
    min_sample_ms: float,
    max_seconds: float,
    sync: Callable[[], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Paired A/B samples (ms per call): block i times base and head back to back, in
    ABBA order (base first on even blocks, head first on odd), so runner drift, a
    neighbour's burst or thermal state hits both sides of a pair alike.

    Both sides batch the same number of calls per sample. `max_seconds` caps the
    whole interleaved round (keeping >= 3 pairs)."""
    sync = sync or (lambda: None)
    number = _calls_per_sample([base, head], warmup, min_sample_ms, sync)

    def one(fn: Callable[[], Any]) -> float:
        return _sample(fn, number, sync)

    out_base: list[float] = []
    out_head: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for i in range(samples):
        if i % 2 == 0:
            out_base.append(one(base))
            out_head.append(one(head))
        else:
            out_head.append(one(head))
            out_base.append(one(base))
        if len(out_base) >= 3 and time.perf_counter() > deadline:
            break
    return out_base, out_head


def measure_ab(
    base: Callable[[], Any],
    head: Callable[[], Any],
    *,
    settled: Callable[[list[float], list[float]], bool],
    max_rounds: int,
    on_round: Callable[[int], None] = lambda n: None,
    **timing: Any,
) -> tuple[list[float], list[float], int]:
    """Interleaved rounds until `settled(base, head)` says the samples decide, at most
    `max_rounds`: an inconclusive or flagged cell gets more data before anyone decides.
    Returns both sample lists (paired by index) and the rounds used."""
    base_samples: list[float] = []
    head_samples: list[float] = []
    rounds = 0
    while rounds < max(max_rounds, 1):
        on_round(rounds)
        b, h = time_interleaved(base, head, **timing)
        base_samples += b
        head_samples += h
        rounds += 1
        if settled(base_samples, head_samples):
            break
    return base_samples, head_samples, rounds


CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def peer_provider(kind: str, available: list[str] | tuple[str, ...]) -> tuple[str | None, str | None]:
    """The ONNX Runtime execution provider that times the peer on a target of `kind`, or None and why not.

    The peer is compared with TVM on the same device: ONNX Runtime on the CPU beside a TVM build on a
    GPU would say nothing about either, so a GPU target without a matching provider gets no peer timing."""
    if kind == "llvm":
        return CPU_PROVIDER, None
    if kind == "cuda":
        if CUDA_PROVIDER in available:
            return CUDA_PROVIDER, None
        return None, ("ONNX Runtime here has no CUDA execution provider (install onnxruntime-gpu): "
                      "not compared with the CPU")
    return None, f"ONNX Runtime is not run on {kind} devices here: not compared with the CPU"


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclass
class OrtModel:
    """ONNX Runtime on the original model: the reference outputs and the peer latency."""

    session: Any
    output_names: list[str]
    threads: int
    """Intra-op threads (ONNX Runtime's own default is one per physical core)."""

    provider: str = CPU_PROVIDER
    """The execution provider the session runs on (its first)."""

    @classmethod
    def load(cls, model: bytes | str, threads: int, provider: str = CPU_PROVIDER,
             weights_dir: Path | None = None) -> OrtModel:
        """From the model's bytes (weights stored beside it are found in `weights_dir`), or its path,
        on `provider` (the CPU as the fallback for operators a GPU provider lacks)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        if weights_dir is not None:
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(weights_dir))
        providers = [provider] if provider == CPU_PROVIDER else [provider, CPU_PROVIDER]
        session = ort.InferenceSession(model, options, providers=providers)
        used = session.get_providers()[0]
        if used != provider:  # ONNX Runtime falls back to the CPU silently when a provider fails to load
            raise RuntimeError(f"ONNX Runtime did not start its {provider} (the session runs on {used})")
        return cls(session, [o.name for o in session.get_outputs()], threads, used)

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(self.output_names, inputs))

    binding_problem: str | None = None
    """Why the last `timer` could not bind inputs and outputs (it times plain runs then)."""

    def timer(self, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
        """One call on inputs and outputs already on the provider's device, as TVM's timer has them;
        where ONNX Runtime refuses the binding (an exporter declared an output's rank wrong, which
        only bound outputs are checked against), plain runs on the CPU arrays (`binding_problem`)."""
        bound = self._bound_timer(inputs)
        try:
            bound()
            bound()  # the second run meets the outputs the first allocated: a wrong declared rank fails here
            self.binding_problem = None
            return bound
        except Exception as exc:  # noqa: BLE001 - the peer is a comparison, never a reason to fail
            self.binding_problem = " ".join(str(exc).split())[:300]
            log.info("ONNX Runtime's I/O binding failed (%s): timing plain runs", self.binding_problem)
            names = self.output_names
            return lambda: self.session.run(names, inputs)

    def _bound_timer(self, inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
        import onnxruntime as ort

        binding = self.session.io_binding()
        if self.provider == CUDA_PROVIDER:
            for name, value in inputs.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
            for name in self.output_names:
                binding.bind_output(name, "cuda")
        else:
            for name, value in inputs.items():
                binding.bind_cpu_input(name, value)
            for name in self.output_names:
                binding.bind_output(name)
        return lambda: self.session.run_with_iobinding(binding)


class TvmModel:
    """A compiled Relax executable loaded in a VirtualMachine on one device."""

    def __init__(self, executable: Any, device: Any):
        from tvm import relax

        self.executable = executable
        self.device = device
        self.vm = relax.VirtualMachine(executable, device)
        self.main = self.vm["main"]

    def _args(self, inputs: dict[str, np.ndarray], names: list[str]) -> list[Any]:
        import tvm

        return [tvm.runtime.tensor(inputs[n], self.device) for n in names]

    def run(self, inputs: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
        result = self.main(*self._args(inputs, names))
        return [np.asarray(t.numpy()) for t in _flatten(result)]

    def timer(self, inputs: dict[str, np.ndarray], names: list[str]) -> Callable[[], Any]:
        args = self._args(inputs, names)
        main = self.main
        return lambda: main(*args)

    def sync(self) -> None:
        self.device.sync()


PROFILE_INFERENCES = 5
"""Inferences per build a kernel profile takes the median over: attribution needs the big movers, not fine timing."""
PROFILE_WARMUP = 2
"""Inferences run on the instrumented VM first, uncounted (memory pool, caches, other threads settling)."""
PROFILE_SECONDS = 2.0
"""Cap on profiling a pair of builds (at least one inference each is profiled)."""
VM_BUILTIN = "vm.builtin."
"""The VM's own calls (allocation, shape checks): not kernels, left out of a profile."""


class _KernelTimer:
    """A separate VirtualMachine on a build's executable whose every call is timed (the device
    synchronised before and after each, so an asynchronous GPU kernel is charged to itself). The VM
    that measured latency is never instrumented. The Python callback per call adds a few
    microseconds to every kernel alike."""

    def __init__(self, model: TvmModel, inputs: dict[str, np.ndarray], names: list[str]):
        from tvm import relax

        self.vm = relax.VirtualMachine(model.executable, model.device)
        self.main = self.vm["main"]
        self.args = model._args(inputs, names)
        self.sync = model.sync
        self.inferences: list[dict[str, list[float]]] = []
        """Per profiled inference: kernel -> [calls, seconds]."""
        self._current: dict[str, list[float]] | None = None
        self._started: list[float] = []
        self.vm.set_instrument(self._instrument)

    def _instrument(self, func: Any, symbol: str, before_run: bool, ret_value: Any, *args: Any) -> int:
        self.sync()
        now = time.perf_counter()
        if before_run:
            self._started.append(now)
        elif self._started:
            t0 = self._started.pop()
            if self._current is not None:
                entry = self._current.setdefault(symbol, [0, 0.0])
                entry[0] += 1
                entry[1] += now - t0
        return 0  # VMInstrumentReturnKind.NO_OP: run the call

    def run(self, counted: bool = True) -> None:
        self._current = {} if counted else None
        self.main(*self.args)
        self.sync()
        if self._current is not None:
            self.inferences.append(self._current)
        self._current = None

    def profile(self) -> KernelProfile:
        """Each kernel's median time per inference over the profiled inferences (a one-off stall in one
        inference does not count), slowest first."""
        names = {name for inference in self.inferences for name in inference if not name.startswith(VM_BUILTIN)}
        kernels = []
        for name in names:
            seconds = sorted(inference.get(name, [0, 0.0])[1] for inference in self.inferences)
            calls = sorted(inference.get(name, [0, 0.0])[0] for inference in self.inferences)
            kernels.append(KernelTime(name=name, calls=int(calls[len(calls) // 2]),
                                      total_us=round(float(np.median(seconds)) * 1e6, 3)))
        kernels.sort(key=lambda k: (-k.total_us, k.name))
        return KernelProfile(kernels=kernels, inferences=len(self.inferences))


def profile_kernels(models: list[TvmModel], inputs: dict[str, np.ndarray], names: list[str], *,
                    inferences: int = PROFILE_INFERENCES, warmup: int = PROFILE_WARMUP,
                    max_seconds: float = PROFILE_SECONDS) -> list[KernelProfile]:
    """Time per inference of each kernel of each build in `models` (base and head), on the same inputs.
    Their inferences alternate, as the latency harness alternates them, so that whatever else the
    machine does hits both builds alike; stops early at `max_seconds` (keeping one inference each)."""
    timers = [_KernelTimer(model, inputs, names) for model in models]
    for timer in timers:
        for _ in range(max(warmup, 1)):  # the first call of a new VM allocates its memory pool
            timer.run(counted=False)
    deadline = time.perf_counter() + max_seconds
    for i in range(max(inferences, 1)):
        for timer in timers if i % 2 == 0 else reversed(timers):
            timer.run()
        if time.perf_counter() > deadline:
            break
    return [timer.profile() for timer in timers]


def _flatten(result: Any) -> list[Any]:
    if hasattr(result, "numpy"):
        return [result]
    flat = []
    for item in result:
        flat.extend(_flatten(item))
    return flat


@dataclass
class NumericsReport:
    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    passed: bool
    message: str = ""
    input_sets: int = 1
    vacuous: str | None = None
    """Why passing proves nothing (see `input_dependence`); None when the outputs depend on the inputs."""
    emulated: bool = False
    """The build's outputs came from user-mode emulation of the target's CPU."""
    no_reference: str | None = None
    """Why nothing was compared (ONNX Runtime cannot run the model): the errors are NaN then."""

    @classmethod
    def unchecked(cls, why: str, atol: float, rtol: float, input_sets: int) -> NumericsReport:
        """The build ran, but there is nothing to compare its outputs with."""
        return cls(math.nan, math.nan, atol, rtol, passed=True, input_sets=input_sets, no_reference=why)

    def info(self) -> NumericsInfo:
        """The results file's numerics section."""
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return NumericsInfo(finite(self.max_abs_err), finite(self.max_rel_err), self.atol, self.rtol, self.passed,
                            input_sets=self.input_sets, vacuous=self.vacuous, emulated=self.emulated,
                            no_reference=self.no_reference)


VACUOUS_HINT = ("give the model real inputs (inputs_file = \"samples/x.npz\") or value rules "
                "([models.inputs.NAME] range / value), or check that its weights are real")


def input_dependence(outputs: list[list[np.ndarray]], names: list[str], atol: float, rtol: float) -> str | None:
    """None when some reference output changes, beyond the numerics tolerance, between input sets;
    otherwise why the check proves nothing: a build that ignored its inputs would pass it."""
    if len(outputs) < 2:
        return None
    first = outputs[0]
    for other in outputs[1:]:
        for a, b in zip(first, other):
            if a.shape != b.shape:
                return None
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if np.any(np.abs(a64 - b64) > atol + rtol * np.abs(a64)):
                return None
    constant = all(o.size == 0 or np.all(o == o.flat[0]) for o in first)
    what = "every element of every output is the same value" if constant and any(o.size > 1 for o in first) \
        else f"no output ({', '.join(names)}) changes beyond atol {atol:g} / rtol {rtol:g}"
    return (f"the check proves nothing: over {len(outputs)} different input sets, {what}, so a build that "
            f"ignored its inputs would pass too; {VACUOUS_HINT}")


def compare_sets(got: list[list[np.ndarray]], expected: list[list[np.ndarray]], names: list[str],
                 atol: float, rtol: float) -> NumericsReport:
    """`compare_outputs` on every input set: the worst errors over all of them, the first failing
    set named; and whether the reference's outputs depend on the inputs at all."""
    reports = [compare_outputs(g, e, names, atol, rtol) for g, e in zip(got, expected)]
    failed = next(((i, r) for i, r in enumerate(reports) if not r.passed), None)
    report = NumericsReport(
        max(r.max_abs_err for r in reports), max(r.max_rel_err for r in reports), atol, rtol,
        passed=failed is None, input_sets=len(reports),
        vacuous=input_dependence(expected, names, atol, rtol),
    )
    if failed is not None:
        index, bad = failed
        report.message = bad.message + (f" (input set {index + 1} of {len(reports)})" if len(reports) > 1 else "")
    return report


def compare_outputs(
    got: list[np.ndarray], expected: list[np.ndarray], names: list[str], atol: float, rtol: float
) -> NumericsReport:
    """numpy.isclose semantics (|got - expected| <= atol + rtol * |expected|, NaN == NaN);
    on failure the message names the worst output, its index and both values."""
    if len(got) != len(expected):
        return NumericsReport(math.inf, math.inf, atol, rtol, False,
                              f"TVM returned {len(got)} outputs, ONNX Runtime {len(expected)}")
    max_abs = max_rel = 0.0
    worst: tuple[float, str] | None = None
    for name, g, e in zip(names, got, expected):
        if g.shape != e.shape:
            return NumericsReport(math.inf, math.inf, atol, rtol, False,
                                  f"output {name!r}: shape {g.shape} from TVM, {e.shape} from ONNX Runtime")
        if g.size == 0:
            continue
        g64 = g.astype(np.float64)
        e64 = e.astype(np.float64)
        both_nan = np.isnan(g64) & np.isnan(e64)
        abs_err = np.where(both_nan, 0.0, np.abs(g64 - e64))
        abs_err = np.where(np.isnan(abs_err), np.inf, abs_err)
        with np.errstate(over="ignore"):  # a difference against 0 is an infinite relative error
            rel_err = abs_err / np.maximum(np.abs(e64), np.finfo(np.float64).tiny)
        max_abs = max(max_abs, float(abs_err.max()))
        max_rel = max(max_rel, float(np.where(abs_err == 0, 0.0, rel_err).max()))
        excess = abs_err - (atol + rtol * np.abs(e64))
        flat = int(np.argmax(excess))
        if excess.flat[flat] > 0 and (worst is None or excess.flat[flat] > worst[0]):
            index = np.unravel_index(flat, g.shape)
            worst = (
                float(excess.flat[flat]),
                f"output {name!r} at index {tuple(int(i) for i in index)}: TVM {g.flat[flat].item()!r}, "
                f"ONNX Runtime {e.flat[flat].item()!r} (abs err {abs_err.flat[flat]:.3g}, "
                f"rel err {rel_err.flat[flat]:.3g}; atol {atol:g}, rtol {rtol:g})",
            )
    if worst:
        return NumericsReport(max_abs, max_rel, atol, rtol, False, "numerics mismatch: " + worst[1])
    return NumericsReport(max_abs, max_rel, atol, rtol, True)
