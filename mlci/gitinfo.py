"""Where a run comes from: commit, branch, PR, repository, CI run id.

GitHub Actions' environment wins (a detached HEAD has no branch of its own);
outside CI, git itself is asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
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


def read_event(path: str | None) -> dict:
    """The GitHub event payload (GITHUB_EVENT_PATH); {} when absent or unreadable."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _event() -> dict:
    return read_event(os.environ.get("GITHUB_EVENT_PATH"))


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
        default_branch=default_branch(root),
    )


def default_branch(root: Path) -> str | None:
    """The repository's default branch: from the event payload, else origin's HEAD."""
    repo = _event().get("repository") or {}
    if isinstance(repo, dict) and repo.get("default_branch"):
        return str(repo["default_branch"])
    ref = _git(root, "symbolic-ref", "--short", "refs/remotes/origin/HEAD")
    return ref.split("/", 1)[1] if ref and "/" in ref else None


def toplevel(root: Path) -> Path | None:
    top = _git(root, "rev-parse", "--show-toplevel")
    return Path(top) if top else None


class BaseRefError(Exception):
    pass


def resolve_base(root: Path, ref: str, head: str = "HEAD") -> str:
    """The commit A/B compares against: the merge-base of `ref` and the head, so a PR is
    measured against what it branched from, not against later commits on its base."""
    commit = _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if commit is None:
        raise BaseRefError(
            f"base ref {ref!r} is not a commit in this clone (with actions/checkout, set fetch-depth: 0 "
            "so the base branch is there)"
        )
    merge_base = _git(root, "merge-base", commit, head)
    if merge_base is None:
        raise BaseRefError(f"{ref!r} and {head!r} have no common ancestor (a shallow clone? fetch-depth: 0)")
    return merge_base


@contextlib.contextmanager
def checkout(root: Path, commit: str) -> Iterator[Path]:
    """A throwaway worktree of `commit` (real files, LFS smudged, `prepare` can run in it);
    removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="mlci-base-"))
    tree = tmp / "tree"
    proc = subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), commit],
                          cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BaseRefError(f"cannot check out base commit {commit[:12]}: {proc.stderr.strip()}")
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=root, capture_output=True)
