"""The layout of ``mace_ops``, read from its source with ``ast``: no import cycle (lazy imports inside
functions count too), the bottom layer imports nothing of ours, and no function is over ``MAX_FUNCTION_LINES``.

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
#: the hard limit of the code rules (the aim is ~60): lines from ``def`` to the function's last line
MAX_FUNCTION_LINES = 80


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


def function_lengths(source: str) -> dict[str, int]:
    """``{qualified name: lines}`` of every function and method in ``source`` (nested ones too)."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    out[name] = child.end_lineno - child.lineno + 1
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def test_function_lengths_are_measured_from_def_to_last_line():
    source = "class A:\n    def f(self):\n\n        return 1\n\n\ndef g():\n    def h():\n        pass\n    return h\n"
    assert function_lengths(source) == {"A.f": 3, "g": 4, "g.h": 2}


def test_no_function_in_mace_ops_is_over_the_limit():
    long = {f"{name}.{fn}": n for name, path in _modules().items()
            for fn, n in function_lengths(path.read_text(encoding="utf-8")).items() if n > MAX_FUNCTION_LINES}
    assert long == {}, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
