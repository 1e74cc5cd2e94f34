"""Ctrl-C or a runner's SIGTERM while `mlci run` tunes: mlci ends with 128 + the signal, leaves no
tuning worker running, writes the results file it has, and keeps a tuning cache the next run
builds from without a warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mlci.tuning import RECORDS_FILE

from .conftest import quick_project

pytestmark = pytest.mark.slow


def _records(root: Path) -> int:
    """Tuning records of candidates that built and ran (MetaSchedule also keeps failed ones, timed 1e10 s)."""
    count = 0
    for path in root.joinpath(".mlci").rglob(RECORDS_FILE):
        for line in path.read_text().splitlines():
            try:
                run_secs = json.loads(line)[1][1]
            except (ValueError, IndexError, TypeError):
                continue
            count += bool(run_secs) and all(float(t) < 1e9 for t in run_secs)
    return count


def _mlci(root: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLCI_"))}
    return subprocess.Popen([sys.executable, "-m", "mlci.cli", "run", "--no-tracking", *args], cwd=root, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_tuning_stops_mlci_cleanly_and_the_next_run_builds_from_the_cache(
        tmp_path: Path, signum: signal.Signals) -> None:
    root = quick_project(tmp_path, trials=4000)
    proc = _mlci(root)
    me = psutil.Process(proc.pid)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + 240
    # Signal once MetaSchedule's workers run and the search has saved records: mid-tuning, not at startup.
    while time.monotonic() < deadline and proc.poll() is None:
        for child in me.children(recursive=True):
            seen.setdefault(child.pid, child)
        if seen and _records(root) > 0:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    assert seen, "no tuning worker was started"
    time.sleep(1.0)
    proc.send_signal(signum)
    output = proc.communicate(timeout=60)[0]

    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Segmentation fault" not in output and "terminate called" not in output
    time.sleep(0.5)
    left = [p.pid for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"tuning workers still running after mlci ended: {left}"
    results = json.loads(next(root.joinpath(".mlci", "results").glob("*.json")).read_text())
    assert results["interrupted"] and signal.Signals(signum).name in results["interrupted"]
    assert [m["status"] for m in results["models"]] == ["interrupted"]
    kept = _records(root)
    assert kept > 0

    # The next run builds from what was kept: its kernels get the tuned records, nothing is searched.
    again = _mlci(root, "--trials", "0")
    output = again.communicate(timeout=300)[0]
    assert again.returncode == 0, output[-3000:]
    assert "damaged" not in output
    results = json.loads(next(root.joinpath(".mlci", "results").glob("*.json")).read_text())
    [model] = results["models"]
    assert model["status"] == "ok" and model["tuning"]["trials_new"] == 0
    built = model["compile"]
    # The kept records were read: a kernel was built with one, or kept its default schedule because
    # that timed faster than the record (a few seconds of search on a loaded machine may find nothing better).
    assert built["kernels_tuned"] + built["kernels_kept_default"] >= 1 or built["tuned_build_ms"] is not None, built
