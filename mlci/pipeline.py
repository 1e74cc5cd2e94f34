"""The one chain from an ONNX file to a checked, measured build:
load -> import -> tune -> build -> check -> measure.

`mlci run`, `mlci doctor`, the benchmarks in ``bench/`` and the tests all go
through this module, so what a benchmark measures is what `mlci run` ships.
Each stage returns a typed artifact that the next one takes:

    PreparedModel -> Imported -> (TuningOutcome) -> Compiled -> Checked -> Measured

A stage that fails raises ModelError with the results-file status of that
stage (an unexpected exception inside a stage is mapped to it too), carrying
what the chain had produced so far in ``partial``. `Pipeline.evaluate` runs a
whole model and never raises for a model's own failure: it returns an
`Evaluation` saying how far the model got.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mlci import build_cache, interrupt, measure, remote_cache, schedules, tuning
from mlci import compile as tvm_compile
from mlci.compile import BuildChoice
from mlci.config import (
    Config,
    ConfigError,
    GateConfig,
    MeasureConfig,
    ModelConfig,
    NumericsConfig,
    TuningConfig,
    relative_to_root,
)
from mlci.models import ModelError, PreparedModel, prepare_model
from mlci.results import CompileInfo, Execution, KernelProfile, PeerInfo, Status
from mlci.stats import faster_backend, speedup, summarize
from mlci.targets import ResolvedTarget, foreign_arch, machine_arch, tvm_target_object

log = logging.getLogger("mlci")

QUICK_TIMING = dict(warmup=2, samples=8, min_sample_ms=2.0, max_seconds=3.0)
"""Timing for the tuned-or-default decision: enough to see a real difference, cheap next to a build."""


# --- settings ---------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """Everything the chain needs to know about one model, resolved once (`resolve`): the
    command line wins over the model's own keys, which win over the config's sections.
    The defaults are the config's."""

    trials: int = TuningConfig.trials
    """Tuning trials for the whole model, spread over its kernels."""
    seconds: float = TuningConfig.seconds
    """Wall-clock cap on tuning."""
    trials_per_round: int = TuningConfig.trials_per_round
    atol: float = NumericsConfig.atol
    rtol: float = NumericsConfig.rtol
    threshold: float = GateConfig.threshold
    """Relative change that counts as a regression or improvement."""
    seed: int = MeasureConfig.seed
    """Seeds the generated inputs and the search."""
    progressive: bool = False
    """Spend `trials` new trials every run where the estimated remaining gain is largest (the cache
    converges over commits at a fixed cost per commit), instead of tuning each kernel up to a share
    of `trials` once."""

    @classmethod
    def resolve(cls, config: Config, model: ModelConfig, *, trials: int | None = None,
                seconds: float | None = None, progressive: bool = False) -> ModelSettings:
        def pick(*values: Any) -> Any:
            return next(v for v in values if v is not None)

        return cls(
            trials=pick(trials, model.trials, config.tuning.trials),
            seconds=seconds or model.seconds or config.tuning.seconds,
            trials_per_round=config.tuning.trials_per_round,
            atol=pick(model.atol, config.numerics.atol),
            rtol=pick(model.rtol, config.numerics.rtol),
            threshold=pick(model.threshold, config.gate.threshold),
            seed=config.measure.seed,
            progressive=progressive,
        )


def run_prepare(config: Config) -> None:
    """The config's `prepare` command (e.g. export models), run from the config's directory."""
    if not config.prepare:
        return
    try:
        proc = subprocess.run(config.prepare, cwd=config.root, capture_output=True, text=True)
    except OSError as exc:
        raise ConfigError(config.path, [f"prepare: cannot start {config.prepare[0]!r}: {exc}"]) from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ConfigError(
            config.path,
            [f"prepare: {' '.join(config.prepare)!r} exited with {proc.returncode}: " + " | ".join(tail)],
        )


# --- artifacts ----------------------------------------------------------------------


@dataclass
class Imported:
    """A model in Relax with its weights bound, and the kernels MetaSchedule can tune."""

    prepared: PreparedModel
    mod: Any
    """The Relax IRModule."""
    kernels: list[tuning.Kernel]
    seconds: float


@dataclass
class Compiled:
    """What load -> import -> tune -> build produced; on a failure, as far as it got."""

    prepared: PreparedModel | None = None
    imported: Imported | None = None
    tuning: tuning.TuningOutcome | None = None
    executable: Any = None
    """The Relax executable, tuned schedules applied (loaded from `library` when there is one)."""
    library: Path | None = None
    """The exported library the executable runs from; None when it runs from memory (no device here)."""
    build_cached: bool = False
    """The build came from the build cache: this model, records and compiler were built before."""
    build_seconds: float | None = None
    build_report: tvm_compile.BuildReport | None = None
    """How each kernel was scheduled."""
    build_choice: BuildChoice | None = None
    """The tuned build against default schedules only, when both were timed."""

    def compile_info(self) -> CompileInfo | None:
        if self.build_seconds is None:
            return None
        report = self.build_report
        return CompileInfo(
            seconds=round(self.build_seconds, 3),
            import_seconds=round(self.imported.seconds, 3) if self.imported else None,
            kernels=len(self.imported.kernels) if self.imported else None,
            kernels_tuned=len(report.tuned) if report else None,
            kernels_default=len(report.default) if report else None,
            fallbacks=dict(report.fallbacks) if report else {},
            kernels_kept_default=len(report.kept_default) if report else None,
            build=self.build_choice.kept if self.build_choice else ("tuned" if report else None),
            tuned_build_ms=self.build_choice.tuned_ms if self.build_choice else None,
            default_build_ms=self.build_choice.default_ms if self.build_choice else None,
            build_cached=self.build_cached,
        )


@dataclass
class Reference:
    """ONNX Runtime as the numerics reference, or why there is none."""

    model: measure.OrtModel | None
    problem: str | None = None
    is_peer: bool = False
    """The reference runs the model as written, so its session doubles as the CPU peer."""


@dataclass
class Checked:
    """The build loaded on its device, run once on seeded inputs and compared with ONNX Runtime."""

    compiled: Compiled
    model: measure.TvmModel | None
    """None when the build ran under emulation (nothing here to time)."""
    reference: Reference
    inputs: dict[str, np.ndarray]
    input_names: list[str]
    numerics: measure.NumericsReport

    def tvm_timer(self) -> Callable[[], Any]:
        assert self.model is not None, "an emulated build is never timed"
        return self.model.timer(self.inputs, self.input_names)


@dataclass
class Measured:
    """Latency samples in ms per call: TVM, ONNX Runtime, and with A/B the base's, paired with TVM's."""

    tvm_ms: list[float]
    ort_ms: list[float]
    base_ms: list[float] | None = None
    rounds: int = 1
    """A/B rounds: more than one when an unsettled cell was measured again."""
    ort_threads: int | None = None
    ort_provider: str | None = None
    """The execution provider ONNX Runtime was timed on (None: not timed) ..."""
    peer_note: str | None = None
    """... and why not."""
    head_profile: KernelProfile | None = None
    """Per-kernel time of the head build, taken when the A/B samples say it got slower ..."""
    base_profile: KernelProfile | None = None
    """... and of the base build then."""

    def peer_info(self) -> PeerInfo:
        if not self.ort_ms:
            return PeerInfo(onnxruntime_median_ms=None, note=self.peer_note or "ONNX Runtime was not timed")
        ort_median = summarize(self.ort_ms).median
        ratio = speedup(ort_median, summarize(self.tvm_ms).median)
        faster, faster_by = faster_backend(ratio) or (None, None)
        return PeerInfo(
            onnxruntime_median_ms=ort_median,
            onnxruntime_samples=[round(s, 6) for s in self.ort_ms],
            speedup=ratio,
            threads=self.ort_threads,
            faster=faster,
            faster_by=faster_by,
            provider=self.ort_provider,
        )


@dataclass
class Evaluation:
    """One model through the whole chain: how far it got, and every artifact on the way."""

    status: Status = Status.OK
    error: str | None = None
    compiled: Compiled = field(default_factory=Compiled)
    checked: Checked | None = None
    measured: Measured | None = None


class Progress(Protocol):
    """Where the chain says what it is doing (the terminal's progress bars, or nothing)."""

    def stage(self, model: str, text: str) -> None: ...

    def trials(self, model: str, done: int, total: int, kernel: str) -> None: ...


class Silent:
    def stage(self, model: str, text: str) -> None:
        pass

    def trials(self, model: str, done: int, total: int, kernel: str) -> None:
        pass


BaseModelFor = Callable[["Compiled"], "measure.TvmModel | None"]
"""Given the head's build, the base commit's build of the same model to measure it against (A/B)."""


@contextlib.contextmanager
def _stage(status: Status, what: str, partial: Compiled | None = None) -> Iterator[None]:
    """An unexpected exception inside a stage becomes that stage's failure; every ModelError
    leaving the stage carries what the chain had produced so far. A stopping signal received on
    the way ends the run here, whatever TVM made of it inside (`interrupt.check`)."""
    try:
        interrupt.check()
        yield
        interrupt.check()
    except ModelError as exc:
        interrupt.check()
        if partial is not None and exc.partial is None:
            exc.partial = partial
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        interrupt.check()
        log.error("unexpected error while %s:\n%s", what, "".join(traceback.format_exception(exc)))
        error = ModelError(status, f"unexpected error while {what}: {type(exc).__name__}: {exc}")
        error.partial = partial
        raise error from exc


INTERFACE_FILE = "interface.json"


def library_interface(prepared: PreparedModel) -> dict[str, list[dict[str, Any]]]:
    """Name, dtype and shape of each input and output, in the order the library's `main` takes and
    returns them (-1: a dimension the model leaves open); `mlci.serving` reads it."""
    import onnx

    inputs = [{"name": s.name, "dtype": np.dtype(s.dtype).name, "shape": list(s.shape)} for s in prepared.inputs]
    graph = prepared.folded.graph
    try:  # the declared output shapes may still name dimensions that the bound inputs fix
        graph = onnx.shape_inference.infer_shapes(prepared.folded).graph
    except Exception as exc:  # e.g. over 2 GB, or an operator the inference does not know
        log.info("%s: output shapes not inferred (%s)", prepared.name, exc)
    outputs = []
    for value in graph.output:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        # A tensor output's type is always declared (the checker requires it); a sequence's is not a tensor's.
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type) if tensor.elem_type else np.dtype(object)
        outputs.append({"name": value.name, "dtype": np.dtype(dtype).name, "shape": dims})
    return {"inputs": inputs, "outputs": outputs}


def profile_pair(head: measure.TvmModel, base: measure.TvmModel, inputs: dict[str, np.ndarray], names: list[str],
                 label: str) -> tuple[KernelProfile | None, KernelProfile | None]:
    """Per-kernel time of the head and the base build, (head, base); (None, None) and one warning
    naming `label` when profiling fails: it only explains a slowdown, no verdict depends on it."""
    try:
        base_profile, head_profile = measure.profile_kernels([base, head], inputs, names)
        return head_profile, base_profile
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        log.warning("%s: could not time its kernels one by one (%s: %s); the report names no kernels",
                    label, type(exc).__name__, _error_line(exc))
        return None, None


def _error_line(exc: BaseException) -> str:
    """The message of an error, without the C++ traceback TVM puts before it."""
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else ""


# --- the chain ----------------------------------------------------------------------------


def target_device(target: ResolvedTarget) -> Any:
    """The device a target's builds run on here (`.exist` says whether this machine has it)."""
    import tvm

    return tvm.device("cpu" if target.kind == "llvm" else target.kind, 0)


def hardware_missing(target: ResolvedTarget) -> str | None:
    """Why this machine cannot run the target's builds natively (None: it can): an LLVM target for
    another CPU architecture, or a device kind with no device here."""
    arch = foreign_arch(target)
    if arch is not None:
        return f"no {arch} CPU on this {machine_arch()} runner"
    if not target_device(target).exist:
        return f"no {target.kind} device on this runner"
    return None


class Emulator(Protocol):
    """Runs a cross-compiled library under user-mode emulation: outputs only, never timed."""

    description: str
    """What runs the build, for the results (e.g. ``qemu-aarch64``)."""

    def run(self, library: Path, input_sets: list[dict[str, np.ndarray]],
            input_names: list[str]) -> list[list[np.ndarray]]: ...


class Pipeline:
    """The chain on one target, with the tuning cache and device its models share.

    On a runner without the target's hardware (`missing_hardware`), the chain still builds and
    exports every model (the portability gate), with what the tuning cache holds and nothing
    searched; with an `emulator` it checks numerics under emulation; it never measures."""

    def __init__(self, target: ResolvedTarget, cache: tuning.TuningCache, *, log_dir: Path,
                 progress: Progress | None = None, root: Path | None = None,
                 remote: remote_cache.RemoteCache | None = None,
                 emulator: Emulator | None = None, cross_cc: str | None = None,
                 emulation_problem: str | None = None):
        self.target = target
        self.missing_hardware = hardware_missing(target)
        """Why the target's builds cannot run here (None: they can)."""
        self.emulator = emulator if self.missing_hardware else None
        self.emulation_problem = emulation_problem
        """Why the builds are not checked under emulation when the hardware is missing, if known."""
        self.cross_cc = cross_cc
        """The compiler that links the target's libraries when this machine's cannot (another CPU)."""
        self.tvm_target = tvm_target_object(target)
        self.cache = cache
        self.log_dir = log_dir
        """MetaSchedule's logs go to log_dir/MODEL."""
        self.progress = progress or Silent()
        self.root = root
        """Paths in messages are shown relative to this directory."""
        self.remote = remote
        """The tuning cache's second level on S3 (None: the local cache only)."""
        self.threads = measure.use_threads(target.threads)
        """CPU threads of TVM's runtime here, of the tuning runner and of ONNX Runtime."""
        self.default_schedule = schedules.default_schedule_for(self.tvm_target, self.threads)
        """Schedules kernels with no tuned record (None: the target's own defaults)."""
        tuning.load_tensor_intrinsics_for(self.tvm_target)

    @property
    def device(self) -> Any:
        return target_device(self.target)

    @property
    def native(self) -> bool:
        """Whether the target's builds run on this machine (tuned, checked and timed here)."""
        return self.missing_hardware is None

    @property
    def execution(self) -> Execution:
        if self.native:
            return Execution.NATIVE
        return Execution.EMULATED if self.emulator is not None else Execution.COMPILE_ONLY

    @property
    def execution_note(self) -> str | None:
        """One line for the results: what a runner without the hardware did instead."""
        if self.native:
            return None
        if self.emulator is not None:
            return f"{self.missing_hardware}: cross-compiled; numerics under {self.emulator.description}, not timed"
        why = f"; numerics not checked: {self.emulation_problem}" if self.emulation_problem else ""
        built = "cross-compiled" if foreign_arch(self.target) else "compiled"
        return f"{self.missing_hardware}: {built}, not run{why}"

    def require_device(self) -> Any:
        device = self.device
        if self.missing_hardware is not None and device.exist:  # a CPU of another architecture
            raise ModelError(Status.RUN_FAILED, f"compiled for {self.target.tvm_target.get('mtriple')}: "
                             f"{self.missing_hardware}")
        if not device.exist:
            kind = self.target.kind
            raise ModelError(
                Status.RUN_FAILED,
                f"compiled for {kind}, but no {kind} device is visible on this machine: not tuned, checked or "
                "measured (run this target on a runner that has one)",
            )
        return device

    # load and import

    def load(self, model: ModelConfig, label: str = "") -> PreparedModel:
        """Read and check the ONNX file, bind its input shapes, fold it, hash it."""
        self.progress.stage(model.name, f"loading{label}")
        with _stage(Status.IMPORT_FAILED, "loading the model"):
            return prepare_model(model)

    def import_model(self, prepared: PreparedModel, label: str = "") -> Imported:
        """Import into Relax and find the kernels MetaSchedule can tune."""
        self.progress.stage(prepared.name, f"importing{label}")
        start = time.monotonic()
        with _stage(Status.IMPORT_FAILED, "importing into Relax", Compiled(prepared=prepared)):
            mod = tvm_compile.import_relax(prepared)
            fused = tvm_compile.fuse_for_tuning(mod, self.tvm_target)
            kernels = tuning.extract_kernels(fused, self.tvm_target)
        return Imported(prepared, mod, kernels, time.monotonic() - start)

    def load_and_import(self, model: ModelConfig, label: str = "") -> Imported:
        return self.import_model(self.load(model, label), label)

    # tune and build

    def tune(self, imported: Imported, settings: ModelSettings, label: str = "",
             only: set[str] | frozenset[str] | None = None) -> tuning.TuningOutcome:
        """Search what the budget still owes each kernel, through the shared tuning cache. With no
        device to measure candidates on, nothing is searched: the build uses what is cached.

        With `only` (kernel keys), only those kernels are searched, pulled and pushed (a shard of
        the run); the budget is still planned over all of the model's kernels."""
        name = imported.prepared.name
        trials = settings.trials if self.native else 0
        self.progress.stage(name, f"tuning{label}")
        with _stage(Status.TUNE_FAILED, "tuning"), self.cache.lock():
            pulled, before = None, None
            if self.remote is not None:  # what other runners searched is not searched again
                wanted = [k for k in imported.kernels if only is None or k.key in only]
                pulled = remote_cache.pull(self.cache, wanted, self.remote, max_trials=settings.trials)
                before = self.cache.ledger()
            outcome = tuning.tune(
                imported.kernels,
                self.tvm_target,
                self.cache,
                trials=trials,
                seconds=settings.seconds,
                per_round=settings.trials_per_round,
                log_dir=self.log_dir / name,
                threads=self.threads,
                seed=settings.seed,
                progressive=settings.progressive,
                default_schedule=self.default_schedule,
                on_progress=lambda done, total, kernel: self.progress.trials(name, done, total, kernel),
                only=only,
            )
            if self.remote is not None and pulled is not None:
                remote_cache.push(self.cache, wanted, self.remote, before)
                outcome.kernels_from_remote = len(pulled.kernels_from_remote)
            return outcome

    def no_candidate_ran(self, outcome: tuning.TuningOutcome) -> ModelError | None:
        """Tuning that measured candidates of which none built and ran is broken (a compiler or runner
        problem), not merely unlucky: the error names the logs."""
        if not outcome.trials_new or outcome.trials_valid_new:
            return None
        logs = relative_to_root(self.log_dir, self.root) if self.root else self.log_dir
        return ModelError(Status.TUNE_FAILED, f"0 of {outcome.trials_new} tuning candidates built and ran; see {logs}")

    def build(self, imported: Imported) -> tuple[Any, tvm_compile.BuildReport, float]:
        """The executable with the best cached schedule of every kernel, how each kernel was
        scheduled, and the seconds it took."""
        start = time.monotonic()
        with _stage(Status.COMPILE_FAILED, "compiling"):
            executable, report = tvm_compile.build(imported.mod, self.tvm_target, self.cache.database,
                                                   self.default_schedule,
                                                   self.cache.slower_than_default(imported.kernels))
        return executable, report, time.monotonic() - start

    def build_key(self, imported: Imported) -> str:
        """What the build of this model depends on, hashed (see `mlci.build_cache`)."""
        prepared = imported.prepared
        return build_cache.build_key(
            model=hashlib.sha256(prepared.folded.SerializeToString()).hexdigest(),
            inputs=[(spec.name, list(spec.shape), str(spec.dtype)) for spec in prepared.inputs],
            target=str(self.tvm_target),
            threads=self.threads,
            records={kernel.key: self.cache.best_record_json(kernel) for kernel in imported.kernels},
            keep_default=sorted(self.cache.slower_than_default(imported.kernels)),
        )

    def tune_and_build(self, imported: Imported, settings: ModelSettings, label: str = "") -> Compiled:
        """Tune, then build, unless the build cache holds this exact build already (a device to
        run on is needed either way: the cache keeps only builds checked never worse on one)."""
        name = imported.prepared.name
        compiled = Compiled(prepared=imported.prepared, imported=imported)
        with _stage(Status.TUNE_FAILED, "tuning", compiled):
            compiled.tuning = self.tune(imported, settings, label)
        error = self.no_candidate_ran(compiled.tuning)
        if error is not None:
            error.partial = compiled
            raise error
        key = None
        if self.native:
            with _stage(Status.COMPILE_FAILED, "looking up the build cache", compiled):
                key = self.build_key(imported)
                cached = self.cache.builds.get(key)
            if cached is not None:
                self.progress.stage(name, f"loading the cached build{label}")
                with _stage(Status.COMPILE_FAILED, "loading the cached build", compiled):
                    self.load_cached(compiled, cached)
                return compiled
        self.progress.stage(name, f"compiling{label}")
        with _stage(Status.COMPILE_FAILED, "compiling", compiled):
            compiled.executable, compiled.build_report, compiled.build_seconds = self.build(imported)
            if key is not None:
                self.load_exported(compiled)
        if compiled.build_report.tuned and self.default_schedule is not None and self.native:
            self.progress.stage(name, f"checking the tuned build is faster{label}")
            with _stage(Status.COMPILE_FAILED, "comparing with default schedules", compiled):
                self.never_worse(compiled, settings)
        if key is not None and compiled.library is not None:
            with _stage(Status.COMPILE_FAILED, "filing the build in the build cache", compiled):
                compiled.library = self.cache.builds.put(
                    key, name, compiled.library, compiled.build_report, compiled.build_choice,
                    compiled.build_seconds or 0.0)
        return compiled

    def load_exported(self, compiled: Compiled) -> None:
        """Export the executable to a library and run that: the code that ships, compiled to machine
        code once (running the executable itself would compile it again, in memory)."""
        start = time.monotonic()
        stale = compiled.library
        compiled.library = tvm_compile.export_library(compiled.executable, self.cache.builds.staging_path())
        compiled.executable = tvm_compile.load_library(compiled.library)
        if stale is not None:
            stale.unlink(missing_ok=True)  # a build replaced by a faster one
        compiled.build_seconds = (compiled.build_seconds or 0.0) + time.monotonic() - start

    def load_cached(self, compiled: Compiled, cached: build_cache.CachedBuild) -> None:
        start = time.monotonic()
        compiled.executable = tvm_compile.load_library(cached.library)
        compiled.library = cached.library
        compiled.build_report, compiled.build_choice = cached.report, cached.choice
        compiled.build_cached = True
        compiled.build_seconds = time.monotonic() - start

    def never_worse(self, compiled: Compiled, settings: ModelSettings) -> None:
        """Keep the build with default schedules only when it times faster than the tuned one
        (tuned kernels can lose together what each won alone, e.g. to cache pressure)."""
        imported = compiled.imported
        assert imported is not None
        start = time.monotonic()
        default_exe, default_report = tvm_compile.build(
            imported.mod, self.tvm_target, tvm_compile.empty_database(), self.default_schedule)
        device = self.require_device()
        inputs = measure.make_inputs(imported.prepared.inputs, settings.seed)
        names = [s.name for s in imported.prepared.inputs]
        tuned_model = measure.TvmModel(compiled.executable, device)
        default_model = measure.TvmModel(default_exe, device)
        default_ms, tuned_ms = measure.time_interleaved(
            default_model.timer(inputs, names), tuned_model.timer(inputs, names), sync=tuned_model.sync,
            **QUICK_TIMING)
        choice = BuildChoice(tuned_ms=summarize(tuned_ms).median, default_ms=summarize(default_ms).median)
        compiled.build_choice = choice
        if choice.kept == "default":
            log.warning("%s: the build with default schedules ran faster than the tuned one (%.3f vs %.3f ms); "
                        "keeping it", imported.prepared.name, choice.default_ms, choice.tuned_ms)
            compiled.executable, compiled.build_report = default_exe, default_report
        compiled.build_seconds = (compiled.build_seconds or 0.0) + time.monotonic() - start
        if choice.kept == "default" and compiled.library is not None:
            self.load_exported(compiled)  # the library filed and shipped is the one kept

    def compile(self, model: ModelConfig, settings: ModelSettings, label: str = "",
                same_as: Compiled | None = None) -> Compiled:
        """load -> import -> tune -> build. Raises ModelError (with ``partial``) at the failing stage.

        When the file holds the same bytes as the model `same_as` was built from, that build is
        returned: the same bytes build the same code from the same tuning cache."""
        prepared = self.load(model, label)
        if same_as is not None and same_as.prepared is not None and same_as.prepared.sha256 == prepared.sha256:
            return same_as
        return self.tune_and_build(self.import_model(prepared, label), settings, label)

    def export(self, compiled: Compiled, out_dir: Path) -> tuple[Path, Path]:
        """The tuning records of the model's kernels and the compiled library (run artifacts), and
        what the library takes and returns (``interface.json``, which makes it an MLflow model)."""
        assert compiled.imported is not None and compiled.executable is not None
        out_dir.mkdir(parents=True, exist_ok=True)
        records = out_dir / "tuning_records.json"
        self.cache.export_records(compiled.imported.kernels, records)
        library = out_dir / f"{compiled.imported.prepared.name}.so"
        arch = foreign_arch(self.target)
        if arch is not None and self.cross_cc is None:
            raise ModelError(Status.COMPILE_FAILED, f"cannot link the {arch} library here: "
                             f"{self.emulation_problem or 'no cross compiler for ' + arch}")
        if compiled.library is not None:
            shutil.copyfile(compiled.library, library)
        else:
            tvm_compile.export_library(compiled.executable, library, cc=self.cross_cc)
            if not self.native:
                compiled.library = library
        interface = library_interface(compiled.imported.prepared)
        (out_dir / INTERFACE_FILE).write_text(json.dumps(interface, indent=1) + "\n", encoding="utf-8")
        return records, library

    # check and measure

    def load_on_device(self, compiled: Compiled) -> measure.TvmModel:
        with _stage(Status.RUN_FAILED, "loading the model on its device"):
            return measure.TvmModel(compiled.executable, self.require_device())

    def check(self, compiled: Compiled, settings: ModelSettings) -> Checked:
        """Run the build and ONNX Runtime on the same inputs and compare every output: the
        config's input files, or seeded inputs; always at least two different sets, so the check
        can tell when the outputs do not depend on the inputs. Measuring uses the first set."""
        prepared = compiled.prepared
        assert prepared is not None
        self.progress.stage(prepared.name, "checking numerics")
        with _stage(Status.RUN_FAILED, "running the model"):
            model = self.load_on_device(compiled)
            reference, input_sets, input_names, expected = self._reference_outputs(prepared, settings)
            got = [model.run(inputs, input_names) for inputs in input_sets]
        numerics = self._compare(prepared, reference, got, expected, settings)
        return Checked(compiled, model, reference, input_sets[0], input_names, numerics)

    def _compare(self, prepared: PreparedModel, reference: Reference, got: list[list[np.ndarray]],
                 expected: list[list[np.ndarray]] | None, settings: ModelSettings) -> measure.NumericsReport:
        if expected is None or reference.model is None:
            why = reference.problem or "no reference"
            log.warning("%s: numerics not checked: %s", prepared.name, why)
            return measure.NumericsReport.unchecked(why, settings.atol, settings.rtol, len(got))
        numerics = measure.compare_sets(got, expected, reference.model.output_names, settings.atol, settings.rtol)
        if numerics.vacuous:
            log.warning("%s: %s", prepared.name, numerics.vacuous)
        return numerics

    def _reference_outputs(self, prepared: PreparedModel, settings: ModelSettings) -> tuple[
            Reference, list[dict[str, np.ndarray]], list[str], list[list[np.ndarray]] | None]:
        """ONNX Runtime on the input sets numerics checks (the config's files, or seeded inputs, and
        at least two sets), the sets, the input names and ONNX Runtime's outputs for each (None when
        ONNX Runtime cannot run the model: the Reference says why)."""
        input_sets = list(prepared.input_sets) or [measure.make_inputs(prepared.inputs, settings.seed)]
        if len(input_sets) < 2:
            input_sets.append(measure.make_inputs(prepared.inputs, settings.seed + 1))
        input_names = [s.name for s in prepared.inputs]
        if prepared.reference is None:
            return Reference(None, prepared.no_reference), input_sets, input_names, None
        try:
            model = measure.OrtModel.load(prepared.reference, self.threads, weights_dir=prepared.weights_dir)
            expected = [model.run(inputs) for inputs in input_sets]
        except Exception as exc:  # ONNX Runtime lacks a kernel, or fails on these shapes: TVM's outputs stand alone
            why = f"ONNX Runtime cannot run the model: {_error_line(exc)[:400]}"
            log.info("%s: %s\n%s", prepared.name, why, "".join(traceback.format_exception(exc)))
            return Reference(None, why), input_sets, input_names, None
        return Reference(model, None, prepared.peer is prepared.reference), input_sets, input_names, expected

    def check_emulated(self, compiled: Compiled, settings: ModelSettings) -> Checked:
        """`check` for a build whose CPU this machine lacks: the exported library runs under the
        emulator on the same input sets; ONNX Runtime runs here. Outputs only: nothing is timed."""
        prepared = compiled.prepared
        assert prepared is not None and compiled.library is not None and self.emulator is not None
        self.progress.stage(prepared.name, f"checking numerics under {self.emulator.description}")
        with _stage(Status.RUN_FAILED, f"running the model under {self.emulator.description}"):
            reference, input_sets, input_names, expected = self._reference_outputs(prepared, settings)
            got = self.emulator.run(compiled.library, input_sets, input_names)
        numerics = self._compare(prepared, reference, got, expected, settings)
        numerics.emulated = True
        return Checked(compiled, None, reference, input_sets[0], input_names, numerics)

    def peer(self, checked: Checked) -> tuple[measure.OrtModel | None, str | None]:
        """ONNX Runtime on this target's kind of device, or None and why not: the numerics
        reference on the CPU doubles as the peer of a CPU target; a CUDA target's peer is a
        second session on ONNX Runtime's CUDA provider."""
        provider, note = measure.peer_provider(self.target.kind, measure.available_providers())
        if provider is None:
            return None, note
        reference = checked.reference
        if reference.model is not None and reference.is_peer and provider == reference.model.provider:
            return reference.model, None
        prepared = checked.compiled.prepared
        assert prepared is not None
        if prepared.peer is None:
            return None, f"{prepared.no_reference or 'ONNX Runtime cannot run the model'}: not compared"
        try:
            return measure.OrtModel.load(prepared.peer, self.threads, provider, weights_dir=prepared.weights_dir), None
        except Exception as exc:  # the peer is a comparison, never a reason to fail the model
            return None, f"ONNX Runtime's {provider} could not run the model ({_error_line(exc)[:300]}): not compared"

    def measure(
        self,
        checked: Checked,
        timing: MeasureConfig,
        *,
        base: measure.TvmModel | None = None,
        settled: Callable[[list[float], list[float]], bool] = lambda base, head: True,
        max_rounds: int = 1,
        profile_if: Callable[[list[float], list[float]], bool] | None = None,
    ) -> Measured:
        """TVM and ONNX Runtime by the same harness; with `base`, the base build and the head
        interleaved in rounds until `settled` says the samples decide (at most `max_rounds`), and
        when `profile_if(base, head)` says the head got slower, both builds' kernels timed one by one."""
        name = checked.compiled.prepared.name if checked.compiled.prepared else ""
        self.progress.stage(name, "measuring")
        args = measure.timing_args(timing)

        def on_round(n: int) -> None:
            if n:
                self.progress.stage(name, f"re-measuring (round {n + 1})")

        with _stage(Status.RUN_FAILED, "measuring"):
            head_timer = checked.tvm_timer()
            base_ms, rounds = None, 1
            if base is not None:
                base_timer = base.timer(checked.inputs, checked.input_names)
                base_ms, tvm_ms, rounds = measure.measure_ab(
                    base_timer, head_timer, settled=settled, max_rounds=max_rounds, on_round=on_round,
                    sync=checked.model.sync, **args,
                )
            else:
                tvm_ms = measure.time_callable(head_timer, sync=checked.model.sync, **args)
            profiles: tuple[KernelProfile | None, KernelProfile | None] = (None, None)
            if base is not None and base_ms and profile_if is not None and profile_if(base_ms, tvm_ms):
                # Before ONNX Runtime runs: its threads spin on after a run, and a kernel timed
                # alone then waits milliseconds for a core.
                self.progress.stage(name, "timing each kernel (slower than the base)")
                profiles = profile_pair(checked.model, base, checked.inputs, checked.input_names, name)
            peer, note = self.peer(checked)
            ort_ms: list[float] = []
            if peer is not None:
                try:
                    ort_ms = measure.time_callable(peer.timer(checked.inputs), **args)
                except Exception as exc:  # the peer is a comparison, never a reason to fail the model
                    log.warning("%s: ONNX Runtime failed while timed: %s", name, _error_line(exc)[:300])
                    note = f"ONNX Runtime failed while timed ({_error_line(exc)[:300]}): not compared"
                    peer = None
        measured = Measured(tvm_ms, ort_ms, base_ms, rounds, ort_threads=peer.threads if peer else None,
                            ort_provider=peer.provider if peer else None, peer_note=note)
        measured.head_profile, measured.base_profile = profiles
        return measured

    def evaluate(
        self,
        model: ModelConfig,
        settings: ModelSettings,
        timing: MeasureConfig,
        *,
        out_dir: Path | None = None,
        base_model_for: BaseModelFor | None = None,
        settled: Callable[[list[float], list[float]], bool] = lambda base, head: True,
        max_rounds: int = 1,
        profile_if: Callable[[list[float], list[float]], bool] | None = None,
    ) -> Evaluation:
        """The whole chain for one model; a model's own failure ends up in the Evaluation's
        status and error. `out_dir` receives the tuning records and the library."""
        evaluation = Evaluation()
        try:
            evaluation.compiled = self.compile(model, settings)
            if out_dir is not None or not self.native:  # without the hardware, linking is part of the gate
                with _stage(Status.COMPILE_FAILED, "exporting the library"):
                    self.export(evaluation.compiled, out_dir or self.log_dir / "exported" / model.name)
            if not self.native:
                if self.emulator is not None:
                    evaluation.checked = self.check_emulated(evaluation.compiled, settings)
                    if not evaluation.checked.numerics.passed:
                        raise ModelError(Status.NUMERICS_FAILED, evaluation.checked.numerics.message)
                return evaluation
            evaluation.checked = self.check(evaluation.compiled, settings)
            numerics = evaluation.checked.numerics
            if not numerics.passed:
                raise ModelError(Status.NUMERICS_FAILED, numerics.message)
            base = base_model_for(evaluation.compiled) if base_model_for is not None else None
            evaluation.measured = self.measure(evaluation.checked, timing, base=base, settled=settled,
                                               max_rounds=max_rounds, profile_if=profile_if)
        except ModelError as exc:
            evaluation.status, evaluation.error = exc.status, str(exc)
            if exc.partial is not None:
                evaluation.compiled = exc.partial
        return evaluation
