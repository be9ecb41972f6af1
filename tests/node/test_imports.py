"""No import cycle in broker_node/: every import counts, under TYPE_CHECKING and in functions.

A cycle hidden under TYPE_CHECKING is still a cycle of concepts: each module has to be read
with the other in mind, and the next runtime import between them fails at start.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGE: Final = "broker_node"


def module_names(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of ``package`` (packages as their ``__init__``), by dotted name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every dotted name ``source`` imports, wherever the import statement sits; for ``from
    a import b`` both ``a.b`` and ``a`` (the caller keeps whichever is a module)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """Which modules of the package each one imports. ``from a import b`` imports the
    package ``a`` too (its ``__init__`` runs), so that edge is kept."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        names = imported_names(path.read_text(), module, is_package=path.name == "__init__.py")
        graph[module] = {name for name in names if name in modules and name != module}
    return graph


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The shortest cycle through each module that is in one, as a path that starts and ends
    with the same module, each cycle once (Tarjan's algorithm finds the modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                for member in sorted(component):
                    cycle = _cycle_through(member, component, graph)
                    # The same cycle, found from another of its modules, is named once.
                    first = cycle.index(min(cycle))
                    rotated = [*cycle[first:-1], *cycle[:first], cycle[first]]
                    if rotated not in found:
                        found.append(rotated)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _cycle_through(
    start: str, component: set[str], graph: Mapping[str, Iterable[str]]
) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``component``."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor == start:
                    return [*paths[node], start]
                if successor in component and successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # pragma: no cover


def named(found: list[list[str]]) -> str:
    return "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_import_cycle() -> None:
    found = cycles(import_graph(module_names()))
    assert not found, f"import cycles: {named(found)}"


def test_no_part_of_the_node_imports_the_node() -> None:
    graph = import_graph(module_names())
    for module in ("connection", "health", "metrics", "status", "drain", "dispatch", "executor"):
        assert f"{PACKAGE}.node" not in graph[f"{PACKAGE}.{module}"], module


def test_every_kind_of_import_counts() -> None:
    source = """
from typing import TYPE_CHECKING
import pkg.a
from pkg import b
from . import c
from .d import thing
if TYPE_CHECKING:
    from pkg.e import E
def later():
    from ..top import f
"""
    names = imported_names(source, "pkg.sub.mod")
    assert {"pkg.a", "pkg.b", "pkg.sub.c", "pkg.sub.d", "pkg.e", "pkg.top"} <= names
    assert "pkg.sub" in imported_names("from . import x", "pkg.sub", is_package=True)


def test_a_cycle_is_found_and_named() -> None:
    graph = {"a": {"b"}, "b": {"c", "a"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "a"], ["a", "b", "c", "a"]]
    assert named(cycles({"x": {"y"}, "y": {"x"}})) == "x -> y -> x"
    assert cycles({"x": {"y"}, "y": set()}) == []
