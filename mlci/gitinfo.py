"""Where a run comes from: commit, branch, PR, repository, CI run id.

GitHub Actions' environment wins (a detached HEAD has no branch of its own);
outside CI, git itself is asked.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from mlci.results import GitInfo


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _event() -> dict:
    path = os.environ.get("GITHUB_EVENT_PATH")
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_git(root: Path) -> GitInfo:
    env = os.environ
    event = _event()
    pr = event.get("pull_request") or {}
    commit = (pr.get("head") or {}).get("sha") or env.get("GITHUB_SHA") or _git(root, "rev-parse", "HEAD")
    branch = env.get("GITHUB_HEAD_REF") or env.get("GITHUB_REF_NAME") or _git(
        root, "rev-parse", "--abbrev-ref", "HEAD"
    )
    if branch == "HEAD":
        branch = None
    number = pr.get("number") or event.get("number")
    return GitInfo(
        commit=commit,
        branch=branch,
        base_commit=(pr.get("base") or {}).get("sha"),
        pr=int(number) if isinstance(number, int) else None,
        repository=env.get("GITHUB_REPOSITORY"),
        run_id=env.get("GITHUB_RUN_ID"),
    )
