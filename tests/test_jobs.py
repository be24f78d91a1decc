"""Stage specs are torch-free and their jobs enter their keys (issue 18, item 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.codehash import code_fingerprint
from stages.catalog import CODE_PACKAGES, STAGES

ROOT = Path(__file__).resolve().parents[1]
SPECS = [
    "stages/pretrain_proposals.py",
    "stages/train_classifier.py",
    "stages/self_train.py",
    "stages/train_generator.py",
]
SPECS += sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "stages/methods").glob("*.py"))


@pytest.mark.parametrize("path", SPECS)
def test_a_spec_imports_nothing_inside_a_function_nor_its_job(path):
    tree = ast.parse((ROOT / path).read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += [
                f"{fn.name}: {ast.unparse(n)}" for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))
            ]
    found += [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("stages.jobs")
    ]
    assert not found, found


@pytest.mark.parametrize(
    ("modules", "job"),
    [
        (["stages.pretrain_proposals"], "stages/jobs/pretrain_proposals.py"),
        (["stages.self_train"], "stages/jobs/self_train.py"),
        (["stages.train_generator"], "stages/jobs/train_generator.py"),
        (["stages.train_classifier", "stages.methods.zegclip"], "stages/jobs/methods/zegclip.py"),
        (["stages.train_classifier", "stages.methods.deop"], "stages/jobs/methods/deop.py"),
        (["stages.train_classifier", "stages.methods.zegformer"], "stages/jobs/methods/zegformer.py"),
        (["stages.train_classifier", "stages.methods.maskclip"], "stages/jobs/methods/maskclip.py"),
    ],
)
def test_a_job_enters_its_stage_key(modules, job):
    """Through the stage's ``code`` (the job is imported by name, which codehash cannot follow)."""
    stage = {s.name: s for s in STAGES}[modules[0].split(".")[1]]()
    config = None
    if stage.name == "train_classifier":
        from stages.methods import methods

        method = modules[1].rsplit(".", 1)[1]
        config = methods()[method].Config.model_construct(method=method)
    assert job in code_fingerprint(stage.code(config), CODE_PACKAGES)


def test_the_catalogue_still_lists_the_training_stages():
    assert {"pretrain_proposals", "train_classifier", "self_train", "train_generator"} <= {s.name for s in STAGES}
