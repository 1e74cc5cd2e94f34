"""Standard ONNX operators whose TVM converter computes something else than ONNX specifies.

Each was found by running the ONNX backend node tests through mlci (`bench/onnx_conformance.py`):
TVM's converter gave a wrong shape or wrong values without an error, or failed on a case the
specification allows. A converter here either computes what ONNX specifies or, where mlci
cannot (random outputs of training-mode nodes), refuses the node by name: a refused node fails
the import with a message saying why, never a silent wrong answer.

TVM keys converters by op_type alone, so `Attention` here also receives ONNX Runtime's contrib
`com.microsoft.Attention` (it has a `num_heads` attribute): that one goes to TVM's converter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from mlci.diagnose import ConverterError

REFUSED = "refused by mlci"
"""Starts the message of a node mlci refuses: the import fails naming the node and the reason."""


def _node(op: str, attr: dict[str, Any]) -> str:
    name = attr.get("tvm_custom", {}).get("name") or "<unnamed>"
    return f"{op} node {name!r}"


def _outputs(attr: dict[str, Any]) -> int:
    return int(attr.get("tvm_custom", {}).get("num_outputs", 1))


def _refuse(op: str, attr: dict[str, Any], why: str) -> ConverterError:
    return ConverterError(f"{_node(op, attr)}: {REFUSED}: {why}")


def _static(op: str, attr: dict[str, Any], what: str, expr: Any) -> list[int]:
    values = getattr(getattr(expr.ty, "shape", None), "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        raise ConverterError(f"{_node(op, attr)}: {what} needs a static shape, got {expr.ty}")
    return [int(v) for v in values]


def _dtype_of(expr: Any) -> str:
    return str(expr.ty.dtype)


def _optional(inputs: Any, index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


def _constant_value(expr: Any, params: Any) -> np.ndarray | None:
    """The value of an input known at import time (an initializer or a folded constant)."""
    if expr is None:
        return None
    found = onnx_frontend.get_constant(expr, params)
    return found.value.numpy() if isinstance(found, tvm.ir.GenericConst) else None


def _const(value: Any) -> Any:
    """A constant in the array's own type (relax.const alone makes int64 int32 and float64 float32)."""
    array = np.asarray(value)
    return relax.const(array, str(array.dtype))


def _stock(name: str, opset: int) -> Any:
    """TVM's own converter for `name` at this opset."""
    return getattr(onnx_frontend, name).get_converter(opset)


def _stock_unless(name: str, refusal: Callable[[Any, dict[str, Any]], str | None]) -> Any:
    """A `get_converter` that refuses a node when `refusal(inputs, attr)` says why, and hands the
    rest to TVM's own converter."""

    def get_converter(cls: Any, opset: int) -> Any:
        stock = _stock(name, opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            why = refusal(inputs, attr)
            if why:
                raise _refuse(name, attr, why)
            return stock(bb, inputs, attr, params)

        return convert

    return classmethod(get_converter)


def _text(value: Any) -> str:
    """A string attribute as TVM's importer hands it over (bytes) or as given."""
    return value.decode() if isinstance(value, bytes) else str(value)


class LayerNormalization(OnnxOpConverter):
    """TVM returns scalar placeholders for the optional Mean and InvStdDev outputs; they are
    computed here (over the normalized axes, kept as size-1 dimensions, in float32 by default)."""

    @classmethod
    def _impl_v17(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x, scale, bias = inputs[0], inputs[1], _optional(inputs, 2)
        shape = _static("LayerNormalization", attr, "input 'X'", x)
        axis = int(attr.get("axis", -1))
        axis = axis + len(shape) if axis < 0 else axis
        axes = list(range(axis, len(shape)))
        epsilon = float(attr.get("epsilon", 1e-5))
        dtype = _dtype_of(x)
        stash = "float32" if int(attr.get("stash_type", 1)) == 1 else dtype
        if bias is None:
            bias = relax.const(np.zeros(_static("LayerNormalization", attr, "input 'Scale'", scale), dtype), dtype)
        y = relax.op.nn.layer_norm(x, scale, bias, axes, epsilon)
        if _outputs(attr) == 1:
            return y
        xs = bb.normalize(relax.op.astype(x, stash) if stash != dtype else x)
        mean = bb.normalize(relax.op.mean(xs, axes, keepdims=True))
        centered = bb.normalize(relax.op.subtract(xs, mean))
        variance = relax.op.mean(relax.op.multiply(centered, centered), axes, keepdims=True)
        inv_std = relax.op.rsqrt(relax.op.add(variance, relax.const(epsilon, stash)))
        return relax.Tuple([y, mean, inv_std])


class Dropout(OnnxOpConverter):
    """At inference Dropout is the identity and its mask all true (TVM's mask is float); in
    training mode with a ratio above 0 the output is random: refused."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        return cls._identity(bb, inputs[0], attr)

    @classmethod
    def _impl_v12(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        training = _optional(inputs, 2)
        if training is not None:
            value = _constant_value(training, params)
            if value is None:
                raise _refuse("Dropout", attr, "its training_mode is computed at run time")
            if bool(np.asarray(value).reshape(-1)[0]):
                ratio = _constant_value(_optional(inputs, 1), params)
                ratio = 0.5 if ratio is None and _optional(inputs, 1) is None else ratio
                if ratio is None or float(np.asarray(ratio).reshape(-1)[0]) != 0.0:
                    raise _refuse("Dropout", attr, "training_mode is true, so its output is random")
        return cls._identity(bb, inputs[0], attr)

    @classmethod
    def _identity(cls, bb: Any, x: Any, attr: dict[str, Any]) -> Any:
        if _outputs(attr) == 1:
            return x
        shape = _static("Dropout", attr, "input 'data'", x)
        return relax.Tuple([x, relax.const(np.ones(shape, bool), "bool")])


class BatchNormalization(OnnxOpConverter):
    """Training mode (batch statistics, running-statistics outputs) is not what mlci deploys:
    refused; inference goes to TVM's converter."""

    get_converter = _stock_unless("BatchNormalization", lambda inputs, attr: (
        "training_mode computes batch statistics; mlci compiles models for inference"
        if int(attr.get("training_mode", 0)) or _outputs(attr) > 1 else None))


class IsInf(OnnxOpConverter):
    """TVM ignores detect_positive and detect_negative."""

    @classmethod
    def _impl_v10(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x = inputs[0]
        found = relax.op.isinf(x)
        zero = relax.const(0, _dtype_of(x))
        if not int(attr.get("detect_positive", 1)):
            found = relax.op.logical_and(found, relax.op.less(x, zero))
        if not int(attr.get("detect_negative", 1)):
            found = relax.op.logical_and(found, relax.op.greater(x, zero))
        return found


class Mod(OnnxOpConverter):
    """Float Mod with fmod=0 is numpy's mod (the result takes the divisor's sign): TVM's floor_mod
    computes a - floor(a / b) * b, NaN for an infinite divisor. Integers and fmod=1 go to TVM."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("Mod", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            a, b = inputs[0], inputs[1]
            if int(attr.get("fmod", 0)) or not _dtype_of(a).startswith("float"):
                return stock(bb, inputs, attr, params)
            r = bb.normalize(relax.op.mod(a, b))  # C's fmod: the sign of the dividend
            zero = relax.const(0, _dtype_of(a))
            fix = relax.op.logical_and(relax.op.not_equal(r, zero),
                                       relax.op.logical_xor(relax.op.less(r, zero), relax.op.less(b, zero)))
            return relax.op.where(fix, relax.op.add(r, b), r)

        return convert


class Sinh(OnnxOpConverter):
    """TVM's LLVM backend has no sinh intrinsic (the build fails): (e^x - e^-x) / 2."""

    combine = staticmethod(relax.op.subtract)

    @classmethod
    def _impl_v9(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x = inputs[0]
        half = relax.const(0.5, _dtype_of(x))
        return relax.op.multiply(cls.combine(relax.op.exp(x), relax.op.exp(relax.op.negative(x))), half)


class Cosh(Sinh):
    """TVM's LLVM backend has no cosh intrinsic (the build fails): (e^x + e^-x) / 2."""

    combine = staticmethod(relax.op.add)


class Pow(OnnxOpConverter):
    """TVM's power takes floats only: an integer base is raised in float64 and rounded back
    (exact while the result fits 53 bits)."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("Pow", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            base, exponent = inputs[0], inputs[1]
            dtype = _dtype_of(base)
            if dtype.startswith("float"):
                if not _dtype_of(exponent).startswith("float") or _dtype_of(exponent) != dtype:
                    exponent = relax.op.astype(exponent, dtype)
                return relax.op.power(base, exponent)
            if not _dtype_of(exponent).startswith(("int", "uint", "float")):
                return stock(bb, inputs, attr, params)
            raised = relax.op.power(relax.op.astype(base, "float64"), relax.op.astype(exponent, "float64"))
            return relax.op.astype(relax.op.round(raised), dtype)

        return convert


class RMSNormalization(OnnxOpConverter):
    """TVM's rms_norm fails to legalize when Scale has fewer dimensions than the normalized axes:
    x / sqrt(mean(x^2) + epsilon) * scale, in float32 by default."""

    @classmethod
    def _impl_v23(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x, scale = inputs[0], inputs[1]
        shape = _static("RMSNormalization", attr, "input 'X'", x)
        axis = int(attr.get("axis", -1))
        axis = axis + len(shape) if axis < 0 else axis
        dtype = _dtype_of(x)
        stash = "float32" if int(attr.get("stash_type", 1)) == 1 else dtype
        xs = bb.normalize(relax.op.astype(x, stash) if stash != dtype else x)
        mean_square = relax.op.mean(relax.op.multiply(xs, xs), list(range(axis, len(shape))), keepdims=True)
        normalized = relax.op.multiply(xs, relax.op.rsqrt(relax.op.add(mean_square,
                                                                       relax.const(float(attr.get("epsilon", 1e-5)), stash))))
        if stash != dtype:
            normalized = relax.op.astype(normalized, dtype)
        return relax.op.multiply(normalized, scale)


class Attention(OnnxOpConverter):
    """ONNX's Attention (opset 23 on): TVM has only ONNX Runtime's contrib Attention under this
    name. Scaled dot-product attention as ONNX's reference computes it: 3-D or 4-D inputs,
    grouped-query heads, a boolean or additive mask (padded to the keys), causal and
    sliding-window masks aligned to the cache, a key/value cache, per-batch key lengths, softcap,
    softmax precision and the four qk_matmul_output modes; a row with no key to attend gives 0."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("Attention", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            if "num_heads" in attr:  # com.microsoft.Attention
                return stock(bb, inputs, attr, params)
            if _dtype_of(inputs[0]) != "float16":
                return cls.attention(bb, inputs, attr)
            # float16 in, float16 out, float32 between: rounding each step (the scaled Q and K, the
            # scores, the softmax) to float16 put outputs 4 float16 steps off where ONNX's reference is 2.
            wide = [bb.normalize(relax.op.astype(x, "float32")) if x is not None and _dtype_of(x) == "float16" else x
                    for x in list(inputs)]
            out = bb.normalize(cls.attention(bb, wide, attr))
            if _outputs(attr) == 1:
                return relax.op.astype(out, "float16")
            return relax.Tuple([bb.normalize(relax.op.astype(relax.TupleGetItem(out, i), "float16"))
                                for i in range(_outputs(attr))])

        return convert

    @classmethod
    def attention(cls, bb: Any, inputs: Any, attr: dict[str, Any]) -> Any:  # noqa: C901 - one spec, in order
        op = "Attention"
        q, k, v = inputs[0], inputs[1], inputs[2]
        mask, past_k, past_v, nonpad = (_optional(inputs, i) for i in (3, 4, 5, 6))
        if (past_k is None) != (past_v is None):
            raise ConverterError(f"{_node(op, attr)}: past_key and past_value must be given together")
        dtype = _dtype_of(q)
        q_shape = _static(op, attr, "input 'Q'", q)
        rank = len(q_shape)
        if rank == 3:
            if "q_num_heads" not in attr or "kv_num_heads" not in attr:
                raise ConverterError(f"{_node(op, attr)}: 3-D inputs need q_num_heads and kv_num_heads")
            q_heads, kv_heads = int(attr["q_num_heads"]), int(attr["kv_num_heads"])
            q, k, v = (cls._heads(bb, x, heads, _static(op, attr, name, x))
                       for x, heads, name in ((q, q_heads, "input 'Q'"), (k, kv_heads, "input 'K'"),
                                              (v, kv_heads, "input 'V'")))
        elif rank != 4:
            raise ConverterError(f"{_node(op, attr)}: Q has rank {rank}; Attention takes 3-D or 4-D inputs")
        batch, q_heads, q_len, head = _static(op, attr, "Q", q)
        if past_k is not None:
            k = bb.normalize(relax.op.concat([past_k, k], axis=2))
            v = bb.normalize(relax.op.concat([past_v, v], axis=2))
        present_k, present_v = k, v
        kv_heads, kv_len = _static(op, attr, "K", k)[1:3]
        past_len = _static(op, attr, "input 'past_key'", past_k)[2] if past_k is not None else 0

        scale = attr.get("scale")
        scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(head))
        root = relax.const(np.asarray(np.sqrt(scale), dtype=dtype), dtype)

        bias = cls._bias(bb, op, attr, mask, nonpad, dtype, batch, q_len, kv_len, past_len)

        if q_heads != kv_heads and q_heads % kv_heads == 0:
            k = bb.normalize(relax.op.repeat(k, q_heads // kv_heads, axis=1))
            v = bb.normalize(relax.op.repeat(v, q_heads // kv_heads, axis=1))
        qk = cls._matmul(bb, relax.op.multiply(q, root),
                         relax.op.permute_dims(relax.op.multiply(k, root), [0, 1, 3, 2]), dtype)
        softcap = float(attr.get("softcap", 0.0) or 0.0)
        if softcap > 0:
            cap = relax.const(softcap, dtype)
            qk = bb.normalize(relax.op.multiply(relax.op.tanh(relax.op.divide(qk, cap)), cap))
        with_bias = bb.normalize(relax.op.add(qk, bias)) if bias is not None else qk
        mode = int(attr.get("qk_matmul_output_mode", 0))
        qk_out = with_bias if mode == 2 else qk

        scores = with_bias
        if attr.get("softmax_precision") is not None:
            from onnx.helper import tensor_dtype_to_np_dtype

            precision = str(np.dtype(tensor_dtype_to_np_dtype(int(attr["softmax_precision"]))))
            if precision != dtype:
                scores = bb.normalize(relax.op.astype(scores, precision))
        probs = cls._softmax(bb, scores)
        if bias is not None:  # a row whose every key is masked attends nothing: 0, not NaN
            minus_inf = relax.op.logical_and(relax.op.isinf(bias), relax.op.less(bias, relax.const(0, dtype)))
            masked = relax.op.equal(relax.op.min(relax.op.astype(minus_inf, "int8"), axis=-1, keepdims=True),
                                    relax.const(1, "int8"))
            probs = bb.normalize(relax.op.where(masked, relax.const(0, _dtype_of(probs)), probs))
        if mode == 3:
            qk_out = probs
        probs = bb.normalize(relax.op.astype(probs, dtype)) if _dtype_of(probs) != dtype else probs
        y = cls._matmul(bb, probs, v, dtype)
        if rank == 3:
            v_head = _static(op, attr, "V", v)[3]
            y = relax.op.reshape(relax.op.permute_dims(y, [0, 2, 1, 3]), [batch, q_len, q_heads * v_head])
        outputs = [y, present_k, present_v, bb.normalize(relax.op.astype(qk_out, dtype))
                   if _dtype_of(qk_out) != dtype else qk_out]
        count = _outputs(attr)
        return y if count == 1 else relax.Tuple(outputs[:count])

    @staticmethod
    def _matmul(bb: Any, a: Any, b: Any, dtype: str) -> Any:
        """Half-precision products summed in float32, then rounded once (as ONNX's reference does)."""
        if dtype not in ("float16", "bfloat16"):
            return bb.normalize(relax.op.matmul(a, b))
        return bb.normalize(relax.op.astype(relax.op.matmul(a, b, out_dtype="float32"), dtype))

    @staticmethod
    def _heads(bb: Any, x: Any, heads: int, shape: list[int]) -> Any:
        """(batch, seq, heads * size) -> (batch, heads, seq, size)."""
        batch, seq, hidden = shape
        return bb.normalize(relax.op.permute_dims(relax.op.reshape(x, [batch, seq, heads, hidden // heads]),
                                                  [0, 2, 1, 3]))

    @staticmethod
    def _softmax(bb: Any, x: Any) -> Any:
        """Softmax over the last axis that gives 0 for a row of -inf (ONNX's reference)."""
        dtype = _dtype_of(x)
        zero, one = relax.const(0, dtype), relax.const(1, dtype)
        top = bb.normalize(relax.op.max(x, axis=-1, keepdims=True))
        top = relax.op.where(relax.op.logical_and(relax.op.isinf(top), relax.op.less(top, zero)), zero, top)
        e = bb.normalize(relax.op.exp(relax.op.subtract(x, top)))
        total = bb.normalize(relax.op.sum(e, axis=-1, keepdims=True))
        total = relax.op.where(relax.op.equal(total, zero), one, total)
        return bb.normalize(relax.op.divide(e, total))

    @classmethod
    def _bias(cls, bb: Any, op: str, attr: dict[str, Any], mask: Any, nonpad: Any, dtype: str, batch: int,
              q_len: int, kv_len: int, past_len: int) -> Any:
        """The additive bias (0 where a query may attend a key, -inf where not), or None."""
        neg = np.asarray(-np.inf, dtype=dtype)
        causal = bool(int(attr.get("is_causal", 0)))
        left, right = int(attr.get("left_window_size", -1)), int(attr.get("right_window_size", -1))
        i = np.arange(q_len).reshape(q_len, 1)
        j = np.arange(kv_len).reshape(1, kv_len)
        parts: list[Any] = []
        per_batch = nonpad is not None and past_len == 0 and (causal or left >= 0 or right >= 0)
        if not per_batch:
            allowed = np.ones((q_len, kv_len), bool)
            if causal:
                allowed &= j <= i + past_len
            diff = i + past_len - j
            if left >= 0:
                allowed &= diff <= left
            if right >= 0:
                allowed &= -diff <= right
            if not allowed.all():
                parts.append(relax.const(np.where(allowed, np.zeros((), dtype), neg).astype(dtype), dtype))
        else:  # the frontier is nonpad_kv_seqlen[b] - q_len: known at run time only
            offset = bb.normalize(relax.op.reshape(relax.op.subtract(nonpad, relax.const(q_len, _dtype_of(nonpad))),
                                                   [batch, 1, 1]))
            allowed = None
            for condition in ((relax.op.less_equal(relax.const(j - i, _dtype_of(nonpad)), offset) if causal else None),
                              (relax.op.less_equal(relax.const(i - j - left, _dtype_of(nonpad)), relax.op.negative(offset))
                               if left >= 0 else None),
                              (relax.op.less_equal(relax.const(j - i - right, _dtype_of(nonpad)), offset)
                               if right >= 0 else None)):
                if condition is not None:
                    allowed = condition if allowed is None else relax.op.logical_and(allowed, condition)
            frontier = relax.op.where(allowed, relax.const(0, dtype), relax.const(neg, dtype))
            parts.append(relax.op.reshape(frontier, [batch, 1, q_len, kv_len]))
        if mask is not None:
            mask_shape = _static(op, attr, "input 'attn_mask'", mask)
            is_bool = _dtype_of(mask) == "bool"
            if mask_shape[-1] < kv_len:
                pad_shape = [*mask_shape[:-1], kv_len - mask_shape[-1]]
                # A constant, not relax.op.full: TVM cannot legalize full with an explicit dtype.
                pad = np.zeros(pad_shape, bool) if is_bool else np.full(pad_shape, neg, _dtype_of(mask))
                mask = relax.op.concat([mask, relax.const(pad, _dtype_of(mask))], axis=-1)
            if is_bool:
                mask = relax.op.where(mask, relax.const(0, dtype), relax.const(neg, dtype))
            parts.append(mask)
        if nonpad is not None:
            keep = relax.op.less(relax.const(np.arange(kv_len).reshape(1, kv_len), _dtype_of(nonpad)),
                                 relax.op.reshape(nonpad, [batch, 1]))
            padding = relax.op.where(keep, relax.const(0, dtype), relax.const(neg, dtype))
            parts.append(relax.op.reshape(padding, [batch, 1, 1, kv_len]))
        if not parts:
            return None
        bias = parts[0]
        for part in parts[1:]:
            bias = relax.op.add(bias, part)
        # Broadcast to the scores' trailing shape so the row test below sees every key.
        return bb.normalize(relax.op.add(bias, relax.const(np.zeros((q_len, kv_len), dtype), dtype)))


class _ExtremeReduce(OnnxOpConverter):
    """TVM's float max (min) reduction starts from the lowest (highest) finite value, so a reduced
    slice holding only -inf (+inf) comes out finite. The result is put right where it equals that
    finite start and no element does. Integers go to TVM as they are; booleans, which TVM cannot
    reduce, as uint8."""

    stock_name = ""
    start = ""  # "lowest" for ReduceMax, "highest" for ReduceMin

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock(cls.stock_name, opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            x = inputs[0]
            dtype = _dtype_of(x)
            if dtype == "bool":  # TVM has no bool max or min: any / all, through uint8
                wide = bb.normalize(relax.op.astype(x, "uint8"))
                return relax.op.astype(stock(bb, [wide, *list(inputs)[1:]], attr, params), "bool")
            reduced = bb.normalize(stock(bb, inputs, attr, params))
            if not dtype.startswith("float"):
                return reduced
            info = np.finfo(dtype)
            start = relax.const(np.asarray(info.min if cls.start == "lowest" else info.max, dtype), dtype)
            infinite = relax.const(np.asarray(-np.inf if cls.start == "lowest" else np.inf, dtype), dtype)
            seen = bb.normalize(relax.op.astype(relax.op.equal(x, start), dtype))
            if cls.start == "lowest":  # any flag set: their max
                any_start = bb.normalize(stock(bb, [seen, *inputs[1:]], attr, params))
            else:  # the same through ReduceMin: -min(-flags)
                flipped = bb.normalize(relax.op.negative(seen))
                any_start = bb.normalize(relax.op.negative(stock(bb, [flipped, *inputs[1:]], attr, params)))
            wrong = relax.op.logical_and(relax.op.equal(reduced, start), relax.op.equal(any_start, relax.const(0, dtype)))
            return relax.op.where(wrong, infinite, reduced)

        return convert


class ReduceMax(_ExtremeReduce):
    stock_name, start = "ReduceMax", "lowest"


class ReduceMin(_ExtremeReduce):
    stock_name, start = "ReduceMin", "highest"


class ConvTranspose(OnnxOpConverter):
    """TVM ignores `output_shape`: the output came out at its unpadded size. The padding that gives
    that shape is derived as ONNX's reference derives it (split by `auto_pad`, the rest at the end), and
    a negative end padding (an output larger than the convolution's) becomes output padding."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("ConvTranspose", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            if "output_shape" not in attr:
                return stock(bb, inputs, attr, params)
            op = "ConvTranspose"
            spatial = _static(op, attr, "input 'X'", inputs[0])[2:]
            output_shape = [int(v) for v in attr["output_shape"]][-len(spatial):]
            kernel = [int(v) for v in attr.get("kernel_shape") or _static(op, attr, "input 'W'", inputs[1])[2:]]
            strides = [int(v) for v in attr.get("strides", [1] * len(spatial))]
            dilations = [int(v) for v in attr.get("dilations", [1] * len(spatial))]
            output_padding = [int(v) for v in attr.get("output_padding", [0] * len(spatial))]
            auto_pad = _text(attr.get("auto_pad", "NOTSET"))
            begin, end = [], []
            for i, size in enumerate(spatial):
                total = (strides[i] * (size - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
                         - output_shape[i])
                first = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                begin.append(first)
                end.append(total - first)
            for i in range(len(spatial)):
                if end[i] < 0:
                    output_padding[i] -= end[i]
                    end[i] = 0
                if begin[i] < 0 or output_padding[i] >= max(strides[i], dilations[i]):
                    raise _refuse(op, attr, f"output_shape {output_shape} needs padding {begin} / {end} "
                                            f"with output_padding {output_padding}, which TVM cannot express")
            attr = {k: v for k, v in attr.items() if k not in ("output_shape", "auto_pad")}
            attr.update(pads=begin + end, output_padding=output_padding)
            return stock(bb, inputs, attr, params)

        return convert


class Constant(OnnxOpConverter):
    """TVM takes only a Constant's tensor `value`; ONNX (opset 12 on) also writes scalars and lists as
    `value_float(s)` and `value_int(s)`, which function expansions (Celu, ...) use."""

    FORMS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("Constant", max(opset, 13))

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            for key, dtype in cls.FORMS.items():
                if key in attr:
                    return _const(np.asarray(attr[key], dtype))
            if "value" not in attr:
                given = sorted(k for k in attr if k.startswith(("value", "sparse")))
                raise _refuse("Constant", attr, f"a constant given as {', '.join(given) or 'nothing'} "
                                                "(only tensors, floats and ints are taken)")
            return stock(bb, inputs, attr, params)

        return convert


class Elu(OnnxOpConverter):
    """TVM's Elu and Selu write their constants as float32, so a float16 or float64 model fails
    to import: the same formula, in the input's type."""

    @classmethod
    def _elu(cls, x: Any, alpha: float) -> Any:
        dtype = _dtype_of(x)
        negative = relax.op.multiply(relax.const(alpha, dtype),
                                     relax.op.subtract(relax.op.exp(relax.op.minimum(x, relax.const(0, dtype))),
                                                       relax.const(1, dtype)))
        return relax.op.where(relax.op.less(x, relax.const(0, dtype)), negative, x)

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        return cls._elu(inputs[0], float(attr.get("alpha", 1.0)))


class Selu(Elu):
    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        alpha = float(attr.get("alpha", 1.67326319217681884765625))
        gamma = float(attr.get("gamma", 1.05070102214813232421875))
        return relax.op.multiply(relax.const(gamma, _dtype_of(inputs[0])), cls._elu(inputs[0], alpha))


class EyeLike(OnnxOpConverter):
    """TVM refuses a `dtype` other than the input's, which is what the attribute is for: the input
    gives only the shape, so the output is a constant of that shape in `dtype`."""

    @classmethod
    def _impl_v9(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        rows, columns = _static("EyeLike", attr, "input 'input'", inputs[0])
        dtype = (onnx.helper.tensor_dtype_to_np_dtype(int(attr["dtype"])) if "dtype" in attr
                 else np.dtype(_dtype_of(inputs[0])))
        return _const(np.eye(rows, columns, k=int(attr.get("k", 0)), dtype=dtype))


class Softplus(OnnxOpConverter):
    """log(1 + e^x) loses what falls below float epsilon in 1 + e^x: 0.26% off at x = -10, which
    Mish inherits (ONNX Runtime writes Mish as x * tanh(softplus(x))). Computed as
    max(x, 0) + log1p(e^-|x|), log1p(u) by its series u - u^2/2 + u^3/3 below u = 1e-3 (exact to
    float precision there; LLVM may rewrite Kahan's (1 + u) - 1 form inside a fused kernel)."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x = inputs[0]
        dtype = _dtype_of(x)

        def c(v: float) -> Any:
            return relax.const(v, dtype)

        u = bb.normalize(relax.op.exp(relax.op.negative(relax.op.abs(x))))
        series = relax.op.multiply(u, relax.op.subtract(c(1), relax.op.multiply(
            u, relax.op.subtract(c(0.5), relax.op.divide(u, c(3))))))
        log1p = relax.op.where(relax.op.less(u, c(1e-3)), series, relax.op.log(relax.op.add(c(1), u)))
        return relax.op.add(relax.op.maximum(x, c(0)), log1p)


class TopK(OnnxOpConverter):
    """TVM's sort kernel takes no 64-bit unsigned input (the model would fail when run, naming
    nothing): refused at import."""

    get_converter = _stock_unless("TopK", lambda inputs, attr: (
        "a uint64 input: TVM's sort kernel does not take uint64" if _dtype_of(inputs[0]) == "uint64" else None))


class BitShift(OnnxOpConverter):
    """A shift by the type's width or more, or by a negative amount, is undefined in LLVM, so TVM's
    result depended on the CPU the code was built for (AVX2 and AVX-512 differed). ONNX defines it:
    LEFT gives 0, RIGHT the sign fill (0, or -1 for a negative signed value)."""

    @classmethod
    def _impl_v11(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x, amount = inputs[0], inputs[1]
        dtype = _dtype_of(x)
        width = np.iinfo(dtype).bits
        zero = relax.const(0, dtype)
        outside = relax.op.greater_equal(amount, relax.const(width, dtype))
        if dtype.startswith("int"):
            outside = relax.op.logical_or(outside, relax.op.less(amount, zero))
        outside = bb.normalize(outside)
        safe = bb.normalize(relax.op.where(outside, zero, amount))
        if _text(attr.get("direction", "")) == "LEFT":
            return relax.op.where(outside, zero, relax.op.left_shift(x, safe))
        fill = relax.op.where(relax.op.less(x, zero), relax.const(-1, dtype), zero) if dtype.startswith("int") else zero
        return relax.op.where(outside, fill, relax.op.right_shift(x, safe))


class Celu(OnnxOpConverter):
    """max(0, x) + min(0, alpha * (e^(x / alpha) - 1)); TVM has no converter."""

    @classmethod
    def _impl_v12(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        x = inputs[0]
        dtype = _dtype_of(x)
        alpha = relax.const(float(attr.get("alpha", 1.0)), dtype)
        zero = relax.const(0, dtype)
        negative = relax.op.multiply(alpha, relax.op.subtract(relax.op.exp(relax.op.divide(x, alpha)),
                                                              relax.const(1, dtype)))
        return relax.op.add(relax.op.maximum(x, zero), relax.op.minimum(negative, zero))


class SpaceToDepth(OnnxOpConverter):
    """TVM ignores `mode` (opset 25): "CRD" orders the new channels channel-first, as DepthToSpace's
    CRD does; "DCR" (the default) block-first."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("SpaceToDepth", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            if _text(attr.get("mode", "DCR")) != "CRD":
                return stock(bb, inputs, attr, params)
            n, c, h, w = _static("SpaceToDepth", attr, "input 'input'", inputs[0])
            b = int(attr["blocksize"])
            x = relax.op.reshape(inputs[0], (n, c, h // b, b, w // b, b))
            x = relax.op.permute_dims(x, [0, 1, 3, 5, 2, 4])
            return relax.op.reshape(x, (n, c * b * b, h // b, w // b))

        return convert


class RoiAlign(OnnxOpConverter):
    """TVM's max mode takes the largest interpolated sample; ONNX's (as ONNX Runtime computes it)
    the largest weighted corner of each sample: different numbers, so it is refused."""

    get_converter = _stock_unless("RoiAlign", lambda inputs, attr: (
        "mode 'max': TVM pools the interpolated samples, ONNX the weighted corners of each, so the "
        "numbers would differ" if _text(attr.get("mode", "avg")) == "max" else None))


class NonMaxSuppression(OnnxOpConverter):
    """TVM's converter reads max_output_boxes_per_class, iou_threshold and score_threshold at import
    and silently uses its defaults (0, 0.5, 0) when one is computed at run time: refused instead.
    TVM suppresses a box whose IoU is >= the threshold, ONNX one whose IoU is above it: the threshold
    is moved up by one float32 step, which makes the two the same test."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("NonMaxSuppression", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            given = list(inputs)
            for index, what in ((2, "max_output_boxes_per_class"), (3, "iou_threshold"), (4, "score_threshold")):
                expr = _optional(given, index)
                if expr is not None and _constant_value(expr, params) is None:
                    raise _refuse("NonMaxSuppression", attr, f"input {what} is computed at run time; TVM's "
                                  "converter needs it at import (make it an initializer or a constant)")
            iou = _constant_value(_optional(given, 3), params)
            if iou is not None:
                above = np.nextafter(np.float32(iou.reshape(-1)[0]), np.float32(np.inf))
                given[3] = relax.const(np.asarray(above, np.float32))
            return stock(bb, given, attr, params)

        return convert


class Resize(OnnxOpConverter):
    """What TVM's converter ignores, handled or refused by name: `axes` (scales and sizes for some axes
    only) and `keep_aspect_ratio_policy` are expanded to full sizes here; `half_pixel_symmetric` at a
    whole-number scale is `half_pixel`. TVM interpolates with the ratio of output to input size, ONNX with
    the given scale: a scale giving a fractional size (0.6 of 4 rows) is refused, as is `antialias`
    when downsampling (TVM does not filter)."""

    @classmethod
    def get_converter(cls, opset: int) -> Any:
        stock = _stock("Resize", opset)

        def convert(bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
            if opset < 11:
                return stock(bb, inputs, attr, params)
            op = "Resize"
            given = list(inputs) + [None] * (4 - len(inputs))
            x, roi, scales, sizes = given[:4]
            values = getattr(getattr(x.ty, "shape", None), "values", None)
            if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
                return stock(bb, inputs, attr, params)  # a shape known at run time only: TVM's way
            shape = [int(v) for v in values]
            rank = len(shape)
            axes = [int(a) % rank for a in attr.get("axes", range(rank))]
            scale_values = _constant_value(scales, params) if scales is not None else None
            size_values = _constant_value(sizes, params) if sizes is not None else None
            if scale_values is not None and scale_values.size == 0:
                scale_values = None
            if size_values is not None and size_values.size == 0:
                size_values = None
            if scale_values is None and size_values is None:
                return stock(bb, inputs, attr, params)  # TVM names what it cannot take
            factors = [1.0] * rank
            out = list(shape)
            if scale_values is not None:
                for axis, factor in zip(axes, scale_values.astype(np.float64).tolist()):
                    factors[axis] = factor
                    out[axis] = int(np.floor(shape[axis] * np.float32(factor)))
            else:
                wanted = dict(zip(axes, size_values.astype(np.int64).tolist()))
                policy = _text(attr.get("keep_aspect_ratio_policy", "stretch"))
                if policy in ("not_larger", "not_smaller"):
                    ratios = [wanted[a] / shape[a] for a in axes]
                    common = min(ratios) if policy == "not_larger" else max(ratios)
                    for axis in axes:
                        factors[axis] = common
                        out[axis] = int(np.floor(common * shape[axis] + 0.5))
                else:
                    for axis, size in wanted.items():
                        factors[axis], out[axis] = size / shape[axis], size
            mode = _text(attr.get("mode", "nearest"))
            for axis in range(rank):
                if not np.isclose(out[axis], shape[axis] * factors[axis], rtol=0, atol=1e-6 * max(1, out[axis])):
                    raise _refuse(op, attr, f"scale {factors[axis]:g} on axis {axis} gives {shape[axis]} x "
                                            f"{factors[axis]:g} = {shape[axis] * factors[axis]:g} rows, "
                                            f"a fractional size: TVM would interpolate with {out[axis]}/{shape[axis]}")
            if int(attr.get("antialias", 0)) and mode in ("linear", "cubic") and any(f < 1 for f in factors):
                raise _refuse(op, attr, "antialias when downsampling: TVM does not filter")
            attr = {k: v for k, v in attr.items() if k not in ("axes", "keep_aspect_ratio_policy", "antialias")}
            if _text(attr.get("coordinate_transformation_mode", "half_pixel")) == "half_pixel_symmetric":
                attr["coordinate_transformation_mode"] = b"half_pixel"  # the same at a whole-number scale
            roi_values = _constant_value(roi, params) if roi is not None else None
            if roi_values is not None and roi_values.size and len(axes) < rank:
                full = np.array([0.0] * rank + [1.0] * rank, np.float32)
                for i, axis in enumerate(axes):
                    full[axis], full[rank + axis] = roi_values[i], roi_values[len(axes) + i]
                roi = relax.const(full)
            return stock(bb, [x, roi, None, _const(np.asarray(out, np.int64))], attr, params)

        return convert


CONVERTERS: dict[tuple[str, str], Any] = {
    ("", "Celu"): Celu,
    ("", "BitShift"): BitShift,
    ("", "TopK"): TopK,
    ("", "Softplus"): Softplus,
    ("", "EyeLike"): EyeLike,
    ("", "Elu"): Elu,
    ("", "Selu"): Selu,
    ("", "SpaceToDepth"): SpaceToDepth,
    ("", "RoiAlign"): RoiAlign,
    ("", "NonMaxSuppression"): NonMaxSuppression,
    ("", "Resize"): Resize,
    ("", "Constant"): Constant,
    ("", "ConvTranspose"): ConvTranspose,
    ("", "LayerNormalization"): LayerNormalization,
    ("", "Dropout"): Dropout,
    ("", "BatchNormalization"): BatchNormalization,
    ("", "IsInf"): IsInf,
    ("", "Mod"): Mod,
    ("", "Sinh"): Sinh,
    ("", "Cosh"): Cosh,
    ("", "Pow"): Pow,
    ("", "RMSNormalization"): RMSNormalization,
    ("", "Attention"): Attention,
    ("", "ReduceMax"): ReduceMax,
    ("", "ReduceMin"): ReduceMin,
}
