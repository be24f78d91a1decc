"""Shared fixtures: the real sample data, one embedded Ray cluster per test session, and the
sample proposals (build_splits, embed_text, pretrain_proposals) trained once per session."""

import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# ZEROSEG_DATA overrides the default (make mutants runs the tests from a copy under mutants/)
DATA = Path(os.environ.get("ZEROSEG_DATA") or REPO.parent / "shared" / "data").resolve()


def pytest_configure(config):
    os.environ.setdefault("ZEROSEG_DATA", str(DATA))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


# `make mutants` runs the tests from mutmut's copy of the tree (mutants/), once per mutant: there
# the tests that start a Ray cluster are left out (a cluster start per mutant costs more than the
# mutant's other tests together); docs/testing.md lists what that leaves to the full suite.
UNDER_MUTMUT = REPO.name == "mutants"


def pytest_collection_modifyitems(config, items):
    if not UNDER_MUTMUT:
        return
    ray_tests = [item for item in items if "ray_local" in getattr(item, "fixturenames", ())]
    if ray_tests:
        config.hook.pytest_deselected(items=ray_tests)
        items[:] = [item for item in items if item not in ray_tests]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.fail(f"the sample data is missing: expected {DATA} (../shared/data beside the repository)")
    return DATA


@pytest.fixture(scope="session")
def ray_local():
    """An embedded local Ray cluster (2 CPUs), shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray


# The sample-DAG tests of the decoupled methods (tests/test_pretrain_proposals.py,
# test_zegformer.py, test_deop.py) share these overrides, so configs/sample_proposals.yaml,
# sample_zegformer.yaml and sample_deop.yaml (which extend it) plan one key for build_splits,
# embed_text and pretrain_proposals and the proposals train once per session.
SAMPLE_PROPOSALS_OVERRIDES = (
    "build_splits.train.max_images=16",  # 12 train / 4 val images
    "build_splits.eval.0.max_images=2",
    "pretrain_proposals.train.max_steps=4",
    "pretrain_proposals.train.checkpoint_every=2",
    "pretrain_proposals.train.log_every=2",
    "pretrain_proposals.recall_max_images=4",  # all of val
    "evaluate.batch_size=2",
)
PROPOSAL_STAGES = ("build_splits", "embed_text", "pretrain_proposals")


@dataclass
class SampleRun:
    """An in-process ``zeroseg run`` of a sample config into ``work`` (its store and mlflow.db)."""

    work: Path
    code: int
    plan: Any  # pipeline.plan.Plan
    output: str  # what the run printed


def run_sample(config: str, work: Path, *args: str, overrides=()) -> SampleRun:
    """``zeroseg run --config <config> --work-dir <work>`` in this process, with
    :data:`SAMPLE_PROPOSALS_OVERRIDES` then ``overrides`` as ``--set``, and ``args`` (``--dry-run``,
    ``--stages ...``) appended. Needs the ``ray_local`` fixture when a stage runs on Ray."""
    from pipeline.cli import build_parser, cmd_run
    from pipeline.console import Console

    argv = ["run", "--config", str(REPO / config), "--work-dir", str(work)]
    for o in [*SAMPLE_PROPOSALS_OVERRIDES, *overrides]:
        argv += ["--set", o]
    out = io.StringIO()
    code, plan = cmd_run(build_parser().parse_args([*argv, *args]), Console(file=out))
    return SampleRun(work, code, plan, out.getvalue())


@dataclass
class SampleProposals:
    """The session's run of :data:`PROPOSAL_STAGES` of configs/sample_proposals.yaml."""

    first: SampleRun

    @staticmethod
    def run(config: str, work: Path, *args: str, overrides=()) -> SampleRun:
        """:func:`run_sample` (the shared overrides, then ``overrides``)."""
        return run_sample(config, work, *args, overrides=overrides)

    def copy_to(self, work: Path) -> Path:
        """Copy the run's store (artifacts and the Ray Train checkpoints) and mlflow.db into
        ``work``, so a test's own run finds the three stages cached and writes only there."""
        shutil.copytree(self.first.work / "store", work / "store", dirs_exist_ok=True)
        shutil.copy2(self.first.work / "mlflow.db", work / "mlflow.db")
        return work


@pytest.fixture(scope="session")
def sample_proposals_overrides() -> tuple[str, ...]:
    """:data:`SAMPLE_PROPOSALS_OVERRIDES` (for tests that only plan)."""
    return SAMPLE_PROPOSALS_OVERRIDES


@pytest.fixture(scope="session")
def sample_proposals(tmp_path_factory, ray_local, shared_data) -> SampleProposals:
    """build_splits, embed_text and pretrain_proposals of configs/sample_proposals.yaml with
    :data:`SAMPLE_PROPOSALS_OVERRIDES`, run once (in process, on ``ray_local``). Tests copy its
    store (:meth:`SampleProposals.copy_to`) rather than write into it."""
    work = tmp_path_factory.mktemp("sample_proposals")
    r = run_sample("configs/sample_proposals.yaml", work, "--stages", *PROPOSAL_STAGES)
    if r.code != 0:
        pytest.fail(f"the sample proposals run failed: {[n.error for n in r.plan]}\n{r.output[-4000:]}")
    return SampleProposals(r)
