"""Converters for the quantized operators ONNX Runtime's quantizer emits.

`quantize_static` in QOperator format writes QLinearConv, QLinearMatMul and ONNX Runtime's
com.microsoft QGemm, QLinearAdd, QLinearMul, QLinearConcat, QLinearGlobalAveragePool,
QLinearSigmoid, QLinearSoftmax; `quantize_dynamic` writes DynamicQuantizeLinear, ConvInteger and MatMulInteger,
which ONNX Runtime's optimiser fuses into DynamicQuantizeMatMul and MatMulIntegerToFloat.

Each operator computes as ONNX Runtime's CPU kernels do, so integer outputs match it exactly:
products accumulate exactly in int32 after the zero points are subtracted, then
`requantize`: the int32 sum times one float32 multiplier (computed from the scales in
ONNX Runtime's order), rounded half to even, plus the output zero point, saturated. Where
ONNX Runtime computes in float with another association (QLinearAdd) or another sigmoid
(QLinearSigmoid), a value that falls next to a rounding boundary can land one unit apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from mlci.diagnose import ConverterError

MICROSOFT = "com.microsoft"
QUANTIZED = ("int8", "uint8")
INT_RANGE = {"int8": (-128, 127), "uint8": (0, 255)}


class QuantizedOpError(ConverterError):
    """A quantized node mlci cannot convert: the message names the node and what it was given."""


# --- helpers -------------------------------------------------------------------------------


def _where(op: str, attr: dict[str, Any]) -> str:
    name = attr.get("tvm_custom", {}).get("name") or ""
    return f"{op} node {name!r}" if name else f"{op} node <unnamed>"


def _dtype(expr: Any) -> str:
    return str(expr.ty.dtype)


def _shape(where: str, what: str, expr: Any) -> list[int]:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        raise QuantizedOpError(f"{where}: {what} needs a static shape, got {expr.ty}")
    return [int(v) for v in values]


def _input(where: str, inputs: Any, index: int, what: str) -> Any:
    value = inputs[index]
    if value is None:
        raise QuantizedOpError(f"{where}: input {index} ({what}) is required")
    return value


def _require_dtype(where: str, what: str, expr: Any, allowed: tuple[str, ...]) -> str:
    dtype = _dtype(expr)
    if dtype not in allowed:
        raise QuantizedOpError(f"{where}: {what} is {dtype}; it takes {' or '.join(allowed)}")
    return dtype


def _zero_point(where: str, what: str, zero_point: Any, dtype: str) -> Any:
    """A zero point checked against its tensor's type (absent: 0), as int32, per tensor."""
    if zero_point is None:
        return relax.const(0, "int32")
    _require_dtype(where, what, zero_point, (dtype,))
    return relax.op.astype(_per_tensor(where, what, zero_point), "int32")


def _per_tensor(where: str, what: str, param: Any) -> Any:
    """A scale or zero point that must hold one value, as a scalar."""
    shape = _shape(where, what, param)
    if int(np.prod(shape)) != 1:
        raise QuantizedOpError(f"{where}: {what} must hold one value (per tensor), got shape {shape}")
    return relax.op.reshape(param, []) if shape else param


def _per_channel(where: str, what: str, param: Any, channels: int, axis: int, rank: int) -> Any:
    """A scale or zero point with one value or one per channel, shaped to broadcast along `axis`
    of a rank-`rank` tensor."""
    shape = _shape(where, what, param)
    size = int(np.prod(shape))
    if size == 1:
        return relax.op.reshape(param, []) if shape else param
    if len(shape) != 1 or size != channels:
        raise QuantizedOpError(
            f"{where}: {what} must hold one value or one per channel ({channels}), got shape {shape}")
    return relax.op.reshape(param, [channels if i == axis else 1 for i in range(rank)])


def _scale(where: str, what: str, scale: Any) -> Any:
    _require_dtype(where, what, scale, ("float32",))
    return scale


def _int32(x: Any) -> Any:
    return relax.op.astype(x, "int32")


def _minus(x: Any, zero_point: Any) -> Any:
    """x - zero_point, exactly, in int32."""
    return relax.op.subtract(_int32(x), zero_point)


def requantize(acc: Any, multiplier: Any, zero_point: Any, dtype: str) -> Any:
    """An int32 accumulator to int8/uint8: float32(acc) * multiplier, rounded half to even, plus
    the zero point, saturated (ONNX Runtime's MlasRequantizeOutput)."""
    low, high = INT_RANGE[dtype]
    scaled = relax.op.multiply(relax.op.astype(acc, "float32"), multiplier)
    shifted = relax.op.add(relax.op.round(scaled), relax.op.astype(zero_point, "float32"))
    return relax.op.astype(relax.op.clip(shifted, low, high), dtype)


def quantize(x: Any, scale: Any, zero_point: Any, dtype: str) -> Any:
    """float32 to int8/uint8: x / scale rounded half to even, plus the zero point, saturated
    (ONNX Runtime's MlasQuantizeLinear)."""
    low, high = INT_RANGE[dtype]
    rounded = relax.op.round(relax.op.divide(x, scale))
    shifted = relax.op.add(rounded, relax.op.astype(zero_point, "float32"))
    return relax.op.astype(relax.op.clip(shifted, low, high), dtype)


def dequantize(x: Any, scale: Any, zero_point: Any) -> Any:
    """int8/uint8 to float32: scale * float32(x - zero_point)."""
    return relax.op.multiply(scale, relax.op.astype(_minus(x, zero_point), "float32"))


def _dynamic_scale(x: Any) -> Any:
    """The scale DynamicQuantizeLinear picks for x: the range [min(x), max(x)] widened to hold 0,
    over 255 steps; a range of zero width (x all zeros) takes scale 1, as ONNX Runtime does."""
    zero = relax.const(0.0, "float32")
    width = relax.op.subtract(relax.op.maximum(relax.op.max(x), zero), relax.op.minimum(relax.op.min(x), zero))
    return relax.op.where(relax.op.equal(width, zero), relax.const(1.0, "float32"),
                          relax.op.divide(width, relax.const(255.0, "float32")))


def _dynamic_zero_point(x: Any, scale: Any) -> Any:
    """The uint8 zero point DynamicQuantizeLinear picks: -min(x, 0) / scale, clamped to 0..255,
    rounded half to even."""
    zero = relax.const(0.0, "float32")
    start = relax.op.subtract(zero, relax.op.divide(relax.op.minimum(relax.op.min(x), zero), scale))
    return relax.op.astype(relax.op.round(relax.op.clip(start, 0, 255)), "uint8")


# --- convolution -----------------------------------------------------------------------------


def _conv_padding(where: str, attr: dict[str, Any], spatial: list[int], kernel: list[int], strides: list[int],
                  dilations: list[int]) -> list[int]:
    """ONNX pads (all begins, then all ends) from `pads` or `auto_pad`."""
    auto_pad = attr.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad == "NOTSET":
        pads = list(attr.get("pads", [0] * (2 * len(spatial))))
        if len(pads) != 2 * len(spatial):
            raise QuantizedOpError(f"{where}: pads {pads} do not fit {len(spatial)} spatial dimensions")
        return pads
    if auto_pad == "VALID":
        return [0] * (2 * len(spatial))
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise QuantizedOpError(f"{where}: auto_pad {auto_pad!r} is not NOTSET, VALID, SAME_UPPER or SAME_LOWER")
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _conv_int32(bb: Any, where: str, attr: dict[str, Any], x: Any, w: Any, x_shape: list[int],
                w_shape: list[int]) -> Any:
    """Convolution of int32 tensors (zero points already subtracted, so padding with 0 pads with
    the zero point as ONNX Runtime does), accumulated in int32."""
    rank = len(x_shape)
    ops = {3: (relax.op.nn.conv1d, "NCW", "OIW"), 4: (relax.op.nn.conv2d, "NCHW", "OIHW"),
           5: (relax.op.nn.conv3d, "NCDHW", "OIDHW")}
    if rank not in ops or len(w_shape) != rank:
        raise QuantizedOpError(f"{where}: x has shape {x_shape} and w {w_shape}; 1-D, 2-D and 3-D convolutions "
                               "(rank 3, 4 or 5) are supported")
    spatial, kernel = x_shape[2:], w_shape[2:]
    if "kernel_shape" in attr and list(attr["kernel_shape"]) != kernel:
        raise QuantizedOpError(f"{where}: kernel_shape {list(attr['kernel_shape'])} differs from w's {kernel}")
    group = int(attr.get("group", 1))
    if x_shape[1] != w_shape[1] * group or w_shape[0] % group:
        raise QuantizedOpError(f"{where}: x has {x_shape[1]} channels, w {w_shape} with group {group}")
    strides = list(attr.get("strides", [1] * len(spatial)))
    dilations = list(attr.get("dilations", [1] * len(spatial)))
    pads = _conv_padding(where, attr, spatial, kernel, strides, dilations)
    op, data_layout, kernel_layout = ops[rank]
    return op(x, w, strides=strides, padding=pads, dilation=dilations, groups=group, data_layout=data_layout,
              kernel_layout=kernel_layout, out_dtype="int32")


# --- ONNX standard operators ---------------------------------------------------------------------


class ConvInteger(OnnxOpConverter):
    """y = conv(x - x_zero_point, w - w_zero_point) in int32; w_zero_point per tensor or per output
    channel (ONNX Runtime takes only one value; the ONNX definition allows one per channel)."""

    @classmethod
    def _impl_v10(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where("ConvInteger", attr)
        x, w = _input(where, inputs, 0, "x"), _input(where, inputs, 1, "w")
        x_dtype = _require_dtype(where, "x", x, QUANTIZED)
        w_dtype = _require_dtype(where, "w", w, QUANTIZED)
        x_shape, w_shape = _shape(where, "x", x), _shape(where, "w", w)
        x_zp = _zero_point(where, "x_zero_point", inputs[2], x_dtype)
        w_zp = _weight_zero_point(where, inputs[3], w_dtype, w_shape)
        return _conv_int32(bb, where, attr, _minus(x, x_zp), _minus(w, w_zp), x_shape, w_shape)


def _weight_zero_point(where: str, zero_point: Any, dtype: str, w_shape: list[int]) -> Any:
    if zero_point is None:
        return relax.const(0, "int32")
    _require_dtype(where, "w_zero_point", zero_point, (dtype,))
    return _int32(_per_channel(where, "w_zero_point", zero_point, w_shape[0], 0, len(w_shape)))


class QLinearConv(OnnxOpConverter):
    """y = requantize(conv(x - x_zp, w - w_zp) + B, x_scale * w_scale / y_scale, y_zp), w's scale
    and zero point per tensor or per output channel."""

    @classmethod
    def _impl_v10(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where("QLinearConv", attr)
        if int(attr.get("channels_last", 0)):
            raise QuantizedOpError(f"{where}: channels_last=1 (ONNX Runtime's NHWC variant) is not supported")
        names = ["x", "x_scale", "x_zero_point", "w", "w_scale", "w_zero_point", "y_scale", "y_zero_point"]
        x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp = (_input(where, inputs, i, n) for i, n in enumerate(names))
        x_dtype = _require_dtype(where, "x", x, QUANTIZED)
        w_dtype = _require_dtype(where, "w", w, QUANTIZED)
        y_dtype = _require_dtype(where, "y_zero_point", y_zp, QUANTIZED)
        x_shape, w_shape = _shape(where, "x", x), _shape(where, "w", w)
        channels, rank = w_shape[0], len(x_shape)
        acc = _conv_int32(bb, where, attr, _minus(x, _zero_point(where, "x_zero_point", x_zp, x_dtype)),
                          _minus(w, _weight_zero_point(where, w_zp, w_dtype, w_shape)), x_shape, w_shape)
        bias = inputs[8]
        if bias is not None:
            _require_dtype(where, "B", bias, ("int32",))
            if _shape(where, "B", bias) != [channels]:
                raise QuantizedOpError(f"{where}: B must have shape [{channels}], got {_shape(where, 'B', bias)}")
            acc = relax.op.add(acc, relax.op.reshape(bias, [1, channels] + [1] * (rank - 2)))
        multiplier = relax.op.divide(
            relax.op.multiply(_per_tensor(where, "x_scale", _scale(where, "x_scale", x_scale)),
                              _per_channel(where, "w_scale", _scale(where, "w_scale", w_scale), channels, 1, rank)),
            _per_tensor(where, "y_scale", _scale(where, "y_scale", y_scale)))
        return requantize(acc, multiplier, _zero_point(where, "y_zero_point", y_zp, y_dtype), y_dtype)


def _per_column(where: str, what: str, param: Any, b_shape: list[int]) -> Any:
    """A parameter of B (k x n): one value, one per column ([n]), or for a stack of matrices one per
    column of each ([..., 1, n]); shaped to broadcast over B and over the product."""
    shape = _shape(where, what, param)
    columns = b_shape[-1]
    if int(np.prod(shape)) == 1:
        return relax.op.reshape(param, []) if shape else param
    if shape == [columns] or (len(b_shape) > 2 and len(shape) == len(b_shape) and shape[-2] == 1
                              and shape[-1] == columns and shape[:-2] == b_shape[:-2]):
        return param
    raise QuantizedOpError(
        f"{where}: {what} must hold one value or one per column of b ({columns}), got shape {shape} "
        f"for b of shape {b_shape}")


def _matmul_int32(where: str, a: Any, a_zp: Any, b: Any, b_zp: Any) -> tuple[Any, list[int]]:
    """(a - a_zp) @ (b - b_zp) in int32, a's zero point per tensor, b's per tensor or per column."""
    a_dtype = _require_dtype(where, "a", a, QUANTIZED)
    b_dtype = _require_dtype(where, "b", b, QUANTIZED)
    b_shape = _shape(where, "b", b)
    if len(b_shape) < 2:
        raise QuantizedOpError(f"{where}: b must be a matrix or a stack of them, got shape {b_shape}")
    a_zero = _zero_point(where, "a_zero_point", a_zp, a_dtype)
    if b_zp is None:
        b_zero = relax.const(0, "int32")
    else:
        _require_dtype(where, "b_zero_point", b_zp, (b_dtype,))
        b_zero = _int32(_per_column(where, "b_zero_point", b_zp, b_shape))
    return relax.op.matmul(_minus(a, a_zero), _minus(b, b_zero), out_dtype="int32"), b_shape


class QLinearMatMul(OnnxOpConverter):
    """y = requantize((a - a_zp) @ (b - b_zp), a_scale * b_scale / y_scale, y_zp), b's scale and zero
    point per tensor or per column."""

    @classmethod
    def _impl_v10(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where("QLinearMatMul", attr)
        names = ["a", "a_scale", "a_zero_point", "b", "b_scale", "b_zero_point", "y_scale", "y_zero_point"]
        a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp = (_input(where, inputs, i, n) for i, n in enumerate(names))
        y_dtype = _require_dtype(where, "y_zero_point", y_zp, QUANTIZED)
        acc, b_shape = _matmul_int32(where, a, a_zp, b, b_zp)
        multiplier = relax.op.divide(
            relax.op.multiply(_per_tensor(where, "a_scale", _scale(where, "a_scale", a_scale)),
                              _per_column(where, "b_scale", _scale(where, "b_scale", b_scale), b_shape)),
            _per_tensor(where, "y_scale", _scale(where, "y_scale", y_scale)))
        return requantize(acc, multiplier, _zero_point(where, "y_zero_point", y_zp, y_dtype), y_dtype)


class DynamicQuantizeLinear(OnnxOpConverter):
    """x (float32) to uint8 with the scale and zero point its own range gives.

    Replaces TVM's converter, which divides by a zero scale when x is all zeros (the range
    [0, 0]): it returns scale 0, zero point 255 and garbage where ONNX Runtime returns scale 1,
    zero point 0 and zeros. All-zero activations are ordinary (a ReLU over a dead channel, padding),
    and a NaN scale then poisons every product downstream."""

    @classmethod
    def _impl_v11(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where("DynamicQuantizeLinear", attr)
        x = _input(where, inputs, 0, "x")
        _require_dtype(where, "x", x, ("float32",))
        scale = bb.emit(_dynamic_scale(x))
        zero_point = bb.emit(_dynamic_zero_point(x, scale))
        return relax.Tuple([quantize(x, scale, zero_point, "uint8"), scale, zero_point])


# --- ONNX Runtime's contrib operators (com.microsoft) --------------------------------------------


class DynamicQuantizeMatMul(OnnxOpConverter):
    """Y = float32((quantize(A) - a_zp) @ (B - b_zp)) * (a_scale * b_scale) + bias: A (float32) is
    quantized to uint8 as DynamicQuantizeLinear does; b_scale and b_zero_point per tensor or per
    column of B."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.DynamicQuantizeMatMul", attr)
        a, b = _input(where, inputs, 0, "A"), _input(where, inputs, 1, "B")
        b_scale = _scale(where, "b_scale", _input(where, inputs, 2, "b_scale"))
        _require_dtype(where, "A", a, ("float32",))
        a_scale = bb.emit(_dynamic_scale(a))
        a_zp = bb.emit(_dynamic_zero_point(a, a_scale))
        a_q = bb.emit(quantize(a, a_scale, a_zp, "uint8"))
        acc, b_shape = _matmul_int32(where, a_q, a_zp, b, inputs[3])
        multiplier = relax.op.multiply(a_scale, _per_column(where, "b_scale", b_scale, b_shape))
        return _scale_and_bias(where, acc, multiplier, inputs[4], b_shape)


def _scale_and_bias(where: str, acc: Any, multiplier: Any, bias: Any, b_shape: list[int]) -> Any:
    y = relax.op.multiply(relax.op.astype(acc, "float32"), multiplier)
    if bias is None:
        return y
    _require_dtype(where, "bias", bias, ("float32",))
    if _shape(where, "bias", bias) != [b_shape[-1]]:
        raise QuantizedOpError(f"{where}: bias must have shape [{b_shape[-1]}], got {_shape(where, 'bias', bias)}")
    return relax.op.add(y, bias)


class MatMulIntegerToFloat(OnnxOpConverter):
    """Y = float32((A - a_zp) @ (B - b_zp)) * (a_scale * b_scale) + bias."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.MatMulIntegerToFloat", attr)
        a, b = _input(where, inputs, 0, "A"), _input(where, inputs, 1, "B")
        a_scale = _scale(where, "a_scale", _input(where, inputs, 2, "a_scale"))
        b_scale = _scale(where, "b_scale", _input(where, inputs, 3, "b_scale"))
        acc, b_shape = _matmul_int32(where, a, inputs[4], b, inputs[5])
        multiplier = relax.op.multiply(_per_tensor(where, "a_scale", a_scale),
                                       _per_column(where, "b_scale", b_scale, b_shape))
        return _scale_and_bias(where, acc, multiplier, inputs[6], b_shape)


class QGemm(OnnxOpConverter):
    """Y = alpha * A' @ B' (+ C) quantized: acc = (A' - a_zp) @ (B' - b_zp) + C in int32, then
    requantize(acc, alpha * a_scale * b_scale / y_scale, y_zp); without y_zero_point, Y is
    float32(acc) * alpha * a_scale * b_scale (/ y_scale when given). A' and B' are A and B
    transposed when transA and transB say so."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QGemm", attr)
        names = ["A", "a_scale", "a_zero_point", "B", "b_scale", "b_zero_point"]
        a, a_scale, a_zp, b, b_scale, b_zp = (_input(where, inputs, i, n) for i, n in enumerate(names))
        c, y_scale, y_zp = inputs[6], inputs[7], inputs[8]
        for what, x in (("A", a), ("B", b)):
            if len(_shape(where, what, x)) != 2:
                raise QuantizedOpError(f"{where}: {what} must be a matrix, got shape {_shape(where, what, x)}")
        if int(attr.get("transA", 0)):
            a = relax.op.permute_dims(a, [1, 0])
        if int(attr.get("transB", 0)):
            b = relax.op.permute_dims(b, [1, 0])
        a, b = bb.normalize(a), bb.normalize(b)
        acc, b_shape = _matmul_int32(where, a, a_zp, b, b_zp)
        if c is not None:
            _require_dtype(where, "C", c, ("int32",))
            acc = relax.op.add(acc, c)
        multiplier = relax.op.multiply(
            relax.op.multiply(relax.const(float(attr.get("alpha", 1.0)), "float32"),
                              _per_tensor(where, "a_scale", _scale(where, "a_scale", a_scale))),
            _per_column(where, "b_scale", _scale(where, "b_scale", b_scale), b_shape))
        if y_scale is not None:
            multiplier = relax.op.divide(multiplier, _per_tensor(where, "y_scale", _scale(where, "y_scale", y_scale)))
        if y_zp is None:
            return relax.op.multiply(relax.op.astype(acc, "float32"), multiplier)
        y_dtype = _require_dtype(where, "y_zero_point", y_zp, QUANTIZED)
        return requantize(acc, multiplier, _zero_point(where, "y_zero_point", y_zp, y_dtype), y_dtype)


def _binary_params(where: str, inputs: Any) -> tuple[Any, Any, Any, Any, Any, Any, Any, Any, str]:
    """A, A_scale, A_zp, B, B_scale, B_zp, C_scale, C_zp (int32 scalars, absent ones 0) and the type."""
    a, b = _input(where, inputs, 0, "A"), _input(where, inputs, 3, "B")
    dtype = _require_dtype(where, "A", a, QUANTIZED)
    _require_dtype(where, "B", b, (dtype,))
    scales = [_per_tensor(where, what, _scale(where, what, _input(where, inputs, i, what)))
              for i, what in ((1, "A_scale"), (4, "B_scale"), (6, "C_scale"))]
    zero_points = [_zero_point(where, what, inputs[i], dtype)
                   for i, what in ((2, "A_zero_point"), (5, "B_zero_point"), (7, "C_zero_point"))]
    return a, scales[0], zero_points[0], b, scales[1], zero_points[1], scales[2], zero_points[2], dtype


class QLinearAdd(OnnxOpConverter):
    """C = quantize(dequantize(A) + dequantize(B)), computed as ONNX Runtime does: A * (A_scale /
    C_scale) + (B * (B_scale / C_scale) + (C_zp - (A_zp * A_scale / C_scale + B_zp * B_scale /
    C_scale))), rounded half to even, saturated; numpy broadcasting."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QLinearAdd", attr)
        a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp, dtype = _binary_params(where, inputs)
        low, high = INT_RANGE[dtype]

        def as_float(x: Any) -> Any:
            return relax.op.astype(x, "float32")

        ratio_a = relax.op.divide(a_scale, c_scale)
        ratio_b = relax.op.divide(b_scale, c_scale)
        fixed = relax.op.subtract(as_float(c_zp), relax.op.add(relax.op.multiply(ratio_a, as_float(a_zp)),
                                                               relax.op.multiply(ratio_b, as_float(b_zp))))
        value = relax.op.add(relax.op.multiply(as_float(a), ratio_a),
                             relax.op.add(relax.op.multiply(as_float(b), ratio_b), fixed))
        return relax.op.astype(relax.op.clip(relax.op.round(value), low, high), dtype)


class QLinearMul(OnnxOpConverter):
    """C = requantize((A - A_zp) * (B - B_zp), A_scale * B_scale / C_scale, C_zp); numpy broadcasting."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QLinearMul", attr)
        a, a_scale, a_zp, b, b_scale, b_zp, c_scale, c_zp, dtype = _binary_params(where, inputs)
        product = relax.op.multiply(_minus(a, a_zp), _minus(b, b_zp))
        return requantize(product, relax.op.divide(relax.op.multiply(a_scale, b_scale), c_scale), c_zp, dtype)


class QLinearConcat(OnnxOpConverter):
    """Y = concat of each input requantized to Y's scale and zero point (quantize(dequantize(X)));
    inputs already on Y's constant scale and zero point are copied."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QLinearConcat", attr)
        if len(inputs) < 5 or (len(inputs) - 2) % 3:
            raise QuantizedOpError(f"{where}: takes Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) "
                                   f"triples; got {len(inputs)} inputs")
        y_scale = _per_tensor(where, "Y_scale", _scale(where, "Y_scale", _input(where, inputs, 0, "Y_scale")))
        y_zp_in = _input(where, inputs, 1, "Y_zero_point")
        dtype = _require_dtype(where, "Y_zero_point", y_zp_in, QUANTIZED)
        y_zp = _zero_point(where, "Y_zero_point", y_zp_in, dtype)
        parts = []
        for first in range(2, len(inputs), 3):
            n = (first - 2) // 3
            x = _input(where, inputs, first, f"X{n}")
            x_scale = _input(where, inputs, first + 1, f"X{n}_scale")
            x_zp = _input(where, inputs, first + 2, f"X{n}_zero_point")
            _require_dtype(where, f"X{n}", x, (dtype,))
            if _same_constant(x_scale, inputs[0]) and _same_constant(x_zp, y_zp_in):
                parts.append(x)
                continue
            x_float = dequantize(x, _per_tensor(where, f"X{n}_scale", _scale(where, f"X{n}_scale", x_scale)),
                                 _zero_point(where, f"X{n}_zero_point", x_zp, dtype))
            parts.append(quantize(x_float, y_scale, y_zp, dtype))
        return relax.op.concat(parts, axis=int(attr.get("axis", 0)))


def _same_constant(a: Any, b: Any) -> bool:
    if not (isinstance(a, tvm.ir.GenericConst) and isinstance(b, tvm.ir.GenericConst)):
        return False
    left, right = a.value.numpy(), b.value.numpy()
    return left.dtype == right.dtype and left.size == right.size == 1 and left.ravel()[0] == right.ravel()[0]


class QLinearGlobalAveragePool(OnnxOpConverter):
    """Y = requantize(sum over the image of X - x_zp * image size, x_scale / (y_scale * image size),
    y_zp), the mean of each channel; channels first, or last with channels_last=1."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QLinearGlobalAveragePool", attr)
        names = ["X", "x_scale", "x_zero_point", "y_scale", "y_zero_point"]
        x, x_scale, x_zp, y_scale, y_zp = (_input(where, inputs, i, n) for i, n in enumerate(names))
        dtype = _require_dtype(where, "X", x, QUANTIZED)
        _require_dtype(where, "y_zero_point", y_zp, (dtype,))
        shape = _shape(where, "X", x)
        if len(shape) < 3:
            raise QuantizedOpError(f"{where}: X must have a batch, a channel and image axes, got shape {shape}")
        axes = list(range(1, len(shape) - 1)) if int(attr.get("channels_last", 0)) else list(range(2, len(shape)))
        size = int(np.prod([shape[i] for i in axes]))
        total = relax.op.sum(_int32(x), axis=axes, keepdims=True)
        acc = relax.op.subtract(total, relax.op.multiply(_zero_point(where, "x_zero_point", x_zp, dtype),
                                                         relax.const(size, "int32")))
        multiplier = relax.op.divide(
            _per_tensor(where, "x_scale", _scale(where, "x_scale", x_scale)),
            relax.op.multiply(_per_tensor(where, "y_scale", _scale(where, "y_scale", y_scale)),
                              relax.const(float(size), "float32")))
        return requantize(acc, multiplier, _zero_point(where, "y_zero_point", y_zp, dtype), dtype)


class QLinearSigmoid(OnnxOpConverter):
    """Y = quantize(sigmoid(dequantize(X))). ONNX Runtime evaluates its own sigmoid approximation
    into a 256-entry table, so an output next to a rounding boundary can differ by one unit."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QLinearSigmoid", attr)
        x = _input(where, inputs, 0, "X")
        dtype = _require_dtype(where, "X", x, QUANTIZED)
        x_scale = _per_tensor(where, "X_scale", _scale(where, "X_scale", _input(where, inputs, 1, "X_scale")))
        y_scale = _per_tensor(where, "Y_scale", _scale(where, "Y_scale", _input(where, inputs, 3, "Y_scale")))
        x_float = dequantize(x, x_scale, _zero_point(where, "X_zero_point", inputs[2], dtype))
        return quantize(relax.op.sigmoid(x_float), y_scale, _zero_point(where, "Y_zero_point", inputs[4], dtype), dtype)


class QLinearSoftmax(OnnxOpConverter):
    """Y = softmax(X) quantized, computed as ONNX Runtime does (the quantizer writes it for a
    classifier's final Softmax): each x indexes a 256-entry float32 table of
    exp((x - max(x) + shift) * X_scale) (shift keeps the row's sum finite; x_zero_point cancels
    out), the row's entries are summed in float32, and y = round(entry * floor(1 / Y_scale) / sum)
    + y_zero_point, saturated (ONNX Runtime wraps an int8 result of 128 to -128; mlci saturates).
    The softmax runs over `axis` (opset >= 13) or over every axis from `axis` on (before 13, by the
    `opset` attribute). The float sum may associate differently: one unit either way, rarely."""

    @classmethod
    def _impl_v1(cls, bb: Any, inputs: Any, attr: dict[str, Any], params: Any) -> Any:
        where = _where(f"{MICROSOFT}.QLinearSoftmax", attr)
        x = _input(where, inputs, 0, "X")
        dtype = _require_dtype(where, "X", x, QUANTIZED)
        shape = _shape(where, "X", x)
        if "opset" not in attr:
            raise QuantizedOpError(f"{where}: the opset attribute (the opset of the Softmax it replaces) is required")
        opset = int(attr["opset"])
        axis = int(attr.get("axis", 1 if opset < 13 else -1))
        axis = axis + len(shape) if axis < 0 else axis
        if not 0 <= axis < len(shape):
            raise QuantizedOpError(f"{where}: axis {attr.get('axis')} is outside X's {len(shape)} axes")
        axes = list(range(axis, len(shape))) if opset < 13 else [axis]
        length = int(np.prod([shape[i] for i in axes]))
        x_scale = _constant_scalar(where, "X_scale", _input(where, inputs, 1, "X_scale"))
        y_scale = _constant_scalar(where, "Y_scale", _input(where, inputs, 3, "Y_scale"))
        table = relax.const(_softmax_table(x_scale, length), "float32")
        x32 = _int32(x)
        index = relax.op.add(relax.op.subtract(x32, relax.op.max(x32, axis=axes, keepdims=True)),
                             relax.const(255, "int32"))
        entries = bb.emit(relax.op.take(table, bb.normalize(index), axis=0, mode="clip"))  # 0..255 by construction
        total = relax.op.sum(entries, axis=axes, keepdims=True)
        y_multiplier = relax.const(np.floor(np.float32(1.0) / np.float32(y_scale)), "float32")
        low, high = INT_RANGE[dtype]
        value = relax.op.round(relax.op.divide(relax.op.multiply(entries, y_multiplier), total))
        shifted = relax.op.add(value, relax.op.astype(_zero_point(where, "y_zero_point", inputs[4], dtype), "float32"))
        return relax.op.astype(relax.op.clip(shifted, low, high), dtype)


def _constant_scalar(where: str, what: str, param: Any) -> np.float32:
    if not isinstance(param, tvm.ir.GenericConst):
        raise QuantizedOpError(f"{where}: {what} must be a constant (mlci builds its lookup table at compile time)")
    value = param.value.numpy()
    if value.dtype != np.float32 or value.size != 1:
        raise QuantizedOpError(f"{where}: {what} must be one float32, got {value.dtype} of shape {list(value.shape)}")
    return np.float32(value.reshape(()))


def _softmax_table(x_scale: np.float32, length: int) -> np.ndarray:
    """ONNX Runtime's QLinearSoftmax table: entry i is exp((i - 255 + shift) * x_scale), in double
    then float32, shift = max(0, ln(FLT_MAX / length) - 5) / x_scale, so that `length` entries sum
    below FLT_MAX with room to spare; x - max(x) + 255 indexes it."""
    headroom = np.float32(np.finfo(np.float32).max) / np.float32(length)
    shift = max(0.0, float(np.log(np.float64(headroom))) - 5.0) / float(x_scale)
    steps = np.arange(256, dtype=np.float64)
    return np.exp((steps - 255.0 + shift) * float(x_scale)).astype(np.float32)


CONVERTERS: dict[tuple[str, str], Any] = {
    ("", "ConvInteger"): ConvInteger,
    ("", "QLinearConv"): QLinearConv,
    ("", "QLinearMatMul"): QLinearMatMul,
    ("", "DynamicQuantizeLinear"): DynamicQuantizeLinear,
    (MICROSOFT, "DynamicQuantizeMatMul"): DynamicQuantizeMatMul,
    (MICROSOFT, "MatMulIntegerToFloat"): MatMulIntegerToFloat,
    (MICROSOFT, "QGemm"): QGemm,
    (MICROSOFT, "QLinearAdd"): QLinearAdd,
    (MICROSOFT, "QLinearMul"): QLinearMul,
    (MICROSOFT, "QLinearConcat"): QLinearConcat,
    (MICROSOFT, "QLinearGlobalAveragePool"): QLinearGlobalAveragePool,
    (MICROSOFT, "QLinearSigmoid"): QLinearSigmoid,
    (MICROSOFT, "QLinearSoftmax"): QLinearSoftmax,
}
"""(domain, op_type) -> converter; DynamicQuantizeLinear replaces TVM's own (see its docstring)."""
