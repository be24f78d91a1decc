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
def test_a_spec_imports_nothing_inside_a_function_but_its_job(path):
    tree = ast.parse((ROOT / path).read_text())
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages.jobs."):
                    continue
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append(f"{fn.name}: {ast.unparse(node)}")
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
    assert job in code_fingerprint(modules, CODE_PACKAGES)


def test_the_catalogue_still_lists_the_training_stages():
    assert {"pretrain_proposals", "train_classifier", "self_train", "train_generator"} <= {s.name for s in STAGES}
