"""Deliver a rendered report everywhere it goes on GitHub: job summary, annotations, sticky PR comment,
commit status, step outputs.

Joins the two GitHub adapters: the Actions side (`mlci.actions`: the run's context, the summary and
output files, workflow commands) and the REST API (`mlci.github`). Every GitHub failure becomes a
note instead of an exception: a read-only token (fork pull requests) or an outage must never lose the
results, which land in the job summary first; all GitHub calls of one delivery together take at most
MLCI_GITHUB_DEADLINE seconds (a minute by default), so a hung API cannot hold the job. The token never
appears in anything written or printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from mlci.actions import Annotation, GitHubContext, append_summary, format_annotation, write_outputs
from mlci.config import seconds_from_env
from mlci.github import DEADLINE_S, GitHubClient, GitHubError, scrub_secrets

DEADLINE_ENV = "MLCI_GITHUB_DEADLINE"
"""Seconds all GitHub calls of one delivery may take together (default DEADLINE_S)."""

FORK_HINT = (
    "the token is read-only, as on pull requests from forks; the report is in the job summary. "
    "Use the two-stage workflow (mlci-comment.yml) to comment on fork pull requests."
)


@dataclass
class Delivery:
    comment_url: str | None = None
    comment_action: str | None = None  # created | updated
    pr: int | None = None
    status_set: bool = False
    summary_written: bool = False
    notes: list[str] = field(default_factory=list)


COMMENT_AUTHOR_ENV = "MLCI_COMMENT_AUTHOR"
"""The login mlci's comments are written by, for a GitHub App's installation token (APP-SLUG[bot]):
such a token cannot ask GitHub who it is, and only comments by this login are updated."""


def github_deadline(environ: Mapping[str, str] | None = None) -> tuple[float, str | None]:
    """The deadline for all GitHub calls of a delivery: MLCI_GITHUB_DEADLINE seconds, else DEADLINE_S;
    and a note when the variable is set but not a positive number (the default is used then)."""
    return seconds_from_env(DEADLINE_ENV, DEADLINE_S, environ)


def _describe(error: GitHubError, what: str, hinted: bool = False) -> str:
    if error.status == 403 and not error.rate_limited:
        hint = "the token is read-only (see above)" if hinted else FORK_HINT
        return f"could not {what}: GitHub answered 403 ({error.message}): {hint}"
    if error.status is None:
        return f"could not {what}: {error.message}"
    return f"could not {what}: GitHub answered {error.status} ({error.message})"


def deliver(
    ctx: GitHubContext,
    *,
    comment: str,
    marker: str,
    summary: str,
    outputs: dict[str, str],
    annotations: list[Annotation],
    state: str,
    description: str,
    client: GitHubClient | None = None,
    post_comment: bool = True,
    set_status: bool = True,
    claimed_pr: int | None = None,
    print_line: Callable[[str], None] = print,
) -> Delivery:
    """Put the report everywhere it can go; never raises for GitHub trouble, so the results are never lost.

    `marker` identifies the sticky comment to update (the report's first line): one comment per marker.
    """
    done = Delivery()
    fork_noted = False

    def clean(text: str) -> str:
        text = scrub_secrets(text, ctx.token)
        return client.scrub(text) if client is not None else text

    def note(text: str) -> None:
        done.notes.append(clean(text))

    def to_summary(markdown: str) -> bool:
        if ctx.step_summary is None:
            return False
        try:
            append_summary(ctx.step_summary, clean(markdown))
        except OSError as exc:
            note(f"could not write the job summary {ctx.step_summary}: {exc}")
            return False
        return True

    def github_failed(error: GitHubError, what: str) -> None:
        nonlocal fork_noted
        text = _describe(error, what, hinted=fork_noted)
        note(text)
        if error.status == 403 and not error.rate_limited and not fork_noted:
            fork_noted = True
            if done.summary_written:
                to_summary(f"\n\n> **mlci:** {text}\n")

    if ctx.step_summary is not None:
        done.summary_written = to_summary(summary)
    for annotation in annotations:
        print_line(clean(format_annotation(annotation)))

    try:
        if not ((client is not None or ctx.token) and ctx.repository):
            have = {"GITHUB_TOKEN": client is not None or bool(ctx.token), "GITHUB_REPOSITORY": bool(ctx.repository)}
            unset = [name for name, ok in have.items() if not ok]
            where = "the report is in the job summary" if done.summary_written else "no job summary either (GITHUB_STEP_SUMMARY unset)"
            note(f"nothing posted to GitHub: {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set; {where}")
        else:
            assert ctx.repository is not None
            if client is None:
                deadline, problem = github_deadline()
                if problem:
                    note(problem)
                api = GitHubClient(ctx.api_url, ctx.token or "", deadline=deadline,
                                   author=os.environ.get(COMMENT_AUTHOR_ENV, "").strip() or None)
            else:
                api = client
            if post_comment:
                try:
                    done.pr = api.find_pull_request(ctx, claimed=claimed_pr)
                except GitHubError as exc:
                    github_failed(exc, "find the pull request")
                else:
                    if done.pr is None:
                        note(f"no open pull request found for {ctx.sha or 'this run'}; no PR comment posted")
                    else:
                        try:
                            url, action = api.upsert_comment(ctx.repository, done.pr, clean(comment), marker)
                        except GitHubError as exc:
                            github_failed(exc, "post the PR comment")
                        else:
                            done.comment_url, done.comment_action = url, action
                            note(f"{action} the report comment on PR #{done.pr}: {url}")
            if set_status:
                if not ctx.sha:
                    note("no commit sha (GITHUB_SHA); commit status not set")
                else:
                    try:
                        api.set_status(ctx.repository, ctx.sha, state, clean(description), target_url=ctx.run_url)
                    except GitHubError as exc:
                        github_failed(exc, "set the commit status")
                    else:
                        done.status_set = True
                        note(f"set commit status mlci={state} on {ctx.sha[:12]}")
    except Exception as exc:  # a bug here must not cost the user the outputs below
        note(f"GitHub delivery failed unexpectedly: {type(exc).__name__}: {exc}")

    if ctx.output is not None:
        values = {k: clean(str(v)) for k, v in outputs.items()}
        if done.comment_url:
            values["comment-url"] = done.comment_url
        try:
            write_outputs(ctx.output, values)
        except (OSError, ValueError) as exc:
            note(f"could not write the step outputs {ctx.output}: {exc}")
    return done
