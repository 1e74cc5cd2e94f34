"""Which MetaSchedule schedule traces a build may replay: only what MetaSchedule's own rules write.

A tuning record is data, until a build replays its trace. A trace may `Annotate` a loop with any
key and value, and TVM acts on some keys while lowering: `pragma_import_llvm` links the value (LLVM
IR, `module asm` included) into the library, so a record from a shared cache could run its own
machine code wherever the library is loaded (tried on TVM 0.27: a `module asm` `.init_array` entry
runs when the library loads). Records come from places less trusted than the code: an S3 tier other
repositories and pull requests write, a restored Actions cache, a local database file. So every
record is checked before it enters a database: each instruction must be one MetaSchedule's CPU and
GPU schedule rules, postprocessors and mutators emit, and each annotation key one of theirs.

Pure: works on the trace's JSON form (`[[kind, inputs, attrs, outputs], ...], decisions]`).
"""

from __future__ import annotations

import json
from typing import Any

from mlci.formatting import quoted_for_log

ALLOWED_INSTRUCTIONS = frozenset({
    # Looking blocks and loops up.
    "GetSBlock", "GetLoops", "GetChildBlocks", "GetProducers", "GetConsumers", "GetOutputBlocks",
    # Loop transformations.
    "Split", "Fuse", "Reorder", "AddUnitLoop", "Parallel", "Vectorize", "Bind", "Unroll",
    # Caching, inlining and placement.
    "CacheRead", "CacheWrite", "ReindexCacheRead", "ReindexCacheWrite", "ReIndex", "ComputeAt",
    "ReverseComputeAt", "ComputeInline", "ReverseComputeInline",
    # Reductions, layouts, tensor intrinsics (registered in TVM, looked up by name).
    "DecomposeReduction", "RFactor", "StorageAlign", "SetScope", "Blockize", "Tensorize",
    "TransformLayout", "TransformBlockLayout", "DecomposePadding", "PadEinsum",
    # Annotations (keys checked below).
    "Annotate", "Unannotate",
    # Sampling, and the marker before postprocessing.
    "SamplePerfectTile", "SamplePartitionedTile", "SampleCategorical", "SampleComputeLocation", "EnterPostproc",
})
"""Instruction kinds MetaSchedule's rules emit. Left out on purpose: the `Unsafe*` primitives,
`AnnotateBufferAccess`, `RollingBuffer`, `LoopPartition`, `Merge`, `CacheInplace`, `CacheIndex`,
`ReorderBlockIterVar`, `FuseReductionEpilogue` (schedule primitives for hand-written schedules)."""

ANNOTATION_PREFIX = "meta_schedule."
"""MetaSchedule's own annotations, read by its postprocessors and removed before code generation."""

LOWERING_ANNOTATIONS = frozenset({
    "pragma_auto_unroll_max_step", "pragma_unroll_explicit", "software_pipeline_stage",
    "software_pipeline_order", "software_pipeline_async_stages", "double_buffer_scope",
})
"""Annotations lowering reads that MetaSchedule's rules write; their values are numbers (or lists of them)."""


_ARITHMETIC = ("Add", "Sub", "Mul", "Div", "Mod", "FloorDiv", "FloorMod", "Min", "Max", "Cast", "Select",
               "EQ", "NE", "LT", "LE", "GT", "GE", "And", "Or", "Not")
EXPRESSION_NODES = frozenset({
    "None", "int", "bool", "ffi.String", "ffi.Array", "ffi.Map", "ir.PrimType", "ir.Var", "tirx.Var",
    "ir.IntImm", "tirx.IntImm", "ir.Range", "tirx.IndexMap",
    *(f"{namespace}.{op}" for namespace in ("prim", "tirx") for op in _ARITHMETIC),
})
"""Object types an instruction's embedded TVM object (a layout's index map) may hold: index arithmetic.
A call (`call_extern` of a C function) in an index expression would run inside the kernel."""


def refusal(trace: Any) -> str | None:
    """Why a record's trace must not be replayed, or None when it holds only what MetaSchedule
    writes. Raises nothing: a malformed trace is refused too."""
    if not (isinstance(trace, list) and len(trace) == 2 and isinstance(trace[0], list)):
        return "its schedule trace is malformed"
    for inst in trace[0]:
        if not (isinstance(inst, list) and len(inst) == 4 and isinstance(inst[0], str)):
            return "its schedule trace holds a malformed instruction"
        kind, inputs, attrs, _outputs = inst
        if kind not in ALLOWED_INSTRUCTIONS:
            return f"its schedule trace holds {quoted_for_log(kind, 60)}, which MetaSchedule's rules never write"
        for node_type in _embedded_types([inputs, attrs]):
            if node_type not in EXPRESSION_NODES:
                return f"its schedule trace gives {kind} a {quoted_for_log(node_type, 60)}, which is not index arithmetic"
        if kind in ("Annotate", "Unannotate"):
            key = attrs[0] if isinstance(attrs, list) and attrs and isinstance(attrs[0], str) else None
            if key is None:
                return f"its schedule trace holds {kind} without a key"
            if key.startswith(ANNOTATION_PREFIX):
                continue
            if key not in LOWERING_ANNOTATIONS:
                return (f"its schedule trace annotates a loop with {quoted_for_log(key, 60)}, which MetaSchedule's rules "
                        "never write" + (" (it links native code into the build)" if "import" in key else ""))
            value = inputs[1] if kind == "Annotate" and isinstance(inputs, list) and len(inputs) == 2 else 0
            if not _numbers(value):
                return f"its schedule trace gives {quoted_for_log(key, 60)} a value that is not a number"
    return None


def _embedded_types(value: Any) -> list[str]:
    """The object types of the TVM objects (saved as JSON text) inside an instruction's operands."""
    if isinstance(value, list):
        return [t for v in value for t in _embedded_types(v)]
    if not (isinstance(value, str) and value.lstrip().startswith("{")):
        return []
    try:
        graph = json.loads(value)
    except ValueError:
        return ["<text that is not a TVM object>"]
    nodes = graph.get("nodes") if isinstance(graph, dict) else None
    if not isinstance(nodes, list):
        return ["<text that is not a TVM object>"]
    return [str(node.get("type")) if isinstance(node, dict) else "<malformed node>" for node in nodes]


def _numbers(value: Any) -> bool:
    """An integer, or a list of them (a software pipeline's stages)."""
    if isinstance(value, list):
        return all(_numbers(v) and not isinstance(v, list) for v in value)
    return isinstance(value, int) and not isinstance(value, bool)
