"""What a model is fed and what its check proves: dims exporters write as -1, inputs mlci cannot
feed, real inputs from files, value rules, index inputs drawn across their table, a numerics check
that says when it proves nothing, and one that fails on a miscompiled build."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlci.config import InputRule, ModelConfig
from mlci.measure import compare_sets, input_dependence, make_inputs
from mlci.models import InputSpec, ModelError, check_input_memory, prepare_model
from mlci.pipeline import ModelSettings, Pipeline
from mlci.targets import ResolvedTarget, detect_host_target
from mlci.tuning import TuningCache

from .conftest import save, tiny_mlp


def _cfg(path: Path, **kw) -> ModelConfig:
    return ModelConfig(name=path.stem, path=path, key="models[0]", **kw)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "m", inputs, outputs, list(inits)),
                              opset_imports=[helper.make_opsetid("", 17)])
    return model


def _embedding(rows: int = 50, width: int = 8) -> onnx.ModelProto:
    """Token ids (int64, cast to int32 on the way, as exporters do) into an embedding table."""
    table = numpy_helper.from_array(np.random.default_rng(0).standard_normal((rows, width)).astype(np.float32), "E")
    return _model(
        [helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32),
         helper.make_node("Gather", ["E", "ids32"], ["y"], name="embed")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 16]),
         helper.make_tensor_value_info("rate", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, width])], [table])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    tmp = tmp_path_factory.mktemp("pipeline")
    return Pipeline(ResolvedTarget("cpu", detect_host_target()), TuningCache(tmp / "cache"), log_dir=tmp / "logs")


def _settings(pipeline: Pipeline, cfg: ModelConfig) -> ModelSettings:
    from mlci.config import parse_config

    config = parse_config(f'[[models]]\npath = "{cfg.path}"\n', cfg.path.parent / "mlci.toml")
    return ModelSettings.resolve(config, cfg, trials=0)


# --- shapes and types -----------------------------------------------------------------


def test_a_dim_stored_as_minus_one_is_dynamic_and_bound_from_the_config(tmp_path: Path, pipeline: Pipeline,
                                                                        caplog) -> None:
    path = save(tiny_mlp(batch=-1), tmp_path / "m.onnx")
    cfg = _cfg(path, inputs={"x": [4, 32]})
    with caplog.at_level(logging.INFO, logger="mlci"):
        prepared = prepare_model(cfg)
    assert prepared.inputs[0].shape == (4, 32)
    assert "dimension 0 is stored as -1: treated as dynamic" in caplog.text
    checked = pipeline.check(pipeline.compile(cfg, _settings(pipeline, cfg)), _settings(pipeline, cfg))
    assert checked.numerics.passed and not checked.numerics.vacuous  # it runs, and matches
    with pytest.raises(ModelError, match=r"input 'x' dimension 0 \(stored as -1\) is dynamic and has no binding"):
        prepare_model(_cfg(path))


def test_a_string_input_is_refused_by_name(tmp_path: Path) -> None:
    model = _model([helper.make_node("Identity", ["s"], ["t"])],
                   [helper.make_tensor_value_info("s", TensorProto.STRING, [1])],
                   [helper.make_tensor_value_info("t", TensorProto.STRING, [1])])
    with pytest.raises(ModelError) as err:
        prepare_model(_cfg(save(model, tmp_path / "s.onnx")))
    assert "input 's' is a STRING tensor" in str(err.value) and "object" not in str(err.value)


def test_inputs_that_cannot_fit_in_memory_are_refused_before_anything_is_allocated() -> None:
    specs = [InputSpec("image", (64, 3, 4096, 4096), np.dtype(np.float32))]
    with pytest.raises(ModelError) as err:
        check_input_memory(specs, ModelConfig(name="m", path=Path("m.onnx"), key="models[0]"), memory=8 << 30)
    assert "input 'image', shape [64, 3, 4096, 4096] of float32" in str(err.value)
    assert "12.0 GiB" in str(err.value) and "models[0].inputs" in str(err.value)


def test_a_model_with_external_weights_loads_and_its_hash_covers_them(tmp_path: Path) -> None:
    model = tiny_mlp(widths=(32, 64, 8))
    save(model, tmp_path / "big.onnx")
    onnx.save(onnx.load(tmp_path / "big.onnx"), tmp_path / "ext.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    prepared = prepare_model(_cfg(tmp_path / "ext.onnx", dims={"batch": 1}))
    assert prepared.external_data and prepared.weights_dir == tmp_path
    from mlci.measure import OrtModel

    reference = OrtModel.load(prepared.reference, 1, weights_dir=prepared.weights_dir)  # it finds its weights
    assert reference.run({"x": np.ones((1, 32), np.float32)})[0].shape == (1, 8)
    before = prepared.sha256
    data = bytearray((tmp_path / "ext.weights").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "ext.weights").write_bytes(bytes(data))
    assert prepare_model(_cfg(tmp_path / "ext.onnx", dims={"batch": 1})).sha256 != before
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(ModelError, match="ext.weights, which does not exist"):
        prepare_model(_cfg(tmp_path / "ext.onnx", dims={"batch": 1}))


# --- input values ---------------------------------------------------------------------


def test_integer_inputs_that_index_a_table_are_drawn_across_it(tmp_path: Path) -> None:
    prepared = prepare_model(_cfg(save(_embedding(rows=50), tmp_path / "e.onnx")))
    ids = next(s for s in prepared.inputs if s.name == "ids")
    assert ids.index_range == (0, 50)
    values = make_inputs(prepared.inputs, seed=0)["ids"]
    assert values.min() >= 0 and values.max() < 50 and len(np.unique(values)) > 5


def test_value_and_range_rules_shape_the_generated_inputs() -> None:
    specs = [
        InputSpec("rate", (1,), np.dtype(np.int64), InputRule(value=16000)),
        InputSpec("bytes", (4096,), np.dtype(np.uint8), InputRule(range=(0, 256))),
        InputSpec("audio", (4096,), np.dtype(np.float32), InputRule(range=(-1, 1))),
        InputSpec("noise", (4096,), np.dtype(np.float32), InputRule(range=(0, 6), distribution="normal")),
    ]
    values = make_inputs(specs, seed=0)
    assert values["rate"].tolist() == [16000]
    assert values["bytes"].min() == 0 and values["bytes"].max() == 255
    assert -1 <= values["audio"].min() < -0.9 and 0.9 < values["audio"].max() < 1
    assert 2.5 < values["noise"].mean() < 3.5 and 0 <= values["noise"].min() and values["noise"].max() <= 6
    assert np.array_equal(make_inputs(specs, seed=0)["audio"], values["audio"])  # seeded


def test_input_files_are_checked_name_shape_and_type(tmp_path: Path) -> None:
    path = save(_embedding(), tmp_path / "e.onnx")
    good = tmp_path / "good.npz"
    np.savez(good, ids=np.arange(16, dtype=np.int64).reshape(1, 16), rate=np.array([1.5]))  # float64 is cast
    prepared = prepare_model(_cfg(path, inputs_files=[good, good]))
    assert len(prepared.input_sets) == 2 and prepared.input_sets[0]["rate"].dtype == np.float32
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.zeros((1, 8), np.int64), rate=np.array([1], np.int64), extra=np.zeros(1))
    with pytest.raises(ModelError) as err:
        prepare_model(_cfg(path, inputs_files=[bad, tmp_path / "missing.npz"]))
    text = str(err.value)
    assert f"models[0].inputs_file {bad}: input 'ids' has shape [1, 8], the model is bound to [1, 16]" in text
    assert "input 'rate' is int64, the model takes float32" in text
    assert "array 'extra' is not an input of the model" in text
    assert "missing.npz: file not found" in text


# --- what numerics proves -------------------------------------------------------------


def test_outputs_that_do_not_depend_on_the_inputs_make_the_check_vacuous() -> None:
    constant = [np.full((1, 1000), 0.001, np.float32)]
    why = input_dependence([constant, [c.copy() for c in constant]], ["probs"], atol=1e-4, rtol=1e-3)
    assert why and "every element of every output is the same value" in why and "inputs_file" in why
    assert input_dependence([[np.zeros(3)], [np.array([0.0, 0.5, 0.0])]], ["y"], 1e-4, 1e-3) is None
    # changes smaller than the tolerance prove nothing either: a build ignoring its inputs would pass
    tiny = input_dependence([[np.arange(3.0)], [np.arange(3.0) + 1e-6]], ["y"], 1e-4, 1e-3)
    assert tiny and "no output (y) changes beyond atol 0.0001" in tiny
    report = compare_sets([constant, constant], [constant, constant], ["probs"], 1e-4, 1e-3)
    assert report.passed and report.vacuous and report.input_sets == 2


def test_a_failure_in_a_later_input_set_names_that_set() -> None:
    good, bad = [np.zeros(4)], [np.array([0.0, 0.0, 5.0, 0.0])]
    report = compare_sets([good, bad], [good, [np.zeros(4)]], ["y"], 1e-4, 1e-3)
    assert not report.passed and "index (2,)" in report.message and "(input set 2 of 2)" in report.message


def test_the_check_says_when_a_model_ignores_its_inputs(tmp_path: Path, pipeline: Pipeline) -> None:
    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "W")  # zero weights: y = bias
    bias = numpy_helper.from_array(np.full(4, 0.25, np.float32), "b")
    model = _model([helper.make_node("Gemm", ["x", "W", "b"], ["y"])],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [weight, bias])
    cfg = _cfg(save(model, tmp_path / "dead.onnx"))
    checked = pipeline.check(pipeline.compile(cfg, _settings(pipeline, cfg)), _settings(pipeline, cfg))
    assert checked.numerics.passed and checked.numerics.input_sets == 2
    assert checked.numerics.vacuous and "proves nothing" in checked.numerics.vacuous
    assert checked.numerics.info().vacuous == checked.numerics.vacuous


def test_a_miscompiled_build_fails_numerics_naming_output_index_and_values(tmp_path: Path, pipeline: Pipeline) -> None:
    cfg = _cfg(save(tiny_mlp(widths=(16, 32, 8)), tmp_path / "mlp.onnx"), dims={"batch": 2})
    settings = _settings(pipeline, cfg)
    prepared = pipeline.load(cfg)
    # The compiler "miscompiles": TVM imports a graph whose last weight has one column swapped
    # with another, while ONNX Runtime runs the file as given.
    w = next(t for t in prepared.folded.graph.initializer if t.name == "w1")
    array = numpy_helper.to_array(w).copy()
    array[:, [0, 5]] = array[:, [5, 0]]
    w.CopyFrom(numpy_helper.from_array(array, "w1"))
    compiled = pipeline.tune_and_build(pipeline.import_model(prepared), settings)
    numerics = pipeline.check(compiled, settings).numerics
    assert not numerics.passed and numerics.vacuous is None
    assert numerics.message.startswith("numerics mismatch: output 'fc1' at index (")
    assert "TVM " in numerics.message and "ONNX Runtime " in numerics.message
    index = numerics.message.split("at index (", 1)[1].split(")", 1)[0]
    assert index.split(", ")[1] in ("0", "5")  # the swapped columns
