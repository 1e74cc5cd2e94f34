"""Compiled libraries kept with the tuning records they were built from.

A build depends only on the model as imported, the target and its thread count, the record each
kernel takes from the tuning cache, which kernels keep their default schedule, and the code that
compiles (mlci's compile and schedule modules, TVM). `build_key` hashes all of them. A run that
finds its key loads that library, in milliseconds, instead of compiling the model again and timing
it against the build with default schedules only (about 20 s for SqueezeNet on 2 cores). The
never-worse choice is kept with the library, so the same inputs also keep the same choice.

Entries live in the tuning cache directory (one target and fingerprint), so they travel with it
between CI runs. The oldest are removed past `MAX_PER_MODEL` entries of a model or `MAX_BYTES`
in all. A directory this process cannot write is still read; builds made then are exported to a
temporary directory and not filed.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlci.compile import BuildChoice, BuildReport

log = logging.getLogger("mlci")

LIBRARY_FILE = "library.so"
ENTRY_FILE = "build.json"
MAX_PER_MODEL = 4
"""Builds kept per model name: the head and base of a pull request and a few before them."""
MAX_BYTES = 256 << 20
"""All builds of a cache together; a model's library holds its weights."""
_STAGING = ".staging"


@functools.cache
def code_version() -> str:
    """What compiles a model: mlci's compile and schedule modules as they are on disk, and TVM's version."""
    import tvm
    import tvm_ffi

    from mlci import compile as tvm_compile
    from mlci import schedules

    digest = hashlib.sha256(f"tvm {tvm.__version__} tvm-ffi {tvm_ffi.__version__}".encode())
    for module in (tvm_compile, schedules):
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()


def build_key(**inputs: Any) -> str:
    """A key over everything the build depends on (JSON-able values), plus `code_version()`."""
    text = json.dumps({**inputs, "code": code_version()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CachedBuild:
    library: Path
    report: BuildReport
    choice: BuildChoice | None
    """The never-worse timing made when the library was built; None when it was not needed."""
    seconds: float
    """How long the build took when it was made."""


class BuildCache:
    """A directory of builds, one sub-directory per key: the library and what is known about it."""

    def __init__(self, directory: Path, max_per_model: int = MAX_PER_MODEL, max_bytes: int = MAX_BYTES,
                 read_only: str | None = None):
        self.dir = Path(directory)
        self.max_per_model = max_per_model
        self.max_bytes = max_bytes
        self.read_only = read_only
        """Why builds cannot be filed here (None: they can, as far as tried). Given by an owner that
        already told the user so; otherwise found, and said, when a build is first exported."""
        self._told = read_only is not None
        self._staging: Path | None = None

    def get(self, key: str) -> CachedBuild | None:
        """The build filed under `key`; None when there is none or it cannot be read (then it is
        built again, with a warning)."""
        entry = self.dir / key
        if not entry.is_dir():
            return None
        try:
            data = json.loads((entry / ENTRY_FILE).read_text())
            library = entry / LIBRARY_FILE
            if not library.is_file() or library.stat().st_size != data["library_bytes"]:
                raise ValueError(f"{LIBRARY_FILE} is missing or not the size recorded")
            choice = data["choice"]
            return CachedBuild(
                library=library,
                report=BuildReport(**data["report"]),
                choice=BuildChoice(**choice) if choice is not None else None,
                seconds=float(data["seconds"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("build cache %s: entry %s cannot be read (%s); building again", self.dir, key, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def staging_path(self) -> Path:
        """A new path to export a library to before it is filed (or dropped)."""
        return self._staging_dir() / f"{uuid.uuid4().hex}.so"

    def _staging_dir(self) -> Path:
        """The staging directory, tried once; a private temporary one when this one cannot be written."""
        if self._staging is None and self.read_only is None:
            staging = self.dir / _STAGING
            try:
                staging.mkdir(parents=True, exist_ok=True)
                probe = staging / f"{uuid.uuid4().hex}.probe"
                probe.touch()
                probe.unlink()
                self._staging = staging
            except OSError as exc:
                self.read_only = f"{exc.strerror or type(exc).__name__}: {exc.filename or staging}"
        if self._staging is None:
            if not self._told:
                log.warning("build cache %s cannot be written (%s): builds made this run are used, not kept",
                            self.dir, self.read_only)
                self._told = True
            self._staging = Path(tempfile.mkdtemp(prefix="mlci-builds-"))
            atexit.register(shutil.rmtree, self._staging, True)
        return self._staging

    def put(self, key: str, model: str, library: Path, report: BuildReport, choice: BuildChoice | None,
            seconds: float) -> Path:
        """File `library` (moved in) under `key`; returns where it now is. The entry appears whole
        or not at all, so a crash or a concurrent run never leaves half of one. A cache that cannot
        be written files nothing: the library stays where it was exported."""
        self._staging_dir()  # finds out whether this directory can be written
        if self.read_only is not None:
            return library
        entry = self.dir / key
        tmp = self.dir / _STAGING / f"{key}-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        os.replace(library, tmp / LIBRARY_FILE)
        (tmp / ENTRY_FILE).write_text(json.dumps({
            "model": model,
            "created": time.time(),
            "seconds": round(seconds, 3),
            "library_bytes": (tmp / LIBRARY_FILE).stat().st_size,
            "report": dataclasses.asdict(report),
            "choice": dataclasses.asdict(choice) if choice is not None else None,
        }, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # another run filed the same key first: the same inputs, the same build
            shutil.rmtree(tmp, ignore_errors=True)
        self.prune()
        return entry / LIBRARY_FILE

    def prune(self) -> None:
        """Remove the oldest entries past the per-model and total limits (never the newest), and
        staging files an interrupted run left."""
        if self.read_only is not None:
            return
        entries = []
        for entry in self.dir.iterdir() if self.dir.is_dir() else []:
            try:
                data = json.loads((entry / ENTRY_FILE).read_text())
                size = sum(f.stat().st_size for f in entry.iterdir())
                entries.append((float(data["created"]), str(data["model"]), size, entry))
            except (OSError, ValueError, KeyError, TypeError):
                continue  # the staging directory, or an entry another run is writing
        entries.sort(reverse=True)  # newest first
        per_model: dict[str, int] = {}
        total = 0
        for rank, (_created, model, size, entry) in enumerate(entries):
            per_model[model] = per_model.get(model, 0) + 1
            total += size
            # Rank 0, the newest, is the build just filed: it stays, however large.
            if rank > 0 and (per_model[model] > self.max_per_model or total > self.max_bytes):
                shutil.rmtree(entry, ignore_errors=True)
                total -= size
        staging = self.dir / _STAGING
        for leftover in staging.iterdir() if staging.is_dir() else []:
            try:
                if time.time() - leftover.stat().st_mtime < 3600:
                    continue  # perhaps another run's, in progress
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            except OSError:
                continue  # removed by another run meanwhile
