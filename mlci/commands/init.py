"""`mlci init`: set a repository up for mlci in one command.

Finds the repository's ONNX models, proposes sizes for their dynamic
dimensions (marked as guesses, because a wrong batch size benchmarks the wrong
thing: images 224 x 224 unless the model suggests its own size, sequences 128,
batches 1), runs each model once in ONNX Runtime with those sizes so a guess
the model rejects is named now rather than in the first CI run, writes
``mlci.toml`` from ``templates/mlci.toml.j2`` and copies the starter workflows
(``workflows/*.yml``, shipped as ``mlci.workflows``) into ``.github/workflows/``
with the repository's default branch filled in. It never overwrites a file
unless told to (``--force``): a hand-edited config or workflow is worth more
than a generated one.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from mlci.config import DEFAULT_CONFIG_NAME, model_name_from, parse_config
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
    size_bytes: int = 0
    """The file and its external weights: above a limit init does not run the model."""
    notes: list[str] = field(default_factory=list)
    """Comment lines written above the model's bindings (what ONNX Runtime said of the guessed shapes)."""

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

BATCH, SEQUENCE, HEIGHT, WIDTH, CHANNELS, OTHER = "batch", "sequence", "height", "width", "channels", "other"
DEFAULT_SIZES = {BATCH: 1, SEQUENCE: 128, HEIGHT: 224, WIDTH: 224, CHANNELS: 3, OTHER: 1}
"""What a dynamic dimension of each kind gets when the model says nothing better: one sample, a
128-token sequence, a 224 x 224 image (the common ImageNet size), three colour channels."""
KIND_LABELS = {BATCH: "batch", SEQUENCE: "sequence length", HEIGHT: "image height", WIDTH: "image width",
               CHANNELS: "channels", OTHER: "unknown use"}
NAME_STRENGTH, POSITION_STRENGTH, FIRST_AXIS_STRENGTH, NO_STRENGTH = 3, 2, 1, 0
"""How much a guess is worth, so a dimension named in several inputs takes its best-founded size:
its name says more than where it sits, and a first axis is only probably a batch."""
INDEX_PASSTHROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
"""Ops through which an integer input still reaches a Gather as indices (token ids into an embedding)."""
_SIZE_KEY = re.compile(r"(?:img|image|input)_?(?:size|sz|shape|res|resolution)|imgsz|resolution")
_SIZE_PAIR = re.compile(r"(?<![\d.])(\d{2,5})\s*[x×X*]\s*(\d{2,5})(?![\d.])")
_SUM = re.compile(r"\s*[^\s+]+(?:\s*\+\s*[^\s+]+)+\s*")
SPATIAL_RANGE = (8, 16384)
"""Sizes a height or width read from the model's text may have (else it is some other number)."""


def dimension_kind(name: str | None) -> str | None:
    """What a dynamic dimension's name says it is (``batch_size`` a batch, ``seq_len`` a sequence), or None."""
    if not name:
        return None
    key = name.lower()
    tokens = set(re.split(r"[^a-z0-9]+", key)) - {""}
    if "batch" in key or key in {"n", "b", "bs"} or tokens & {"bs", "batchsize"}:
        return BATCH
    if "height" in key or "h" in tokens:
        return HEIGHT
    if "width" in key or "w" in tokens:
        return WIDTH
    if any(word in key for word in ("seq", "length", "token", "time")) or tokens & {"len", "t", "l"}:
        return SEQUENCE
    if "channel" in key or "c" in tokens:
        return CHANNELS
    return None


def guess_size(name: str | None) -> int:
    """A plausible size for a dynamic dimension from its name alone."""
    return DEFAULT_SIZES[dimension_kind(name) or OTHER]


@dataclass(frozen=True)
class SpatialHint:
    """An image size the model itself suggests, and where it says so (named in the `# guessed` comment)."""

    height: int | None
    width: int | None
    source: str


def _spatial_pair(numbers: list[int]) -> tuple[int, int] | None:
    """(height, width) from a size as exporters write it: ``640``, ``[640, 480]``, ``[1, 3, 640, 640]``
    (channels first or last); None when it does not read as an image size."""
    channels = range(1, 5)
    if len(numbers) == 4:
        numbers = numbers[2:] if numbers[1] in channels else numbers[1:3] if numbers[3] in channels else []
    elif len(numbers) == 3:
        numbers = numbers[1:] if numbers[0] in channels else numbers[:2] if numbers[2] in channels else []
    elif len(numbers) == 1:
        numbers = numbers * 2
    low, high = SPATIAL_RANGE
    if len(numbers) != 2 or not all(low <= n <= high for n in numbers):
        return None
    return numbers[0], numbers[1]


def spatial_hint(model: onnx.ModelProto) -> SpatialHint | None:
    """The image size the model's metadata or doc strings give (``imgsz = [640, 640]``, ``height = 736``,
    "trained on 512x512 crops"), or None."""
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    height: tuple[int, str] | None = None  # (size, metadata key)
    width: tuple[int, str] | None = None
    for key, value in metadata.items():
        normal = re.sub(r"[\s-]+", "_", key.strip().lower())
        numbers = [int(n) for n in re.findall(r"\d+", value)]
        if _SIZE_KEY.fullmatch(normal) and (pair := _spatial_pair(numbers)):
            return SpatialHint(*pair, source=f"the model's metadata ({key})")
        if len(numbers) == 1 and SPATIAL_RANGE[0] <= numbers[0] <= SPATIAL_RANGE[1]:
            kind = dimension_kind(normal)
            if kind == HEIGHT and height is None:
                height = (numbers[0], key)
            elif kind == WIDTH and width is None:
                width = (numbers[0], key)
    if height or width:
        keys = " and ".join(k for _, k in filter(None, (height, width)))
        return SpatialHint(height and height[0], width and width[0], source=f"the model's metadata ({keys})")
    texts = [("its doc string", model.doc_string), ("its graph's doc string", model.graph.doc_string)]
    texts += [(f"the doc string of input {toml_string(i.name)}", i.doc_string) for i in model.graph.input]
    texts += [(f"the model's metadata ({key})", value) for key, value in metadata.items()]
    for source, text in texts:
        for match in _SIZE_PAIR.finditer(text):
            if pair := _spatial_pair([int(match[1]), int(match[2])]):
                return SpatialHint(*pair, source=source)
    return None


def _is_fixed(dim: onnx.TensorShapeProto.Dimension) -> bool:
    return dim.HasField("dim_value") and dim.dim_value > 0


def image_axes(axes: list[onnx.TensorShapeProto.Dimension]) -> dict[int, str]:
    """Axis -> HEIGHT or WIDTH for an image-like input: N x C x H x W, or N x H x W x C, with C
    fixed to 1..4 (or named as channels); empty for anything else."""
    if len(axes) != 4:
        return {}

    def channels(dim: onnx.TensorShapeProto.Dimension) -> bool:
        return 1 <= dim.dim_value <= 4 if _is_fixed(dim) else dimension_kind(dim.dim_param) == CHANNELS

    if channels(axes[1]):
        return {2: HEIGHT, 3: WIDTH}
    if channels(axes[3]):
        return {1: HEIGHT, 2: WIDTH}
    return {}


def _sibling_hint(inputs: list[onnx.ValueInfoProto]) -> SpatialHint | None:
    """The size of an image-like input whose height and width are fixed: its dynamic siblings are
    likely the same image size (a mask beside its image, a second view)."""
    for value in inputs:
        axes = list(value.type.tensor_type.shape.dim)
        spatial = image_axes(axes)
        if spatial and all(_is_fixed(axes[axis]) for axis in spatial):
            height, width = (axes[axis].dim_value for axis in sorted(spatial))
            return SpatialHint(height, width, source=f"the fixed input {toml_string(value.name)}")
    return None


def index_inputs(model: onnx.ModelProto) -> set[str]:
    """Names of the graph inputs that reach a Gather's indices, directly or through casts and reshapes:
    token ids looked up in an embedding, whose dynamic axes are sequences."""
    from mlci.models import graph_inputs, walk_nodes

    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in walk_nodes(model.graph):
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    found = set()
    for value in graph_inputs(model):
        frontier, seen = [value.name], set()
        while frontier and value.name not in found:
            name = frontier.pop()
            if name in seen:
                continue
            seen.add(name)
            for node, position in consumers.get(name, []):
                if node.domain in ("", "ai.onnx") and node.op_type == "Gather" and position == 1:
                    found.add(value.name)
                elif node.domain in ("", "ai.onnx") and node.op_type in INDEX_PASSTHROUGH and position == 0:
                    frontier.extend(node.output)
    return found


@dataclass(frozen=True)
class Guess:
    size: int
    strength: int
    why: str
    """What the size was taken for (``image height``), and from where when not the default."""


def guess_dimension(dim: onnx.TensorShapeProto.Dimension, axis: int, position_kind: str | None,
                    hint: SpatialHint | None) -> Guess:
    """A size for one dynamic dimension: by its name, else by where it sits (an image's height, a token
    sequence, the first axis as the batch), else 1."""
    name_kind = dimension_kind(dim.dim_param)
    if name_kind:
        kind, strength = name_kind, NAME_STRENGTH
    elif position_kind:
        kind, strength = position_kind, POSITION_STRENGTH
    elif axis == 0:
        kind, strength = BATCH, FIRST_AXIS_STRENGTH
    else:
        kind, strength = OTHER, NO_STRENGTH
    from_hint = hint and (hint.height if kind == HEIGHT else hint.width if kind == WIDTH else None)
    if from_hint:
        return Guess(from_hint, strength, f"{KIND_LABELS[kind]}, from {hint.source}")
    return Guess(DEFAULT_SIZES[kind], strength, KIND_LABELS[kind])


def _sum_guess(name: str, guesses: dict[str, Guess]) -> Guess | None:
    """A dimension named as a sum (``past_sequence_length + 1``, as exporters of decoders write it) is
    the sum of its terms' sizes, when each term is a number or another dimension of the model."""
    if not _SUM.fullmatch(name):
        return None
    total = 0
    for term in (t.strip() for t in name.split("+")):
        if term.isdigit():
            total += int(term)
        elif term in guesses:
            total += guesses[term].size
        else:
            return None
    return Guess(total, NAME_STRENGTH + 1, "the sum of its terms")


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


def model_bytes(path: Path, model: onnx.ModelProto) -> int:
    """The file's size plus that of the external data files its weights live in."""
    import onnx

    locations = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in tensor.external_data if entry.key == "location")
    total = path.stat().st_size
    for location in locations:
        try:
            total += (path.parent / location).stat().st_size
        except OSError:
            pass  # missing: ONNX Runtime says so when it loads the model
    return total


def _axis_label(axis: int, dim: onnx.TensorShapeProto.Dimension, guess: Guess) -> str:
    name = toml_string(dim.dim_param) if dim.dim_param else "unnamed"
    return f"{axis} ({name}, {guess.why})"


def propose_model(root: Path, path: Path) -> ProposedModel:
    """Read a model's inputs (not its weights) and propose a binding for every dynamic dimension:
    named ones go into ``dims``; an input with an unnamed one needs its whole shape in ``inputs``,
    since mlci can only bind an unnamed dimension that way. The same name gets the same size
    everywhere, the best-founded of its guesses. Raises UnreadableModel."""
    from mlci.models import graph_inputs

    full_path = path if path.is_absolute() else root / path
    model = _load(full_path)
    inputs = [v for v in graph_inputs(model) if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")]
    hint = spatial_hint(model) or _sibling_hint(inputs)
    indices = index_inputs(model)
    named: dict[str, Guess] = {}
    dim_uses: dict[str, list[str]] = {}
    shaped: list[tuple[onnx.ValueInfoProto, list[onnx.TensorShapeProto.Dimension], dict[int, Guess]]] = []
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
        positions = image_axes(axes)
        if value.name in indices and len(axes) in (2, 3) and _is_integer(tensor_type.elem_type):
            positions = dict.fromkeys(range(1, len(axes)), SEQUENCE)
        guesses = {axis: guess_dimension(d, axis, positions.get(axis), hint)
                   for axis, d in enumerate(axes) if not _is_fixed(d)}
        shaped.append((value, axes, guesses))
        for axis, guess in guesses.items():
            name = axes[axis].dim_param
            if name and (name not in named or guess.strength > named[name].strength):
                named[name] = guess
    for name in named:
        if summed := _sum_guess(name, named):
            named[name] = summed

    bindings: list[Binding] = []
    for value, axes, guesses in shaped:
        input_name = toml_string(value.name)
        unnamed = [axis for axis in guesses if not axes[axis].dim_param]
        if not unnamed:
            for axis in guesses:
                dim_uses.setdefault(axes[axis].dim_param, []).append(f"input {input_name} axis {axis}")
            continue
        for axis in unnamed:
            if axes[axis].HasField("dim_value"):
                warnings.append(
                    f"input {input_name} axis {axis} is stored as the fixed size {axes[axis].dim_value}; "
                    "mlci cannot bind such a dimension: re-export the model with that dimension dynamic "
                    "(named or unset) or fixed to a positive size"
                )
        final = {axis: named.get(axes[axis].dim_param, guess) for axis, guess in guesses.items()}
        shape = [final[axis].size if axis in final else d.dim_value for axis, d in enumerate(axes)]
        dynamic = [_axis_label(axis, axes[axis], guess) for axis, guess in final.items()]
        noun = "axis" if len(dynamic) == 1 else "axes"
        bindings.append(Binding(
            "inputs", value.name, shape,
            f"guessed: {noun} {', '.join(dynamic)} of input {input_name} "
            f"{'is' if len(dynamic) == 1 else 'are'} dynamic; edit to the shape you want benchmarked",
        ))
    dim_bindings = [
        Binding(
            "dims", name, named[name].size,
            f"guessed ({named[name].why}) for the dynamic dimension {toml_string(name)} ({', '.join(uses)}); "
            "edit to the size you want benchmarked",
        )
        for name, uses in dim_uses.items()
    ]
    stem = Path(path).name.removesuffix(".onnx") or Path(path).stem
    name = model_name_from(stem)
    return ProposedModel(name=name, path=_relative(root, path), bindings=dim_bindings + bindings, warnings=warnings,
                         size_bytes=model_bytes(full_path, model))


def _is_integer(elem_type: int) -> bool:
    import onnx

    return elem_type in {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                         onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
                         onnx.TensorProto.UINT64}


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


# --- checking the guesses in ONNX Runtime ---------------------------------

RAN, FAILED, UNLOADABLE, NOT_RUN = "ran", "failed", "unloadable", "not run"
ERROR_CHARS = 300
"""ONNX Runtime's messages are cut to this length: the node and the reason come first."""
TERMINATE_GRACE_SECONDS = 5.0
"""How long a run told to stop may take to reach its next node before init goes on without it."""


@dataclass(frozen=True)
class CheckLimits:
    """What running the models may cost init: a model too big to load quickly, or one still running
    after `seconds`, is left to `mlci run` (and init says so)."""

    max_bytes: int = 512 * 2**20
    seconds: float = 30.0
    """Per model, loading included."""
    total_seconds: float = 120.0
    """For all the models of one init together."""


@dataclass(frozen=True)
class ShapeCheck:
    """What ONNX Runtime made of one model with its guessed input shapes."""

    outcome: str
    """RAN, FAILED (the shapes do not fit the model), UNLOADABLE, or NOT_RUN (too big, too slow, not bindable)."""
    detail: str = ""
    """ONNX Runtime's error (shortened), or why the model was not run."""
    shapes: str = ""
    """The input shapes it was run with (``image [1, 3, 224, 224]``)."""


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_LOAD = re.compile(r"^Load model from .*? failed:\s*", re.S)
_ORT_NODE = re.compile(r"Non-zero status code returned while running (\S+) node\. Name:'(.*?)' Status Message: (.*)", re.S)
_SOURCE_LOCATION = re.compile(r"^\S+\.(?:h|cc|cpp|cu|hpp):\d+ ")


def short_ort_error(exc: BaseException) -> str:
    """ONNX Runtime's message without its error-code prefix and C++ source locations, on one line:
    ``Reshape node 'flatten': The input tensor cannot be reshaped to the requested shape. ...``."""
    text = _ORT_LOAD.sub("", _ORT_PREFIX.sub("", str(exc).strip()))  # init names the file itself
    if match := _ORT_NODE.match(text):
        op, node, message = match.groups()
        if _SOURCE_LOCATION.match(message):
            # "file.h:91 function(args) condition was false. The reason." keeps the reason.
            message = message.split(" was false. ", 1)[1] if " was false. " in message else _SOURCE_LOCATION.sub("", message)
        text = f"{op} node {node!r}: {message}"
    text = " ".join(text.split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _run_once(path: Path, feeds: dict[str, Any], seconds: float) -> ShapeCheck:
    """Load the model in ONNX Runtime and run it once on `feeds`, for at most about `seconds`: a run
    past them is told to stop; a load past them is abandoned (its daemon thread dies with init)."""
    import onnxruntime as ort

    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # errors come back as exceptions; the log would print them twice
    outcome: list[ShapeCheck] = []

    def load_and_run() -> None:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own unrelated types
            outcome.append(ShapeCheck(UNLOADABLE, short_ort_error(exc)))
            return
        try:
            session.run(None, feeds, run_options)
        except Exception as exc:
            outcome.append(ShapeCheck(FAILED, short_ort_error(exc)))
        else:
            outcome.append(ShapeCheck(RAN))

    worker = threading.Thread(target=load_and_run, name=f"mlci-init-check:{path.name}", daemon=True)
    worker.start()
    worker.join(max(seconds, 0.0))
    if worker.is_alive() or not outcome:
        run_options.terminate = True  # a run stops at its next node
        worker.join(TERMINATE_GRACE_SECONDS)
        return ShapeCheck(NOT_RUN, f"ONNX Runtime was still loading or running it after {seconds:g} s")
    return outcome[0]


def _size_text(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"


def check_shapes(root: Path, model: ProposedModel, limits: CheckLimits, seconds: float) -> ShapeCheck:
    """Run the model once in ONNX Runtime with the shapes the config proposes (bound as `mlci run`
    binds them) on seeded random inputs, within `seconds`."""
    import onnx

    from mlci.config import ModelConfig
    from mlci.measure import make_inputs
    from mlci.models import ModelError, bind_input_shapes

    if model.size_bytes > limits.max_bytes:
        return ShapeCheck(NOT_RUN, f"it is {_size_text(model.size_bytes)}, over the "
                                   f"{_size_text(limits.max_bytes)} init runs")
    if seconds <= 0:
        return ShapeCheck(NOT_RUN, f"init's {limits.total_seconds:g} s for running models were spent on the ones before")
    path = root / model.path
    cfg = ModelConfig(name=model.name, path=path, inputs=model.inputs, dims=model.dims, key=f"model {model.name}")
    try:
        specs = bind_input_shapes(onnx.load(str(path), load_external_data=False), cfg)
        feeds = make_inputs(specs, seed=0)  # integers come out as 0 and 1: in range as indices
    except (ModelError, ValueError) as exc:
        return ShapeCheck(NOT_RUN, str(exc))
    shapes = ", ".join(f"{toml_string(s.name)} {list(s.shape)}" for s in specs)
    return replace(_run_once(path, feeds, seconds), shapes=shapes)


def check_note(check: ShapeCheck) -> list[str]:
    """The comment lines mlci.toml gets above the model's bindings (none when it ran)."""
    if check.outcome == FAILED:
        return [f"mlci init: ONNX Runtime failed on the guessed shapes ({check.shapes}): {check.detail}",
                "mlci init: edit the sizes below to ones the model accepts before the first CI run"]
    if check.outcome == UNLOADABLE:
        return [f"mlci init: ONNX Runtime cannot load this model: {check.detail}"]
    if check.outcome == NOT_RUN:
        return [f"mlci init: the guessed shapes were not checked: {check.detail}"]
    return []


def check_warning(shown: str, check: ShapeCheck) -> str | None:
    """What init prints of the check (nothing when the model ran)."""
    if check.outcome == FAILED:
        return (f"{shown}: the guessed shapes fail in ONNX Runtime ({check.shapes}): {check.detail}; "
                "edit them in mlci.toml before the first CI run")
    if check.outcome == UNLOADABLE:
        return (f"{shown}: ONNX Runtime cannot load it: {check.detail}; `mlci run` will fail on it too "
                "(ONNX Runtime's outputs are its reference)")
    if check.outcome == NOT_RUN:
        return f"{shown}: the guessed shapes were not checked: {check.detail}"
    return None


# --- rendering --------------------------------------------------------------


@cache
def _environment() -> jinja2.Environment:
    return make_environment(filters=dict(toml=toml_value, toml_key=toml_key))  # the filters quote every TOML value


def render_config(models: list[ProposedModel]) -> str:
    """The text of mlci.toml: defaults spelled out, a host CPU target, Arm and GPU examples, the models
    (each model's notes as comments under its `path`, above the sizes they are about)."""
    lines = _environment().get_template(TEMPLATE).render(models=models).split("\n")
    for model in models:
        if not model.notes:
            continue
        at = lines.index(f"name = {toml_value(model.name)}") + 1  # names are unique
        if lines[at].startswith("path = "):
            at += 1
        lines[at:at] = [f"# {_comment_text(note)}" for note in model.notes]
    return "\n".join(lines)


def _comment_text(text: str) -> str:
    """Text a TOML comment can hold: one line, no control characters."""
    return "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)


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


def _checked(root: Path, models: list[ProposedModel], limits: CheckLimits, warnings: list[str]) -> list[ProposedModel]:
    """The models with what ONNX Runtime made of their guessed shapes as notes; a warning for each that
    did not run. Models whose inputs init could not bind are left alone: their warnings say it."""
    deadline = time.monotonic() + limits.total_seconds
    out = []
    for model in models:
        if model.warnings:
            out.append(model)
            continue
        result = check_shapes(root, model, limits, min(limits.seconds, deadline - time.monotonic()))
        if warning := check_warning(model.path, result):
            warnings.append(warning)
        out.append(replace(model, notes=check_note(result)))
    return out


def execute(root: Path, force: bool = False, models: list[Path] | None = None, branch: str | None = None,
            check: CheckLimits | None = CheckLimits()) -> InitOutcome:
    """Find (or take) the models, propose their shapes, run each model once in ONNX Runtime with them
    (within `check`'s limits; None: not at all), write mlci.toml and the starter workflows.
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
    if check is not None:
        proposed = _checked(root, proposed, check, warnings)
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
