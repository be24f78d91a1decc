"""Shared fixtures: the real sample data and one embedded Ray cluster per test session."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = (REPO.parent / "shared" / "data").resolve()


def pytest_configure(config):
    os.environ.setdefault("ZEROSEG_DATA", str(DATA))
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


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
