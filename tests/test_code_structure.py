"""Structural rules of the code base (issue 18), checked on the syntax trees, without importing:

* no import cycle between the modules of ``pipeline/``, ``stages/`` and ``zeroseg/``;
* no function in ``pipeline/`` longer than :data:`MAX_FUNCTION_LINES` lines.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "zeroseg")
MAX_FUNCTION_LINES = 80


# -- modules and their imports -----------------------------------------------------------------
def _modules() -> dict[str, Path]:
    """Dotted module name -> file (a package's ``__init__.py`` is the package's name)."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = list(f.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement at any level, except those under ``if TYPE_CHECKING:`` (never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if _is_package(path) else module.split(".")[:-1]
    if node.level > 1:
        package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports.

    ``import a.b.c`` is an edge to ``a.b.c`` (or its longest prefix that is a project module);
    ``from a.b import c`` to ``a.b.c`` when that is a module, else to the module of ``a.b`` that
    defines ``c``: a package ``__init__`` that re-exports ``c`` (``from .m import c``) stands for
    ``a.b.m`` (importing a submodule runs its package's ``__init__`` first, but a name re-exported
    there comes from the submodule that defines it).
    """
    mods = _modules()
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in mods.items()}
    reexports: dict[str, dict[str, str]] = {}  # package -> name -> absolute module it comes from
    for m, p in mods.items():
        if _is_package(p):
            for node in trees[m].body:
                if isinstance(node, ast.ImportFrom):
                    src = _base(m, p, node)
                    for a in node.names:
                        reexports.setdefault(m, {})[a.asname or a.name] = src

    def known(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in mods:
                return ".".join(parts)
            parts.pop()
        return None

    def origin(base: str, name: str, seen: frozenset[str] = frozenset()) -> str | None:
        if f"{base}.{name}" in mods:
            return f"{base}.{name}"
        src = reexports.get(base, {}).get(name)
        if src is not None and base not in seen and known(src) is not None:
            return origin(src, name, seen | {base}) if src in reexports else known(src)
        return known(base)

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, tree in trees.items():
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [known(a.name) for a in node.names]
            else:
                base = _base(m, mods[m], node)
                targets = [origin(base, a.name) for a in node.names]
            graph[m].update(t for t in targets if t is not None and t != m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan (recursive: a few hundred modules)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_a_cycle(graph, comp) for comp in components]


def _a_cycle(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first inside it)."""
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return comp  # unreachable for a strongly connected component


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = _graph()
    assert "pipeline.uri" in graph["pipeline.training.checkpoint"]  # from pipeline import uri as uri_
    assert "pipeline.training.checkpoint" in graph["pipeline.training"]  # from .checkpoint import ...
    assert "pipeline.catalogue" in graph["pipeline.cli"]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]


# -- function length ---------------------------------------------------------------------------
def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES
    ]


@pytest.mark.parametrize("path", sorted((REPO / "pipeline").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_in_pipeline_is_longer_than_80_lines(path):
    long = _long_functions(path)
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
