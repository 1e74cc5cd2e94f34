"""`mlci run` on this x86 machine for an Arm target: every example model is cross-compiled for
aarch64 and its numerics checked under qemu-aarch64, with no latency reported; a model edited to use
an operator that gives other numbers on Arm only (an out-of-range float-to-byte cast) fails the gate
there, while the same model passes on this machine's own CPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from mlci import emulation

from .test_emulation import CACHE as RUNTIME_CACHE
from .test_emulation import cast_model

REPO = Path(__file__).resolve().parents[1]
ARM = '[targets.arm]\ntvm = { kind = "llvm", mtriple = "aarch64-linux-gnu", mcpu = "cortex-a72", "num-cores" = 2 }\n'

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(emulation.host_arch() == "aarch64", reason="this machine is aarch64: nothing to emulate"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")),
                       reason="needs Debian's qemu-user, gcc-aarch64-linux-gnu and g++-aarch64-linux-gnu (tests/setup_cross.sh)"),
]


def mlci(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlci.cli", *args], cwd=project, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("arm") / "examples"
    shutil.copytree(REPO / "examples", root, ignore=shutil.ignore_patterns(".mlci", "models", "__pycache__"))
    # The models once, here: the config's `prepare` would write them anew on every run of this module.
    subprocess.run([sys.executable, "make_models.py"], cwd=root, check=True, capture_output=True, timeout=300)
    config = (root / "mlci.toml").read_text()
    assert 'prepare = ["python", "make_models.py"]\n' in config
    (root / "mlci.toml").write_text(config.replace('prepare = ["python", "make_models.py"]\n', "") + "\n" + ARM)
    if RUNTIME_CACHE.exists():  # the aarch64 runtime test_emulation fetched: not downloaded twice
        shutil.copytree(RUNTIME_CACHE, root / ".mlci" / "cache" / "emulation")
    return root


@pytest.fixture(scope="module")
def arm_run(project: Path) -> dict:
    done = mlci(project, "run", "--target", "arm", "--no-tracking")
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((project / ".mlci" / "results" / "arm.json").read_text())


def test_every_example_compiles_for_arm_and_its_numerics_are_checked_under_emulation(arm_run: dict, project: Path):
    target = arm_run["target"]
    assert target["execution"] == "emulated"
    assert target["execution_note"] == ("no aarch64 CPU on this x86_64 runner: cross-compiled; numerics under "
                                        "qemu-aarch64, not timed")
    assert [m["name"] for m in arm_run["models"]] == ["mlp", "cnn", "squeezenet"]
    for model in arm_run["models"]:
        assert model["status"] == "ok", model["error"]
        assert model["numerics"]["passed"] and model["numerics"]["emulated"] and model["numerics"]["input_sets"] == 2
        assert model["latency_ms"] is None and model["peer"] is None  # never timed under emulation
        assert model["tuning"]["trials_new"] == 0  # nothing searched without the hardware
        library = project / ".mlci" / "work" / "arm" / model["name"] / f"{model['name']}.so"
        assert emulation.elf_machine(library) == "aarch64"
    done = mlci(project, "compare", ".mlci/results/arm.json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "arm compiled only, not timed" in done.stdout


def test_an_operator_that_gives_other_numbers_on_arm_only_fails_the_gate_there(arm_run: dict, project: Path):
    # A model edited to scale its values by 1e10 and cast them to bytes: an out-of-range cast, which ONNX
    # leaves undefined; x86 gives the low byte of INT_MIN (0) as ONNX Runtime on x86 does, aarch64 saturates (255).
    onnx.save(cast_model(), project / "models" / "casts.onnx")
    with open(project / "mlci.toml", "a") as f:
        f.write('\n[[models]]\nname = "casts"\npath = "models/casts.onnx"\n')
    native = mlci(project, "run", "--target", "cpu", "--model", "casts", "--trials", "0", "--no-tracking",
                  "--output", ".mlci/results/cpu-cast.json")
    assert native.returncode == 0, native.stdout + native.stderr
    assert json.loads((project / ".mlci/results/cpu-cast.json").read_text())["models"][0]["status"] == "ok"

    done = mlci(project, "run", "--target", "arm", "--model", "casts", "--no-tracking", "--allow-failures")
    results = json.loads((project / ".mlci" / "results" / "arm.json").read_text())
    [model] = results["models"]
    assert model["status"] == "numerics_failed", done.stdout + done.stderr
    assert model["numerics"]["emulated"] and "TVM 255" in model["error"]
    gate = mlci(project, "compare", ".mlci/results/arm.json")
    assert gate.returncode == 1 and "gate failed" in gate.stdout + gate.stderr, gate.stdout + gate.stderr


def test_without_the_arm_runtime_numerics_are_not_checked_and_the_results_say_why(tmp_path: Path, monkeypatch):
    """PyPI out of reach on the first run: the models are still cross-compiled (the gate on compiling
    holds), and the results say numerics were not checked and why, instead of failing every model."""
    from mlci.commands.run import cross_tools
    from mlci.config import parse_config
    from mlci.targets import select_target

    config = parse_config(ARM + '[[models]]\npath = "m.onnx"\n', tmp_path / "mlci.toml")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    cross_cc, emulator, problem = cross_tools(select_target(config, "arm"), config)
    assert cross_cc is not None and cross_cc.endswith("aarch64-linux-gnu-gcc")
    assert emulator is None
    assert problem.startswith("pip could not download apache-tvm==")
