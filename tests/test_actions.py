"""The GitHub Actions side: the run's context from the environment and the event, what a run records
from it, and the file and workflow-command protocol (outputs, job summary, annotations)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mlci.actions import (
    Annotation,
    GitHubContext,
    append_summary,
    escape_workflow_command,
    format_annotation,
    write_outputs,
)
from mlci.gitinfo import default_branch, detect_git

TOKEN = "ghs_SECRET_mlci_test_token_7f3a9c2e"
REPO = "octo-org/widgets"
HEAD, BASE, MERGE = "a" * 40, "b" * 40, "c" * 40


def pr_event(number: int = 42, sha: str = HEAD) -> dict:
    return {"action": "synchronize", "number": number, "pull_request": {"number": number, "head": {"sha": sha}}}


def context(tmp_path: Path, event: dict, **env: str) -> GitHubContext:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event))
    return GitHubContext.from_env({"GITHUB_EVENT_PATH": str(path), **env})


# -- context, workflow commands, files ---------------------------------------------------------------------------------


def test_context_from_env(tmp_path: Path):
    event = tmp_path / "e.json"
    event.write_text(json.dumps(pr_event(3, sha="a" * 40)))
    ctx = GitHubContext.from_env({
        "GITHUB_ACTIONS": "true", "GITHUB_REPOSITORY": REPO, "GITHUB_SHA": "b" * 40, "GITHUB_EVENT_PATH": str(event),
        "GITHUB_EVENT_NAME": "pull_request", "GITHUB_RUN_ID": "12", "GITHUB_TOKEN": TOKEN,
    })
    assert ctx.api_url == "https://api.github.com" and ctx.server_url == "https://github.com"
    assert ctx.sha == "a" * 40 and ctx.event["number"] == 3 and ctx.event_name == "pull_request"
    assert ctx.in_actions and ctx.token == TOKEN and ctx.step_summary is None and ctx.output is None
    assert ctx.run_url == f"https://github.com/{REPO}/actions/runs/12"
    assert GitHubContext.from_env({"GITHUB_TOKEN": TOKEN}, token="explicit").token == "explicit"

    event.write_text("not json")
    bare = GitHubContext.from_env({"GITHUB_EVENT_PATH": str(event), "GITHUB_SHA": "c" * 40})
    assert bare.event == {} and bare.sha == "c" * 40 and not bare.in_actions and bare.run_url is None and bare.token is None
    assert GitHubContext.from_env({"GITHUB_EVENT_PATH": str(tmp_path / "missing.json")}).event == {}


def test_workflow_command_escaping():
    assert escape_workflow_command("100%\r\nnext") == "100%25%0D%0Anext"
    assert escape_workflow_command("a: b, c%", property=True) == "a%3A b%2C c%25"
    assert escape_workflow_command("a: b, c") == "a: b, c"
    line = format_annotation(Annotation("error", "model: x, y", "p50 +12%\n::set-output name=x::pwned"))
    assert line == "::error title=model%3A x%2C y::p50 +12%25%0A::set-output name=x::pwned"
    assert "\n" not in line
    assert format_annotation(Annotation("notice", "", "hi")) == "::notice::hi"
    with pytest.raises(ValueError):
        format_annotation(Annotation("fatal", "t", "m"))


def test_write_outputs(tmp_path: Path):
    path = tmp_path / "out"
    path.write_text("earlier=1\n")
    write_outputs(path, {"verdict": "fail", "table": "a\nb\r\nc", "empty": ""})
    text = path.read_bytes().decode()
    assert text.startswith("earlier=1\nverdict=fail\n") and text.endswith("empty=\n")
    m = re.search(r"table<<(\S+)\n(.*)\n\1\n", text, re.S)
    assert m and m.group(1).startswith("ghadelimiter_") and m.group(2) == "a\nb\r\nc"
    with pytest.raises(ValueError):
        write_outputs(path, {"bad\nname": "x"})


def test_append_summary_caps_at_one_mib(tmp_path: Path):
    path = tmp_path / "summary.md"
    append_summary(path, "# head\n")
    append_summary(path, "| é row |\n" * 200_000)  # ~2.2 MB
    data = path.read_bytes()
    assert len(data) <= 1_048_576 and data.startswith(b"# head\n")
    text = data.decode("utf-8")  # still valid UTF-8: the cut respects characters (and lines)
    assert text.rstrip().endswith("The results file has everything.") and "\n| é row |\n\n> **Note:**" in text
    append_summary(path, "more\n" * 1000)  # a full summary takes no more
    assert path.read_bytes() == data


# -- what a run records: gitinfo reads the context, never the environment -------------------------------------------------


def test_context_of_a_pull_request_event(tmp_path: Path):
    event = {"number": 7, "pull_request": {"number": 7, "head": {"sha": HEAD}, "base": {"sha": BASE}},
             "repository": {"default_branch": "trunk"}}
    ctx = context(tmp_path, event, GITHUB_SHA=MERGE, GITHUB_HEAD_REF="feature/x", GITHUB_REF_NAME="7/merge",
                  GITHUB_REPOSITORY=REPO, GITHUB_RUN_ID="99")
    assert ctx.commit == ctx.sha == HEAD and ctx.github_sha == MERGE  # never the merge commit
    assert ctx.branch == "feature/x" and ctx.base_sha == BASE and ctx.default_branch == "trunk"
    assert ctx.pull_request_event_number == ctx.pull_request_number() == 7


def test_context_of_other_events(tmp_path: Path):
    push = context(tmp_path, {"ref": "refs/heads/main"}, GITHUB_SHA=MERGE, GITHUB_REF_NAME="main")
    assert push.commit == push.sha == MERGE and push.branch == "main"
    assert push.base_sha is None and push.pull_request_event_number is None and push.pull_request_number() is None
    assert push.default_branch is None
    # the fork-safe comment stage: the report is about the PR's head, but the job runs on the default branch
    run = context(tmp_path, {"workflow_run": {"head_sha": HEAD, "pull_requests": [{"number": 11}]}}, GITHUB_SHA=MERGE)
    assert run.sha == HEAD and run.commit == MERGE
    assert run.pull_request_number() == 11 and run.pull_request_event_number is None
    comment = context(tmp_path, {"issue": {"number": 9, "pull_request": {"url": "x"}}}, GITHUB_SHA=MERGE)
    assert comment.pull_request_number() == 9 and comment.pull_request_event_number is None
    odd = context(tmp_path, {"pull_request": "not an object", "repository": []})
    assert odd.commit is None and odd.base_sha is None and odd.pull_request_event_number is None and odd.default_branch is None


def test_detect_git_takes_the_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An explicit context wins over this process's environment; without one, the environment is read."""
    event = {"number": 7, "pull_request": {"number": 7, "head": {"sha": HEAD}, "base": {"sha": BASE}},
             "repository": {"default_branch": "trunk"}}
    ctx = context(tmp_path, event, GITHUB_SHA=MERGE, GITHUB_HEAD_REF="feature/x", GITHUB_REPOSITORY=REPO, GITHUB_RUN_ID="99")
    for name in ("GITHUB_SHA", "GITHUB_HEAD_REF", "GITHUB_REF_NAME", "GITHUB_REPOSITORY", "GITHUB_RUN_ID", "GITHUB_EVENT_PATH"):
        monkeypatch.setenv(name, "from-the-environment")
    info = detect_git(tmp_path, ctx)  # tmp_path is no git repository: everything comes from the context
    assert (info.commit, info.branch, info.base_commit, info.pr) == (HEAD, "feature/x", BASE, 7)
    assert (info.repository, info.run_id, info.default_branch) == (REPO, "99", "trunk")

    from_env = detect_git(tmp_path)
    assert (from_env.commit, from_env.branch, from_env.repository, from_env.run_id) == ("from-the-environment",) * 4
    assert from_env.pr is None and from_env.default_branch is None

    for name in ("GITHUB_SHA", "GITHUB_HEAD_REF", "GITHUB_REF_NAME", "GITHUB_REPOSITORY", "GITHUB_RUN_ID", "GITHUB_EVENT_PATH"):
        monkeypatch.delenv(name)
    bare = detect_git(tmp_path, GitHubContext())
    assert (bare.commit, bare.branch, bare.pr, bare.repository, bare.default_branch) == (None,) * 5
    assert default_branch(tmp_path, ctx) == "trunk" and default_branch(tmp_path, GitHubContext()) is None
