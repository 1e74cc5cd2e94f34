"""GitHub Actions: what the environment and the event payload say about this run, and the file and
workflow-command protocol a step answers with (step outputs, job summary, annotations).

The only module that reads the ``GITHUB_*`` variables and the event file: `GitHubContext.from_env`
reads them once, and everything else is handed the context. Standard library only, so the light
install of the plan and report jobs needs nothing more.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci.formatting import SUMMARY_LIMIT
from mlci.policy import Trust, trust_of

ANNOTATION_LEVELS = ("error", "warning", "notice")


def read_event(path: str | None) -> dict:
    """The GitHub event payload (GITHUB_EVENT_PATH); {} when absent or unreadable."""
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class GitHubContext:
    """What the Actions environment says about this run; built once so the rest never reads os.environ."""

    api_url: str = "https://api.github.com"
    server_url: str = "https://github.com"
    repository: str | None = None
    token: str | None = field(default=None, repr=False)
    sha: str | None = None
    """The head commit the report is about, where statuses go: the pull request's or the workflow_run's head, else GITHUB_SHA."""
    event_name: str | None = None
    event: dict = field(default_factory=dict, repr=False)
    run_id: str | None = None
    step_summary: Path | None = None
    output: Path | None = None
    github_actions: bool = False
    github_sha: str | None = None
    """GITHUB_SHA as Actions gives it: a merge commit on pull_request events, the default branch on workflow_run."""
    head_ref: str | None = None
    """GITHUB_HEAD_REF: the pull request's branch (pull_request events only)."""
    ref_name: str | None = None
    """GITHUB_REF_NAME: the branch or tag that triggered the run (``42/merge`` on pull_request events)."""
    ref: str | None = None
    """GITHUB_REF: ``refs/heads/BRANCH``, ``refs/tags/TAG`` or ``refs/pull/N/merge``."""
    ref_type: str | None = None
    """GITHUB_REF_TYPE: ``branch`` or ``tag``."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, token: str | None = None) -> GitHubContext:
        """Read the GITHUB_* variables and the event payload (`env` defaults to os.environ)."""
        env = os.environ if env is None else env
        event = read_event(env.get("GITHUB_EVENT_PATH"))
        github_sha = env.get("GITHUB_SHA") or None

        def path(name: str) -> Path | None:
            value = env.get(name)
            return Path(value) if value else None

        return cls(
            api_url=(env.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/"),
            server_url=(env.get("GITHUB_SERVER_URL") or "https://github.com").rstrip("/"),
            repository=env.get("GITHUB_REPOSITORY") or None,
            token=token if token is not None else (env.get("GITHUB_TOKEN") or None),
            sha=event_head_sha(event) or github_sha,
            event_name=env.get("GITHUB_EVENT_NAME") or None,
            event=event,
            run_id=env.get("GITHUB_RUN_ID") or None,
            step_summary=path("GITHUB_STEP_SUMMARY"),
            output=path("GITHUB_OUTPUT"),
            github_actions=env.get("GITHUB_ACTIONS") == "true",
            github_sha=github_sha,
            head_ref=env.get("GITHUB_HEAD_REF") or None,
            ref_name=env.get("GITHUB_REF_NAME") or None,
            ref=env.get("GITHUB_REF") or None,
            ref_type=env.get("GITHUB_REF_TYPE") or None,
        )

    @property
    def trust(self) -> Trust:
        """This run's trust tier (mlci.policy): every credential and cache decision derives from it."""
        return trust_of(self.event_name, self.event, ref=self.ref, ref_type=self.ref_type,
                        repository=self.repository, in_actions=self.github_actions)

    @property
    def run_url(self) -> str | None:
        """Link from the status and the comment back to the run that produced the report."""
        if not (self.repository and self.run_id):
            return None
        return f"{self.server_url.rstrip('/')}/{self.repository}/actions/runs/{self.run_id}"

    @property
    def in_actions(self) -> bool:
        return self.github_actions

    # --- what a run records about its commit (gitinfo) ---------------------------------

    @property
    def commit(self) -> str | None:
        """The commit a run's results are recorded for: the pull request's head on pull_request events
        (GITHUB_SHA is a merge commit there), else GITHUB_SHA. Unlike `sha`, a workflow_run's head is not
        taken: that event's job runs on the default branch."""
        head = _dict(_dict(self.event.get("pull_request")).get("head")).get("sha")
        return head or self.github_sha

    @property
    def branch(self) -> str | None:
        """The branch the run is about: the pull request's (GITHUB_HEAD_REF), else GITHUB_REF_NAME unless that
        names a tag (a tag called `main` is not the main branch)."""
        return self.head_ref or (self.ref_name if self.ref_type != "tag" else None)

    @property
    def base_sha(self) -> str | None:
        """The pull request's base commit on pull_request events."""
        return _dict(_dict(self.event.get("pull_request")).get("base")).get("sha")

    @property
    def pull_request_event_number(self) -> int | None:
        """The number of the pull request a pull_request event is about; None on every other event
        (see `pull_request_number` for the events that only mention a pull request)."""
        pr = _dict(self.event.get("pull_request"))
        return _number(pr.get("number") or self.event.get("number"))

    @property
    def default_branch(self) -> str | None:
        """The repository's default branch, from the event payload (a schedule's payload may name no
        repository: it runs on the default branch, which GITHUB_REF then names)."""
        return self.trust.default_branch

    # --- what a report is about (delivery) ----------------------------------------------

    def pull_request_number(self) -> int | None:
        """The pull request this run reports on, straight from the payload: a pull_request event's,
        the one an issue_comment is on, a same-repository workflow_run's. None when the payload does
        not say (a fork's workflow_run lists no pull requests: look it up by `sha`)."""
        return event_pull_request(self.event)


def event_head_sha(event: dict) -> str | None:
    """On pull_request events GITHUB_SHA is a merge commit, on workflow_run the default branch: the PR head instead."""
    pr = event.get("pull_request")
    if isinstance(pr, dict) and isinstance(pr.get("head"), dict) and pr["head"].get("sha"):
        return str(pr["head"]["sha"])
    run = event.get("workflow_run")
    if isinstance(run, dict) and run.get("head_sha"):
        return str(run["head_sha"])
    return None


def event_pull_request(event: dict) -> int | None:
    """PR number straight from the payload (pull_request, issue_comment on a PR, workflow_run of a same-repo PR)."""
    pr = event.get("pull_request")
    if isinstance(pr, dict) and isinstance(pr.get("number"), int):
        return pr["number"]
    issue = event.get("issue")
    if isinstance(issue, dict) and issue.get("pull_request") and isinstance(issue.get("number"), int):
        return issue["number"]
    run = event.get("workflow_run")
    if isinstance(run, dict):
        prs = run.get("pull_requests")  # empty for fork PRs: the caller falls back to the commit lookup
        if isinstance(prs, list) and prs and isinstance(prs[0], dict) and isinstance(prs[0].get("number"), int):
            return prs[0]["number"]
    return None


# --- workflow commands and files -----------------------------------------------------------


@dataclass
class Annotation:
    level: str  # "error" | "warning" | "notice"
    title: str
    message: str


def escape_workflow_command(text: str, *, property: bool = False) -> str:
    """Escape like @actions/core, so report text can neither break nor inject workflow commands."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if property:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def format_annotation(a: Annotation) -> str:
    """One ::error/::warning/::notice line; GitHub shows it on the run and the PR's checks."""
    if a.level not in ANNOTATION_LEVELS:
        raise ValueError(f"annotation level must be one of {', '.join(ANNOTATION_LEVELS)}, not {a.level!r}")
    props = f" title={escape_workflow_command(a.title, property=True)}" if a.title else ""
    return f"::{a.level}{props}::{escape_workflow_command(a.message)}"


def write_outputs(path: Path, outputs: dict[str, str]) -> None:
    """Append step outputs to GITHUB_OUTPUT; multi-line values use a random heredoc delimiter no value contains."""
    lines: list[str] = []
    for name, value in outputs.items():
        if not name or any(c in name for c in "=\r\n<"):
            raise ValueError(f"invalid output name {name!r}")
        value = str(value)
        if "\n" in value or "\r" in value:
            delimiter = f"ghadelimiter_{uuid.uuid4()}"
            while delimiter in value:  # pragma: no cover - astronomically unlikely
                delimiter = f"ghadelimiter_{uuid.uuid4()}"
            lines.append(f"{name}<<{delimiter}\n{value}\n{delimiter}\n")
        else:
            lines.append(f"{name}={value}\n")
    with open(path, "a", encoding="utf-8", newline="") as f:
        f.write("".join(lines))


def append_summary(path: Path, markdown: str) -> None:
    """Append to GITHUB_STEP_SUMMARY within GitHub's 1 MiB a step (counting what the step already wrote)."""
    try:
        used = path.stat().st_size
    except OSError:
        used = 0
    data = markdown.encode("utf-8")
    if used + len(data) > SUMMARY_LIMIT:
        note = (
            b"\n\n> **Note:** the rest of this report was cut: GitHub limits a step summary to 1 MiB. "
            b"The results file has everything.\n"
        )
        room = SUMMARY_LIMIT - used - len(note)
        if room <= 0:
            return
        cut = data[:room].decode("utf-8", "ignore")
        newline = cut.rfind("\n")
        if newline > 0:
            cut = cut[:newline]
        data = cut.encode("utf-8") + note
    with open(path, "ab") as f:
        f.write(data)
