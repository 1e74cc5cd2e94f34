"""Where a run comes from: commit, branch, PR, repository, CI run id; and the git work an A/B run
needs (the merge-base, a throwaway worktree of the base commit).

Inside GitHub Actions the context (`mlci.actions.GitHubContext`) wins, since a detached HEAD has no
branch of its own; outside CI, git itself is asked.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlci.actions import GitHubContext
from mlci.results import GitInfo


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def detect_git(root: Path, ctx: GitHubContext | None = None) -> GitInfo:
    """The run's commit, branch, PR and CI identifiers; `ctx` defaults to this process's Actions environment."""
    ctx = GitHubContext.from_env() if ctx is None else ctx
    commit = ctx.commit or _git(root, "rev-parse", "HEAD")
    branch = ctx.branch or _git(root, "rev-parse", "--abbrev-ref", "HEAD")
    if branch == "HEAD":
        branch = None
    return GitInfo(
        commit=commit,
        branch=branch,
        base_commit=ctx.base_sha,
        pr=ctx.pull_request_event_number,
        repository=ctx.repository,
        run_id=ctx.run_id,
        default_branch=default_branch(root, ctx),
    )


def default_branch(root: Path, ctx: GitHubContext | None = None) -> str | None:
    """The repository's default branch: from the event payload, else origin's HEAD; `ctx` as in detect_git."""
    ctx = GitHubContext.from_env() if ctx is None else ctx
    if ctx.default_branch:
        return ctx.default_branch
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
