"""Code dependencies of a stage: the source files whose content enters its artifact key.

Like DVC's code dependencies, but derived rather than listed: starting from the modules a stage
names (its own module, plus e.g. the module of the method a config selects), every ``import``
statement of those files (top-level or inside functions, found by parsing, without importing)
is followed transitively into the project's packages (``zeroseg``, ``stages``, the training
package: the code that determines outputs; the orchestration in ``pipeline`` does not and is not
followed). A parent package's ``__init__`` counts for each submodule (importing the submodule
runs it). The key gets a sha256 of every such file, so editing ``stages/evaluate.py`` changes
evaluate's key and, through the input keys, its descendants', and nothing upstream.

A file enters the key as its *syntax*, not its bytes (:func:`source_digest`): the sha256 of
``ast.dump`` of its parsed tree with the docstrings removed (a module's, class's or function's
leading string statement; a body left empty becomes ``pass``). Comments, blank lines, formatting
and docstrings therefore re-key nothing, while any code edit does (a constant, an operator, a
name, a string that is not a docstring, a default argument). ``ast.dump`` leaves out line
numbers, so moving code down by a comment changes nothing either. The tree's form can change
between Python minor versions, so one store should be keyed by one Python version (the manifests
record it). The digest of a file is cached on its path, modification time and size.

Not seen: imports built from strings at run time (``importlib.import_module(name)``); a stage
that imports that way names the target modules itself. Third-party libraries are not hashed;
their versions are recorded in each manifest.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import subprocess
from collections.abc import Iterable
from pathlib import Path


@functools.cache
def _root_of(top: str) -> Path | None:
    """Directory holding top-level package ``top`` (found without importing it), or None."""
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def module_file(name: str) -> Path | None:
    """The source file of module ``name`` (a package's ``__init__.py``), found on disk without
    importing anything; None when it is not a project source file."""
    root = _root_of(name.split(".")[0])
    if root is None:
        return None
    base = root.joinpath(*name.split("."))
    for cand in (base / "__init__.py", base.with_suffix(".py")):
        if cand.is_file():
            return cand
    return None


def _within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


@functools.cache
def _imports(path: Path, module: str) -> tuple[str, ...]:
    """Every module name ``path`` (module ``module``) imports, candidates for ``from a import b``
    included (``a.b`` if it is a module, else ``a``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base_parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names if a.name != "*"]
    return tuple(out)


def closure(modules: Iterable[str], packages: tuple[str, ...]) -> dict[str, Path]:
    """``{module name: file}`` of ``modules`` and everything they import within ``packages``,
    transitively, parent packages' ``__init__`` included.

    Raises:
        FileNotFoundError: a named module has no source file.
    """
    todo = list(modules)
    for m in todo:
        if module_file(m) is None:
            raise FileNotFoundError(f"code dependency {m!r}: no source file found")
    out: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in out or not name:
            continue
        path = module_file(name)
        if path is None:
            continue
        out[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        todo += [m for m in _imports(path, name) if _within(m, packages) and m not in out]
    return out


_DOC_HOLDERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def strip_docstrings(tree: ast.AST) -> ast.AST:
    """``tree`` (modified in place) without the docstrings of its module, classes and functions:
    each body's leading string-expression statement is dropped; a body it was the only statement
    of becomes ``pass`` (so a function with only a docstring equals one with only ``pass``)."""
    for node in ast.walk(tree):
        if isinstance(node, _DOC_HOLDERS) and node.body and _is_docstring(node.body[0]):
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def source_digest(source: str, filename: str = "<source>") -> str:
    """sha256 hex of ``ast.dump`` of the docstring-stripped syntax tree of ``source`` (see
    the module docstring): equal for two sources that differ only in comments, formatting and
    docstrings.

    Raises:
        SyntaxError: ``source`` is not valid Python.
    """
    tree = strip_docstrings(ast.parse(source, filename=filename))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


@functools.cache
def _file_sha(path: Path, mtime_ns: int, size: int) -> str:
    """:func:`source_digest` of ``path``, cached on its modification time and size."""
    return source_digest(path.read_text(), str(path))


def code_fingerprint(modules: Iterable[str], packages: tuple[str, ...]) -> dict[str, str]:
    """``{relative source path: sha256}`` of :func:`closure` (paths relative to the directory
    holding the packages, e.g. ``stages/evaluate.py``; the digest is :func:`source_digest`'s:
    of the syntax, not the bytes), sorted by path."""
    files = closure(modules, packages)
    out = {}
    for name, path in files.items():
        st = path.stat()
        root = _root_of(name.split(".")[0])
        out[path.relative_to(root).as_posix()] = _file_sha(path, st.st_mtime_ns, st.st_size)
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=1)
def git_commit(start: str | None = None) -> str | None:
    """``<sha>`` (``<sha>+dirty`` with uncommitted changes) of the repository holding the
    project's code, or None outside a git work tree (e.g. under ``ray job submit``, whose
    working directory is a copy without ``.git``)."""
    where = start or str(_root_of("pipeline") or Path.cwd())
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


__all__ = ["closure", "code_fingerprint", "git_commit", "module_file", "source_digest", "strip_docstrings"]
