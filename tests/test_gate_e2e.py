"""The regression gate end to end on a tiny git repository made here.

main records a baseline in MLflow; a pull-request branch makes the model really
slower (a 16x wider hidden layer); another only edits the README. `mlci run --base
main` builds the merge-base's model in a worktree and measures both interleaved
(timing each kernel of both builds when the head measured slower); `mlci compare`
then decides, renders, and talks to a local GitHub that validates every call
against GitHub's OpenAPI description. The target states a price per hour, so the
results and the comment carry what a million inferences cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import attn_lstm_model, git, new_git_repo, save, tiny_mlp, write_config
from .github_server import FakeGitHub

pytestmark = pytest.mark.slow

CONFIG = """
    [tuning]
    trials = 0
    [targets.cpu]
    price_per_hour = 0.36
    [[models]]
    name = "net"
    path = "models/net.onnx"
    dims = { batch = 1 }
"""


def mlci(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLFLOW_"))}
    return subprocess.run([sys.executable, "-m", "mlci.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("consumer")
    new_git_repo(root)
    save(tiny_mlp((64, 256, 64)), root / "models" / "net.onnx")
    write_config(root, CONFIG)
    (root / ".gitignore").write_text(".mlci/\n")
    (root / "README.md").write_text("a model\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    # The default branch's run: the history baseline and the first trend point.
    done = mlci("run", cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr

    git(root, "checkout", "-qb", "slower")
    save(tiny_mlp((64, 4096, 64)), root / "models" / "net.onnx")
    git(root, "commit", "-qam", "wider hidden layer")
    git(root, "checkout", "-q", "main")
    git(root, "checkout", "-qb", "docs")
    (root / "README.md").write_text("a model, documented\n")
    git(root, "commit", "-qam", "docs only")
    git(root, "checkout", "-q", "main")
    git(root, "checkout", "-qb", "broken")
    save(attn_lstm_model(), root / "models" / "net.onnx")  # nobody converts AttnLSTM
    git(root, "commit", "-qam", "switch to an LSTM")
    return root


def github_env(gh: FakeGitHub, repo: Path, number: int) -> dict[str, str]:
    event = repo / ".mlci" / f"event-{number}.json"
    event.parent.mkdir(exist_ok=True)
    sha = git(repo, "rev-parse", "HEAD")
    event.write_text(json.dumps({"number": number, "pull_request": {"number": number, "head": {"sha": sha}}}))
    return {
        "GITHUB_ACTIONS": "true", "GITHUB_API_URL": gh.url, "GITHUB_REPOSITORY": gh.repository,
        "GITHUB_TOKEN": gh.token, "GITHUB_EVENT_NAME": "pull_request", "GITHUB_EVENT_PATH": str(event),
        "GITHUB_SHA": sha, "GITHUB_RUN_ID": "77", "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_STEP_SUMMARY": str(repo / ".mlci" / "summary.md"), "GITHUB_OUTPUT": str(repo / ".mlci" / "output.txt"),
    }


def test_slower_head_fails_the_gate_and_the_comment_says_so(repo: Path):
    git(repo, "checkout", "-q", "slower")
    run = mlci("run", "--base", "main", cwd=repo)
    assert run.returncode == 0, run.stdout + run.stderr
    results = json.loads((repo / ".mlci" / "results" / "cpu.json").read_text())
    model = results["models"][0]
    assert results["git"]["base_commit"] == git(repo, "rev-parse", "main")
    assert model["base"]["status"] == "ok" and not model["base"]["same_model"]
    assert model["base"]["latency_ms"]["n"] == model["latency_ms"]["n"]  # paired
    assert model["history"]["commit"] == git(repo, "rev-parse", "main") and model["history"]["fingerprint_match"]
    assert not git(repo, "worktree", "list").count("\n"), "the base worktree was left behind"
    # priced: 0.36 USD per hour x the median
    assert results["target"]["price_per_hour"] == 0.36
    assert model["cost"]["per_million_usd"] == pytest.approx(0.36 * model["latency_ms"]["median"] / 3.6)
    assert model["cost"]["onnxruntime_per_million_usd"] > 0
    # measured slower in the run's own A/B: both builds' kernels were timed, and the wider layer's grew
    head_kernels = {k["name"]: k["total_us"] for k in model["profile"]["kernels"]}
    base_kernels = {k["name"]: k["total_us"] for k in model["base"]["profile"]["kernels"]}
    assert head_kernels and base_kernels and not any(name.startswith("vm.builtin.") for name in head_kernels)
    grown = max(head_kernels, key=lambda name: head_kernels[name] - base_kernels.get(name, 0.0))
    assert grown in base_kernels and head_kernels[grown] > base_kernels[grown]

    with FakeGitHub() as gh:
        compare = mlci("compare", ".mlci/results", cwd=repo, env=github_env(gh, repo, 7))
        assert gh.errors == []
        comments = gh.comments.get(7, [])
    assert compare.returncode == 1, compare.stdout + compare.stderr
    assert "gate failed" in compare.stderr and "1 regression on cpu" in compare.stderr
    assert len(comments) == 1
    body = comments[0]["body"]
    assert body.startswith("<!-- mlci:report -->") and "1 regression on cpu" in body and "regression" in body
    assert body == (repo / ".mlci" / "report" / "comment.md").read_text()
    assert "::error title=mlci%3A net on cpu%3A regression::" in compare.stdout
    outputs = (repo / ".mlci" / "output.txt").read_text()
    assert "verdict=regression\n" in outputs and "regressions=1\n" in outputs
    assert "1 regression on cpu" in (repo / ".mlci" / "summary.md").read_text()
    assert "| cost per 1M inferences |" in body and " per million inferences |" in body
    kernels = body.split("<summary>Kernels that grew (1 cell)</summary>")[1].split("</details>")[0]
    first = next(line for line in kernels.splitlines() if line.startswith("| ") and not line.startswith(("| kernel", "| ---")))
    assert first.startswith(f"| {grown} | 1 | ")  # the kernel that grew most, named first


def test_unchanged_head_passes(repo: Path):
    git(repo, "checkout", "-q", "docs")
    run = mlci("run", "--base", "main", "--no-tracking", cwd=repo)
    assert run.returncode == 0, run.stdout + run.stderr
    model = json.loads((repo / ".mlci" / "results" / "cpu.json").read_text())["models"][0]
    assert model["base"]["same_model"]
    assert model["profile"] is None and model["base"]["profile"] is None  # not slower: no kernels timed
    compare = mlci("compare", cwd=repo)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "gate passed" in compare.stdout
    body = (repo / ".mlci" / "report" / "comment.md").read_text()
    assert "No significant change" in body and "| unchanged |" in body


def test_model_that_stopped_compiling_fails_the_gate(repo: Path):
    git(repo, "checkout", "-q", "broken")
    run = mlci("run", "--base", "main", "--no-tracking", "-o", ".mlci/broken/cpu.json", cwd=repo)
    assert run.returncode == 1, run.stdout + run.stderr  # `run` itself reports the failed model
    model = json.loads((repo / ".mlci" / "broken" / "cpu.json").read_text())["models"][0]
    assert model["status"] == "import_failed" and model["base"]["status"] == "ok"
    compare = mlci("compare", ".mlci/broken", "--report-dir", ".mlci/broken-report", cwd=repo)
    assert compare.returncode == 1, compare.stdout + compare.stderr
    body = (repo / ".mlci" / "broken-report" / "comment.md").read_text()
    assert "1 failure on cpu" in body and "the base commit built" in body and "LSTM" in body


def test_unknown_base_ref_is_a_usage_error_naming_the_fix(repo: Path):
    run = mlci("run", "--base", "no-such-branch", "--no-tracking", cwd=repo)
    assert run.returncode == 2
    assert "no-such-branch" in run.stderr and "fetch-depth: 0" in run.stderr


def test_compare_without_results_and_with_a_corrupt_file(repo: Path, tmp_path: Path):
    empty = mlci("compare", str(tmp_path / "nothing"), cwd=repo)
    assert empty.returncode == 2 and "no results files" in empty.stderr
    good = repo / ".mlci" / "results" / "cpu.json"
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "cpu.json").write_text(good.read_text())
    (tmp_path / "r" / "gpu.json").write_text('{"schema": "mlci.results/99"}')
    mixed = mlci("compare", str(tmp_path / "r"), "--report-dir", str(tmp_path / "report"), cwd=repo)
    assert mixed.returncode == 1
    assert "gpu.json" in mixed.stderr and "unsupported results schema" in mixed.stderr
    assert "gpu.json" in (tmp_path / "report" / "comment.md").read_text()
