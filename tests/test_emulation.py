"""A 64-bit Arm target on this x86 runner: its builds are linked by the aarch64 cross toolchain and their
outputs checked against ONNX Runtime by running them under qemu-user (never timed).

Needs Debian's qemu-user and g++-aarch64-linux-gnu (tests/setup_cross.sh installs them); the aarch64 TVM
runtime is downloaded from PyPI once and cached in .mlci/test-cache/emulation (git-ignored)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from mlci import emulation, measure
from mlci.config import ModelConfig
from mlci.emulation import EmulatedModel, EmulationError, Emulator, MissingToolError
from mlci.pipeline import Pipeline
from mlci.targets import ResolvedTarget, detect_host_target
from mlci.tuning import TuningCache

from .conftest import REPO, save

ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}
CACHE = REPO / ".mlci" / "test-cache" / "emulation"
ATOL, RTOL = 1e-4, 1e-3  # the example's tolerances (examples/mlci.toml)

needs_arm_host = pytest.mark.skipif(emulation.host_arch() == "aarch64", reason="this machine is aarch64: nothing to emulate")


def cast_model(n: int = 64) -> onnx.ModelProto:
    """y = float(uint8(x * 1e10)): a float outside int32's range converted to an 8-bit integer. x86 converts
    through a 32-bit cvttss2si, which gives INT_MIN (low byte 0), as ONNX Runtime on x86 does; aarch64's
    fcvtzs saturates to INT_MAX (low byte 255). ONNX leaves such casts undefined, so TVM is right on both:
    the build is only wrong *for the reference it is checked against*, on one target."""
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [1e10])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["scaled"], name="scale"),
         helper.make_node("Cast", ["scaled"], ["byte"], name="to_uint8", to=TensorProto.UINT8),
         helper.make_node("Cast", ["byte"], ["y"], name="to_float", to=TensorProto.FLOAT)],
        "cast_out_of_range",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime reads
    return model


def _example(name: str) -> onnx.ModelProto:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_models
    finally:
        sys.path.pop(0)
    return getattr(make_models, name)()


@dataclass
class Case:
    """One model built for aarch64 (and for this CPU), its reference outputs, and what emulation returned."""

    name: str
    library: Path
    input_sets: list[dict[str, np.ndarray]]
    names: list[str]
    output_names: list[str]
    expected: list[list[np.ndarray]]
    host_outputs: list[list[np.ndarray]]
    host_executable: Any
    run: emulation.EmulatedRun | None = None


@dataclass
class Session:
    toolchain: emulation.CrossToolchain
    emulator: Emulator
    cases: dict[str, Case]


def _tools_or_skip() -> emulation.CrossToolchain:
    try:
        toolchain = emulation.cross_toolchain(ARM)
        assert toolchain is not None
        toolchain.emulation_tools()
    except MissingToolError as exc:
        pytest.skip(f"{exc} (tests/setup_cross.sh installs everything)")
    return toolchain


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """mlp, cnn and the Cast model built for aarch64 and for this CPU, the aarch64 ones run in one emulated process."""
    if emulation.host_arch() == "aarch64":
        pytest.skip("this machine is aarch64: nothing to emulate")
    toolchain = _tools_or_skip()
    threads = os.environ.get("TVM_NUM_THREADS")
    try:
        return _build_and_emulate(toolchain, tmp_path_factory.mktemp("emulation"))
    finally:  # the pipelines set it for this process; later tests set their own
        if threads is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = threads


def _build_and_emulate(toolchain: emulation.CrossToolchain, tmp: Path) -> Session:
    arm = Pipeline(ResolvedTarget("arm", ARM), TuningCache(tmp / "cache"), log_dir=tmp / "logs")
    host = Pipeline(ResolvedTarget("cpu", detect_host_target()), TuningCache(tmp / "cache"), log_dir=tmp / "logs")
    models = {"mlp": (_example("mlp"), {"batch": 1}, {}), "cnn": (_example("cnn"), {}, {"image": [1, 3, 32, 32]}),
              "cast": (cast_model(), {}, {})}
    cases = {}
    for name, (model, dims, inputs) in models.items():
        config = ModelConfig(name=name, path=save(model, tmp / f"{name}.onnx"), dims=dims, inputs=inputs, key=name)
        imported = arm.load_and_import(config)
        executable, _report, _seconds = arm.build(imported)
        library = emulation.export_cross(executable, tmp / f"{name}.aarch64.so", toolchain)
        prepared = imported.prepared
        input_sets = [measure.make_inputs(prepared.inputs, seed) for seed in (0, 1)]
        names = [s.name for s in prepared.inputs]
        reference = measure.OrtModel.load(prepared.reference, 1)
        host_exe, _report, _seconds = host.build(host.import_model(prepared))
        host_model = measure.TvmModel(host_exe, host.device)
        cases[name] = Case(name, library, input_sets, names, reference.output_names,
                           [reference.run(inputs) for inputs in input_sets],
                           [host_model.run(inputs, names) for inputs in input_sets], host_exe)
    emulator = Emulator(toolchain, CACHE)
    runs = emulator.run_many([EmulatedModel(c.library, c.input_sets, c.names) for c in cases.values()])
    for case, run in zip(cases.values(), runs):
        case.run = run
    return Session(toolchain, emulator, cases)


def _numerics(got: list[list[np.ndarray]], case: Case) -> measure.NumericsReport:
    return measure.compare_sets(got, case.expected, case.output_names, ATOL, RTOL)


# --- cross export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_examples_cross_compile_to_aarch64_shared_libraries(session: Session, name: str) -> None:
    library = session.cases[name].library
    assert emulation.elf_machine(library) == "aarch64"
    if shutil.which("file"):
        described = subprocess.run(["file", "-b", str(library)], capture_output=True, text=True, check=True).stdout
        assert "ARM aarch64" in described and "shared object" in described, described


def test_a_library_linked_for_another_cpu_than_the_target_is_refused(session: Session, tmp_path: Path) -> None:
    host_cc = shutil.which("gcc") or shutil.which("cc")
    if host_cc is None:
        pytest.skip("no host C compiler")
    wrong = emulation.CrossToolchain(session.toolchain.arch, host_cc, "aarch64-linux-gnu")
    with pytest.raises(EmulationError, match=rf"mlp\.so: linked for {emulation.host_arch()}, not aarch64"):
        emulation.export_cross(session.cases["mlp"].host_executable, tmp_path / "mlp.so", wrong)
    (tmp_path / "notes.so").write_text("not a library")
    with pytest.raises(EmulationError, match="notes.so: not an ELF file"):
        emulation.elf_machine(tmp_path / "notes.so")


# --- emulated runs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_emulated_outputs_of_the_examples_match_onnx_runtime(session: Session, name: str) -> None:
    case = session.cases[name]
    assert case.run is not None and case.run.error is None, case.run and case.run.error
    assert len(case.run.outputs) == 2, "every input set ran"
    report = _numerics(case.run.outputs, case)
    assert report.passed, report.message
    assert report.vacuous is None


def test_a_cast_out_of_int32_range_passes_on_x86_and_fails_only_on_aarch64(session: Session) -> None:
    case = session.cases["cast"]
    on_host = _numerics(case.host_outputs, case)
    assert on_host.passed, on_host.message
    assert on_host.vacuous is None
    assert case.run is not None and case.run.error is None, case.run.error
    emulated = _numerics(case.run.outputs, case)
    assert not emulated.passed
    assert "output 'y'" in emulated.message and "TVM 255.0" in emulated.message, emulated.message
    # Exactly the elements whose x * 1e10 exceeds int32 (2**31): 255 on aarch64, 0 on x86 and in ONNX Runtime.
    x = case.input_sets[0]["x"]
    differs = case.run.outputs[0][0] != case.expected[0][0]
    assert np.array_equal(differs, x.astype(np.float64) * 1e10 >= 2**31)


def test_a_model_failing_under_emulation_names_its_error_and_the_others_still_run(session: Session) -> None:
    mlp, cnn = session.cases["mlp"], session.cases["cnn"]
    wrong = [{"input": np.zeros((1, 255), np.float32)}]
    bad, good = session.emulator.run_many([EmulatedModel(mlp.library, wrong, mlp.names),
                                           EmulatedModel(cnn.library, cnn.input_sets[:1], cnn.names)])
    assert bad.error is not None and "input" in bad.error and "256" in bad.error, bad.error
    assert good.error is None
    assert measure.compare_sets(good.outputs, cnn.expected[:1], cnn.output_names, ATOL, RTOL).passed
    with pytest.raises(EmulationError, match=r"mlp\.aarch64\.so: .*256"):
        session.emulator.run(mlp.library, wrong, mlp.names)


def test_a_library_that_crashes_the_emulated_process_fails_alone(session: Session, tmp_path: Path) -> None:
    cnn = session.cases["cnn"]
    broken = tmp_path / "cut.aarch64.so"
    broken.write_bytes(cnn.library.read_bytes()[:4096])
    bad, good = session.emulator.run_many([EmulatedModel(broken, cnn.input_sets[:1], cnn.names),
                                           EmulatedModel(cnn.library, cnn.input_sets[:1], cnn.names)])
    assert bad.library == broken
    assert bad.error is not None and bad.error.startswith("the emulated process crashed while loading or running it: qemu"), \
        bad.error
    assert good.error is None and len(good.outputs[0]) == 1
    with pytest.raises(EmulationError, match=r"cut\.aarch64\.so: the emulated process crashed"):
        session.emulator.run(broken, cnn.input_sets[:1], cnn.names)


def test_the_emulated_runtime_is_cached_by_tvm_version_and_not_fetched_again(session: Session,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    key = emulation.runtime_key(session.toolchain.arch)
    assert key.startswith("aarch64-tvm0.27.0.post1-ffi0.1.14.post0-runner")
    assert (CACHE / key / "emulation_runner").is_file()
    assert not list((CACHE / key).glob("**/*.whl")), "the 100 MB wheels are not kept"

    def no_download(*_args: object) -> None:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(emulation, "_download_wheels", no_download)
    start = time.monotonic()
    runtime = Emulator(session.toolchain, CACHE).runtime()
    assert time.monotonic() - start < 1.0
    assert emulation.elf_machine(runtime.runner) == "aarch64"
    assert emulation.elf_machine(runtime.lib_dir / "libtvm_runtime.so") == "aarch64"


# --- toolchains -------------------------------------------------------------------------------------


def test_native_and_gpu_targets_need_no_cross_toolchain() -> None:
    assert emulation.cross_toolchain({"kind": "llvm", "mcpu": "znver3"}) is None
    assert emulation.cross_toolchain({"kind": "llvm", "mtriple": f"{emulation.host_arch()}-linux-gnu"}) is None
    assert emulation.cross_toolchain({"kind": "cuda", "arch": "sm_90"}) is None
    assert emulation.is_foreign(ARM) == (emulation.host_arch() != "aarch64")


@needs_arm_host
def test_an_architecture_without_a_known_toolchain_is_named() -> None:
    with pytest.raises(EmulationError, match="'riscv64-linux-gnu'.*only for aarch64"):
        emulation.cross_toolchain({"kind": "llvm", "mtriple": "riscv64-linux-gnu"})
    with pytest.raises(EmulationError, match="'aarch64-apple-darwin'.*only Linux"):
        emulation.cross_toolchain({"kind": "llvm", "mtriple": "aarch64-apple-darwin"})


@needs_arm_host
def test_a_missing_cross_compiler_names_the_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no tools at all
    with pytest.raises(MissingToolError) as raised:
        emulation.cross_toolchain(ARM)
    assert raised.value.package == "gcc-aarch64-linux-gnu"
    assert "aarch64-linux-gnu-gcc" in str(raised.value) and "apt-get install gcc-aarch64-linux-gnu" in str(raised.value)


@needs_arm_host
def test_missing_qemu_or_cross_g_plus_plus_name_their_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "aarch64-linux-gnu-gcc"  # a linker present, the emulation tools not
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    toolchain = emulation.cross_toolchain(ARM)
    assert toolchain is not None and toolchain.cc == str(fake)
    with pytest.raises(MissingToolError, match="qemu-aarch64.*apt-get install qemu-user"):
        toolchain.emulation_tools()
    with pytest.raises(MissingToolError, match="qemu-user"):
        Emulator(toolchain, tmp_path / "cache").run_many([])
    (tmp_path / "qemu-aarch64").symlink_to(fake)
    with pytest.raises(MissingToolError, match="aarch64-linux-gnu-g\\+\\+.*apt-get install g\\+\\+-aarch64-linux-gnu"):
        toolchain.emulation_tools()


def test_setup_script_is_quick_when_everything_is_installed() -> None:
    if not os.access("/usr/bin/apt-get", os.X_OK) or not all(
            shutil.which(t) for t in ("qemu-aarch64", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "file")):
        pytest.skip("the cross tools are not all installed here (tests/setup_cross.sh installs them)")
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "tests" / "setup_cross.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "installed" in proc.stdout and "installing" not in proc.stdout
    assert time.monotonic() - start < 5


def test_a_downloaded_wheel_cannot_write_outside_the_runtime_folder(tmp_path: Path) -> None:
    import zipfile

    from mlci.emulation import EmulationError, _extract_runtime

    wheel = tmp_path / "apache_tvm_ffi-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tvm_ffi/include/../../../escaped.txt", "planted")
        archive.writestr("tvm_ffi/lib/libtvm_ffi.so", "lib")
    with pytest.raises(EmulationError, match="outside"):
        _extract_runtime([wheel], tmp_path / "runtime" / "staging")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_the_emulated_runtime_gets_none_of_the_jobs_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """qemu-user is no sandbox: the downloaded runtime runs with what it needs only."""
    from mlci.emulation import emulation_env

    for name in ("GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_TOKEN", "ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
        monkeypatch.setenv(name, "s3cret")
    env = emulation_env(2)
    assert env["TVM_NUM_THREADS"] == "2" and "s3cret" not in env.values()


def test_a_downloaded_wheel_whose_bytes_are_not_the_pinned_ones_is_refused(tmp_path: Path) -> None:
    """A mirror or extra index serving another file under the pinned wheel's name never gets run under qemu."""
    from mlci.emulation import RUNTIME_WHEEL_SHA256, EmulationError, check_wheel_hashes

    name = next(n for n in RUNTIME_WHEEL_SHA256 if n.startswith("apache_tvm_ffi-"))
    planted = tmp_path / name
    planted.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: same name, other bytes
    with pytest.raises(EmulationError, match="is not the .* mlci ships for it"):
        check_wheel_hashes([planted])
    other = tmp_path / "apache_tvm_ffi-9.9.9-cp311-cp311-manylinux_2_28_aarch64.whl"
    other.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    with pytest.raises(EmulationError, match="ships no sha256 for this wheel"):
        check_wheel_hashes([other])
    check_wheel_hashes([planted], known={name: hashlib.sha256(planted.read_bytes()).hexdigest()})  # the right bytes pass
