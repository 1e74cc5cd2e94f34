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

import atexit
import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from mlci import interrupt, trace_check
from mlci.budget import KernelState, allocate_trials, progressive_trials, trials_to_search
from mlci.build_cache import BuildCache
from mlci.compile import lowering_config, workload_key
from mlci.results import Fingerprint, TuningInfo

MS_LOGGER = "tvm.s_tir.meta_schedule"
WARMUP_SAMPLES = 100
"""Candidates a fresh cost model sees before it ranks the search's (MetaSchedule's default)."""
COST_MODEL_FILE = "cost_model.npz"
"""MetaSchedule's XGBoost cost model and the features it was trained on, kept with the records, in arrays
only (no pickle; see `TuningCache.save_cost_model`)."""
BUILDS_DIR = "builds"
"""Compiled libraries, keyed by what they were built from (`mlci.build_cache`)."""
DEFAULTS_FILE = "default_schedules.json"
"""Measured time of each kernel's rule-based default schedule, so a build never takes a tuned
record that is slower than it."""
log = logging.getLogger("mlci")
CHUNK_ROUNDS = 2  # the tuning deadline is checked after at most this many rounds of a kernel
INTERRUPTED = "not built: mlci is stopping (SIGINT or SIGTERM)"
"""What the tuning builder answers once a signal came, so the search's round ends at once."""
# Frozen importlib frames are not files: inspect.getmodule scans every module for each.
_FROZEN_FRAMES = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>")


def speed_up_tensor_intrin_import() -> None:
    """Importing tvm.s_tir.tensor_intrin parses TVMScript, which calls inspect.stack();
    without this, each call scans all of sys.modules for frozen importlib frames
    (43 s -> 11 s measured on a 2-core machine)."""
    for name in _FROZEN_FRAMES:
        inspect.modulesbyfile.setdefault(name, None)  # type: ignore[arg-type]


GPU_TENSOR_INTRINSICS = ("tvm.s_tir.tensor_intrin.cuda", "tvm.s_tir.tensor_intrin.rocm")
"""Modules of GPU tensor intrinsics. MetaSchedule's TuneContext imports every tensor intrinsic
whatever the target, and these parse hundreds of TVMScript functions: 7 s (CUDA) and 1.3 s (ROCm)
of every CPU tuning process on a 2-core machine, for intrinsics a CPU schedule never uses."""


def load_tensor_intrinsics_for(tvm_target: Any) -> None:
    """Before tuning for `tvm_target`: on a CPU target, empty stand-ins take the GPU intrinsics'
    place (unless they were loaded already); on any other target, the real ones replace the
    stand-ins, so a process that tunes a GPU target after a CPU one still has them."""
    import importlib
    import sys
    import types

    speed_up_tensor_intrin_import()
    cpu = tvm_target.kind.name == "llvm"
    for name in GPU_TENSOR_INTRINSICS:
        loaded = sys.modules.get(name)
        if cpu and loaded is None:
            stand_in = types.ModuleType(name, "Stand-in: mlci tunes a CPU target in this process.")
            stand_in.mlci_stand_in = True  # type: ignore[attr-defined]
            sys.modules[name] = stand_in
        elif not cpu and getattr(loaded, "mlci_stand_in", False):
            del sys.modules[name]
            package, _, leaf = name.rpartition(".")
            if package in sys.modules and getattr(sys.modules[package], leaf, None) is loaded:
                delattr(sys.modules[package], leaf)
            importlib.import_module(name)


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
            if interrupt.pending():  # the run is stopping: the round ends at once, nothing measured
                return [BuilderResult(None, INTERRUPTED) for _ in build_inputs]
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


LEDGER_FILE = "ledger.json"
WORKLOADS_FILE = "database_workload.json"
RECORDS_FILE = "database_tuning_record.json"
"""MetaSchedule's JSON database: one workload (a kernel's TIR) a line, and one tuning record a line
that names its workload by line number."""
KEEP_DAMAGED = 2
"""Damaged copies of each cache file kept (moved aside, named FILE.damaged-TIME) for a post-mortem."""


def _why(exc: BaseException) -> str:
    """What was wrong with a line, in words."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not text (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})"
    if isinstance(exc, json.JSONDecodeError):
        return f"not JSON ({exc.msg}, column {exc.colno})"
    text = str(exc).strip().splitlines()
    return text[0][:200] if text and isinstance(exc, ValueError) else f"{type(exc).__name__}: {(text or [''])[0][:200]}"


def _lines(data: bytes) -> list[bytes]:
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def _summary(problems: list[tuple[int, str]], lines: int) -> str:
    number, why = problems[0]
    if len(problems) == 1:
        return f"line {number} is {why}"
    return f"{len(problems)} of {lines} lines are bad; the first, line {number}, is {why}"


def _plain(value: Any) -> Any:
    """TVM's JSON form of a value as Python lists, strings and numbers."""
    if isinstance(value, str | int | float) or value is None:
        return value
    if hasattr(value, "value"):
        return value.value
    return [_plain(v) for v in value]


@dataclass
class _Workload:
    """One line of the workloads file, read back: its kernel key and what its arguments are."""

    key: str
    """The kernel key (`mlci.compile.workload_key`): the structural hash MetaSchedule stored with it."""
    args: list[tuple[str, list[int] | None]]
    """dtype and shape of each argument; shape None for a layout-free one (a weight a tuned
    schedule may store in another layout, so a record lists it in that shape)."""
    workload: Any = field(repr=False)


def _read_workload(line: bytes) -> _Workload:
    """Raises ValueError when the line is not a workload TVM can read."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    obj = json.loads(line)
    if not (isinstance(obj, list) and len(obj) == 2 and all(isinstance(x, str) for x in obj)
            and obj[0].isdigit()):
        raise ValueError("not a [hash, module] pair")
    try:
        workload = ms.database.Workload.from_json(obj)
        main = workload.mod["main"]
        layout_free = {int(i) for i in (main.attrs or {}).get("layout_free_buffers", [])}
        args = [(str(a[1]), None if i in layout_free else [int(d) for d in a[2]])
                for i, a in enumerate(_plain(info.as_json()) for info in ArgInfo.from_prim_func(main))]
    except Exception as exc:  # noqa: BLE001 - whatever TVM raises on a module it cannot read
        raise ValueError(f"a workload TVM cannot read ({_why(exc)})") from exc
    return _Workload(key=f"{int(obj[0]) & 0xFFFFFFFFFFFFFFFF:016x}", args=args, workload=workload)


def _read_record(line: bytes, workloads: list[_Workload]) -> tuple[int, Any]:
    """The workload index and record of a record line; raises ValueError when the line is not a
    record of the workload it names."""
    obj = json.loads(line)
    if not (isinstance(obj, list) and len(obj) == 2 and type(obj[0]) is int
            and isinstance(obj[1], list) and len(obj[1]) == 4):
        raise ValueError("not a [workload, record] pair")
    index, record = obj
    trace, run_secs, target, args = record
    if not 0 <= index < len(workloads):
        raise ValueError(f"a record of workload {index}, but the workloads file has {len(workloads)} lines")
    if not (isinstance(trace, list) and len(trace) == 2 and all(isinstance(t, list) for t in trace)):
        raise ValueError("a record whose schedule trace is malformed")
    refused = trace_check.refusal(trace)
    if refused is not None:
        raise ValueError(f"a record refused because {refused}")
    if run_secs is not None and not (isinstance(run_secs, list) and all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in run_secs)):
        raise ValueError("a record whose run times are not numbers")
    if target is not None and not (isinstance(target, dict) and isinstance(target.get("kind"), str)):
        raise ValueError("a record whose target is malformed")
    if args is not None:
        expected = workloads[index].args
        try:
            found = [(str(a[1]), [int(d) for d in a[2]]) for a in args]
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise ValueError("a record whose argument list is malformed") from exc
        if len(found) != len(expected) or any(
                f[0] != e[0] or (e[1] is not None and f[1] != e[1]) for f, e in zip(found, expected)):
            raise ValueError(f"a record whose arguments are not those of workload {index} "
                             "(it was filed under another kernel)")
    return index, record


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{value!r} is not a count of trials")
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{value!r} is not a time in seconds")
    return float(value)


def _json_map(path: Path, convert: Callable[[Any], Any]) -> dict[str, Any]:
    """Raises FileNotFoundError, or ValueError when the file is not a JSON object of such values."""
    data = json.loads(path.read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return {str(k): convert(v) for k, v in data.items()}


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace the file at once: a crash leaves the old one, never half of the new."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    _write_atomic(path, json.dumps(data, indent=0, sort_keys=True).encode())


def _cannot_write(directory: Path) -> str | None:
    """Why this process cannot write the cache directory, its lock or its database (None when it
    can). Tried, not inferred from permission bits: root ignores those, a read-only mount does not."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        probe.touch()
        probe.unlink()
        os.close(os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o666))
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            if (directory / name).exists():
                with open(directory / name, "ab"):  # opening to append changes nothing
                    pass
    except OSError as exc:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename or directory}"
    return None


class TuningCache:
    """A directory holding one target's MetaSchedule database and the trials ledger.

    It checks itself when its database is first read: a damaged file is moved aside and the
    cache rebuilt from what is still valid, so a damaged cache costs re-searching, never a failed
    run. Writers hold `lock()` and read the database again when another process wrote since
    (records point at workloads by line number: a stale copy appends at the wrong line). A cache
    this process cannot write is read as it is; anything tuned goes to a private temporary copy.
    """

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.read_only = _cannot_write(self.dir)
        """Why this process cannot write the cache (None when it can)."""
        self._files = self.dir
        """Where the database, ledger, timings and cost model are read and written: the cache, or
        a private copy of it when the cache cannot be written."""
        if self.read_only is not None:
            self._files = self._private_copy()
            log.info("tuning cache %s cannot be written (%s): reading it as it is; nothing is written to it "
                     "this run", self.dir, self.read_only)
        self._filelock = FileLock(str(self.dir / ".lock"))
        self._held = 0
        self._seen: Any = None
        self._database = None
        self._warned_unsaved = False
        self._damage_told = False
        self.builds = BuildCache(self.dir / BUILDS_DIR, read_only=self.read_only)
        """Libraries built from these records (see `mlci.build_cache`)."""

    def _private_copy(self) -> Path:
        scratch = Path(tempfile.mkdtemp(prefix="mlci-tuning-cache-"))
        atexit.register(shutil.rmtree, scratch, True)
        for name in (WORKLOADS_FILE, RECORDS_FILE, LEDGER_FILE, DEFAULTS_FILE, COST_MODEL_FILE):
            with contextlib.suppress(OSError):
                shutil.copyfile(self.dir / name, scratch / name)
        return scratch

    @property
    def files(self) -> Path:
        """Where the database files are read and written: the cache, or its private copy."""
        return self._files

    def state(self) -> tuple[tuple[str, int, int], ...]:
        """Paths, sizes and mtimes of the cache's files: did this run add anything worth saving?
        Hidden files and directories (the lock, builds being written) are scratch."""
        files = [p for p in self.dir.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(self.dir).parts)]
        return tuple(sorted((str(p.relative_to(self.dir)), st.st_size, st.st_mtime_ns)
                            for p in files for st in [p.stat()]))

    @contextlib.contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """Hold while writing: one writer at a time across processes (reentrant within this one).
        Taking it first reads the database again if another process wrote it since this one did, so
        what is appended lands where this process thinks it does. A cache this process cannot write
        needs none: its private copy has no other writer."""
        if self.read_only is not None:
            yield
            return
        with self._filelock.acquire(timeout=timeout):
            outermost = self._held == 0
            self._held += 1
            try:
                if outermost and self._database is not None and self._stamp() != self._seen:
                    log.debug("tuning cache %s: written by another process; reading it again", self.dir)
                    self._database = None
                yield
            finally:
                self._held -= 1
                if outermost:
                    self._seen = self._stamp()  # what is on disk now is what this process holds

    def _stamp(self) -> tuple[Any, ...]:
        """Identity, size and mtime of the database files: have they changed since?"""
        stamps = []
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            try:
                st = (self._files / name).stat()
                stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append(None)
        return tuple(stamps)

    @property
    def database(self) -> Any:
        if self._database is None:
            with self.lock():
                self._database = self._open_database()
                self._seen = self._stamp()
        return self._database

    def _warn_damaged(self, name: str, what: str, outcome: str) -> None:
        self._damage_told = True
        where = ("moved aside" if self.read_only is None
                 else "left as it is (the cache is read-only); this run ignores it")
        log.warning("tuning cache %s: %s is damaged (%s); %s, %s", self.dir, name, what, where, outcome)

    def _move_aside(self, name: str) -> None:
        """Keep a damaged file for a post-mortem, under a name no reader opens; only the newest
        KEEP_DAMAGED copies of each file stay."""
        path = self._files / name
        if not path.exists():
            return
        stamp = time.strftime("%Y%m%dT%H%M%S")
        aside = path.with_name(f"{name}.damaged-{stamp}")
        suffix = 1
        while aside.exists():
            aside = path.with_name(f"{name}.damaged-{stamp}-{suffix}")
            suffix += 1
        os.replace(path, aside)
        for old in sorted(path.parent.glob(f"{name}.damaged-*"))[:-KEEP_DAMAGED]:
            old.unlink(missing_ok=True)

    def _replace_damaged(self, name: str, lines: list[bytes]) -> None:
        self._move_aside(name)
        _write_atomic(self._files / name, b"".join(line + b"\n" for line in lines))

    def _open_database(self) -> Any:
        """Check the database files line by line, set aside what is damaged, then let MetaSchedule
        read what is left (its reader trusts its input: one blank line crashes the process).
        Called holding the lock, so no other process is half way through writing them."""
        from tvm.s_tir import meta_schedule as ms

        self._damage_told = False
        workloads_path, records_path = self._files / WORKLOADS_FILE, self._files / RECORDS_FILE
        workload_data = workloads_path.read_bytes() if workloads_path.exists() else b""
        record_data = records_path.read_bytes() if records_path.exists() else b""
        workload_lines, record_lines = _lines(workload_data), _lines(record_data)
        workloads: list[_Workload] = []
        for number, line in enumerate(workload_lines, 1):
            try:
                workloads.append(_read_workload(line))
            except (ValueError, RecursionError) as exc:  # json's errors and the checks' are ValueErrors
                # Records name workloads by line number: past a bad line no number can be trusted.
                self._warn_damaged(WORKLOADS_FILE, f"line {number} is {_why(exc)}",
                                   f"with the records that refer to it ({RECORDS_FILE}); the cache starts "
                                   "empty and its kernels are searched again")
                self._replace_damaged(WORKLOADS_FILE, [])
                self._replace_damaged(RECORDS_FILE, [])
                workloads, workload_data, record_data, record_lines = [], b"", b"", []
                break
        kept: list[bytes] = []
        records: list[tuple[int, Any]] = []
        problems: list[tuple[int, str]] = []
        for number, line in enumerate(record_lines, 1):
            try:
                records.append(_read_record(line, workloads))
                kept.append(line)
            except (ValueError, RecursionError) as exc:  # json's errors and the checks' are ValueErrors
                problems.append((number, _why(exc)))
        if problems:
            self._warn_damaged(RECORDS_FILE, _summary(problems, len(record_lines)),
                               f"keeping its {len(kept)} valid records")
            self._replace_damaged(RECORDS_FILE, kept)
            record_data = b""
        for path, data in ((workloads_path, workload_data), (records_path, record_data)):
            if data and not data.endswith(b"\n"):  # a whole last line with no newline: an append would join it
                with open(path, "ab") as file:
                    file.write(b"\n")
        try:
            database = ms.database.JSONDatabase(work_dir=str(self._files))
        except Exception:  # noqa: BLE001 - a record whose schedule does not apply to its workload
            records = self._drop_records_that_do_not_apply(records, kept, workloads)
            try:
                database = ms.database.JSONDatabase(work_dir=str(self._files))
            except Exception as exc:  # noqa: BLE001 - nothing left to try but an empty database
                self._warn_damaged(WORKLOADS_FILE, f"MetaSchedule cannot read it: {_why(exc)}",
                                   f"with its records ({RECORDS_FILE}); the cache starts empty")
                self._replace_damaged(WORKLOADS_FILE, [])
                self._replace_damaged(RECORDS_FILE, [])
                records = []
                database = ms.database.JSONDatabase(work_dir=str(self._files))
        self._reconcile_ledger({workloads[index].key for index, _ in records})
        return database

    def _drop_records_that_do_not_apply(self, records: list[tuple[int, Any]], lines: list[bytes],
                                        workloads: list[_Workload]) -> list[tuple[int, Any]]:
        """Replay each record's schedule on its workload, as MetaSchedule's reader does, and set the
        file aside without those that fail. Only after that reader failed: replaying is its cost."""
        from tvm.s_tir import meta_schedule as ms

        bad = []
        for number, (index, record) in enumerate(records, 1):
            try:
                ms.database.TuningRecord.from_json(record, workloads[index].workload)
            except Exception as exc:  # noqa: BLE001 - whatever TVM raises on a schedule that does not apply
                bad.append((number, f"a record whose schedule does not apply to workload {index} ({_why(exc)})"))
        dropped = {number for number, _ in bad}
        kept = [line for number, line in enumerate(lines, 1) if number not in dropped]
        self._warn_damaged(RECORDS_FILE, _summary(bad, len(lines)) if bad else "MetaSchedule cannot read it",
                           f"keeping its {len(kept)} valid records")
        self._replace_damaged(RECORDS_FILE, kept)
        return [r for number, r in enumerate(records, 1) if number not in dropped]

    def _reconcile_ledger(self, recorded: set[str]) -> None:
        """Drop ledger entries of kernels with no records: the trials they were credited are lost
        with their records, so those kernels are searched again."""
        ledger = self._read_map(LEDGER_FILE, _count)
        lost = sorted(set(ledger) - recorded)
        if lost:
            # After a damaged database was reported, that its kernels are searched again is no news.
            say = log.info if self._damage_told else log.warning
            kernels = f"{len(lost)} kernel{'s' if len(lost) > 1 else ''}"
            say("tuning cache %s: %s credits trials to %s with no records in %s (lost or damaged); searching "
                "again", self.dir, LEDGER_FILE, kernels, RECORDS_FILE)
            self.save_ledger({k: v for k, v in ledger.items() if k in recorded})

    def _read_map(self, name: str, convert: Callable[[Any], Any]) -> dict[str, Any]:
        """A JSON object of the cache, its values through `convert`; empty when missing, and when
        damaged (moved aside, with a warning)."""
        try:
            return _json_map(self._files / name, convert)
        except FileNotFoundError:
            return {}
        except (ValueError, RecursionError):
            with self.lock():  # another process may have just replaced it whole: look again
                try:
                    return _json_map(self._files / name, convert)
                except FileNotFoundError:
                    return {}
                except (ValueError, RecursionError) as exc:
                    self._warn_damaged(name, _why(exc), "starting it empty")
                    self._move_aside(name)
                    return {}

    def ledger(self) -> dict[str, int]:
        """Kernel key -> trials it has had. Only kernels with records in the database are credited
        (checked when the database is opened)."""
        self.database  # noqa: B018 - opening it reconciles the ledger with the records
        return self._read_map(LEDGER_FILE, _count)

    def save_ledger(self, ledger: dict[str, int]) -> None:
        _write_json_atomic(self._files / LEDGER_FILE, ledger)

    def warn_unsaved(self, trials: int) -> None:
        """Once per run: what is searched in a cache that cannot be written is lost at exit."""
        if self.read_only is not None and not self._warned_unsaved:
            self._warned_unsaved = True
            log.warning("tuning cache %s cannot be written (%s): searching %d trials in a temporary copy; "
                        "the results are used by this run and not saved", self.dir, self.read_only, trials)

    @property
    def cost_model_path(self) -> Path:
        return self._files / COST_MODEL_FILE

    def load_cost_model(self, cores: int, warmup: int) -> Any:
        """MetaSchedule's XGBoost cost model with what earlier runs on this fingerprint measured, so
        the search is guided from its first round; a missing file starts a fresh model, and a
        damaged one does too, with a warning. Read as plain arrays and XGBoost's JSON model, never
        unpickled: the file comes from a cache others may write (TVM's own `XGBModel.load` unpickles
        whatever its tarball holds)."""
        from collections import OrderedDict

        import numpy as np
        import xgboost as xgb
        from tvm.s_tir import meta_schedule as ms
        from tvm.s_tir.meta_schedule.cost_model.xgb_model import FeatureGroup

        def fresh() -> Any:
            return ms.cost_model.XGBModel(num_tuning_cores=max(1, cores), num_warmup_samples=warmup)

        model = fresh()
        if not self.cost_model_path.exists():
            return model
        try:
            with np.load(self.cost_model_path, allow_pickle=False) as saved:
                hashes = [str(h) for h in saved["hashes"]]
                data = OrderedDict()
                for i, group_hash in enumerate(hashes):
                    rows = saved[f"rows_{i}"].astype(np.int64)
                    features = np.split(saved[f"features_{i}"], np.cumsum(rows)[:-1])
                    data[group_hash] = FeatureGroup(group_hash=group_hash, features=list(features),
                                                    costs=saved[f"costs_{i}"])
                booster = None
                if "booster" in saved.files:
                    booster = xgb.Booster()
                    booster.load_model(bytearray(saved["booster"].tobytes()))
        except Exception as exc:  # noqa: BLE001 - a bad file costs a cold start, never the run
            log.warning("tuning cache %s: the saved cost model could not be read (%s: %s); starting a fresh one",
                        self.cost_model_path, type(exc).__name__, str(exc).strip()[:200])
            return fresh()
        model.data, model.data_size, model.booster = data, sum(len(g.costs) for g in data.values()), booster
        return model

    def save_cost_model(self, model: Any) -> None:
        """Written next to the records it learned from, atomically (a crash leaves the old file), as
        numeric arrays and XGBoost's own JSON model: nothing a reader would have to unpickle."""
        import numpy as np

        if getattr(model, "booster", None) is None:
            return  # nothing learned yet
        arrays: dict[str, Any] = {"hashes": np.array([str(g.group_hash) for g in model.data.values()])}
        for i, group in enumerate(model.data.values()):
            features = [np.asarray(f, dtype=np.float32) for f in group.features]
            arrays[f"rows_{i}"] = np.array([len(f) for f in features], dtype=np.int64)
            arrays[f"features_{i}"] = (np.concatenate(features) if features else np.zeros((0, 0), np.float32))
            arrays[f"costs_{i}"] = np.asarray(group.costs, dtype=np.float64)
        tmp = self.cost_model_path.with_name(COST_MODEL_FILE + ".tmp")
        try:
            arrays["booster"] = np.frombuffer(bytes(model.booster.save_raw("json")), dtype=np.uint8)
            with open(tmp, "wb") as file:
                np.savez(file, **arrays)
            tmp.replace(self.cost_model_path)
        except Exception as exc:  # noqa: BLE001 - the records are saved; only the model's head start is lost
            log.warning("tuning cache %s: could not save the cost model %s (%s)", self.dir, COST_MODEL_FILE,
                        str(exc).strip()[:200])

    def valid_records(self, kernel: Kernel, top_k: int = 1 << 30) -> list[Any]:
        """The kernel's records that built and ran, fastest first (at most `top_k`)."""
        db = self.database
        workload = kernel.task.dispatched[0]
        if not db.has_workload(workload):
            return []
        return list(db.get_top_k(db.commit_workload(workload), top_k))

    def best_record_json(self, kernel: Kernel) -> Any:
        """The record a build applies to the kernel (its fastest), as plain JSON; None without one."""
        from tvm.s_tir.meta_schedule import _ffi_api

        records = self.valid_records(kernel, top_k=1)
        return _plain_json(_ffi_api.TuningRecordAsJSON(records[0])) if records else None

    def default_seconds(self) -> dict[str, float]:
        """Kernel key -> measured seconds per call of its rule-based default schedule (a damaged
        file costs re-measuring, never a crash)."""
        return self._read_map(DEFAULTS_FILE, _seconds)

    def save_default_seconds(self, timings: dict[str, float]) -> None:
        _write_json_atomic(self._files / DEFAULTS_FILE, timings)

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
    kernels_from_remote: int = 0
    """Kernels whose records came from the tuning cache on S3 (`mlci.remote_cache`)."""
    searched: dict[str, int] = field(default_factory=dict)
    """Trials measured this run per kernel key (kernels searched only)."""

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
            kernels_from_remote=self.kernels_from_remote,
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
            if any(b.error_msg == INTERRUPTED for b in builder_results):
                counts["interrupted"] = True
                return  # not measured: no trial to credit
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
    only: set[str] | frozenset[str] | None = None,
) -> TuningOutcome:
    """Search what the budget still owes each kernel; every record lands in the cache.
    Candidates run on `threads` threads: as many as the build will run on when measured.

    With `progressive`, `trials` new trials are searched whatever the cache holds, where the
    estimated remaining gain is largest (`budget.progressive_trials`). Each kernel searched also
    has its `default_schedule` timed once, so a build can tell whether tuning beat it.

    With `only` (kernel keys), only those kernels are searched; the plan is still made over all of
    `kernels`, so a shard of a run searches for its kernels exactly what the unsharded run would."""
    # Every read of the cache and every write to it under the lock: another process's records land
    # in the database this run appends to, and its ledger is the one this run adds to.
    with cache.lock():
        return _tune_locked(kernels, tvm_target, cache, trials=trials, seconds=seconds, per_round=per_round,
                            log_dir=log_dir, threads=threads, seed=seed, progressive=progressive,
                            default_schedule=default_schedule, on_progress=on_progress, only=only)


def _tune_locked(kernels: list[Kernel], tvm_target: Any, cache: TuningCache, *, trials: int, seconds: float,
                 per_round: int, log_dir: Path, threads: int, seed: int, progressive: bool,
                 default_schedule: Callable[[Any], bool] | None, on_progress: ProgressFn | None,
                 only: set[str] | frozenset[str] | None = None) -> TuningOutcome:
    start = time.monotonic()
    # No time (zero, negative, NaN) searches nothing; an infinite budget has no deadline.
    deadline = start + (seconds if seconds > 0 else 0.0)
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
    if only is not None:
        owed = [o if k.key in only else 0 for k, o in zip(kernels, owed)]
    outcome.planned = planned
    outcome.trials_cached = sum(min(p, d) for p, d in zip(planned, done_before))
    outcome.tasks_from_cache = sum(1 for o, d in zip(owed, done_before) if o == 0 and d > 0)
    total_owed = sum(owed)
    if on_progress:
        on_progress(0, total_owed, "")
    if total_owed == 0 or deadline <= start:
        outcome.deadline_hit = total_owed > 0
        outcome.seconds = time.monotonic() - start
        return outcome
    cache.warn_unsaved(total_owed)

    from tvm.s_tir import meta_schedule as ms

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
    default_timings = cache.default_seconds()
    with interrupt.deferred():  # a signal ends the search between rounds, never inside TVM's callbacks
        if default_schedule is not None:
            untimed = [k for k, o in zip(kernels, owed) if o > 0 and k.key not in default_timings]
            if untimed:
                default_timings.update(measure_defaults(untimed, tvm_target, default_schedule, builder, runner))
                if not interrupt.pending():
                    cache.save_default_seconds(default_timings)
        _search(kernels, owed, done_before, outcome, ledger, cache, deadline=deadline, seed=seed, log_dir=log_dir,
                cores=cores, per_round=per_round, builder=builder, runner=runner, database=database,
                cost_model=cost_model, callbacks=callbacks, counts=counts, on_progress=on_progress,
                total_owed=total_owed)
    outcome.seconds = time.monotonic() - start
    return outcome


def _search(kernels: list[Kernel], owed: list[int], done_before: list[int], outcome: TuningOutcome,
            ledger: dict[str, int], cache: TuningCache, *, deadline: float, seed: int, log_dir: Path, cores: int,
            per_round: int, builder: Any, runner: Any, database: Any, cost_model: Any, callbacks: list[Any],
            counts: dict[str, Any], on_progress: ProgressFn | None, total_owed: int) -> None:
    """The search loop: each kernel's owed trials in chunks of rounds, until the deadline or a signal."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    searched_total = 0
    try:
        for index, kernel in enumerate(kernels):
            need = owed[index]
            if need == 0:
                continue
            if interrupt.pending():
                break
            if time.monotonic() >= deadline:
                outcome.deadline_hit = True
                break
            done = 0
            exhausted = False
            # Search in chunks so the deadline is checked every couple of rounds; each chunk
            # starts from the best schedules so far (evolutionary search seeds from the database).
            chunk_no = 0
            while done < need and time.monotonic() < deadline and not interrupt.pending():
                chunk = min(need - done, CHUNK_ROUNDS * per_round)
                logging.getLogger(MS_LOGGER).setLevel(logging.WARNING)
                _quiet_metaschedule_console()
                contexts, weights = extracted_tasks_to_tune_contexts(
                    [kernel.task], work_dir=str(log_dir), strategy=search_strategy(),
                    seed=seed + 1000 * index + chunk_no, num_threads=max(1, cores),
                )
                _quiet_metaschedule_console()
                if not contexts:  # already scheduled by the importer: nothing to search
                    exhausted = True
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
                if interrupt.pending():
                    break
                if measured < chunk:  # the search space is exhausted
                    exhausted = True
                    break
            searched_total += done
            if done:
                outcome.searched[kernel.key] = outcome.searched.get(kernel.key, 0) + done
            outcome.deadline_hit = outcome.deadline_hit or (done < need and not exhausted and not interrupt.pending())
            # The ledger credits what was measured, so a later run searches the rest. A kernel whose
            # search space ran out after candidates were measured has had its due; one with nothing
            # measured is credited nothing, whatever stopped it.
            credit = need if exhausted and done > 0 else done
            if credit:
                ledger[kernel.key] = done_before[index] + credit
                cache.save_ledger(ledger)
    finally:
        cache.save_cost_model(cost_model)
