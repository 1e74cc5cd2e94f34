"""GitHub's REST API: a small client for the sticky PR comment, the commit status and finding the pull request.

Standard library only (urllib), so the action installs nothing extra. Retries what GitHub asks to be
retried and raises GitHubError with GitHub's own message otherwise; a client's calls together never
take longer than its deadline. The token never appears in anything this module produces, and is sent
to the API host only. Reads no environment: the caller passes the API URL, the token and what it
knows about the run.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from mlci import __version__
from mlci.formatting import COMMENT_LIMIT

API_VERSION = "2022-11-28"
USER_AGENT = f"mlci/{__version__}"
DEADLINE_S = 60.0
"""Seconds one client spends on GitHub at most, retries and waits included: a hung API costs a minute, not ten."""
ACTIONS_BOT = "github-actions[bot]"
"""Who a workflow's GITHUB_TOKEN posts as."""
STATUS_DESCRIPTION_LIMIT = 140
STATUS_STATES = ("error", "failure", "pending", "success")

_REDACTED = "***"
_MIN_SECRET = 6  # shorter "tokens" are test stand-ins; scrubbing them would mangle ordinary text


def scrub_secrets(text: str, *secrets: str | None) -> str:
    """Remove secrets from text we are about to show, store or send anywhere."""
    for secret in secrets:
        if secret and len(secret) >= _MIN_SECRET:
            text = text.replace(secret, _REDACTED)
    return text


class RunContext(Protocol):
    """What finding the pull request needs to know about the run (actions.GitHubContext has it)."""

    repository: str | None
    sha: str | None

    def pull_request_number(self) -> int | None: ...


class GitHubError(Exception):
    """A GitHub API call failed for good (after retries), with GitHub's own message; never carries the token."""

    def __init__(self, status: int | None, message: str, *, rate_limited: bool = False) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.rate_limited = rate_limited

    def __str__(self) -> str:
        return f"GitHub answered {self.status}: {self.message}" if self.status is not None else self.message


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


class _Watchdog:
    """Shuts down the sockets of one call when its time is up.

    A socket timeout bounds each read, not the call: a server that sends a byte every few
    seconds never trips it. The watchdog keeps a duplicate of each socket the call opens
    (`track`, from the connection classes below) and shuts the connection down at the deadline,
    which ends any read in progress, during the TLS handshake too.
    """

    _current = threading.local()

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.fired = False
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        _Watchdog._current.dog = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        _Watchdog._current.dog = None
        with self._lock:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()

    @classmethod
    def track(cls, sock: socket.socket) -> None:
        dog = getattr(cls._current, "dog", None)
        if dog is None:
            return
        with dog._lock:
            twin = sock.dup()  # ours to shut down and close, whatever the connection does with its own
            dog._sockets.append(twin)
            if dog.fired:
                _shutdown(twin)

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _watched_connection(*args: Any, **kwargs: Any) -> socket.socket:
    sock = socket.create_connection(*args, **kwargs)
    _Watchdog.track(sock)
    return sock


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _watched_connection


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _watched_connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(_HTTPSConnection, req, context=self._context)


_OPENER = urllib.request.build_opener(_SameOriginRedirects, _HTTPHandler, _HTTPSHandler)


@dataclass(frozen=True)
class Author:
    """Who wrote a comment: mlci updates only comments written by the identity it posts as."""

    login: str
    type: str | None = None
    id: int | None = None

    def wrote(self, comment: Mapping[str, Any]) -> bool:
        user = comment.get("user")
        if not isinstance(user, dict) or not isinstance(user.get("login"), str):
            return False
        if user["login"].casefold() != self.login.casefold():
            return False
        if self.type is not None and user.get("type") != self.type:
            return False
        return self.id is None or user.get("id") == self.id


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
        timeout: float = 20.0,
        max_wait: float = 60.0,
        deadline: float | None = DEADLINE_S,
        author: str | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._token = token
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.timeout = timeout  # one read
        self.max_wait = max_wait  # a rate limit that resets later than this is reported, not waited out
        self.deadline = deadline  # every call of this client together, from the first; None: no limit
        self._started: float | None = None
        # Who the token posts as, when GET /user cannot tell (a GitHub App's token posts as APP-SLUG[bot]).
        self._author = Author(author) if author else None
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

    def _remaining(self) -> float:
        """Seconds left of the deadline (infinite without one); the clock starts at the first call."""
        if self.deadline is None:
            return float("inf")
        if self._started is None:
            self._started = time.monotonic()
        return self.deadline - (time.monotonic() - self._started)

    def _out_of_time(self, why: str | None = None) -> GitHubError:
        text = f"gave up on {self.api_url} after the {self.deadline:g} s mlci allows GitHub in all"
        return GitHubError(None, self.scrub(f"{text} ({why})" if why else text))

    def _pause(self, seconds: float, why: str) -> None:
        """Sleep before a retry, unless that would run past the deadline: then give up now."""
        if seconds >= self._remaining():
            raise self._out_of_time(why)
        self.sleep(seconds)

    def request(
        self, method: str, path_or_url: str, body: dict | None = None, *, retries: int | None = None
    ) -> tuple[int, Any, dict[str, str]]:
        """One API call with retries; returns (status, parsed JSON or None, lower-cased headers).

        Bounded by the client's deadline as a whole: each try gets what is left of it, and a
        server that keeps a connection alive without answering is cut off when it runs out."""
        url = self._url(path_or_url)
        data = json.dumps(body).encode("utf-8") if body is not None else None
        method = method.upper()
        retries = self.retries if retries is None else retries
        for attempt in range(retries + 1):
            last = attempt == retries
            remaining = self._remaining()
            if remaining <= 0:
                raise self._out_of_time()
            try:
                req = urllib.request.Request(url, data=data, method=method, headers=self._headers(data is not None))
                with _Watchdog(remaining) as dog:
                    try:
                        status, raw, headers = _exchange(req, min(self.timeout, remaining))
                    finally:
                        if dog.fired:  # whatever the cut-off read returned or raised
                            raise self._out_of_time(f"no complete answer to {method} {urllib.parse.urlsplit(url).path}")
            except (OSError, http.client.HTTPException) as exc:  # refused, reset, DNS, timeout
                reason = getattr(exc, "reason", None) or exc
                problem = self.scrub(f"could not reach {self.api_url}: {reason}")
                if last:
                    raise GitHubError(None, problem) from None
                self._pause(self.backoff * (2**attempt), problem)
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
            limit = max(0.0, min(self.max_wait, self._remaining()))
            if last or (asked and wait > limit):
                message = self._message(status, payload, raw)
                if asked and wait > limit:
                    message += f"; rate limited for another {wait:.0f} s, more than the {limit:.0f} s mlci waits"
                raise GitHubError(status, message, rate_limited=rate_limited)
            self._pause(wait, f"GitHub answered {status}: {self._message(status, payload, raw)}")
        raise AssertionError("unreachable")  # pragma: no cover

    def scrub(self, text: str) -> str:
        """`text` without this client's token: for any text about a call that may echo it."""
        return scrub_secrets(text, self._token)

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
        return self.scrub(message)

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

    def find_pull_request(self, ctx: RunContext, claimed: int | None = None) -> int | None:
        """The PR this run reports on: from the event payload when it says, else the open PR whose head is ctx.sha.

        `claimed` is a PR number read from a results file. It is data from an untrusted run (a fork's), so it
        is used only when GitHub confirms that PR is open with ctx.sha as its head: a forged number cannot
        put a report on somebody else's pull request.
        """
        number = ctx.pull_request_number()
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

    def upsert_comment(self, repository: str, pr: int, body: str, marker: str) -> tuple[str, str]:
        """Update mlci's comment carrying `marker` (the first, if several) or create it: one comment per PR and marker.

        Only a comment written by the identity this token posts as (`author`) is updated. Anybody can
        write the marker into a comment of their own; were it taken for mlci's, the next report would
        land under their name, and they could edit it at will. Such comments are left alone.
        The marker (an HTML comment, invisible on GitHub) is put first in `body` unless it is in there already.
        """
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
                self._learn_author(payload)
                return str(payload["html_url"]), "created"
            except GitHubError as exc:
                retriable = exc.status is None or exc.status >= 500 or exc.rate_limited
                if not retriable or attempt == self.retries:
                    raise
                self._pause(self.backoff * (2**attempt), str(exc))
        raise AssertionError("unreachable")  # pragma: no cover

    def author(self) -> Author:
        """The identity this token posts as.

        A person's token (PAT, OAuth) reads it from GET /user. An installation token (a workflow's
        GITHUB_TOKEN) cannot read /user (403 or 404) and posts as github-actions[bot]; a GitHub App's
        own installation token posts as APP-SLUG[bot], which the caller passes as `author`.
        """
        if self._author is None:
            try:
                _, user, _ = self.request("GET", "/user")
            except GitHubError as exc:
                if exc.status not in (403, 404):
                    raise
                self._author = Author(ACTIONS_BOT, "Bot")
            else:
                if not (isinstance(user, dict) and isinstance(user.get("login"), str)):
                    raise GitHubError(None, f"GET {self.api_url}/user answered without a login")
                uid = user.get("id")
                self._author = Author(user["login"], user.get("type"), uid if isinstance(uid, int) else None)
        return self._author

    def _learn_author(self, created: Any) -> None:
        """A comment just created shows who this token posts as: no GET /user needed for the next update."""
        user = created.get("user") if isinstance(created, dict) else None
        if self._author is None and isinstance(user, dict) and isinstance(user.get("login"), str):
            uid = user.get("id")
            self._author = Author(user["login"], user.get("type"), uid if isinstance(uid, int) else None)

    def _find_comment(self, repo: str, pr: int, marker: str) -> dict | None:
        for comment in self.paginate(f"/repos/{repo}/issues/{int(pr)}/comments?per_page=100"):
            if isinstance(comment, dict) and marker in (comment.get("body") or "") and self.author().wrote(comment):
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


def _exchange(req: urllib.request.Request, timeout: float) -> tuple[int, bytes, dict[str, str]]:
    """Send one request and read the whole answer, error answers included: (status, body, lower-cased headers)."""
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as exc:
        headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
        try:
            raw = exc.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        finally:
            exc.close()
        return exc.code, raw, headers


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
