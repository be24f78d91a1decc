"""Code keys (``pipeline.codehash``): which files a stage's key covers, and what re-keys it.

* the import following, on a package the test writes (every import form: ``import a.b.c``,
  ``from pkg import mod``, ``from . import x``, ``from .mod import y``, ``from .. import z``,
  imports inside functions, methods, ``if`` and ``try`` blocks), against the set of files listed
  by hand in the test;
* the property over the real catalogue: for every stage of the sample configs (each
  train_classifier method included), the files its key covers equal the files an independent
  tracer finds (the standard library's ``modulefinder``, which reads bytecode, not the AST, and
  descends into function bodies), and every module a real import of its spec modules loads is
  among them; editing a covered file re-keys the stage, editing another file does not;
* the fingerprint's paths and digests, and ``git_commit``.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import modulefinder
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import codehash
from pipeline import plan as plan_mod
from pipeline.catalogue import load_catalogue
from pipeline.config import load_config

REPO = Path(__file__).resolve().parent.parent
CATALOG = load_catalogue()
PACKAGES = CATALOG.code_packages

_NAMES = itertools.count()


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, src in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))


# -- import following on a synthetic package ---------------------------------------------------
def _synthetic(tmp_path: Path, monkeypatch) -> str:
    """A package ``<top>`` (fresh name: package roots are cached by name) with one file per import
    form, a package whose name extends ``<top>`` (``<top>_extra``, not followed), and files
    nothing imports. Returns ``<top>``."""
    top = f"zs_ch_{next(_NAMES)}"
    files = {
        f"{top}/__init__.py": "",
        # the entry: every import form once
        f"{top}/entry.py": f"""
            import json
            import {top}.deep.leaf
            from {top} import sibling
            from . import rel_x
            from .rel_mod import y
            from {top}.names import a_function
            import {top}_extra.thing

            def f():
                import {top}.lazy_f

            class K:
                def m(self):
                    from .lazy_m import z

            if json:
                from {top} import in_if
            try:
                import {top}.in_try
            except ImportError:
                pass
        """,
        f"{top}/deep/__init__.py": "",
        f"{top}/deep/leaf.py": "X = 1\n",
        f"{top}/sibling.py": "",
        f"{top}/rel_x.py": "",
        f"{top}/rel_mod.py": "y = 1\n",
        f"{top}/names.py": "def a_function():\n    return 1\n",
        f"{top}/lazy_f.py": "",
        f"{top}/lazy_m.py": "z = 1\n",
        f"{top}/in_if.py": "",
        f"{top}/in_try.py": "",
        # a subpackage: relative imports one and two levels up, and from its own __init__
        f"{top}/sub/__init__.py": "from . import own\n",
        f"{top}/sub/own.py": "",
        f"{top}/sub/inner.py": "from .. import up_one\nfrom ..up_mod import w\nfrom .own import *\n",
        f"{top}/sub/deeper/__init__.py": "",
        f"{top}/sub/deeper/bottom.py": "from ... import up_two\nfrom ..own import q\n",
        f"{top}/up_one.py": "",
        f"{top}/up_mod.py": "w = 1\n",
        f"{top}/up_two.py": "",
        # reached by nothing above
        f"{top}/unreached.py": "import os\n",
        f"{top}/names_only_function.py": "",
        f"{top}_extra/__init__.py": f"import {top}.unreached\n",
        f"{top}_extra/thing.py": f"import {top}.unreached\n",
    }
    _write(tmp_path, files)
    monkeypatch.syspath_prepend(str(tmp_path))
    return top


def test_closure_follows_every_import_form(tmp_path, monkeypatch):
    top = _synthetic(tmp_path, monkeypatch)
    got = codehash.closure([f"{top}.entry"], (top,))
    # listed by hand from the files above: the entry, its package, each imported module (with
    # the parents of a dotted one), function / method / if / try imports included; not
    # ``json`` (outside the packages), not ``<top>_extra`` (a name that only starts like the
    # package), not ``names.a_function`` (a function, not a module), not ``unreached``
    assert set(got) == {
        top,
        f"{top}.entry",
        f"{top}.deep",
        f"{top}.deep.leaf",
        f"{top}.sibling",
        f"{top}.rel_x",
        f"{top}.rel_mod",
        f"{top}.names",
        f"{top}.lazy_f",
        f"{top}.lazy_m",
        f"{top}.in_if",
        f"{top}.in_try",
    }
    assert got[f"{top}.deep.leaf"] == (tmp_path / top / "deep" / "leaf.py").resolve()
    assert got[top] == (tmp_path / top / "__init__.py").resolve()
    assert got[f"{top}.deep"] == (tmp_path / top / "deep" / "__init__.py").resolve()


def test_closure_resolves_relative_imports_one_and_two_levels_up(tmp_path, monkeypatch):
    top = _synthetic(tmp_path, monkeypatch)
    # sub/inner.py: ``from .. import up_one`` -> top.up_one, ``from ..up_mod import w`` ->
    # top.up_mod, ``from .own import *`` -> top.sub.own; its parents top and top.sub (whose
    # __init__'s ``from . import own`` is relative to top.sub itself, the package)
    assert set(codehash.closure([f"{top}.sub.inner"], (top,))) == {
        top,
        f"{top}.sub",
        f"{top}.sub.own",
        f"{top}.sub.inner",
        f"{top}.up_one",
        f"{top}.up_mod",
    }
    # sub/deeper/bottom.py: ``from ... import up_two`` -> top.up_two; ``from ..own import q`` ->
    # top.sub.own
    assert set(codehash.closure([f"{top}.sub.deeper.bottom"], (top,))) == {
        top,
        f"{top}.sub",
        f"{top}.sub.own",
        f"{top}.sub.deeper",
        f"{top}.sub.deeper.bottom",
        f"{top}.up_two",
    }


def test_a_package_outside_the_followed_ones_is_not_entered_but_one_named_is(tmp_path, monkeypatch):
    top = _synthetic(tmp_path, monkeypatch)
    # following both packages: <top>_extra and what it imports (<top>.unreached) count too
    got = set(codehash.closure([f"{top}.entry"], (top, f"{top}_extra")))
    assert {f"{top}_extra", f"{top}_extra.thing", f"{top}.unreached"} <= got
    # only a subpackage followed: its parent's __init__ counts (it runs), siblings do not
    got = set(codehash.closure([f"{top}.sub.inner"], (f"{top}.sub",)))
    assert got == {top, f"{top}.sub", f"{top}.sub.own", f"{top}.sub.inner"}


def test_closure_names_a_module_without_a_source_file(tmp_path, monkeypatch):
    top = _synthetic(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError, match=rf"'{top}.missing'"):
        codehash.closure([f"{top}.entry", f"{top}.missing"], (top,))
    with pytest.raises(FileNotFoundError, match="'os'"):  # a module that is not in a package root
        codehash.closure(["os"], (top,))


def test_module_file_prefers_the_package_and_finds_nothing_outside(tmp_path, monkeypatch):
    top = _synthetic(tmp_path, monkeypatch)
    (tmp_path / top / "deep.py").write_text("")  # a module beside the package of the same name
    assert codehash.module_file(f"{top}.deep") == (tmp_path / top / "deep" / "__init__.py").resolve()
    assert codehash.module_file(f"{top}.sibling") == (tmp_path / top / "sibling.py").resolve()
    assert codehash.module_file(f"{top}.nope") is None
    assert codehash.module_file("os") is None  # a top-level module, not a package: no root
    assert codehash.module_file(f"zs_ch_no_such_top_{next(_NAMES)}.x") is None


def _top_level_only(modules, packages):
    """The closure a follower of module-level imports only would find (a plausible bug):
    brute force over the AST's top-level statements."""
    todo, out = list(modules), {}
    while todo:
        name = todo.pop()
        path = codehash.module_file(name)
        if name in out or path is None:
            continue
        out[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                cands = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            todo += [c for c in cands if any(c == p or c.startswith(p + ".") for p in packages)]
    return {p.relative_to(REPO).as_posix() for p in out.values()}


def test_evaluates_key_covers_the_files_it_reaches_only_through_function_level_imports():
    """zeroseg/evaluation.py imports the confusion counts, the protocols and the proposal recall
    inside its functions (they need torch); a key that followed module-level imports only would
    leave them out, so editing the metric's code would not re-run evaluate."""
    mods = ["stages.evaluate", "stages.jobs.evaluate"]
    covered = set(codehash.code_fingerprint(mods, PACKAGES))
    shallow = _top_level_only(mods, PACKAGES)
    assert shallow < covered
    # zeroseg/proposal_recall.py: only ``from zeroseg.proposal_recall import segment_max_iou``
    # inside evaluation.py's recall function imports it (grep: no module-level import of it in
    # evaluate's files)
    assert "zeroseg/proposal_recall.py" in covered - shallow
    assert {"zeroseg/evaluation.py", "stages/jobs/evaluate.py", "zeroseg/metrics.py"} <= covered


# -- the fingerprint ---------------------------------------------------------------------------
def test_code_fingerprint_paths_and_digests(tmp_path, monkeypatch):
    top = f"zs_ch_{next(_NAMES)}"
    a_src = "import json\nfrom . import b\n\ndef f(x):\n    return x + 1\n"
    b_src = "VALUE = [1, 2]\n"
    _write(tmp_path, {f"{top}/__init__.py": "", f"{top}/a.py": a_src, f"{top}/b.py": b_src})
    monkeypatch.syspath_prepend(str(tmp_path))
    fp = codehash.code_fingerprint([f"{top}.a"], (top,))
    # relative to the directory holding the package, sorted; each digest = sha256 of ast.dump
    # of the parsed file (these files have no docstrings to strip)
    ref = {
        f"{top}/__init__.py": "",
        f"{top}/a.py": a_src,
        f"{top}/b.py": b_src,
    }
    assert list(fp) == sorted(ref)
    for rel, src in ref.items():
        assert fp[rel] == hashlib.sha256(ast.dump(ast.parse(src)).encode()).hexdigest(), rel
    # a docstring is removed before hashing: the module equals its docstring-free form
    assert (
        codehash.source_digest('"""Doc."""\nX = 1\n')
        == hashlib.sha256(ast.dump(ast.parse("X = 1\n")).encode()).hexdigest()
    )
    with pytest.raises(SyntaxError) as e:
        codehash.source_digest("def (:\n")
    assert e.value.filename == "<source>"  # the error names the source
    with pytest.raises(SyntaxError) as e:
        codehash.source_digest("x = = 1\n", "stages/broken.py")
    assert e.value.filename == "stages/broken.py"


def test_the_digest_cache_sees_a_rewrite_that_keeps_the_modification_time(tmp_path, monkeypatch):
    """The per-file cache is keyed on modification time *and* size: a file rewritten within
    the filesystem's time resolution (same mtime_ns) but to another length is hashed again."""
    top = f"zs_ch_{next(_NAMES)}"
    _write(tmp_path, {f"{top}/__init__.py": "", f"{top}/m.py": "X = 1\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    m = tmp_path / top / "m.py"
    before = codehash.code_fingerprint([f"{top}.m"], (top,))[f"{top}/m.py"]
    st = m.stat()
    m.write_text("X = 1000\n")
    os.utime(m, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = codehash.code_fingerprint([f"{top}.m"], (top,))[f"{top}/m.py"]
    assert after != before and after == hashlib.sha256(ast.dump(ast.parse("X = 1000\n")).encode()).hexdigest()


def test_strip_docstrings_keeps_a_leading_non_string_and_a_later_string():
    src = 'def f():\n    1\n    "not a docstring: second"\n\nclass C:\n    x = "a"\n'
    assert ast.dump(codehash.strip_docstrings(ast.parse(src))) == ast.dump(ast.parse(src))
    only = codehash.strip_docstrings(ast.parse('class C:\n    """Doc."""\n'))
    assert ast.dump(only) == ast.dump(ast.parse("class C:\n    pass\n"))
    # a bytes or number constant as first statement is not a docstring
    for first in ("b'x'", "3"):
        src = f"def f():\n    {first}\n    return 1\n"
        assert ast.dump(codehash.strip_docstrings(ast.parse(src))) == ast.dump(ast.parse(src))
    asy = codehash.strip_docstrings(ast.parse('async def g():\n    """Doc."""\n    return 2\n'))
    assert ast.dump(asy) == ast.dump(ast.parse("async def g():\n    return 2\n"))


def _git(cwd, *args):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_git_commit_is_the_head_and_says_dirty_for_tracked_changes_only(tmp_path):
    repo = tmp_path / "r"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "f.py").write_text("X = 1\n")
    _git(repo, "add", "f.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = _git(repo, "rev-parse", "HEAD")
    codehash.git_commit.cache_clear()
    assert codehash.git_commit(str(repo)) == head
    (repo / "new.py").write_text("")  # untracked: not dirty
    codehash.git_commit.cache_clear()
    assert codehash.git_commit(str(repo)) == head
    (repo / "f.py").write_text("X = 2\n")
    codehash.git_commit.cache_clear()
    assert codehash.git_commit(str(repo)) == head + "+dirty"
    outside = tmp_path / "not_a_repo"
    outside.mkdir()
    codehash.git_commit.cache_clear()
    assert codehash.git_commit(str(outside)) is None
    codehash.git_commit.cache_clear()
    assert codehash.git_commit(str(tmp_path / "missing")) is None  # cwd does not exist: OSError
    codehash.git_commit.cache_clear()


# -- the property over the real catalogue ------------------------------------------------------
def _within(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PACKAGES)


class _ProjectFinder(modulefinder.ModuleFinder):
    """modulefinder restricted to the followed packages (and the parents it must load to reach
    them, e.g. ``pipeline`` for ``pipeline.training``, whose own imports are not followed)."""

    def import_module(self, partname, fqname, parent):
        if not (_within(fqname) or any(p.startswith(fqname + ".") for p in PACKAGES)):
            return None
        return super().import_module(partname, fqname, parent)

    def scan_code(self, co, m):
        if _within(m.__name__):
            super().scan_code(co, m)


def _traced(modules) -> set[str]:
    finder = _ProjectFinder(path=[str(REPO)])
    for m in modules:
        finder.import_hook(m)
    # a parent outside the packages (``pipeline``) is loaded on the way to any of its modules
    # (``pipeline.dag``, refused); it runs for the stage's code only on the way to a followed one
    # (``pipeline.training``), so it counts only then: a difference of the tracer, not of the key
    found = [n for n in finder.modules if _within(n)]
    kept = [m for n, m in finder.modules.items() if _within(n) or any(f.startswith(n + ".") for f in found)]
    return {Path(m.__file__).relative_to(REPO).as_posix() for m in kept if m.__file__}


def _stage_nodes():
    """``{label: (plan, node)}``: every stage of the sample configs, one train_classifier per method."""
    out = {}
    for cfg in (
        "configs/sample.yaml",
        "configs/sample_zegclip.yaml",
        "configs/sample_deop.yaml",
        "configs/sample_zegformer.yaml",
        "configs/sample_pading.yaml",
        "configs/sample_zegclip_st.yaml",
    ):
        p = plan_mod.plan(load_config(REPO / cfg), CATALOG.stages, code_packages=PACKAGES, checks=False)
        for n in p:
            label = n.name if n.name != "train_classifier" else f"train_classifier[{n.config.method}]"
            out.setdefault(label, (p, n))
    return out


NODES = _stage_nodes()


def test_every_method_and_stage_is_covered():
    from stages.methods import methods

    assert {f"train_classifier[{m}]" for m in methods()} <= set(NODES)
    assert {s.name for s in CATALOG.stages} - {"train_classifier"} <= set(NODES)


@pytest.mark.parametrize("label", sorted(NODES))
def test_a_stages_code_key_covers_exactly_the_files_modulefinder_traces(label):
    """modulefinder (bytecode, every code object, so function-level imports too) from the
    modules the stage names (its spec, its job, the method's spec and job) finds the same
    project files as the key. Both leave out imports by name at run time (``run_job``, the
    method registry, ``import_class`` of a segmenter): the stage names its job in ``code()``, and
    a model class a segmenter artifact names is in the key of the stage that wrote it (an input
    key of every reader)."""
    _, node = NODES[label]
    modules = node.stage.code(node.config)
    assert set(node.components["code"]) == _traced(modules)


@pytest.fixture(scope="module")
def imported_at_runtime():
    """``{label: project files a fresh interpreter loads when it imports the stage's spec
    modules}`` (the torch-free specs only: importing the jobs would load torch, seconds)."""
    specs = {
        label: [m for m in n.stage.code(n.config) if not m.startswith("stages.jobs")] for label, (_, n) in NODES.items()
    }
    code = textwrap.dedent(
        """
        import importlib, json, sys
        from pathlib import Path
        packages, specs, repo = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
        def project(n):
            return any(n == p or n.startswith(p + ".") for p in packages)
        out = {}
        for label, mods in specs.items():
            for n in [n for n in sys.modules if project(n)]:
                del sys.modules[n]
            before = set(sys.modules)
            for m in mods:
                importlib.import_module(m)
            out[label] = sorted(
                Path(sys.modules[n].__file__).resolve().relative_to(repo).as_posix()
                for n in set(sys.modules) - before
                if project(n) and getattr(sys.modules[n], "__file__", None)
            )
        print(json.dumps(out))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(PACKAGES), json.dumps(specs), str(REPO)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    return {k: set(v) for k, v in json.loads(res.stdout.splitlines()[-1]).items()}


@pytest.mark.parametrize("label", sorted(NODES))
def test_every_module_a_real_import_loads_is_in_the_key(label, imported_at_runtime):
    """A real import sees what parsing could miss (an import built at import time); it sees
    less than the key (imports inside functions run later), never more."""
    _, node = NODES[label]
    loaded = imported_at_runtime[label]
    assert loaded, label
    assert loaded <= set(node.components["code"]), sorted(loaded - set(node.components["code"]))


def _rekeyed(monkeypatch, plan, node, edited: str) -> bool:
    """Whether ``node``'s key changes when the digest of file ``edited`` (relative path) changes,
    as an edit of that file would; keys recomputed through ``plan._key``."""
    real = codehash._file_sha
    before = node.key
    target = (REPO / edited).resolve()

    def sha(path, mtime_ns, size):
        h = real(path, mtime_ns, size)
        return hashlib.sha256(h.encode()).hexdigest() if path == target else h

    components = node.components
    monkeypatch.setattr(codehash, "_file_sha", sha)
    try:
        plan_mod._key(node, plan.nodes, PACKAGES)
        return node.key != before
    finally:
        monkeypatch.setattr(codehash, "_file_sha", real)
        node.key, node.components = before, components


_ALL_PROJECT_FILES = sorted(
    p.relative_to(REPO).as_posix()
    for top in ("zeroseg", "stages", "pipeline")
    for p in (REPO / top).rglob("*.py")
    if "__pycache__" not in p.parts
)


@pytest.mark.parametrize("label", sorted(NODES))
def test_editing_a_traced_file_rekeys_the_stage_and_another_file_does_not(label, monkeypatch):
    """For a seeded sample of the files modulefinder traces (four reached only through
    function-level imports, the ones a shallow follower drops, and three others) and of the
    project files it does not (other stages' and the orchestration's), a changed digest re-keys
    the stage iff the file is traced. (Every traced file is in the key by the test above; a
    sample keeps this one fast: each re-key hashes the stage's closure again.)"""
    plan, node = NODES[label]
    modules = node.stage.code(node.config)
    traced = _traced(modules)
    lazy = traced - _top_level_only(modules, PACKAGES)
    rng = random.Random(label)
    inside = rng.sample(sorted(lazy), min(4, len(lazy))) + rng.sample(sorted(traced - lazy), 3)
    outside = rng.sample([f for f in _ALL_PROJECT_FILES if f not in traced], 3) + ["pipeline/dag.py"]
    for f in inside:
        assert _rekeyed(monkeypatch, plan, node, f), f"{label}: editing {f} does not re-key it"
    for f in outside:
        assert not _rekeyed(monkeypatch, plan, node, f), f"{label}: editing {f} re-keys it"
