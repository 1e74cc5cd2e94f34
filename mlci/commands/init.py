"""`mlci init`: set a repository up for mlci in one command.

Finds the repository's ONNX models, proposes sizes for their dynamic
dimensions (marked as guesses, because a wrong batch size benchmarks the wrong
thing), writes ``mlci.toml`` from ``templates/mlci.toml.j2`` and copies the
starter workflows (``workflows/*.yml``, shipped as ``mlci.workflows``) into
``.github/workflows/`` with the repository's default branch filled in. It
never overwrites a file unless told to (``--force``): a hand-edited config or
workflow is worth more than a generated one.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import subprocess
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from mlci.config import DEFAULT_CONFIG_NAME, parse_config
from mlci.templating import make_environment

if TYPE_CHECKING:
    import onnx

TEMPLATE = "mlci.toml.j2"
WORKFLOWS_PACKAGE = "mlci.workflows"
WORKFLOWS_DIR = Path(".github") / "workflows"
BRANCH_MARKER = "# mlci init: the default branch"
"""Starter-workflow lines ending with this comment hold ``[main]``, replaced by the default branch."""
FALLBACK_BRANCH = "main"
SKIP_DIRS = frozenset({".git", ".mlci", ".venv", "venv", "node_modules", "site-packages", "__pycache__"})
"""Never searched for models: virtual environments and caches hold ONNX files that are not the repository's."""


class InitError(Exception):
    """A usage error (exit 2): files that would be overwritten, a --model that does not exist, a bad --root."""


class UnreadableModel(Exception):
    """An ONNX file that cannot be read; it is left out of the config with a warning."""


@dataclass(frozen=True)
class Binding:
    """One proposed `dims.NAME = N` or `inputs.NAME = [...]` line, with the comment saying it was guessed."""

    section: str
    """``dims`` (a named dynamic dimension) or ``inputs`` (a whole input shape)."""
    key: str
    value: int | list[int]
    comment: str


@dataclass(frozen=True)
class ProposedModel:
    name: str
    path: str
    """Posix path relative to the root (where mlci.toml goes), as written into the config."""
    bindings: list[Binding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What the user must look at (inputs mlci cannot bind as they are)."""

    @property
    def dims(self) -> dict[str, int]:
        return {b.key: b.value for b in self.bindings if b.section == "dims"}

    @property
    def inputs(self) -> dict[str, list[int]]:
        return {b.key: b.value for b in self.bindings if b.section == "inputs"}


@dataclass
class InitOutcome:
    root: Path
    written: list[str]
    """Files written, relative to the root (posix), mlci.toml first."""
    models: list[ProposedModel]
    warnings: list[str]
    """Files left out (and why), inputs that need a hand, no models found."""
    branch: str
    gitignore_lists_state: bool
    """Whether .mlci/ is already ignored (else the user is told to add it)."""

    @property
    def guessed(self) -> list[ProposedModel]:
        return [m for m in self.models if m.bindings]


# --- TOML and YAML quoting --------------------------------------------------

_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def toml_string(text: str) -> str:
    """A TOML basic string. Not json.dumps: its ``\\ud83d`` surrogate escapes and raw DEL are invalid TOML."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    """A bare key when TOML allows one (``batch``), else a quoted one (``"input:0"``)."""
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML rendering for {type(value).__name__}")


_PLAIN_BRANCH = re.compile(r"[A-Za-z][A-Za-z0-9._/-]*")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def yaml_branch(name: str) -> str:
    """A branch name inside a YAML flow list: plain when YAML reads it back as that string, else
    double-quoted (as JSON would, which YAML reads too), so `1.0` or `no` stay strings."""
    if _PLAIN_BRANCH.fullmatch(name) and name.lower() not in _YAML_WORDS:
        return name
    return '"' + "".join(_yaml_char(ch) for ch in name) + '"'


def _yaml_char(ch: str) -> str:
    """One character inside a YAML (and JSON-compatible) double-quoted string: escaped unless printable."""
    code = ord(ch)
    if ch in '"\\':
        return "\\" + ch
    if 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD or code >= 0x10000:
        return ch
    return f"\\u{code:04x}"


# --- finding models ---------------------------------------------------------


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes] | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None


def _skipped(relative: Path) -> bool:
    return any(part in SKIP_DIRS for part in relative.parts[:-1])


def find_models(root: Path) -> list[Path]:
    """Every ``*.onnx`` under the root, relative to it, sorted. In a git repository git lists them
    (tracked and untracked, not ignored: downloaded or generated models are not the repo's)."""
    proc = _git(root, "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.onnx")
    if proc is not None and proc.returncode == 0:
        names = {Path(os.fsdecode(raw)) for raw in proc.stdout.split(b"\0") if raw}
        # --cached still lists files deleted from the working tree.
        found = [p for p in names if not _skipped(p) and (root / p).is_file()]
        return sorted(found, key=lambda p: p.as_posix())
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in filenames:
            if name.endswith(".onnx"):
                found.append((Path(dirpath) / name).relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def _model_path(root: Path, given: Path) -> Path:
    """A --model path: relative to the root (like paths in mlci.toml), else to the current directory."""
    for candidate in ([given] if given.is_absolute() else [root / given, given]):
        if candidate.is_file():
            return candidate.resolve()
    raise InitError(f"--model {given}: no such file")


def _relative(root: Path, path: Path) -> str:
    path = path if path.is_absolute() else root / path
    try:
        return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()
    except ValueError:  # another drive (Windows): only an absolute path reaches it
        return path.resolve().as_posix()


# --- proposing shapes -------------------------------------------------------


def guess_size(name: str | None) -> int:
    """A plausible size for a dynamic dimension from its name. Only a starting point: the comment
    beside it in mlci.toml asks the user to put the size they really run."""
    if not name:
        return 1
    key = name.lower()
    tokens = set(re.split(r"[^a-z0-9]+", key)) - {""}
    if "batch" in key or key in {"n", "b", "bs"} or tokens & {"bs", "batchsize"}:
        return 1
    if "height" in key or "width" in key or tokens & {"h", "w"}:
        return 224
    if any(word in key for word in ("seq", "length", "token", "time")) or tokens & {"len", "t", "l"}:
        return 128
    if "channel" in key or tokens & {"c"}:
        return 3
    return 1


def _load(path: Path) -> onnx.ModelProto:
    """The model without its weights (only the inputs are needed); UnreadableModel says why not."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, OSError, ...
        raise UnreadableModel(f"cannot be read as ONNX: {exc}") from None
    if not model.HasField("graph"):
        raise UnreadableModel("not an ONNX model: it has no graph")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise UnreadableModel(f"not a valid ONNX model: {exc}") from None
    return model


def _axis_label(axis: int, dim: onnx.TensorShapeProto.Dimension) -> str:
    return f"{axis} ({toml_string(dim.dim_param)})" if dim.dim_param else f"{axis} (unnamed)"


def propose_model(root: Path, path: Path) -> ProposedModel:
    """Read a model's inputs (not its weights) and propose a binding for every dynamic dimension:
    named ones go into ``dims``; an input with an unnamed one needs its whole shape in ``inputs``,
    since mlci can only bind an unnamed dimension that way. Raises UnreadableModel."""
    from mlci.models import graph_inputs

    model = _load(path if path.is_absolute() else root / path)
    dims: dict[str, int] = {}
    dim_uses: dict[str, list[str]] = {}
    bindings: list[Binding] = []
    warnings: list[str] = []
    for value in graph_inputs(model):
        input_name = toml_string(value.name)
        if not value.type.HasField("tensor_type"):
            warnings.append(f"input {input_name} is not a tensor; mlci supports only tensor inputs")
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            warnings.append(
                f"input {input_name} has no shape in the model; set models.inputs.{toml_key(value.name)} "
                "in mlci.toml to the shape you run"
            )
            continue
        axes = list(tensor_type.shape.dim)
        fixed = [d.HasField("dim_value") and d.dim_value > 0 for d in axes]
        unnamed = [axis for axis, d in enumerate(axes) if not fixed[axis] and not d.dim_param]
        if not unnamed:
            for axis, d in enumerate(axes):
                if not fixed[axis]:
                    dims.setdefault(d.dim_param, guess_size(d.dim_param))
                    dim_uses.setdefault(d.dim_param, []).append(f"input {input_name} axis {axis}")
            continue
        for axis in unnamed:
            if axes[axis].HasField("dim_value"):
                warnings.append(
                    f"input {input_name} axis {axis} is stored as the fixed size {axes[axis].dim_value}; "
                    "mlci cannot bind such a dimension: re-export the model with that dimension dynamic "
                    "(named or unset) or fixed to a positive size"
                )
        shape = [d.dim_value if fixed[axis] else guess_size(d.dim_param) for axis, d in enumerate(axes)]
        dynamic = [_axis_label(axis, d) for axis, d in enumerate(axes) if not fixed[axis]]
        noun = "axis" if len(dynamic) == 1 else "axes"
        bindings.append(Binding(
            "inputs", value.name, shape,
            f"guessed: {noun} {', '.join(dynamic)} of input {input_name} "
            f"{'is' if len(dynamic) == 1 else 'are'} dynamic; edit to the shape you want benchmarked",
        ))
    dim_bindings = [
        Binding(
            "dims", name, size,
            f"guessed for the dynamic dimension {toml_string(name)} ({', '.join(dim_uses[name])}); "
            "edit to the size you want benchmarked",
        )
        for name, size in dims.items()
    ]
    stem = Path(path).name.removesuffix(".onnx") or Path(path).stem
    name = re.sub(r"[^\w.-]+", "_", stem).strip("_") or "model"
    return ProposedModel(name=name, path=_relative(root, path), bindings=dim_bindings + bindings, warnings=warnings)


def unique_names(models: list[ProposedModel]) -> list[ProposedModel]:
    """Model names must differ (results, MLflow runs and --model are keyed by them): a second
    ``model`` becomes ``model-2``."""
    taken: set[str] = set()
    out = []
    for model in models:
        name, n = model.name, 1
        while name in taken:
            n += 1
            name = f"{model.name}-{n}"
        taken.add(name)
        out.append(model if name == model.name else replace(model, name=name))
    return out


# --- rendering --------------------------------------------------------------


@cache
def _environment() -> jinja2.Environment:
    return make_environment(filters=dict(toml=toml_value, toml_key=toml_key))  # the filters quote every TOML value


def render_config(models: list[ProposedModel]) -> str:
    """The text of mlci.toml: defaults spelled out, a host CPU target, Arm and GPU examples, the models."""
    return _environment().get_template(TEMPLATE).render(models=models)


# --- starter workflows ------------------------------------------------------


def _workflows_package() -> Traversable:
    """The starter workflows shipped with mlci (the repository's top-level workflows/)."""
    return importlib.resources.files(WORKFLOWS_PACKAGE)


def set_default_branch(text: str, branch: str) -> str:
    """Point the marked ``[main]`` lines (push and pull_request triggers, ...) at the default branch."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip().endswith(BRANCH_MARKER) and "[main]" in line:
            lines[i] = line.replace("[main]", f"[{yaml_branch(branch)}]", 1)
    return "".join(lines)


def starter_workflows(branch: str) -> dict[str, str]:
    """File name -> text of every starter workflow, for the repository's default branch."""
    package = _workflows_package()
    files = sorted((f for f in package.iterdir() if f.name.endswith(".yml") and f.is_file()), key=lambda f: f.name)
    return {f.name: set_default_branch(f.read_text(encoding="utf-8"), branch) for f in files}


def detect_branch(root: Path) -> str:
    """origin's HEAD (or the GitHub event's default branch), else the branch checked out, else main."""
    from mlci.gitinfo import default_branch

    branch = default_branch(root)
    if branch:
        return branch
    proc = _git(root, "symbolic-ref", "--short", "HEAD")
    if proc is not None and proc.returncode == 0 and proc.stdout.strip():
        return os.fsdecode(proc.stdout.strip())
    return FALLBACK_BRANCH


def _state_dir_ignored(root: Path) -> bool:
    """Whether .mlci/ is ignored already: listed in the root's .gitignore, or ignored by git anyway."""
    try:
        lines = (root / ".gitignore").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    patterns = {line.strip() for line in lines}
    if patterns & {".mlci", ".mlci/", "/.mlci", "/.mlci/", "**/.mlci", "**/.mlci/"}:
        return True
    proc = _git(root, "check-ignore", "-q", ".mlci/")
    return proc is not None and proc.returncode == 0


# --- the command ------------------------------------------------------------


def _encodable(text: str) -> bool:
    """False for file names that are not UTF-8 (decoded with surrogate escapes): TOML cannot hold them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def execute(root: Path, force: bool = False, models: list[Path] | None = None, branch: str | None = None) -> InitOutcome:
    """Find (or take) the models, propose their shapes, write mlci.toml and the starter workflows.
    Writes nothing when a file would be overwritten without ``force``. Raises InitError."""
    if not root.is_dir():
        raise InitError(f"--root {root}: not a directory")
    root = root.resolve()
    if branch is not None and not branch.strip():
        raise InitError("--branch: empty branch name")
    paths = [_model_path(root, Path(p)) for p in models] if models else find_models(root)
    branch = branch or detect_branch(root)
    workflows = starter_workflows(branch)

    targets = [Path(DEFAULT_CONFIG_NAME)] + [WORKFLOWS_DIR / name for name in workflows]
    existing = [t.as_posix() for t in targets if (root / t).exists()]
    if existing and not force:
        raise InitError(
            f"not overwriting {', '.join(existing)}: they exist already in {root.resolve()}; "
            "nothing was written (use --force to overwrite them)"
        )

    warnings: list[str] = []
    proposed = []
    for path in paths:
        shown = _relative(root, path)
        if not _encodable(shown):
            warnings.append(f"{shown.encode('utf-8', 'backslashreplace').decode()}: left out: its path is not "
                            "valid UTF-8, which mlci.toml cannot hold; rename the file")
            continue
        try:
            model = propose_model(root, path)
        except UnreadableModel as exc:
            warnings.append(f"{shown}: left out: {exc}")
            continue
        proposed.append(model)
        warnings.extend(f"{shown}: {w}" for w in model.warnings)
    proposed = unique_names(proposed)
    if not proposed:
        warnings.append(
            "no ONNX model was found: add a [[models]] table per model to mlci.toml "
            "(there is an example in it); until then `mlci run` says \"no models configured\""
        )

    text = render_config(proposed)
    if proposed:
        # A config that mlci itself rejects would be a bug here, not the user's problem.
        parse_config(text, root / DEFAULT_CONFIG_NAME)
    contents = {Path(DEFAULT_CONFIG_NAME): text} | {WORKFLOWS_DIR / name: body for name, body in workflows.items()}
    written = []
    for relative, body in contents.items():
        target = root / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "w", encoding="utf-8", newline="\n") as f:
                f.write(body)
        except OSError as exc:
            raise InitError(f"cannot write {target}: {exc}") from None
        written.append(relative.as_posix())
    return InitOutcome(
        root=root,
        written=written,
        models=proposed,
        warnings=warnings,
        branch=branch,
        gitignore_lists_state=_state_dir_ignored(root),
    )
