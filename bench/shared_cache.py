"""Benchmark: the tuning cache shared on S3, sharded tuning, and a run with its servers failing.

Everything runs against one real ``moto_server`` bucket on 127.0.0.1, with the bundled example
(``examples/``: its config with the trials and samples asked for, a ``[cache] url`` and
``local_writes = true``, the target pinned to this CPU with ``num-cores = 1`` so every process tunes
for one fingerprint; ``make_models.py`` generates the models). Every command is the real ``mlci`` in
a subprocess, each simulated runner in its own directory (so its own local tuning cache).

a. Runners in turn: ``--runners`` runners run ``mlci run --no-tracking`` one after another. The
   first tunes and writes the bucket; the others start with an empty local cache. Goals: runners 2+
   search 0 trials and take <= 25% of runner 1's wall time.
b. Sharded tuning of squeezenet: for each N of ``--shards`` (default 1 2 4), N ``mlci tune --shard
   K/N`` processes at once, process K pinned to core (K-1) % cpu_count, each into its own prefix of
   the bucket. Checked from the shard reports and the bucket: every kernel searched exactly once
   across the shards (owned by one shard, searched to its plan, one S3 entry). Then a fresh runner
   (empty local cache) runs ``mlci run -m squeezenet``: it must search 0 trials, and for every kernel
   its cache must hold the best record among all shards' records: its build key (which covers each
   kernel's chosen record and which kernels keep the default schedule) is compared with that of a
   local cache into which every shard's records were merged.
c. Faults: runner 1's project (warm local cache) runs ``mlci run`` again, normally, with the bucket
   down (endpoint on a closed port), with the MLflow tracking server down (``--tracking-uri`` on a
   closed port) and hung (a socket that accepts and never answers; mlci gives MLflow
   MLCI_MLFLOW_DEADLINE, 60 s by default). Goals: extra wall time <= 90 s, the exit code unchanged,
   and ``mlci sync`` afterwards (twice, into a fresh sqlite store) logs each model's run exactly once.

Run (from the repository root, in the project's virtualenv)::

    python bench/shared_cache.py                 # 32 trials per model: about 20-30 minutes on 2 cores
    python bench/shared_cache.py --quick         # 8 trials, fewer samples, 2 runners: a quick try
    python bench/shared_cache.py --parts b --shards 1 2

Timings are wall-clock on a shared machine: other load shows up as noise (the load average before
and after is recorded in the JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.servers: the moto_server the tests use

from tests.servers import FAKE_AWS, free_port, moto_server  # noqa: E402

EXAMPLES = REPO_ROOT / "examples"
DEFAULT_OUT = REPO_ROOT / "bench" / "out" / "shared_cache.json"
BUCKET = "mlci-bench"
SHARDED_MODEL = "squeezenet"
WARM_OVER_FIRST_GOAL = 0.25
FAULT_EXTRA_GOAL_S = 90.0
out = Console(width=150)  # the tables are read in logs and reports, not only on terminals
err = Console(stderr=True)


def _say(what: str, text: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {what}: {text}", highlight=False)


# --- projects and commands ---------------------------------------------------------------------


def config_text(trials: int, samples: int, cache_url: str, tvm_target: dict[str, Any]) -> str:
    """The example's config with these trials and samples, the shared cache, and a one-core target."""
    text = (EXAMPLES / "mlci.toml").read_text()
    inline = ", ".join(f"{k} = {json.dumps(v)}" for k, v in tvm_target.items())
    text, found = re.subn(r'(?m)^tvm = "host".*$', f"tvm = {{ {inline} }}", text)
    assert found == 1, "examples/mlci.toml: expected one `tvm = \"host\"` line"
    text = re.sub(r"(?m)^(trials\s*=\s*)\d+", rf"\g<1>{trials}", text)
    text = re.sub(r"(?m)^(seconds\s*=\s*)\d+", r"\g<1>3600", text)
    text = re.sub(r"(?m)^(samples\s*=\s*)\d+", rf"\g<1>{samples}", text)
    return text + f'\n[cache]\nurl = "{cache_url}"\nlocal_writes = true\n'


def make_project(root: Path, text: str, models_from: Path | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy2(EXAMPLES / "make_models.py", root / "make_models.py")
    (root / "mlci.toml").write_text(text)
    if models_from is not None:  # `prepare` regenerates them anyway (byte-identical); saves nothing but a step
        shutil.copytree(models_from, root / "models", dirs_exist_ok=True)
    return root


def one_core_target() -> dict[str, Any]:
    from mlci.targets import detect_host_target

    target = detect_host_target()
    target["num-cores"] = 1
    return target


@dataclass
class Cmd:
    label: str
    wall_seconds: float
    returncode: int
    output_tail: str = ""
    cpu_seconds: float | None = None
    """User + system time of the process and the workers it waited for (the tuning builder and runner)."""


def base_env(s3_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GITHUB_", "MLCI_", "AWS_", "MLFLOW_"))}
    env.update(FAKE_AWS, AWS_ENDPOINT_URL_S3=s3_url, MLCI_PROGRESS_INTERVAL="600")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # `prepare` runs `python`
    return env


def start(cwd: Path, env: dict[str, str], args: list[str], cpu: int | None = None) -> subprocess.Popen:
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    with open(cwd / f"mlci-{args[0]}.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen([sys.executable, "-m", "mlci.cli", *args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=pin)


def finish(label: str, proc: subprocess.Popen, started: float, cwd: Path, args: list[str]) -> Cmd:
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    tail = (cwd / f"mlci-{args[0]}.log").read_text()[-3000:]
    _say(label, f"{wall:.1f} s ({cpu:.1f} CPU s), exit {proc.returncode}")
    return Cmd(label, round(wall, 3), proc.returncode, tail, round(cpu, 3))


def mlci(label: str, cwd: Path, env: dict[str, str], *args: str) -> Cmd:
    _say(label, "mlci " + " ".join(args))
    started = time.perf_counter()
    return finish(label, start(cwd, env, list(args)), started, cwd, list(args))


def results_of(project: Path) -> dict[str, Any]:
    path = project / ".mlci" / "results" / "cpu.json"
    return json.loads(path.read_text()) if path.is_file() else {"models": []}


def trials_new(results: dict[str, Any]) -> int:
    return sum(int((m.get("tuning") or {}).get("trials_new", 0)) for m in results["models"])


def statuses(results: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["status"] for m in results["models"]}


# --- a. runners in turn ------------------------------------------------------------------------


@dataclass
class RunnerRow:
    runner: int
    wall_seconds: float
    returncode: int
    trials_new: int
    kernels_from_remote: int
    statuses: dict[str, str]


def part_a(work: Path, s3_url: str, text: str, runners: int, models: Path) -> dict[str, Any]:
    env = base_env(s3_url)
    rows = []
    for i in range(1, runners + 1):
        project = make_project(work / f"runner{i}", text, models)
        cmd = mlci(f"a. runner {i}", project, env, "run", "--no-tracking")
        results = results_of(project)
        rows.append(RunnerRow(i, cmd.wall_seconds, cmd.returncode, trials_new(results),
                              sum(int((m.get("tuning") or {}).get("kernels_from_remote", 0)) for m in results["models"]),
                              statuses(results)))
    first = rows[0].wall_seconds
    later = rows[1:]
    return {
        "runners": [asdict(r) for r in rows],
        "later_over_first": [round(r.wall_seconds / first, 3) for r in later],
        "goal_met": bool(later) and all(r.trials_new == 0 and r.wall_seconds <= WARM_OVER_FIRST_GOAL * first
                                        and r.returncode == 0 for r in later),
    }


# --- b. sharded tuning -------------------------------------------------------------------------


@dataclass
class ShardRun:
    shards: int
    wall_seconds: float
    returncodes: list[int]
    shard_seconds: list[float]
    shard_cpu_seconds: list[float | None]
    """Each shard's CPU time: with one runner per shard (CI), its wall time is about this plus waiting."""
    shard_trials: list[int]
    kernels: int
    owned_once: bool
    searched_to_plan: bool
    entries: int
    kernels_with_trials: int
    one_entry_each: bool
    fresh_run: dict[str, Any] = field(default_factory=dict)


def bucket_entries(s3: Any, prefix: str) -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def merged_cache(directory: Path, caches: list[Any], kernels: list[Any]) -> Any:
    """A local cache holding every record of every shard's cache (with their ledgers and timed
    default schedules): what one runner that had tuned it all would hold."""
    from tvm.s_tir import meta_schedule as ms

    from mlci import remote_cache
    from mlci.tuning import TuningCache

    merged = TuningCache(directory)
    with merged.lock():
        database, ledger, defaults = merged.database, merged.ledger(), merged.default_seconds()
        by_key = {k.key: k for k in kernels}
        for cache in caches:
            for key, (_, records) in remote_cache.local_entries(cache, kernels, top_k=1 << 30).items():
                committed = database.commit_workload(by_key[key].task.dispatched[0])
                for record in records:
                    database.commit_tuning_record(ms.database.TuningRecord.from_json(record, committed))
            for key, trials in cache.ledger().items():
                ledger[key] = max(ledger.get(key, 0), trials)
            defaults.update(cache.default_seconds())
        merged.save_ledger(ledger)
        merged.save_default_seconds(defaults)
    return merged


def compare_with_merged(work: Path, fresh: Path, shard_projects: list[Path]) -> dict[str, Any]:
    """Does the fresh runner's cache choose, for every kernel, what a cache holding all the shards'
    records would (the same best record, the same kernels kept on their default schedule)?"""
    from mlci.config import load_config
    from mlci.pipeline import Pipeline
    from mlci.targets import select_target
    from mlci.tuning import TuningCache

    [fresh_cache_dir] = (fresh / ".mlci" / "cache").iterdir()
    config = load_config(fresh / "mlci.toml")
    [model] = [m for m in config.models if m.name == SHARDED_MODEL]
    target = select_target(config, None)
    fresh_cache = TuningCache(fresh_cache_dir)
    pipeline = Pipeline(target, fresh_cache, log_dir=work / "logs")
    imported = pipeline.load_and_import(model)
    shard_caches = [TuningCache(p / ".mlci" / "cache" / fresh_cache_dir.name) for p in shard_projects]
    merged = merged_cache(work / "merged" / fresh_cache_dir.name, shard_caches, imported.kernels)
    same = sum(1 for k in imported.kernels if fresh_cache.best_record_json(k) == merged.best_record_json(k))
    merged_key = Pipeline(target, merged, log_dir=work / "logs").build_key(imported)
    return {
        "kernels": len(imported.kernels),
        "kernels_same_best_record": same,
        "kept_default_same": sorted(fresh_cache.slower_than_default(imported.kernels))
        == sorted(merged.slower_than_default(imported.kernels)),
        "build_key_same": pipeline.build_key(imported) == merged_key,
    }


def part_b(work: Path, s3: Any, s3_url: str, trials: int, samples: int, tvm_target: dict[str, Any],
           shard_counts: list[int], models: Path) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    env = base_env(s3_url)
    rows = []
    for n in shard_counts:
        prefix = f"shards-{n}"
        text = config_text(trials, samples, f"s3://{BUCKET}/{prefix}", tvm_target)
        projects = [make_project(work / f"shards{n}" / f"shard{k}", text, models) for k in range(1, n + 1)]
        _say(f"b. {n} shard(s)", f"mlci tune -m {SHARDED_MODEL} --shard K/{n}, one core each")
        started = time.perf_counter()
        procs = [start(p, env, ["tune", "-m", SHARDED_MODEL, "--shard", f"{k}/{n}"], cpu=(k - 1) % cpus)
                 for k, p in enumerate(projects, 1)]
        cmds = [finish(f"b. shard {k}/{n}", proc, started, p, ["tune"]) for k, (proc, p) in
                enumerate(zip(procs, projects), 1)]
        wall = time.perf_counter() - started
        reports = []
        for k, p in enumerate(projects, 1):
            path = p / ".mlci" / "results" / f"tune-cpu-shard{k}-of-{n}.json"
            reports.append(json.loads(path.read_text()) if path.is_file() else {"kernels": [], "seconds": None,
                                                                                "kernels_in_run": None})
        owned = [k["key"] for r in reports for k in r["kernels"]]
        kernels_in_run = reports[0]["kernels_in_run"] or 0
        with_trials = [k for r in reports for k in r["kernels"] if k["planned"] > 0]
        entries = bucket_entries(s3, prefix + "/")
        folders = [key.rsplit("/", 2)[-2] for key in entries]
        row = ShardRun(
            shards=n, wall_seconds=round(wall, 3), returncodes=[c.returncode for c in cmds],
            shard_seconds=[r["seconds"] for r in reports],
            shard_cpu_seconds=[c.cpu_seconds for c in cmds],
            shard_trials=[sum(k["searched"] for k in r["kernels"]) for r in reports],
            kernels=kernels_in_run,
            owned_once=len(owned) == len(set(owned)) == kernels_in_run > 0,
            searched_to_plan=all(k["searched"] == k["planned"] for r in reports for k in r["kernels"]),
            entries=len(entries), kernels_with_trials=len(with_trials),
            one_entry_each=len(folders) == len(set(folders)) == len(with_trials),
        )
        fresh = make_project(work / f"shards{n}" / "fresh", text, models)
        cmd = mlci(f"b. fresh runner after {n} shard(s)", fresh, env, "run", "-m", SHARDED_MODEL, "--no-tracking")
        results = results_of(fresh)
        row.fresh_run = {"wall_seconds": cmd.wall_seconds, "returncode": cmd.returncode,
                         "trials_new": trials_new(results), "statuses": statuses(results)}
        try:
            row.fresh_run.update(compare_with_merged(work / f"shards{n}", fresh, projects))
        except Exception as exc:  # noqa: BLE001 - reported, the other shard counts go on
            row.fresh_run["compare_error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return {"runs": [asdict(r) for r in rows],
            "goal_met": all(r.owned_once and r.searched_to_plan and r.one_entry_each and r.fresh_run.get("build_key_same")
                            and r.fresh_run.get("trials_new") == 0 and not any(r.returncodes) for r in rows)}


# --- c. faults ---------------------------------------------------------------------------------


@contextlib.contextmanager
def hung_server() -> Iterator[int]:
    """A port that accepts connections and never answers them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        listener.close()


def mlflow_runs(uri: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiments = client.search_experiments()
    return sum(len(client.search_runs([e.experiment_id], max_results=1000)) for e in experiments)


def part_c(work: Path, s3_url: str, warm: Path) -> dict[str, Any]:
    rows = []
    with hung_server() as hung_port:
        scenarios = [
            ("normal", {}, []),
            ("bucket down", {"AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}, []),
            ("MLflow down", {}, ["--tracking-uri", f"http://127.0.0.1:{free_port()}"]),
            ("MLflow hung", {}, ["--tracking-uri", f"http://127.0.0.1:{hung_port}"]),
        ]
        for label, env_changes, args in scenarios:
            project = work / "faults" / label.replace(" ", "-")
            shutil.copytree(warm, project, ignore=shutil.ignore_patterns("results", "mlflow.db", "mlartifacts", "*.log"))
            env = {**base_env(s3_url), **env_changes}
            cmd = mlci(f"c. {label}", project, env, "run", *args)
            results = results_of(project)
            row: dict[str, Any] = {"scenario": label, "wall_seconds": cmd.wall_seconds, "returncode": cmd.returncode,
                                   "statuses": statuses(results), "models": len(results["models"])}
            if args:  # MLflow failed: sync into a fresh store, twice
                store = f"sqlite:///{project / 'synced.db'}"
                results_path = project / ".mlci" / "results" / "cpu.json"
                first = mlci(f"c. {label}: sync", project, env, "sync", str(results_path), "--tracking-uri", store)
                after_first = mlflow_runs(store)
                second = mlci(f"c. {label}: sync again", project, env, "sync", str(results_path), "--tracking-uri", store)
                row.update(sync_returncodes=[first.returncode, second.returncode], runs_after_sync=after_first,
                           runs_after_second_sync=mlflow_runs(store),
                           pending_left=(project / ".mlci" / "results" / "cpu.json.mlflow-pending").exists())
            rows.append(row)
    normal = rows[0]
    for row in rows:
        row["extra_seconds"] = round(row["wall_seconds"] - normal["wall_seconds"], 3)
        row["exit_unchanged"] = row["returncode"] == normal["returncode"]
        row["goal_met"] = (row["extra_seconds"] <= FAULT_EXTRA_GOAL_S and row["exit_unchanged"]
                           and row.get("runs_after_sync", row["models"]) == row["models"]
                           and row.get("runs_after_second_sync", row["models"]) == row["models"])
    return {"scenarios": rows, "goal_met": all(r["goal_met"] for r in rows)}


# --- tables ------------------------------------------------------------------------------------


def _ok(flag: bool) -> str:
    return "[green]yes[/green]" if flag else "[red]NO[/red]"


def table_a(a: dict[str, Any]) -> Table:
    table = Table(title="a. runners in turn, one bucket, each with an empty local cache", title_justify="left")
    for header in ("runner", "wall s", "/ runner 1", "exit", "new trials", "kernels from S3", "statuses"):
        table.add_column(header, justify="left" if header in ("runner", "statuses") else "right")
    first = a["runners"][0]["wall_seconds"]
    for r in a["runners"]:
        ratio = r["wall_seconds"] / first
        shown = f"{ratio:.3f}"
        if r["runner"] > 1:
            colour = "green" if ratio <= WARM_OVER_FIRST_GOAL else "red"
            shown = f"[{colour}]{shown}[/{colour}] (goal <={WARM_OVER_FIRST_GOAL})"
        trials = str(r["trials_new"]) if r["runner"] == 1 else (
            "[green]0[/green]" if r["trials_new"] == 0 else f"[red]{r['trials_new']}[/red] (goal 0)")
        table.add_row(str(r["runner"]), f"{r['wall_seconds']:.1f}", shown, str(r["returncode"]), trials,
                      str(r["kernels_from_remote"]), ", ".join(f"{k}={v}" for k, v in r["statuses"].items()))
    return table


def table_b(b: dict[str, Any]) -> Table:
    table = Table(title=f"b. sharded tuning of {SHARDED_MODEL}, one core per shard; then a fresh runner",
                  title_justify="left")
    for header in ("shards", "wall s", "CPU s per shard", "trials per shard", "kernels", "each once", "S3 entries",
                   "fresh: wall s", "fresh: new trials", "same best record", "same build key"):
        table.add_column(header, justify="right")
    for r in b["runs"]:
        fresh = r["fresh_run"]
        same = (f"{fresh.get('kernels_same_best_record')}/{fresh.get('kernels')}" if "kernels" in fresh
                else f"[red]{fresh.get('compare_error', '-')}[/red]")
        cpu = " ".join(f"{c:.0f}" for c in r["shard_cpu_seconds"] if c is not None)
        table.add_row(str(r["shards"]), f"{r['wall_seconds']:.1f}", cpu, " ".join(map(str, r["shard_trials"])),
                      str(r["kernels"]), _ok(r["owned_once"] and r["searched_to_plan"] and r["one_entry_each"]),
                      f"{r['entries']}/{r['kernels_with_trials']}", f"{fresh['wall_seconds']:.1f}",
                      str(fresh["trials_new"]), same, _ok(bool(fresh.get("build_key_same"))))
    return table


def table_c(c: dict[str, Any]) -> Table:
    table = Table(title="c. the same `mlci run` (warm local cache) with a server failing", title_justify="left")
    for header in ("scenario", "wall s", "extra s", "exit", "MLflow runs after sync (x2)", "goal"):
        table.add_column(header, justify="left" if header == "scenario" else "right")
    for r in c["scenarios"]:
        synced = (f"{r['runs_after_sync']}, {r['runs_after_second_sync']} of {r['models']}"
                  if "runs_after_sync" in r else "-")
        table.add_row(r["scenario"], f"{r['wall_seconds']:.1f}", f"{r['extra_seconds']:+.1f}", str(r["returncode"]),
                      synced, _ok(r["goal_met"]))
    return table


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=None, help="trials per model (default 32; 8 with --quick)")
    parser.add_argument("--samples", type=int, default=None, help="latency samples (default 20; 8 with --quick)")
    parser.add_argument("--runners", type=int, default=None, help="runners in part a (default 3; 2 with --quick)")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4], help="shard counts of part b")
    parser.add_argument("--parts", default="abc", help="which parts to run (default: abc)")
    parser.add_argument("--quick", action="store_true", help="a quick try: fewer trials, samples and runners")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output (default: %(default)s)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    args.trials = args.trials if args.trials is not None else (8 if args.quick else 32)
    args.samples = args.samples if args.samples is not None else (8 if args.quick else 20)
    args.runners = args.runners if args.runners is not None else (2 if args.quick else 3)
    if args.trials < 1 or args.samples < 1 or args.runners < 1 or any(n < 1 for n in args.shards):
        parser.error("--trials, --samples, --runners and --shards must be positive")
    if "c" in args.parts and "a" not in args.parts:
        parser.error("part c reruns part a's first runner: run a with it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mlci-bench-shared-"))
    target = one_core_target()
    payload: dict[str, Any] = {
        "benchmark": "shared_cache",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "trials": args.trials, "samples": args.samples, "tvm_target": target, "cpus": os.cpu_count(),
        "load_average_start": list(os.getloadavg()),
    }
    models = work / "models"
    subprocess.run([sys.executable, str(EXAMPLES / "make_models.py"), str(models)], check=True, capture_output=True)
    tables = []
    try:
        with moto_server() as server:
            s3 = server.s3()
            s3.create_bucket(Bucket=BUCKET)
            if "a" in args.parts:
                text = config_text(args.trials, args.samples, f"s3://{BUCKET}/runners", target)
                payload["a"] = part_a(work / "a", server.url, text, args.runners, models)
                tables.append(table_a(payload["a"]))
            if "b" in args.parts:
                payload["b"] = part_b(work / "b", s3, server.url, args.trials, args.samples, target, args.shards, models)
                tables.append(table_b(payload["b"]))
            if "c" in args.parts:
                payload["c"] = part_c(work / "c", server.url, work / "a" / "runner1")
                tables.append(table_c(payload["c"]))
    finally:
        payload["load_average_end"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        if args.keep_tmp:
            err.print(f"kept {work}", markup=False)
        else:
            shutil.rmtree(work, ignore_errors=True)
    for table in tables:
        out.print(table)
    goals = {part: payload[part]["goal_met"] for part in "abc" if part in payload}
    out.print("goals: " + ", ".join(f"{part} {'met' if met else 'MISSED'}" for part, met in goals.items()))
    out.print(f"json: {args.out}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
