"""Loading, shape binding, folding and import of real ONNX files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mlci.config import ModelConfig
from mlci.models import ModelError, prepare_model
from mlci.pipeline import Pipeline
from mlci.targets import ResolvedTarget, detect_host_target
from mlci.tuning import TuningCache

from .conftest import REPO, attn_lstm_model, save, tiny_mlp


def _cfg(path: Path, **kw) -> ModelConfig:
    return ModelConfig(name=path.stem, path=path, key="models[0]", **kw)


@pytest.fixture
def pipeline(tmp_path: Path) -> Pipeline:
    return Pipeline(ResolvedTarget("cpu", detect_host_target()), TuningCache(tmp_path / "cache"), log_dir=tmp_path / "logs")


def test_unbound_dynamic_dimension_is_named(tmp_path: Path) -> None:
    path = save(tiny_mlp(), tmp_path / "m.onnx")
    with pytest.raises(ModelError) as err:
        prepare_model(_cfg(path))
    assert err.value.status == "import_failed"
    assert "input 'x' dimension 0 ('batch') is dynamic and has no binding" in str(err.value)
    assert "models[0].dims.batch" in str(err.value)


def test_dims_and_inputs_bind_shapes(tmp_path: Path) -> None:
    path = save(tiny_mlp(), tmp_path / "m.onnx")
    by_dim = prepare_model(_cfg(path, dims={"batch": 3}))
    by_input = prepare_model(_cfg(path, inputs={"x": [3, 32]}))
    assert by_dim.inputs[0].shape == by_input.inputs[0].shape == (3, 32)
    assert by_dim.sha256 == by_input.sha256 and len(by_dim.sha256) == 64


def test_config_input_that_contradicts_the_model(tmp_path: Path) -> None:
    path = save(tiny_mlp(), tmp_path / "m.onnx")
    with pytest.raises(ModelError) as err:
        prepare_model(_cfg(path, inputs={"x": [1, 99], "y": [1]}))
    assert "models[0].inputs.x: dimension 1 is fixed to 32 in the model, the config gives 99" in str(err.value)
    assert "models[0].inputs.y: the model has no input 'y'" in str(err.value)


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelError, match="not a valid ONNX model"):
        prepare_model(_cfg(path))


def test_an_unsupported_operator_is_reported_with_its_node_name(tmp_path: Path, pipeline: Pipeline) -> None:
    path = save(attn_lstm_model(), tmp_path / "lstm.onnx")
    prepared = pipeline.load(_cfg(path))  # ONNX Runtime can load it ...
    with pytest.raises(ModelError) as err:  # ... neither TVM nor mlci converts it
        pipeline.import_model(prepared)
    assert err.value.status == "import_failed"
    assert "com.microsoft.AttnLSTM (node 'encoder/lstm_1')" in str(err.value)


def test_runtime_reshape_is_folded_so_tvm_imports_it(tmp_path: Path, pipeline: Pipeline) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import make_models
    finally:
        sys.path.pop(0)
    path = save(make_models.cnn(), tmp_path / "cnn.onnx")
    prepared = pipeline.load(_cfg(path, dims={"batch": 1}))
    assert "Shape" not in {n.op_type for n in prepared.folded.graph.node}
    imported = pipeline.import_model(prepared)
    assert "main" in [gv.name_hint for gv in imported.mod.get_global_vars()]
    assert imported.kernels  # convolutions and the dense layer, for MetaSchedule


def test_ir3_zoo_model_weights_become_constants() -> None:
    import onnx

    zoo = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    prepared = prepare_model(ModelConfig(name="sq", path=zoo, key="models[0]"))
    assert [s.name for s in prepared.inputs] == ["data_0"]
    assert [i.name for i in prepared.folded.graph.input] == ["data_0"]


def test_unnamed_nodes_get_names_saying_their_op_without_taking_a_name_the_model_uses(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="Relu_0"),
             helper.make_node("Sigmoid", ["b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    prepared = prepare_model(_cfg(path))
    names = sorted(node.name for node in prepared.folded.graph.node)
    assert len(set(names)) == len(names) == 3 and "Relu_0" in names
    assert all(name.startswith(("Relu_", "Sigmoid_")) for name in names)
