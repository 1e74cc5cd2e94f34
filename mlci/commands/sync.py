"""`mlci sync`: log to MLflow what `mlci run` could not (the server was down or too slow).

`mlci run` keeps the MLflow work of a results file beside it (`cpu.json` -> `cpu.json.mlflow-pending`)
until every run is logged. Syncing replays it with the same job keys, so each model lands in
the run it already has, if any: syncing twice, or after a run that half succeeded, adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlci import tracking
from mlci.results import read_results, write_results


@dataclass
class Synced:
    results: Path
    runs: int
    """Runs logged (0 when nothing was pending)."""
    error: str | None = None


class _Quiet:
    def stage(self, model: str, text: str) -> None: ...

    def finish(self, model: str, status: str) -> None: ...


def sync(paths: list[Path], tracking_uri: str | None = None) -> list[Synced]:
    """Replay the pending MLflow work of each results file (`tracking_uri`: instead of the one recorded)."""
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
        error = tracking.log_results(
            results, path, uri=tracking_uri or pending.uri, experiment=pending.experiment,
            artifact_root=Path(pending.artifact_root), artifacts_dir=Path(pending.artifacts_dir),
            params=pending.params, progress=_Quiet(), invocation=pending.invocation,
        )
        write_results(results, path)  # with the run ids
        outcomes.append(Synced(path, sum(1 for m in results.models if m.mlflow_run_id), error))
    return outcomes
