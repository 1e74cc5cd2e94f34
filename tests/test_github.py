"""The REST client and delivery against a real local HTTP server that checks every call against GitHub's OpenAPI description."""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from mlci.actions import Annotation, GitHubContext
from mlci.delivery import deliver
from mlci.gate import Decision, decide
from mlci.github import GitHubClient, GitHubError, parse_link_header
from mlci.report import ReportContext, comment_marker, render_comment
from tests.github_server import FakeGitHub

TOKEN = "ghs_SECRET_mlci_test_token_7f3a9c2e"
REPO = "octo-org/widgets"
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
MARKER = comment_marker(None)


class Sleeps(list):
    """Records the waits instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def gh():
    with FakeGitHub(token=TOKEN, repository=REPO) as server:
        yield server
    assert server.errors == [], "fake GitHub found invalid requests/responses:\n" + "\n".join(server.errors)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def client(gh: FakeGitHub, sleeps: Sleeps) -> GitHubClient:
    return GitHubClient(gh.url, TOKEN, sleep=sleeps)


def make_ctx(gh: FakeGitHub, tmp_path: Path, event: dict | None = None, **kw) -> GitHubContext:
    event_path = tmp_path / "event.json"
    event_path.write_text(json.dumps(event or {}))
    env = {
        "GITHUB_ACTIONS": "true",
        "GITHUB_API_URL": gh.url,
        "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": REPO,
        "GITHUB_TOKEN": TOKEN,
        "GITHUB_SHA": SHA,
        "GITHUB_EVENT_NAME": "pull_request" if event and "pull_request" in event else "push",
        "GITHUB_EVENT_PATH": str(event_path),
        "GITHUB_RUN_ID": "987654321",
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "GITHUB_OUTPUT": str(tmp_path / "output.txt"),
        **kw,
    }
    return GitHubContext.from_env(env)


def pr_event(number: int = 42, sha: str = SHA) -> dict:
    return {"action": "synchronize", "number": number, "pull_request": {"number": number, "head": {"sha": sha}}}


def run_deliver(ctx: GitHubContext, client: GitHubClient | None = None, printed: list[str] | None = None, **kw):
    args = {
        "comment": "## mlci report\n\n| model | p50 |\n|---|---|\n| resnet | 1.2 ms |\n",
        "marker": MARKER,
        "summary": "## mlci report (summary)\n\nresnet: 1.2 ms\n",
        "outputs": {"verdict": "pass", "report": "line one\nline two"},
        "annotations": [Annotation("warning", "resnet: slower", "p50 +3%")],
        "state": "success",
        "description": "no regressions",
        "client": client,
        "print_line": (printed.append if printed is not None else (lambda _line: None)),
    }
    args.update(kw)
    return deliver(ctx, **args)


# -- sticky comment ----------------------------------------------------------------------------------------------


def test_create_then_update_sticky_comment(gh: FakeGitHub, client: GitHubClient):
    url, action = client.upsert_comment(REPO, 42, f"{MARKER}\nfirst report", MARKER)
    assert action == "created"
    [comment] = gh.comments[42]
    assert url == comment["html_url"] and url.endswith(f"#issuecomment-{comment['id']}")

    url2, action2 = client.upsert_comment(REPO, 42, f"{MARKER}\nsecond report", MARKER)
    assert (url2, action2) == (url, "updated")
    assert len(gh.comments[42]) == 1
    assert gh.comments[42][0]["id"] == comment["id"]
    assert gh.comments[42][0]["body"] == f"{MARKER}\nsecond report"
    assert [r.method for r in gh.requests] == ["GET", "POST", "GET", "PATCH"]
    assert gh.requests[0].query == {"per_page": "100"}


def test_marker_is_prepended_and_other_comments_are_left_alone(gh: FakeGitHub, client: GitHubClient):
    gh.add_comment(7, "LGTM")
    first = gh.add_comment(7, f"{MARKER}\nold report", login="github-actions[bot]", kind="Bot")
    second = gh.add_comment(7, f"{MARKER}\nstale duplicate")
    _, action = client.upsert_comment(REPO, 7, "new report without marker", MARKER)
    assert action == "updated"
    bodies = {c["id"]: c["body"] for c in gh.comments[7]}
    assert bodies[first["id"]] == f"{MARKER}\nnew report without marker"
    assert bodies[second["id"]] == f"{MARKER}\nstale duplicate"
    assert "LGTM" in bodies.values() and len(bodies) == 3


def test_marker_comment_on_page_two_is_found_through_the_link_header(gh: FakeGitHub, client: GitHubClient):
    for i in range(130):
        gh.add_comment(42, f"comment {i}")
    target = gh.add_comment(42, f"{MARKER}\nold", login="github-actions[bot]", kind="Bot")
    gh.add_comment(42, "after")

    url, action = client.upsert_comment(REPO, 42, f"{MARKER}\nnew", MARKER)
    assert action == "updated" and url == target["html_url"]
    assert len(gh.comments[42]) == 132
    assert sum(MARKER in c["body"] for c in gh.comments[42]) == 1
    # who wrote the marker comment is checked against who the token is (GET /user: 403, the workflow's bot)
    assert [(r.method, r.path.rsplit("/", 1)[-1], r.query.get("page")) for r in gh.requests] == [
        ("GET", "comments", None), ("GET", "comments", "2"), ("GET", "user", None), ("PATCH", str(target["id"]), None)]
    # the second page was fetched with the URL from the first answer's Link header, verbatim
    first_link = parse_link_header(gh.requests[0].response_headers["Link"])
    assert first_link["next"] == gh.url + gh.requests[1].target
    assert first_link["last"].endswith("page=2")
    assert not any(r.method == "POST" for r in gh.requests)


def test_pagination_defaults_and_link_header(gh: FakeGitHub, client: GitHubClient):
    for i in range(65):
        gh.add_comment(3, f"c{i}")
    items = list(client.paginate(f"/repos/{REPO}/issues/3/comments"))
    assert [c["body"] for c in items] == [f"c{i}" for i in range(65)]
    assert [r.query.get("page") for r in gh.requests] == [None, "2", "3"]  # default per_page is 30
    _, page, headers = client.request("GET", f"/repos/{REPO}/issues/3/comments?per_page=1000&page=2")
    assert len(page) == 0  # per_page is capped at 100, so there is no page 2
    links = parse_link_header(headers["link"])
    assert set(links) == {"prev", "first"} and links["first"].startswith(gh.url + "/repos/")


def test_oversized_comment_is_cut_to_githubs_limit(gh: FakeGitHub, client: GitHubClient):
    body = MARKER + "\n" + "| row |\n" * 20_000
    client.upsert_comment(REPO, 5, body, MARKER)
    posted = gh.comments[5][0]["body"]
    assert len(posted) <= 65_536 and posted.startswith(MARKER) and "comment limit" in posted


# -- retries, rate limits, errors ----------------------------------------------------------------------------------


def test_502_then_success_is_retried_with_backoff(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.fail_next(2)
    url, action = client.upsert_comment(REPO, 42, "report", MARKER)
    assert action == "created" and url
    assert sleeps == [1.0, 2.0]
    assert [r.status for r in gh.requests] == [502, 502, 200, 201]


def test_create_whose_reply_was_lost_is_not_duplicated(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.lose_next_write_reply()
    url, action = client.upsert_comment(REPO, 43, "report v1", MARKER)
    assert len(gh.comments[43]) == 1, "a retried create made a second sticky comment"
    assert action == "updated" and url == gh.comments[43][0]["html_url"]
    assert [(r.method, r.path.rsplit("/", 1)[-1], r.status) for r in gh.requests] == [
        ("GET", "comments", 200), ("POST", "comments", 502), ("GET", "comments", 200), ("GET", "user", 403),
        ("PATCH", str(gh.comments[43][0]["id"]), 200)]


def test_502_forever_gives_up_with_githubs_status(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.fail_next(10)
    with pytest.raises(GitHubError) as info:
        client.request("GET", f"/repos/{REPO}/issues/1/comments")
    assert info.value.status == 502 and "Server Error" in info.value.message
    assert sleeps == [1.0, 2.0, 4.0, 8.0] and len(gh.requests) == 5
    gh.clear_failures()


def test_rate_limited_403_waits_for_the_reset_then_succeeds(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.rate_limit(times=1, status=403, reset_in=5)
    client.set_status(REPO, SHA, "success", "ok")
    assert len(sleeps) == 1 and 3 <= sleeps[0] <= 7  # until x-ratelimit-reset (+1 s slack)
    assert [r.status for r in gh.requests] == [403, 201]
    assert gh.statuses[SHA][0]["state"] == "success"


def test_rate_limited_429_honours_retry_after(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.rate_limit(times=1, status=429, retry_after=3, reset_in=600)
    assert client.request("GET", f"/repos/{REPO}/issues/1/comments")[0] == 200
    assert sleeps == [3.0]


def test_rate_limit_far_away_is_reported_not_waited(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.rate_limit(times=1, status=403, reset_in=3600)
    with pytest.raises(GitHubError) as info:
        client.request("GET", f"/repos/{REPO}/issues/1/comments")
    assert info.value.status == 403 and info.value.rate_limited and "rate limit" in info.value.message
    assert sleeps == []


def test_plain_4xx_is_raised_with_githubs_message(gh: FakeGitHub, client: GitHubClient, sleeps: Sleeps):
    gh.read_only = True
    with pytest.raises(GitHubError) as info:
        client.upsert_comment(REPO, 42, "report", MARKER)
    assert info.value.status == 403 and not info.value.rate_limited
    assert info.value.message == "Resource not accessible by integration"
    assert sleeps == []  # a read-only token is not retried


def test_connection_refused_is_retried_then_reported(sleeps: Sleeps):
    with FakeGitHub(token=TOKEN) as dead:
        url = dead.url
    client = GitHubClient(url, TOKEN, retries=2, sleep=sleeps)
    with pytest.raises(GitHubError) as info:
        client.request("GET", f"/repos/{REPO}/issues/1/comments")
    assert info.value.status is None and "could not reach" in str(info.value)
    assert sleeps == [1.0, 2.0]


def test_token_is_not_sent_to_another_host(gh: FakeGitHub, client: GitHubClient):
    with pytest.raises(GitHubError, match="refusing"):
        client.request("GET", "https://evil.example/steal")
    assert gh.requests == []


def test_redirect_to_another_host_is_not_followed_with_the_token():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append({"port": self.server.server_address[1], "auth": self.headers.get("Authorization")})
            self.send_response(302 if self.path == "/start" else 200)
            self.send_header("Location", f"http://127.0.0.1:{other.server_address[1]}/landed")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    first, other = HTTPServer(("127.0.0.1", 0), Handler), HTTPServer(("127.0.0.1", 0), Handler)
    threads = [threading.Thread(target=s.serve_forever, args=(0.02,), daemon=True) for s in (first, other)]
    for t in threads:
        t.start()
    try:
        client = GitHubClient(f"http://127.0.0.1:{first.server_address[1]}", TOKEN, retries=0)
        with pytest.raises(GitHubError) as info:
            client.request("GET", "/start")
        assert info.value.status == 302 and "not following" in info.value.message
        assert [s["port"] for s in seen] == [first.server_address[1]]  # the other host never saw the token
        assert client.request("GET", "/same")[0] == 200
    finally:
        for server in (first, other):
            server.shutdown()
            server.server_close()


# -- PR lookup ------------------------------------------------------------------------------------------------------


def test_pr_from_event_payload_needs_no_api_call(gh: FakeGitHub, client: GitHubClient, tmp_path: Path):
    assert client.find_pull_request(make_ctx(gh, tmp_path, pr_event(42))) == 42
    issue_comment = {"issue": {"number": 9, "pull_request": {"url": "x"}}, "comment": {"body": "/mlci"}}
    assert client.find_pull_request(make_ctx(gh, tmp_path, issue_comment)) == 9
    workflow_run = {"workflow_run": {"head_sha": "abc", "pull_requests": [{"number": 11}]}}
    assert client.find_pull_request(make_ctx(gh, tmp_path, workflow_run)) == 11
    assert gh.requests == []


def test_pr_from_commit_pulls_endpoint_takes_the_open_one(gh: FakeGitHub, client: GitHubClient, tmp_path: Path):
    gh.add_pull(5, SHA, state="closed")
    gh.add_pull(8, SHA, state="open")
    ctx = make_ctx(gh, tmp_path, {"ref": "refs/heads/feature"})
    assert client.find_pull_request(ctx) == 8
    assert [(r.method, r.path) for r in gh.requests] == [("GET", f"/repos/{REPO}/commits/{SHA}/pulls")]


def test_fork_workflow_run_falls_back_to_the_head_sha(gh: FakeGitHub, client: GitHubClient, tmp_path: Path):
    head = "f" * 40
    gh.add_pull(13, head)
    ctx = make_ctx(gh, tmp_path, {"workflow_run": {"head_sha": head, "pull_requests": []}})
    assert ctx.sha == head  # not GITHUB_SHA (the default branch on workflow_run)
    assert client.find_pull_request(ctx) == 13


def test_fork_pr_number_from_the_results_is_used_only_when_github_confirms_it(
    gh: FakeGitHub, client: GitHubClient, tmp_path: Path
):
    """A fork's commit may not be found by the commit lookup; the PR number its results claim is checked first."""
    head = "e" * 40
    gh.add_pull(21, head, linked=False)  # the fork PR: GET pulls/21 knows it, the commit lookup does not
    gh.add_pull(22, "d" * 40, linked=False)  # somebody else's PR
    ctx = make_ctx(gh, tmp_path, {"workflow_run": {"head_sha": head, "pull_requests": []}})
    assert client.find_pull_request(ctx) is None
    assert client.find_pull_request(ctx, claimed=21) == 21
    # A forged number (another PR, or one that does not exist) never gets the report.
    assert client.find_pull_request(ctx, claimed=22) is None
    assert client.find_pull_request(ctx, claimed=999) is None
    assert gh.take_errors() == []


def test_no_pr_for_the_commit(gh: FakeGitHub, client: GitHubClient, tmp_path: Path):
    gh.add_pull(5, SHA, state="closed")
    assert client.find_pull_request(make_ctx(gh, tmp_path)) is None


# -- deliver ----------------------------------------------------------------------------------------------------------


def test_deliver_posts_comment_status_summary_and_outputs(gh: FakeGitHub, tmp_path: Path, sleeps: Sleeps):
    ctx = make_ctx(gh, tmp_path, pr_event(42))
    printed: list[str] = []
    done = run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=sleeps), printed, state="failure", description="x" * 300)
    assert done.pr == 42 and done.comment_action == "created" and done.status_set and done.summary_written
    assert done.comment_url == gh.comments[42][0]["html_url"]
    assert gh.comments[42][0]["body"].startswith(MARKER)
    [status] = gh.statuses[SHA]
    assert status["target_url"] == "https://github.com/octo-org/widgets/actions/runs/987654321" == ctx.run_url
    assert status["state"] == "failure" and status["context"] == "mlci"
    assert len(status["description"]) == 140
    assert printed == ["::warning title=resnet%3A slower::p50 +3%25"]
    assert "resnet: 1.2 ms" in (tmp_path / "summary.md").read_text()
    outputs = (tmp_path / "output.txt").read_text()
    assert "verdict=pass\n" in outputs and f"comment-url={done.comment_url}\n" in outputs
    assert re.search(r"report<<(ghadelimiter_[0-9a-f-]+)\nline one\nline two\n\1\n", outputs)

    again = run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=sleeps))
    assert again.comment_action == "updated" and again.comment_url == done.comment_url
    assert len(gh.comments[42]) == 1 and len(gh.statuses[SHA]) == 2


def test_deliver_on_fork_pr_falls_back_to_the_summary(gh: FakeGitHub, tmp_path: Path, sleeps: Sleeps):
    gh.read_only = True
    ctx = make_ctx(gh, tmp_path, pr_event(42))
    done = run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=sleeps))
    assert done.comment_url is None and not done.status_set and done.summary_written
    assert gh.comments.get(42, []) == [] and gh.statuses == {}
    assert any("Resource not accessible by integration" in n and "mlci-comment.yml" in n for n in done.notes)
    summary = (tmp_path / "summary.md").read_text()
    assert "resnet: 1.2 ms" in summary
    assert summary.count("read-only, as on pull requests from forks") == 1
    outputs = (tmp_path / "output.txt").read_text()
    assert "verdict=pass" in outputs and "comment-url" not in outputs
    assert sleeps == []


def test_deliver_without_token_or_pr(gh: FakeGitHub, tmp_path: Path):
    ctx = make_ctx(gh, tmp_path, GITHUB_TOKEN="")
    done = run_deliver(ctx)
    assert gh.requests == [] and done.summary_written
    assert any("GITHUB_TOKEN is not set" in n and "nothing posted" in n for n in done.notes)

    ctx = make_ctx(gh, tmp_path)  # a push: no PR, the status is still set
    done = run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=lambda s: None))
    assert done.pr is None and done.comment_url is None and done.status_set
    assert any("no open pull request" in n for n in done.notes)


def with_config(decision: Decision, config: str | None) -> Decision:
    """The decision of the results of one config file (its path relative to the repository)."""
    if any(f.name == "config" for f in dataclasses.fields(decision)):
        return dataclasses.replace(decision, config=config)
    object.__setattr__(decision, "config", config)  # a Decision without the field: the report reads it if present
    return decision


def test_two_configs_keep_two_sticky_comments(gh: FakeGitHub, tmp_path: Path, sleeps: Sleeps):
    """Two mlci configs in one repository report on the same PR: each updates its own comment, never the other's."""
    ctx = make_ctx(gh, tmp_path, pr_event(42))
    context = ReportContext(repository=REPO, pr=42)
    legacy = gh.add_comment(42, f"{MARKER}\nreport of the top-level mlci.toml", login="github-actions[bot]", kind="Bot")
    vision, speech = (with_config(decide([]), path) for path in ("services/vision/mlci.toml", "services/speech/mlci.toml"))

    def post(decision: Decision) -> str | None:
        text = render_comment(decision, context)
        marker = comment_marker(getattr(decision, "config", None))
        assert text.startswith(marker + "\n")
        return run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=sleeps), comment=text, marker=marker).comment_action

    assert [post(vision), post(speech)] == ["created", "created"]
    assert len(gh.comments[42]) == 3
    assert post(vision) == "updated" and post(with_config(decide([]), None)) == "updated"
    bodies = [c["body"] for c in gh.comments[42]]
    assert len(bodies) == 3 and gh.comments[42][0]["id"] == legacy["id"]
    assert bodies[0].startswith(MARKER + "\n### mlci PASS")  # the default config's comment, updated in place
    assert bodies[1].startswith("<!-- mlci:report config=services/vision/mlci.toml -->\n")
    assert bodies[2].startswith("<!-- mlci:report config=services/speech/mlci.toml -->\n")


def test_token_never_leaks(gh: FakeGitHub, tmp_path: Path, capfd: pytest.CaptureFixture[str]):
    ctx = make_ctx(gh, tmp_path, pr_event(42))
    assert TOKEN not in repr(ctx) and TOKEN not in repr(GitHubClient(gh.url, TOKEN))
    texts: list[str] = []
    printed: list[str] = []

    # read-only token, then rate limits and outages past the retries, then an unreachable API
    gh.read_only = True
    texts += run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=lambda s: None), printed).notes
    gh.read_only = False
    gh.rate_limit(times=2, status=403, reset_in=3600)
    texts += run_deliver(ctx, GitHubClient(gh.url, TOKEN, sleep=lambda s: None), printed).notes
    gh.fail_next(20, status=502)
    texts += run_deliver(ctx, GitHubClient(gh.url, TOKEN, retries=1, sleep=lambda s: None), printed).notes
    gh.clear_failures()
    dead = make_ctx(gh, tmp_path, pr_event(42), GITHUB_API_URL="http://127.0.0.1:9")
    texts += run_deliver(dead, GitHubClient(dead.api_url, TOKEN, retries=0, sleep=lambda s: None), printed).notes
    # text that itself carries the token (an error message echoing the environment) is scrubbed too
    texts += run_deliver(ctx, None, printed, annotations=[Annotation("error", TOKEN, f"env: {TOKEN}")],
                         description=f"token={TOKEN}", comment=f"oops {TOKEN}").notes
    for call in (lambda: GitHubClient(gh.url, TOKEN, retries=0).request("GET", "http://127.0.0.1:1/x"),
                 lambda: GitHubClient("http://127.0.0.1:9", TOKEN, retries=0).request("GET", "/x")):
        with pytest.raises(GitHubError) as info:
            call()
        texts += [str(info.value), repr(info.value)]

    out, err = capfd.readouterr()
    texts += printed + [out, err, (tmp_path / "summary.md").read_text(), (tmp_path / "output.txt").read_text()]
    texts += [c["body"] for cs in gh.comments.values() for c in cs] + [s["description"] for ss in gh.statuses.values() for s in ss]
    assert len(texts) > 10
    assert all(TOKEN not in t for t in texts)
    assert any("could not reach" in t for t in texts) and any("rate limit" in t for t in texts)
    assert any("***" in c["body"] for cs in gh.comments.values() for c in cs)



def test_parse_link_header():
    value = '<https://api.github.com/repositories/1/issues/2/comments?page=2>; rel="next", <https://x/y?page=9>; rel="last"'
    assert parse_link_header(value) == {
        "next": "https://api.github.com/repositories/1/issues/2/comments?page=2", "last": "https://x/y?page=9"}
    assert parse_link_header(None) == {} and parse_link_header("") == {}


# -- the fake itself catches contract violations -------------------------------------------------------------------


def test_fake_server_rejects_requests_that_break_the_contract(gh: FakeGitHub, client: GitHubClient):
    with pytest.raises(GitHubError) as info:
        client.request("POST", f"/repos/{REPO}/statuses/{SHA}", {"state": "passed"})
    assert info.value.status == 400 and "passed" in info.value.message
    with pytest.raises(GitHubError):
        client.request("GET", f"/repos/{REPO}/issues/abc/comments")
    bare = urllib.request.Request(f"{gh.url}/repos/{REPO}/issues/1/comments", headers={"User-Agent": "x"})
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(bare)
    assert http.value.code == 401
    errors = gh.take_errors()
    assert len(errors) == 3
    assert "is not one of" in errors[0] and "issue_number" in errors[1]
    assert "Authorization" in errors[2] and "Accept" in errors[2] and "X-GitHub-Api-Version" in errors[2]


def test_fake_server_rejects_its_own_invalid_responses(gh: FakeGitHub):
    bad = gh.add_comment(1, "x")
    del bad["user"]  # a comment object missing a required field
    with pytest.raises(GitHubError) as info:
        GitHubClient(gh.url, TOKEN, retries=0).request("GET", f"/repos/{REPO}/issues/1/comments")
    assert info.value.status == 500
    [error] = gh.take_errors()
    assert "'user' is a required property" in error
