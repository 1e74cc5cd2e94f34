"""`mlci sync`: log to MLflow what `mlci run` could not (the server was down or too slow).

`mlci run` keeps the MLflow work of a results file beside it (`cpu.json` -> `cpu.json.mlflow-pending`)
until every run is logged. Syncing replays it with the same job keys, so each model lands in
the run it already has, if any: syncing twice, or after a run that half succeeded, adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlci import tracking
from mlci.config import valid_name
from mlci.results import Results, read_results, write_results


@dataclass
class Synced:
    results: Path
    runs: int
    """Runs logged (0 when nothing was pending)."""
    error: str | None = None


class _Quiet:
    def stage(self, model: str, text: str) -> None: ...

    def finish(self, model: str, status: str) -> None: ...


def sync(paths: list[Path], tracking_uri: str | None = None, configured_uri: str | None = None,
         register: bool = False) -> list[Synced]:
    """Replay the pending MLflow work of each results file.

    A results file and its pending file may come from a downloaded artifact, so neither is trusted:
    the runs go to `tracking_uri` (given on the command line), or to `configured_uri` (the
    environment's or mlci.toml's) when it is the server the file was kept for, never to a server only
    the file names (credentials in the environment would follow it there); model and target names
    must be names mlci writes (they become paths); paths stay inside the project the results file is
    in; and nothing is registered unless `register` says so."""
    outcomes = []
    for path in paths:
        if not path.is_file():
            outcomes.append(Synced(path, 0, f"{path}: no such results file"))
            continue
        pending_file = tracking.pending_path(path)
        if not pending_file.exists():
            outcomes.append(Synced(path, 0))
            continue
        try:
            pending = tracking.PendingLog.read(pending_file)
            results = read_results(path)
        except Exception as exc:  # a damaged file: say which, go on with the others
            outcomes.append(Synced(path, 0, str(exc)))
            continue
        uri, problem = _destination(pending_file, pending.uri, tracking_uri, configured_uri)
        problem = problem or _bad_names(path, results)
        if problem:
            outcomes.append(Synced(path, 0, problem))
            continue
        project = path.resolve().parent.parent  # .mlci/results/cpu.json -> .mlci
        error = tracking.log_results(
            results, path, uri=uri, experiment=pending.experiment,
            artifact_root=_inside(Path(pending.artifact_root), project, project / "mlartifacts"),
            artifacts_dir=_inside(Path(pending.artifacts_dir), project, path.resolve().parent / "sync-work"),
            params=pending.params, progress=_Quiet(), invocation=pending.invocation, register=register,
        )
        write_results(results, path)  # with the run ids
        outcomes.append(Synced(path, sum(1 for m in results.models if m.mlflow_run_id), error))
    return outcomes


def _destination(pending_file: Path, recorded: str, given: str | None,
                 configured: str | None) -> tuple[str, str | None]:
    """Where the runs go, or why nowhere."""
    if given:
        return given, None
    if configured and tracking.without_credentials(configured) == tracking.without_credentials(recorded):
        return configured, None
    return "", (f"{pending_file}: kept for {tracking.without_credentials(recorded)}, "
                + (f"but this sync is configured for {tracking.without_credentials(configured)}"
                   if configured else "and no tracking URI is configured")
                + "; give --tracking-uri to log it (mlci never sends runs to a server only the file names)")


def _bad_names(path: Path, results: Results) -> str | None:
    names = [("target", results.target.name)] + [("model", m.name) for m in results.models]
    for kind, name in names:
        if not valid_name(name):
            return f"{path}: {kind} name {name!r} is not a name mlci writes; nothing synced"
    return None


def _inside(candidate: Path, project: Path, fallback: Path) -> Path:
    """`candidate` when it lies inside `project`, else `fallback` (a pending file from elsewhere)."""
    try:
        candidate.resolve().relative_to(project)
        return candidate
    except ValueError:
        return fallback
