"""mlci's modules import in one direction: contracts -> pure logic -> adapters -> commands -> cli.

A module may import from its own layer or any layer before it, never after, and no
modules import each other in a circle. Imports inside functions count too: a lazy
import is still a dependency. There is no list of exceptions.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mlci"

LAYERS: dict[str, set[str]] = {
    "contracts": {"mlci", "mlci.config", "mlci.results"},
    "pure logic": {"mlci.stats", "mlci.gate", "mlci.budget", "mlci.formatting", "mlci.templating", "mlci.report",
                   "mlci.console", "mlci.trend", "mlci.launch", "mlci.trace_check",
                   "mlci.graph", "mlci.policy"},
    "adapters": {"mlci.models", "mlci.converters", "mlci.converters.rnn", "mlci.converters.quantized", "mlci.converters.standard",
                 "mlci.compile", "mlci.schedules", "mlci.build_cache", "mlci.tuning", "mlci.remote_cache", "mlci.targets",
                 "mlci.measure", "mlci.pipeline", "mlci.ab", "mlci.gitinfo", "mlci.tracking", "mlci.actions", "mlci.github",
                 "mlci.delivery", "mlci.history", "mlci.serving", "mlci.emulation", "mlci.runners",
                 "mlci.diagnose", "mlci.interrupt", "mlci.reference"},
    "commands": {"mlci.commands", "mlci.commands.run", "mlci.commands.compare", "mlci.commands.init",
                 "mlci.commands.matrix", "mlci.commands.cache_key", "mlci.commands.doctor", "mlci.commands.sync",
                 "mlci.commands.tune", "mlci.commands.history", "mlci.commands.runner"},
    "cli": {"mlci.cli"},
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The mlci modules a file imports, anywhere in it (function bodies included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mlci import gate` imports the module mlci.gate; `from mlci.gate import x` imports mlci.gate.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.startswith("mlci"):
                found.add(name)
    return found


def layer_of(module: str) -> str:
    for layer, members in LAYERS.items():
        if module in members:
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a later layer, as "importer -> imported"."""
    return [f"{module} ({layer_of(module)}) -> {dep} ({layer_of(dep)})"
            for module, deps in sorted(graph.items()) for dep in sorted(deps)
            if ORDER.index(layer_of(dep)) > ORDER.index(layer_of(module))]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return None
        for dep in sorted(graph.get(node, ())):
            if dep != "mlci" and (cycle := visit(dep, [*path, node])):  # the package itself only holds the version
                return cycle
        done.add(node)
        return None

    for module in sorted(graph):
        if cycle := visit(module, []):
            return cycle
    return None


GRAPH = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}


def test_every_module_has_a_layer() -> None:
    for name in GRAPH:
        layer_of(name)


def test_imports_flow_one_way() -> None:
    assert upward_imports(GRAPH) == []


def test_no_import_cycles() -> None:
    assert find_cycle(GRAPH) is None


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """A contract importing an adapter lazily, and two modules importing each other, are caught."""
    bad = tmp_path / "results.py"
    bad.write_text("def f():\n    from mlci.pipeline import Pipeline\n    from mlci import gate\n")
    deps = imports_of(bad, set(GRAPH))
    assert deps == {"mlci.pipeline", "mlci.gate", "mlci"}
    assert upward_imports({"mlci.results": deps}) == [
        "mlci.results (contracts) -> mlci.gate (pure logic)", "mlci.results (contracts) -> mlci.pipeline (adapters)"]
    assert find_cycle({"mlci.gate": {"mlci.results"}, "mlci.results": {"mlci.gate"}}) == [
        "mlci.gate", "mlci.results", "mlci.gate"]


def test_every_package_of_mlci_ships() -> None:
    """A subpackage missing from pyproject's explicit list works in an editable install and is
    absent from a real one (the action's)."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
