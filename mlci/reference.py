"""What ONNX Runtime is given, as the numerics reference and as the peer: the model, made loadable
and exact where the file as written would not be. Pure transforms of ONNX protos.

Two things stand between a model file and a trustworthy ONNX Runtime reference:

- **IR versions.** onnx 1.23 writes IR version 14, which ONNX Runtime 1.31 refuses outright, though
  almost no model uses what IR 14 added (2-bit and 6-bit types). Such a model is handed to ONNX
  Runtime as IR 13 (`loadable_ir`).
- **Saturating integer products.** On x86 CPUs without VNNI (AVX2-only parts, GitHub's hosted
  runners among them) ONNX Runtime's uint8 x int8 kernels add pairs of products in 16 bits with
  saturation (``vpmaddubsw``), so ConvInteger, MatMulInteger, QLinearConv, QLinearMatMul, QGemm and
  the dynamic quantizer's ops compute wrong sums when weights are large; with VNNI, and for
  uint8 x uint8, they are exact. ONNX defines the exact sum, which is what TVM computes.
  `exact_integer_weights` gives every constant int8 weight multiplied with uint8 data the same
  values as uint8 (w + 128, zero point + 128: w - zp is unchanged), so ONNX Runtime takes its exact
  uint8 x uint8 kernels on every CPU. (ONNX Runtime's own switch for this,
  ``session.x64quantprecision``, fails to load models whose weights are shared between nodes, and
  models with int8 activations, in 1.31.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mlci.graph import walk_nodes

MAX_ORT_IR_VERSION = 13
"""onnxruntime 1.31 refuses IR versions above this (onnx 1.23 writes 14 by default)."""

TYPES_AFTER_IR = {14: {TensorProto.UINT2, TensorProto.INT2, TensorProto.FLOAT6E2M3, TensorProto.FLOAT6E3M2}}
"""IR version -> the tensor element types it introduced: a model using one needs that IR version."""

MS = "com.microsoft"

INTEGER_WEIGHTS: dict[tuple[str, str], list[tuple[int | None, int, int | None, int]]] = {
    ("", "ConvInteger"): [(0, 1, None, 3)],
    ("", "MatMulInteger"): [(0, 1, None, 3)],
    ("", "QLinearConv"): [(0, 3, 4, 5)],
    ("", "QLinearMatMul"): [(0, 3, 4, 5)],
    (MS, "QGemm"): [(0, 3, 4, 5)],
    (MS, "MatMulIntegerToFloat"): [(0, 1, 3, 5)],
    (MS, "DynamicQuantizeMatMul"): [(None, 1, 2, 3)],
    (MS, "DynamicQuantizeLSTM"): [(None, 1, 8, 9), (None, 2, 10, 11)],
}
"""(domain, op) -> (data, weight, weight scale, weight zero point) input positions of each integer
product the op computes; data None: float data the op quantizes to uint8 itself; scale None: none
(a missing zero point then becomes one scalar)."""

QDQ_WEIGHT_CONSUMERS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
"""Ops ONNX Runtime fuses with the DequantizeLinear of their weights into an integer kernel."""


@dataclass
class ReferenceModel:
    """The model ONNX Runtime runs as the reference, and what was changed to get it."""

    model: onnx.ModelProto
    changes: list[str]
    """One line per change, for the log (empty: the model as written)."""
    shifted: int = 0
    """Weight tensors given in uint8 (the model then computes differently from the file in ONNX
    Runtime, exactly rather than saturated: it is not what a team would time)."""


def needed_ir(model: onnx.ModelProto) -> int:
    """The lowest IR version the model's tensor types allow (at least 3)."""
    used = _element_types(model)
    return max([3, *(ir for ir, types in TYPES_AFTER_IR.items() if used & types)])


def loadable_ir(model: onnx.ModelProto) -> int | None:
    """The IR version to hand ONNX Runtime this model at: its own when ONNX Runtime accepts it, the
    newest ONNX Runtime accepts when nothing in the model needs more, else None (ONNX Runtime
    cannot run it)."""
    if model.ir_version <= MAX_ORT_IR_VERSION:
        return model.ir_version
    return MAX_ORT_IR_VERSION if needed_ir(model) <= MAX_ORT_IR_VERSION else None


def _element_types(model: onnx.ModelProto) -> set[int]:
    types: set[int] = set()

    def of_type(t: onnx.TypeProto) -> None:
        kind = t.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            types.add(getattr(t, kind).elem_type)
        elif kind == "sequence_type":
            of_type(t.sequence_type.elem_type)
        elif kind == "optional_type":
            of_type(t.optional_type.elem_type)
        elif kind == "map_type":
            types.add(t.map_type.key_type)
            of_type(t.map_type.value_type)

    def of_graph(g: onnx.GraphProto) -> None:
        types.update(t.data_type for t in g.initializer)
        for value in (*g.input, *g.output, *g.value_info):
            of_type(value.type)
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    types.add(attr.t.data_type)
                elif attr.type == onnx.AttributeProto.GRAPH:
                    of_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        of_graph(sub)

    of_graph(model.graph)
    return types


def for_onnxruntime(model: onnx.ModelProto, base_dir: Path | None = None) -> ReferenceModel | None:
    """A copy of `model` that ONNX Runtime loads and computes exactly (see the module's docstring);
    None when ONNX Runtime cannot run it at all (an IR version it lacks, needed by the model).
    `base_dir`: where weights stored beside the model are read from (those turned to uint8 are
    then kept in the copy itself)."""
    ir = loadable_ir(model)
    if ir is None:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changes = []
    if ir != model.ir_version:
        out.ir_version = ir
        changes.append(f"handed to ONNX Runtime as IR version {ir} (written as {model.ir_version}, which it refuses; "
                       "the model uses nothing newer)")
    shifted = exact_integer_weights(out, base_dir)
    if shifted:
        changes.append(f"{shifted} int8 weight tensor(s) multiplied with uint8 data given to ONNX Runtime as the same "
                       "values in uint8, so it computes their products exactly on every CPU")
    return ReferenceModel(out, changes, shifted)


def _shift(array: np.ndarray) -> np.ndarray:
    """int8 values as uint8 with the same differences: v + 128."""
    return (array.astype(np.int16) + 128).astype(np.uint8)


def exact_integer_weights(model: onnx.ModelProto, base_dir: Path | None = None) -> int:
    """Turn, in place, each constant int8 weight (and its zero point) that an integer product
    multiplies with uint8 data into uint8 + 128; returns how many weight tensors were turned.
    Weights shared with other consumers get a copy of their own. The main graph only."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    types = _value_types(model)
    producers = {out: node for node in graph.node for out in node.output}
    new: dict[str, TensorProto] = {}

    def shifted(name: str) -> str:
        if name not in new:
            tensor = numpy_helper.from_array(_shift(numpy_helper.to_array(inits[name], str(base_dir or ""))), f"{name}.mlci_uint8")
            new[name] = tensor
        return new[name].name

    def shifted_zero_point(node: onnx.NodeProto, index: int, scale_index: int | None) -> None:
        """Point input `index` of `node` (a constant int8 zero point, or none) at its uint8 twin."""
        name = node.input[index] if index < len(node.input) else ""
        if name:
            node.input[index] = shifted(name)
            return
        shape: tuple[int, ...] = ()
        if scale_index is not None and scale_index < len(node.input) and node.input[scale_index] in inits:
            shape = tuple(inits[node.input[scale_index]].dims)
        zero = f"{node.name or node.output[0]}.mlci_zero_point_{index}"
        new[zero] = numpy_helper.from_array(np.full(shape, 128, np.uint8), zero)
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = zero

    count = 0
    for node in graph.node:
        slots = INTEGER_WEIGHTS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type), [])
        for data, weight, scale, zero_point in slots:
            if weight >= len(node.input) or not _is_int8_constant(node.input[weight], inits):
                continue
            if data is not None and types.get(node.input[data]) != TensorProto.UINT8:
                continue
            zp = node.input[zero_point] if zero_point < len(node.input) else ""
            if zp and not _is_int8_constant(zp, inits):
                continue
            node.input[weight] = shifted(node.input[weight])
            shifted_zero_point(node, zero_point, scale)
            count += 1
        if node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx") and _qdq_weight_of_uint8(
                node, graph, inits, producers):
            zp = node.input[2] if len(node.input) > 2 else ""
            if zp and not _is_int8_constant(zp, inits):
                continue
            node.input[0] = shifted(node.input[0])
            shifted_zero_point(node, 2, 1)
            count += 1
    if not count:
        return 0
    graph.initializer.extend(new.values())
    used = {name for node in walk_nodes(graph) for name in node.input}
    keep = [t for t in graph.initializer if t.name in used or t.name in {o.name for o in graph.output}]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return count


def _is_int8_constant(name: str, inits: dict[str, TensorProto]) -> bool:
    return bool(name) and name in inits and inits[name].data_type == TensorProto.INT8


def _qdq_weight_of_uint8(node: onnx.NodeProto, graph: onnx.GraphProto, inits: dict[str, TensorProto],
                         producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether this DequantizeLinear dequantizes constant int8 weights for a Conv/MatMul/Gemm whose
    data comes dequantized from uint8 (ONNX Runtime fuses the three into a uint8 x int8 kernel)."""
    if not node.input or not _is_int8_constant(node.input[0], inits):
        return False
    for consumer in graph.node:
        if consumer.op_type not in QDQ_WEIGHT_CONSUMERS or len(consumer.input) < 2:
            continue
        if consumer.input[1] != node.output[0]:
            continue
        data = producers.get(consumer.input[0])
        if data is None or data.op_type != "DequantizeLinear":
            continue
        source = data.input[0]
        quantize = producers.get(source)
        if source in inits:
            if inits[source].data_type == TensorProto.UINT8:
                return True
        elif quantize is not None and quantize.op_type == "QuantizeLinear":
            zero = quantize.input[2] if len(quantize.input) > 2 else ""
            # QuantizeLinear writes uint8 unless its zero point (or output_dtype) says otherwise.
            if (zero in inits and inits[zero].data_type == TensorProto.UINT8) or (
                    not zero and not any(a.name == "output_dtype" for a in quantize.attribute)):
                return True
    return False


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> element type, as far as the graph declares or ONNX's shape inference tells."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an op the inference does not know, a model over 2 GB: what is declared
        inferred = model
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types
