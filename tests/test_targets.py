"""Targets: host detection, TVM Target JSON, fingerprints, a CUDA target on a machine with no GPU."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlci.config import TargetConfig
from mlci.targets import environment_fingerprint, fingerprint_hash, resolve_target
from mlci.tuning import cache_directory

from .conftest import save, tiny_mlp, write_config


def test_host_target_is_detected() -> None:
    host = resolve_target(TargetConfig(name="cpu"))
    assert host.tvm_target["kind"] == "llvm"
    assert host.tvm_target["num-cores"] >= 1
    assert "mcpu" in host.tvm_target


def test_fingerprint_names_hardware_and_toolchain() -> None:
    fp = environment_fingerprint(resolve_target(TargetConfig(name="cpu"))).as_dict()
    assert {"cpu", "cores", "gpu", "driver", "tvm", "tvm_ffi", "llvm", "onnxruntime", "hash"} <= set(fp)
    assert fp["tvm"].startswith("0.27") and fp["tvm_ffi"] == "0.1.14.post0"
    assert fp["cpu"] and fp["cores"] >= 1 and fp["hash"]
    assert fp["hash"] == fingerprint_hash(fp)
    other = {**fp, "cpu": "another CPU"}
    assert fingerprint_hash(other) != fp["hash"]
    assert fingerprint_hash({**fp, "threads": fp["threads"] + 1}) != fp["hash"]


def test_records_tuned_on_another_thread_count_live_in_another_cache() -> None:
    fp = environment_fingerprint(resolve_target(TargetConfig(name="cpu")))
    assert fp.threads == resolve_target(TargetConfig(name="cpu")).tvm_target["num-cores"]
    one, two = dataclasses.replace(fp, threads=1), dataclasses.replace(fp, threads=2)
    assert cache_directory(Path("c"), "cpu", one) != cache_directory(Path("c"), "cpu", two)


def test_invalid_tvm_target_is_a_config_error(tmp_path: Path) -> None:
    save(tiny_mlp(), tmp_path / "m.onnx")
    path = write_config(tmp_path, """
        [targets.bad]
        tvm = { kind = "no-such-kind" }
        [[models]]
        path = "m.onnx"
        dims = { batch = 1 }
    """)
    proc = subprocess.run([sys.executable, "-m", "mlci.cli", "run", "-c", str(path), "--no-tracking"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "targets.bad.tvm: TVM rejects this target" in proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile CUDA code")
def test_a_cuda_target_on_a_cpu_runner_is_compiled_not_failed(tmp_path: Path) -> None:
    """The portability gate without a GPU: the build and its library are made, nothing is run or timed."""
    save(tiny_mlp(), tmp_path / "m.onnx")
    write_config(tmp_path, """
        [targets.gpu-cuda]
        tvm = { kind = "cuda", arch = "sm_80" }
        [[models]]
        path = "m.onnx"
        dims = { batch = 1 }
    """)
    proc = subprocess.run([sys.executable, "-m", "mlci.cli", "run", "--no-tracking"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    results = json.loads((tmp_path / ".mlci/results/gpu-cuda.json").read_text())
    model = results["models"][0]
    assert proc.returncode == 0, proc.stderr
    assert model["status"] == "ok"
    if results["target"]["execution"] == "native":  # a GPU is visible after all: it was tuned, checked and measured
        return
    assert results["target"]["execution"] == "compile_only"
    assert results["target"]["execution_note"] == "no cuda device on this runner: compiled, not run"
    assert model["latency_ms"] is None and model["numerics"] is None and model["peer"] is None
    assert model["compile"]["seconds"] > 0  # it did compile: a target that stops compiling is caught here
    assert (tmp_path / ".mlci/work/gpu-cuda/m/m.so").exists()
