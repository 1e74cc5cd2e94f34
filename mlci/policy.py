"""Who a run is trusted as, decided once from the GitHub Actions context, and what each tier may do.

Every decision that depends on who wrote the code a run executes derives from `trust_of`: the S3
tuning-cache tier and whether the run writes it, progressive tuning, model registration, launching
a machine, which AWS role a job assumes and whether it gets the cache URL at all. The workflow
reads the same answer from `mlci matrix` (outputs `trust` and `role`) instead of re-deriving it
in expressions. Pure: it is handed the event name, the payload and the ref, and reads nothing.

The tiers:
- `default-branch`: a push, a manual run (workflow_dispatch) or the schedule on the repository's
  default branch. Only these write the shared tier every other run reads, and register builds.
- `pull-request`: a pull request from a branch of this repository (its authors can push here).
- `fork`: a pull request from another repository, or a workflow_run of one: code nobody here vetted.
  No credentials, no cache URL, no machine.
- `other`: any other run in Actions (another branch, a tag, an event mlci cannot place).
- `local`: outside Actions (a developer's machine): the config decides what it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

PULL_REQUEST_EVENTS = frozenset({"pull_request", "pull_request_target", "pull_request_review",
                                 "pull_request_review_comment"})
DEFAULT_BRANCH_EVENTS = frozenset({"push", "workflow_dispatch", "schedule"})
SHARED_TIER = "main"
"""The S3 tuning-cache tier the default branch writes and every run reads."""


class Tier(StrEnum):
    DEFAULT_BRANCH = "default-branch"
    PULL_REQUEST = "pull-request"
    FORK = "fork"
    OTHER = "other"
    LOCAL = "local"


class Role(StrEnum):
    """Which of the workflow's AWS roles a job of this run assumes (the ARNs are the workflow's inputs)."""

    DEFAULT_BRANCH = "default-branch"
    """`aws-role`: may write the shared tier."""
    PULL_REQUEST = "pull-request"
    """`aws-pr-role`: reads the shared tier, writes only `pr-*`."""
    NONE = "none"


@dataclass(frozen=True)
class Trust:
    """The tier of one run and why; the decisions below are the only place each rule is written."""

    tier: Tier
    reason: str
    """One line a maintainer can check against the run (printed by the plan job)."""
    default_branch: str | None = None
    pull_request: int | None = None
    branch: str | None = None
    """The branch whose own code this run builds: a push, manual run or schedule on a branch (None otherwise)."""

    @property
    def role(self) -> Role:
        if self.tier is Tier.DEFAULT_BRANCH:
            return Role.DEFAULT_BRANCH
        if self.tier is Tier.PULL_REQUEST:
            return Role.PULL_REQUEST
        return Role.NONE

    @property
    def writes_shared_cache(self) -> bool:
        """Only the default branch's own runs write the tier every run trusts."""
        return self.tier is Tier.DEFAULT_BRANCH

    @property
    def progressive(self) -> bool:
        """Spend the trial budget anew on every run: the default branch fills the cache pull requests read;
        everyone else searches only what the budget still owes, so an unchanged model costs nothing."""
        return self.tier is Tier.DEFAULT_BRANCH

    @property
    def may_register(self) -> bool:
        """Builds enter the model registry only from a branch's own runs (``[tracking] register`` says which
        branch) or a local run: never from a pull request, a fork, a tag or an event about other code."""
        return self.tier in (Tier.DEFAULT_BRANCH, Tier.LOCAL) or (self.tier is Tier.OTHER and self.branch is not None)

    @property
    def may_launch(self) -> bool:
        """A fork's code never gets a machine registered to this repository."""
        return self.tier is not Tier.FORK

    @property
    def uses_cache_url(self) -> bool:
        """A fork's run gets no S3 URL at all (it has no credentials, and nothing it writes may be read back)."""
        return self.tier is not Tier.FORK

    def cache_tier(self, *, pr_writes: bool, local_writes: bool) -> tuple[str, bool]:
        """The S3 tier this run reads besides the shared one, and whether it writes it."""
        if self.writes_shared_cache:
            return SHARED_TIER, True
        if self.tier is Tier.PULL_REQUEST and self.pull_request is not None:
            return f"pr-{self.pull_request}", pr_writes
        if self.tier is Tier.LOCAL:
            return SHARED_TIER, local_writes
        return SHARED_TIER, False


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _full_name(repo: Any) -> str | None:
    name = _dict(repo).get("full_name")
    return name if isinstance(name, str) and name else None


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold() == b.casefold()


def trust_of(event_name: str | None, event: Mapping[str, Any], *, ref: str | None = None,
             ref_type: str | None = None, repository: str | None = None, in_actions: bool = True) -> Trust:
    """The tier of a run from what Actions says about it: GITHUB_EVENT_NAME, the event payload,
    GITHUB_REF (``refs/heads/main``), GITHUB_REF_TYPE and GITHUB_REPOSITORY.

    The default branch is the payload's ``repository.default_branch``. A schedule always runs on the
    default branch's latest commit, so there GITHUB_REF names it even when the payload does not."""
    event = event if isinstance(event, Mapping) else {}
    default = _dict(event.get("repository")).get("default_branch")
    default = default if isinstance(default, str) and default else None
    if not in_actions:
        return Trust(Tier.LOCAL, "not in GitHub Actions", default)
    name = event_name or "?"
    this_repo = _full_name(event.get("repository")) or repository
    branch = ref[len("refs/heads/"):] if ref and ref.startswith("refs/heads/") and ref_type in (None, "", "branch") else None
    if name == "schedule" and default is None:
        default = branch
    if name in PULL_REQUEST_EVENTS:
        pr = _dict(event.get("pull_request"))
        number = pr.get("number") if isinstance(pr.get("number"), int) else event.get("number")
        number = number if isinstance(number, int) and not isinstance(number, bool) else None
        head = _full_name(_dict(pr.get("head")).get("repo"))
        base = _full_name(_dict(pr.get("base")).get("repo")) or this_repo
        if not _same(head, base):
            return Trust(Tier.FORK, f"{name} from {head or 'an unknown or deleted repository'} into {base or '?'}",
                         default, number)
        return Trust(Tier.PULL_REQUEST, f"{name} #{number} from a branch of {base}", default, number)
    if name == "workflow_run":
        run = _dict(event.get("workflow_run"))
        head, base = _full_name(run.get("head_repository")), _full_name(run.get("repository")) or this_repo
        if not _same(head, base):
            return Trust(Tier.FORK, f"workflow_run of {head or 'an unknown repository'}'s commit in {base or '?'}", default)
        # The data it handles comes from the run that triggered it: trusted as far as that run was.
        triggered_by = run.get("event")
        if triggered_by in PULL_REQUEST_EVENTS:
            prs = run.get("pull_requests")
            number = prs[0].get("number") if isinstance(prs, list) and prs and isinstance(prs[0], dict) else None
            return Trust(Tier.PULL_REQUEST, f"workflow_run of a pull request from a branch of {base}", default,
                         number if isinstance(number, int) else None)
        head_branch = run.get("head_branch")
        if triggered_by in DEFAULT_BRANCH_EVENTS and default is not None and head_branch == default:
            return Trust(Tier.DEFAULT_BRANCH, f"workflow_run of a {triggered_by} on {default}", default)
        return Trust(Tier.OTHER, f"workflow_run of a {triggered_by or '?'} on {head_branch or '?'}", default)
    if name in DEFAULT_BRANCH_EVENTS:
        if branch is None:
            return Trust(Tier.OTHER, f"{name} on {ref or 'no ref'} (not a branch)", default)
        if default is None:
            return Trust(Tier.OTHER, f"{name} on {branch}: the event does not name the default branch", default,
                         branch=branch)
        if branch == default:
            return Trust(Tier.DEFAULT_BRANCH, f"{name} on the default branch {default}", default, branch=branch)
        return Trust(Tier.OTHER, f"{name} on {branch}, not the default branch {default}", default, branch=branch)
    return Trust(Tier.OTHER, f"{name} on {ref or 'no ref'}", default)
