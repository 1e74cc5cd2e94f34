"""ONNX -> Relax -> fused kernels -> (tuned) build -> exported library."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import onnx

from mlci.models import ModelError, PreparedModel
from mlci.results import Status

_DIRECTLY_HANDLED = {"If", "Constant"}


def supported_onnx_ops() -> set[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map()) | _DIRECTLY_HANDLED


def _walk_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _walk_nodes(sub)


def unsupported_nodes(model: onnx.ModelProto, supported: set[str]) -> dict[str, list[str]]:
    """Op type -> names of the nodes TVM's ONNX importer has no converter for."""
    found: dict[str, list[str]] = defaultdict(list)
    for node in _walk_nodes(model.graph):
        custom_domain = node.domain not in ("", "ai.onnx")
        if custom_domain or node.op_type not in supported:
            op = f"{node.domain}.{node.op_type}" if custom_domain else node.op_type
            found[op].append(node.name or f"<unnamed {node.op_type}>")
    return dict(found)


def describe_unsupported(found: dict[str, list[str]], limit: int = 5) -> str:
    parts = []
    for op, nodes in sorted(found.items()):
        shown = ", ".join(repr(n) for n in nodes[:limit])
        more = f" and {len(nodes) - limit} more" if len(nodes) > limit else ""
        parts.append(f"{op} (node{'s' if len(nodes) > 1 else ''} {shown}{more})")
    return "unsupported ONNX operator(s) for TVM: " + "; ".join(parts)


def import_relax(prepared: PreparedModel) -> Any:
    """Relax IRModule with weights bound as constants; raises ModelError(import_failed)."""
    found = unsupported_nodes(prepared.folded, supported_onnx_ops())
    if found:
        raise ModelError(Status.IMPORT_FAILED, describe_unsupported(found))
    from tvm.relax.frontend.onnx import from_onnx

    shapes = {s.name: list(s.shape) for s in prepared.inputs}
    dtypes = {s.name: str(s.dtype) for s in prepared.inputs}
    try:
        return from_onnx(prepared.folded, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except Exception as exc:
        raise ModelError(Status.IMPORT_FAILED, f"TVM's ONNX importer failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # TVM errors carry a C++ traceback; the message a user needs is its last line.
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line.strip()[:500]
    return lines[-1].strip()[:500] if lines else type(exc).__name__


def _fusion_passes(tvm_target: Any) -> list[Any]:
    """The same preparation `compile_relax` applies, so tuned workloads match at build time."""
    from tvm import relax
    from tvm.relax import pipeline

    try:
        dispatch = list(pipeline.library_dispatch_passes(tvm_target))
    except (ValueError, AttributeError):
        dispatch = []
    return [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def fuse_for_tuning(mod: Any, tvm_target: Any) -> Any:
    import tvm

    with tvm_target:
        return tvm.transform.Sequential(_fusion_passes(tvm_target))(mod)


def build(mod: Any, tvm_target: Any, database: Any) -> Any:
    """Compile with the best cached schedule of each kernel; untuned kernels stay naive on
    CPU and get DLight's default schedules on GPU. Raises ModelError(compile_failed)."""
    from tvm.s_tir import meta_schedule as ms

    try:
        return ms.relax_integration.compile_relax(database, mod, tvm_target, params=None)
    except Exception as exc:
        raise ModelError(Status.COMPILE_FAILED, f"TVM build failed: {_first_line(exc)}") from None


def export_library(executable: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(path))
    return path
