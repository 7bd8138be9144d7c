"""The layout of ``mace_ops``, read from its source with ``ast``: no import cycle (lazy imports inside
functions count too), the bottom layer imports nothing of ours, and no function is over the length limit.

The graph is built independently of Python's import machinery: every ``import``/``from ... import`` in a
module's syntax tree that names a module of the package is an edge; a cycle is any strongly connected
component of more than one module (Tarjan), or a module that imports itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mace_ops"
#: modules every other module may import: they import nothing of ``mace_ops`` but each other as listed
BOTTOM = {"mace_ops.errors": set(), "mace_ops.io": {"mace_ops.errors"}}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that module ``name`` (file ``path``) imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                if f"{target}.{a.name}" in modules:  # from package import module
                    found.add(f"{target}.{a.name}")
                elif target in modules:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imported(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or with a self-edge (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_known_cycle_and_accepts_a_tree():
    """The checker itself, on graphs whose answer is known by hand."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}, "b": set()}) == [["a"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_graph_sees_relative_lazy_and_package_imports():
    graph = import_graph()
    assert "mace_ops.errors" in graph["mace_ops.pipeline"]  # from .errors import MaceError (top level)
    assert "mace_ops.evaluation" in graph["mace_ops.cli"]  # from .evaluation import ... (inside a function)
    assert "mace_ops.base" not in graph and "mace_ops.hosts.base" in graph["mace_ops.hosts.diffusers"]  # from .base


def test_mace_ops_has_no_import_cycle():
    found = cycles(import_graph())
    assert found == [], f"import cycles in mace_ops: {found}"


def test_bottom_layer_imports_nothing_of_ours():
    graph = import_graph()
    for name, allowed in BOTTOM.items():
        assert graph[name] <= allowed, f"{name} imports {sorted(graph[name] - allowed)}"
