"""`mlci doctor --ops MODEL.onnx`: which operators a model uses and who converts each for TVM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from mlci.cli import app

from .conftest import save


def _mixed_model() -> onnx.ModelProto:
    """A Conv (TVM converts it), a Gelu from ONNX Runtime's contrib domain (TVM too), twice, and an
    operator of a domain nobody knows."""
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("FastGelu", ["c"], ["g1"], name="gelu1", domain="com.microsoft"),
        helper.make_node("FastGelu", ["g1"], ["g2"], name="gelu2", domain="com.microsoft"),
        helper.make_node("Frobnicate", ["g2"], ["y"], name="mystery", domain="my.domain"),
    ]
    graph = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1),
                                                   helper.make_opsetid("my.domain", 1)])


def _lstm() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, 32, 4)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 32, 8)).astype(np.float32), "R")
    graph = helper.make_graph([helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=8)], "lstm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 8])], [w, r])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _invoke(*args: str):
    return CliRunner().invoke(app, ["doctor", *args], env={"COLUMNS": "200"})


def test_ops_lists_each_operator_with_its_converter_and_fails_on_an_unsupported_one(tmp_path: Path) -> None:
    path = tmp_path / "mixed.onnx"
    onnx.save(_mixed_model(), path)  # unchecked: the checker refuses an unknown domain, users' files may not
    result = _invoke("--ops", str(path))
    assert result.exit_code == 1, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 3}
    assert "TVM" in lines["Conv"] and "TVM" in lines["com.microsoft.FastGelu"]
    assert " 2 " in lines["com.microsoft.FastGelu"]
    assert "unsupported" in lines["my.domain.Frobnicate"]
    assert "2 of 3 operators supported; unsupported: my.domain.Frobnicate" in result.output


def test_ops_names_mlci_converters_and_passes_when_all_are_supported(tmp_path: Path) -> None:
    result = _invoke("--ops", str(save(_lstm(), tmp_path / "lstm.onnx")))
    assert result.exit_code == 0, result.output
    assert "LSTM" in result.output and "mlci" in result.output
    assert "1 of 1 operators supported" in result.output


def test_ops_on_a_missing_or_broken_file_exits_2(tmp_path: Path) -> None:
    assert _invoke("--ops", str(tmp_path / "nope.onnx")).exit_code == 2
    (tmp_path / "bad.onnx").write_bytes(b"\x00garbage")
    result = _invoke("--ops", str(tmp_path / "bad.onnx"))
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output
