"""Reading `mlci history`'s runs from MLflow: the adapter between the store and `mlci.trend`.

It reads what `mlci.tracking` logged (tags, metrics, each run's results.json) through the same
client setup: MLflow's HTTP timeouts bounded, and the whole read given up after
MLCI_MLFLOW_DEADLINE seconds (default 60), so that a server that does not answer costs a bounded
wait and a clear error, never a hang. It only reads: a sqlite store or an experiment that does not
exist yet is "no runs", and is not created.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from mlci.results import Results, ResultsError
from mlci.tracking import (
    _HTTP_DEFAULTS,
    DEADLINE_ENV,
    Tracker,
    _iso,
    _quote,
    _sqlite_path,
    tracking_deadline,
    without_credentials,
)
from mlci.trend import RunRecord, latest_commits

MAX_RUNS = 20_000
"""Runs read at most from one branch (newest first); a longer history is cut, and the report says so."""
_PAGE = 1000


class HistoryStoreError(Exception):
    """The tracking store cannot be read (unreachable, refused, too slow): the message names it."""


@dataclass
class StoreRuns:
    """The runs of one branch, as records, and what else the store knows (to name it when a filter finds nothing)."""

    records: list[RunRecord]
    models: list[str] = field(default_factory=list)
    """Models with runs on the branch (all of them, whatever the filters)."""
    targets: list[str] = field(default_factory=list)
    store_exists: bool = True
    """False when the sqlite file or the experiment does not exist (nothing logged yet)."""
    truncated: bool = False


class HistoryStore(Tracker):
    """A Tracker that opens an experiment and never creates one (nor a sqlite store): history only reads.

    It keeps Tracker's results.json download and run links; `uri` here has no credentials in it,
    since it only makes links."""

    def __init__(self, uri: str, experiment: str):  # noqa: D107 - Tracker's would create what is missing
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # mlflow sets its logger to INFO on import
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = without_credentials(uri)
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id: str | None = found.experiment_id if found else None

    def branch_runs(self, branch: str, model: str | None, target: str | None) -> tuple[list[Any], bool]:
        """Runs on `branch` (newest first), at most MAX_RUNS, and whether there were more."""
        query = f"tags.`mlci.branch` = '{_quote(branch)}'"
        if model:
            query += f" and tags.`mlci.model` = '{_quote(model)}'"
        if target:
            query += f" and tags.`mlci.target` = '{_quote(target)}'"
        runs: list[Any] = []
        token = None
        while len(runs) < MAX_RUNS:
            page = self.client.search_runs([self.experiment_id], query, max_results=_PAGE,
                                           order_by=["attributes.start_time DESC"], page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs, False
        return runs[:MAX_RUNS], True

    def names_on(self, branch: str) -> tuple[list[str], list[str]]:
        """The models and targets that have runs on `branch`: what a filter that found nothing can be told."""
        runs, _ = self.branch_runs(branch, None, None)
        return (sorted({r.data.tags.get("mlci.model", "") for r in runs} - {""}),
                sorted({r.data.tags.get("mlci.target", "") for r in runs} - {""}))


def record_of(run: Any, run_url: str | None) -> RunRecord | None:
    """The record of one MLflow run logged by mlci (None for a run without mlci's model and target tags)."""
    tags, metrics = run.data.tags, run.data.metrics
    model, target = tags.get("mlci.model"), tags.get("mlci.target")
    if not model or not target:
        return None
    trials = metrics.get("trials_new")
    return RunRecord(
        run_id=run.info.run_id, model=model, target=target, commit=tags.get("mlci.commit") or None,
        started_ms=run.info.start_time or 0, created_at=_iso(run.info.start_time), status=run.info.status,
        run_url=run_url, branch=tags.get("mlci.branch") or None, fingerprint=tags.get("mlci.fingerprint") or None,
        tvm_version=run.data.params.get("tvm_version"), median_ms=metrics.get("latency_ms_median"),
        onnxruntime_median_ms=metrics.get("onnxruntime_median_ms"), speedup=metrics.get("speedup_vs_onnxruntime"),
        trials_new=int(trials) if trials is not None and math.isfinite(trials) else None,
    )


def with_results(record: RunRecord, stored: dict[str, Any] | None) -> RunRecord:
    """`record` with what its results.json adds: the samples, the full fingerprint, the threshold that counted."""
    import dataclasses

    if stored is None:
        return dataclasses.replace(record, samples_problem="the MLflow run's results.json is missing or could not be "
                                                            "downloaded: not compared")
    try:
        results = Results.from_dict(stored)
    except ResultsError as exc:
        return dataclasses.replace(record, samples_problem=f"the run's results.json is unreadable ({exc}): not compared")
    model = next((m for m in results.models if m.name == record.model), None)
    if model is None:
        return dataclasses.replace(record, samples_problem=f"the run's results.json has no model {record.model!r}: "
                                                            "not compared")
    fingerprint = results.target.fingerprint
    gate = results.gate
    latency = model.latency_ms
    return dataclasses.replace(
        record,
        samples=list(latency.samples) if latency else [],
        median_ms=latency.median if latency else record.median_ms,  # the median of exactly these samples
        environment=fingerprint.as_dict(),
        fingerprint=record.fingerprint or fingerprint.hash,
        tvm_version=fingerprint.tvm or record.tvm_version,
        threshold=model.threshold if model.threshold is not None else (gate.threshold if gate else None),
        confidence=gate.confidence if gate else None,
        price_per_hour=results.target.price_per_hour,
    )


def read_runs(uri: str, experiment: str, *, branch: str, model: str | None = None, target: str | None = None,
              limit: int | None = None, deadline: float | None = None) -> StoreRuns:
    """The runs of `branch` (pull requests' runs left out: they belong to their PR, even one from a fork's
    branch of the same name), the newest `limit` commits of each model x target with their results.json.

    Raises HistoryStoreError when the store cannot be read within `deadline` seconds (None:
    MLCI_MLFLOW_DEADLINE, else 60)."""
    sqlite = _sqlite_path(uri)
    if sqlite is not None and not sqlite.exists():
        return StoreRuns([], store_exists=False)
    if deadline is None:
        deadline, _ = tracking_deadline()
    return _bounded(lambda: _read(uri, experiment, branch, model, target, limit), uri, deadline)


def _read(uri: str, experiment: str, branch: str, model: str | None, target: str | None,
          limit: int | None) -> StoreRuns:
    store = HistoryStore(uri, experiment)
    if store.experiment_id is None:
        return StoreRuns([], store_exists=False)
    runs, truncated = store.branch_runs(branch, model, target)
    records = [r for run in runs if not run.data.tags.get("mlci.pr")
               if (r := record_of(run, store.run_url(run.info.run_id))) is not None]
    chosen = latest_commits(records, limit)
    # One download per run: over HTTP several at a time (a few hundred runs one by one would take most of the deadline).
    workers = 8 if uri.startswith(("http://", "https://")) else 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mlci-history-artifacts") as pool:
        stored = list(pool.map(lambda r: store._stored_results(r.run_id), chosen))
    filled = [with_results(r, s) for r, s in zip(chosen, stored, strict=True)]
    models, targets = store.names_on(branch) if not filled else ([], [])
    return StoreRuns(filled, models=models, targets=targets, truncated=truncated)


def _bounded(read: Callable[[], StoreRuns], uri: str, deadline: float) -> StoreRuns:
    """`read()` in a worker thread, given up after `deadline` seconds; MLflow and network errors as HistoryStoreError."""
    from mlflow.exceptions import MlflowException

    outcome: list[StoreRuns | BaseException] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            outcome.append(read())
        except (MlflowException, OSError) as exc:  # the store's trouble, not mlci's
            outcome.append(exc)
        except BaseException as exc:  # a bug: raised again in the caller's thread, as an internal error
            failure.append(exc)

    shown = without_credentials(uri)
    worker = threading.Thread(target=work, name="mlci-history", daemon=True)  # daemon: a hung server must not keep mlci
    worker.start()
    worker.join(deadline if math.isfinite(deadline) else None)
    if worker.is_alive():
        raise HistoryStoreError(f"MLflow at {shown} did not answer within {deadline:g} s ({DEADLINE_ENV})")
    if failure:
        raise failure[0]
    result = outcome[0]
    if isinstance(result, BaseException):
        text = str(result).replace(uri, shown).strip()
        raise HistoryStoreError(f"cannot read MLflow at {shown}: {text.splitlines()[0] if text else type(result).__name__}")
    return result
