"""What failed, in words a user can act on: TVM's own message without its C++ traceback or the
TVMScript it prints after it, the ONNX node whose conversion failed, the Relax pass that was
running, and the kernel that did not build.

TVM's exceptions carry the message a user needs between a C++ backtrace and, often, a dump of the
module in TVMScript (``# from tvm.script import ...`` through ``# Metadata omitted...``); the first
or last line of the text is then noise. The full text still goes to the log.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("mlci")

_DUMP_START = re.compile(r"^\s*(# from tvm\.script import|@I\.ir_module|@T\.prim_func|@R\.function|"
                         r"# Metadata omitted|class Module:)")
_TRACEBACK = re.compile(r"^\s*(File \"|\[bt\]|Stack trace|Traceback \(most recent|\d+: 0x[0-9a-f]+|at /|"
                        r"raise |\^+$|~+\^*$)")
_KIND = re.compile(r"^(tvm\.error\.|tvm_ffi\.)?[A-Za-z]*(Error|Exception):\s*")
MAX_MESSAGE = 500


def tvm_message(exc: BaseException) -> str:
    """The lines of a TVM error that say what went wrong, joined on one line (at most 500 chars)."""
    text = str(exc).strip()
    kept = []
    for line in text.splitlines():
        if _DUMP_START.match(line):
            break  # the rest is the module TVM printed, not the message
        if not line.strip() or _TRACEBACK.match(line):
            continue
        kept.append(line.strip())
    # A C++ error's own message comes last, after the frames it went through.
    for index, line in enumerate(kept):
        if "Check failed" in line or _KIND.match(line) or "Error:" in line:
            kept = kept[index:]
            break
    message = " ".join(_KIND.sub("", line, count=1) for line in kept) or type(exc).__name__
    return message[:MAX_MESSAGE]


class ConverterError(ValueError):
    """A node one of mlci's converters cannot convert; the message names the op, the node and what
    it was given."""


class NodeConversionError(Exception):
    """An ONNX node that TVM's importer (or a converter of mlci's) failed to convert."""

    def __init__(self, op: str, node: str, cause: BaseException):
        self.op, self.node, self.cause = op, node, cause
        super().__init__(f"{op} node {node!r}: {tvm_message(cause)}")


def names_node(message: str, node: str) -> bool:
    return f"node {node!r}" in message


class PassTracker:
    """A pass instrument that knows which pass is running, so a failure inside the Relax pipeline
    names it (`current`)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def instrument(self) -> Any:
        import tvm

        tracker = self

        @tvm.instrument.pass_instrument
        class Track:
            def run_before_pass(self, _mod: Any, info: Any) -> None:
                tracker.stack.append(info.name)

            def run_after_pass(self, _mod: Any, _info: Any) -> None:
                if tracker.stack:
                    tracker.stack.pop()

        return Track()

    @property
    def current(self) -> str | None:
        """The innermost pass that had started and not finished (the failing one, after a failure)."""
        named = [name for name in self.stack if name and not name.startswith("sequential")]
        return named[-1] if named else None


@contextmanager
def tracked_passes(tracker: PassTracker) -> Iterator[None]:
    """Inside the current PassContext's settings, with `tracker` instrumenting every pass."""
    import tvm

    current = tvm.transform.PassContext.current()
    with tvm.transform.PassContext(opt_level=current.opt_level, config=dict(current.config),
                                   instruments=[*current.instruments, tracker.instrument()]):
        yield


def in_pass(tracker: PassTracker) -> str:
    """' in pass X' for a message, or ''."""
    return f" in TVM pass {tracker.current}" if tracker.current else ""


KERNEL_SEARCH_SECONDS = 60.0
"""At most this long building kernels one by one to find the one that fails a build."""


def failing_kernel(scheduled: Any, tvm_target: Any) -> tuple[str, str] | None:
    """Build each kernel of a scheduled module alone; (name, message) of the first that fails, or
    None when each builds alone (or the search ran out of time)."""
    import tvm

    deadline = time.monotonic() + KERNEL_SEARCH_SECONDS
    for gvar, func in scheduled.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if time.monotonic() > deadline:
            return None
        try:
            tvm.compile(tvm.IRModule({gvar.name_hint: func.with_attr("global_symbol", gvar.name_hint)}),
                        target=tvm_target)
        except Exception as exc:  # noqa: BLE001 - this is the search for the kernel that fails
            return gvar.name_hint, tvm_message(exc)
    return None

