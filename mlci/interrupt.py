"""Ctrl-C and SIGTERM end mlci within seconds, leaving nothing of its own running.

A signal raises `Interrupted` (a KeyboardInterrupt, so every ``except KeyboardInterrupt: raise``
lets it through) in the main thread, and the command unwinds. Inside TVM (`deferred`: tuning,
builds) it is raised only when the section ends: an exception raised by the handler inside a
Python callback that TVM's C++ called (MetaSchedule's builder, its measure callbacks) ends in
``std::terminate``, which is how an interrupted tuning run used to crash (exit 139); the section
winds down quickly instead (the tuning builder builds nothing once a signal came). Then the tuning cache's writes are
atomic and its lock is released, the results file keeps what finished. `finish` then stops every
process mlci started (MetaSchedule's builder and runner workers above all, which a SIGTERM to
mlci alone would leave running) and leaves with 128 + the signal's number, without the
interpreter's teardown (TVM's objects destroyed while its worker threads still run).

Python runs a signal's handler only when the main thread is back in Python: a long C++ call (LLVM
compiling a big model) would delay it. A watcher thread, woken at once through the signal wakeup
fd, ends the process itself if the main thread has not finished `GRACE_SECONDS` later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger("mlci")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_SECONDS = 10.0
"""How long the main thread may take to unwind after a signal before the watcher ends the process."""
CHILD_GRACE_SECONDS = 2.0
"""How long child processes get to exit after SIGTERM before they are killed."""


class Interrupted(KeyboardInterrupt):
    """A signal asked mlci to stop."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: int | None = None
_installed = False
_deferring = 0


def received() -> int | None:
    """The first stopping signal received, if any."""
    return _received


def pending() -> bool:
    """A signal came and the command should wind down (inside a `deferred` section)."""
    return _received is not None


def check() -> None:
    """Raise Interrupted when a signal came: at the end of a deferred section, and in code that
    catches every Exception (TVM may turn an exception raised in a callback into its own error)."""
    if _received is not None and not _deferring:
        raise Interrupted(_received)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section of calls into TVM: a signal inside it is raised when it ends (see the module)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    check()


def _on_signal(signum: int, _frame: object) -> None:
    global _received
    if _received is not None:  # a second signal: stop now
        finish(signum)
    _received = signum
    if not _deferring:
        raise Interrupted(signum)


def install() -> None:
    """Handle SIGINT and SIGTERM as described above (main thread only; idempotent)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)
    threading.Thread(target=_watch, args=(read_fd,), name="mlci-signal-watcher", daemon=True).start()
    _installed = True


def _watch(read_fd: int) -> None:
    stopping = threading.Event()
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        if not data:
            return
        signums = [b for b in data if b in SIGNALS]
        if signums and not stopping.is_set():
            stopping.set()
            timer = threading.Timer(GRACE_SECONDS, finish, args=(signums[0],))
            timer.daemon = True
            timer.start()


def stop_children(timeout: float = CHILD_GRACE_SECONDS) -> int:
    """Terminate every process this one started (and theirs), kill those still alive after
    `timeout`; returns how many there were."""
    import psutil

    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _gone, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return len(children)


def finish(signum: int) -> None:
    """Stop the children, flush what was written, and leave with 128 + signum at once."""
    with contextlib.suppress(Exception):
        stop_children()
    with contextlib.suppress(Exception):
        sys.stderr.write(f"mlci: stopped by {signal.Signals(signum).name}\n")
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        logging.shutdown()
    os._exit(128 + signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Around a command: signals stop it as described above, and it ends through `finish`, whatever
    became of the exception on the way (a CLI framework may turn it into its own exit)."""
    install()
    try:
        yield
    except KeyboardInterrupt as exc:
        finish(exc.signum if isinstance(exc, Interrupted) else (_received or signal.SIGINT))
    finally:
        if _received is not None:
            finish(_received)
