"""What compiling does to a model on CPU: constants folded as Relax folds them, convolutions padded to channels that tile."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlci import compile as tvm_compile
from mlci.config import ModelConfig
from mlci.models import prepare_model
from mlci.pipeline import ModelSettings, Pipeline
from mlci.targets import ResolvedTarget, detect_host_target, tvm_target_object
from mlci.tuning import TuningCache

from .conftest import save


def _example(name: str) -> onnx.ModelProto:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    try:
        import make_models
    finally:
        sys.path.pop(0)
    return getattr(make_models, name)()


def _classifier_head(classes: int) -> onnx.ModelProto:
    """SqueezeNet's last convolution: 512 channels of a 13x13 image to `classes` scores per pixel."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array((rng.standard_normal((classes, 512, 1, 1)) * 0.05).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512, 13, 13])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, classes, 13, 13])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_output_channels_are_padded_only_where_little_work_is_added() -> None:
    assert tvm_compile.padded_channels(1000) == 1024  # 2.4% more work
    assert tvm_compile.padded_channels(200) == 224
    assert tvm_compile.padded_channels(64) == 64  # already a multiple
    assert tvm_compile.padded_channels(100) == 100  # 128 would be 28% more
    assert tvm_compile.padded_channels(10) == 10


@pytest.mark.slow
def test_a_1000_class_convolution_runs_on_1024_channels_with_the_same_numbers(tmp_path: Path) -> None:
    path = save(_classifier_head(1000), tmp_path / "head.onnx")
    pipeline = Pipeline(ResolvedTarget("cpu", detect_host_target()), TuningCache(tmp_path / "cache"),
                        log_dir=tmp_path / "logs")
    imported = pipeline.load_and_import(ModelConfig(name="head", path=path, key="models[0]"))
    (conv,) = [k for k in imported.kernels if "conv2d" in k.name]
    assert conv.flops == pytest.approx(2 * 13 * 13 * 512 * 1024, rel=0.01)
    settings = ModelSettings(trials=0)
    compiled = pipeline.tune_and_build(imported, settings)
    checked = pipeline.check(compiled, settings)
    assert checked.numerics.passed, checked.numerics.message
    assert [o.shape for o in checked.model.run(checked.inputs, checked.input_names)] == [(1, 1000, 13, 13)]


@pytest.mark.slow
def test_weight_layout_changes_fold_to_what_relax_folds(tmp_path: Path) -> None:
    """mlci's batched constant folding gives the module Relax's FoldConstant gives (weights transposed
    channels-last, biases reshaped), and leaves its input as it was."""
    import tvm_ffi
    from tvm import relax

    path = save(_example("cnn"), tmp_path / "cnn.onnx")
    prepared = prepare_model(ModelConfig(name="cnn", path=path, dims={"batch": 1}, key="models[0]"))
    with tvm_target_object(ResolvedTarget("cpu", detect_host_target())):
        mod = relax.transform.ConvertLayout(tvm_compile.CPU_CONV_LAYOUT)(tvm_compile.import_relax(prepared))
        mod = relax.transform.LegalizeOps()(mod)
        before = mod.clone()
        folded = tvm_compile.fold_constants(mod)
        relax_folded = relax.transform.DeadCodeElimination()(relax.transform.FoldConstant()(mod))
    assert not tvm_ffi.structural_equal(folded, before)  # there was something to fold
    assert tvm_ffi.structural_equal(folded, relax_folded)
    assert tvm_ffi.structural_equal(mod, before)


def test_a_build_failure_names_the_kernel_that_does_not_build_with_tvms_message(tmp_path: Path) -> None:
    """TVM's LLVM backend has no sinh (mlci converts ONNX's Sinh another way): built as TVM's own op,
    the kernel fails, and the message says which kernel and why, not the first line of a TVMScript dump."""
    from tvm import relax

    from mlci.models import ModelError

    pipeline = Pipeline(ResolvedTarget("cpu", detect_host_target()), TuningCache(tmp_path / "cache"),
                        log_dir=tmp_path / "logs")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((16,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            gv = bb.emit_output(bb.emit(relax.op.sinh(relax.op.add(x, relax.const(1.0)))))
        bb.emit_func_output(gv)
    with pytest.raises(ModelError) as failed:
        tvm_compile.build(bb.get(), pipeline.tvm_target, tvm_compile.empty_database(), pipeline.default_schedule)
    message = str(failed.value)
    assert failed.value.status == "compile_failed"
    assert "in kernel 'fused_add_tir_sinh" in message and "sinh" in message.split(":", 1)[1]
    assert "Metadata omitted" not in message and "@I.ir_module" not in message
