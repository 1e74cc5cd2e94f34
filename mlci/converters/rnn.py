"""ONNX `LSTM`, `GRU`, `RNN` and ONNX Runtime's `com.microsoft.DynamicQuantizeLSTM`, for TVM's
Relax importer (which has no converter for any of them).

The recurrence is unrolled over the sequence: mlci binds every input shape before import, so the
sequence length and batch are static. X W^T is one matmul for all steps; each step is then three
kernels (for LSTM: h R^T, the input, forget and cell gates, the output gate), the same kernels for
every step, so MetaSchedule tunes one step for all and the build compiles a handful of kernels
whatever the length. Relax's only loop is a recursive function over a step counter, each call
interpreted by the VM: a 128-step tanh RNN (hidden size 128, batch 1, the same kernels built
without schedules, 2 cores) ran 39 us a step that way against 24 us unrolled, before even
collecting Y, which a loop must copy whole at every step to grow it. Unrolling costs build time
instead, linear in the steps: through mlci's chain, untuned, a forward LSTM of hidden size 128 and
input size 64, batch 1, imports and builds in 3.5 s for 32 steps and in 15 s for 128, and runs in
0.7 and 3.0 ms (ONNX Runtime: 0.36 and 1.5 ms, on the same 2 threads). 96 tuning trials left the
32 steps as they were (0.39 ms on one thread, ONNX Runtime 0.16 ms).

Semantics follow the ONNX spec where it is precise and ONNX Runtime (what mlci checks against)
where it is not:

- `sequence_lens` (a constant or a graph input): steps past a row's length leave its state as it
  was and output zeros; a reverse direction reads each row backwards within its own length; a row
  of length 0 has zero final states.
- `activation_alpha` / `activation_beta` go in order to the activations that take them (Affine,
  LeakyRelu, ThresholdedRelu, ScaledTanh, HardSigmoid, Elu take alpha; Affine, ScaledTanh,
  HardSigmoid take beta); once they run out, LeakyRelu's alpha is 0.01, HardSigmoid's 0.2 and
  0.5, Elu's 1.0 and any other 0.
- `clip` bounds every gate's input before its activation, not the LSTM cell state.
- `layout` 1 (batch first) converts, though ONNX Runtime's CPU kernels refuse it (so mlci, which
  folds and checks every model with ONNX Runtime, stops before import on such a model).

`DynamicQuantizeLSTM` computes as ONNX Runtime's CPU kernel does, in float: the int8/uint8
weights are dequantized once (at import: quantize_dynamic leaves them constants), and X (all
steps at once) and the hidden state (every step, the whole batch) are quantized to uint8 with a
range taken from their own minimum and maximum, then dequantized, before each matmul. Against ONNX Runtime on one thread this agrees to
float rounding (2e-7); on several threads with a batch above 1, ONNX Runtime quantizes each
thread's share of the batch with its own range, and the two differ by quantization noise (up to
8e-3 in 6 steps of a batch of 3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import tvm
from tvm import relax, topi
from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

from mlci.diagnose import ConverterError

FAN = 8
"""Most parts one split or concatenation kernel makes or takes. TVM selects among all the parts
for every element, and builds such a kernel slowly in their number: Y of 128 steps concatenated
at once took 6.4 s to compile, X W^T split into its 128 steps 8 s; through a tree of kernels of
at most 8 parts (most of them the same kernel), 0.5 s."""

OPAQUE = 8
"""TVM's OpPatternKind kOpaque: a kernel Relax fuses with nothing."""


class RecurrentAttributeError(ConverterError):
    """A node mlci cannot convert; the message names its op, the node and the attribute or input."""


@dataclass(frozen=True)
class Node:
    op: str
    name: str

    def error(self, what: str, problem: str) -> RecurrentAttributeError:
        label = f"{self.op} node {self.name!r}" if self.name else f"{self.op} node"
        return RecurrentAttributeError(f"{label}: {what}: {problem}")


# --- activations ------------------------------------------------------------------------------

_TAKES = {  # ONNX name -> (takes alpha, takes beta)
    "Relu": (False, False),
    "Tanh": (False, False),
    "Sigmoid": (False, False),
    "Affine": (True, True),
    "LeakyRelu": (True, False),
    "ThresholdedRelu": (True, False),
    "ScaledTanh": (True, True),
    "HardSigmoid": (True, True),
    "Elu": (True, False),
    "Softsign": (False, False),
    "Softplus": (False, False),
}
_DEFAULTS = {"LeakyRelu": (0.01, 0.0), "HardSigmoid": (0.2, 0.5), "Elu": (1.0, 0.0)}
_CANONICAL = {name.lower(): name for name in _TAKES}


@dataclass(frozen=True)
class Activation:
    name: str
    alpha: float = 0.0
    beta: float = 0.0

    def __call__(self, bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        op = relax.op
        dtype = str(x.ty.dtype)

        def const(value: float) -> relax.Expr:
            return relax.const(value, dtype)

        name, alpha, beta = self.name, self.alpha, self.beta
        if name == "Sigmoid":
            out = op.sigmoid(x)
        elif name == "Tanh":
            out = op.tanh(x)
        elif name == "Relu":
            out = op.nn.relu(x)
        elif name == "Affine":
            out = op.add(op.multiply(const(alpha), x), const(beta))
        elif name == "LeakyRelu":
            out = op.where(op.greater_equal(x, const(0.0)), x, op.multiply(const(alpha), x))
        elif name == "ThresholdedRelu":
            out = op.where(op.greater(x, const(alpha)), x, const(0.0))
        elif name == "ScaledTanh":
            out = op.multiply(const(alpha), op.tanh(op.multiply(const(beta), x)))
        elif name == "HardSigmoid":
            out = op.clip(op.add(op.multiply(const(alpha), x), const(beta)), 0.0, 1.0)
        elif name == "Elu":
            out = op.where(op.greater_equal(x, const(0.0)), x,
                           op.multiply(const(alpha), op.subtract(op.exp(x), const(1.0))))
        elif name == "Softsign":
            out = op.divide(x, op.add(const(1.0), op.abs(x)))
        else:  # Softplus, written so that a large input does not overflow exp
            out = op.add(op.maximum(x, const(0.0)), op.log(op.add(const(1.0), op.exp(op.negative(op.abs(x))))))
        return bb.emit(out)


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list | tuple) else [value]
    return [v.decode() if isinstance(v, bytes) else str(v) for v in items]


def parse_activations(node: Node, attr: dict[str, Any], defaults: list[str], directions: int) -> list[list[Activation]]:
    """The activations of each direction (`defaults` for each when the node names none)."""
    names = _strings(attr.get("activations")) or defaults * directions
    per_direction = len(defaults)
    if len(names) == per_direction and directions == 2:
        names = names * 2
    if node.op == "RNN" and directions == 1 and len(names) == 2:
        names = names[:1]  # the schema's default lists two Tanh; ONNX Runtime takes the first
    if len(names) != per_direction * directions:
        raise node.error("attribute 'activations'", f"{len(names)} given, {directions} direction(s) need "
                                                    f"{per_direction * directions}")
    alphas = [float(a) for a in attr.get("activation_alpha", ())]
    betas = [float(b) for b in attr.get("activation_beta", ())]
    acts: list[Activation] = []
    for raw in names:
        name = _CANONICAL.get(raw.lower())
        if name is None:
            raise node.error("attribute 'activations'", f"{raw!r} is not one ONNX Runtime runs ({', '.join(_TAKES)})")
        takes_alpha, takes_beta = _TAKES[name]
        default_alpha, default_beta = _DEFAULTS.get(name, (0.0, 0.0))
        alpha = alphas.pop(0) if takes_alpha and alphas else default_alpha
        beta = betas.pop(0) if takes_beta and betas else default_beta
        acts.append(Activation(name, alpha if takes_alpha else 0.0, beta if takes_beta else 0.0))
    return [acts[d * per_direction:(d + 1) * per_direction] for d in range(directions)]


# --- tensors ------------------------------------------------------------------------------------
# Weights are nearly always initializers: these helpers compute on constants in numpy at import,
# which leaves far fewer constant expressions for compile-time folding to build and run.

def _static_shape(node: Node, what: str, expr: relax.Expr) -> list[int]:
    shape = getattr(expr.ty, "shape", None)
    values = getattr(shape, "values", None)
    if values is None or not all(isinstance(v, tvm.tirx.IntImm) for v in values):
        raise node.error(what, f"needs a static shape, got {shape} (bind the model's input dimensions)")
    return [int(v) for v in values]


def _constant(expr: relax.Expr | None) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.GenericConst) else None


def _array(value: np.ndarray) -> relax.Expr:
    """A constant of the array's own type (relax.const alone makes an int64 array int32)."""
    return relax.const(np.ascontiguousarray(value), str(value.dtype))


def _is_zero(expr: relax.Expr) -> bool:
    """The state before the first step of a node without initial state: its products with the
    recurrent weights are left out rather than computed (or folded) as zeros."""
    value = _constant(expr)
    return value is not None and not value.any()


def _slice(bb: relax.BlockBuilder, x: relax.Expr, axis: int, begin: int, end: int) -> relax.Expr:
    value = _constant(x)
    if value is not None:
        return _array(np.take(value, np.arange(begin, end), axis=axis))
    return bb.emit(relax.op.strided_slice(x, axes=[axis], begin=[begin], end=[end], assume_inbound=True))


def _gate(bb: relax.BlockBuilder, x: relax.Expr, index: int, hidden: int) -> relax.Expr:
    """Gate `index`'s columns (the last axis) of a tensor of all gates."""
    axis = int(x.ty.ndim) - 1
    return _slice(bb, x, axis, index * hidden, (index + 1) * hidden)


def _direction(bb: relax.BlockBuilder, x: relax.Expr | None, d: int) -> relax.Expr | None:
    """x[d] of a [num_directions, ...] tensor. (Reshape, not squeeze: mlci runs Relax's
    ConvertLayout on CPU, which cannot infer a layout through squeeze.)"""
    if x is None:
        return None
    value = _constant(x)
    if value is not None:
        return _array(value[d])
    shape = [int(v) for v in x.ty.shape.values]
    return bb.emit(relax.op.reshape(_slice(bb, x, 0, d, d + 1), shape[1:]))


def _add(bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    if _constant(a) is not None and _constant(b) is not None:
        return _array(_constant(a) + _constant(b))
    return bb.emit(relax.op.add(a, b))


def _multiply(bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr) -> relax.Expr:
    if _constant(a) is not None and _constant(b) is not None:
        return _array(_constant(a) * _constant(b))
    return bb.emit(relax.op.multiply(a, b))


def _transpose(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    value = _constant(x)
    if value is not None:
        return _array(value.T)
    return bb.emit(relax.op.permute_dims(x, [1, 0]))


def _opaque(bb: relax.BlockBuilder, call: relax.Expr) -> relax.Expr:
    """`call`, its kernel marked so that Relax fuses it with nothing: fused, a tree of narrow
    splits or concatenations would become one wide kernel again."""
    kernel = bb.lookup_binding(call).args[0]
    bb.update_func(kernel, bb.get()[kernel].with_attr("op_pattern", OPAQUE))
    return call


def _steps(bb: relax.BlockBuilder, x: relax.Expr) -> list[relax.Expr]:
    """x[t:t + 1] for every t of the first axis. Every step's kernels then read a tensor of their
    own, and are the same kernels for all steps, where slicing at each step's offset would make a
    kernel of each."""
    value = _constant(x)
    count = int(x.ty.shape.values[0])
    if value is not None:
        return [_array(value[t:t + 1]) for t in range(count)]
    if count == 1:
        return [x]
    if count <= FAN:
        parts = bb.emit(relax.op.split(x, count, axis=0))
        return [bb.emit(relax.TupleGetItem(parts, t)) for t in range(count)]
    size = -(-count // FAN)
    groups = _opaque(bb, bb.emit_te(topi.split, x, list(range(size, count, size)), 0))
    steps: list[relax.Expr] = []
    for g in range(-(-count // size)):
        steps += _steps(bb, bb.emit(relax.TupleGetItem(groups, g)))
    return steps


def _concat(bb: relax.BlockBuilder, items: list[relax.Expr], axis: int) -> relax.Expr:
    if len(items) == 1:
        return items[0]
    if len(items) <= FAN:
        return bb.emit(relax.op.concat(items, axis=axis))
    groups = []
    for start in range(0, len(items), FAN):
        group = items[start:start + FAN]
        groups.append(group[0] if len(group) == 1 else _opaque(bb, bb.emit_te(topi.concatenate, group, axis)))
    return _concat(bb, groups, axis)


def _stack(bb: relax.BlockBuilder, items: list[relax.Expr], axis: int) -> relax.Expr:
    """relax.op.stack, which ConvertLayout cannot infer a layout through either."""
    return _concat(bb, [bb.emit(relax.op.expand_dims(item, axis)) for item in items], axis)


# --- sequence lengths and dynamic quantization ------------------------------------------------

class Lengths:
    """`sequence_lens`: which steps of which rows run, as constants when the input is one."""

    def __init__(self, bb: relax.BlockBuilder, lens: relax.Expr | None, seq: int, batch: int):
        self.seq, self.batch = seq, batch
        self.const: np.ndarray | None = None
        self.expr: relax.Expr | None = None
        self.running: list[relax.Expr] = []  # per step, [1, batch, 1] bool, for a graph input
        if lens is None:
            return
        value = _constant(lens)
        if value is not None:
            value = value.astype(np.int64).reshape(batch)
            if (value < seq).any():  # else every row runs the whole sequence: nothing to mask
                self.const = value
            return
        self.expr = lens
        steps = _array(np.arange(seq, dtype=str(lens.ty.dtype)).reshape(seq, 1, 1))
        self.running = _steps(bb, bb.emit(relax.op.less(steps, relax.op.reshape(lens, [1, batch, 1]))))

    @property
    def masked(self) -> bool:
        return self.const is not None or self.expr is not None

    def step(self, t: int) -> relax.Expr | None:
        """[1, batch, 1] bool: the rows running at step t; None when all are."""
        if self.const is not None:
            running = t < self.const
            return None if running.all() else _array(running.reshape(1, self.batch, 1))
        return self.running[t] if self.running else None

    def longest(self) -> int:
        """Steps some row runs: with constant lengths, those past it are not computed."""
        return int(self.const.max()) if self.const is not None else self.seq

    def reverse(self, bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        """[seq, batch, n] with each row's first `length` steps in reverse order."""
        if not self.masked:
            return bb.emit(relax.op.flip(x, axis=0))
        seq, batch = self.seq, self.batch
        n = int(x.ty.shape.values[2])
        if self.const is not None:
            t = np.arange(seq).reshape(seq, 1)
            lens = self.const.reshape(1, batch)
            source = np.where(t < lens, lens - 1 - t, t) * batch + np.arange(batch).reshape(1, batch)
            index: relax.Expr = _array(source.reshape(-1).astype("int64"))
        else:
            lens = bb.emit(relax.op.astype(relax.op.reshape(self.expr, [1, batch]), "int64"))
            t = _array(np.arange(seq, dtype="int64").reshape(seq, 1))
            back = relax.op.subtract(relax.op.subtract(lens, relax.const(1, "int64")), t)
            source = bb.emit(relax.op.where(relax.op.less(t, lens), back, t))
            rows = _array(np.arange(batch, dtype="int64").reshape(1, batch))
            flat = relax.op.add(relax.op.multiply(source, relax.const(batch, "int64")), rows)
            index = bb.emit(relax.op.reshape(flat, [seq * batch]))
        by_row = bb.emit(relax.op.reshape(x, [seq * batch, n]))
        return bb.emit(relax.op.reshape(relax.op.take(by_row, index, axis=0), [seq, batch, n]))

    def zero_if_empty(self, bb: relax.BlockBuilder, state: relax.Expr) -> relax.Expr:
        """A final state, zero in rows of length 0 (as ONNX Runtime returns them)."""
        if self.const is not None:
            if (self.const > 0).all():
                return state
            empty: relax.Expr = _array((self.const == 0).reshape(1, self.batch, 1))
        elif self.expr is not None:
            zero = relax.const(0, str(self.expr.ty.dtype))
            empty = bb.emit(relax.op.reshape(relax.op.equal(self.expr, zero), [1, self.batch, 1]))
        else:
            return state
        return bb.emit(relax.op.where(empty, relax.const(0.0, str(state.ty.dtype)), state))


def fake_quantize_uint8(bb: relax.BlockBuilder, x: relax.Expr, ranged: relax.Expr | None = None) -> relax.Expr:
    """x quantized to uint8 and back as ONNX Runtime's dynamic quantization does: the range is
    [min(x, 0), max(x, 0)] (of `ranged` when given: x with the elements left out set to 0), the
    scale range / 255, the zero point and the values rounded half to even."""
    ranged = x if ranged is None else ranged
    value, range_value = _constant(x), _constant(ranged)
    if value is not None and range_value is not None:  # an initial state given as a constant
        return _array(_fake_quantize_uint8(value, range_value))
    op = relax.op
    dtype = str(x.ty.dtype)
    zero = relax.const(0.0, dtype)
    low = bb.emit(op.minimum(op.min(ranged), zero))
    high = bb.emit(op.maximum(op.max(ranged), zero))
    width = op.subtract(high, low)
    scale = bb.emit(op.where(op.equal(width, zero), relax.const(1.0, dtype), op.divide(width, relax.const(255.0, dtype))))
    zero_point = bb.emit(op.round(op.clip(op.negative(op.divide(low, scale)), 0.0, 255.0)))
    q = op.clip(op.add(op.round(op.divide(x, scale)), zero_point), 0.0, 255.0)
    return bb.emit(op.multiply(op.subtract(q, zero_point), scale))


def _fake_quantize_uint8(x: np.ndarray, ranged: np.ndarray) -> np.ndarray:
    """fake_quantize_uint8 in numpy (whose rounding is half to even too)."""
    low, high = min(ranged.min(), 0), max(ranged.max(), 0)
    scale = np.float32(1.0) if low == high else (high - low) / np.float32(255.0)
    zero_point = np.round(np.clip(-low / scale, 0, 255))
    return ((np.clip(np.round(x / scale) + zero_point, 0, 255) - zero_point) * scale).astype(x.dtype)


# --- the recurrence -----------------------------------------------------------------------------

Step = Callable[..., tuple[relax.Expr, relax.Expr | None]]
"""step(bb, d, xw_t, h, c, r_t, h_in) -> (h, c) after one step of direction d. xw_t is the step's
X W^T with the input biases, h and c [1, batch, hidden] (c None without cells), r_t R^T, h_in
the h to multiply by R^T (h, or h quantized and back)."""


def _recurrent(bb: relax.BlockBuilder, h: relax.Expr, r_t: relax.Expr) -> relax.Expr | None:
    """h R^T; None for a zero state."""
    if _is_zero(h):
        return None
    if _constant(h) is not None and _constant(r_t) is not None:  # the first step from a constant state
        return _array(_constant(h) @ _constant(r_t))
    return bb.emit(relax.op.matmul(h, r_t))


def _pre(bb: relax.BlockBuilder, xw: relax.Expr, hr: relax.Expr | None, index: int, hidden: int) -> relax.Expr:
    """Gate `index`'s input: its columns of X W^T (biases included) plus those of h R^T."""
    x_part = _gate(bb, xw, index, hidden)
    return x_part if hr is None else bb.emit(relax.op.add(x_part, _gate(bb, hr, index, hidden)))


@dataclass
class Recurrence:
    """One node's inputs (in layout 0: [seq, batch, ...]) and attributes."""

    node: Node
    x: relax.Expr
    w: relax.Expr  # [dirs, gates * hidden, input]
    r: relax.Expr  # [dirs, gates * hidden, hidden]
    b: relax.Expr | None  # [dirs, 2 * gates * hidden]
    lens: relax.Expr | None  # [batch]
    h0: relax.Expr | None  # [dirs, batch, hidden]
    c0: relax.Expr | None
    p: relax.Expr | None  # [dirs, 3 * hidden]
    attr: dict[str, Any]
    gates: int
    quantized: bool = False
    """Quantize X and h to uint8 and back before their matmuls (DynamicQuantizeLSTM)."""

    def __post_init__(self) -> None:
        direction = _strings(self.attr.get("direction", b"forward"))[0]
        if direction not in ("forward", "reverse", "bidirectional"):
            raise self.node.error("attribute 'direction'", f"{direction!r} is not forward, reverse or bidirectional")
        self.direction = direction
        self.directions = 2 if direction == "bidirectional" else 1
        self.seq, self.batch, _ = _static_shape(self.node, "input 'X'", self.x)
        w_shape = _static_shape(self.node, "input 'W'", self.w)
        self.hidden = w_shape[1] // self.gates
        if "hidden_size" in self.attr and int(self.attr["hidden_size"]) != self.hidden:
            raise self.node.error("attribute 'hidden_size'", f"{self.attr['hidden_size']} does not match W's shape {w_shape}")
        if w_shape[0] != self.directions:
            raise self.node.error("attribute 'direction'", f"{direction!r} needs W for {self.directions} "
                                                           f"direction(s), W has {w_shape[0]}")
        clip = self.attr.get("clip")
        self.clip = float(clip) if clip is not None else None
        self.dtype = str(self.x.ty.dtype)

    def const(self, value: float) -> relax.Expr:
        return relax.const(value, self.dtype)

    def clipped(self, bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
        if self.clip is None:
            return x
        return bb.emit(relax.op.clip(x, -self.clip, self.clip))

    def run(self, bb: relax.BlockBuilder, step: Step,
            input_bias: Callable[[relax.Expr], relax.Expr]) -> tuple[relax.Expr, relax.Expr, relax.Expr | None]:
        """Y [seq, dirs, batch, hidden], Y_h and Y_c [dirs, batch, hidden] (Y_c None without cells).
        `input_bias(b_d)`: the biases added to X W^T once for all steps, from B's row d."""
        lengths = Lengths(bb, self.lens, self.seq, self.batch)
        steps = lengths.longest()
        zeros = _array(np.zeros((1, self.batch, self.hidden), self.dtype))
        ys, hs, cs = [], [], []
        for d in range(self.directions):
            reverse = self.direction == "reverse" or d == 1
            x = lengths.reverse(bb, self.x) if reverse else self.x
            if self.quantized:
                x = fake_quantize_uint8(bb, x, self._steps_run(bb, lengths, x))
            xw = bb.emit(relax.op.matmul(x, _transpose(bb, _direction(bb, self.w, d))))
            if self.b is not None:
                xw = _add(bb, xw, input_bias(_direction(bb, self.b, d)))
            r_t = _transpose(bb, _direction(bb, self.r, d))
            h = _slice(bb, self.h0, 0, d, d + 1) if self.h0 is not None else zeros
            c = (_slice(bb, self.c0, 0, d, d + 1) if self.c0 is not None else zeros) if self.gates == 4 else None
            xw_steps = _steps(bb, _slice(bb, xw, 0, 0, steps) if steps < self.seq else xw)
            outputs: list[relax.Expr] = []
            for t in range(self.seq):
                if t >= steps:  # no row runs this step (constant lengths)
                    outputs.append(zeros)
                    continue
                h_in = h
                if self.quantized and not _is_zero(h):
                    # ONNX Runtime's hidden state holds zeros in the rows that have ended (which
                    # leaves the range as it is), the last state in the others
                    ended = lengths.step(t - 1) if t > 0 else None
                    h_in = fake_quantize_uint8(bb, h, bb.emit(relax.op.where(ended, h, self.const(0.0)))
                                               if ended is not None else None)
                h_new, c_new = step(bb, d, xw_steps[t], h, c, r_t, h_in)
                running = lengths.step(t)
                if running is None:
                    h, c = h_new, c_new
                    outputs.append(h_new)
                    continue
                h = bb.emit(relax.op.where(running, h_new, h))
                if c is not None:
                    c = bb.emit(relax.op.where(running, c_new, c))
                outputs.append(bb.emit(relax.op.where(running, h_new, self.const(0.0))))
            y = _concat(bb, outputs, axis=0)
            ys.append(lengths.reverse(bb, y) if reverse else y)
            hs.append(lengths.zero_if_empty(bb, h))
            if c is not None:
                cs.append(lengths.zero_if_empty(bb, c))
        y = _stack(bb, ys, axis=1)
        y_h = _concat(bb, hs, axis=0)
        y_c = _concat(bb, cs, axis=0) if cs else None
        return y, y_h, y_c

    def _steps_run(self, bb: relax.BlockBuilder, lengths: Lengths, x: relax.Expr) -> relax.Expr | None:
        """x with the steps no row runs set to 0: ONNX Runtime quantizes X over the others."""
        if lengths.expr is not None:
            t = _array(np.arange(self.seq, dtype=str(lengths.expr.ty.dtype)).reshape(self.seq, 1, 1))
            return bb.emit(relax.op.where(relax.op.less(t, relax.op.max(lengths.expr)), x, self.const(0.0)))
        steps = lengths.longest()
        if steps < self.seq:
            run = _array((np.arange(self.seq) < steps).reshape(self.seq, 1, 1))
            return bb.emit(relax.op.where(run, x, self.const(0.0)))
        return None


# --- layouts and inputs ---------------------------------------------------------------------------

def _layout(node: Node, attr: dict[str, Any]) -> int:
    layout = int(attr.get("layout", 0))
    if layout not in (0, 1):
        raise node.error("attribute 'layout'", f"{layout} is neither 0 (sequence first) nor 1 (batch first)")
    return layout


def _layout_in(bb: relax.BlockBuilder, layout: int, *tensors: relax.Expr | None) -> list[relax.Expr | None]:
    """Layout 1 (batch first) inputs in layout 0: X [batch, seq, input] and states
    [batch, dirs, hidden] with their first two axes swapped."""
    if layout == 0:
        return list(tensors)
    return [None if t is None else bb.emit(relax.op.permute_dims(t, [1, 0, 2])) for t in tensors]


def _layout_out(bb: relax.BlockBuilder, layout: int, y: relax.Expr, *states: relax.Expr | None) -> list[Any]:
    """Outputs in the node's layout; layout 1: Y [batch, seq, dirs, hidden], states [batch, dirs, hidden]."""
    if layout == 0:
        return [y, *states]
    return [bb.emit(relax.op.permute_dims(y, [2, 0, 1, 3]))] + [
        None if s is None else bb.emit(relax.op.permute_dims(s, [1, 0, 2])) for s in states]


def _node(op: str, attr: dict[str, Any]) -> Node:
    return Node(op, str(attr.get("tvm_custom", {}).get("name", "") or ""))


def _input(inputs: list[Any], index: int) -> Any:
    return inputs[index] if len(inputs) > index else None


# --- LSTM -----------------------------------------------------------------------------------------

class _Recurrent(OnnxOpConverter):
    """The ONNX recurrent ops' versions: opset 7, 14 (adds `layout`) and 22 (same semantics)."""

    build: Any
    """(bb, node, inputs, attr, layout) -> the op's outputs."""

    @classmethod
    def _impl_v7(cls, bb: relax.BlockBuilder, inputs: list[Any], attr: dict[str, Any], params: Any) -> relax.Expr:
        return cls.build(bb, _node(cls.__name__, attr), inputs, attr, layout=0)

    @classmethod
    def _impl_v14(cls, bb: relax.BlockBuilder, inputs: list[Any], attr: dict[str, Any], params: Any) -> relax.Expr:
        node = _node(cls.__name__, attr)
        return cls.build(bb, node, inputs, attr, layout=_layout(node, attr))

    _impl_v22 = _impl_v14


def lstm(bb: relax.BlockBuilder, node: Node, inputs: list[Any], attr: dict[str, Any], layout: int,
         quantized: bool = False) -> relax.Tuple:
    """ONNX LSTM: gates i, o, f, c in W, R and B; peepholes i, o, f in P."""
    x, h0, c0 = _layout_in(bb, layout, inputs[0], _input(inputs, 5), _input(inputs, 6))
    rec = Recurrence(node, x, inputs[1], inputs[2], _input(inputs, 3), _input(inputs, 4), h0, c0,
                     _input(inputs, 7), attr, gates=4, quantized=quantized)
    acts = parse_activations(node, attr, ["Sigmoid", "Tanh", "Tanh"], rec.directions)
    input_forget = bool(int(attr.get("input_forget", 0)))
    hidden = rec.hidden
    peepholes = [_direction(bb, rec.p, d) for d in range(rec.directions)]

    def input_bias(b: relax.Expr) -> relax.Expr:
        return _add(bb, _slice(bb, b, 0, 0, 4 * hidden), _slice(bb, b, 0, 4 * hidden, 8 * hidden))

    def step(bb: relax.BlockBuilder, d: int, xw: relax.Expr, h: relax.Expr, c: relax.Expr, r_t: relax.Expr,
             h_in: relax.Expr) -> tuple[relax.Expr, relax.Expr]:
        f, g, hf = acts[d]
        hr = _recurrent(bb, h_in, r_t)

        def gate(index: int, cell: relax.Expr | None = None) -> relax.Expr:
            pre = _pre(bb, xw, hr, index, hidden)
            if cell is not None and peepholes[d] is not None:
                pre = _add(bb, pre, _multiply(bb, _gate(bb, peepholes[d], index, hidden), cell))
            return rec.clipped(bb, pre)

        i = f(bb, gate(0, c))
        forget = bb.emit(relax.op.subtract(rec.const(1.0), i)) if input_forget else f(bb, gate(2, c))
        cell = bb.emit(relax.op.add(relax.op.multiply(forget, c), relax.op.multiply(i, g(bb, gate(3)))))
        o = f(bb, gate(1, cell))
        return bb.emit(relax.op.multiply(o, hf(bb, cell))), cell

    y, y_h, y_c = rec.run(bb, step, input_bias)
    return relax.Tuple(_layout_out(bb, layout, y, y_h, y_c))


class LSTM(_Recurrent):
    """ONNX LSTM (opsets 7, 14 with `layout`, 22)."""

    build = staticmethod(lstm)


# --- GRU ------------------------------------------------------------------------------------------

def gru(bb: relax.BlockBuilder, node: Node, inputs: list[Any], attr: dict[str, Any], layout: int) -> relax.Tuple:
    """ONNX GRU: gates z, r, h in W, R and B."""
    x, h0 = _layout_in(bb, layout, inputs[0], _input(inputs, 5))
    rec = Recurrence(node, x, inputs[1], inputs[2], _input(inputs, 3), _input(inputs, 4), h0, None, None,
                     attr, gates=3)
    acts = parse_activations(node, attr, ["Sigmoid", "Tanh"], rec.directions)
    linear_before_reset = bool(int(attr.get("linear_before_reset", 0)))
    hidden = rec.hidden
    # With the linear transformation first, the hidden gate's recurrent bias Rbh is inside the
    # reset product; every other bias is added to X W^T once for all steps.
    recurrent_h_bias = [None if rec.b is None else _slice(bb, _direction(bb, rec.b, d), 0, 5 * hidden, 6 * hidden)
                        for d in range(rec.directions)]

    def input_bias(b: relax.Expr) -> relax.Expr:
        wb, rb = _slice(bb, b, 0, 0, 3 * hidden), _slice(bb, b, 0, 3 * hidden, 6 * hidden)
        if linear_before_reset:
            rb_zr, no_h = _slice(bb, rb, 0, 0, 2 * hidden), _array(np.zeros(hidden, rec.dtype))
            rb = _array(np.concatenate([_constant(rb_zr), _constant(no_h)])) if _constant(rb_zr) is not None \
                else bb.emit(relax.op.concat([rb_zr, no_h], axis=0))
        return _add(bb, wb, rb)

    def step(bb: relax.BlockBuilder, d: int, xw: relax.Expr, h: relax.Expr, c: None, r_t: relax.Expr,
             h_in: relax.Expr) -> tuple[relax.Expr, None]:
        f, g = acts[d]
        # z and r from the first two gates of h R^T (all three when the linear transformation is first)
        hr = _recurrent(bb, h, r_t if linear_before_reset else _gate(bb, r_t, 0, 2 * hidden))
        z = f(bb, rec.clipped(bb, _pre(bb, xw, hr, 0, hidden)))
        r = f(bb, rec.clipped(bb, _pre(bb, xw, hr, 1, hidden)))
        if linear_before_reset:
            rh = None if hr is None else _gate(bb, hr, 2, hidden)
            if recurrent_h_bias[d] is not None:
                rh = recurrent_h_bias[d] if rh is None else _add(bb, rh, recurrent_h_bias[d])
            reset = None if rh is None else relax.op.multiply(r, rh)
        else:
            reset = None if _is_zero(h) else \
                relax.op.matmul(bb.emit(relax.op.multiply(r, h)), _gate(bb, r_t, 2, hidden))
        x_h = _gate(bb, xw, 2, hidden)
        candidate = g(bb, rec.clipped(bb, x_h if reset is None else bb.emit(relax.op.add(x_h, reset))))
        one = rec.const(1.0)
        return bb.emit(relax.op.add(relax.op.multiply(relax.op.subtract(one, z), candidate),
                                    relax.op.multiply(z, h))), None

    y, y_h, _ = rec.run(bb, step, input_bias)
    return relax.Tuple(_layout_out(bb, layout, y, y_h))


class GRU(_Recurrent):
    """ONNX GRU (opsets 7, 14 with `layout`, 22), `linear_before_reset` 0 or 1."""

    build = staticmethod(gru)


# --- RNN ------------------------------------------------------------------------------------------

def rnn(bb: relax.BlockBuilder, node: Node, inputs: list[Any], attr: dict[str, Any], layout: int) -> relax.Tuple:
    """ONNX RNN: Ht = f(Xt W^T + Ht-1 R^T + Wb + Rb)."""
    x, h0 = _layout_in(bb, layout, inputs[0], _input(inputs, 5))
    rec = Recurrence(node, x, inputs[1], inputs[2], _input(inputs, 3), _input(inputs, 4), h0, None, None,
                     attr, gates=1)
    acts = parse_activations(node, attr, ["Tanh"], rec.directions)
    hidden = rec.hidden

    def input_bias(b: relax.Expr) -> relax.Expr:
        return _add(bb, _slice(bb, b, 0, 0, hidden), _slice(bb, b, 0, hidden, 2 * hidden))

    def step(bb: relax.BlockBuilder, d: int, xw: relax.Expr, h: relax.Expr, c: None, r_t: relax.Expr,
             h_in: relax.Expr) -> tuple[relax.Expr, None]:
        return acts[d][0](bb, rec.clipped(bb, _pre(bb, xw, _recurrent(bb, h, r_t), 0, hidden))), None

    y, y_h, _ = rec.run(bb, step, input_bias)
    return relax.Tuple(_layout_out(bb, layout, y, y_h))


class RNN(_Recurrent):
    """ONNX RNN (opsets 7, 14 with `layout`, 22)."""

    build = staticmethod(rnn)


# --- com.microsoft.DynamicQuantizeLSTM --------------------------------------------------------------

def _dequantize_weights(bb: relax.BlockBuilder, node: Node, name: str, q: relax.Expr, scale: relax.Expr,
                        zero_point: relax.Expr | None) -> relax.Expr:
    """[dirs, n, 4 * hidden] int8/uint8 -> [dirs, 4 * hidden, n] float, as ONNX's LSTM lays it out.
    The scale and zero point are per direction [dirs] or per output column [dirs, 4 * hidden]."""
    dirs, _, columns = _static_shape(node, f"input {name!r}", q)
    scale_shape = _static_shape(node, f"input '{name}_scale'", scale)
    if scale_shape == [dirs]:
        broadcast = [dirs, 1, 1]
    elif scale_shape == [dirs, columns]:
        broadcast = [dirs, 1, columns]
    else:
        raise node.error(f"input '{name}_scale'", f"shape {scale_shape} is neither [{dirs}] nor [{dirs}, {columns}]")
    dtype = str(scale.ty.dtype)
    q_np, scale_np, zp_np = _constant(q), _constant(scale), _constant(zero_point)
    if q_np is not None and scale_np is not None and (zero_point is None or zp_np is not None):
        value = q_np.astype(dtype) - (0 if zp_np is None else zp_np.astype(dtype).reshape(broadcast))
        return _array((value * scale_np.reshape(broadcast)).transpose(0, 2, 1))
    value = relax.op.astype(q, dtype)
    if zero_point is not None:
        value = relax.op.subtract(value, relax.op.reshape(relax.op.astype(zero_point, dtype), broadcast))
    value = relax.op.multiply(value, relax.op.reshape(scale, broadcast))
    return bb.emit(relax.op.permute_dims(value, [0, 2, 1]))


class DynamicQuantizeLSTM(OnnxOpConverter):
    """ONNX Runtime's LSTM with int8/uint8 weights stored input-major ([dirs, input, 4 * hidden]),
    which `onnxruntime.quantization.quantize_dynamic` makes of an LSTM. Inputs: X, W, R, B,
    sequence_lens, initial_h, initial_c, P, W_scale, W_zero_point, R_scale, R_zero_point."""

    @classmethod
    def _impl_v1(cls, bb: relax.BlockBuilder, inputs: list[Any], attr: dict[str, Any], params: Any) -> relax.Expr:
        node = _node("com.microsoft.DynamicQuantizeLSTM", attr)
        if _input(inputs, 8) is None or _input(inputs, 10) is None:
            raise node.error("inputs 'W_scale', 'R_scale'", "both are required")
        w = _dequantize_weights(bb, node, "W", inputs[1], inputs[8], _input(inputs, 9))
        r = _dequantize_weights(bb, node, "R", inputs[2], inputs[10], _input(inputs, 11))
        float_inputs = [inputs[0], w, r, *[_input(inputs, i) for i in range(3, 8)]]
        return lstm(bb, node, float_inputs, attr, layout=0, quantized=True)


CONVERTERS: dict[tuple[str, str], Any] = {
    ("", "LSTM"): LSTM,
    ("", "GRU"): GRU,
    ("", "RNN"): RNN,
    ("com.microsoft", "DynamicQuantizeLSTM"): DynamicQuantizeLSTM,
}
