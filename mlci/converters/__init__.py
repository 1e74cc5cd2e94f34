"""ONNX operators TVM's Relax importer has no converter for, converted by mlci.

Each converter is a `tvm.relax.frontend.onnx.onnx_frontend.OnnxOpConverter` subclass, keyed
by `(domain, op_type)` in `CONVERTERS`. `install()` adds them to the importer's operator table
(which it rebuilds from `_get_convert_map()` on every lookup), so TVM stays unforked and an
upgrade that brings its own converter for an op wins over ours only if we drop ours.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from mlci.diagnose import ConverterError, NodeConversionError

DEFAULT_DOMAINS = ("", "ai.onnx")
MICROSOFT = "com.microsoft"
"""ONNX Runtime's contrib operators: TVM's importer converts a few (FastGelu, Attention...),
mlci a few more (its quantizer's output)."""

_installed = False


def qualified(domain: str, op_type: str) -> str:
    """How an operator is named to users: `LSTM`, `com.microsoft.DynamicQuantizeLSTM`."""
    return op_type if domain in DEFAULT_DOMAINS else f"{domain}.{op_type}"


def converters() -> dict[tuple[str, str], Any]:
    """(domain, op_type) -> converter class, for every operator mlci converts itself."""
    from mlci.converters import quantized, rnn, standard

    table: dict[tuple[str, str], Any] = {}
    table.update(standard.CONVERTERS)
    table.update(rnn.CONVERTERS)
    table.update(quantized.CONVERTERS)
    return table


def install() -> None:
    """Make TVM's ONNX importer use mlci's converters too. Idempotent."""
    global _installed
    if _installed:
        return
    from tvm.relax.frontend.onnx import onnx_frontend

    ours = {op_type: cls for (_domain, op_type), cls in converters().items()}
    stock = onnx_frontend._get_convert_map

    def with_mlci() -> dict[str, Any]:
        table = stock()
        table.update(ours)
        return table

    onnx_frontend._get_convert_map = with_mlci
    _name_failing_nodes(onnx_frontend.ONNXGraphImporter)
    _installed = True


def _name_failing_nodes(importer: type) -> None:
    """A node whose conversion raises is named in the error (op and node), whoever converts it."""
    convert = importer._convert_operator

    def converting(self: Any, op_name: str, inputs: Any, attrs: dict[str, Any], opset: int) -> Any:
        try:
            return convert(self, op_name, inputs, attrs, opset)
        except (NodeConversionError, ConverterError):  # ours name the node themselves
            raise
        except Exception as exc:
            node = (attrs.get("tvm_custom") or {}).get("name") or "<unnamed>"
            raise NodeConversionError(op_name, node, exc) from exc

    importer._convert_operator = converting


def provider(domain: str, op_type: str) -> str | None:
    """Who converts this operator: "mlci", "tvm", or None when nobody does."""
    if (domain if domain not in DEFAULT_DOMAINS else "", op_type) in _mlci_keys():
        return "mlci"
    if domain in DEFAULT_DOMAINS or domain == MICROSOFT:
        # TVM's importer keys converters by op_type alone; for ONNX Runtime's contrib domain it
        # only has ops that exist there (FastGelu, BiasGelu, SkipLayerNormalization...).
        if op_type in _stock_ops():
            return "tvm"
    return None


def _mlci_keys() -> set[tuple[str, str]]:
    return {("" if d in DEFAULT_DOMAINS else d, op) for d, op in converters()}


def _stock_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend

    install()
    table = onnx_frontend._get_convert_map()
    mine = {op for _d, op in converters()}
    # An op both TVM and mlci name is served by mlci (install() overrides it).
    return {op for op in table if op not in mine} | {"If", "Constant"}


@dataclass(frozen=True)
class OperatorUse:
    """One operator of a model: how many nodes use it, and who converts it."""

    op: str
    nodes: int
    provider: str | None


def operator_uses(model: Any) -> list[OperatorUse]:
    """Every operator a model uses (subgraphs included), sorted by name."""
    from mlci.models import walk_nodes

    counts: Counter[tuple[str, str]] = Counter(
        (node.domain, node.op_type) for node in walk_nodes(model.graph)
    )
    uses = [OperatorUse(qualified(d, op), n, provider(d, op)) for (d, op), n in counts.items()]
    return sorted(uses, key=lambda u: u.op)
