"""`mlci doctor` reports versions and proves tuning works on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_doctor_proves_tuning_works() -> None:
    proc = subprocess.run([sys.executable, "-m", "mlci.cli", "doctor"], capture_output=True, text=True,
                          timeout=600, env={**__import__("os").environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in ("apache-tvm", "apache-tvm-ffi", "LLVM", "onnxruntime", "mlflow", "host target", "GPU visible"):
        assert name in out
    assert "0.27.0" in out and "'kind': 'llvm'" in out
    assert "candidates built and ran" in out
    assert " 0 of " not in out
