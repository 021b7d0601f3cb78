"""The layout's rules, checked on the source: no import cycles, no oversized modules without a reason.

Issue #13's "Done when": no import cycle among ``streamapp`` modules, counting imports anywhere in
a module (function-level ones and ``__import__``/``import_module`` strings included, and the
package ``__init__`` modules an import runs first; imports under ``if TYPE_CHECKING:`` aside,
since they never run), and no module over ~400 lines without a
stated reason in its docstring (a paragraph starting ``Size:``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "streamapp"
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(parents: list[ast.AST]) -> bool:
    for node in parents:
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                return True
    return False


def imported_names(tree: ast.Module, package: str) -> Iterator[str]:
    """Every module name an import anywhere in ``tree`` may load (TYPE_CHECKING blocks aside)."""
    stack: list[tuple[ast.AST, list[ast.AST]]] = [(tree, [])]
    while stack:
        node, parents = stack.pop()
        stack.extend((child, [*parents, node]) for child in ast.iter_child_nodes(node))
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        if names and not _type_checking_only(parents):
            yield from names


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        targets = set(imported_names(tree, package))
        # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are imports too, except a
        # module's own enclosing packages (they are always initialised before it, by Python).
        parents = {t.rsplit(".", depth)[0] for t in targets for depth in range(1, t.count(".") + 1)}
        targets |= {p for p in parents if not name.startswith(p + ".")}
        graph[name] = {t for t in targets if t in found and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_are_found_in_functions_and_strings_but_not_under_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from streamapp import hidden\n"
        "def f():\n    from streamapp.sink import service\n    __import__('streamapp.web.api')\n"
        "from . import sibling\n"
    )
    names = set(imported_names(ast.parse(source), "streamapp.pkg"))
    assert {"streamapp.sink", "streamapp.sink.service", "streamapp.web.api", "streamapp.pkg.sibling"} <= names
    assert "streamapp.hidden" not in names


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert cycles(graph) == []


def test_no_module_over_400_lines_without_a_reason() -> None:
    oversized = []
    for name, path in modules().items():
        lines = path.read_text().count("\n")
        if lines <= MAX_LINES:
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if not any(paragraph.strip().startswith("Size:") for paragraph in docstring.split("\n\n")):
            oversized.append(f"{name}: {lines} lines")
    assert oversized == []
