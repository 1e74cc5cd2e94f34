"""Load and check an ONNX model, bind its input shapes, fold shapes and constants.

Real exported models compute reshape targets at run time (``Shape -> Gather ->
Concat -> Reshape``), which TVM's importer cannot take. Binding every input
dimension and letting ONNX Runtime's basic optimiser fold the graph turns
those subgraphs into constants.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from mlci import reference as ort_reference
from mlci.config import InputRule, ModelConfig
from mlci.graph import walk_nodes
from mlci.results import Status

log = logging.getLogger("mlci")


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
    rule: InputRule | None = None
    """How the config asks for this input's generated values."""
    index_range: tuple[int, int] | None = None
    """[low, high) of the tables this integer input indexes (it feeds a Gather), when known."""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.float64)) * self.dtype.itemsize


@dataclass
class PreparedModel:
    name: str
    path: Path
    sha256: str
    inputs: list[InputSpec]
    original: bytes
    """The file as given."""
    folded: onnx.ModelProto
    """Shapes bound, constants folded: what TVM imports."""
    input_sets: list[dict[str, np.ndarray]] = field(default_factory=list)
    """Real inputs from the config's `inputs_file`s, checked against `inputs`."""
    external_data: bool = False
    """Weights live in files beside the model (`weights_dir`): ONNX Runtime is told where."""
    reference: bytes | None = None
    """What ONNX Runtime runs as the independent numerics reference: the file as given, made
    loadable and exact (`mlci.reference`); None when ONNX Runtime cannot run the model at all ..."""
    no_reference: str | None = None
    """... and why: the model still compiles and runs on TVM, its numerics unchecked."""
    peer: bytes | None = None
    """What ONNX Runtime is timed on: the file as given (at an IR version it loads), as a team
    shipping ONNX Runtime would run it; the same object as `reference` when nothing was changed."""

    @property
    def weights_dir(self) -> Path | None:
        """Where ONNX Runtime finds weights stored beside the model."""
        return self.path.parent if self.external_data else None


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def name_unnamed_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a name, `OpType_N` (N counts that op's unnamed nodes in graph order),
    so an error from TVM about a node says which one (TVM names nodes by name only)."""
    nodes = list(walk_nodes(model.graph))
    taken = {node.name for node in nodes if node.name}
    counts: dict[str, int] = {}
    for node in nodes:
        if node.name:
            continue
        while True:
            index = counts.get(node.op_type, 0)
            counts[node.op_type] = index + 1
            name = f"{node.op_type}_{index}"
            if name not in taken:
                break
        node.name = name
        taken.add(name)


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
        if dtype.kind not in "biuf":
            type_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
            problems.append(f"input {value.name!r} is a {type_name} tensor: mlci compiles and checks models "
                            "with numeric and boolean inputs only")
            continue
        dims = list(tensor_type.shape.dim)
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value <= 0:
                # Several exporters write -1 (or 0) for "any size"; ONNX Runtime reads it that way too.
                log.info("%s: input %r dimension %d is stored as %d: treated as dynamic",
                         cfg.path.name, value.name, axis, dim.dim_value)
        if value.name in cfg.inputs:
            shape = cfg.inputs[value.name]
            if len(shape) != len(dims):
                problems.append(
                    f"{cfg.key}.inputs.{value.name}: the model's input has rank {len(dims)}, "
                    f"the config gives {len(shape)} dimensions {shape}"
                )
                continue
            for axis, (dim, size) in enumerate(zip(dims, shape)):
                if dim.HasField("dim_value") and dim.dim_value > 0 and dim.dim_value != size:
                    problems.append(
                        f"{cfg.key}.inputs.{value.name}: dimension {axis} is fixed to "
                        f"{dim.dim_value} in the model, the config gives {size}"
                    )
            specs.append(InputSpec(value.name, tuple(shape), dtype, cfg.input_rules.get(value.name)))
            continue
        shape = []
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                shape.append(dim.dim_value)
            elif dim.HasField("dim_param") and dim.dim_param in cfg.dims:
                shape.append(cfg.dims[dim.dim_param])
            else:
                label = (f" ({dim.dim_param!r})" if dim.dim_param
                         else f" (stored as {dim.dim_value})" if dim.HasField("dim_value") else "")
                hint = (
                    f"set {cfg.key}.dims.{dim.dim_param} or {cfg.key}.inputs.{value.name}"
                    if dim.dim_param
                    else f"set {cfg.key}.inputs.{value.name}"
                )
                problems.append(
                    f"input {value.name!r} dimension {axis}{label} is dynamic and has no binding: {hint}"
                )
                shape.append(-1)
        specs.append(InputSpec(value.name, tuple(shape), dtype, cfg.input_rules.get(value.name)))
    problems += [f"{cfg.key}.inputs.{name}: the model has no input {name!r} (inputs: {', '.join(names)})"
                 for name in cfg.input_rules if name not in names and name not in cfg.inputs]
    if problems:
        raise ModelError(Status.IMPORT_FAILED, "; ".join(problems))
    check_input_memory(specs, cfg)
    return specs


INPUT_MEMORY_FRACTION = 0.25
"""Inputs may take at most this share of the machine's memory: each lives several times over (the
generated array, TVM's copy, ONNX Runtime's, each input set), and outputs and activations need room."""


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_input_memory(specs: list[InputSpec], cfg: ModelConfig, memory: int | None = None) -> None:
    """Refuse shapes whose inputs cannot fit before anything is allocated, naming the largest input."""
    memory = memory or _physical_memory()
    total = sum(s.nbytes for s in specs)
    if not memory or total <= INPUT_MEMORY_FRACTION * memory:
        return
    largest = max(specs, key=lambda s: s.nbytes)
    raise ModelError(
        Status.IMPORT_FAILED,
        f"{cfg.key}: the inputs take {total / 2**30:.1f} GiB (input {largest.name!r}, shape "
        f"{list(largest.shape)} of {largest.dtype}, alone {largest.nbytes / 2**30:.1f} GiB); this machine has "
        f"{memory / 2**30:.1f} GiB of memory: check the shapes in {cfg.key}.inputs / {cfg.key}.dims",
    )


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

    ir = ort_reference.loadable_ir(model)
    if ir is None:
        raise ValueError(f"ONNX Runtime does not load IR version {model.ir_version}, which the model needs")
    if ir != model.ir_version:
        model = _copy(model)
        model.ir_version = ir
    with tempfile.TemporaryDirectory(prefix="mlci-fold-") as tmp:
        out = Path(tmp) / "folded.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        options.log_severity_level = 3
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def fold_without_onnxruntime(model: onnx.ModelProto) -> onnx.ModelProto:
    """What TVM imports when ONNX Runtime cannot load the model: the bound shapes propagated by
    ONNX's own shape inference (with data propagation, so shape computations become known);
    TVM's importer folds what is left."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # an op the inference does not know, a model over 2 GB
        log.info("ONNX shape inference failed (%s); importing the model as bound", exc)
        return model


def reference_models(cfg: ModelConfig, original: bytes) -> tuple[bytes | None, bytes | None, str | None]:
    """(reference, peer, no_reference) for ONNX Runtime (see PreparedModel): built from the file's
    own proto, so weights stored beside it stay there (ONNX Runtime is told the folder)."""
    proto = onnx.load_from_string(original)
    try:
        ready = ort_reference.for_onnxruntime(proto, base_dir=cfg.path.parent)
    except Exception as exc:  # noqa: BLE001 - a damaged tensor: ONNX Runtime judges the file as it is
        log.warning("%s: the model could not be prepared for ONNX Runtime (%s); it runs as written", cfg.path, exc)
        return original, original, None
    if ready is None:
        return None, None, (f"ONNX Runtime {_ort_version()} does not load IR version {proto.ir_version}, which "
                            f"the model needs (it loads up to {ort_reference.MAX_ORT_IR_VERSION})")
    for change in ready.changes:
        log.info("%s: %s", cfg.name, change)
    if not ready.changes:
        return original, original, None
    reference = ready.model.SerializeToString()
    if not ready.shifted:
        return reference, reference, None
    peer = _copy(proto)
    peer.ir_version = ready.model.ir_version
    return reference, peer.SerializeToString(), None


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _external_files(model: onnx.ModelProto, directory: Path) -> list[Path]:
    """The files a model's externally stored tensors live in (sorted, each once)."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    files = {directory / ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)}
    return sorted(files)


def _load_checked(cfg: ModelConfig, original: bytes) -> tuple[onnx.ModelProto, list[Path]]:
    """The model with every tensor in memory, checked; and the external data files it read."""
    try:
        model = onnx.load_from_string(original)
        external = _external_files(model, cfg.path.parent)
        if external:
            # Weights saved beside the model (as models over 2 GB must be): the checker and the
            # loader find them relative to the model's path.
            missing = [p for p in external if not p.is_file()]
            if missing:
                raise ModelError(Status.IMPORT_FAILED, f"{cfg.path}: its weights are stored in "
                                 f"{', '.join(str(p) for p in missing)}, which does not exist")
            onnx.checker.check_model(str(cfg.path))
            model = onnx.load(str(cfg.path))
        else:
            onnx.checker.check_model(model)
    except ModelError:
        raise
    except Exception as exc:  # onnx raises several unrelated types here
        raise ModelError(Status.IMPORT_FAILED, f"{cfg.path}: not a valid ONNX model: {exc}") from None
    return model, external


def _content_sha256(original: bytes, external: list[Path], root: Path) -> str:
    """The model's identity: its file, and the weight files beside it when it has them."""
    if not external:
        return hashlib.sha256(original).hexdigest()
    digest = hashlib.sha256(original)
    for path in external:
        digest.update(b"\0" + os.path.relpath(path, root).encode() + b"\0")
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


INDEX_PASSTHROUGH = {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"}
"""Ops an index input may pass through on its way to a Gather without changing its values."""


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Graph input -> [0, n) for integer inputs used as Gather indices into a constant table of n
    rows (token ids into an embedding): values outside it make ONNX Runtime and TVM fail or
    disagree, and 0/1 alone never exercise the table."""
    sizes = {t.name: list(t.dims) for t in model.graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    ranges = {}
    for value in graph_inputs(model):
        elem = value.type.tensor_type.elem_type
        if not np.issubdtype(np.dtype(helper.tensor_dtype_to_np_dtype(elem)), np.integer):
            continue
        bounds, frontier, seen = [], [value.name], set()
        while frontier:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node, position in consumers.get(name, []):
                if node.op_type in INDEX_PASSTHROUGH and position == 0:
                    frontier.extend(node.output)
                elif node.op_type == "Gather" and position == 1 and node.input[0] in sizes:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = sizes[node.input[0]]
                    if -len(dims) <= axis < len(dims):
                        bounds.append(dims[axis])
        if bounds and min(bounds) > 0:
            ranges[value.name] = (0, min(bounds))
    return ranges


def _fits(array: np.ndarray, dtype: np.dtype) -> bool:
    """Whether a file's array may stand for an input of `dtype`: the same kind of number (float64
    for float32 is how numpy saves by default), integers within the type's range."""
    if array.dtype == dtype:
        return True
    integers = "iu"
    if array.dtype.kind in integers and dtype.kind in integers:
        info = np.iinfo(dtype)
        return array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max)
    return array.dtype.kind == dtype.kind == "f"


def load_input_sets(cfg: ModelConfig, specs: list[InputSpec]) -> list[dict[str, np.ndarray]]:
    """The config's `inputs_file`s, each an input set checked name by name against the model's
    bound inputs. Raises ModelError listing every mismatch, each naming the file and input."""
    sets, problems = [], []
    expected = {s.name: s for s in specs}
    for path in cfg.inputs_files:
        shown = f"{cfg.key}.inputs_file {path}"
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except FileNotFoundError:
            problems.append(f"{shown}: file not found")
            continue
        except Exception as exc:  # zipfile, pickle refusal and format errors differ by numpy version
            problems.append(f"{shown}: not a readable .npz file ({type(exc).__name__}: {exc})")
            continue
        for name in sorted(set(expected) - set(arrays)):
            problems.append(f"{shown}: no array named {name!r} for the model's input {name!r} "
                            f"(the file has: {', '.join(sorted(arrays)) or 'nothing'})")
        for name in sorted(set(arrays) - set(expected)):
            problems.append(f"{shown}: array {name!r} is not an input of the model "
                            f"(inputs: {', '.join(expected)})")
        chosen = {}
        for name, spec in expected.items():
            if name not in arrays:
                continue
            array = arrays[name]
            if tuple(array.shape) != spec.shape:
                problems.append(f"{shown}: input {name!r} has shape {list(array.shape)}, the model is bound "
                                f"to {list(spec.shape)} (set {cfg.key}.inputs.{name} or .dims to match)")
            elif not _fits(array, spec.dtype):
                problems.append(f"{shown}: input {name!r} is {array.dtype}, the model takes {spec.dtype}")
            else:
                chosen[name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
        sets.append(chosen)
    if problems:
        raise ModelError(Status.IMPORT_FAILED, "; ".join(problems))
    return sets


def prepare_model(cfg: ModelConfig) -> PreparedModel:
    """Everything before TVM: load, check, bind, fold, hash. Raises ModelError."""
    try:
        original = cfg.path.read_bytes()
    except OSError as exc:
        raise ModelError(Status.IMPORT_FAILED, f"{cfg.path}: cannot read: {exc}") from None
    model, external = _load_checked(cfg, original)
    sha256 = _content_sha256(original, external, cfg.path.parent)
    specs = bind_input_shapes(model, cfg)
    static = _with_static_inputs(model, specs)
    reference, peer, no_reference = reference_models(cfg, original)
    try:
        folded = fold(static)
    except Exception as exc:  # ONNX Runtime cannot load it: TVM may still compile it
        reason = _first_line(exc)
        log.warning("%s: ONNX Runtime cannot load the model (%s): shapes folded by ONNX's shape inference "
                    "instead, and its numerics have no reference", cfg.name, reason)
        folded = fold_without_onnxruntime(static)
        if no_reference is None:
            reference = peer = None
            no_reference = f"ONNX Runtime {_ort_version()} cannot load the model: {reason}"
    name_unnamed_nodes(folded)
    ranges = index_ranges(folded)
    specs = [InputSpec(s.name, s.shape, s.dtype, s.rule, ranges.get(s.name)) for s in specs]
    return PreparedModel(
        name=cfg.name,
        path=cfg.path,
        sha256=sha256,
        inputs=specs,
        original=original,
        folded=folded,
        input_sets=load_input_sets(cfg, specs),
        external_data=bool(external),
        reference=reference,
        no_reference=no_reference,
        peer=peer,
    )


def _first_line(exc: BaseException) -> str:
    """ONNX Runtime's message without its source-file prefix noise, on one line, bounded."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:400]
