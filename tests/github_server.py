"""A stateful fake of the GitHub REST API that checks every request and response against GitHub's OpenAPI description.

Why not mocks: the client's worth is in the wire details (headers, pagination links, error bodies, retries), and a
stateless mock cannot test update-in-place. Every request and every response goes through openapi-core 0.23.1
with GitHub's own description (tests/data/github/openapi-subset.json); any mismatch is recorded in ``errors``
(tests assert it empty) and answered 400 (bad request) or 500 (bad response from this fake) so it shows up.

Usage::

    with FakeGitHub(token="ghs_x") as gh:
        client = GitHubClient(gh.url, "ghs_x")
        ...
    assert gh.errors == []
"""

from __future__ import annotations

import base64
import copy
import functools
import itertools
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from openapi_core import OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_schema_validator import OAS30Validator
from werkzeug.datastructures import Headers, ImmutableMultiDict

SPEC_PATH = Path(__file__).parent / "data" / "github" / "openapi-subset.json"
DOCS = "https://docs.github.com/rest"
API_VERSION = "2022-11-28"
WRITE_METHODS = {"POST", "PATCH", "PUT", "DELETE"}


GET_AUTHENTICATED_USER = {
    "summary": "Get the authenticated user",
    "operationId": "users/get-authenticated",
    "externalDocs": {"description": "API method documentation",
                     "url": "https://docs.github.com/rest/users/users#get-the-authenticated-user"},
    "parameters": [],
    "responses": {
        # GitHub answers a private-user or public-user object; both carry every field of simple-user,
        # the part of it mlci reads (login, id, type).
        "200": {"description": "Response", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/simple-user"}}}},
        "304": {"$ref": "#/components/responses/not_modified"},
        "401": {"description": "Requires authentication",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/basic-error"}}}},
        "403": {"$ref": "#/components/responses/forbidden"},
    },
}
"""GET /user, which the trimmed description leaves out: mlci asks it who a person's token posts as."""


@functools.cache
def load_spec(path: Path = SPEC_PATH) -> tuple[dict, OpenAPI]:
    """GitHub's description plus GET /user and a 127.0.0.1:{port} server entry, parsed and checked once per test session."""
    spec = json.loads(path.read_text(encoding="utf-8"))
    spec["servers"] = [*spec.get("servers", []), {"url": "http://127.0.0.1:{port}", "variables": {"port": {"default": "80"}}}]
    spec["paths"].setdefault("/user", {"get": GET_AUTHENTICATED_USER})
    return spec, OpenAPI.from_dict(spec)


class _Request:
    """openapi-core's raw Request protocol (host_url, path, method, parameters, body, content_type)."""

    def __init__(self, host_url: str, method: str, path: str, query: str, headers: Headers, body: bytes) -> None:
        self.host_url = host_url
        self.path = path
        self.method = method.lower()
        self.body = body or None
        self.content_type = (headers.get("Content-Type") or "application/octet-stream").lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(urllib.parse.parse_qsl(query, keep_blank_values=True)),
            header=headers,
            cookie=ImmutableMultiDict(),
        )


class _Response:
    """openapi-core's Response protocol (status_code, headers, content_type, data)."""

    def __init__(self, status: int, headers: dict[str, str], data: bytes) -> None:
        self.status_code = status
        self.headers = Headers(headers)
        self.content_type = headers.get("Content-Type", "application/json").lower() if data else ""
        self.data = data or None


@dataclass
class Recorded:
    """One request as the client sent it."""

    method: str
    path: str  # URL path, no query
    query: dict[str, str]
    target: str  # path and query exactly as sent
    headers: dict[str, str]  # lower-case names
    json: Any
    status: int = 0  # what the fake answered
    response_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    error: bool = False  # an error body GitHub really sends where its description documents no such status


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _error(status: int, message: str, docs: str = DOCS, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, {"message": message, "documentation_url": docs, "status": str(status)}, headers or {}, error=True)


def _short(exc: BaseException, limit: int = 600) -> str:
    text = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and getattr(cause, "schema_errors", None):
        text = f"{type(exc).__name__}: " + "; ".join(str(e.message) for e in cause.schema_errors)
    elif cause is not None:
        text += f" ({cause})"
    return text if len(text) <= limit else text[:limit] + "…"


class FakeGitHub:
    """The issue-comment, commit-PR and commit-status endpoints of one repository, with failure injection."""

    def __init__(
        self,
        token: str = "ghs_fake_token_0123456789",
        repository: str = "octo-org/widgets",
        web_url: str = "https://github.com",
        spec_path: Path = SPEC_PATH,
        token_user: str | None = None,
    ) -> None:
        self.token = token
        # Who the token is: None, an installation token (a workflow's GITHUB_TOKEN: posts as
        # github-actions[bot], GET /user answers 403); a login, that person's token (a PAT).
        self.token_user = token_user
        self.repository = repository
        self.owner, self.repo = repository.split("/")
        self.web_url = web_url
        self.spec, self.openapi = load_spec(spec_path)
        self._pr_template = self.spec["components"]["examples"]["pull-request-simple-items"]["value"][0]
        self._full_pr_template = self.spec["components"]["examples"]["pull-request"]["value"]
        self.pull_objects: dict[int, dict] = {}  # number -> full pull-request objects (GET pulls/{n})
        self.comments: dict[int, list[dict]] = {}  # issue/PR number -> comments in creation order
        self.statuses: dict[str, list[dict]] = {}  # sha -> statuses, newest last
        self.pulls: dict[str, list[dict]] = {}  # head sha -> pull-request-simple objects
        self.requests: list[Recorded] = []
        self.errors: list[str] = []
        # failure injection
        self.read_only = False  # writes answer 403 "Resource not accessible by integration" (fork PR token)
        self._fail: list[int] = []  # statuses for the next calls (502s)
        self._rate_limits: list[dict[str, Any]] = []
        self._lose_writes = 0  # writes that are applied, then answered 502 (the reply was lost)
        self._ids = itertools.count(1_000_001)
        # self-hosted runners (actions/runners): id -> runner object, and the JIT config handed out for each
        self.runners: dict[int, dict] = {}
        self.jit_configs: dict[int, str] = {}
        self.online_after_polls: int | None = None
        """A registered runner turns online at its Nth GET (None: only when a test says `runner_comes_online`)."""
        self._runner_polls: dict[int, int] = {}
        self._runner_ids = itertools.count(41)
        self._lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> FakeGitHub:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.02,), name="fake-github", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeGitHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- knobs -------------------------------------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 502) -> None:
        """The next n calls answer this 5xx, as GitHub's front end does now and then."""
        with self._lock:
            self._fail.extend([status] * n)

    def lose_next_write_reply(self, n: int = 1) -> None:
        """The next n writes take effect but answer 502, as when GitHub's front end times out after the fact."""
        with self._lock:
            self._lose_writes += n

    def rate_limit(self, times: int = 1, status: int = 403, *, reset_in: float = 2, retry_after: int | None = None) -> None:
        """The next calls answer a primary rate limit (x-ratelimit-remaining: 0), optionally with retry-after."""
        with self._lock:
            self._rate_limits.extend([{"status": status, "reset_in": reset_in, "retry_after": retry_after}] * times)

    def clear_failures(self) -> None:
        """Drop injected failures not yet served."""
        with self._lock:
            self._fail.clear()
            self._rate_limits.clear()
            self.read_only = False

    def take_errors(self) -> list[str]:
        """Hand over (and clear) the validation errors, for tests that provoke them on purpose."""
        with self._lock:
            errors, self.errors = self.errors, []
            return errors

    # -- state helpers -----------------------------------------------------------------------------------------
    def _user(self, login: str = "github-actions[bot]", uid: int = 41898282, kind: str = "Bot") -> dict:
        api = f"{self.url}/users/{urllib.parse.quote(login)}"
        return {
            "login": login, "id": uid, "node_id": f"MDM6Qm90{uid}", "avatar_url": f"https://avatars.githubusercontent.com/in/{uid}?v=4",
            "gravatar_id": "", "url": api, "html_url": f"{self.web_url}/apps/{login}", "followers_url": f"{api}/followers",
            "following_url": f"{api}/following{{/other_user}}", "gists_url": f"{api}/gists{{/gist_id}}",
            "starred_url": f"{api}/starred{{/owner}}{{/repo}}", "subscriptions_url": f"{api}/subscriptions",
            "organizations_url": f"{api}/orgs", "repos_url": f"{api}/repos", "events_url": f"{api}/events{{/privacy}}",
            "received_events_url": f"{api}/received_events", "type": kind, "site_admin": False, "user_view_type": "public",
        }

    def _comment(self, number: int, body: str, user: dict | None = None) -> dict:
        cid = next(self._ids)
        now = _now()
        repo_api = f"{self.url}/repos/{self.repository}"
        return {
            "id": cid, "node_id": f"IC_kwDOABCD{cid}", "url": f"{repo_api}/issues/comments/{cid}",
            "html_url": f"{self.web_url}/{self.repository}/pull/{number}#issuecomment-{cid}", "body": body,
            "user": user or self._user(), "created_at": now, "updated_at": now, "issue_url": f"{repo_api}/issues/{number}",
            "author_association": "NONE", "performed_via_github_app": None,
            "reactions": {"url": f"{repo_api}/issues/comments/{cid}/reactions", "total_count": 0, "+1": 0, "-1": 0, "laugh": 0,
                          "confused": 0, "heart": 0, "hooray": 0, "eyes": 0, "rocket": 0},
        }

    def _token_identity(self) -> dict:
        """The user the token's writes are made as."""
        return self._user() if self.token_user is None else self._user(self.token_user, 1_000_042, "User")

    def add_comment(self, number: int, body: str, login: str = "someone", kind: str = "User") -> dict:
        """Seed a comment on a PR, by someone else than the token by default (``login="github-actions[bot]",
        kind="Bot"``: one an earlier run with a workflow token posted; the token's own login: one it posted)."""
        with self._lock:
            user = self._token_identity() if login == self.token_user else self._user(login, 583231, kind)
            comment = self._comment(number, body, user)
            self.comments.setdefault(number, []).append(comment)
            return comment

    def add_pull(self, number: int, head_sha: str, state: str = "open", *, linked: bool = True) -> dict:
        """A PR whose head is head_sha, built from GitHub's own examples made schema-valid (their team lacks `type`).

        linked=False: the commit lookup does not find it, as for a fork's commit; GET pulls/{n} still does.
        """
        api, web = f"{self.url}/repos/{self.repository}", f"{self.web_url}/{self.repository}"
        made = []
        for template in (self._pr_template, self._full_pr_template):
            pr = copy.deepcopy(template)
            for team in pr.get("requested_teams") or []:
                team.setdefault("type", "organization")
            pr.update({
                "number": number, "id": 10_000 + number, "state": state, "title": f"PR {number}",
                "url": f"{api}/pulls/{number}", "html_url": f"{web}/pull/{number}", "issue_url": f"{api}/issues/{number}",
                "comments_url": f"{api}/issues/{number}/comments", "statuses_url": f"{api}/statuses/{head_sha}",
                "closed_at": None if state == "open" else _now(), "merged_at": None,
            })
            pr["head"]["sha"] = head_sha
            made.append(pr)
        simple, full = made
        if "merged" in full:
            full["merged"] = False
        with self._lock:
            if linked:
                self.pulls.setdefault(head_sha, []).append(simple)
            self.pull_objects[number] = full
        return simple

    # -- self-hosted runners -----------------------------------------------------------------------------------
    def add_runner(self, name: str, labels: list[str] | None = None, *, status: str = "offline", busy: bool = False) -> dict:
        """Seed a registered runner (one an earlier job left behind, or another team's)."""
        with self._lock:
            rid = next(self._runner_ids)
            runner = {
                "id": rid, "runner_group_id": 1, "name": name, "os": "Linux" if status == "online" else "unknown",
                "status": status, "busy": busy, "ephemeral": True, "version": "2.323.0" if status == "online" else None,
                "labels": [{"id": 1, "name": "self-hosted", "type": "read-only"}, {"id": 2, "name": "X64", "type": "read-only"},
                           {"id": 3, "name": "Linux", "type": "read-only"}]
                + [{"id": 100 + i, "name": label, "type": "custom"} for i, label in enumerate(labels or [])],
            }
            self.runners[rid] = runner
            return runner

    def runner_named(self, name: str) -> dict | None:
        with self._lock:
            return next((r for r in self.runners.values() if r["name"] == name), None)

    def runner_comes_online(self, name: str | None = None) -> None:
        """The runner called `name` (every registered runner when None) connects, as its machine's runner would."""
        with self._lock:
            for runner in self.runners.values():
                if name is None or runner["name"] == name:
                    runner.update(status="online", os="Linux", version="2.323.0")

    def set_busy(self, name: str, busy: bool = True) -> None:
        """The runner called `name` takes (or finishes) a job."""
        with self._lock:
            runner = self.runner_named(name)
            assert runner is not None, f"no runner {name!r}"
            runner["busy"] = busy

    def _runners_route(self, method: str, path: str, rest: str, query: dict[str, str], body: Any) -> _Reply | None:
        docs = f"{DOCS}/actions/self-hosted-runners"
        if rest == "actions/runners" and method == "GET":
            items = [r for r in self.runners.values() if "name" not in query or r["name"] == query["name"]]
            reply = self._list(path, query, items)
            reply.body = {"total_count": len(items), "runners": reply.body}
            return reply
        if rest == "actions/runners/generate-jitconfig" and method == "POST":
            if self.runner_named(body["name"]) is not None:
                return _error(409, "Already exists - A runner with the name " + body["name"] + " already exists.", docs)
            runner = self.add_runner(body["name"], list(body["labels"]))
            runner["runner_group_id"] = body["runner_group_id"]
            # What the runner binary needs: a secret credential the job's machine must never show.
            secret = {".runner": f"runner-{runner['id']}", ".credentials": f"jit-secret-{runner['id']}-{next(self._ids)}"}
            encoded = base64.b64encode(json.dumps(secret).encode()).decode()
            self.jit_configs[runner["id"]] = encoded
            return _Reply(201, {"runner": copy.deepcopy(runner), "encoded_jit_config": encoded})
        if m := re.fullmatch(r"actions/runners/(\d+)", rest):
            rid = int(m.group(1))
            runner = self.runners.get(rid)
            if runner is None:
                return _error(404, "Not Found", docs)
            if method == "GET":
                self._runner_polls[rid] = polls = self._runner_polls.get(rid, 0) + 1
                if self.online_after_polls is not None and polls >= self.online_after_polls and runner["status"] != "online":
                    runner.update(status="online", os="Linux", version="2.323.0")
                return _Reply(200, copy.deepcopy(runner))
            if method == "DELETE":
                if runner["busy"]:
                    return _Reply(422, {"message": f"Bad request - Runner \"{runner['name']}\" is still running a job\"",
                                        "documentation_url": docs})
                del self.runners[rid]
                return _Reply(204)
        return None

    # -- request handling --------------------------------------------------------------------------------------
    def handle(self, method: str, target: str, headers: Headers, body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            split = urllib.parse.urlsplit(target)
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = None
            rec = Recorded(method, split.path, dict(urllib.parse.parse_qsl(split.query)), target,
                           {k.lower(): v for k, v in headers.items()}, parsed)
            self.requests.append(rec)
            reply = self._check_request(method, split, headers, body)
            validate = reply is None
            if reply is None:
                reply = self._inject(method) or self._route(method, split.path, rec.query, parsed)
                if method in ("POST", "PATCH") and self._lose_writes and reply.status < 300:
                    self._lose_writes -= 1
                    reply = _error(502, "Server Error")
            status, out_headers, data = self._encode(reply)
            if validate:
                problem = self._check_response(method, split, headers, body, reply, status, out_headers, data)
                if problem:
                    self.errors.append(f"{method} {target}: response {status} invalid: {problem}")
                    status, out_headers, data = self._encode(_error(500, f"fake GitHub built an invalid response: {problem}"))
            rec.status, rec.response_headers = status, out_headers
            return status, out_headers, data

    def _check_request(self, method: str, split: urllib.parse.SplitResult, headers: Headers, body: bytes) -> _Reply | None:
        problems = []
        auth = headers.get("Authorization", "")
        if auth not in (f"Bearer {self.token}", f"token {self.token}"):
            problems.append("Authorization is not 'Bearer <token>' or 'token <token>'")
        if headers.get("Accept") != "application/vnd.github+json":
            problems.append(f"Accept is {headers.get('Accept')!r}, not application/vnd.github+json")
        if headers.get("X-GitHub-Api-Version") != API_VERSION:
            problems.append(f"X-GitHub-Api-Version is {headers.get('X-GitHub-Api-Version')!r}, not {API_VERSION}")
        if not headers.get("User-Agent"):
            problems.append("no User-Agent (GitHub rejects such requests)")
        try:
            self.openapi.validate_request(_Request(self.url, method, split.path, split.query, headers, body))
        except Exception as exc:  # every kind of mismatch is a finding
            problems.append(f"OpenAPI: {_short(exc)}")
        if not problems:
            return None
        self.errors.append(f"{method} {split.path}{'?' + split.query if split.query else ''}: request invalid: " + "; ".join(problems))
        status = 401 if "Authorization" in problems[0] else 400
        return _error(status, "fake GitHub rejected the request: " + "; ".join(problems))

    def _check_response(
        self,
        method: str,
        split: urllib.parse.SplitResult,
        headers: Headers,
        body: bytes,
        reply: _Reply,
        status: int,
        out_headers: dict[str, str],
        data: bytes,
    ) -> str | None:
        request = _Request(self.url, method, split.path, split.query, headers, body)
        try:
            self.openapi.validate_response(request, _Response(status, out_headers, data))
        except ResponseNotFound:
            if not reply.error:
                return f"status {status} is not documented for this operation"
            # GitHub sends 403/404/429/5xx on operations whose description omits them; check the basic-error shape.
            schema = self.spec["components"]["schemas"]["basic-error"]
            errs = [e.message for e in OAS30Validator(schema).iter_errors(reply.body)]
            return "basic-error: " + "; ".join(errs) if errs else None
        except Exception as exc:
            return _short(exc)
        return None

    def _inject(self, method: str) -> _Reply | None:
        if self._fail:
            status = self._fail.pop(0)
            return _error(status, "Server Error" if status != 503 else "Service Unavailable")
        if self._rate_limits:
            rl = self._rate_limits.pop(0)
            headers = {
                "x-ratelimit-limit": "5000", "x-ratelimit-remaining": "0", "x-ratelimit-used": "5000",
                "x-ratelimit-reset": str(int(time.time() + rl["reset_in"])), "x-ratelimit-resource": "core",
            }
            if rl["retry_after"] is not None:
                headers["retry-after"] = str(rl["retry_after"])
            return _error(rl["status"], "API rate limit exceeded for installation ID 4242.",
                          f"{DOCS}/overview/rate-limits-for-the-rest-api", headers)
        if self.read_only and method in WRITE_METHODS:
            return _error(403, "Resource not accessible by integration", f"{DOCS}/issues/comments#create-an-issue-comment")
        return None

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> _Reply:
        if path == "/user" and method == "GET":
            if self.token_user is None:  # what GitHub answers an installation token
                return _error(403, "Resource not accessible by integration", f"{DOCS}/users/users#get-the-authenticated-user")
            return _Reply(200, self._token_identity())
        prefix = f"/repos/{self.owner}/{self.repo}/"
        if not path.startswith(prefix):
            return _error(404, "Not Found")
        rest = path[len(prefix):]
        if rest.startswith("actions/runners") and (reply := self._runners_route(method, path, rest, query, body)) is not None:
            return reply
        if m := re.fullmatch(r"issues/(\d+)/comments", rest):
            number = int(m.group(1))
            if method == "GET":
                return self._list(path, query, self.comments.get(number, []))
            if method == "POST":
                comment = self._comment(number, body["body"], self._token_identity())
                self.comments.setdefault(number, []).append(comment)
                return _Reply(201, comment, {"Location": comment["url"]})
        if m := re.fullmatch(r"issues/comments/(\d+)", rest):
            cid = int(m.group(1))
            found = next(((n, c) for n, cs in self.comments.items() for c in cs if c["id"] == cid), None)
            if found is None:
                return _error(404, "Not Found", f"{DOCS}/issues/comments")
            number, comment = found
            if method == "GET":
                return _Reply(200, comment)
            if method == "PATCH":
                comment["body"] = body["body"]
                comment["updated_at"] = _now()
                return _Reply(200, comment)
            if method == "DELETE":
                self.comments[number].remove(comment)
                return _Reply(204)
        if (m := re.fullmatch(r"pulls/(\d+)", rest)) and method == "GET":
            pr = self.pull_objects.get(int(m.group(1)))
            return _Reply(200, pr) if pr is not None else _error(404, "Not Found", f"{DOCS}/pulls/pulls#get-a-pull-request")
        if (m := re.fullmatch(r"commits/([^/]+)/pulls", rest)) and method == "GET":
            return self._list(path, query, self.pulls.get(m.group(1), []))
        if (m := re.fullmatch(r"statuses/([^/]+)", rest)) and method == "POST":
            sha = m.group(1)
            sid = next(self._ids)
            now = _now()
            status = {
                "url": f"{self.url}/repos/{self.repository}/statuses/{sha}", "avatar_url": "https://avatars.githubusercontent.com/in/15368?v=4",
                "id": sid, "node_id": f"SC_kwDOABCD{sid}", "state": body["state"], "description": body.get("description"),
                "target_url": body.get("target_url"), "context": body.get("context", "default"),
                "created_at": now, "updated_at": now, "creator": self._token_identity(),
            }
            self.statuses.setdefault(sha, []).append(status)
            return _Reply(201, status, {"Location": status["url"]})
        self.errors.append(f"{method} {path}: not implemented by the fake")
        return _error(404, "Not Found")

    def _list(self, path: str, query: dict[str, str], items: list[dict]) -> _Reply:
        """GitHub's pagination: per_page (default 30, max 100), page (from 1), Link with absolute URLs."""
        per_page = max(1, min(100, int(query.get("per_page", 30))))
        page = max(1, int(query.get("page", 1)))
        last = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page: page * per_page]

        def link(p: int) -> str:
            q = {**query, "per_page": str(per_page), "page": str(p)}
            return f"{self.url}{path}?{urllib.parse.urlencode(q)}"

        rels = []
        if page > 1:
            rels += [f'<{link(page - 1)}>; rel="prev"', f'<{link(1)}>; rel="first"']
        if page < last:
            rels += [f'<{link(page + 1)}>; rel="next"', f'<{link(last)}>; rel="last"']
        return _Reply(200, copy.deepcopy(chunk), {"Link": ", ".join(rels)} if rels else {})

    def _encode(self, reply: _Reply) -> tuple[int, dict[str, str], bytes]:
        data = b"" if reply.body is None else json.dumps(reply.body).encode("utf-8")
        headers = {"X-GitHub-Media-Type": "github.v3; format=json", "X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "4999"}
        headers = {k: v for k, v in headers.items() if k.lower() not in {h.lower() for h in reply.headers}}
        headers.update(reply.headers)
        if data:
            headers["Content-Type"] = "application/json; charset=utf-8"
        return reply.status, headers, data


def _handler(app: FakeGitHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, headers, data = app.handle(self.command, self.path, Headers(list(self.headers.items())), body)
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

    return Handler
