"""Rule-based CPU schedules for kernels that have no tuned record yet.

TVM's CPU build leaves a kernel without a schedule as the plain loop nest the operator was
written as: one thread, scalar code, 10-100x slower than a library. Tuning fixes that kernel by
kernel, but a new model (or one with more kernels than a commit's budget) would otherwise be
measured, checked and compared on naive code. These rules are what a person would write first:

- element-wise producers and consumers are inlined where that adds no branch to an inner loop;
- a kernel's main reduction (convolution, matmul, pooling) is tiled: the innermost output axis
  (channels, on CPU's channels-last convolutions) is split into a vector-wide tile and the longest
  other one into a small register tile, widened by more vectors when that axis gives few rows,
  all placed under the reduction loops so partial sums stay in registers; the outer output loops
  are fused and run in parallel, the weight tile's loop first so it stays in cache; the
  initialisation is split out and vectorized;
- its element-wise epilogue (bias, activation) is computed inside the same parallel loop;
- every other block runs its outer data-parallel loops in parallel and its innermost vectorized.

Any rule that does not apply is skipped; a kernel none apply to stays as it was.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("mlci")

REGISTER_TILE = 8
"""Rows of the output kept in registers at once (times a vector-wide tile of columns)."""


SERIAL_VECTOR_LOOP_ROWS = 64
"""Rows (iterations of the outer loops) an element-wise block needs before its loop over vectors is
left out of the parallel loop."""


def vector_lanes(tvm_target: Any) -> int:
    """float32 lanes of the target's widest vector registers (what to tile the innermost axis by)."""
    features = " ".join(str(x) for x in (tvm_target.attrs.get("mattr") or []))
    mcpu = str(tvm_target.attrs.get("mcpu") or "")
    wide = ("avx512" in features or any(tag in mcpu for tag in ("skylake-avx512", "cascadelake", "icelake",
                                                                  "sapphirerapids", "emeraldrapids", "graniterapids",
                                                                  "cooperlake", "tigerlake", "znver4", "znver5")))
    if wide:
        return 16
    if str(tvm_target.attrs.get("mtriple") or "").startswith(("aarch64", "arm")) or "neon" in features:
        return 4
    return 8


def _largest_divisor(extent: int, limit: int) -> int:
    return max(d for d in range(1, max(1, min(extent, limit)) + 1) if extent % d == 0)


def _vector_width(extent: int, lanes: int) -> int:
    """The widest power of two up to `lanes` dividing `extent` (1000 -> 8, where the largest divisor,
    10, would split into a full and a partial register), or any divisor when only 1 or 2 is."""
    width = 1
    while width * 2 <= lanes and extent % (width * 2) == 0:
        width *= 2
    return width if width >= 4 else _largest_divisor(extent, lanes)


def _extent(sch: Any, loop: Any) -> int | None:
    extent = sch.get(loop).extent
    return int(extent.value) if hasattr(extent, "value") else None


def _blocks(sch: Any) -> list[Any]:
    func_name = sch.func_working_on.name_hint if sch.func_working_on is not None else "main"
    root = sch.get_sblock("root", func_name=func_name)
    return list(sch.get_child_blocks(root))


def _iter_types(sch: Any, block: Any) -> list[int]:
    return [int(iv.iter_type) for iv in sch.get(block).iter_vars]


def _is_reduction(sch: Any, block: Any) -> bool:
    return any(t != 0 for t in _iter_types(sch, block))


def _try(what: str, fn: Any, *args: Any) -> Any:
    """`fn(*args)`, or None when that rule does not apply (schedule primitives change nothing then)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a rule that does not apply is skipped
        log.debug("default schedule: %s did not apply", what)
        return None


def _applies(what: str, fn: Any, *args: Any) -> bool:
    """Like `_try`, for primitives that return nothing: did it apply?"""
    try:
        fn(*args)
        return True
    except Exception as exc:  # noqa: BLE001
        log.debug("default schedule: %s did not apply: %s", what, str(exc).strip().splitlines()[-1:])
        return False


def _inline_elementwise(sch: Any) -> None:
    """Inline element-wise blocks into their consumers (or a consumer into its element-wise
    producer), except into a reduction, where a padding would put a branch in the inner loop."""
    for block in reversed(_blocks(sch)):
        if _is_reduction(sch, block):
            continue
        consumers = sch.get_consumers(block)
        if consumers and not any(_is_reduction(sch, c) for c in consumers):
            _applies("compute_inline", sch.compute_inline, block)
    for block in _blocks(sch):
        if _is_reduction(sch, block):
            continue
        producers = sch.get_producers(block)
        if producers and not any(_is_reduction(sch, p) for p in producers):
            _applies("reverse_compute_inline", sch.reverse_compute_inline, block)


def _parallel_vectorize(sch: Any, block: Any, lanes: int, threads: int) -> None:
    """Outer data-parallel loops fused and parallel, the innermost vectorized when it is data-parallel."""
    loops = sch.get_loops(block)
    types = _iter_types(sch, block)
    if not loops or len(loops) != len(types):
        return
    spatial_prefix = []
    for loop, kind in zip(loops, types):
        if kind != 0:
            break
        spatial_prefix.append(loop)
    inner = loops[-1]
    if types[-1] == 0 and len(spatial_prefix) == len(loops):
        extent = _extent(sch, inner)
        if extent and extent > lanes and extent % lanes == 0:
            vectors, inner = sch.split(inner, factors=[None, lanes])
            rest = 1
            for loop in spatial_prefix[:-1]:
                rest *= _extent(sch, loop) or 1
            # Given enough other rows to share out, the loop over vectors stays serial inside the
            # parallel one, where lowering can split it at a condition (a concatenation's seam).
            spatial_prefix = spatial_prefix[:-1] + ([] if rest >= SERIAL_VECTOR_LOOP_ROWS else [vectors])
        if extent and extent > 1:
            _applies("vectorize", sch.vectorize, inner)
            spatial_prefix = [lp for lp in spatial_prefix if not lp.same_as(inner)]
    if spatial_prefix:
        fused = sch.fuse(*spatial_prefix) if len(spatial_prefix) > 1 else spatial_prefix[0]
        if (_extent(sch, fused) or 0) > 1 and threads > 1:
            _applies("parallel", sch.parallel, fused)


def _tile_reduction(sch: Any, block: Any, lanes: int, threads: int) -> Any | None:
    """Tile a reduction; returns the fused parallel loop its epilogue should be computed under."""
    loops = sch.get_loops(block)
    types = _iter_types(sch, block)
    if len(loops) != len(types):
        return None
    spatial = [lp for lp, t in zip(loops, types) if t == 0]
    reduce = [lp for lp, t in zip(loops, types) if t != 0]
    spatial = [lp for lp in spatial if (_extent(sch, lp) or 0) > 1] or spatial
    if not spatial or not reduce:
        return None
    # Accumulate the tile in a local buffer (registers), written back once per tile.
    _try("cache_write", sch.cache_write, block, 0, "local")
    last = spatial[-1]
    last_extent = _extent(sch, last) or 1
    vec = _vector_width(last_extent, lanes)
    others = spatial[:-1]
    # The register tile goes on the longest other output axis (output channels for a convolution,
    # rows for a matmul): each vector loaded from the input is then reused that many times.
    tile_axis = max(others, key=lambda lp: _extent(sch, lp) or 0, default=None)
    outer: list[Any] = []
    inner: list[Any] = []
    rows = 1
    for loop in others:
        if tile_axis is not None and loop.same_as(tile_axis):
            rows = _largest_divisor(_extent(sch, loop) or 1, REGISTER_TILE)
            loop_outer, loop_inner = sch.split(loop, factors=[None, rows])
            outer.append(loop_outer)
            inner.append(loop_inner)
        else:
            outer.append(loop)
    # Where the other axis gives few rows (13x13 images, a batch of 1), the tile widens to several
    # vectors along the innermost axis instead, so there are still enough independent sums.
    vectors = _largest_divisor(last_extent // vec, max(1, REGISTER_TILE // rows))
    last_outer, last_vectors, last_inner = sch.split(last, factors=[None, vectors, vec])
    inner += [last_vectors, last_inner]
    # The innermost axis's outer loop goes first: one tile of weights (output channels) then stays
    # in cache while the whole image is swept, instead of all the weights streaming past each pixel.
    sch.reorder(last_outer, *outer, *reduce, *inner)
    fused = sch.fuse(last_outer, *outer) if outer else last_outer
    if threads > 1:
        _applies("parallel", sch.parallel, fused)
    # Vectorize while the block is still a reduction with its init (TVM refuses it after the split).
    _applies("vectorize", sch.vectorize, last_inner)
    for loop in inner[:-1]:
        if (_extent(sch, loop) or 0) > 1:
            _applies("unroll", sch.unroll, loop)
    init = _try("decompose_reduction", sch.decompose_reduction, block, reduce[0])
    if init is not None:
        _applies("vectorize init", sch.vectorize, sch.get_loops(init)[-1])
    return fused


def cpu_default_schedule(sch: Any, *, lanes: int, threads: int) -> bool:
    """Schedule one kernel in place; False when it has no block to schedule."""
    _inline_elementwise(sch)
    blocks = _blocks(sch)
    if not blocks:
        return False
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    anchor = reductions[0] if len(reductions) == 1 else None
    names = [str(sch.get(b).name_hint) for b in blocks]
    done = set()
    if anchor is not None:
        fused = _try("tiling", _tile_reduction, sch, anchor, lanes, threads)
        if fused is not None:
            done.add(str(sch.get(anchor).name_hint))
            for consumer in _epilogue(sch, anchor):
                if _applies("reverse_compute_at", sch.reverse_compute_at, consumer, fused):
                    done.add(str(sch.get(consumer).name_hint))
                    _applies("vectorize epilogue", sch.vectorize, sch.get_loops(consumer)[-1])
    for block in _blocks(sch):
        name = str(sch.get(block).name_hint)
        if name in names and name not in done:
            _applies("parallel/vectorize", _parallel_vectorize, sch, block, lanes, threads)
    return True


def _epilogue(sch: Any, block: Any) -> list[Any]:
    chain, current = [], block
    while True:
        consumers = sch.get_consumers(current)
        if len(consumers) != 1 or _is_reduction(sch, consumers[0]):
            return chain
        chain.append(consumers[0])
        current = consumers[0]


def default_schedule_for(tvm_target: Any, threads: int) -> Any | None:
    """The rule-based schedule for kernels with no tuned record on this target, or None where
    TVM has its own (GPU targets get DLight's rules)."""
    if tvm_target.kind.name != "llvm":
        return None
    lanes = vector_lanes(tvm_target)

    def schedule(sch: Any) -> bool:
        try:
            return cpu_default_schedule(sch, lanes=lanes, threads=threads)
        except Exception as exc:  # noqa: BLE001 - the kernel then stays as plain loops
            log.warning("default schedule failed: %s", str(exc).strip().splitlines()[-1][:300] if str(exc) else exc)
            return False

    return schedule
