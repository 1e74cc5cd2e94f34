"""`mlci doctor`: can this machine compile, tune and measure? Versions, target, GPU, a tuning proof."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from mlci.targets import ResolvedTarget


@dataclass
class Check:
    name: str
    value: str
    ok: bool = True


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def tiny_matmul_model(n: int = 64):
    """A one-node ONNX MatMul with a constant weight: a single, quick tuning task."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((n, n), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def tuning_proof(trials: int = 4) -> Check:
    """Tune a tiny kernel for real through mlci's pipeline; say how many candidates built and ran."""
    import onnx

    from mlci.config import ModelConfig
    from mlci.pipeline import ModelSettings, Pipeline
    from mlci.targets import detect_host_target
    from mlci.tuning import TuningCache

    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mlci-doctor-") as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(tiny_matmul_model(), path)
        pipeline = Pipeline(ResolvedTarget("host", detect_host_target()), TuningCache(Path(tmp) / "cache"),
                            log_dir=Path(tmp) / "logs")
        settings = ModelSettings(trials=trials, seconds=120, trials_per_round=trials)
        imported = pipeline.load_and_import(ModelConfig(name="matmul", path=path, key="doctor"))
        outcome = pipeline.tune(imported, settings)
    seconds = time.monotonic() - start
    ok = outcome.trials_valid_new > 0
    return Check(
        "tuning works",
        f"{outcome.trials_valid_new} of {outcome.trials_new} candidates built and ran "
        f"({len(imported.kernels)} kernel, {seconds:.1f} s)",
        ok,
    )


def threads_check(target: ResolvedTarget) -> Check:
    """The threads `mlci run` gives TVM's runtime, its tuning runner and ONNX Runtime on this target,
    as TVM reports them in this process."""
    from mlci.measure import use_threads

    wanted = target.threads
    got = use_threads(wanted)
    return Check("threads", f"{got} (TVM runtime, tuning runner and ONNX Runtime; the target's num-cores is {wanted})",
                 got == wanted)


class OperatorsError(Exception):
    """A model file `doctor --ops` cannot read."""


def model_operators(path: Path) -> list:
    """Every operator of an ONNX file (subgraphs included), with how many nodes use it and who
    converts it for TVM: "tvm" (its importer), "mlci" (mlci's converters) or None (nobody)."""
    import onnx

    from mlci.converters import operator_uses

    try:
        model = onnx.load(str(path), load_external_data=False)  # operators only: weights stay on disk
    except FileNotFoundError:
        raise OperatorsError(f"{path}: file not found") from None
    except Exception as exc:  # protobuf and onnx raise unrelated types for a damaged file
        raise OperatorsError(f"{path}: not a valid ONNX model: {exc}") from None
    return operator_uses(model)


def arm_emulation_check() -> Check:
    """Whether an aarch64 target can be cross-compiled and checked here without an Arm CPU (informational:
    only configs with such a target need it)."""
    from mlci import emulation

    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
    if not emulation.is_foreign(arm):
        return Check("Arm targets", "native (this CPU is aarch64)")
    try:
        toolchain = emulation.cross_toolchain(arm)
        assert toolchain is not None
        qemu, _ = toolchain.emulation_tools()
    except emulation.EmulationError as exc:
        return Check("Arm targets", f"not checkable here: {exc}")
    return Check("Arm targets", f"cross-compiled with {toolchain.cc}, numerics under {qemu}")


def run_checks(tune: bool = True) -> list[Check]:
    import tvm

    from mlci.targets import detect_host_target, llvm_version

    checks = [
        Check("mlci", _version("mlci")),
        Check("apache-tvm", tvm.__version__),
        Check("apache-tvm-ffi", _version("apache-tvm-ffi")),
        Check("LLVM", llvm_version() or "not built in", llvm_version() is not None),
        Check("onnx", _version("onnx")),
        Check("onnxruntime", _version("onnxruntime")),
        Check("mlflow", _version("mlflow")),
    ]
    try:
        host = ResolvedTarget("host", detect_host_target())
        checks.append(Check("host target", str(host.tvm_target)))
        checks.append(threads_check(host))
    except Exception as exc:
        checks.append(Check("host target", f"detection failed: {exc}", False))
    nvcc = shutil.which("nvcc")
    cuda_built = tvm.support.libinfo().get("USE_CUDA", "OFF") not in ("OFF", "", None)
    checks.append(
        Check("CUDA compilation", f"possible (nvcc at {nvcc})" if nvcc and cuda_built else
              ("no nvcc on PATH" if cuda_built else "TVM built without CUDA"))
    )
    gpu_visible = tvm.cuda(0).exist
    checks.append(Check("GPU visible", tvm.cuda(0).device_name if gpu_visible else "no"))
    checks.append(arm_emulation_check())
    if tune:
        try:
            checks.append(tuning_proof())
        except Exception as exc:
            checks.append(Check("tuning works", f"failed: {type(exc).__name__}: {exc}", False))
    return checks
