"""`mlci init`: a repository's models found, shapes proposed, mlci.toml and starter workflows written."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper
from typer.testing import CliRunner

from mlci.cli import app
from mlci.commands import init
from mlci.config import ConfigError, load_config, parse_config
from mlci.models import prepare_model

from .conftest import REPO, save, tiny_mlp

PLACEHOLDER_WORKFLOW = """\
name: {name}
on:
  push:
    branches: [main]  # mlci init: the default branch
  pull_request:
    branches: [main]  # mlci init: the default branch
permissions: {{}}
concurrency:
  group: ${{{{ github.workflow }}}}-${{{{ github.event.pull_request.number || github.ref }}}}
  cancel-in-progress: true
jobs:
  hello:
    runs-on: ubuntu-latest
    timeout-minutes: 5
    steps:
      - run: echo "[main] is left alone without the marker"
"""


def _packaged_workflows() -> list[str]:
    return sorted(f.name for f in init._workflows_package().iterdir() if f.name.endswith(".yml") and f.is_file())


def _use_placeholders(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    """Stand-in starter workflows, in a temporary directory (never in the repository's workflows/)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("mlci.yml", "mlci-comment.yml"):
        (directory / name).write_text(PLACEHOLDER_WORKFLOW.format(name=name), encoding="utf-8")
    monkeypatch.setattr(init, "_workflows_package", lambda: directory)


@pytest.fixture
def workflows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """The starter workflow names `mlci init` writes: the packaged ones, or placeholders until they exist."""
    # Inside GitHub Actions the event payload would name the default branch instead of git.
    monkeypatch.delenv("GITHUB_EVENT_PATH", raising=False)
    if not _packaged_workflows():
        _use_placeholders(monkeypatch, tmp_path / "placeholder-workflows")
    return _packaged_workflows()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "-c", "commit.gpgsign=false", *args],
                   cwd=repo, check=True, capture_output=True)


def _unnamed_dim_model() -> helper.ModelProto:
    """An image-like input whose batch axis is dynamic without a name (as some exporters write it)."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["y"], name="relu")], "unnamed",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3, 8, 8])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git repository on branch `trunk`: a model with a named batch dimension, one with an unnamed
    dynamic dimension, and one in an ignored directory."""
    monkeypatch.delenv("GITHUB_EVENT_PATH", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "symbolic-ref", "HEAD", "refs/heads/trunk")
    save(tiny_mlp(batch="batch"), repo / "models" / "mlp.onnx")
    save(_unnamed_dim_model(), repo / "models" / "vision" / "conv.onnx")
    save(tiny_mlp(), repo / "downloads" / "ignored.onnx")
    (repo / ".gitignore").write_text("downloads/\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "models")
    return repo


def _init(*args: str):
    return CliRunner().invoke(app, ["init", *args])


def test_init_configures_the_repository(repo: Path, workflows: list[str]) -> None:
    result = _init("--root", str(repo))
    assert result.exit_code == 0, result.output

    cfg = load_config(repo / "mlci.toml")
    assert [(m.name, m.path.relative_to(repo).as_posix()) for m in cfg.models] == [
        ("mlp", "models/mlp.onnx"),
        ("conv", "models/vision/conv.onnx"),
    ]
    by_name = {m.name: m for m in cfg.models}
    assert by_name["mlp"].dims == {"batch": 1} and by_name["mlp"].inputs == {}
    assert by_name["conv"].inputs == {"image": [1, 3, 8, 8]} and by_name["conv"].dims == {}
    assert "ignored" not in (repo / "mlci.toml").read_text()
    assert list(cfg.targets) == ["cpu"] and cfg.targets["cpu"].runs_on == ["ubuntu-latest"]
    assert cfg.tuning.trials == 64 and cfg.gate.threshold == 0.05 and cfg.gate.fail_on == "regression"

    text = (repo / "mlci.toml").read_text()
    assert "written by `mlci init`" in text and "mlci.toml reference" in text
    guessed = [line for line in text.splitlines() if line.startswith(("dims.", "inputs."))]
    assert len(guessed) == 2 and all("# guessed" in line and "edit" in line for line in guessed)
    for example in ('# [targets.arm]', '# tvm = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "neoverse-n1" }',
                    '# runs_on = "ubuntu-24.04-arm"', "# [targets.gpu]", '# tvm = { kind = "cuda", arch = "sm_80" }',
                    '# runs_on = ["self-hosted", "linux", "gpu"]'):
        assert example in text

    written = sorted(p.name for p in (repo / ".github" / "workflows").iterdir())
    assert written == sorted(workflows)
    substituted = 0
    for name in workflows:
        source = (init._workflows_package() / name).read_text(encoding="utf-8").splitlines()
        copied = (repo / ".github" / "workflows" / name).read_text(encoding="utf-8").splitlines()
        assert len(copied) == len(source)
        for before, after in zip(source, copied):
            if before.rstrip().endswith(init.BRANCH_MARKER) and "[main]" in before:
                assert after == before.replace("[main]", "[trunk]", 1)
                substituted += 1
            else:
                assert after == before
    assert substituted, "no starter workflow line carries the default-branch marker"

    out = result.stdout
    assert "wrote mlci.toml (2 model(s): mlp, conv)" in out
    assert "git add mlci.toml " + " ".join(f".github/workflows/{n}" for n in workflows) in out
    assert 'git commit -m "Add mlci"' in out
    assert "Add .mlci/ to .gitignore" in out
    assert "mlci run -c" in out  # --root is not the current directory
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                 "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "runs_on"):
        assert name in out


def test_proposed_shapes_are_accepted_by_the_loader(repo: Path, workflows: list[str]) -> None:
    assert _init("--root", str(repo)).exit_code == 0
    cfg = load_config(repo / "mlci.toml")
    shapes = {m.name: [s.shape for s in prepare_model(m).inputs] for m in cfg.models}
    assert shapes == {"mlp": [(1, 32)], "conv": [(1, 3, 8, 8)]}


def test_second_init_refuses_to_overwrite_and_force_overwrites(repo: Path, workflows: list[str]) -> None:
    assert _init("--root", str(repo)).exit_code == 0
    files = [repo / "mlci.toml"] + [repo / ".github" / "workflows" / n for n in workflows]
    (repo / "mlci.toml").write_text("# my own edits\n")
    before = {f: f.read_bytes() for f in files}

    again = _init("--root", str(repo))
    assert again.exit_code == 2
    message = " ".join(again.stderr.split())  # rich wraps long lines
    for f in files:
        assert f.relative_to(repo).as_posix() in message
    assert "--force" in message and "nothing was written" in message
    assert {f: f.read_bytes() for f in files} == before

    forced = _init("--root", str(repo), "--force")
    assert forced.exit_code == 0, forced.output
    assert "written by `mlci init`" in (repo / "mlci.toml").read_text()


def test_one_existing_workflow_is_enough_to_refuse(repo: Path, workflows: list[str]) -> None:
    existing = repo / ".github" / "workflows" / workflows[0]
    existing.parent.mkdir(parents=True)
    existing.write_text("name: mine\n")
    result = _init("--root", str(repo))
    assert result.exit_code == 2
    assert f".github/workflows/{workflows[0]}" in " ".join(result.stderr.split())
    assert not (repo / "mlci.toml").exists() and existing.read_text() == "name: mine\n"


def test_corrupt_model_is_named_and_the_others_are_configured(repo: Path, workflows: list[str]) -> None:
    (repo / "models" / "broken.onnx").write_bytes(b"this is not a protobuf")
    result = _init("--root", str(repo))
    assert result.exit_code == 0, result.output
    assert "warning: models/broken.onnx: left out: cannot be read as ONNX" in result.stderr
    assert [m.name for m in load_config(repo / "mlci.toml").models] == ["mlp", "conv"]


def test_no_models_writes_an_example_and_warns(tmp_path: Path, workflows: list[str]) -> None:
    result = _init("--root", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "no ONNX model was found" in result.stderr
    text = (tmp_path / "mlci.toml").read_text()
    assert "# [[models]]" in text and "\n[[models]]" not in text
    with pytest.raises(ConfigError, match="no models configured"):
        parse_config(text, tmp_path / "mlci.toml")


def test_outside_git_skips_environments_and_caches(tmp_path: Path, workflows: list[str]) -> None:
    save(tiny_mlp(), tmp_path / "a" / "model.onnx")
    save(tiny_mlp(seed=1), tmp_path / "b" / "model.onnx")  # same stem: a unique name
    for skipped in (".venv/lib/x.onnx", "node_modules/p/x.onnx", ".mlci/work/x.onnx", "venv/x.onnx"):
        save(tiny_mlp(), tmp_path / skipped)
    assert [p.as_posix() for p in init.find_models(tmp_path)] == ["a/model.onnx", "b/model.onnx"]

    result = _init("--root", str(tmp_path), "--branch", "release/1.x")
    assert result.exit_code == 0, result.output
    assert [(m.name, m.path.relative_to(tmp_path).as_posix()) for m in load_config(tmp_path / "mlci.toml").models] == [
        ("model", "a/model.onnx"), ("model-2", "b/model.onnx")]


def test_model_option_takes_only_the_given_files(repo: Path, workflows: list[str]) -> None:
    result = _init("--root", str(repo), "--model", "models/mlp.onnx")
    assert result.exit_code == 0, result.output
    assert [m.name for m in load_config(repo / "mlci.toml").models] == ["mlp"]

    missing = _init("--root", str(repo), "--model", "nope.onnx", "--force")
    assert missing.exit_code == 2 and "--model nope.onnx: no such file" in missing.stderr


def test_default_branch_substitution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _use_placeholders(monkeypatch, tmp_path / "wf")
    plain = init.starter_workflows("develop")["mlci.yml"]
    assert plain.count("branches: [develop]  # mlci init: the default branch") == 2
    assert "echo \"[main] is left alone" in plain
    odd = yaml.safe_load(init.starter_workflows("1.0")["mlci.yml"])
    assert odd[True]["push"]["branches"] == ["1.0"]  # PyYAML reads `on` as True; the branch stays a string


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",))))
def test_toml_strings_read_back(text: str) -> None:
    document = f"{init.toml_key(text)} = {init.toml_string(text)}\n" if text else f'x = {init.toml_string(text)}\n'
    parsed = tomllib.loads(document)
    assert list(parsed.values()) == [text] and (not text or list(parsed) == [text])


@given(st.text(alphabet=st.characters(min_codepoint=0x21, exclude_characters=" ~^:?*[\\\x7f", exclude_categories=("Cs",)),
               min_size=1))
def test_branch_names_read_back_from_yaml(name: str) -> None:
    assert yaml.safe_load(f"branches: [{init.yaml_branch(name)}]") == {"branches": [name]}


def test_guessed_sizes() -> None:
    sizes = {n: init.guess_size(n) for n in ("batch", "batch_size", "N", "bs", "seq", "sequence_length", "seq_len",
                                               "tokens", "time", "height", "width", "h", "w", "channels", "foo", None)}
    assert sizes == {"batch": 1, "batch_size": 1, "N": 1, "bs": 1, "seq": 128, "sequence_length": 128, "seq_len": 128,
                     "tokens": 128, "time": 128, "height": 224, "width": 224, "h": 224, "w": 224, "channels": 3,
                     "foo": 1, None: 1}


def test_starter_workflows_pass_the_linters(repo: Path) -> None:
    if not _packaged_workflows():
        pytest.skip("no starter workflows in workflows/ (the mlci.workflows package) yet")
    assert _init("--root", str(repo)).exit_code == 0
    directory = repo / ".github" / "workflows"
    files = sorted(str(p) for p in directory.glob("*.yml"))
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in {"GH_TOKEN", "GITHUB_TOKEN", "ZIZMOR_GITHUB_TOKEN"}}
    # mlci's own pinning policy (.github/): GitHub's actions and mlci itself by release tag, all else by SHA.
    policy = REPO / ".github"
    jactionlint_config = ["--config-file", str(policy / "jactionlint.yaml")] if (policy / "jactionlint.yaml").is_file() else []
    zizmor_config = ["--config", str(policy / "zizmor.yml")] if (policy / "zizmor.yml").is_file() else []
    commands = [
        [str(bin_dir / "jactionlint"), "--no-online", *jactionlint_config, *files],
        [str(bin_dir / "actionlint"), *files],
        [str(bin_dir / "zizmor"), "--offline", "--min-severity", "medium", "--no-progress", "--color", "never",
         *zizmor_config, str(directory)],
    ]
    failures = []
    for command in commands:
        proc = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(command)}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    assert not failures, "\n\n".join(failures)
