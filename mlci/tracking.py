"""MLflow logging: one run per commit x model x target.

Uses `MlflowClient` (create_run + log_batch + set_terminated) rather than the
fluent API: 0.05 s against 0.33 s a run, and no global active-run state.
Tags are set explicitly since MLflow's own git detection fails on detached
HEADs in CI. Each run carries an idempotency key (`mlci.job_key`) so a retried
create never leaves duplicates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from mlci.config import seconds_from_env
from mlci.results import (
    Fingerprint,
    GitInfo,
    History,
    Latency,
    ModelResult,
    Results,
    Status,
    TrendPoint,
    write_results,
)

# MLflow's defaults (7 retries, backoff factor 2, 120 s a read) hang each call for minutes on a down
# server. These bound one call to about half a minute; the user's own settings win.
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
DEADLINE_ENV = "MLCI_MLFLOW_DEADLINE"
DEADLINE_S = 60.0
"""Seconds the whole tracking phase (history lookups and logging) may take by default. A read timeout
alone does not bound it: a server that sends a byte every few seconds never trips one."""


def _sqlite_path(uri: str) -> Path | None:
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


SECRET_QUERY_KEYS = ("token", "password", "passwd", "pwd", "secret", "key", "signature", "sig", "credential", "auth")
"""Query parameters whose value is a secret when their name contains one of these (`access_token`,
`X-Amz-Signature`, `api_key`...)."""


def without_credentials(uri: str) -> str:
    """`uri` without a user name or password (any scheme: `https://u:p@`, `postgresql://u:p@`) and with
    secret-looking query values replaced by `***`, for links, messages and files (a PR comment and a
    run's artifacts may be public)."""
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:
        return "<a tracking URI that does not parse>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        query = urllib.parse.urlencode([(k, "***" if any(s in k.lower() for s in SECRET_QUERY_KEYS) else v)
                                        for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


def run_name(model: str, target: str) -> str:
    return f"{model}@{target}"


def model_tags(results: Results, model: ModelResult, job_key: str) -> dict[str, str]:
    git = results.git
    tags = {
        "mlci.model": model.name,
        "mlci.target": results.target.name,
        "mlci.commit": git.commit or "",
        "mlci.branch": git.branch or "",
        "mlci.pr": str(git.pr) if git.pr is not None else "",
        "mlci.status": model.status,
        "mlci.fingerprint": results.target.fingerprint.hash or "",
        "mlci.execution": results.target.execution,
        "mlci.job_key": job_key,
        "mlci.sha256": model.sha256 or "",
        "mlflow.runName": run_name(model.name, results.target.name),
    }
    if git.commit:
        tags["mlflow.source.git.commit"] = git.commit
    if git.repository:
        tags["mlci.repository"] = git.repository
    if model.error:
        tags["mlci.error"] = model.error[:5000]
    if model.compile:
        tags["mlci.build"] = model.compile.build or ""
        tags["mlci.build_cached"] = "true" if model.compile.build_cached else "false"
    if model.numerics:
        # "true" when the check passed but proved nothing (outputs did not depend on the inputs).
        tags["mlci.numerics_vacuous"] = "true" if model.numerics.vacuous else "false"
        # "none" when ONNX Runtime could not run the model: its outputs were not compared.
        tags["mlci.numerics_reference"] = "none" if model.numerics.no_reference else "onnxruntime"
        note = model.numerics.no_reference or model.numerics.vacuous
        if note:
            tags["mlci.numerics_note"] = note[:5000]
    return tags


def model_metrics(model: ModelResult) -> dict[str, float]:
    metrics: dict[str, float] = {}
    if model.latency_ms:
        lat = model.latency_ms
        for key in ("median", "mean", "std", "min", "p90"):
            metrics[f"latency_ms_{key}"] = getattr(lat, key)
        metrics["latency_samples"] = lat.n
    if model.peer:
        metrics["onnxruntime_median_ms"] = model.peer.onnxruntime_median_ms
        metrics["speedup_vs_onnxruntime"] = model.peer.speedup
    if model.cost:
        metrics["cost_per_million_usd"] = model.cost.per_million_usd
        metrics["onnxruntime_cost_per_million_usd"] = model.cost.onnxruntime_per_million_usd
    if model.compile and not model.compile.build_cached:  # loading a cached build is not compiling
        metrics["compile_s"] = model.compile.seconds
    if model.tuning:
        t = model.tuning
        metrics.update(tune_s=t.seconds, trials_new=t.trials_new, trials_cached=t.trials_cached,
                       tuning_tasks=t.tasks, tuning_tasks_from_cache=t.tasks_from_cache)
    if model.numerics:
        metrics.update(numerics_max_abs_err=model.numerics.max_abs_err, numerics_max_rel_err=model.numerics.max_rel_err)
    return {k: float(v) for k, v in metrics.items() if v is not None}


_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_retries_lock = threading.Lock()


@contextmanager
def _no_client_retries() -> Iterator[None]:
    """MLflow's HTTP client without its own retries, for requests that are not safe to repeat.
    MLflow reads the setting on every request and offers no per-call switch; the lock keeps two
    tracking threads from restoring each other's value."""
    with _retries_lock:
        before = os.environ.get(_RETRIES_ENV)
        os.environ[_RETRIES_ENV] = "0"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_RETRIES_ENV, None)
            else:
                os.environ[_RETRIES_ENV] = before


def job_key(git: GitInfo, target: str, model: str, invocation: str) -> str:
    """What makes a run the same run again: repository, workflow run, commit, target, model.

    Not the run attempt: re-running a failed job measures the same commit on the same target
    again, and its numbers replace the earlier attempt's in the one run rather than adding a
    second run of the commit (which baselines and trends would have to choose between).
    `invocation` is the CI run id, or a fresh id per `mlci run` outside CI."""
    return "/".join([git.repository or "norepo", git.run_id or invocation, git.commit or "nocommit", target, model])


def registered_model_name(model: str, target: str) -> str:
    """The model registry's name for one model x target: its versions are the builds of successive commits."""
    return f"mlci-{model}-{target}"


def registers(git: GitInfo, register: bool | str) -> bool:
    """Whether a run of this commit registers its builds (``[tracking] register``): true means the
    repository's default branch (as the CI event names it, else "main"), a string names the branch,
    false never. Pull requests never register, whatever their branch is called."""
    if register is False or git.pr is not None or not git.branch:
        return False
    branch = (git.default_branch or "main") if register is True else register
    return git.branch == branch


@dataclass(frozen=True)
class Servable:
    """A build to log as an MLflow model (see `mlci.serving`), and the registry name it goes under (None: not registered)."""

    library: Path
    interface: Path
    register_as: str | None = None


INTERFACE_FILE = "interface.json"
"""What `Pipeline.export` writes beside the library: the names, dtypes and shapes it takes and returns."""
_NOT_BUILT = {Status.IMPORT_FAILED, Status.TUNE_FAILED, Status.COMPILE_FAILED}

MODEL_ARTIFACT = "model"
"""Where a run keeps its build as an MLflow model: ``runs:/RUN/model``."""


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def fingerprint_diff(baseline: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """key -> [baseline, current] for fingerprint entries that differ (hash and host noise excluded)."""
    keys = (set(baseline) | set(current)) - {"hash", "os", "python"}
    return {k: [baseline.get(k), current.get(k)] for k in sorted(keys) if baseline.get(k) != current.get(k)}


def model_params(results: Results, model: ModelResult, extra: dict[str, Any]) -> dict[str, str]:
    fp = results.target.fingerprint
    params = {
        "target": results.target.name,
        "tvm_target": str(results.target.tvm_target),
        "tvm_version": fp.tvm,
        "tvm_ffi_version": fp.tvm_ffi,
        "llvm_version": fp.llvm,
        "onnxruntime_version": fp.onnxruntime,
        "cpu": fp.cpu,
        "gpu": fp.gpu,
        "mlci_version": results.mlci_version,
        "model_path": model.path,
        "atol": model.numerics.atol if model.numerics else None,
        "rtol": model.numerics.rtol if model.numerics else None,
        "trials_budget": model.tuning.trials_budget if model.tuning else None,
        "tune_seconds_budget": model.tuning.seconds_budget if model.tuning else None,
        **extra,
    }
    return {k: str(v)[:6000] for k, v in params.items() if v is not None}


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None):
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        # After the import: mlflow sets its own logger to INFO when imported, and creating
        # or migrating a store then prints INFO lines between mlci's progress lines.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri = uri
        db = _sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            # Several processes creating a new sqlite store at once break it for good;
            # the first one initialises it under a lock.
            with FileLock(str(db) + ".lock"):
                self.client = MlflowClient(tracking_uri=uri)
                self.experiment_id = self._experiment(experiment, artifact_root)
        else:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, artifact_root)

    def _experiment(self, name: str, artifact_root: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found:
            return found.experiment_id
        # A local root only for a local store: a tracking server picks its own (e.g. artifacts it
        # serves from S3); a file:// location there would leave the artifacts on this machine.
        local = artifact_root and not self.uri.startswith(("http://", "https://", "databricks"))
        location = (artifact_root / name).resolve().as_uri() if local else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def find_run(self, job_key: str) -> str | None:
        """The run that holds `job_key`: the first one created, should a race have made two."""
        runs = self._runs_of(job_key)
        return runs[0].info.run_id if runs else None

    def _runs_of(self, job_key: str) -> list[Any]:
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`mlci.job_key` = '{_quote(job_key)}'",
                                       max_results=100)
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def create_run_once(self, job_key: str, run_name: str, attempts: int = 3) -> str:
        """The run of `job_key`, created at most once.

        MLflow's client retries a create whose reply was lost (a dropped connection, a proxy timeout),
        and the server then creates a second run. So the create goes out without the client's own
        retries, and after a failure the key is looked up before trying again: the lost reply may
        have been for a run that exists. Two jobs that raced past the lookup both create; the later
        run is deleted and both go on with the first."""
        from mlflow.exceptions import MlflowException

        for attempt in range(attempts):
            try:
                with _no_client_retries():
                    created = self.client.create_run(self.experiment_id, run_name=run_name,
                                                     tags={"mlci.job_key": job_key}).info.run_id
                break
            except (MlflowException, OSError) as exc:
                found = self.find_run(job_key)
                if found is not None:
                    return found
                if attempt == attempts - 1:
                    raise
                logging.getLogger("mlci").info("MLflow create_run failed (%s); trying again", exc)
                time.sleep(0.5 * 2**attempt)
        first = self.find_run(job_key)
        if first is not None and first != created:
            self.client.delete_run(created)
            return first
        return created

    def log_model(
        self,
        results: Results,
        model: ModelResult,
        *,
        job_key: str,
        params: dict[str, Any],
        artifacts: list[tuple[Path, str | None]],
        servable: Servable | None = None,
    ) -> str:
        """Create (or find again, by job key) the run of one model, fill it, finish it.

        A `servable` build is logged as an MLflow model (and registered when it says so); should
        that fail, its bare library goes in ``compiled/`` instead, with one warning."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = self.find_run(job_key)
        tags = model_tags(results, model, job_key)
        new_params = model_params(results, model, params)
        retried = run_id is not None
        if run_id is None:
            run_id = self.create_run_once(job_key, tags["mlflow.runName"])
        else:
            # MLflow refuses to change a logged parameter; a retried job keeps the first values.
            logged = self.client.get_run(run_id).data.params
            changed = sorted(k for k, v in new_params.items() if k in logged and logged[k] != v)
            if changed:
                logging.getLogger("mlci").warning("MLflow run %s keeps its earlier parameters %s", run_id,
                                                  ", ".join(changed))
            new_params = {k: v for k, v in new_params.items() if k not in logged}

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in model_metrics(model).items()],
            params=[Param(k, v) for k, v in new_params.items()],
            tags=[RunTag(k, v) for k, v in tags.items()],
        )
        for path, artifact_dir in artifacts:
            if path.exists():
                self.client.log_artifact(run_id, str(path), artifact_dir)
        if servable is not None and servable.library.exists():
            try:
                self.log_servable(run_id, results, model, servable, retried=retried)
            except Exception as exc:  # the run and its numbers matter more than the packaging
                logging.getLogger("mlci").warning(
                    "%s: the build was not logged as an MLflow model (%s: %s); its library is in the run's "
                    "compiled/ instead", model.name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                logging.getLogger("mlci").info("%s", traceback.format_exc())
                self.client.log_artifact(run_id, str(servable.library), "compiled")
        self.client.set_terminated(run_id, "FINISHED" if model.ok else "FAILED")
        return run_id

    def log_servable(self, run_id: str, results: Results, model: ModelResult, servable: Servable, *,
                     retried: bool = False) -> str | None:
        """Log the build as an MLflow model at ``model/`` in the run, then register it under
        `servable.register_as`; returns the registered version. A retried job whose run holds this
        very library already logs nothing again, and a run is registered once."""
        import tempfile

        from mlci import serving

        digest = _file_sha256(servable.library)
        logged = retried and self.client.get_run(run_id).data.tags.get("mlci.model_library") == digest
        if not logged:
            git, target = results.git, results.target
            kind = str(target.tvm_target.get("kind", "llvm")) if isinstance(target.tvm_target, dict) else "llvm"
            metadata = {
                "mlci.model": model.name, "mlci.target": target.name, "mlci.commit": git.commit or "",
                "mlci.branch": git.branch or "", "mlci.repository": git.repository or "",
                "mlci.fingerprint": target.fingerprint.hash or "", "mlci.version": results.mlci_version,
                "mlci.library_sha256": digest, "mlci.onnx_sha256": model.sha256 or "",
                "environment": {k: v for k, v in target.fingerprint.as_dict().items() if v not in (None, "", {})},
            }
            with tempfile.TemporaryDirectory(prefix="mlci-model-") as tmp:
                saved = Path(tmp) / MODEL_ARTIFACT
                serving.save_model(saved, library=servable.library, interface=servable.interface,
                                   device="cpu" if kind == "llvm" else kind, target=target.tvm_target,
                                   metadata=metadata)
                self.client.log_artifacts(run_id, str(saved), MODEL_ARTIFACT)
            self.client.set_tag(run_id, "mlci.model_library", digest)
        if servable.register_as is None:
            return None
        version = self.register(servable.register_as, run_id, results, digest)
        self.client.set_tag(run_id, "mlci.registered_model", f"{servable.register_as}/{version}")
        return version

    def register(self, name: str, run_id: str, results: Results, library_sha256: str) -> str:
        """A version of `name` whose source is the run's model, tagged with the commit (the existing one
        when this run is registered already)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(
                name, description="Tuned TVM builds logged by mlci: one version per commit of the registering branch.")
        except MlflowException as exc:
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
                raise
        mine = self.client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{_quote(run_id)}'")
        if mine:
            return str(min(int(v.version) for v in mine))
        git = results.git
        tags = {"mlci.commit": git.commit or "", "mlci.branch": git.branch or "",
                "mlci.fingerprint": results.target.fingerprint.hash or "", "mlci.library_sha256": library_sha256}
        if git.repository:
            tags["mlci.repository"] = git.repository
        run = self.client.get_run(run_id)
        created = self.client.create_model_version(name, f"{run.info.artifact_uri}/{MODEL_ARTIFACT}", run_id=run_id,
                                                   tags=tags, description=f"commit {git.commit or 'unknown'}")
        return str(created.version)

    def run_url(self, run_id: str) -> str | None:
        """A web address for the run when the tracking server has one (not for sqlite/files)."""
        if not self.uri.startswith(("http://", "https://")):
            return None
        return f"{without_credentials(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def compare_url(self, run_ids: list[str]) -> str | None:
        """MLflow's page comparing `run_ids` side by side (None when the server has no web UI)."""
        base = self.run_url("")
        if base is None or not run_ids:
            return None
        server = base.split("/#/", 1)[0]
        runs = urllib.parse.quote(json.dumps(run_ids), safe="")
        experiments = urllib.parse.quote(json.dumps([self.experiment_id]), safe="")
        return f"{server}/#/compare-runs?runs={runs}&experiments={experiments}"

    def history(
        self,
        model: str,
        target: str,
        fingerprint: Fingerprint,
        *,
        base_commit: str | None,
        default_branch: str | None,
        exclude_commit: str | None,
        trend_points: int = 20,
    ) -> History | None:
        """The MLflow baseline of one model x target: the finished run of the merge-base
        commit, else the newest finished run on the default branch (not this commit),
        plus the recent default-branch trend of median latency."""
        scope = f"tags.`mlci.model` = '{_quote(model)}' and tags.`mlci.target` = '{_quote(target)}' and " \
                "attributes.status = 'FINISHED'"
        chosen = None
        if base_commit:
            found = self.client.search_runs([self.experiment_id], f"{scope} and tags.`mlci.commit` = '{_quote(base_commit)}'",
                                            max_results=1, order_by=["attributes.start_time DESC"])
            chosen = found[0] if found else None
        trend_runs = []
        branch = default_branch or "main"
        recent = self.client.search_runs([self.experiment_id], f"{scope} and tags.`mlci.branch` = '{_quote(branch)}'",
                                         max_results=trend_points * 3, order_by=["attributes.start_time DESC"])
        seen: set[str] = set()
        for run in recent:
            commit = run.data.tags.get("mlci.commit", "")
            if commit == exclude_commit or commit in seen or "latency_ms_median" not in run.data.metrics:
                continue
            if run.data.tags.get("mlci.pr"):  # a pull request's run (a fork's own main, say) is no baseline
                continue
            seen.add(commit)
            trend_runs.append(run)
            if chosen is None:
                chosen = run
            if len(trend_runs) >= trend_points:
                break
        if chosen is None:
            return None
        tags = chosen.data.tags
        stored = self._stored_results(chosen.info.run_id)
        theirs = stored.get("target", {}).get("fingerprint", {}) if stored else {}
        their_hash = tags.get("mlci.fingerprint") or theirs.get("hash")
        mine = fingerprint.as_dict()
        match = their_hash == fingerprint.hash
        latency = None
        for m in (stored or {}).get("models", []):
            if m.get("name") == model and isinstance(m.get("latency_ms"), dict):
                known = {k: v for k, v in m["latency_ms"].items() if k in Latency.__dataclass_fields__}
                try:  # a newer mlci may have added keys; a damaged file falls back to the metrics below
                    latency = Latency(**known)
                except TypeError:
                    latency = None
        if latency is None and "latency_ms_median" in chosen.data.metrics:
            median = chosen.data.metrics["latency_ms_median"]
            latency = Latency(samples=[], median=median, mean=median, std=0.0, min=median, p90=median, n=0)
        return History(
            commit=tags.get("mlci.commit") or None,
            branch=tags.get("mlci.branch") or None,
            run_id=chosen.info.run_id,
            created_at=_iso(chosen.info.start_time),
            fingerprint=their_hash,
            fingerprint_match=match,
            fingerprint_diff={} if match else fingerprint_diff(theirs, mine) or {"hash": [their_hash, fingerprint.hash]},
            latency_ms=latency,
            trend=[
                TrendPoint(commit=r.data.tags.get("mlci.commit"), median=r.data.metrics["latency_ms_median"],
                           created_at=_iso(r.info.start_time))
                for r in reversed(trend_runs)
            ],
            trend_url=self.compare_url([r.info.run_id for r in reversed(trend_runs)]) if len(trend_runs) > 1 else None,
        )

    def _stored_results(self, run_id: str) -> dict[str, Any] | None:
        """The run's own results.json artifact (samples and the full fingerprint); best effort."""
        import json
        import tempfile

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = self.client.download_artifacts(run_id, "results.json", tmp)
                return json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception as exc:  # an old run without the artifact, or the store is unreachable
            logging.getLogger("mlci").info("no results.json for MLflow run %s: %s", run_id, exc)
            return None


def _file_sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _iso(millis: int | None) -> str | None:
    import datetime as dt

    if not millis:
        return None
    return dt.datetime.fromtimestamp(millis / 1000, dt.UTC).isoformat(timespec="seconds")


PENDING_SUFFIX = ".mlflow-pending"


def pending_path(results_path: Path) -> Path:
    """Where a results file's unlogged MLflow work waits for `mlci sync`: `cpu.json` -> `cpu.json.mlflow-pending`
    (JSON, but not named *.json: whatever collects results files from a directory must not take it for one)."""
    return results_path.with_name(results_path.name + PENDING_SUFFIX)


@dataclass
class PendingLog:
    """What `log_results` needs besides the results file to log it again later, under the same job keys."""

    uri: str
    experiment: str
    artifact_root: str
    artifacts_dir: str
    params: dict[str, Any]
    invocation: str
    register: bool | str = True
    """``[tracking] register`` of the run (files written before it existed lack it)."""

    def write(self, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> PendingLog:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable MLflow payload: {exc}") from None
        fields = [f.name for f in dataclasses.fields(cls)]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"{path}: MLflow payload lacks {', '.join(missing)}")
        return cls(**{k: data[k] for k in fields if k in data})


class _Progress(Protocol):
    def stage(self, model: str, text: str) -> None: ...

    def finish(self, model: str, status: str) -> None: ...


def tracking_deadline(environ: Mapping[str, str] | None = None) -> tuple[float, str | None]:
    """MLCI_MLFLOW_DEADLINE seconds (0: no deadline, infinity), else DEADLINE_S; and a note when the
    variable is set but not a number of seconds (the default is used then)."""
    return seconds_from_env(DEADLINE_ENV, DEADLINE_S, environ, zero_means_unlimited=True)


class _Handover:
    """What a tracking worker may still change in the caller's results: nothing once the caller gave up on it.

    The worker logs from its own copy of the results; each finished step is copied into the
    caller's results (and the results file) under a lock, only while the caller still waits.
    """

    def __init__(self, progress: _Progress) -> None:
        self._lock = threading.Lock()
        self._progress = progress
        self.abandoned = False

    def apply(self, change: Callable[[], None]) -> None:
        with self._lock:
            if not self.abandoned:
                change()

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True

    def stage(self, model: str, text: str) -> None:
        self.apply(lambda: self._progress.stage(model, text))

    def finish(self, model: str, status: str) -> None:
        self.apply(lambda: self._progress.finish(model, status))


def log_results(
    results: Results,
    path: Path,
    *,
    uri: str,
    experiment: str,
    artifact_root: Path,
    artifacts_dir: Path,
    params: dict[str, Any],
    progress: _Progress,
    deadline: float | None = None,
    invocation: str | None = None,
    register: bool | str | None = None,
) -> str | None:
    """Look up each model's history baseline, then log one run per model with its artifacts
    (``artifacts_dir/MODEL``: tuning records and library). History first, so a run never finds
    itself. `results` gains the baselines and run ids, and is rewritten to `path` before any run
    is logged. Tracking is best effort: a failure comes back as a message, never an exception.

    The whole of it runs in a worker thread that is given up after `deadline` seconds (None:
    MLCI_MLFLOW_DEADLINE, else DEADLINE_S; infinity: as long as it takes); what it finished by
    then is kept, and the one message returned says what was not.

    Nothing is lost to a server that is down: what is needed to log again (`PendingLog`, with
    `invocation`, the id in the job keys outside CI) is written beside `path` first and removed
    only once every run is logged; `mlci sync` replays it, into the same runs.

    Each build that passed is logged as an MLflow model too, and registered as
    ``mlci-MODEL-TARGET`` when `registers` says so for `register` (``[tracking] register``; None:
    what the pending file beside `path` recorded, when `mlci sync` replays one, else true)."""
    if register is None:
        register = _recorded_register(pending_path(path))
    if deadline is None:
        deadline, problem = tracking_deadline()
        if problem:
            logging.getLogger("mlci").warning("%s", problem)
    invocation = invocation or uuid.uuid4().hex[:12]
    pending = pending_path(path)
    # The pending file travels as an artifact (public in a public repository): no credentials in it;
    # `mlci sync` takes them from the environment (MLFLOW_TRACKING_*) or `--tracking-uri`.
    PendingLog(uri=without_credentials(uri), experiment=experiment, artifact_root=str(artifact_root.resolve()),
               artifacts_dir=str(artifacts_dir.resolve()), params=json_safe_params(params),
               invocation=invocation, register=register).write(pending)
    handover = _Handover(progress)
    outcome: list[str | None] = []
    worker = threading.Thread(
        target=lambda: outcome.append(_log_results(results, path, uri=uri, experiment=experiment,
                                                   artifact_root=artifact_root, artifacts_dir=artifacts_dir,
                                                   params=params, handover=handover, invocation=invocation,
                                                   register=register)),
        name="mlci-mlflow", daemon=True,  # daemon: a server that never answers must not keep mlci alive
    )
    worker.start()
    worker.join(deadline if math.isfinite(deadline) else None)
    kept = f"; kept for `mlci sync {path}` in {pending}"
    if worker.is_alive():
        handover.abandon()
        logged = sum(1 for m in results.models if m.mlflow_run_id)
        return (f"MLflow logging to {without_credentials(uri)} gave up after {deadline:g} s ({DEADLINE_ENV}): the server did not "
                f"answer in time; {logged} of {len(results.models)} runs logged{kept}")
    if not outcome:
        return f"MLflow logging to {without_credentials(uri)} failed: the worker ended without a result{kept}"
    if outcome[0] is None:
        pending.unlink(missing_ok=True)
        return None
    return outcome[0] + kept


def _recorded_register(pending: Path) -> bool | str:
    try:
        return PendingLog.read(pending).register if pending.exists() else True
    except ValueError:
        return True


def json_safe_params(params: dict[str, Any]) -> dict[str, Any]:
    """`params` as JSON keeps them: MLflow logs every value as its string anyway."""
    return {k: v if isinstance(v, str | int | float | bool) or v is None else str(v) for k, v in params.items()}


def _log_results(
    results: Results,
    path: Path,
    *,
    uri: str,
    experiment: str,
    artifact_root: Path,
    artifacts_dir: Path,
    params: dict[str, Any],
    handover: _Handover,
    invocation: str,
    register: bool | str = True,
) -> str | None:
    """`log_results`' work, on a copy of `results`: each finished step goes back through `handover`."""
    work = copy.deepcopy(results)
    try:
        tracker = Tracker(uri, experiment, artifact_root=artifact_root)
        git = work.git
        for model in work.models:
            handover.stage(model.name, "reading MLflow history")
            model.history = tracker.history(
                model.name, work.target.name, work.target.fingerprint,
                base_commit=git.base_commit, default_branch=git.default_branch, exclude_commit=git.commit,
            )

        def keep_history() -> None:
            for mine, theirs in zip(results.models, work.models, strict=True):
                mine.history = theirs.history
            write_results(results, path)

        handover.apply(keep_history)
        for index, model in enumerate(work.models):
            handover.stage(model.name, "logging to MLflow")
            out_dir = artifacts_dir / model.name
            single = Results(git=git, target=work.target, models=[model], config=work.config,
                             created_at=work.created_at)
            results_json = write_results(single, out_dir / "results.json")
            model.mlflow_run_id = tracker.log_model(
                work,
                model,
                job_key=job_key(git, work.target.name, model.name, invocation),
                params=params,
                artifacts=[
                    (results_json, None),
                    (out_dir / "tuning_records.json", "tuning"),
                ],
                servable=Servable(
                    library=out_dir / f"{model.name}.so",
                    interface=out_dir / INTERFACE_FILE,
                    # Only a build that passed its numerics check is worth serving.
                    register_as=registered_model_name(model.name, work.target.name)
                    if model.ok and registers(git, register) else None,
                ) if model.status not in _NOT_BUILT else None,  # a library left by an earlier run is not this one
            )
            model.mlflow_url = tracker.run_url(model.mlflow_run_id)

            def keep_run(mine: ModelResult = results.models[index], theirs: ModelResult = model) -> None:
                mine.mlflow_run_id, mine.mlflow_url = theirs.mlflow_run_id, theirs.mlflow_url

            handover.apply(keep_run)
            handover.finish(model.name, model.status)
    except Exception as exc:  # the results file already holds everything
        if handover.abandoned:  # the caller has warned already; say nothing more
            return None
        logging.getLogger("mlci").error("MLflow logging failed:\n%s", traceback.format_exc())
        shown = without_credentials(uri)
        return f"MLflow logging to {shown} failed: {type(exc).__name__}: {str(exc).replace(uri, shown)}"
    return None
