"""A stage is a torch-free spec (``stages/<stage>.py``) plus a job (``stages/jobs/<stage>.py``):
the spec imports no job and nothing inside a function, names its job as a code dependency (so
editing the job re-keys the stage), and importing the specs imports neither torch nor Ray."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.codehash import code_fingerprint
from stages.catalog import CODE_PACKAGES
from stages.common import JobStage

REPO = Path(__file__).resolve().parent.parent
#: The stages split so far (spec module -> job module).
SPLIT = ["build_splits", "embed_text", "evaluate", "extract_features"]


def _stage(name: str) -> JobStage:
    mod = importlib.import_module(f"stages.{name}")
    (cls,) = [c for c in vars(mod).values() if isinstance(c, type) and issubclass(c, JobStage) and c is not JobStage]
    return cls()


@pytest.mark.parametrize("name", SPLIT)
def test_the_spec_names_its_job_and_imports_nothing_in_a_function(name):
    stage = _stage(name)
    assert stage.name == name and stage.job == f"stages.jobs.{name}"
    assert stage.code(None) == [f"stages.{name}", f"stages.jobs.{name}"]
    files = code_fingerprint(stage.code(None), CODE_PACKAGES)
    assert f"stages/{name}.py" in files and f"stages/jobs/{name}.py" in files  # editing the job re-keys the stage
    tree = ast.parse((REPO / "stages" / f"{name}.py").read_text())
    for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        inner = [ast.unparse(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not inner, f"stages/{name}.py: {fn.name} imports {inner}"
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not [m for m in imported if m.startswith("stages.jobs") or m.split(".")[0] in ("torch", "ray")]


def test_the_specs_import_neither_torch_nor_ray():
    code = (
        "import sys; import stages.catalog; "
        + "; ".join(f"import stages.{n}" for n in SPLIT)
        + "; print('HEAVY', [m for m in ('torch', 'ray', 'open_clip', 'mlflow') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "HEAVY []" in out.stdout, out.stdout + out.stderr
