"""The tuning cache under faults: damaged database files, a lost database, two processes writing at
once, a cache that cannot be written, and time budgets that leave no time to search. Each ends with
a run that tunes or builds as if nothing had happened."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlci.build_cache import BuildCache
from mlci.compile import BuildReport
from mlci.config import ModelConfig
from mlci.pipeline import ModelSettings
from mlci.tuning import TuningCache

from .conftest import REPO, save, tiny_mlp
from .test_tuning import _imported, _pipeline, _tune

pytestmark = pytest.mark.slow

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
LEDGER = "ledger.json"
WIDTHS = (32, 8)  # one kernel: each search here costs a few seconds, not twice that
TRIALS = 2


@pytest.fixture(scope="module")
def warm(tmp_path_factory: pytest.TempPathFactory):
    """A cache that has tuned the tiny MLP (TRIALS trials) and filed its build, and the model as imported."""
    root = tmp_path_factory.mktemp("warm")
    imported = _imported(root, WIDTHS, "mlp")
    compiled = _pipeline(root / "cache", root / "logs").tune_and_build(
        imported, ModelSettings(trials=TRIALS, trials_per_round=4))
    assert compiled.tuning.trials_new == TRIALS
    return root / "cache", imported


def _copy(warm, tmp_path: Path) -> Path:
    cache_dir = tmp_path / "cache"
    shutil.copytree(warm[0], cache_dir)
    return cache_dir


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "mlci"]


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _truncate_mid_line(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-200])  # the last record cut in the middle


def _garbage_line(path: Path) -> None:
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:1] + [b"<<<<<<< HEAD\n"] + lines[1:]))


def _binary_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes() + bytes(range(128, 256)) * 8)


@pytest.mark.parametrize(("damage", "lost"), [(_truncate_mid_line, 1), (_garbage_line, 0), (_binary_bytes, 0)],
                         ids=["truncated", "garbage", "binary"])
def test_a_damaged_records_file_is_moved_aside_and_its_valid_records_kept(warm, tmp_path: Path, caplog,
                                                                          damage, lost: int) -> None:
    cache_dir = _copy(warm, tmp_path)
    intact = _lines(cache_dir / RECORDS)
    damage(cache_dir / RECORDS)
    pipeline = _pipeline(cache_dir, tmp_path / "logs")
    with caplog.at_level(logging.INFO, logger="mlci"):
        outcome = pipeline.tune(warm[1], ModelSettings(trials=TRIALS, trials_per_round=4))
    (warning,) = _warnings(caplog)
    assert str(cache_dir) in warning and f"{RECORDS} is damaged" in warning and "moved aside" in warning
    aside = list(cache_dir.glob(f"{RECORDS}.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes() != b"".join(intact)
    kept = _lines(cache_dir / RECORDS)
    assert kept == intact[:len(intact) - lost]

    # The kernel kept records and its trials: nothing is searched, and it builds from the cache.
    assert outcome.trials_new == 0 and all(pipeline.cache.valid_records(k) for k in warm[1].kernels)
    _, report, _ = pipeline.build(warm[1])
    assert sorted(report.tuned + report.kept_default) == sorted(report.kernels) and not report.fallbacks
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlci"):
        assert len(TuningCache(cache_dir).database) == len(kept)
    assert _warnings(caplog) == []  # repaired for good


def test_a_damaged_workloads_file_sets_both_files_aside_and_the_cache_starts_empty(warm, tmp_path: Path,
                                                                                  caplog) -> None:
    cache_dir = _copy(warm, tmp_path)
    _garbage_line(cache_dir / WORKLOADS)  # records name workloads by line: none can be trusted now
    pipeline = _pipeline(cache_dir, tmp_path / "logs")
    with caplog.at_level(logging.INFO, logger="mlci"):
        compiled = pipeline.tune_and_build(warm[1], ModelSettings(trials=0))
    (warning,) = _warnings(caplog)
    assert str(cache_dir) in warning and f"{WORKLOADS} is damaged (line 2 is not JSON" in warning
    assert len(list(cache_dir.glob(f"{WORKLOADS}.damaged-*"))) == len(list(cache_dir.glob(f"{RECORDS}.damaged-*"))) == 1
    # It builds, every kernel on its default schedule, and the next run with a budget searches them again.
    report = compiled.build_report
    assert sorted(report.default) == sorted(report.kernels) and not compiled.build_cached
    assert (cache_dir / WORKLOADS).read_bytes() == (cache_dir / RECORDS).read_bytes() == b""
    assert TuningCache(cache_dir).ledger() == {}


def test_a_build_cache_that_cannot_be_written_exports_to_a_temporary_directory_and_files_nothing(
        tmp_path: Path, caplog) -> None:
    cache = BuildCache(tmp_path / "builds")
    (tmp_path / "builds").mkdir()
    (tmp_path / "builds" / ".staging").write_text("")  # a file where its staging directory goes
    with caplog.at_level(logging.WARNING, logger="mlci"):
        staged = cache.staging_path()
        staged.write_bytes(b"\0" * 10)
        kept = cache.put("k1", "m", staged, BuildReport(kernels=["k"]), None, 1.0)
        cache.staging_path()
    assert kept == staged and kept.read_bytes() == b"\0" * 10 and not kept.is_relative_to(tmp_path)
    assert cache.get("k1") is None and sorted(p.name for p in (tmp_path / "builds").iterdir()) == [".staging"]
    (warning,) = _warnings(caplog)
    assert f"build cache {tmp_path / 'builds'} cannot be written" in warning and "not kept" in warning


def _rewrite_records(path: Path, change) -> None:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_records_that_name_a_missing_or_another_kernels_workload_are_dropped(warm, tmp_path: Path, caplog) -> None:
    cache_dir = _copy(warm, tmp_path)
    other = _imported(tmp_path, (16, 4), "other").kernels[0]
    cache = TuningCache(cache_dir)
    cache.database.commit_workload(other.task.dispatched[0])  # workload 1: another kernel's

    def misfile(lines: list) -> None:
        lines[0][0] = 1  # now claims to be a record of the other kernel
        lines.append([7, lines[1][1]])  # a workload the file does not have

    _rewrite_records(cache_dir / RECORDS, misfile)
    with caplog.at_level(logging.WARNING, logger="mlci"):
        database = TuningCache(cache_dir).database
    (warning,) = _warnings(caplog)
    assert f"{RECORDS} is damaged (2 of 3 lines are bad; the first, line 1, is a record whose arguments are " \
           "not those of workload 1 (it was filed under another kernel))" in warning
    assert len(database) == TRIALS - 1  # the record left is the intact one, of its own kernel
    assert list(database.get_top_k(database.commit_workload(other.task.dispatched[0]), 10)) == []


def test_a_record_whose_schedule_does_not_apply_to_its_workload_is_dropped(warm, tmp_path: Path, caplog) -> None:
    cache_dir = _copy(warm, tmp_path)

    def break_schedule(lines: list) -> None:
        step = lines[0][1][0][0][0]  # the trace's first step: GetSBlock(name=..., func_name=...)
        assert step[0] == "GetSBlock"
        step[2][0] = "no_such_block"

    _rewrite_records(cache_dir / RECORDS, break_schedule)
    with caplog.at_level(logging.WARNING, logger="mlci"):
        assert len(TuningCache(cache_dir).database) == TRIALS - 1
    (warning,) = _warnings(caplog)
    assert f"{RECORDS} is damaged (line 1 is a record whose schedule does not apply to workload 0" in warning


def test_a_damaged_ledger_or_timings_file_is_moved_aside_and_at_most_two_copies_are_kept(tmp_path: Path,
                                                                                       caplog) -> None:
    cache = TuningCache(tmp_path / "cache")
    for text in ("{oops", "[1, 2]", '{"kernel": NaN}'):
        (cache.dir / "default_schedules.json").write_text(text)
        with caplog.at_level(logging.WARNING, logger="mlci"):
            assert cache.default_seconds() == {}
    assert len(list(cache.dir.glob("default_schedules.json.damaged-*"))) == 2
    assert len(_warnings(caplog)) == 3 and all(str(cache.dir) in w for w in _warnings(caplog))
    assert "default_schedules.json is damaged (not JSON (Expecting property name" in _warnings(caplog)[0]
    caplog.clear()
    (cache.dir / LEDGER).write_text('{"0123456789abcdef": -3}')
    with caplog.at_level(logging.WARNING, logger="mlci"):
        assert cache.ledger() == {}
    (warning,) = _warnings(caplog)
    assert f"{LEDGER} is damaged (-3 is not a count of trials)" in warning


def test_a_lost_database_whose_ledger_survived_searches_its_kernels_again(warm, tmp_path: Path, caplog) -> None:
    cache_dir = _copy(warm, tmp_path)
    (cache_dir / WORKLOADS).unlink()
    (cache_dir / RECORDS).unlink()
    with caplog.at_level(logging.WARNING, logger="mlci"):
        outcome = _tune(warm[1], cache_dir, TRIALS, tmp_path / "logs")
    (warning,) = _warnings(caplog)
    assert str(cache_dir) in warning and f"{LEDGER} credits trials to 1 kernel with no records" in warning
    assert outcome.trials_new == TRIALS and outcome.tasks_from_cache == 0
    assert all(TuningCache(cache_dir).valid_records(k) for k in warm[1].kernels)


def test_a_budget_with_no_time_credits_no_trials_and_an_infinite_one_credits_what_it_measured(
        warm, tmp_path: Path) -> None:
    cache_dir = _copy(warm, tmp_path)
    ledger = TuningCache(cache_dir).ledger()
    for seconds in (0.0, -1.0, float("nan")):
        starved = _tune(warm[1], cache_dir, 2 * TRIALS, tmp_path / "logs", seconds=seconds)
        assert starved.trials_new == 0 and starved.deadline_hit
        assert TuningCache(cache_dir).ledger() == ledger  # nothing measured, nothing credited
    # No deadline at all: the next run searches what is owed and is credited what it measured.
    unbounded = _tune(warm[1], cache_dir, 2 * TRIALS, tmp_path / "logs", seconds=float("inf"))
    assert unbounded.trials_new == TRIALS and not unbounded.deadline_hit
    assert sum(TuningCache(cache_dir).ledger().values()) == 2 * TRIALS
    assert _tune(warm[1], cache_dir, 2 * TRIALS, tmp_path / "logs").trials_new == 0


# `mlci`'s pipeline in a process of its own, tuning (and with "build", building) models into a cache.
# With "ready" and "go" it opens the cache's database first, then waits for the test's signal, so two
# such processes each hold the database as it was before either of them wrote.
_WORKER = textwrap.dedent("""
    import json, logging, sys, time
    from pathlib import Path

    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(message)s")
    from mlci import tuning
    from mlci.config import ModelConfig
    from mlci.pipeline import ModelSettings, Pipeline
    from mlci.targets import ResolvedTarget, detect_host_target

    job = json.loads(sys.argv[1])
    tuning.speed_up_tensor_intrin_import()
    import tvm.s_tir.tensor_intrin  # noqa: F401 - TVM's slowest import, paid before the race

    pipeline = Pipeline(ResolvedTarget("cpu", detect_host_target()), tuning.TuningCache(Path(job["cache"])),
                        log_dir=Path(job["logs"]))
    models = [pipeline.load_and_import(ModelConfig(name=name, path=Path(path), dims={"batch": 1}, key="models[0]"))
              for name, path in job["models"]]
    if job.get("ready"):
        pipeline.cache.database  # read now: the other process writes after this
        Path(job["ready"]).touch()
        while not Path(job["go"]).exists():
            time.sleep(0.05)
    settings = ModelSettings(trials=job["trials"], trials_per_round=4)
    for imported in models:
        if job["build"]:
            compiled = pipeline.tune_and_build(imported, settings)
            outcome, built, cached = compiled.tuning, compiled.library is not None, compiled.build_cached
        else:
            outcome, built, cached = pipeline.tune(imported, settings), False, False
        print(json.dumps({"name": imported.prepared.name, "trials_new": outcome.trials_new, "built": built,
                          "cached": cached}))
""")


def _worker(job: dict, wrap: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*(wrap or []), sys.executable, "-c", _WORKER, json.dumps(job, default=str)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def _finish(proc: subprocess.Popen) -> tuple[dict[str, dict], str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in results}, err


def _misfiled_records(cache_dir: Path) -> list[str]:
    """Record lines that name a workload out of range, whose schedule does not apply to the workload
    they name, or whose input and output shapes are not that workload's; read with TVM's own parsers."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    workloads = [ms.database.Workload.from_json(json.loads(line))
                 for line in (cache_dir / WORKLOADS).read_text().splitlines()]
    wrong = []
    for number, line in enumerate((cache_dir / RECORDS).read_text().splitlines(), 1):
        index, record = json.loads(line)
        try:
            main = workloads[index].mod["main"]
            ms.database.TuningRecord.from_json(record, workloads[index])
            layout_free = {int(i) for i in main.attrs.get("layout_free_buffers", [])}
            expected = [str(a.as_json()) for a in ArgInfo.from_prim_func(main)]
            got = [str(ArgInfo.from_json(a).as_json()) for a in record[3]]
            assert [g for i, g in enumerate(got) if i not in layout_free] == \
                   [e for i, e in enumerate(expected) if i not in layout_free]
        except Exception as exc:  # noqa: BLE001 - any failure is a misfiled record
            wrong.append(f"line {number} -> workload {index}: {type(exc).__name__} {str(exc)[:100]}")
    return wrong


def test_two_processes_tuning_different_models_into_one_cache_both_keep_valid_records(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    models = {"a": save(tiny_mlp(WIDTHS), tmp_path / "a.onnx"),
              "b": save(tiny_mlp((16, 4), seed=1), tmp_path / "b.onnx")}
    go = tmp_path / "go"
    procs = [_worker({"cache": cache_dir, "logs": tmp_path / "logs" / name, "models": [(name, path)],
                      "trials": TRIALS, "build": False, "ready": tmp_path / f"{name}.ready", "go": go})
             for name, path in models.items()]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"{name}.ready").exists() for name in models):
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-3000:] for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    go.touch()  # each now holds the database as it was before either tuned
    for proc in procs:
        (result,) = _finish(proc)[0].values()
        assert result["trials_new"] == TRIALS

    assert _misfiled_records(cache_dir) == []
    # A third run finds every kernel of both models tuned, and searches nothing.
    third = _pipeline(cache_dir, tmp_path / "logs")
    for name, path in models.items():
        imported = third.load_and_import(ModelConfig(name=name, path=path, dims={"batch": 1}, key="models[0]"))
        assert all(third.cache.valid_records(k) for k in imported.kernels)
        outcome = third.tune(imported, ModelSettings(trials=TRIALS, trials_per_round=4))
        assert outcome.trials_new == 0 and outcome.tasks_from_cache == len(imported.kernels)


def _read_only(cache_dir: Path) -> list[str] | None:
    """A command prefix that runs a command with `cache_dir` read-only to it: as root, on a
    read-only bind mount in a mount namespace of its own (permission bits do not stop root); as
    another user, the directory's write permission is removed instead. None when neither works."""
    if os.geteuid() != 0:
        for path in [cache_dir, *cache_dir.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return []
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    wrap = ["unshare", "--mount", "sh", "-c", script, "sh", str(cache_dir)]
    probe = subprocess.run([*wrap, "touch", str(cache_dir / "probe")], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        (cache_dir / "probe").unlink(missing_ok=True)
        return None
    return wrap


def _snapshot(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_read_only_cache_builds_without_writing_and_tunes_a_private_copy(warm, tmp_path: Path) -> None:
    """A warm model loads its build from a cache this process cannot write, with one note; a new
    model is tuned in a temporary copy, said once, and built into a temporary directory. The cache
    is left exactly as it was."""
    cache_dir = _copy(warm, tmp_path)
    wrap = _read_only(cache_dir)
    if wrap is None:
        pytest.skip("no way to make a directory read-only to a process here")
    before = _snapshot(cache_dir)
    models = [("mlp", save(tiny_mlp(WIDTHS), tmp_path / "mlp.onnx")),
              ("new", save(tiny_mlp((24, 4), seed=2), tmp_path / "new.onnx"))]
    try:
        results, err = _finish(_worker({"cache": cache_dir, "logs": tmp_path / "logs", "models": models,
                                        "trials": 2, "build": True}, wrap))
    finally:
        if not wrap:
            for path in [cache_dir, *cache_dir.rglob("*")]:
                path.chmod(path.stat().st_mode | 0o200)
    assert _snapshot(cache_dir) == before
    notes = [line for line in err.splitlines() if "cannot be written" in line]
    assert len(notes) == 2, err[-3000:]  # opening: read as it is; tuning the new model: not saved
    assert notes[0].startswith("INFO") and f"tuning cache {cache_dir} cannot be written" in notes[0]
    assert notes[1].startswith("WARNING") and "searching 2 trials in a temporary copy" in notes[1]
    assert "not saved" in notes[1] and "Traceback" not in err
    assert results["mlp"]["trials_new"] == 0 and results["mlp"]["cached"]  # its filed build, loaded
    assert results["new"]["trials_new"] == 2 and results["new"]["built"] and not results["new"]["cached"]
