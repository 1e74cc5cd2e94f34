"""Deliver the PR regression report on GitHub: sticky PR comment, commit status, job summary, outputs, annotations.

Standard library only (urllib), so the action installs nothing extra. Every GitHub failure is turned into a
note instead of an exception: a read-only token (fork pull requests) or an outage must never lose the results,
which always land in the job summary first. The token never appears in anything this module produces.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlci import __version__
from mlci.gitinfo import read_event

MARKER = "<!-- mlci:report -->"

API_VERSION = "2022-11-28"
USER_AGENT = f"mlci/{__version__}"
# GitHub rejects comment bodies over 65,536 characters (422) and caps a step summary at 1 MiB.
COMMENT_LIMIT = 65_536
SUMMARY_LIMIT = 1_048_576
STATUS_DESCRIPTION_LIMIT = 140
STATUS_STATES = ("error", "failure", "pending", "success")
ANNOTATION_LEVELS = ("error", "warning", "notice")

FORK_HINT = (
    "the token is read-only, as on pull requests from forks; the report is in the job summary. "
    "Use the two-stage workflow (mlci-comment.yml) to comment on fork pull requests."
)

_REDACTED = "***"
_MIN_SECRET = 6  # shorter "tokens" are test stand-ins; scrubbing them would mangle ordinary text


def _scrub(text: str, *secrets: str | None) -> str:
    """Remove secrets from text we are about to show, store or send anywhere."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET:
            text = text.replace(secret, _REDACTED)
    return text


class GitHubError(Exception):
    """A GitHub API call failed for good (after retries), with GitHub's own message; never carries the token."""

    def __init__(self, status: int | None, message: str, *, rate_limited: bool = False) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.rate_limited = rate_limited

    def __str__(self) -> str:
        return f"GitHub answered {self.status}: {self.message}" if self.status is not None else self.message


@dataclass
class GitHubContext:
    """What the Actions environment says about this run; built once so the rest never reads os.environ."""

    api_url: str = "https://api.github.com"
    server_url: str = "https://github.com"
    repository: str | None = None
    token: str | None = field(default=None, repr=False)
    sha: str | None = None
    event_name: str | None = None
    event: dict = field(default_factory=dict, repr=False)
    run_id: str | None = None
    step_summary: Path | None = None
    output: Path | None = None
    github_actions: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, token: str | None = None) -> GitHubContext:
        """Read the GITHUB_* variables; the head sha comes from the event so statuses land on the PR's commit."""
        env = os.environ if env is None else env
        event = read_event(env.get("GITHUB_EVENT_PATH"))
        sha = _event_head_sha(event) or env.get("GITHUB_SHA") or None

        def path(name: str) -> Path | None:
            value = env.get(name)
            return Path(value) if value else None

        return cls(
            api_url=(env.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/"),
            server_url=(env.get("GITHUB_SERVER_URL") or "https://github.com").rstrip("/"),
            repository=env.get("GITHUB_REPOSITORY") or None,
            token=token if token is not None else (env.get("GITHUB_TOKEN") or None),
            sha=sha,
            event_name=env.get("GITHUB_EVENT_NAME") or None,
            event=event,
            run_id=env.get("GITHUB_RUN_ID") or None,
            step_summary=path("GITHUB_STEP_SUMMARY"),
            output=path("GITHUB_OUTPUT"),
            github_actions=env.get("GITHUB_ACTIONS") == "true",
        )

    @property
    def run_url(self) -> str | None:
        """Link from the status and the comment back to the run that produced the report."""
        if not (self.repository and self.run_id):
            return None
        return f"{self.server_url.rstrip('/')}/{self.repository}/actions/runs/{self.run_id}"

    @property
    def in_actions(self) -> bool:
        return self.github_actions


def _event_head_sha(event: dict) -> str | None:
    """On pull_request events GITHUB_SHA is a merge commit, on workflow_run the default branch: use the PR head."""
    pr = event.get("pull_request")
    if isinstance(pr, dict) and isinstance(pr.get("head"), dict) and pr["head"].get("sha"):
        return str(pr["head"]["sha"])
    run = event.get("workflow_run")
    if isinstance(run, dict) and run.get("head_sha"):
        return str(run["head_sha"])
    return None


_LINK_RE = re.compile(r'<([^>]*)>\s*((?:;\s*[^;,]+)*)')


def parse_link_header(value: str | None) -> dict[str, str]:
    """rel -> URL from an RFC 8288 Link header (GitHub's pagination), URLs kept verbatim."""
    links: dict[str, str] = {}
    for match in _LINK_RE.finditer(value or ""):
        url, params = match.group(1), match.group(2)
        rel = re.search(r'rel\s*=\s*"?([^";]+)"?', params)
        if rel:
            for name in rel.group(1).split():
                links.setdefault(name.lower(), url)
    return links


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib re-sends every header, Authorization included, on redirects: only follow those that stay on the API host."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlsplit(newurl)[:2] != urllib.parse.urlsplit(req.full_url)[:2]:
            return None  # urllib then raises HTTPError with the 3xx, reported below
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


class GitHubClient:
    """A small REST client: retries what GitHub asks to retry, raises GitHubError with GitHub's message otherwise."""

    def __init__(
        self,
        api_url: str,
        token: str,
        *,
        retries: int = 4,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = 30.0,
        max_wait: float = 60.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = token
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.timeout = timeout
        self.max_wait = max_wait  # a rate limit that resets later than this is reported, not waited out
        origin = urllib.parse.urlsplit(self.api_url)
        self._origin = (origin.scheme, origin.netloc)

    def __repr__(self) -> str:
        return f"GitHubClient(api_url={self.api_url!r})"

    def _url(self, path_or_url: str) -> str:
        if "://" not in path_or_url:
            return self.api_url + "/" + path_or_url.lstrip("/")
        parts = urllib.parse.urlsplit(path_or_url)
        if (parts.scheme, parts.netloc) != self._origin:
            # Pagination URLs come from the server; never send the token anywhere else.
            raise GitHubError(None, f"refusing to send the token to {parts.scheme}://{parts.netloc} (API is {self.api_url})")
        return path_or_url

    def _headers(self, has_body: bool) -> dict[str, str]:
        headers = {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {self._token}",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": USER_AGENT,
        }
        if has_body:
            headers["Content-Type"] = "application/json"
        return headers

    def _wait(self, attempt: int, status: int | None, headers: Mapping[str, str]) -> tuple[float, bool]:
        """Seconds to wait before the next try, and whether GitHub itself asked for it (rate limits)."""
        retry_after = headers.get("retry-after")
        if retry_after is not None:
            try:
                return max(0.0, float(retry_after)), True
            except ValueError:
                pass
        if headers.get("x-ratelimit-remaining") == "0" and headers.get("x-ratelimit-reset"):
            try:
                return max(0.0, float(headers["x-ratelimit-reset"]) - time.time()) + 1.0, True
            except ValueError:
                pass
        if status in (403, 429):  # secondary rate limit with no hint: GitHub asks for at least a minute
            return min(self.max_wait, 60.0), True
        return self.backoff * (2**attempt), False

    def request(
        self, method: str, path_or_url: str, body: dict | None = None, *, retries: int | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        """One API call with retries; returns (status, parsed JSON or None, lower-cased headers)."""
        url = self._url(path_or_url)
        data = json.dumps(body).encode("utf-8") if body is not None else None
        method = method.upper()
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                req = urllib.request.Request(url, data=data, method=method, headers=self._headers(data is not None))
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    status, raw, headers = resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
            except urllib.error.HTTPError as exc:
                status, headers = exc.code, {k.lower(): v for k, v in (exc.headers or {}).items()}
                try:
                    raw = exc.read()
                except (OSError, http.client.HTTPException):
                    raw = b""
                finally:
                    exc.close()
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, DNS, timeout
                reason = getattr(exc, "reason", None) or exc
                if last:
                    raise GitHubError(None, self._clean(f"could not reach {self.api_url}: {reason}")) from None
                self.sleep(self.backoff * (2**attempt))
                continue
            payload = _parse_json(raw)
            if status < 300:
                return status, payload, headers
            if status < 400:  # a redirect off the API host (see _SameOriginRedirects)
                raise GitHubError(status, f"not following a redirect to {headers.get('location') or '?'} with the token")
            rate_limited = status == 429 or (
                status == 403 and (headers.get("x-ratelimit-remaining") == "0" or "retry-after" in headers)
            )
            if status < 500 and not rate_limited:
                raise GitHubError(status, self._message(status, payload, raw))
            wait, asked = self._wait(attempt, status, headers)
            if last or (asked and wait > self.max_wait):
                message = self._message(status, payload, raw)
                if asked and wait > self.max_wait:
                    message += f"; rate limited for another {wait:.0f} s, more than the {self.max_wait:.0f} s mlci waits"
                raise GitHubError(status, message, rate_limited=rate_limited)
            self.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _clean(self, text: str) -> str:
        return _scrub(text, self._token)

    def _message(self, status: int, payload: Any, raw: bytes) -> str:
        if isinstance(payload, dict) and payload.get("message"):
            message = str(payload["message"])
            errors = payload.get("errors")
            if isinstance(errors, list) and errors:
                message += ": " + "; ".join(
                    str(e.get("message") or e.get("code") or e) if isinstance(e, dict) else str(e) for e in errors
                )
        else:
            message = raw[:200].decode("utf-8", "replace").strip() or http.client.responses.get(status, "error")
        return self._clean(message)

    def paginate(self, path: str) -> Iterator[Any]:
        """Every item of a list endpoint, following Link rel="next" verbatim (GitHub may change the URL's form)."""
        url: str | None = path
        while url:
            _, payload, headers = self.request("GET", url)
            if isinstance(payload, list):
                yield from payload
            elif payload is not None:
                yield payload
            url = parse_link_header(headers.get("link")).get("next")

    def find_pull_request(self, ctx: GitHubContext, claimed: int | None = None) -> int | None:
        """The PR this run reports on: from the event payload when it says, else the open PR whose head is ctx.sha.

        `claimed` is a PR number read from a results file. It is data from an untrusted run (a fork's), so it
        is used only when GitHub confirms that PR is open with ctx.sha as its head: a forged number cannot
        put a report on somebody else's pull request.
        """
        number = _event_pull_request(ctx.event)
        if number is not None:
            return number
        if not (ctx.repository and ctx.sha):
            return None
        path = f"/repos/{_repo(ctx.repository)}/commits/{urllib.parse.quote(ctx.sha, safe='')}/pulls?per_page=100"
        for pr in self.paginate(path):
            if isinstance(pr, dict) and pr.get("state") == "open" and isinstance(pr.get("number"), int):
                return pr["number"]
        if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed <= 0:
            return None
        try:
            _, pr, _ = self.request("GET", f"/repos/{_repo(ctx.repository)}/pulls/{claimed}")
        except GitHubError as exc:
            if exc.status == 404:
                return None
            raise
        head = pr.get("head") if isinstance(pr, dict) else None
        if isinstance(head, dict) and head.get("sha") == ctx.sha and pr.get("state") == "open":
            return claimed
        return None

    def upsert_comment(self, repository: str, pr: int, body: str, marker: str = MARKER) -> tuple[str, str]:
        """Update the comment carrying the marker (the first, if several) or create it: one report per PR."""
        body = _fit_comment(body if marker in body else f"{marker}\n{body}", marker)
        repo = _repo(repository)
        for attempt in range(self.retries + 1):
            existing = self._find_comment(repo, pr, marker)
            if existing is not None:
                _, payload, _ = self.request("PATCH", f"/repos/{repo}/issues/comments/{int(existing['id'])}", {"body": body})
                return str(payload["html_url"]), "updated"
            try:
                # Not retried blindly: a create that answered 502 may have been made anyway,
                # so look for it again first (one sticky comment, never two).
                _, payload, _ = self.request("POST", f"/repos/{repo}/issues/{int(pr)}/comments", {"body": body}, retries=0)
                return str(payload["html_url"]), "created"
            except GitHubError as exc:
                retriable = exc.status is None or exc.status >= 500 or exc.rate_limited
                if not retriable or attempt == self.retries:
                    raise
                self.sleep(self.backoff * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _find_comment(self, repo: str, pr: int, marker: str) -> dict | None:
        for comment in self.paginate(f"/repos/{repo}/issues/{int(pr)}/comments?per_page=100"):
            if isinstance(comment, dict) and marker in (comment.get("body") or ""):
                return comment
        return None

    def set_status(
        self,
        repository: str,
        sha: str,
        state: str,
        description: str,
        context: str = "mlci",
        target_url: str | None = None,
    ) -> None:
        """Commit status on the head sha, so branch protection can require mlci; description fits GitHub's 140."""
        if state not in STATUS_STATES:
            raise ValueError(f"commit status state must be one of {', '.join(STATUS_STATES)}, not {state!r}")
        if len(description) > STATUS_DESCRIPTION_LIMIT:
            description = description[: STATUS_DESCRIPTION_LIMIT - 1] + "…"
        body: dict[str, Any] = {"state": state, "description": description, "context": context}
        if target_url:
            body["target_url"] = target_url
        self.request("POST", f"/repos/{_repo(repository)}/statuses/{urllib.parse.quote(sha, safe='')}", body)


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None


def _repo(repository: str) -> str:
    owner, sep, name = repository.partition("/")
    if not (owner and sep and name) or "/" in name:
        raise ValueError(f"repository must be 'owner/name', not {repository!r}")
    return f"{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(name, safe='')}"


def _event_pull_request(event: dict) -> int | None:
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


def _fit_comment(body: str, marker: str) -> str:
    """Cut an oversized report so GitHub takes it (422 otherwise); the summary keeps the full text."""
    if len(body) <= COMMENT_LIMIT:
        return body
    note = f"\n\n…the report was cut at GitHub's {COMMENT_LIMIT:,}-character comment limit; the job summary has all of it.\n"
    cut = body[: COMMENT_LIMIT - len(note)]
    newline = cut.rfind("\n")
    if newline > len(marker):
        cut = cut[:newline]
    return cut + note


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


@dataclass
class Delivery:
    comment_url: str | None = None
    comment_action: str | None = None  # created | updated
    pr: int | None = None
    status_set: bool = False
    summary_written: bool = False
    notes: list[str] = field(default_factory=list)


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
    """Put the report everywhere it can go; never raises for GitHub trouble, so the results are never lost."""
    secret = ctx.token or (client._token if client is not None else None)
    done = Delivery()
    fork_noted = False

    def note(text: str) -> None:
        done.notes.append(_scrub(text, secret))

    def to_summary(markdown: str) -> bool:
        if ctx.step_summary is None:
            return False
        try:
            append_summary(ctx.step_summary, _scrub(markdown, secret))
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
        print_line(_scrub(format_annotation(annotation), secret))

    try:
        if not ((client is not None or ctx.token) and ctx.repository):
            have = {"GITHUB_TOKEN": client is not None or bool(ctx.token), "GITHUB_REPOSITORY": bool(ctx.repository)}
            unset = [name for name, ok in have.items() if not ok]
            where = "the report is in the job summary" if done.summary_written else "no job summary either (GITHUB_STEP_SUMMARY unset)"
            note(f"nothing posted to GitHub: {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set; {where}")
        else:
            assert ctx.repository is not None
            api = client or GitHubClient(ctx.api_url, ctx.token or "")
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
                            url, action = api.upsert_comment(ctx.repository, done.pr, _scrub(comment, secret))
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
                        api.set_status(ctx.repository, ctx.sha, state, _scrub(description, secret), target_url=ctx.run_url)
                    except GitHubError as exc:
                        github_failed(exc, "set the commit status")
                    else:
                        done.status_set = True
                        note(f"set commit status mlci={state} on {ctx.sha[:12]}")
    except Exception as exc:  # a bug here must not cost the user the outputs below
        note(f"GitHub delivery failed unexpectedly: {type(exc).__name__}: {exc}")

    if ctx.output is not None:
        values = {k: _scrub(str(v), secret) for k, v in outputs.items()}
        if done.comment_url:
            values["comment-url"] = done.comment_url
        try:
            write_outputs(ctx.output, values)
        except (OSError, ValueError) as exc:
            note(f"could not write the step outputs {ctx.output}: {exc}")
    return done
