"""LSTM, GRU, RNN and ONNX Runtime's DynamicQuantizeLSTM, imported by mlci's converters, compiled
by TVM and run against ONNX Runtime on the same inputs. Each model holds many nodes (one per case,
outputs named after it) so that one compile checks them all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlci import compile as tvm_compile
from mlci import converters, measure
from mlci.config import ModelConfig
from mlci.models import InputSpec, ModelError, PreparedModel, prepare_model
from mlci.pipeline import ModelSettings, Pipeline
from mlci.targets import ResolvedTarget, detect_host_target
from mlci.tuning import TuningCache

from .avx2 import AVX2_TARGET, onnxruntime_on_avx2
from .conftest import save

SEQ, BATCH, INPUT, HIDDEN = 4, 3, 3, 4
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
STATES = {"LSTM": ("Y", "Y_h", "Y_c"), "GRU": ("Y", "Y_h"), "RNN": ("Y", "Y_h")}
ATOL, RTOL = 1e-5, 1e-4


class Graph:
    """Recurrent nodes on shared graph inputs X [SEQ, BATCH, INPUT] (batch first with layout 1),
    `lens` and `lens0` (int32 sequence lengths) and bidirectional initial states `h0`, `c0`."""

    def __init__(self, seed: int = 0, layout: int = 0, twin: bool = False):
        self.rng = np.random.default_rng(seed)
        self.layout, self.twin = layout, twin
        """`twin`: a layout-1 graph written as layout-0 nodes between Transposes (ONNX Runtime runs
        only layout 0)."""
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        batch_first = layout == 1
        self.inputs = [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, [BATCH, SEQ, INPUT] if batch_first else [SEQ, BATCH, INPUT]),
            helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]),
            helper.make_tensor_value_info("lens0", TensorProto.INT32, [BATCH]),
            *[helper.make_tensor_value_info(s, TensorProto.FLOAT, [BATCH, 2, HIDDEN] if batch_first else [2, BATCH, HIDDEN])
              for s in ("h0", "c0")],
        ]
        if twin:
            for name in ("X", "h0", "c0"):
                self.nodes.append(helper.make_node("Transpose", [name], [f"{name}_t"], perm=[1, 0, 2]))

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def random(self, name: str, *shape: int, scale: float = 0.6) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * scale).astype(np.float32))

    def node(self, name: str, op: str, direction: str = "forward", bias: bool = True, lens: str = "",
             initial: str = "", peepholes: bool = False, outputs: tuple[str, ...] | None = None, **attrs) -> None:
        """One node named `name`; its outputs are graph outputs `name.Y`, `name.Y_h`, ... (those in
        `outputs`, "" for an omitted one). `lens`: a graph input's name, or comma-separated constant
        lengths. `initial`: "const" (random initializers) or "input" (h0, c0)."""
        dirs = 2 if direction == "bidirectional" else 1
        gates = GATES[op]
        inputs = [self._input("X"), self.random(f"{name}.W", dirs, gates * HIDDEN, INPUT),
                  self.random(f"{name}.R", dirs, gates * HIDDEN, HIDDEN)]
        inputs.append(self.random(f"{name}.B", dirs, 2 * gates * HIDDEN, scale=0.3) if bias else "")
        if lens and lens[0].isdigit():
            lens = self.const(f"{name}.lens", np.array([int(n) for n in lens.split(",")], np.int32))
        inputs.append(lens)
        for state in ("h0", "c0")[:2 if op == "LSTM" else 1]:
            if initial == "const":
                shape = (BATCH, dirs, HIDDEN) if self.layout == 1 else (dirs, BATCH, HIDDEN)
                value = (self.rng.standard_normal(shape) * 0.5).astype(np.float32)
                inputs.append(self.const(f"{name}.{state}", value.transpose(1, 0, 2) if self.twin else value))
            elif initial == "input":
                assert dirs == 2, "h0 and c0 are bidirectional states"
                inputs.append(self._input(state))
            else:
                inputs.append("")
        if peepholes:
            inputs.append(self.random(f"{name}.P", dirs, 3 * HIDDEN, scale=0.3))
        while inputs[-1] == "":
            inputs.pop()
        wanted = outputs if outputs is not None else STATES[op]
        names = [f"{name}.{o}" if o else "" for o in wanted]
        if self.layout == 1 and not self.twin:
            attrs["layout"] = 1
        node_outputs = [f"{n}_t" if n else "" for n in names] if self.twin else names
        self.nodes.append(helper.make_node(op, inputs, node_outputs, name=name, hidden_size=HIDDEN,
                                           direction=direction, **attrs))
        if self.twin:
            for out, n in zip(wanted, names):
                if n:
                    perm = [2, 0, 1, 3] if out == "Y" else [1, 0, 2]
                    self.nodes.append(helper.make_node("Transpose", [f"{n}_t"], [n], perm=perm))
        for out, n in zip(wanted, names):
            if n:
                self.outputs.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, self._shape(out, dirs)))

    def _input(self, name: str) -> str:
        return f"{name}_t" if self.twin else name

    def _shape(self, output: str, dirs: int) -> list[int]:
        if self.layout == 1:
            return [BATCH, SEQ, dirs, HIDDEN] if output == "Y" else [BATCH, dirs, HIDDEN]
        return [SEQ, dirs, BATCH, HIDDEN] if output == "Y" else [dirs, BATCH, HIDDEN]

    def model(self, opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "recurrent", self.inputs, self.outputs, self.initializers)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def feeds(seed: int = 1, layout: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x_shape = (BATCH, SEQ, INPUT) if layout == 1 else (SEQ, BATCH, INPUT)
    state_shape = (BATCH, 2, HIDDEN) if layout == 1 else (2, BATCH, HIDDEN)
    return {
        "X": rng.standard_normal(x_shape).astype(np.float32),
        "lens": np.array([3, 4, 1], np.int32),
        "lens0": np.array([0, 4, 2], np.int32),  # a row of length 0: its final states are zero
        "h0": (rng.standard_normal(state_shape) * 0.5).astype(np.float32),
        "c0": (rng.standard_normal(state_shape) * 0.5).astype(np.float32),
    }


def _pipeline(tmp: Path, tvm_target: dict | None = None) -> Pipeline:
    return Pipeline(ResolvedTarget("cpu", tvm_target or detect_host_target()), TuningCache(tmp / "cache"),
                    log_dir=tmp / "logs")


def compiled_outputs(pipeline: Pipeline, prepared: PreparedModel, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """mlci's chain from import on: the converters, TVM's build with default schedules, the VM."""
    compiled = pipeline.tune_and_build(pipeline.import_model(prepared), ModelSettings(trials=0))
    return pipeline.load_on_device(compiled).run(inputs, [s.name for s in prepared.inputs])


@dataclasses.dataclass
class Outputs:
    names: list[str]
    tvm: list[np.ndarray]
    ort: list[np.ndarray]

    def check(self, prefix: str, atol: float = ATOL, rtol: float = RTOL) -> list[str]:
        """Compare the outputs of the nodes whose names start with `prefix`; returns their names."""
        picked = [i for i, n in enumerate(self.names) if n.startswith(prefix)]
        assert picked, f"no output starts with {prefix!r}"
        report = measure.compare_outputs([self.tvm[i] for i in picked], [self.ort[i] for i in picked],
                                         [self.names[i] for i in picked], atol, rtol)
        assert report.passed, report.message
        return [self.names[i] for i in picked]


def variants_model() -> onnx.ModelProto:
    g = Graph()
    # LSTM
    g.node("lstm.forward.peepholes.const_lens_with_0", "LSTM", lens="3,0,2", initial="const", peepholes=True)
    g.node("lstm.reverse.clip.input_forget.lens0", "LSTM", direction="reverse", lens="lens0", initial="const",
           clip=0.7, input_forget=1)
    g.node("lstm.bidirectional.activations.no_bias.full_const_lens.Y_h_only", "LSTM", direction="bidirectional",
           bias=False, lens="4,4,4", initial="input", outputs=("", "Y_h"),
           activations=["HardSigmoid", "LeakyRelu", "Elu", "Sigmoid", "Softsign", "Softplus"],
           activation_alpha=[0.3, 0.05, 0.7], activation_beta=[0.4])
    g.node("lstm.bidirectional.peepholes.lens", "LSTM", direction="bidirectional", lens="lens", initial="input",
           peepholes=True, outputs=("Y", "", "Y_c"))
    # GRU
    g.node("gru.forward.const_lens_with_0", "GRU", lens="3,0,2", initial="const")
    g.node("gru.reverse.linear_before_reset.clip.lens0", "GRU", direction="reverse", lens="lens0", initial="const",
           linear_before_reset=1, clip=0.8)
    g.node("gru.bidirectional.linear_before_reset.activations", "GRU", direction="bidirectional",
           linear_before_reset=1, outputs=("Y",), activations=["ScaledTanh", "Affine", "ThresholdedRelu", "Relu"],
           activation_alpha=[0.5, 0.8, 0.2, 0.9], activation_beta=[0.6, 0.1])
    g.node("gru.bidirectional.no_bias.lens", "GRU", direction="bidirectional", bias=False, lens="lens",
           initial="input")
    # RNN
    g.node("rnn.forward.relu.lens", "RNN", lens="lens", initial="const", activations=["Relu"])
    g.node("rnn.reverse.leakyrelu.clip.const_lens_with_0", "RNN", direction="reverse", lens="3,0,2",
           activations=["LeakyRelu"], activation_alpha=[0.2], clip=0.9)
    # alphas go to the activations that take one: Tanh takes none, Elu the first
    g.node("rnn.bidirectional.alpha_to_the_activation_taking_it.lens0", "RNN", direction="bidirectional",
           lens="lens0", initial="input", activations=["Tanh", "Elu"], activation_alpha=[0.7, 0.3])
    return g.model(opset=22)


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Outputs:
    tmp = tmp_path_factory.mktemp("variants")
    path = save(variants_model(), tmp / "variants.onnx")
    pipeline = _pipeline(tmp)
    prepared = pipeline.load(ModelConfig(name="variants", path=path, key="models[0]"))
    inputs = feeds()
    reference = measure.OrtModel.load(prepared.original, 1)
    return Outputs(reference.output_names, compiled_outputs(pipeline, prepared, inputs), reference.run(inputs))


def test_mlci_converts_the_recurrent_operators() -> None:
    for domain, op in [("", "LSTM"), ("", "GRU"), ("", "RNN"), ("com.microsoft", "DynamicQuantizeLSTM")]:
        assert converters.provider(domain, op) == "mlci"


@pytest.mark.slow
def test_lstm_matches_onnx_runtime_in_every_direction_with_every_optional_input(variants: Outputs) -> None:
    checked = variants.check("lstm.")
    # a node whose outputs are omitted (an empty name) has just the others
    assert [n for n in checked if n.startswith("lstm.bidirectional.activations.")] == [
        "lstm.bidirectional.activations.no_bias.full_const_lens.Y_h_only.Y_h"]
    assert [n for n in checked if n.startswith("lstm.bidirectional.peepholes.")] == [
        "lstm.bidirectional.peepholes.lens.Y", "lstm.bidirectional.peepholes.lens.Y_c"]


@pytest.mark.slow
def test_gru_matches_onnx_runtime_with_and_without_linear_before_reset(variants: Outputs) -> None:
    variants.check("gru.")


@pytest.mark.slow
def test_rnn_matches_onnx_runtime(variants: Outputs) -> None:
    variants.check("rnn.")


@pytest.mark.slow
def test_steps_past_a_rows_length_output_zeros_and_leave_its_state(variants: Outputs) -> None:
    """sequence_lens as a constant and as a graph input: the outputs ONNX Runtime gives, and zeros
    in Y where a row has ended (row 1 of the constant lengths 3,0,2 never starts)."""
    variants.check("lstm.forward.peepholes.const_lens_with_0")
    y = variants.tvm[variants.names.index("lstm.forward.peepholes.const_lens_with_0.Y")]
    assert not y[:, :, 1].any() and not y[3:, :, 0].any() and not y[2:, :, 2].any() and y[:2, :, 2].all()
    y_h = variants.tvm[variants.names.index("lstm.forward.peepholes.const_lens_with_0.Y_h")]
    assert not y_h[:, 1].any()
    assert np.array_equal(y_h[0, 0], y[2, 0, 0])  # the last step row 0 ran


def _layout_models() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The same nodes batch first (layout 1), and as ONNX Runtime can run them: layout 0 between
    Transposes."""
    models = []
    for twin in (False, True):
        g = Graph(seed=5, layout=1, twin=twin)
        g.node("lstm.bidirectional.peepholes.lens", "LSTM", direction="bidirectional", lens="lens",
               initial="input", peepholes=True)
        g.node("gru.forward.linear_before_reset", "GRU", initial="const", linear_before_reset=1)
        g.node("rnn.reverse.lens0", "RNN", direction="reverse", lens="lens0", initial="const")
        models.append(g.model(opset=14))
    return models[0], models[1]


def _prepared_as_is(model: onnx.ModelProto, twin: onnx.ModelProto, tmp: Path) -> PreparedModel:
    """`model` as mlci would import it, for a model ONNX Runtime cannot load (so cannot fold):
    prepared from a twin it can load, then given the model itself."""
    prepared = prepare_model(ModelConfig(name="twin", path=save(twin, tmp / "twin.onnx"), key="models[0]"))
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    inputs = [InputSpec(s.name, tuple(shapes[s.name]), s.dtype) for s in prepared.inputs]
    model.ir_version = 8
    return dataclasses.replace(prepared, folded=model, inputs=inputs)


@pytest.mark.slow
def test_batch_first_layout_matches_the_sequence_first_model(tmp_path: Path) -> None:
    """ONNX Runtime runs no layout-1 node (so mlci cannot check one against it); the converters
    take it, and give what the layout-0 twin gives."""
    batch_first, twin = _layout_models()
    prepared = _prepared_as_is(batch_first, twin, tmp_path)
    inputs = feeds(seed=2, layout=1)
    reference = measure.OrtModel.load(twin.SerializeToString(), 1)
    Outputs(reference.output_names, compiled_outputs(_pipeline(tmp_path), prepared, inputs),
            reference.run(inputs)).check("")


@pytest.mark.parametrize("attribute, value, message", [
    ("activations", ["Sigmoid", "Gelu", "Tanh"], "attribute 'activations': 'Gelu' is not one ONNX Runtime runs"),
    ("layout", 2, "attribute 'layout': 2 is neither 0"),
])
def test_an_attribute_value_it_cannot_convert_names_the_node_and_attribute(
        tmp_path: Path, attribute: str, value: object, message: str) -> None:
    def model(**attrs) -> onnx.ModelProto:
        g = Graph()
        g.node("encoder/lstm", "LSTM", **attrs)
        return g.model(opset=14)

    prepared = _prepared_as_is(model(**{attribute: value}), model(), tmp_path)
    with pytest.raises(ModelError) as err:
        tvm_compile.import_relax(prepared)
    assert err.value.status == "import_failed"
    assert f"LSTM node 'encoder/lstm': {message}" in str(err.value)


# --- DynamicQuantizeLSTM ----------------------------------------------------------------------

def _float_lstms(tmp: Path) -> Path:
    """What a user quantizes: a forward LSTM on one sequence of a constant length shorter than X,
    and a bidirectional one with peepholes on a batch of three of lengths given as an input, both
    with biases and initial states."""
    rng = np.random.default_rng(7)
    seq, inp, hidden = 5, 6, 8

    def t(name: str, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    nodes, inits, outputs = [], [], []
    for name, batch, direction, extra in [("one", 1, "forward", ["const_lens"]), ("batch", 3, "bidirectional", ["lens", "P"])]:
        dirs = 2 if direction == "bidirectional" else 1
        inits += [t(f"{name}.W", dirs, 4 * hidden, inp), t(f"{name}.R", dirs, 4 * hidden, hidden),
                  t(f"{name}.B", dirs, 8 * hidden, scale=0.2), t(f"{name}.h0", dirs, batch, hidden),
                  t(f"{name}.c0", dirs, batch, hidden)]
        lens = "lens" if "lens" in extra else ""
        if "const_lens" in extra:
            lens = f"{name}.lens"
            inits.append(numpy_helper.from_array(np.array([3], np.int32), lens))
        if "P" in extra:
            inits.append(t(f"{name}.P", dirs, 3 * hidden, scale=0.2))
        ins = [f"x_{name}", f"{name}.W", f"{name}.R", f"{name}.B", lens, f"{name}.h0", f"{name}.c0"]
        ins += [f"{name}.P"] if "P" in extra else []
        outs = [f"{name}.Y", f"{name}.Y_h", f"{name}.Y_c"]
        nodes.append(helper.make_node("LSTM", ins, outs, name=f"lstm_{name}", hidden_size=hidden, direction=direction))
        outputs += [helper.make_tensor_value_info(outs[0], TensorProto.FLOAT, [seq, dirs, batch, hidden])]
        outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [dirs, batch, hidden]) for o in outs[1:]]
    graph = helper.make_graph(nodes, "lstms", [
        helper.make_tensor_value_info("x_one", TensorProto.FLOAT, [seq, 1, inp]),
        helper.make_tensor_value_info("x_batch", TensorProto.FLOAT, [seq, 3, inp]),
        helper.make_tensor_value_info("lens", TensorProto.INT32, [3]),
    ], outputs, inits)
    return save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), tmp / "float.onnx")


def _quantized(tmp: Path) -> Path:
    """The float LSTMs quantized by ONNX Runtime's quantize_dynamic, with per-tensor weight scales
    and (a second copy, names prefixed) per-channel ones, as one model."""
    from onnxruntime.quantization import quantize_dynamic

    source = _float_lstms(tmp)
    parts = []
    for per_channel in (False, True):
        out = tmp / f"quantized_{per_channel}.onnx"
        quantize_dynamic(source, out, per_channel=per_channel)
        model = onnx.load(out)
        parts.append(onnx.compose.add_prefix(model, "channel_") if per_channel else model)
    merged = onnx.compose.merge_models(parts[0], parts[1], io_map=[])
    return save(merged, tmp / "quantized.onnx")


def _quantized_inputs(prepared: PreparedModel) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    inputs = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in prepared.inputs
              if s.dtype == np.float32}
    for lens in ("lens", "channel_lens"):
        inputs[lens] = np.array([5, 2, 4], np.int32)
    return inputs


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["host", "avx2"])
def test_dynamic_quantize_lstm_from_quantize_dynamic_matches_onnx_runtime(tmp_path: Path, cpu: str) -> None:
    """Built for this machine's CPU and for an AVX2-only one: integer products exact on both."""
    path = _quantized(tmp_path)
    model = onnx.load(path)
    ops = [(n.domain, n.op_type) for n in model.graph.node]
    assert ops.count(("com.microsoft", "DynamicQuantizeLSTM")) == 4 and ("", "LSTM") not in ops
    scales = {i.name: list(i.dims) for i in model.graph.initializer if i.name.endswith("W_scale")}
    assert sorted(scales.values()) == [[1], [1, 32], [2], [2, 32]]  # per direction, per output column

    pipeline = _pipeline(tmp_path, AVX2_TARGET if cpu == "avx2" else None)
    prepared = pipeline.load(ModelConfig(name="quantized", path=path, key="models[0]"))
    inputs = _quantized_inputs(prepared)
    # One thread: with more, ONNX Runtime quantizes each thread's share of the batch's hidden
    # states with its own range, and the results differ by quantization noise (a few 1e-3).
    reference = measure.OrtModel.load(prepared.reference, 1)
    Outputs(reference.output_names, compiled_outputs(pipeline, prepared, inputs), reference.run(inputs)).check("")


@pytest.mark.slow
def test_a_quantized_lstm_on_an_avx2_cpu_matches_mlcis_reference_not_the_saturated_file(tmp_path: Path) -> None:
    """ONNX Runtime on an AVX2-only CPU runs the file as written with saturated int8 products (by
    tenths here); the reference mlci hands it computes what TVM built for that CPU computes."""
    path = _quantized(tmp_path)
    pipeline = _pipeline(tmp_path, AVX2_TARGET)
    prepared = pipeline.load(ModelConfig(name="quantized", path=path, key="models[0]"))
    inputs = _quantized_inputs(prepared)
    tvm = compiled_outputs(pipeline, prepared, inputs)
    names = [o.name for o in onnx.load(path).graph.output]
    as_written = measure.compare_outputs(tvm, onnxruntime_on_avx2(prepared.original, inputs), names, ATOL, RTOL)
    assert not as_written.passed and as_written.max_abs_err > 0.05, as_written.message
    Outputs(names, tvm, onnxruntime_on_avx2(prepared.reference, inputs)).check("")


# --- the whole chain --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_bidirectional_lstm_model_compiles_and_passes_the_numerics_check(tmp_path: Path) -> None:
    """`Pipeline.compile` and `check` as `mlci run` calls them, on an opset-7 model whose batch is
    a named dimension the config binds."""
    rng = np.random.default_rng(11)
    hidden, inp = 16, 8
    inits = [numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)
             for name, shape in [("W", (2, 4 * hidden, inp)), ("R", (2, 4 * hidden, hidden)), ("B", (2, 8 * hidden))]]
    node = helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "y_h", "y_c"], name="encoder/lstm",
                            hidden_size=hidden, direction="bidirectional")
    graph = helper.make_graph([node], "encoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10, "batch", inp])], [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 2, "batch", hidden]),
        helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [2, "batch", hidden]),
        helper.make_tensor_value_info("y_c", TensorProto.FLOAT, [2, "batch", hidden]),
    ], inits)
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)]), tmp_path / "encoder.onnx")
    pipeline = _pipeline(tmp_path)
    settings = ModelSettings(trials=0)
    compiled = pipeline.compile(ModelConfig(name="encoder", path=path, dims={"batch": 2}, key="models[0]"), settings)
    checked = pipeline.check(compiled, settings)
    assert checked.numerics.passed, checked.numerics.message
    assert [o.shape for o in checked.model.run(checked.inputs, checked.input_names)] == [
        (10, 2, 2, hidden), (2, 2, hidden), (2, 2, hidden)]
