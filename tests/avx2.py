"""An AVX2-only x86 CPU (no AVX-512, no VNNI: the kind GitHub's hosted runners have) on whatever
x86 machine runs the tests.

- TVM: build for `AVX2_TARGET`; LLVM emits code for that `mcpu` alone, which runs here natively.
- ONNX Runtime picks its kernels at run time from CPUID, so it runs in a child process under
  `qemu-x86_64 -cpu Haswell` (Debian's qemu-user, which `tests/setup_cross.sh` installs): the
  emulated CPU reports AVX2 and no VNNI, and ONNX Runtime takes the kernels it takes there.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mlci.targets import usable_cores

AVX2_MCPU = "haswell"
AVX2_TARGET = {"kind": "llvm", "mcpu": AVX2_MCPU, "num-cores": usable_cores()}
"""A TVM target for an AVX2-only CPU (Intel's first AVX2 part; AMD's Zen 1-3 have the same vector
instructions for this purpose)."""

QEMU_CPU = "Haswell"

_CHILD = """
import sys, numpy as np, onnxruntime as ort
model, feeds, out = sys.argv[1:4]
options = ort.SessionOptions()
options.log_severity_level = 3
options.intra_op_num_threads = 1
session = ort.InferenceSession(open(model, "rb").read(), options, providers=["CPUExecutionProvider"])
with np.load(feeds) as f:
    inputs = {k: f[k] for k in f.files}
np.savez(out, *session.run(None, inputs))
"""


def onnxruntime_on_avx2(model: bytes, inputs: dict[str, np.ndarray], timeout: float = 300) -> list[np.ndarray]:
    """ONNX Runtime's outputs for `model` as an AVX2-only CPU computes them (about 5-10 s: the
    Python interpreter and ONNX Runtime start under emulation)."""
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: run `bash tests/setup_cross.sh` (Debian's qemu-user) to install it"
    with tempfile.TemporaryDirectory(prefix="mlci-avx2-") as tmp:
        root = Path(tmp)
        (root / "model.onnx").write_bytes(model)
        np.savez(root / "inputs.npz", **inputs)
        proc = subprocess.run(
            [qemu, "-cpu", QEMU_CPU, sys.executable, "-c", _CHILD, str(root / "model.onnx"), str(root / "inputs.npz"),
             str(root / "outputs.npz")], capture_output=True, text=True, timeout=timeout)
        errors = [line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line]
        assert proc.returncode == 0, "ONNX Runtime under qemu-x86_64 failed:\n" + "\n".join(errors[-20:])
        with np.load(root / "outputs.npz") as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]
