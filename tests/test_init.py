"""`mlci init`: a repository's models found, shapes proposed, mlci.toml and starter workflows written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
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
    said = " ".join(result.output.split())
    for variable in ("MLFLOW_TRACKING_URI", "MLCI_CACHE_URL", "MLCI_AWS_ROLE", "MLCI_AWS_PR_ROLE"):
        assert variable in said  # what to set next, for history and for a shared tuning cache

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


# --- guessed shapes, and ONNX Runtime's verdict on them --------------------------------------------


def _out(name: str, rank: int = 2) -> helper.ValueInfoProto:
    """A float output whose shape the test does not care about."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def _model(nodes, inputs, outputs, initializers=(), metadata: dict[str, str] | None = None, doc: str = "",
           opsets=(("", 17),)) -> helper.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], doc_string=doc)
    helper.set_model_props(model, metadata or {})
    return model


def _classifier(shape: list, metadata: dict[str, str] | None = None, doc: str = "") -> helper.ModelProto:
    """Conv, global pooling, a 10-way Gemm: runs at any image size, like an exported CNN."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.standard_normal((8, 10)).astype(np.float32), "fc_w")]
    nodes = [helper.make_node("Conv", ["image", "conv_w"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["conv"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc")]
    return _model(nodes, [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
                  [_out("logits")], inits, metadata, doc)


def _embedding(shape: list) -> helper.ModelProto:
    """Token ids looked up in an embedding table (the first op of every exported transformer)."""
    table = numpy_helper.from_array(np.ones((100, 4), np.float32), "table")
    return _model([helper.make_node("Gather", ["table", "input_ids"], ["embedded"], name="embed")],
                  [helper.make_tensor_value_info("input_ids", TensorProto.INT64, shape)],
                  [_out("embedded", 3)], [table])


def _flattens_to_32x32() -> helper.ModelProto:
    """A detector head exported with dynamic H and W that only works at 32 x 32 (a fixed Reshape)."""
    target = numpy_helper.from_array(np.array([1, 3 * 32 * 32], np.int64), "target")
    return _model([helper.make_node("Reshape", ["image", "target"], ["flat"], name="head/flatten")],
                  [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                  [_out("flat")], [target])


def _proposed(tmp_path: Path, model: helper.ModelProto, name: str = "m") -> init.ProposedModel:
    return init.propose_model(tmp_path, save(model, tmp_path / f"{name}.onnx"))


def _values(model: init.ProposedModel) -> dict[str, object]:
    return {b.key: b.value for b in model.bindings}


def test_image_height_and_width_are_guessed_224_in_either_layout(tmp_path: Path) -> None:
    assert _values(_proposed(tmp_path, _classifier(["N", 3, "H", "W"]))) == {"N": 1, "H": 224, "W": 224}
    assert _values(_proposed(tmp_path, _classifier(["batch", 3, "unk__1", "unk__2"]))) == {
        "batch": 1, "unk__1": 224, "unk__2": 224}
    assert _values(_proposed(tmp_path, _classifier([None, 3, None, None]))) == {"image": [1, 3, 224, 224]}
    nhwc = _proposed(tmp_path, _model([helper.make_node("Relu", ["x"], ["y"])],
                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, None, 1])],
                                      [_out("y", 4)]))
    assert _values(nhwc) == {"x": [1, 224, 224, 1]}
    assert "1 (unnamed, image height)" in nhwc.bindings[0].comment
    # Not an image: 7 channels, so the dims named "a" and "b" get 1.
    assert _values(_proposed(tmp_path, _model(
        [helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 7, "a", "b"])],
        [_out("y", 4)]))) == {"n": 1, "a": 1, "b": 1}


def test_the_image_size_comes_from_metadata_doc_strings_or_a_fixed_sibling(tmp_path: Path) -> None:
    yolo = _proposed(tmp_path, _classifier(["N", 3, "H", "W"], metadata={"imgsz": "[640, 480]", "stride": "32"}))
    assert _values(yolo) == {"N": 1, "H": 640, "W": 480}
    assert "image height, from the model's metadata (imgsz)" in yolo.bindings[1].comment
    keyed = _classifier([None, 3, None, None], metadata={"image_height": "736", "image_width": "1280"})
    assert _values(_proposed(tmp_path, keyed)) == {"image": [1, 3, 736, 1280]}
    documented = _classifier(["N", 3, "H", "W"], doc="Text detector, trained on 1x3x960x960 crops.")
    assert _values(_proposed(tmp_path, documented)) == {"N": 1, "H": 960, "W": 960}

    sibling = _model([helper.make_node("Mul", ["image", "mask"], ["y"])],
                     [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"]),
                      helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 320, 256])],
                     [_out("y", 4)])
    guessed = _proposed(tmp_path, sibling)
    assert _values(guessed) == {"H": 320, "W": 256}
    assert 'from the fixed input "mask"' in guessed.bindings[0].comment


def test_sequence_dims_get_128_by_name_or_as_gather_indices(tmp_path: Path) -> None:
    assert _values(_proposed(tmp_path, _embedding(["batch", "seq"]))) == {"batch": 1, "seq": 128}
    assert _values(_proposed(tmp_path, _embedding([None, None]))) == {"input_ids": [1, 128]}
    assert _values(_proposed(tmp_path, _embedding(["d0", "d1"]))) == {"d0": 1, "d1": 128}
    # The same input as floats into a Relu is no token sequence.
    floats = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["d0", "d1"])],
                    [_out("y")])
    assert _values(_proposed(tmp_path, floats)) == {"d0": 1, "d1": 1}


def test_a_dimension_gets_one_size_everywhere_and_sums_add_up(tmp_path: Path) -> None:
    decoder = _model(
        [helper.make_node("Concat", ["past", "new"], ["all"], axis=1), helper.make_node("Relu", ["mask"], ["m"])],
        [helper.make_tensor_value_info("past", TensorProto.FLOAT, ["batch", "past_sequence_length"]),
         helper.make_tensor_value_info("new", TensorProto.FLOAT, ["batch", 1]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [None, "past_sequence_length + 1"])],
        [_out("all"), _out("m")])
    guessed = _proposed(tmp_path, decoder)
    assert _values(guessed) == {"batch": 1, "past_sequence_length": 128, "mask": [1, 129]}
    # "H" is an image height in the first input, so the second input's "H" is 224 too.
    shared = _model([helper.make_node("Relu", ["image"], ["y"]), helper.make_node("Relu", ["rows"], ["z"])],
                    [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [None, "H"]),
                     helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
                    [_out("y", 4), _out("z")])
    assert _values(_proposed(tmp_path, shared)) == {"H": 224, "W": 224, "rows": [1, 224]}


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository of models as exporters write them: one runs at the guessed sizes, one does not,
    ONNX Runtime cannot load one (an op of a custom domain)."""
    monkeypatch.delenv("GITHUB_EVENT_PATH", raising=False)
    save(_classifier(["N", 3, "H", "W"]), tmp_path / "models" / "classifier.onnx")
    save(_embedding(["batch", "seq"]), tmp_path / "models" / "encoder.onnx")
    save(_flattens_to_32x32(), tmp_path / "models" / "detector.onnx")
    save(_model([helper.make_node("Decode", ["x"], ["y"], domain="acme.ops")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                [_out("y")], opsets=(("", 17), ("acme.ops", 1))),
         tmp_path / "models" / "custom.onnx")
    return tmp_path


def test_init_runs_each_model_and_names_those_whose_guess_fails(zoo: Path, workflows: list[str]) -> None:
    result = _init("--root", str(zoo))
    assert result.exit_code == 0, result.output
    cfg = load_config(zoo / "mlci.toml")
    by_name = {m.name: m for m in cfg.models}
    assert set(by_name) == {"classifier", "encoder", "detector", "custom"}  # failures stay configured
    assert by_name["classifier"].dims == {"N": 1, "H": 224, "W": 224}
    assert by_name["encoder"].dims == {"batch": 1, "seq": 128}

    stderr = " ".join(result.stderr.split())
    assert ('warning: models/detector.onnx: the guessed shapes fail in ONNX Runtime ("image" [1, 3, 224, 224]): '
            "Reshape node 'head/flatten': The input tensor cannot be reshaped to the requested shape. "
            "Input shape:{1,3,224,224}, requested shape:{1,3072}; edit them in mlci.toml") in stderr
    assert ("warning: models/custom.onnx: ONNX Runtime cannot load it: Fatal error: acme.ops:Decode(-1) is not a "
            "registered function/op; `mlci run` will fail on it too") in stderr
    assert "classifier" not in stderr and "encoder" not in stderr
    assert "onnxruntime_src" not in stderr  # C++ source locations are cut

    text = (zoo / "mlci.toml").read_text()
    detector = text.split('name = "detector"')[1].split("[[models]]")[0].splitlines()
    assert detector[1] == 'path = "models/detector.onnx"'
    assert detector[2].startswith("# mlci init: ONNX Runtime failed on the guessed shapes")
    assert "requested shape:{1,3072}" in detector[2] and detector[3].startswith("# mlci init: edit the sizes below")
    assert detector[4].startswith("dims.N = 1  # guessed")
    assert "# mlci init: ONNX Runtime cannot load this model" in text.split('name = "custom"')[1]
    classifier = text.split('name = "classifier"')[1].split("[[models]]")[0]
    assert "mlci init:" not in classifier


def test_the_check_is_bounded_by_size_and_time(zoo: Path, workflows: list[str]) -> None:
    small = init.execute(zoo, models=[Path("models/classifier.onnx")], check=init.CheckLimits(max_bytes=100))
    assert (zoo / "models" / "classifier.onnx").stat().st_size > 1024
    assert small.warnings == [f"models/classifier.onnx: the guessed shapes were not checked: it is "
                              f"{init._size_text((zoo / 'models' / 'classifier.onnx').stat().st_size)}, "
                              "over the 100 bytes init runs"]
    assert "# mlci init: the guessed shapes were not checked" in (zoo / "mlci.toml").read_text()

    spent = init.execute(zoo, force=True, models=[Path("models/detector.onnx")], check=init.CheckLimits(total_seconds=0))
    assert spent.warnings == ["models/detector.onnx: the guessed shapes were not checked: init's 0 s for running "
                              "models were spent on the ones before"]
    unchecked = init.execute(zoo, force=True, models=[Path("models/detector.onnx")], check=None)
    assert unchecked.warnings == [] and "mlci init:" not in (zoo / "mlci.toml").read_text()


def test_a_model_still_running_at_the_time_limit_is_stopped_and_named(tmp_path: Path, workflows: list[str]) -> None:
    """About 200 GFLOP of MatMuls computed from the input (nothing to fold at load time): seconds of work
    at least, stopped at the next node once the limit passes."""
    shape = numpy_helper.from_array(np.array([1024, 1024], np.int64), "shape")
    nodes = [helper.make_node("Expand", ["x", "shape"], ["m0"])]
    nodes += [helper.make_node("MatMul", [f"m{i}", "m0"], [f"m{i + 1}"], name=f"matmul{i}") for i in range(100)]
    slow = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
                  [_out("m100")], [shape])
    save(slow, tmp_path / "slow.onnx")
    started = time.monotonic()
    outcome = init.execute(tmp_path, check=init.CheckLimits(seconds=0.5))
    assert time.monotonic() - started < 5
    assert outcome.warnings == ["slow.onnx: the guessed shapes were not checked: ONNX Runtime was still loading "
                                "or running it after 0.5 s"], (tmp_path / "mlci.toml").read_text()


def test_ort_errors_are_shortened_to_the_node_and_the_reason() -> None:
    long = ("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node. Name:'add' "
            "Status Message: /onnxruntime_src/onnxruntime/core/providers/cpu/math/element_wise_ops.h:563 void "
            "onnxruntime::BroadcastIterator::Init(ptrdiff_t, ptrdiff_t) axis == 1 || axis == largest was false. "
            "Attempting to broadcast an axis by a dimension other than 1. 32 by 224\n")
    assert init.short_ort_error(RuntimeError(long)) == (
        "Add node 'add': Attempting to broadcast an axis by a dimension other than 1. 32 by 224")
    assert init.short_ort_error(RuntimeError("x" * 1000)) == "x" * (init.ERROR_CHARS - 3) + "..."
