"""Load and check an ONNX model, bind its input shapes, fold shapes and constants.

Real exported models compute reshape targets at run time (``Shape -> Gather ->
Concat -> Reshape``), which TVM's importer cannot take. Binding every input
dimension and letting ONNX Runtime's basic optimiser fold the graph turns
those subgraphs into constants.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from mlci.config import ModelConfig
from mlci.results import Status

# onnxruntime 1.31 refuses IR versions above this (onnx 1.23 writes 14 by default).
MAX_ORT_IR_VERSION = 13


class ModelError(Exception):
    """A model that cannot be used; `status` is the results-file status to report."""

    def __init__(self, status: Status | str, message: str):
        self.status = Status(status)
        self.partial: Any = None
        """What the chain had produced before this failure (set by the pipeline)."""
        super().__init__(message)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass
class PreparedModel:
    name: str
    path: Path
    sha256: str
    inputs: list[InputSpec]
    original: bytes
    """The file as given: ONNX Runtime runs this, as the independent reference."""
    folded: onnx.ModelProto
    """Shapes bound, constants folded: what TVM imports."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def walk_nodes(graph: onnx.GraphProto):
    """Every node of a graph, those of its subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from walk_nodes(sub)


def graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Inputs a caller must feed: old (IR < 4) models also list every weight as an input."""
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def bind_input_shapes(model: onnx.ModelProto, cfg: ModelConfig) -> list[InputSpec]:
    """Resolve every input dimension from the file, `inputs` or `dims` of the config."""
    inputs = graph_inputs(model)
    names = [i.name for i in inputs]
    problems = [
        f"{cfg.key}.inputs.{name}: the model has no input {name!r} (inputs: {', '.join(names)})"
        for name in cfg.inputs
        if name not in names
    ]
    specs = []
    for value in inputs:
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            problems.append(f"input {value.name!r}: only tensor inputs are supported")
            continue
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        dims = list(tensor_type.shape.dim)
        if value.name in cfg.inputs:
            shape = cfg.inputs[value.name]
            if len(shape) != len(dims):
                problems.append(
                    f"{cfg.key}.inputs.{value.name}: the model's input has rank {len(dims)}, "
                    f"the config gives {len(shape)} dimensions {shape}"
                )
                continue
            for axis, (dim, size) in enumerate(zip(dims, shape)):
                if dim.HasField("dim_value") and dim.dim_value != size:
                    problems.append(
                        f"{cfg.key}.inputs.{value.name}: dimension {axis} is fixed to "
                        f"{dim.dim_value} in the model, the config gives {size}"
                    )
            specs.append(InputSpec(value.name, tuple(shape), dtype))
            continue
        shape = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param") and dim.dim_param in cfg.dims:
                shape.append(cfg.dims[dim.dim_param])
            else:
                label = f" ({dim.dim_param!r})" if dim.dim_param else ""
                hint = (
                    f"set {cfg.key}.dims.{dim.dim_param} or {cfg.key}.inputs.{value.name}"
                    if dim.dim_param
                    else f"set {cfg.key}.inputs.{value.name}"
                )
                problems.append(
                    f"input {value.name!r} dimension {axis}{label} is dynamic and has no binding: {hint}"
                )
                shape.append(-1)
        specs.append(InputSpec(value.name, tuple(shape), dtype))
    if problems:
        raise ModelError(Status.IMPORT_FAILED, "; ".join(problems))
    return specs


def _with_static_inputs(model: onnx.ModelProto, specs: list[InputSpec]) -> onnx.ModelProto:
    """Bound input shapes, and weights that old models list as inputs turned into plain
    initializers (IR >= 4), so the optimiser may fold through them and TVM binds them as
    constants instead of asking for them as arguments."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    initializers = {init.name for init in static.graph.initializer}
    if any(i.name in initializers for i in static.graph.input):
        kept = [i for i in static.graph.input if i.name not in initializers]
        del static.graph.input[:]
        static.graph.input.extend(kept)
        static.ir_version = max(static.ir_version, 4)
    by_name = {s.name: s for s in specs}
    for value in static.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, size in zip(value.type.tensor_type.shape.dim, spec.shape):
            dim.Clear()
            dim.dim_value = size
    return static


def fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold with ONNX Runtime's basic (ONNX-ops-only) optimiser."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mlci-fold-") as tmp:
        out = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def prepare_model(cfg: ModelConfig) -> PreparedModel:
    """Everything before TVM: load, check, bind, fold, hash. Raises ModelError."""
    try:
        original = cfg.path.read_bytes()
    except OSError as exc:
        raise ModelError(Status.IMPORT_FAILED, f"{cfg.path}: cannot read: {exc}") from None
    sha256 = hashlib.sha256(original).hexdigest()
    try:
        model = onnx.load_from_string(original)
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ModelError(Status.IMPORT_FAILED, f"{cfg.path}: not a valid ONNX model: {exc}") from None
    if model.ir_version > MAX_ORT_IR_VERSION:
        raise ModelError(
            Status.IMPORT_FAILED,
            f"{cfg.path}: ONNX IR version {model.ir_version} is newer than ONNX Runtime accepts "
            f"({MAX_ORT_IR_VERSION}); save the model with ir_version <= {MAX_ORT_IR_VERSION}",
        )
    specs = bind_input_shapes(model, cfg)
    static = _with_static_inputs(model, specs)
    try:
        folded = fold(static)
    except Exception as exc:
        raise ModelError(
            Status.IMPORT_FAILED, f"{cfg.path}: ONNX Runtime cannot load the model to fold it: {exc}"
        ) from None
    return PreparedModel(
        name=cfg.name,
        path=cfg.path,
        sha256=sha256,
        inputs=specs,
        original=original,
        folded=folded,
    )
