"""A remote store without credentials fails fast and clearly: an ``error:`` line naming the store
and what is missing, exit status 2, within seconds, even with ``--dry-run`` (no bucket or
network is reachable from CI, which is the case being tested)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "CLOUDSDK_CONFIG",
)


@pytest.mark.parametrize(
    "store, missing",
    [
        ("s3://zeroseg-no-such-bucket/x", "no AWS credentials were found"),
        ("gs://zeroseg-no-such-bucket/x", "no Google Cloud credentials were found"),
    ],
)
def test_store_without_credentials_fails_within_30_s_with_exit_2(tmp_path, store, missing):
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_VARS}
    env.update(HOME=str(tmp_path), AWS_EC2_METADATA_DISABLED="true", AWS_REGION="us-east-1")
    t0 = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "pipeline/run.py",
            "--config",
            "configs/sample.yaml",
            "--dry-run",
            "--work-dir",
            str(tmp_path / "w"),
            "--store",
            store,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stdout + out.stderr
    assert took < 30
    lines = [x for x in out.stdout.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and store in lines[0] and missing in lines[0], out.stdout
    assert "Traceback" not in out.stdout + out.stderr
