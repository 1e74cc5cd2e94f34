"""Shared fixtures: tiny real ONNX models built in code, config writers, and the quick start's
cold run, which is the one cold tuning run of the suite: end-to-end tests that only need a tuned
tuning cache run on its project."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def new_git_repo(root: Path, branch: str = "main") -> Path:
    """An empty repository with a committer set, as the end-to-end tests' consumer projects start."""
    git(root, "init", "-q", "-b", branch)
    git(root, "config", "user.email", "dev@example.com")
    git(root, "config", "user.name", "dev")
    return root


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


def tiny_mlp(widths=(32, 64, 8), seed: int = 0, batch="batch") -> onnx.ModelProto:
    """Gemm+Relu layers; changing one width changes only the kernels around that layer."""
    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.full(b, 0.1, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"fc{i}"], name=f"fc{i}"))
        prev = f"fc{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"relu{i}"], name=f"relu{i}"))
            prev = f"relu{i}"
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, widths[0]])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [batch, widths[-1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def attn_lstm_model(hidden: int = 8, inp: int = 4, seq: int = 5) -> onnx.ModelProto:
    """An operator nobody converts: an LSTM with attention (ONNX Runtime's contrib AttnLSTM, which
    ONNX Runtime runs; neither TVM nor mlci converts it), in a node named like a real encoder's."""
    rng = np.random.default_rng(3)
    attention, memory_steps, memory_depth = 4, 3, 4

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    weights = [weight("W", 1, 4 * hidden, inp + attention), weight("R", 1, 4 * hidden, hidden),
               weight("QW", 1, hidden, attention), weight("MW", 1, memory_depth, attention),
               weight("V", 1, attention), weight("M", 1, memory_steps, memory_depth)]
    node = helper.make_node("AttnLSTM", ["x", "W", "R", "", "", "", "", "", "QW", "MW", "V", "M"], ["y"],
                            name="encoder/lstm_1", domain="com.microsoft", hidden_size=hidden)
    graph = helper.make_graph(
        [node], "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [seq, 1, inp])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [seq, 1, 1, hidden])],
        weights,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def write_config(directory: Path, body: str) -> Path:
    path = directory / "mlci.toml"
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def quick_project(root: Path, widths=(32, 64, 8), trials: int = 0) -> Path:
    """A project with one tiny model, run untuned (unless `trials`) and measured briefly: for tests
    about what happens around a run (servers, tracking, signals), not about its numbers."""
    save(tiny_mlp(widths), root / "models" / "tiny.onnx")
    write_config(root, f"""
        [tuning]
        trials = {trials}
        [measure]
        samples = 5
        min_sample_ms = 0.2
        [[models]]
        name = "tiny"
        path = "models/tiny.onnx"
        dims = {{ batch = 1 }}
    """)
    return root


@pytest.fixture
def tmp_repo(tmp_path: Path) -> Path:
    return tmp_path


def quickstart_commands() -> list[str]:
    """The commands of the README's second code block under '## Quick start'."""
    section = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [line.strip() for line in blocks[1].splitlines() if line.strip() and not line.startswith("#")]


@dataclass
class Quickstart:
    """The README's first command, run cold in a copy of examples/ (no .mlci/, no models yet)."""

    cwd: Path
    argv: list[str]
    proc: subprocess.CompletedProcess

    @property
    def project(self) -> Path:
        return self.cwd / "examples"

    @property
    def results(self) -> dict:
        return json.loads((self.project / ".mlci" / "results" / "cpu.json").read_text())

    def mlci(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mlci.cli", *args], cwd=self.cwd, capture_output=True,
                              text=True, timeout=900)


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Quickstart:
    cwd = tmp_path_factory.mktemp("quickstart")
    shutil.copytree(REPO / "examples", cwd / "examples", ignore=shutil.ignore_patterns(".mlci", "models", "__pycache__"))
    run, _ = quickstart_commands()
    argv = shlex.split(run)
    assert argv[0] == "mlci"
    proc = subprocess.run([sys.executable, "-m", "mlci.cli", *argv[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    return Quickstart(cwd, argv, proc)
