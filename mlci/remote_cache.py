"""The tuning cache's second level on S3: what one runner tuned reaches every runner.

Each entry is an immutable object, one per kernel, fingerprint and writer:
``PREFIX/TIER/FINGERPRINT/WORKLOAD_SHA/WRITER.tTRIALS.json``. FINGERPRINT is the local cache directory's
name (target and fingerprint key), WORKLOAD_SHA the sha256 of the kernel's workload as MetaSchedule
saves it, WRITER unique to the run and TRIALS the trials the entry holds. Nothing is ever overwritten, so two runners writing the same
kernel at once leave one entry each and no index or lock is needed: a reader lists a kernel's entries
and takes the one with the most trials.

Every entry is untrusted: one that is too large, is not JSON, names another workload, or holds
records that do not apply to the kernel is skipped with a warning naming its key. S3 failing in any
way (unreachable, denied, throttled, no bucket) costs one warning and seconds; the run goes on with
the local cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from mlci.config import s3_url_problem
from mlci.formatting import quoted_for_log
from mlci.policy import SHARED_TIER
from mlci.tuning import (
    RECORDS_FILE,
    WORKLOADS_FILE,
    Kernel,
    TuningCache,
    _lines,
    _read_record,
    _read_workload,
    _why,
)

log = logging.getLogger("mlci")

FORMAT_VERSION = 1
MAX_ENTRY_BYTES = 1 << 20
"""An entry larger than this is not read (a kernel's few best records take a few KiB)."""
TOP_RECORDS = 4
"""Best records of a kernel an entry carries: enough to seed a further search."""
MAX_LISTED_PER_KERNEL = 1000
"""Keys of one kernel's folder listed at most (one ListObjectsV2 page)."""
MAX_READS_PER_KERNEL = 4
"""Entries of one kernel read at most before the kernel goes without the remote level: garbage
entries written to a shared tier cost a few reads, not one each."""
CONNECT_TIMEOUT_S = 2.0
READ_TIMEOUT_S = 5.0
MAX_ATTEMPTS = 2
"""Each S3 call is tried at most this often: S3 down must cost seconds, not minutes."""
CONFLICT_RETRIES = 3
DEADLINE_ENV = "MLCI_S3_DEADLINE"
DEFAULT_DEADLINE_S = 20.0
"""Seconds one S3 read of the run's entries, or one write, may take in all (a slow S3 costs this once:
the level is then off for the run)."""
FAILED_RUN_SECS = 1e9
"""MetaSchedule records a candidate that failed to build or run with a huge time (1e10 s)."""


def deadline_s() -> float:
    """`MLCI_S3_DEADLINE` seconds, or the default when unset or not a positive number."""
    try:
        value = float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S))
    except ValueError:
        return DEFAULT_DEADLINE_S
    return value if value > 0 and math.isfinite(value) else DEFAULT_DEADLINE_S


class RemoteCacheError(ValueError):
    """A cache URL that cannot name an S3 location."""


def parse_url(url: str) -> tuple[str, str]:
    """Bucket and key prefix of ``s3://bucket/prefix``; raises RemoteCacheError naming what is wrong."""
    problem = s3_url_problem(url)
    if problem:
        raise RemoteCacheError(f"cache url {problem}")
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.strip("/")


def workload_line(kernel: Kernel) -> list[str]:
    """The kernel's workload as MetaSchedule saves it in its database: [structural hash, module]."""
    from tvm.s_tir import meta_schedule as ms

    return [str(x) for x in ms.database.Workload(kernel.task.dispatched[0]).as_json()]


def workload_sha(saved_module: str) -> str:
    """sha256 of the saved (serialized) workload module: the same kernel hashes the same in every
    process, which an in-memory structural hash does not promise across TVM builds."""
    return hashlib.sha256(saved_module.encode()).hexdigest()


def writer_id() -> str:
    """Unique to this run: the GitHub run and attempt where there is one, and a random suffix."""
    run = os.environ.get("GITHUB_RUN_ID", "local")
    attempt = os.environ.get("GITHUB_RUN_ATTEMPT", "1")
    return f"{run}-{attempt}-{secrets.token_hex(4)}"


@dataclass
class Entry:
    """One kernel's tuning as a writer left it, checked."""

    key: str
    trials: int
    workload: list[str]
    records: list[Any]
    default_seconds: float | None = None
    """Measured seconds per call of the kernel's rule-based default schedule, where the writer timed it."""


@dataclass
class PullReport:
    kernels_from_remote: list[str] = field(default_factory=list)
    """Names of the kernels whose records came from S3 (the local cache had fewer trials)."""
    skipped: list[str] = field(default_factory=list)
    """Keys of the entries that were not trusted."""


class RemoteCache:
    """S3 entries of one bucket and prefix, written to `tier` and read from the shared tier and `tier`.

    `writes=False` reads only (a pull request configured not to write). The first S3 failure turns
    the remote off for the rest of the run, with one warning."""

    def __init__(self, url: str, tier: str = SHARED_TIER, *, client: Any = None, writes: bool = True):
        self.url = url
        self.bucket, self.prefix = parse_url(url)
        if not tier or "/" in tier:
            raise RemoteCacheError(f"cache tier {tier!r} must be a non-empty name without '/'")
        self.tier = tier
        self.writes = writes
        self.writer = writer_id()
        self._client = client
        self.failed: str | None = None
        """Why S3 was given up on this run (None while it works)."""

    @property
    def read_tiers(self) -> list[str]:
        return [SHARED_TIER] if self.tier == SHARED_TIER else [SHARED_TIER, self.tier]

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", config=Config(
                connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"}))
        return self._client

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _give_up(self, action: str, exc: BaseException) -> None:
        if self.failed:  # told once (a call left behind at the deadline may fail later)
            return
        self.failed = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
        log.warning("tuning cache on S3 (%s): %s failed (%s); going on with the local cache only",
                    self.url, action, self.failed)

    # reading

    def _list(self, tier: str, fingerprint: str, sha: str, kernel: Kernel) -> list[str]:
        """Keys of one kernel's entries in a tier: one listing of its own folder, at most MAX_LISTED_PER_KERNEL
        keys (a tier the default branch has written for months lists in one call per kernel, not in
        thousands of pages for the whole fingerprint)."""
        prefix = self._key(tier, fingerprint, sha) + "/"
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=MAX_LISTED_PER_KERNEL)
        if page.get("IsTruncated"):
            log.warning("tuning cache on S3: kernel %s has more than %d entries in %s: only the first %d listed "
                        "are considered (delete superseded entries, see the README)", kernel.name,
                        MAX_LISTED_PER_KERNEL, quoted_for_log(prefix), MAX_LISTED_PER_KERNEL)
        return [obj["Key"] for obj in page.get("Contents", [])]

    def _read(self, key: str, sha: str, kernel: Kernel, claimed: int) -> Entry | None:
        """The entry at `key`, or None (with one warning) when it is not to be trusted."""
        def skip(why: str) -> None:
            log.warning("tuning cache on S3: skipping %s: %s", quoted_for_log(key), why)

        response = self.client.get_object(Bucket=self.bucket, Key=key)  # its body is read only when small
        length = int(response.get("ContentLength", 0))
        if length > MAX_ENTRY_BYTES:
            response["Body"].close()
            skip(f"{length} bytes, more than the {MAX_ENTRY_BYTES} an entry may have")
            return None
        data = response["Body"].read(MAX_ENTRY_BYTES + 1)
        try:
            return _check_entry(key, data, sha, kernel, claimed)
        except (ValueError, RecursionError, TypeError, KeyError) as exc:
            skip(_why(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}")
            return None

    def best_entries(self, fingerprint: str, kernels: list[Kernel],
                     report: PullReport | None = None) -> dict[str, Entry]:
        """`_best_entries` within the S3 deadline: {} (and the S3 level off) when S3 takes longer."""
        return self._within_deadline("reading", {}, self._best_entries, fingerprint, kernels, report)

    def _best_entries(self, fingerprint: str, kernels: list[Kernel],
                      report: PullReport | None = None) -> dict[str, Entry]:
        """Kernel key -> the trusted entry with the most trials, over the tiers this run reads. Entry
        names say their trials, so a kernel's entries are read most first until one is trusted: one
        download a kernel, however many runs wrote it."""
        if self.failed:
            return {}
        shas = {workload_sha(workload_line(k)[1]): k for k in kernels}
        report = report if report is not None else PullReport()
        best: dict[str, Entry] = {}
        try:
            candidates: dict[str, list[tuple[int, str]]] = {}
            for tier in self.read_tiers:
                listed = [(key, sha) for sha, kernel in shas.items() for key in self._list(tier, fingerprint, sha, kernel)]
                for key, sha in listed:
                    name = key.rpartition("/")[2]
                    claimed = _claimed_trials(name)
                    why = ("its name holds control characters" if not key.isprintable()
                           else "its name does not say its trials (WRITER.tTRIALS.json)" if claimed is None else None)
                    if why:
                        log.warning("tuning cache on S3: skipping %s: %s", quoted_for_log(key), why)
                        report.skipped.append(key)
                        continue
                    candidates.setdefault(sha, []).append((claimed, key))
            for sha, found in candidates.items():
                kernel = shas[sha]
                ranked = sorted(found, reverse=True)
                for claimed, key in ranked[:MAX_READS_PER_KERNEL]:
                    entry = self._read(key, sha, kernel, claimed)
                    if entry is not None:
                        best[kernel.key] = entry
                        break
                    report.skipped.append(key)
                else:
                    if len(ranked) > MAX_READS_PER_KERNEL:
                        log.warning("tuning cache on S3: kernel %s: its %d entries with the most trials were not "
                                    "to be trusted; its %d others are not read", kernel.name,
                                    MAX_READS_PER_KERNEL, len(ranked) - MAX_READS_PER_KERNEL)
        except Exception as exc:  # noqa: BLE001 - S3 failing in any way costs the remote level, never the run
            self._give_up("reading", exc)
            return {}
        return best

    # writing

    def put_entry(self, fingerprint: str, kernel: Kernel, trials: int, workload: list[str],
                  records: list[Any], default_seconds: float | None = None) -> str | None:
        """`_put_entry` within the S3 deadline: None (and the S3 level off) when S3 takes longer."""
        return self._within_deadline("writing", None, self._put_entry, fingerprint, kernel, trials, workload,
                                     records, default_seconds)

    def _within_deadline(self, action: str, fallback: Any, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` given at most `deadline_s()` seconds: botocore's timeouts bound each read, not
        a response trickled a byte at a time, so the call runs in a daemon thread that is left behind
        (its result unused) when the time is up."""
        if self.failed:
            return fallback
        outcome: list[Any] = []

        def run() -> None:
            try:
                outcome.append((True, call(*args)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.append((False, exc))

        worker = threading.Thread(target=run, name=f"mlci-s3-{action}", daemon=True)
        worker.start()
        limit = deadline_s()
        worker.join(limit)
        if not outcome:
            self._give_up(action, TimeoutError(f"S3 did not answer within {limit:g} s ({DEADLINE_ENV})"))
            return fallback
        ok, value = outcome[0]
        if ok:
            return value
        raise value

    def _put_entry(self, fingerprint: str, kernel: Kernel, trials: int, workload: list[str],
                   records: list[Any], default_seconds: float | None = None) -> str | None:
        """Write one kernel's entry; its key, or None when nothing was written. An entry that is
        already there (a retried request of this writer) counts as written."""
        if self.failed or not self.writes:
            return None
        from botocore.exceptions import ClientError

        key = self._key(self.tier, fingerprint, workload_sha(workload[1]), f"{self.writer}.t{trials}.json")
        body = json.dumps({
            "format": FORMAT_VERSION,
            "kernel": kernel.name,
            "trials": trials,
            "workload": workload,
            "records": records,
            "default_seconds": default_seconds,
            "writer": {"id": self.writer, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **{k.lower(): v for k in ("GITHUB_REPOSITORY", "GITHUB_SHA", "GITHUB_REF")
                          if (v := os.environ.get(k))}},
        }, sort_keys=True).encode()
        try:
            for attempt in range(CONFLICT_RETRIES + 1):
                try:
                    self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*",
                                           ContentType="application/json")
                    return key
                except ClientError as exc:
                    code = exc.response.get("Error", {}).get("Code", "")
                    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                    if code == "PreconditionFailed" or status == 412:
                        return key  # already there: this writer's earlier attempt got through
                    if (code == "ConditionalRequestConflict" or status == 409) and attempt < CONFLICT_RETRIES:
                        time.sleep(0.2 * 2 ** attempt * (1 + random.random()))
                        continue
                    raise
        except Exception as exc:  # noqa: BLE001 - S3 failing in any way costs the remote level, never the run
            self._give_up("writing", exc)
        return None


def _claimed_trials(name: str) -> int | None:
    """The trials an entry's name (WRITER.tTRIALS.json) says it holds; None when it says none."""
    match = re.fullmatch(r"[^/]+\.t(\d{1,12})\.json", name)
    return int(match.group(1)) if match else None


def _check_entry(key: str, data: bytes, sha: str, kernel: Kernel, claimed: int) -> Entry:
    """Raises ValueError saying why the entry cannot be trusted for this kernel."""
    from tvm.s_tir import meta_schedule as ms

    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_VERSION:
        raise ValueError(f"not an entry of format {FORMAT_VERSION}")
    trials, workload, records = obj.get("trials"), obj.get("workload"), obj.get("records")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise ValueError(f"{trials!r} is not a count of trials")
    if trials != claimed:
        raise ValueError(f"it holds {trials} trials, its name says {claimed}")
    if not (isinstance(workload, list) and len(workload) == 2 and all(isinstance(w, str) for w in workload)):
        raise ValueError("its workload is not a [hash, module] pair")
    if workload_sha(workload[1]) != sha:  # the key's hash is the kernel's: that is how it was found
        raise ValueError(f"its workload is not the one its key names (kernel {kernel.name})")
    if not isinstance(records, list) or not records:
        raise ValueError("it holds no records")
    parsed = _read_workload(json.dumps(workload).encode())
    for record in records:
        _read_record(json.dumps([0, record]).encode(), [parsed])
        try:
            ms.database.TuningRecord.from_json(record, parsed.workload)
        except Exception as exc:  # noqa: BLE001 - whatever TVM raises on a schedule that does not apply
            raise ValueError(f"a record whose schedule does not apply to the workload ({_why(exc)})") from exc
    default = obj.get("default_seconds")
    if default is not None and (isinstance(default, bool) or not isinstance(default, int | float)
                                or not math.isfinite(default) or default <= 0):
        raise ValueError(f"its default schedule's time {default!r} is not a number of seconds")
    return Entry(key=key, trials=trials, workload=workload, records=records,
                 default_seconds=None if default is None else float(default))


def _mean(run_secs: Any) -> float:
    if not run_secs:
        return math.inf
    secs = [float(s) for s in run_secs]
    mean = sum(secs) / len(secs)
    return mean if mean < FAILED_RUN_SECS else math.inf


def local_entries(cache: TuningCache, kernels: list[Kernel], top_k: int = TOP_RECORDS) -> dict[str, tuple]:
    """Kernel key -> (workload line, best record JSONs) as the local database saved them: the lines
    themselves, so a record reads back on another runner exactly as MetaSchedule wrote it."""
    cache.database  # noqa: B018 - opening it checks the files
    files = cache.files
    wanted = {k.key for k in kernels}
    workloads: dict[int, tuple[str, list[str]]] = {}
    path = files / WORKLOADS_FILE
    for index, line in enumerate(_lines(path.read_bytes()) if path.exists() else []):
        obj = json.loads(line)
        key = f"{int(obj[0]) & 0xFFFFFFFFFFFFFFFF:016x}"
        if key in wanted:
            workloads[index] = (key, obj)
    found: dict[str, tuple[list[str], list[tuple[float, Any]]]] = {}
    path = files / RECORDS_FILE
    for line in _lines(path.read_bytes()) if path.exists() else []:
        index, record = json.loads(line)
        if index not in workloads:
            continue
        key, workload = workloads[index]
        mean = _mean(record[1])
        if math.isfinite(mean):
            found.setdefault(key, (workload, []))[1].append((mean, record))
    return {key: (workload, [r for _, r in sorted(records, key=lambda m: m[0])[:top_k]])
            for key, (workload, records) in found.items()}


def local_trials(cache: TuningCache, kernel: Kernel, ledger: dict[str, int]) -> int:
    return max(ledger.get(kernel.key, 0), len(cache.valid_records(kernel)))


def pull(cache: TuningCache, kernels: list[Kernel], remote: RemoteCache, max_trials: int = 0) -> PullReport:
    """Before tuning: bring into the local cache each kernel's remote records where S3 holds more
    trials than the local cache, and credit the local ledger with them, so tuning searches only
    what the budget owes beyond what any runner already searched. An entry's trial count is its
    writer's word: with `max_trials` (the run's budget), no kernel is credited more than that, so a
    claim of 10^12 costs at most this run's search, and a larger budget later searches again."""
    from tvm.s_tir import meta_schedule as ms

    report = PullReport()
    fingerprint = cache.dir.name
    entries = remote.best_entries(fingerprint, kernels, report)
    if not entries:
        return report
    with cache.lock():
        ledger = cache.ledger()
        defaults = cache.default_seconds()
        database = cache.database
        changed = False
        for kernel in kernels:
            entry = entries.get(kernel.key)
            local = local_trials(cache, kernel, ledger)
            if entry is None or entry.trials <= local or 0 < max_trials <= local:
                continue  # the local cache holds as much, or all the budget asks
            workload = database.commit_workload(kernel.task.dispatched[0])
            for record in entry.records:
                database.commit_tuning_record(ms.database.TuningRecord.from_json(record, workload))
            ledger[kernel.key] = min(entry.trials, max_trials) if max_trials > 0 else entry.trials
            if entry.default_seconds is not None and kernel.key not in defaults:
                defaults[kernel.key] = entry.default_seconds  # so the build weighs the records as the writer's did
            report.kernels_from_remote.append(kernel.name)
            changed = True
        if changed:
            cache.save_ledger(ledger)
            cache.save_default_seconds(defaults)
    if report.kernels_from_remote:
        log.info("tuning cache on S3: records of %d kernel(s) taken from %s", len(report.kernels_from_remote),
                 remote.url)
    return report


def push(cache: TuningCache, kernels: list[Kernel], remote: RemoteCache,
         before: dict[str, int] | None = None) -> list[str]:
    """After tuning: write an entry for each kernel that gained trials since `before` (the ledger
    then; every kernel with trials when None). Returns the keys written."""
    if remote.failed or not remote.writes:
        return []
    with cache.lock():
        ledger = cache.ledger()
        gained = [k for k in kernels if ledger.get(k.key, 0) > (before or {}).get(k.key, 0)]
        saved = local_entries(cache, gained) if gained else {}
        defaults = cache.default_seconds()
    written = []
    seen = set()
    for kernel in gained:
        if kernel.key in seen or kernel.key not in saved:
            continue
        seen.add(kernel.key)
        _, records = saved[kernel.key]
        key = remote.put_entry(cache.dir.name, kernel, ledger[kernel.key], workload_line(kernel), records,
                               defaults.get(kernel.key))
        if key is None and remote.failed:
            break
        if key is not None:
            written.append(key)
    return written
