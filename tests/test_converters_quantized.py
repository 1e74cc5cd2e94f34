"""Quantized ONNX models compile and compute what ONNX Runtime computes.

Each operator variant is a node of one model with many outputs (one TVM build); then a small
CNN quantized by ONNX Runtime's own quantizer (QOperator, QDQ, dynamic), with every int8/uint8
tensor exposed. Both go through mlci's real path (prepare_model -> import_relax -> build
without tuning) and are compared with ONNX Runtime on the same inputs. Integer outputs match
exactly, except where a float intermediate may round differently: QLinearAdd (ONNX Runtime
associates its float sum differently), QLinearSigmoid (its own sigmoid approximation), QDQ
models (TVM computes on dequantized floats, ONNX Runtime fuses some layers into integer kernels)
and dynamic models (each layer's quantization parameters come from float arithmetic). There one
unit of the last place is allowed, and the test prints how many elements used it (so far only
the QDQ model's softmax output: 2 of 12).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

from mlci import converters
from mlci.compile import import_relax
from mlci.config import ModelConfig
from mlci.converters.quantized import CONVERTERS, QuantizedOpError
from mlci.measure import TvmModel
from mlci.models import ModelError, prepare_model
from mlci.pipeline import ModelSettings, Pipeline
from mlci.reference import for_onnxruntime
from mlci.results import Status
from mlci.targets import ResolvedTarget, detect_host_target
from mlci.tuning import TuningCache

from .avx2 import AVX2_TARGET, onnxruntime_on_avx2
from .conftest import save

MS = "com.microsoft"
RNG = np.random.default_rng(7)
NP = {"uint8": np.uint8, "int8": np.int8, "int32": np.int32, "float32": np.float32}
INTEGER_TYPES = ("tensor(int8)", "tensor(uint8)")
ORT_TYPE = {"tensor(uint8)": TensorProto.UINT8, "tensor(int8)": TensorProto.INT8, "tensor(int32)": TensorProto.INT32,
            "tensor(float)": TensorProto.FLOAT}


def ints(dtype: str, shape: tuple[int, ...] | list[int], low: int | None = None, high: int | None = None) -> np.ndarray:
    info = np.iinfo(NP[dtype])
    return RNG.integers(info.min if low is None else low, (info.max if high is None else high) + 1,
                        size=shape).astype(NP[dtype])


@dataclass
class Zoo:
    """One ONNX graph many operator variants write outputs of. `twins` are the nodes ONNX Runtime
    runs instead of a variant it refuses but ONNX defines (computed with its float operators,
    exact for these sizes)."""

    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    twins: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    loose: set[str] = field(default_factory=set)
    """Outputs allowed one unit of difference."""

    def input(self, name: str, value: np.ndarray) -> str:
        self.inputs[name] = value
        return name

    def const(self, name: str, value: np.ndarray | float | int, dtype: str) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, NP[dtype]), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, *, domain: str = "", outputs: int = 1,
             twin: list[onnx.NodeProto] | None = None, loose: bool = False, **attrs: object) -> list[str]:
        names = [name] if outputs == 1 else [f"{name}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attrs))
        if twin is not None:
            self.twins[name] = twin
        self.outputs.extend(names)
        if loose:
            self.loose.update(names)
        return names

    def model(self, for_ort: bool = False) -> onnx.ModelProto:
        """The graph, with the twins for ONNX Runtime."""
        if for_ort:
            nodes = [twin for node in self.nodes for twin in self.twins.get(node.name, [node])]
            return self._model(nodes, [helper.make_empty_tensor_value_info(n) for n in self.outputs])
        model = self._model(self.nodes, [helper.make_empty_tensor_value_info(n) for n in self.outputs])
        return typed_by_ort(model, self.model(for_ort=True))

    def _model(self, nodes: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes, "zoo",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
             for n, v in self.inputs.items()], outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)])
        model.ir_version = 8
        return model


def typed_by_ort(model: onnx.ModelProto, probe: onnx.ModelProto | None = None,
                 keep: Callable[[str, str], bool] = lambda name, ort_type: True) -> onnx.ModelProto:
    """`model` with the outputs of `probe` (default: itself) that `keep` takes, typed as ONNX
    Runtime infers them: contrib operators have no ONNX shape inference, and the checker wants
    every output's type and shape."""
    session = ort.InferenceSession((probe or model).SerializeToString(), ort_options(), providers=["CPUExecutionProvider"])
    typed = onnx.ModelProto()
    typed.CopyFrom(model)
    del typed.graph.output[:]
    typed.graph.output.extend(helper.make_tensor_value_info(o.name, ORT_TYPE[o.type], o.shape)
                              for o in session.get_outputs() if keep(o.name, o.type))
    return typed


def conv_integer_twin(zoo: Zoo, name: str, x: str, w: np.ndarray, x_zp: int, w_zp: np.ndarray,
                      **attrs: object) -> list[onnx.NodeProto]:
    """ConvInteger's definition in float operators: conv(float(x) - x_zp, float(w) - w_zp), as int32."""
    shifted_w = zoo.const(f"{name}_twin_w", w.astype(np.float32) - w_zp.reshape(-1, 1, 1, 1), "float32")
    zp = zoo.const(f"{name}_twin_xzp", float(x_zp), "float32")
    return [helper.make_node("Cast", [x], [f"{name}_xf"], to=TensorProto.FLOAT),
            helper.make_node("Sub", [f"{name}_xf", zp], [f"{name}_xs"]),
            helper.make_node("Conv", [f"{name}_xs", shifted_w], [f"{name}_f"], **attrs),
            helper.make_node("Cast", [f"{name}_f"], [name], to=TensorProto.INT32)]


def build_zoo() -> Zoo:
    z = Zoo()
    xu = z.input("xu", ints("uint8", (1, 4, 7, 7)))
    xs = z.input("xs", ints("int8", (1, 4, 7, 7)))
    xu2 = z.input("xu2", ints("uint8", (1, 4, 7, 7)))
    xs2 = z.input("xs2", ints("int8", (1, 4, 1, 1)))
    x1d = z.input("x1d", ints("uint8", (1, 4, 9)))
    x3d = z.input("x3d", ints("uint8", (1, 2, 3, 4, 4)))
    au = z.input("au", ints("uint8", (2, 3, 8)))
    as_ = z.input("as", ints("int8", (3, 8)))
    af = z.input("af", RNG.standard_normal((3, 8)).astype(np.float32))
    zeros = z.input("zeros", np.zeros((2, 5), np.float32))
    positive = z.input("positive", np.abs(RNG.standard_normal((2, 5))).astype(np.float32) + 0.5)

    def w(dtype: str, shape: tuple[int, ...], name: str) -> str:
        return z.const(name, ints(dtype, shape), dtype)

    # ConvInteger: every Conv attribute, both weight types, zero points present or not.
    z.node("ConvInteger", [xu, w("int8", (6, 4, 3, 3), "ci1_w"), z.const("u3", 3, "uint8"), z.const("s5", -5, "int8")],
           "ci_pads", pads=[1, 1, 1, 1])
    z.node("ConvInteger", [xu, w("int8", (6, 2, 3, 3), "ci3_w"), z.const("u200", 200, "uint8")], "ci_same_upper_group",
           auto_pad="SAME_UPPER", strides=[2, 2], group=2)
    z.node("ConvInteger", [xu, w("int8", (4, 4, 2, 2), "ci4_w"), "", z.const("s1", 1, "int8")], "ci_same_lower",
           auto_pad="SAME_LOWER", kernel_shape=[2, 2])
    z.node("ConvInteger", [xu, w("uint8", (4, 1, 3, 3), "ci5_w"), "u3", z.const("u128", 128, "uint8")],
           "ci_valid_depthwise", auto_pad="VALID", group=4)
    z.node("ConvInteger", [x1d, w("int8", (3, 4, 3), "ci6_w"), "u3"], "ci_1d", pads=[1, 2], strides=[2])
    z.node("ConvInteger", [x3d, w("int8", (3, 2, 2, 2, 2), "ci3d_w"), "u3"], "ci_3d", pads=[1, 0, 1, 0, 1, 1])
    # ONNX defines these; ONNX Runtime takes neither (int8 x, one weight zero point per channel).
    w7, zp7 = ints("int8", (5, 4, 3, 3)), ints("int8", (5,), -8, 8)
    z.node("ConvInteger", [xs, z.const("ci7_w", w7, "int8"), z.const("s9", -9, "int8"), z.const("ci7_zp", zp7, "int8")],
           "ci_int8_x_per_channel_zp", pads=[1, 1, 1, 1],
           twin=conv_integer_twin(z, "ci_int8_x_per_channel_zp", xs, w7, -9, zp7, pads=[1, 1, 1, 1]))
    w8, zp8 = ints("uint8", (5, 4, 3, 3)), ints("uint8", (5,), 100, 150)
    attrs8 = dict(strides=[2, 2], dilations=[2, 2], pads=[0, 1, 2, 1])
    z.node("ConvInteger", [xu, z.const("ci8_w", w8, "uint8"), "u3", z.const("ci8_zp", zp8, "uint8")],
           "ci_uint8_per_channel_zp_strided_dilated", **attrs8,
           twin=conv_integer_twin(z, "ci_uint8_per_channel_zp_strided_dilated", xu, w8, 3, zp8, **attrs8))

    # QLinearConv: per-tensor and per-channel scales, both signednesses, bias; 30 output channels
    # are computed on 32 on CPU (mlci pads convolution channels), so that pass sees int32 too.
    xsc = z.const("x_scale", 0.02, "float32")
    z.node("QLinearConv", [xu, xsc, z.const("u120", 120, "uint8"), w("int8", (30, 4, 3, 3), "qc1_w"),
                           z.const("qc1_ws", RNG.uniform(0.001, 0.01, 30), "float32"), z.const("qc1_wzp", np.zeros(30), "int8"),
                           z.const("y_scale", 0.05, "float32"), z.const("u128b", 128, "uint8"),
                           z.const("qc1_b", ints("int32", (30,), -3000, 3000), "int32")],
           "qc_per_channel_bias_padded_channels", pads=[1, 1, 1, 1])
    z.node("QLinearConv", [xu, xsc, "u3", w("uint8", (5, 4, 3, 3), "qc2_w"), z.const("qc2_ws", 0.004, "float32"),
                           z.const("u130", 130, "uint8"), z.const("y_scale_big", 0.3, "float32"), z.const("u10", 10, "uint8")],
           "qc_uint8_weights_strided", strides=[2, 2])
    z.node("QLinearConv", [xs, xsc, z.const("s7", 7, "int8"), w("int8", (6, 2, 3, 3), "qc3_w"),
                           z.const("qc3_ws", RNG.uniform(0.001, 0.01, 6), "float32"), z.const("qc3_wzp", np.zeros(6), "int8"),
                           z.const("y_scale_small", 0.01, "float32"), z.const("sm3", -3, "int8")],
           "qc_int8_same_upper_group", auto_pad="SAME_UPPER", group=2)
    z.node("QLinearConv", [xu, xsc, "u120", w("int8", (4, 1, 3, 3), "qc4_w"),
                           z.const("qc4_ws", RNG.uniform(0.001, 0.01, 4), "float32"), z.const("qc4_wzp", np.zeros(4), "int8"),
                           "y_scale", "u128b", z.const("qc4_b", ints("int32", (4,), -500, 500), "int32")],
           "qc_depthwise_bias", group=4, pads=[1, 1, 1, 1])

    # QLinearMatMul: per-column and per-tensor parameters, stacked a, both signednesses.
    bsc = z.const("b_scales", RNG.uniform(0.001, 0.01, 5), "float32")
    z.node("QLinearMatMul", [au, z.const("a_scale", 0.03, "float32"), "u3", w("int8", (8, 5), "qm1_b"), bsc,
                             z.const("qm1_bzp", np.zeros(5), "int8"), z.const("mm_y", 0.04, "float32"), "u128b"],
           "qm_per_column_stacked")
    z.node("QLinearMatMul", [as_, "a_scale", "s7", w("int8", (8, 5), "qm2_b"), z.const("qm2_bs", 0.007, "float32"),
                             "s1", "mm_y", "sm3"], "qm_int8")
    z.node("QLinearMatMul", [au, "a_scale", "u3", w("uint8", (8, 5), "qm3_b"), bsc,
                             z.const("qm3_bzp", ints("uint8", (5,), 100, 150), "uint8"), "y_scale_big", "u128b"],
           "qm_uint8_per_column_zero_points")

    # MatMulInteger (TVM's converter, kept: it matches ONNX Runtime): every type pair, without
    # zero points and with them (b's one per column).
    for a_type, a in (("uint8", au), ("int8", as_)):
        for b_type in ("uint8", "int8"):
            b = w(b_type, (8, 5), f"mi_{a_type}_{b_type}_b")
            z.node("MatMulInteger", [a, b], f"mi_{a_type}_{b_type}")
            a_zp = z.const(f"mi_{a_type}_{b_type}_azp", ints(a_type, ()), a_type)
            b_zp = z.const(f"mi_{a_type}_{b_type}_bzp", ints(b_type, (5,)), b_type)
            z.node("MatMulInteger", [a, b, a_zp, b_zp], f"mi_{a_type}_{b_type}_zero_points")

    # DynamicQuantizeLinear (mlci's): ordinary, all-positive and all-zero inputs.
    z.node("DynamicQuantizeLinear", [af], "dql", outputs=3)
    z.node("DynamicQuantizeLinear", [positive], "dql_positive", outputs=3)
    z.node("DynamicQuantizeLinear", [zeros], "dql_zeros", outputs=3)

    # ONNX Runtime's contrib operators.
    z.node("DynamicQuantizeMatMul", [af, w("int8", (8, 5), "dqm1_b"), z.const("dqm1_bs", 0.006, "float32"),
                                     z.const("s2", 2, "int8"), z.const("bias5", RNG.standard_normal(5), "float32")],
           "dqmm_bias", domain=MS)
    z.node("DynamicQuantizeMatMul",
           [af, w("uint8", (8, 5), "dqm2_b"), bsc, z.const("dqm2_bzp", ints("uint8", (5,), 120, 136), "uint8")],
           "dqmm_per_column", domain=MS)
    z.node("MatMulIntegerToFloat", [au, w("int8", (8, 5), "mitf_b"), "a_scale", bsc, "u3", z.const("mitf_bzp", np.zeros(5), "int8"),
                                    "bias5"], "mmitf", domain=MS)
    z.node("QGemm", [as_, "a_scale", "s7", w("int8", (5, 8), "qg1_b"), "qm2_bs", z.const("s0", 0, "int8"),
                     z.const("qg1_c", ints("int32", (5,), -2000, 2000), "int32"), "mm_y", "sm3"],
           "qgemm_int8_transB_bias", domain=MS, transB=1)
    z.node("QGemm", [z.input("at", ints("uint8", (8, 3))), "a_scale", "u3", w("int8", (8, 5), "qg2_b"), bsc,
                     z.const("qg2_bzp", np.zeros(5), "int8")], "qgemm_float_out_transA_alpha", domain=MS, transA=1, alpha=0.5)
    z.node("QGemm", [as_, "a_scale", "s7", w("int8", (8, 5), "qg3_b"), bsc, "qm1_bzp",
                     z.const("qg3_c", ints("int32", (3, 5), -2000, 2000), "int32"), "mm_y", "sm3"],
           "qgemm_per_column_matrix_bias", domain=MS)
    a_sc, b_sc, c_sc = z.const("qa_s", 0.03, "float32"), z.const("qb_s", 0.02, "float32"), z.const("qc_s", 0.045, "float32")
    z.node("QLinearAdd", [xu, a_sc, "u120", xu2, b_sc, "u3", c_sc, "u128b"], "qadd", domain=MS, loose=True)
    z.node("QLinearAdd", [xs, a_sc, "s7", xs2, b_sc, "sm3", c_sc, "s2"], "qadd_int8_broadcast", domain=MS, loose=True)
    z.node("QLinearAdd", [xu, a_sc, "u120", z.const("u77", np.array([77], np.uint8), "uint8"), b_sc, "u3", c_sc, "u10"],
           "qadd_scalar", domain=MS, loose=True)
    z.node("QLinearMul", [xu, a_sc, "u120", xu2, b_sc, "u3", z.const("qm_s", 1.5, "float32"), "u10"], "qmul", domain=MS)
    z.node("QLinearMul", [xs, a_sc, "s7", xs2, b_sc, "sm3", z.const("qm_s8", 0.5, "float32"), "s2"],
           "qmul_int8_broadcast", domain=MS)
    z.node("QLinearConcat", [c_sc, "u128b", xu, a_sc, "u120", xu2, c_sc, "u128b", xu, b_sc, "u3"], "qconcat",
           domain=MS, axis=1)
    z.node("QLinearConcat", [c_sc, "s2", xs, a_sc, "s7", xs, b_sc, "sm3"], "qconcat_int8", domain=MS, axis=2)
    z.node("QLinearGlobalAveragePool", [xu, a_sc, "u120", b_sc, "u128b"], "qgap", domain=MS)
    z.node("QLinearGlobalAveragePool", [xs, a_sc, "s7", b_sc, "sm3"], "qgap_int8", domain=MS)
    z.node("QLinearSigmoid", [xu, a_sc, "u120", z.const("sig_s", 1 / 256, "float32"), "u3"], "qsigmoid",
           domain=MS, loose=True)
    z.node("QLinearSigmoid", [xs, b_sc, "s7", "sig_s", z.const("sm128", -128, "int8")], "qsigmoid_int8",
           domain=MS, loose=True)
    # QLinearSoftmax as the quantizer writes it: output scale 1/256, zero point 0 (uint8) or -128.
    logits = z.input("logits", ints("uint8", (2, 10), 90, 160))
    z.node("QLinearSoftmax", [logits, z.const("sm_s", 0.08, "float32"), "u120", "sig_s", z.const("u0", 0, "uint8")],
           "qsoftmax", domain=MS, loose=True, axis=-1, opset=13)
    z.node("QLinearSoftmax", [xs, z.const("sm_s8", 0.05, "float32"), "s7", "sig_s", "sm128"], "qsoftmax_int8_axis1",
           domain=MS, loose=True, axis=1, opset=13)
    z.node("QLinearSoftmax", [xs, "sm_s8", "s7", "sig_s", "sm128"], "qsoftmax_int8_opset12_flattened",
           domain=MS, loose=True, axis=2, opset=12)

    # QuantizeLinear / DequantizeLinear (TVM's converters, the QDQ format): per axis.
    z.node("QuantizeLinear", [af, z.const("ql_s", RNG.uniform(0.005, 0.02, 8), "float32"),
                              z.const("ql_zp", ints("int8", (8,), -5, 5), "int8")], "quantize_per_axis", axis=1)
    z.node("DequantizeLinear", [xs, z.const("dl_s", RNG.uniform(0.005, 0.02, 4), "float32"),
                                z.const("dl_zp", ints("int8", (4,), -5, 5), "int8")], "dequantize_per_axis", axis=1)
    return z


CPUS = {"host": detect_host_target, "avx2": lambda: AVX2_TARGET}
"""Integer kernels must be exact whatever instructions LLVM picks: built for this machine's CPU, and
for an AVX2-only one (no VNNI), as GitHub's hosted x86 runners are."""


@pytest.fixture(scope="module", params=list(CPUS))
def pipeline(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    root = tmp_path_factory.mktemp(f"quantized-{request.param}")
    return Pipeline(ResolvedTarget("cpu", CPUS[request.param]()), TuningCache(root / "cache"), log_dir=root / "logs")


def compile_and_run(pipeline: Pipeline, path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Load, fold, import, build (no tuning) and run one model, as `mlci run` does."""
    compiled = pipeline.compile(ModelConfig(name=path.stem, path=path, key="models[0]"), ModelSettings(trials=0))
    names = [spec.name for spec in compiled.prepared.inputs]
    return TvmModel(compiled.executable, pipeline.device).run(inputs, names)


def ort_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the twins' unused weights are worth no warning
    return options


def reference_form(model: onnx.ModelProto | bytes) -> bytes:
    """The model as mlci hands it to ONNX Runtime for the numerics reference (exact integer products)."""
    proto = onnx.load_from_string(model) if isinstance(model, bytes) else model
    ready = for_onnxruntime(proto)
    assert ready is not None
    return ready.model.SerializeToString()


def ort_run(model: onnx.ModelProto | bytes, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """ONNX Runtime's outputs, as mlci's numerics check gets them."""
    session = ort.InferenceSession(reference_form(model), ort_options(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


@pytest.mark.slow
def test_every_quantized_operator_variant_computes_what_onnx_runtime_computes(pipeline: Pipeline,
                                                                                tmp_path: Path) -> None:
    zoo = build_zoo()
    got = compile_and_run(pipeline, save(zoo.model(), tmp_path / "zoo.onnx"), zoo.inputs)
    expected = ort_run(zoo.model(for_ort=True), zoo.inputs)
    assert len(got) == len(expected) == len(zoo.outputs)
    off_by_one = {}
    for name, g, e in zip(zoo.outputs, got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, f"{name}: {g.dtype}{g.shape} vs {e.dtype}{e.shape}"
        if e.dtype == np.float32:
            np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6, err_msg=name)
            continue
        diff = np.abs(g.astype(np.int64) - e.astype(np.int64))
        worst, differing = int(diff.max()), int((diff > 0).sum())
        assert worst <= (1 if name in zoo.loose else 0), f"{name}: {differing} of {diff.size} differ, by up to {worst}"
        if name in zoo.loose:
            off_by_one[name] = differing
    print("outputs one unit from ONNX Runtime:", off_by_one)


@pytest.mark.slow
def test_onnx_runtime_on_an_avx2_cpu_saturates_the_file_as_written_and_computes_mlcis_reference_exactly(
        tmp_path: Path) -> None:
    """Without VNNI, ONNX Runtime adds uint8 x int8 products in saturating 16-bit pairs: the file as
    written gives wrong sums there (the check would fail TVM's exact ones), the reference mlci hands
    it (the same weights in uint8) gives the sums ONNX defines, which TVM built for that CPU gives."""
    zoo = build_zoo()
    model = zoo.model(for_ort=True)
    tvm = compile_and_run(Pipeline(ResolvedTarget("cpu", AVX2_TARGET), TuningCache(tmp_path / "cache"),
                                   log_dir=tmp_path / "logs"), save(zoo.model(), tmp_path / "zoo.onnx"), zoo.inputs)
    as_written = onnxruntime_on_avx2(model.SerializeToString(), zoo.inputs)
    reference = onnxruntime_on_avx2(reference_form(model), zoo.inputs)

    def differing(outputs: list[np.ndarray]) -> dict[str, int]:
        counts = {}
        for name, got, exact in zip(zoo.outputs, outputs, tvm, strict=True):
            allowed = 1 if name in zoo.loose else 0
            if exact.dtype != np.float32:
                diff = np.abs(got.astype(np.int64) - exact.astype(np.int64))
                bad = int((diff > allowed).sum())
            else:
                bad = int((~np.isclose(got, exact, rtol=1e-6, atol=1e-6)).sum())
            if bad:
                counts[name] = bad
        return counts

    saturated = differing(as_written)
    assert saturated.get("qc_per_channel_bias_padded_channels", 0) > 100, saturated
    assert differing(reference) == {}


# --- models quantized by ONNX Runtime's quantizer ---------------------------------------------------


def small_cnn() -> onnx.ModelProto:
    """Conv, Relu, a residual Add, MaxPool, Concat, GlobalAveragePool, Gemm, MatMul, Softmax: the
    layers whose quantized forms the quantizer writes for a CNN classifier."""
    rng = np.random.default_rng(3)
    inits: list[onnx.TensorProto] = []

    def weight(name: str, *shape: int) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    nodes = [
        helper.make_node("Conv", ["x", weight("w1", 8, 3, 3, 3), weight("b1", 8)], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", weight("w2", 8, 8, 3, 3), weight("b2", 8)], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["res"]),
        helper.make_node("Relu", ["res"], ["r2"]),
        helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p", weight("w3", 4, 8, 1, 1), weight("b3", 4)], ["c3"]),
        helper.make_node("Concat", ["p", "c3"], ["cat"], axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", weight("wg", 12, 10), weight("bg", 10)], ["fc"]),
        helper.make_node("MatMul", ["fc", weight("wm", 10, 6)], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


class Calibration(CalibrationDataReader):
    """Four seeded batches of random images."""

    def __init__(self) -> None:
        rng = np.random.default_rng(5)
        self.batches = iter([{"x": rng.standard_normal((2, 3, 10, 10)).astype(np.float32)} for _ in range(4)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


QUANTIZERS = {
    "qoperator": dict(quant_format=QuantFormat.QOperator),
    "qdq-int8-per-channel": dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, per_channel=True),
    "dynamic": None,
}
"""The quantizer's defaults (uint8 activations, int8 weights per tensor), and the int8 per-channel
QDQ form ONNX Runtime recommends on x86."""
EMITS = {
    "qoperator": {"QuantizeLinear", "QLinearConv", f"{MS}.QLinearAdd", f"{MS}.QLinearConcat",
                  f"{MS}.QLinearGlobalAveragePool", f"{MS}.QGemm", "QLinearMatMul", f"{MS}.QLinearSoftmax",
                  "DequantizeLinear"},
    "qdq-int8-per-channel": {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "MatMul"},
    "dynamic": {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"},
}
UNITS = {"qoperator": 0, "qdq-int8-per-channel": 1, "dynamic": 1}
"""Units of the last place an integer tensor may differ by: QOperator layers compute in integers
as ONNX Runtime does; in QDQ form TVM computes every layer on dequantized floats where ONNX
Runtime fuses some (here Add, Concat, GlobalAveragePool, Gemm, Softmax) into its integer kernels; in
the dynamic form each layer's quantization parameters come from float products and sums that may
round differently."""


def quantized_cnn(kind: str, tmp_path: Path) -> Path:
    """small_cnn quantized by ONNX Runtime's default quantizer settings (but those `kind` names),
    with every int8/uint8 tensor also a graph output, so each layer is compared."""
    float_path = save(small_cnn(), tmp_path / "cnn.onnx")
    out = tmp_path / f"cnn-{kind}.onnx"
    settings = QUANTIZERS[kind]
    if settings is None:
        quantize_dynamic(float_path, out)
    else:
        quantize_static(float_path, out, Calibration(), **settings)
    return save(with_integer_outputs(onnx.load(out)), out)


def with_integer_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(o) for n in model.graph.node for o in n.output)
    finals = {o.name for o in model.graph.output}
    return typed_by_ort(model, probe, lambda name, ort_type: name in finals or ort_type in INTEGER_TYPES)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_a_model_quantized_by_onnx_runtime_matches_it_layer_by_layer(kind: str, pipeline: Pipeline,
                                                                     tmp_path: Path) -> None:
    path = quantized_cnn(kind, tmp_path)
    model = onnx.load(path)
    assert EMITS[kind] <= {converters.qualified(n.domain, n.op_type) for n in model.graph.node}
    inputs = {"x": np.random.default_rng(11).standard_normal((2, 3, 10, 10)).astype(np.float32)}
    got = compile_and_run(pipeline, path, inputs)
    expected = ort_run(path.read_bytes(), inputs)
    names = [o.name for o in model.graph.output]
    off = {}
    for name, g, e in zip(names, got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        if e.dtype == np.float32:
            tolerance = UNITS[kind] * quantum(model, name) + 1e-5 * float(np.abs(e).max())
            np.testing.assert_allclose(g, e, rtol=0, atol=tolerance, err_msg=name)
            continue
        diff = np.abs(g.astype(np.int64) - e.astype(np.int64))
        worst = int(diff.max())
        assert worst <= UNITS[kind], f"{name}: {int((diff > 0).sum())} of {diff.size} differ, by up to {worst}"
        off[name] = int((diff > 0).sum())
    print(kind, "integer elements one unit from ONNX Runtime:", off)


def quantum(model: onnx.ModelProto, name: str) -> float:
    """The scale of the DequantizeLinear that writes `name` (0 when none does)."""
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and name in node.output:
            return float(np.max(weights[node.input[1]]))
    return 0.0


# --- what mlci refuses, and how it says so ----------------------------------------------------------


def test_the_quantizers_operators_are_converted_by_mlci_and_the_nhwc_qlinearconv_is_refused() -> None:
    assert {converters.provider(domain, op) for domain, op in CONVERTERS} == {"mlci"}
    assert converters.provider("", "MatMulInteger") == "tvm"  # TVM's converter matches ONNX Runtime
    # ONNX Runtime's channels-last QLinearConv (its NHWC optimiser writes it) shares the op type of
    # the ONNX one: TVM's importer would hand it to mlci's converter, so the check refuses it first.
    assert converters.provider(MS, "QLinearConv") is None


def one_node_model(op: str, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray], order: list[str],
                   domain: str = "", **attrs: object) -> onnx.ModelProto:
    node = helper.make_node(op, order, ["y"], name="bad", domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "bad", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                        for n, v in inputs.items()],
        [helper.make_empty_tensor_value_info("y")], [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)])
    model.ir_version = 8
    return typed_by_ort(model)


class Refusal(NamedTuple):
    op: str
    inputs: dict[str, np.ndarray]
    weights: dict[str, np.ndarray]
    order: list[str]
    domain: str
    message: str
    attrs: dict[str, object] = {}


f32, u8, s8, i32 = np.float32, np.uint8, np.int8, np.int32
REFUSED = {
    "a QLinearMatMul with one scale per row of a": Refusal(
        "QLinearMatMul", {"a": np.zeros((3, 8), u8)},
        {"as": np.full(3, 0.1, f32), "az": np.array(0, u8), "b": np.zeros((8, 5), s8), "bs": np.array(0.1, f32),
         "bz": np.array(0, s8), "ys": np.array(0.1, f32), "yz": np.array(0, u8)},
        ["a", "as", "az", "b", "bs", "bz", "ys", "yz"], "",
        "QLinearMatMul node 'bad': a_scale must hold one value (per tensor), got shape [3]"),
    "a QLinearConv with 5 weight scales for 6 channels": Refusal(
        "QLinearConv", {"x": np.zeros((1, 4, 5, 5), u8)},
        {"xs": np.array(0.1, f32), "xz": np.array(0, u8), "w": np.zeros((6, 4, 3, 3), s8), "ws": np.full(5, 0.1, f32),
         "wz": np.array(0, s8), "ys": np.array(0.1, f32), "yz": np.array(0, u8)},
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], "",
        "QLinearConv node 'bad': w_scale must hold one value or one per channel (6), got shape [5]"),
    "a QLinearConv with a bias of the wrong length": Refusal(
        "QLinearConv", {"x": np.zeros((1, 4, 5, 5), u8)},
        {"xs": np.array(0.1, f32), "xz": np.array(0, u8), "w": np.zeros((6, 4, 3, 3), s8), "ws": np.array(0.1, f32),
         "wz": np.array(0, s8), "ys": np.array(0.1, f32), "yz": np.array(0, u8), "B": np.zeros(5, i32)},
        ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "B"], "",
        "QLinearConv node 'bad': B must have shape [6], got [5]"),
    "a ConvInteger with a 2-D weight zero point": Refusal(
        "ConvInteger", {"x": np.zeros((1, 4, 5, 5), u8)},
        {"w": np.zeros((6, 4, 3, 3), s8), "xz": np.array(0, u8), "wz": np.zeros((2, 3), s8)},
        ["x", "w", "xz", "wz"], "",
        "ConvInteger node 'bad': w_zero_point must hold one value or one per channel (6), got shape [2, 3]"),
    "a 4-D ConvInteger (three spatial axes and more are fine, four are not)": Refusal(
        "ConvInteger", {"x": np.zeros((1, 4, 3, 3, 3, 3), u8)}, {"w": np.zeros((2, 4, 1, 1, 1, 1), s8)},
        ["x", "w"], "",
        "ConvInteger node 'bad': x has shape [1, 4, 3, 3, 3, 3] and w [2, 4, 1, 1, 1, 1]; 1-D, 2-D and 3-D"),
    "a QGemm with 4 weight scales for 5 columns": Refusal(
        "QGemm", {"a": np.zeros((3, 8), u8)},
        {"as": np.array(0.1, f32), "az": np.array(0, u8), "b": np.zeros((8, 5), s8), "bs": np.full(4, 0.1, f32),
         "bz": np.array(0, s8)},
        ["a", "as", "az", "b", "bs", "bz"], MS,
        "com.microsoft.QGemm node 'bad': b_scale must hold one value or one per column of b (5), got shape [4]"),
    "a QLinearGlobalAveragePool over a matrix": Refusal(
        "QLinearGlobalAveragePool", {"x": np.zeros((3, 8), u8)},
        {"xs": np.array(0.1, f32), "xz": np.array(0, u8), "ys": np.array(0.1, f32), "yz": np.array(0, u8)},
        ["x", "xs", "xz", "ys", "yz"], MS,
        "com.microsoft.QLinearGlobalAveragePool node 'bad': X must have a batch, a channel and image axes"),
    "a DynamicQuantizeMatMul with a bias of the wrong length": Refusal(
        "DynamicQuantizeMatMul", {"a": np.zeros((3, 8), f32)},
        {"b": np.zeros((8, 5), s8), "bs": np.array(0.1, f32), "bz": np.array(0, s8), "bias": np.zeros(4, f32)},
        ["a", "b", "bs", "bz", "bias"], MS,
        "com.microsoft.DynamicQuantizeMatMul node 'bad': bias must have shape [5], got [4]"),
    "a QLinearSoftmax whose input scale is computed": Refusal(
        "QLinearSoftmax", {"x": np.zeros((2, 10), u8), "xs": np.array(0.1, f32)},
        {"xz": np.array(0, u8), "ys": np.array(1 / 256, f32), "yz": np.array(0, u8)},
        ["x", "xs", "xz", "ys", "yz"], MS,
        "com.microsoft.QLinearSoftmax node 'bad': X_scale must be a constant", {"axis": -1, "opset": 13}),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_quantized_node_mlci_cannot_convert_is_refused_naming_the_node_and_what_it_was_given(
        case: str, tmp_path: Path) -> None:
    refusal = REFUSED[case]
    model = one_node_model(refusal.op, refusal.inputs, refusal.weights, refusal.order, refusal.domain, **refusal.attrs)
    path = save(model, tmp_path / "bad.onnx")
    prepared = prepare_model(ModelConfig(name="bad", path=path, key="models[0]"))
    with pytest.raises(ModelError) as raised:
        import_relax(prepared)
    assert raised.value.status == Status.IMPORT_FAILED
    assert refusal.message in str(raised.value)


ONLY_TVM_SEES = {
    "a QLinearConv over float32": (
        "QLinearConv", "", {"x": np.zeros((1, 4, 5, 5), f32)},
        "QLinearConv node 'bad': x is float32; it takes int8 or uint8"),
    "ONNX Runtime's channels-last QLinearConv": (
        "QLinearConv", MS, {"x": np.zeros((1, 5, 5, 4), u8)},
        "QLinearConv node 'bad': channels_last=1 (ONNX Runtime's NHWC variant) is not supported"),
}


@pytest.mark.parametrize("case", list(ONLY_TVM_SEES))
def test_a_node_onnx_runtime_would_refuse_is_refused_by_the_converter_too(case: str) -> None:
    """mlci checks what ONNX Runtime checks on load (types), for a model that reaches TVM's importer
    some other way, and for the contrib QLinearConv that shares the ONNX op type."""
    from tvm.relax.frontend.onnx import from_onnx

    op, domain, inputs, message = ONLY_TVM_SEES[case]
    weights = {"xs": np.array(0.1, f32), "xz": np.array(0, u8), "w": np.zeros((6, 4, 3, 3), s8),
               "ws": np.array(0.1, f32), "wz": np.array(0, s8), "ys": np.array(0.1, f32), "yz": np.array(0, u8)}
    attrs = {"channels_last": 1} if domain == MS else {}
    node = helper.make_node(op, ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="bad", domain=domain, **attrs)
    graph = helper.make_graph(
        [node], "bad", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                        for n, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1])], [numpy_helper.from_array(v, n) for n, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)])
    converters.install()
    with pytest.raises(QuantizedOpError, match=re.escape(message)):
        from_onnx(model, keep_params_in_input=False)
