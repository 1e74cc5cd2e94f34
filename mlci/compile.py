"""ONNX -> Relax -> fused kernels -> (tuned) build -> exported library."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from mlci import converters, diagnose
from mlci.models import ModelError, PreparedModel, walk_nodes
from mlci.results import Status

log = logging.getLogger("mlci")

def unsupported_nodes(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Operator -> names of the nodes neither TVM's ONNX importer nor mlci's converters take."""
    found: dict[str, list[str]] = defaultdict(list)
    for node in walk_nodes(model.graph):
        if converters.provider(node.domain, node.op_type) is None:
            op = converters.qualified(node.domain, node.op_type)
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
    """Relax IRModule with weights bound as constants; raises ModelError(import_failed) naming the
    ONNX node that failed to convert, with TVM's message (the traceback goes to the log)."""
    found = unsupported_nodes(prepared.folded)
    if found:
        raise ModelError(Status.IMPORT_FAILED, describe_unsupported(found))
    from tvm.relax.frontend.onnx import from_onnx

    converters.install()

    shapes = {s.name: list(s.shape) for s in prepared.inputs}
    dtypes = {s.name: str(s.dtype) for s in prepared.inputs}
    try:
        # TVM's importer prints every input of a node it fails on (whole weight tensors) to stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            return from_onnx(prepared.folded, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    except converters.ConverterError as exc:  # mlci's converters name the node themselves
        raise ModelError(Status.IMPORT_FAILED, str(exc)) from None
    except diagnose.NodeConversionError as exc:
        log.info("%s: converting %s node %r failed:\n%s", prepared.name, exc.op, exc.node,
                 "".join(traceback.format_exception(exc.cause)))
        raise ModelError(Status.IMPORT_FAILED, f"TVM's ONNX importer failed on {exc}") from None
    except MemoryError:
        raise ModelError(Status.IMPORT_FAILED, "TVM's ONNX importer ran out of memory") from None
    except Exception as exc:
        log.info("%s: TVM's ONNX importer failed:\n%s", prepared.name, "".join(traceback.format_exception(exc)))
        shape_input = re.match(r"Node (\S*) cannot handle ShapeExpr inputs", str(exc))
        if shape_input:
            name = shape_input.group(1)
            op = next((n.op_type for n in walk_nodes(prepared.folded.graph) if n.name == name), "?")
            raise ModelError(Status.IMPORT_FAILED,
                             f"TVM's ONNX importer failed on {op} node {name!r}: TVM cannot give it a shape computed "
                             "in the model (a Shape output) as an input") from None
        raise ModelError(Status.IMPORT_FAILED, f"TVM's ONNX importer failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return diagnose.tvm_message(exc)


def prepacks_weights(tvm_target: Any) -> bool:
    """On CPU, tuned schedules may store weights in the layout their loops read best (MetaSchedule's
    layout rewrite); that needs the weights marked layout-free before tuning. GPU schedules read
    weights as they are."""
    return tvm_target.kind.name == "llvm"


CPU_CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
"""Convolutions on CPU run channels-last, weights with output channels innermost: the vector
axis is then the channel axis (16, 64, 256... wide) rather than the image width (55, 27, 13 in
SqueezeNet, rarely a multiple of the vector width). Measured on SqueezeNet, 2 cores, 256 trials
from an empty cache: 6.6 ms channels-last against 8.5 ms channels-first."""


CONV_CHANNEL_MULTIPLE = 32
"""On CPU a convolution's output channels are padded up to a multiple of this (twice the 16 float32
lanes of AVX-512), when that adds at most `CONV_CHANNEL_PAD_LIMIT` of its work; the padded channels
are sliced off its output. 1000 classes = 8 x 125 leave a vectorized tile a part-filled register
and few ways to split; 1024 tile cleanly. SqueezeNet's 1000-class 1x1 convolution alone, 2 cores,
128 trials each: 2.66 ms with 1000 channels, 0.98 ms with 1024 (2.3 ms with 1008 = 16 x 63)."""
CONV_CHANNEL_PAD_LIMIT = 1 / 8


def _from_constants(expr: Any, lookup: Callable[[Any], Any]) -> bool:
    """Whether `expr` is computed from constants alone (so folding turns it into one)."""
    import tvm
    from tvm import relax

    if isinstance(expr, relax.Var):
        bound = lookup(expr)
        return bound is not None and _from_constants(bound, lookup)
    if isinstance(expr, tvm.ir.GenericConst):
        return True
    if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
        return all(_from_constants(arg, lookup) for arg in expr.args if not isinstance(arg, relax.ShapeExpr))
    return False


def padded_channels(channels: int) -> int:
    """Output channels a channels-last CPU convolution is computed with (see CONV_CHANNEL_MULTIPLE)."""
    padded = -(-channels // CONV_CHANNEL_MULTIPLE) * CONV_CHANNEL_MULTIPLE
    return padded if padded - channels <= channels * CONV_CHANNEL_PAD_LIMIT else channels


def pad_conv_channels(mod: Any) -> Any:
    """Channels-last convolutions with constant weights computed on `padded_channels` output channels
    (the weights padded with zeros, folded at compile time), the extra channels sliced off."""
    import tvm
    from tvm import relax

    conv2d = tvm.ir.Op.get("relax.nn.conv2d")

    @relax.expr_functor.mutator
    class Pad(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = self.visit_expr_post_order(call)
            if not call.op.same_as(conv2d):
                return call
            attrs, weight = call.attrs, call.args[1]
            layouts = (attrs.data_layout, attrs.kernel_layout, attrs.out_layout)
            ty = getattr(weight, "ty", None)
            shape = ty.shape.values if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) else []
            if (layouts != ("NHWC", "HWIO", "NHWC") or attrs.groups != 1 or len(shape) != 4
                    or not isinstance(shape[3], tvm.tirx.IntImm) or not _from_constants(weight, self.lookup_binding)):
                return call
            channels = int(shape[3])
            padded = padded_channels(channels)
            if padded == channels:
                return call
            weight = self.builder_.emit(relax.op.nn.pad(weight, [0, 0, 0, 0, 0, 0, 0, padded - channels]))
            conv = self.builder_.emit(relax.op.nn.conv2d(
                call.args[0], weight, strides=attrs.strides, padding=attrs.padding, dilation=attrs.dilation,
                groups=1, data_layout="NHWC", kernel_layout="HWIO", out_layout="NHWC", out_dtype=attrs.out_dtype))
            return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[channels])

    return _rewrite_relax_functions(mod, Pad)


def _rewrite_relax_functions(mod: Any, mutator: Callable[[Any], Any]) -> Any:
    """A copy of the module with every Relax function rewritten by `mutator(mod)` (a pass leaves
    its input as it was)."""
    from tvm import relax

    mod = mod.clone()
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mod[gvar] = mutator(mod).visit_expr(func)
    return mod


LOWERING_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}
"""TIR lowering options for every build of a kernel, in the tuning builder as at build, so a
candidate's timing is the kernel that ships. Loops with constant bounds are split where a
condition inside them changes value (a padding edge, a concatenation's seam): the branch leaves
the inner loop, which then vectorizes. SqueezeNet untuned, 2 cores: 9-10 ms against 12.
CPU only: GPU builds are left as TVM makes them until measured on a GPU."""


def lowering_config(tvm_target: Any) -> dict[str, Any]:
    return LOWERING_CONFIG if tvm_target.kind.name == "llvm" else {}


def converts_conv_layout(tvm_target: Any) -> bool:
    return tvm_target.kind.name == "llvm"


FOLD_TARGET = {"kind": "llvm", "opt-level": 0}
"""Where constant expressions are evaluated at compile time: on this CPU, without LLVM's
optimisations (the code runs once, on weights; data movement needs none)."""


def _constant_tensor(expr: Any, lookup: Callable[[Any], Any]) -> Any:
    """The tensor constant `expr` is, directly or through a binding; None otherwise."""
    import tvm

    if isinstance(expr, tvm.relax.Var):
        expr = lookup(expr)
    if isinstance(expr, tvm.ir.GenericConst) and isinstance(expr.value, tvm.runtime.Tensor):
        return expr
    return None


def _static_tensor_types(types: Any) -> list[Any] | None:
    """The tensor types a kernel call writes (one, or a tuple's), when every shape is known."""
    import tvm
    from tvm import relax

    if len(types) == 1 and isinstance(types[0], relax.TupleType):
        types = types[0].fields
    if not all(isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr) for ty in types):
        return None
    if not all(isinstance(dim, tvm.tirx.IntImm) for ty in types for dim in ty.shape.values):
        return None
    return list(types)


def fold_constants(mod: Any) -> Any:
    """Relax's FoldConstant, with every kernel call whose inputs are all constants (weight layout
    changes: a channels-last transpose, a packing for a tuned schedule) built together and run.
    FoldConstant builds each of those kernels on its own with full optimisation: on SqueezeNet,
    4.3-5.1 s against 0.9 s this way, once at import and again in every build. Chains fold over
    rounds; FoldConstant then takes whatever else is left."""
    from tvm import relax

    for _ in range(16):  # chains of constant kernels are a few calls deep; this only bounds the loop
        foldable = _constant_calls(mod)
        if not foldable:
            break
        mod = _replace_calls(mod, _evaluate(mod, foldable))
    return relax.transform.FoldConstant()(mod)


ConstantCall = tuple[Any, list[Any], list[Any]]
"""A kernel call with constant inputs: the kernel's GlobalVar, its input constants, its output types."""


def _constant_calls(mod: Any) -> dict[Any, ConstantCall]:
    """The kernel calls of the module's Relax functions whose inputs are all constant tensors."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: dict[Any, ConstantCall] = {}

    @relax.expr_functor.mutator
    class Find(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            if call.op.same_as(call_tir) and len(call.args) == 2 and isinstance(call.args[1], relax.Tuple):
                args = [_constant_tensor(arg, self.lookup_binding) for arg in call.args[1].fields]
                outs = _static_tensor_types(call.ty_args)
                if outs is not None and all(arg is not None for arg in args):
                    found[call] = (call.args[0], args, outs)
            return super().visit_call_(call)

    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            Find(mod).visit_expr(func)
    return found


def _evaluate(mod: Any, calls: dict[Any, ConstantCall]) -> dict[Any, Any]:
    """Build the kernels of `calls` as one library on this CPU and run each call: call -> its result."""
    import tvm
    from tvm import relax

    target = tvm.target.Target(FOLD_TARGET)
    kernels = tvm.IRModule({
        gvar.name_hint: mod[gvar].with_attr("global_symbol", gvar.name_hint).with_attr("target", target)
        for gvar, _args, _outs in calls.values()
    })
    library = tvm.compile(kernels, target=target)
    values = {}
    for call, (gvar, args, outs) in calls.items():
        results = [tvm.runtime.empty([int(dim) for dim in out.shape.values], out.dtype, tvm.cpu()) for out in outs]
        library[gvar.name_hint](*[arg.value for arg in args], *results)
        consts = [relax.const(result, out.dtype) for result, out in zip(results, outs, strict=True)]
        single = len(call.ty_args) == 1 and isinstance(call.ty_args[0], relax.TensorType)
        values[call] = consts[0] if single else relax.Tuple(consts)
    return values


def _replace_calls(mod: Any, values: dict[Any, Any]) -> Any:
    """A copy of the module with each call in `values` replaced by its value, and what that leaves
    unused removed."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Replace(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            return values[call] if call in values else super().visit_call_(call)

    return relax.transform.DeadCodeElimination()(_rewrite_relax_functions(mod, Replace))


def _module_pass(function: Callable[[Any], Any]) -> Any:
    import tvm

    return tvm.transform.module_pass(lambda mod, _ctx: function(mod), opt_level=0, name=f"mlci.{function.__name__}")


def uses_op(mod: Any, op_name: str) -> bool:
    """Whether any Relax function of the module calls the operator `op_name` (e.g. relax.nn.conv2d)."""
    import tvm
    from tvm import relax

    op = tvm.ir.Op.get(op_name)
    found = []

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.same_as(op):
            found.append(expr)

    for _gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
            if found:
                return True
    return False


_layout_warnings: set[tuple[str, int]] = set()
"""(pass, module hash) warned about already: tuning and build run the same passes on the same model."""


def layout_pass(name: str, passes: list[Any], only_if_op: str) -> Any:
    """`passes` in turn, on a module that calls `only_if_op` (a layout change pays for the kernels it
    changes, and costs copies around everything else); when one fails, the module as it came, with
    one warning naming the pass: a layout choice never fails a model."""
    import tvm
    import tvm_ffi

    def run(mod: Any, _ctx: Any) -> Any:
        if not uses_op(mod, only_if_op):
            return mod
        try:
            return tvm.transform.Sequential(passes)(mod)
        except Exception as exc:  # noqa: BLE001 - TVM's layout inference has gaps for some ops
            key = (name, tvm_ffi.structural_hash(mod))
            if key not in _layout_warnings:
                _layout_warnings.add(key)
                log.warning("%s failed (%s): the model keeps its own layout", name, _first_line(exc))
            return mod

    return tvm.transform.module_pass(run, opt_level=0, name=name)


def _fusion_passes(tvm_target: Any) -> list[Any]:
    """The same preparation at tuning and at build, so every tuned workload matches its kernel."""
    from tvm import relax
    from tvm.relax import pipeline

    try:
        dispatch = list(pipeline.library_dispatch_passes(tvm_target))
    except (ValueError, AttributeError):
        dispatch = []
    if converts_conv_layout(tvm_target):
        dispatch[:0] = [layout_pass("the channels-last layout pass (ConvertLayout to NHWC)",
                                    [relax.transform.ConvertLayout(CPU_CONV_LAYOUT), _module_pass(pad_conv_channels)],
                                    only_if_op="relax.nn.conv2d")]
    passes = [
        *dispatch,
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        _module_pass(fold_constants),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if prepacks_weights(tvm_target):
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    return passes


def _lowering_passes(tvm_target: Any) -> list[Any]:
    """Relax's own lowering after scheduling (those of `compile_relax`)."""
    from tvm import relax
    from tvm.relax import pipeline

    try:
        return [*pipeline.dataflow_lower_passes(tvm_target), *pipeline.finalize_passes(tvm_target)]
    except (ValueError, AttributeError):  # targets without a registered pipeline (plain CPU)
        return [
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            relax.transform.StaticPlanBlockMemory(),
            relax.transform.LowerAllocTensor(),
            relax.transform.KillAfterLastUse(),
            relax.transform.LowerRuntimeBuiltin(),
            relax.transform.ComputePrimValue(),
            relax.transform.VMShapeLower(),
            relax.transform.AttachGlobalSymbol(),
        ]


def fuse_for_tuning(mod: Any, tvm_target: Any) -> Any:
    """The imported model as kernels (the passes a build runs before scheduling); raises
    ModelError(import_failed) naming the TVM pass that failed."""
    import tvm

    tracker = diagnose.PassTracker()
    try:
        with tvm_target, diagnose.tracked_passes(tracker):
            return tvm.transform.Sequential(_fusion_passes(tvm_target))(mod)
    except MemoryError:
        raise ModelError(Status.IMPORT_FAILED, f"out of memory{diagnose.in_pass(tracker)}") from None
    except Exception as exc:
        log.info("preparing the model's kernels failed%s:\n%s", diagnose.in_pass(tracker),
                 "".join(traceback.format_exception(exc)))
        raise ModelError(Status.IMPORT_FAILED, f"TVM failed{diagnose.in_pass(tracker)}: {_first_line(exc)}") from None


SCHEDULED_ATTR = "tirx.is_scheduled"

DefaultSchedule = Callable[[Any], bool]
"""Schedules a kernel with no tuned record in place (a TIR Schedule); False when it does not apply."""


@dataclass
class BuildReport:
    """How each kernel of a build was scheduled: a silent fallback to naive code shows here."""

    kernels: list[str] = field(default_factory=list)
    tuned: list[str] = field(default_factory=list)
    """Kernels compiled with their best tuned record from the cache."""
    default: list[str] = field(default_factory=list)
    """Kernels without a usable record, compiled with the rule-based default schedule."""
    fallbacks: dict[str, str] = field(default_factory=dict)
    """Kernel -> why its tuned record could not be applied (it fell back alone)."""
    kept_default: list[str] = field(default_factory=list)
    """Kernels whose default schedule measured faster than their best tuned record (also in `default`)."""

    @property
    def naive(self) -> list[str]:
        scheduled = {*self.tuned, *self.default}
        return [k for k in self.kernels if k not in scheduled]


@dataclass(frozen=True)
class BuildChoice:
    """A quick paired timing of the tuned build and the build with default schedules only."""

    tuned_ms: float
    default_ms: float

    @property
    def kept(self) -> str:
        """The tuned build unless the default one is faster by more than the timing's noise."""
        return "default" if self.default_ms < self.tuned_ms * (1 - NEVER_WORSE_MARGIN) else "tuned"


NEVER_WORSE_MARGIN = 0.03
"""How much faster the default-schedule build must time before it replaces the tuned one."""


def workload_key(func: Any) -> str:
    """The structural hash MetaSchedule files a kernel's records under (a tuning task's key)."""
    import tvm
    import tvm_ffi

    if isinstance(func, tvm.tirx.PrimFunc):
        func = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return f"{tvm_ffi.structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}"


def _is_scheduled(func: Any) -> bool:
    return bool(func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False))


def apply_schedules(fused: Any, tvm_target: Any, database: Any, default_schedule: DefaultSchedule | None,
                    report: BuildReport, keep_default: frozenset[str] = frozenset()) -> Any:
    """Give every kernel of the fused module its best record from `database`, one kernel at a time,
    so a record that fails to apply costs that kernel alone; kernels left unscheduled, and those
    whose default schedule measured faster than their record (`keep_default`, workload keys), get
    `default_schedule` where it applies."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    def apply(db: Any, gvar: Any, func: Any) -> Any:
        with db:
            return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(tvm.IRModule({gvar: func}))[gvar]

    defaults = ms.database.ScheduleFnDatabase(default_schedule) if default_schedule is not None else None
    updates = {}
    for gvar, func in fused.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        name = gvar.name_hint
        report.kernels.append(name)
        if _is_scheduled(func):  # scheduled by the importer or a library dispatch
            report.tuned.append(name)
            continue
        scheduled = func
        if defaults is not None and keep_default and workload_key(func) in keep_default:
            report.kept_default.append(name)
        else:
            try:
                scheduled = apply(database, gvar, func)
            except Exception as exc:  # noqa: BLE001 - one kernel's bad record must not fail the model
                report.fallbacks[name] = _first_line(exc)
                log.warning("kernel %s: its tuned schedule could not be applied (%s); it falls back alone",
                            name, report.fallbacks[name])
        if _is_scheduled(scheduled):
            report.tuned.append(name)
        elif defaults is not None:
            try:
                scheduled = apply(defaults, gvar, func)
            except Exception as exc:  # noqa: BLE001
                log.warning("kernel %s: the default schedule failed (%s); left as plain loops", name, _first_line(exc))
            if _is_scheduled(scheduled):
                report.default.append(name)
        updates[gvar] = scheduled
    for gvar, func in updates.items():
        fused[gvar] = func
    return fused


def empty_database() -> Any:
    """No tuned records: a build with default schedules only."""
    from tvm.s_tir import meta_schedule as ms

    return ms.database.MemoryDatabase()


def build(mod: Any, tvm_target: Any, database: Any, default_schedule: DefaultSchedule | None = None,
          keep_default: frozenset[str] = frozenset()) -> tuple[Any, BuildReport]:
    """Compile with the best cached schedule of each kernel (weights pre-packed into the layout
    the schedule chose, on CPU); kernels without one get `default_schedule`, and on GPU DLight's
    rules. Raises ModelError(compile_failed)."""
    import tvm
    from tvm import relax
    from tvm.ir.transform import PassContext
    from tvm.relax.pipeline import BackendDispatcher
    from tvm.s_tir import dlight as dl

    report = BuildReport()
    scheduled: list[Any] = []

    @tvm.transform.module_pass(opt_level=3)
    def schedule_and_lower(mod: Any, _ctx: Any) -> Any:
        mod = tvm.transform.Sequential(_fusion_passes(tvm_target))(mod)
        mod = apply_schedules(mod, tvm_target, database, default_schedule, report, keep_default)
        scheduled.append(mod)
        if prepacks_weights(tvm_target):
            # The packing the schedules ask for becomes its own function, folded into the weights here.
            mod = prepack_weights(mod)
        if BackendDispatcher.is_gpu_target(tvm_target):
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
        return tvm.transform.Sequential(_lowering_passes(tvm_target))(mod)

    tracker = diagnose.PassTracker()
    try:
        with tvm_target, PassContext(opt_level=3, config=lowering_config(tvm_target)), diagnose.tracked_passes(tracker):
            executable = relax.build(mod, target=tvm_target, relax_pipeline=schedule_and_lower)
    except Exception as exc:
        raise build_error(exc, tracker, scheduled[-1] if scheduled else None, tvm_target) from None
    return executable, report


def prepack_weights(mod: Any) -> Any:
    """The weight packing the schedules ask for split into its own function and folded into the
    weights. TVM's pass fails on some kernels without a compute block (a scan such as CumSum's):
    the module is then built as it is, each kernel packing its weights as it runs (same numbers,
    slower), with one warning."""
    from tvm import relax

    try:
        split = relax.transform.SplitLayoutRewritePreproc()(mod)
    except Exception as exc:  # noqa: BLE001 - TVM raises its own error types
        log.warning("weights not pre-packed: TVM pass SplitLayoutRewritePreproc failed (%s); each kernel "
                    "packs its weights as it runs", _first_line(exc))
        return mod
    return fold_constants(split)


def build_error(exc: BaseException, tracker: diagnose.PassTracker, scheduled: Any, tvm_target: Any) -> ModelError:
    """A failed build as a ModelError naming the kernel that does not build (found by building each
    alone) or else the TVM pass that failed, with TVM's message; the traceback goes to the log."""
    where = diagnose.in_pass(tracker)
    log.info("TVM build failed%s:\n%s", where, "".join(traceback.format_exception(exc)))
    if isinstance(exc, MemoryError):
        return ModelError(Status.COMPILE_FAILED, f"TVM build ran out of memory{where}")
    if scheduled is not None:
        found = diagnose.failing_kernel(scheduled, tvm_target)
        if found is not None:
            kernel, message = found
            return ModelError(Status.COMPILE_FAILED, f"TVM build failed in kernel {kernel!r}{where}: {message}")
    return ModelError(Status.COMPILE_FAILED, f"TVM build failed{where}: {_first_line(exc)}")


def export_library(executable: Any, path: Path, cc: str | None = None) -> Path:
    """Link the executable into a shared library; `cc` links it for another CPU (a cross compiler)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if cc is None:
        executable.export_library(str(path))
    else:
        from tvm.support import cc as tvm_cc

        executable.export_library(str(path), fcompile=tvm_cc.cross_compiler(cc))
    return path


def load_library(path: Path) -> Any:
    """An exported library, ready for a VirtualMachine."""
    import tvm

    return tvm.runtime.load_module(str(path))
