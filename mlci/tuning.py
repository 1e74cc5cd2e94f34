"""MetaSchedule driving, budgets, and the incremental tuning cache.

The cache is one MetaSchedule JSON database per target fingerprint (workloads
are keyed by TVM's structural hash, so a kernel that did not change is found
again whatever model or layer it comes from), plus a ledger of how many trials
each kernel has already had. A run only searches what the budget still owes a
kernel: nothing for an unchanged model, only the changed kernels after an edit,
and the difference when the budget grows (the search then starts from the best
cached schedules, as MetaSchedule's evolutionary search seeds from the database).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from mlci.budget import KernelState, allocate_trials, progressive_trials, trials_to_search
from mlci.build_cache import BuildCache
from mlci.compile import lowering_config, workload_key
from mlci.results import Fingerprint, TuningInfo

MS_LOGGER = "tvm.s_tir.meta_schedule"
WARMUP_SAMPLES = 100
"""Candidates a fresh cost model sees before it ranks the search's (MetaSchedule's default)."""
COST_MODEL_FILE = "cost_model.tar"
"""MetaSchedule's XGBoost cost model and the features it was trained on, kept with the records."""
BUILDS_DIR = "builds"
"""Compiled libraries, keyed by what they were built from (`mlci.build_cache`)."""
DEFAULTS_FILE = "default_schedules.json"
"""Measured time of each kernel's rule-based default schedule, so a build never takes a tuned
record that is slower than it."""
log = logging.getLogger("mlci")
# XGBoost's notice that MetaSchedule's "model.bin" is read and written as UBJSON: expected, not the user's concern.
_XGB_FORMAT_NOTICE = r"(?s).*(UBJSON|Unknown file format)"
CHUNK_ROUNDS = 2  # the tuning deadline is checked after at most this many rounds of a kernel
# Frozen importlib frames are not files: inspect.getmodule scans every module for each.
_FROZEN_FRAMES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")


def speed_up_tensor_intrin_import() -> None:
    """Importing tvm.s_tir.tensor_intrin parses TVMScript, which calls inspect.stack();
    without this, each call scans all of sys.modules for frozen importlib frames
    (43 s -> 11 s measured on a 2-core machine)."""
    for name in _FROZEN_FRAMES:
        inspect.modulesbyfile.setdefault(name, None)  # type: ignore[arg-type]


def builder_worker_init() -> None:
    speed_up_tensor_intrin_import()


def fast_build(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default_build minus the `tensor_intrin` import that outlives the
    builder's timeout here; schedules arrive already tensorized, so nothing needs it."""
    from tvm.driver import build as tvm_build
    from tvm.ir.transform import PassContext
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with PassContext(opt_level=3, config=lowering_config(target)):
        return tvm_build(mod, target=target)


@functools.cache
def pooled_builder(max_workers: int, timeout_sec: float = 30.0) -> Any:
    """A MetaSchedule builder whose worker processes live as long as this process.

    The stock LocalBuilder starts a new pool every round (each worker importing TVM,
    about 2 s a round here), which dominates when a model has many small kernels;
    one pool shared by every model of a run pays that once.

    Candidates build in well under a second each here; one that takes half a minute is a
    pathological unrolling, not a schedule worth waiting for (a round of them used to cost
    minutes at the stock 60 s).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import _serialize_params, _worker_func
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class _PooledBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(
                max_workers=max_workers, timeout=timeout_sec, initializer=builder_worker_init
            )

        def build(self, build_inputs):
            jobs = [(fast_build, None, b.mod, b.target, _serialize_params(b.params)) for b in build_inputs]
            results = []
            for res in self.pool.map_with_error_catching(lambda job: _worker_func(*job), jobs):
                if res.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(res.value, None))
                elif res.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_sec} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {res.value}"))
            return results

    return _PooledBuilder()


@functools.cache
def shared_runner(threads: int) -> Any:
    """MetaSchedule's local runner, one per process and thread count: it starts (and checks) a
    worker process when created, about 2 s, which every model of a run would pay again. The
    worker runs candidates on `threads` threads, as the measuring process runs the build."""
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, LocalRunner

    with _environment(TVM_NUM_THREADS=str(threads)):  # the worker process inherits it when it starts
        return LocalRunner(
            timeout_sec=30,
            evaluator_config=EvaluatorConfig(number=3, repeat=1, min_repeat_ms=40, enable_cpu_cache_flush=False),
        )


def worker_threads() -> int:
    """Run inside a runner worker: the threads TVM's runtime uses there."""
    import tvm

    return int(tvm.runtime.num_threads())


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass
class Kernel:
    """One tuning task: a fused TIR function of the model."""

    name: str
    key: str
    """Structural hash of the workload: equal kernels share tuning records."""
    weight: int
    """How many times the model calls it."""
    flops: float
    task: Any = field(repr=False)

    @property
    def cost(self) -> float:
        return max(self.flops, 1.0) * self.weight


def extract_kernels(fused_mod: Any, tvm_target: Any) -> list[Kernel]:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    kernels = []
    for task in ms.relax_integration.extract_tasks(fused_mod, tvm_target):
        workload = task.dispatched[0]
        try:
            flops = float(estimate_tir_flops(workload))
        except Exception:  # data-movement kernels may have no estimate
            flops = 1.0
        kernels.append(
            Kernel(
                name=task.task_name,
                key=workload_key(workload),
                weight=int(task.weight),
                flops=flops,
                task=task,
            )
        )
    return kernels


def cache_key(fingerprint: Fingerprint) -> str:
    """Tuning records are reusable only on the same target, hardware and compiler."""
    keyed = {k: getattr(fingerprint, k) for k in ("tvm_target", "cpu", "arch", "gpu", "tvm", "tvm_ffi", "llvm")}
    # Schedules are chosen by timing them on this many threads: another count ranks them differently.
    keyed["threads"] = fingerprint.threads
    return hashlib.sha256(repr(sorted(keyed.items())).encode()).hexdigest()[:12]


def cache_directory(cache_root: Path, target_name: str, fingerprint: Fingerprint) -> Path:
    """One tuning cache per target and fingerprint: records tuned on another CPU or TVM
    version are not reused as if equal."""
    return cache_root / f"{target_name}-{cache_key(fingerprint)}"


def _read_json_map(path: Path, convert: Callable[[Any], Any]) -> dict[str, Any]:
    """A JSON object of the cache, its values through `convert`; empty when missing or damaged."""
    try:
        return {k: convert(v) for k, v in json.loads(path.read_text()).items()}
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        return {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace the file at once: a crash leaves the old one, never half of the new."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
    tmp.replace(path)


class TuningCache:
    """A directory holding one target's MetaSchedule database and the trials ledger.

    Hold `lock()` while tuning: JSON records point at workloads by line number,
    so two writers would corrupt each other.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ledger_path = self.dir / "ledger.json"
        self._database = None

    def state(self) -> tuple[tuple[str, int, int], ...]:
        """Paths, sizes and mtimes of the cache's files: did this run add anything worth saving?
        Hidden files and directories (the lock, builds being written) are scratch."""
        files = [p for p in self.dir.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(self.dir).parts)]
        return tuple(sorted((str(p.relative_to(self.dir)), st.st_size, st.st_mtime_ns)
                            for p in files for st in [p.stat()]))

    def lock(self, timeout: float = -1) -> FileLock:
        return FileLock(str(self.dir / ".lock"), timeout=timeout)

    @property
    def database(self) -> Any:
        if self._database is None:
            from tvm.s_tir import meta_schedule as ms

            self._database = ms.database.JSONDatabase(work_dir=str(self.dir))
        return self._database

    def ledger(self) -> dict[str, int]:
        """Kernel key -> trials it has had (a damaged ledger costs re-searching, never a crash)."""
        return _read_json_map(self._ledger_path, int)

    def save_ledger(self, ledger: dict[str, int]) -> None:
        _write_json_atomic(self._ledger_path, ledger)

    @property
    def cost_model_path(self) -> Path:
        return self.dir / COST_MODEL_FILE

    def load_cost_model(self, cores: int, warmup: int) -> Any:
        """MetaSchedule's XGBoost cost model with what earlier runs on this fingerprint measured, so
        the search is guided from its first round; a missing file starts a fresh model, and a
        damaged one does too, with a warning."""
        from tvm.s_tir import meta_schedule as ms

        def fresh() -> Any:
            return ms.cost_model.XGBModel(num_tuning_cores=max(1, cores), num_warmup_samples=warmup)

        model = fresh()
        if not self.cost_model_path.exists():
            return model
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_XGB_FORMAT_NOTICE)
                model.load(str(self.cost_model_path))
        except Exception as exc:  # noqa: BLE001 - a bad file costs a cold start, never the run
            log.warning("tuning cache %s: the saved cost model could not be read (%s: %s); starting a fresh one",
                        self.cost_model_path, type(exc).__name__, str(exc).strip()[:200])
            model = fresh()
        return model

    def save_cost_model(self, model: Any) -> None:
        """Written next to the records it learned from, atomically (a crash leaves the old file)."""
        if getattr(model, "booster", None) is None:
            return  # nothing learned yet
        tmp = self.cost_model_path.with_name(COST_MODEL_FILE + ".tmp")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_XGB_FORMAT_NOTICE)
                model.save(str(tmp))
            tmp.replace(self.cost_model_path)
        except Exception as exc:  # noqa: BLE001 - the records are saved; only the model's head start is lost
            log.warning("tuning cache %s: could not save the cost model (%s)", self.dir, str(exc).strip()[:200])

    def valid_records(self, kernel: Kernel, top_k: int = 1 << 30) -> list[Any]:
        """The kernel's records that built and ran, fastest first (at most `top_k`)."""
        db = self.database
        workload = kernel.task.dispatched[0]
        if not db.has_workload(workload):
            return []
        return list(db.get_top_k(db.commit_workload(workload), top_k))

    @property
    def builds(self) -> BuildCache:
        """Libraries built from these records (see `mlci.build_cache`)."""
        return BuildCache(self.dir / BUILDS_DIR)

    def best_record_json(self, kernel: Kernel) -> Any:
        """The record a build applies to the kernel (its fastest), as plain JSON; None without one."""
        from tvm.s_tir.meta_schedule import _ffi_api

        records = self.valid_records(kernel, top_k=1)
        return _plain_json(_ffi_api.TuningRecordAsJSON(records[0])) if records else None

    def default_seconds(self) -> dict[str, float]:
        """Kernel key -> measured seconds per call of its rule-based default schedule (a damaged
        file costs re-measuring, never a crash)."""
        return _read_json_map(self.dir / DEFAULTS_FILE, float)

    def save_default_seconds(self, timings: dict[str, float]) -> None:
        _write_json_atomic(self.dir / DEFAULTS_FILE, timings)

    def record_seconds(self, kernel: Kernel) -> float | None:
        """Seconds per call of the kernel's best tuned record, or None when it has none."""
        records = self.valid_records(kernel, top_k=1)
        if not records or not records[0].run_secs:
            return None
        secs = [float(x) for x in records[0].run_secs]
        return sum(secs) / len(secs)

    def slower_than_default(self, kernels: list[Kernel]) -> frozenset[str]:
        """Keys of the kernels whose default schedule measured faster than their best tuned record:
        a build keeps the default for those."""
        defaults = self.default_seconds()
        slower = set()
        for kernel in kernels:
            tuned = self.record_seconds(kernel)
            if kernel.key in defaults and tuned is not None and defaults[kernel.key] < tuned:
                slower.add(kernel.key)
        return frozenset(slower)

    def best_seconds(self, kernel: Kernel, defaults: dict[str, float] | None = None) -> float | None:
        """The kernel's best measured time per inference: its best record, or its default schedule
        where that timed faster (`defaults`, from `default_seconds`), times its calls."""
        measured = [s for s in (self.record_seconds(kernel), (defaults or {}).get(kernel.key)) if s is not None]
        return min(measured) * kernel.weight if measured else None

    def export_records(self, kernels: list[Kernel], path: Path, top_k: int = 8) -> int:
        """Write the best records of these kernels as JSON (an MLflow artifact); returns the count."""
        from tvm.s_tir.meta_schedule import _ffi_api

        entries = []
        for kernel in kernels:
            records = self.valid_records(kernel)[:top_k]
            if not records:
                continue
            entries.append(
                {
                    "kernel": kernel.name,
                    "key": kernel.key,
                    "workload": _plain_json(_ffi_api.WorkloadAsJSON(records[0].workload)),
                    "records": [_plain_json(_ffi_api.TuningRecordAsJSON(r)) for r in records],
                }
            )
        path.write_text(json.dumps(entries, default=str))
        return sum(len(e["records"]) for e in entries)


def _plain_json(obj: Any) -> Any:
    """MetaSchedule's JSON form of a record as plain Python. Its own converter rejects what a weight
    layout rewrite puts in a trace (an IndexMap); such objects are written as their TVMScript text.
    A flag is True in a record made in this process and 1 in one read back from the database: it is
    written 1 either way, so the same record has one form."""
    import tvm
    import tvm_ffi

    if isinstance(obj, bool):
        return int(obj)
    if obj is None or isinstance(obj, int | float | str):
        return obj
    if isinstance(obj, tvm.tirx.IntImm | tvm.tirx.FloatImm):
        return obj.value
    if isinstance(obj, tvm_ffi.Array | list | tuple):
        return [_plain_json(item) for item in obj]
    if isinstance(obj, tvm_ffi.Map | dict):
        return {str(_plain_json(k)): _plain_json(v) for k, v in obj.items()}
    return str(obj)


@dataclass
class TuningOutcome:
    trials_budget: int
    seconds_budget: float
    trials_new: int = 0
    trials_valid_new: int = 0
    trials_cached: int = 0
    tasks: int = 0
    tasks_from_cache: int = 0
    seconds: float = 0.0
    deadline_hit: bool = False
    planned: list[int] = field(default_factory=list)
    progressive: bool = False

    def info(self) -> TuningInfo:
        """The results file's tuning section."""
        return TuningInfo(
            trials_new=self.trials_new,
            trials_valid_new=self.trials_valid_new,
            trials_cached=self.trials_cached,
            trials_budget=self.trials_budget,
            seconds_budget=self.seconds_budget,
            tasks=self.tasks,
            tasks_from_cache=self.tasks_from_cache,
            seconds=round(self.seconds, 3),
            deadline_hit=self.deadline_hit,
            progressive=self.progressive,
        )


ProgressFn = Callable[[int, int, str], None]


def measure_defaults(kernels: list[Kernel], tvm_target: Any, default_schedule: Callable[[Any], bool], builder: Any,
                     runner: Any) -> dict[str, float]:
    """Seconds per call of each kernel's default schedule (by key), timed by the runner that times
    the tuning candidates, so the two compare; built in one batch across the builder's workers.
    A kernel it does not apply to, or that fails to build or run, is left out."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    scheduled = []
    for kernel in kernels:
        workload = kernel.task.dispatched[0]
        try:
            sch = s_tir.Schedule(workload)
            if default_schedule(sch):
                scheduled.append((kernel, sch.mod, ArgInfo.from_prim_func(workload["main"])))
        except Exception as exc:  # noqa: BLE001 - without a timing the tuned record is used, as before
            log.debug("kernel %s: no default schedule to time: %s", kernel.name, exc)
    if not scheduled:
        return {}
    device = "cpu" if tvm_target.kind.name == "llvm" else tvm_target.kind.name
    timings: dict[str, float] = {}
    try:
        built = builder.build([BuilderInput(mod, tvm_target) for _, mod, _ in scheduled])
        ready = [(kernel, args, b) for (kernel, _, args), b in zip(scheduled, built) if b.error_msg is None]
        futures = runner.run([RunnerInput(b.artifact_path, device, args) for _, args, b in ready])
        for (kernel, _, _), future in zip(ready, futures):
            result = future.result()
            if result.error_msg is None and result.run_secs:
                secs = [float(x) for x in result.run_secs]
                timings[kernel.key] = sum(secs) / len(secs)
    except Exception as exc:  # noqa: BLE001
        log.debug("timing default schedules failed: %s", exc)
    return timings


def search_strategy() -> Any:
    """Evolutionary search sized for CI budgets (tens of trials a kernel, not thousands).

    The default (population 512, 4 generations) spent 4-16 s generating each round
    of 16 candidates on 2 cores; 128 x 2 took a third of the time and found schedules
    as fast on the example CNN's largest convolution (measured in development).
    """
    from tvm.s_tir import meta_schedule as ms

    return ms.search_strategy.EvolutionarySearch(population_size=128, genetic_num_iters=2, init_min_unmeasured=50)


def _quiet_metaschedule_console() -> None:
    """MetaSchedule logs to stdout at DEBUG; keep that in its log files, not on the console.

    Its logger setup re-lists every handler of its logger by name on each call and
    crashes on an unnamed one, so unnamed handlers are dropped too (never added)."""
    logger = logging.getLogger(MS_LOGGER)
    for handler in list(logger.handlers):
        name = handler.get_name()
        if name is None or name.endswith(".console"):
            logger.removeHandler(handler)


def _progress_callback(counts: dict[str, Any]) -> Any:
    """Counts measured and valid candidates and reports progress. It never terminates a
    task itself: the scheduler terminates it again when its trials run out, which fails
    a check inside TVM (found here), so the deadline is enforced between chunks instead."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            counts["measured"] += len(runner_results)
            counts["valid"] += sum(
                1
                for b, r in zip(builder_results, runner_results)
                if b.error_msg is None and r.error_msg is None and r.run_secs
            )
            if counts.get("on_progress"):
                counts["on_progress"](counts["measured"])

    return _Progress()


def tune(
    kernels: list[Kernel],
    tvm_target: Any,
    cache: TuningCache,
    *,
    trials: int,
    seconds: float,
    per_round: int,
    log_dir: Path,
    threads: int,
    seed: int = 0,
    progressive: bool = False,
    default_schedule: Callable[[Any], bool] | None = None,
    on_progress: ProgressFn | None = None,
) -> TuningOutcome:
    """Search what the budget still owes each kernel; every record lands in the cache.
    Candidates run on `threads` threads: as many as the build will run on when measured.

    With `progressive`, `trials` new trials are searched whatever the cache holds, where the
    estimated remaining gain is largest (`budget.progressive_trials`). Each kernel searched also
    has its `default_schedule` timed once, so a build can tell whether tuning beat it."""
    start = time.monotonic()
    deadline = start + seconds
    outcome = TuningOutcome(trials_budget=trials, seconds_budget=seconds, tasks=len(kernels), progressive=progressive)
    ledger = cache.ledger()
    done_before = [max(ledger.get(k.key, 0), len(cache.valid_records(k))) for k in kernels]
    if progressive:
        defaults = cache.default_seconds()
        states = [KernelState(k.cost, d, cache.best_seconds(k, defaults)) for k, d in zip(kernels, done_before)]
        owed = progressive_trials(states, trials, per_round)
        planned = [d + o for d, o in zip(done_before, owed)]
    else:
        planned = allocate_trials([k.cost for k in kernels], trials, per_round)
        owed = trials_to_search(planned, done_before)
    outcome.planned = planned
    outcome.trials_cached = sum(min(p, d) for p, d in zip(planned, done_before))
    outcome.tasks_from_cache = sum(1 for o, d in zip(owed, done_before) if o == 0 and d > 0)
    total_owed = sum(owed)
    if on_progress:
        on_progress(0, total_owed, "")
    if total_owed == 0:
        outcome.seconds = time.monotonic() - start
        return outcome

    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    speed_up_tensor_intrin_import()
    log_dir.mkdir(parents=True, exist_ok=True)
    cores = int(tvm_target.attrs.get("num-cores", 1) or 1) if tvm_target.kind.name == "llvm" else 1
    builder = pooled_builder(max_workers=max(1, cores))
    runner = shared_runner(threads)
    # A saved model has seen every earlier run's candidates, so it guides the search from the first round.
    # A fresh one predicts at random until it has seen WARMUP_SAMPLES; guiding from the second round
    # instead made the example's cold tuning about 15% slower with no latency gain measured at 64 trials.
    cost_model = cache.load_cost_model(cores, warmup=WARMUP_SAMPLES)
    database = cache.database

    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    counts = {"measured": 0, "valid": 0}
    callbacks.append(_progress_callback(counts))
    searched_total = 0
    default_timings = cache.default_seconds()
    if default_schedule is not None:
        untimed = [k for k, o in zip(kernels, owed) if o > 0 and k.key not in default_timings]
        if untimed:
            default_timings.update(measure_defaults(untimed, tvm_target, default_schedule, builder, runner))
            cache.save_default_seconds(default_timings)
    try:
        for index, kernel in enumerate(kernels):
            need = owed[index]
            if need == 0:
                continue
            if time.monotonic() >= deadline:
                outcome.deadline_hit = True
                break
            done = 0
            # Search in chunks so the deadline is checked every couple of rounds; each chunk
            # starts from the best schedules so far (evolutionary search seeds from the database).
            chunk_no = 0
            while done < need and time.monotonic() < deadline:
                chunk = min(need - done, CHUNK_ROUNDS * per_round)
                logging.getLogger(MS_LOGGER).setLevel(logging.WARNING)
                _quiet_metaschedule_console()
                contexts, weights = extracted_tasks_to_tune_contexts(
                    [kernel.task], work_dir=str(log_dir), strategy=search_strategy(),
                    seed=seed + 1000 * index + chunk_no, num_threads=max(1, cores),
                )
                _quiet_metaschedule_console()
                if not contexts:  # already scheduled by the importer: nothing to search
                    break
                counts["measured"] = counts["valid"] = 0
                progress = (lambda measured, _base=searched_total + done, _name=kernel.name:
                            on_progress(_base + measured, total_owed, _name)) if on_progress else None
                counts["on_progress"] = progress
                ms.tune_tasks(
                    tasks=contexts,
                    task_weights=weights,
                    work_dir=str(log_dir),
                    max_trials_global=chunk,
                    max_trials_per_task=chunk,
                    num_trials_per_iter=min(per_round, chunk),
                    builder=builder,
                    runner=runner,
                    database=database,
                    cost_model=cost_model,
                    measure_callbacks=callbacks,
                    task_scheduler="round-robin",
                )
                measured = counts["measured"]
                outcome.trials_new += measured
                outcome.trials_valid_new += counts["valid"]
                done += measured
                chunk_no += 1
                if measured < chunk:  # the search space is exhausted
                    break
            searched_total += done
            cut_short = done < need and time.monotonic() >= deadline
            outcome.deadline_hit = outcome.deadline_hit or cut_short
            # A kernel whose search space ran out has had its due; one cut by the deadline
            # is credited only what it got, so a later run picks up the rest.
            ledger[kernel.key] = done_before[index] + (done if cut_short else need)
            cache.save_ledger(ledger)
    finally:
        cache.save_cost_model(cost_model)
    outcome.seconds = time.monotonic() - start
    return outcome
