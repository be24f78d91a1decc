"""Two invocations of the sample on one store at once: each artifact is made once, both succeed."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_concurrent_invocations_make_each_artifact_once(tmp_path, shared_data):
    work = tmp_path / "work"
    cmd = [
        sys.executable,
        "pipeline/run.py",
        "--config",
        "configs/sample.yaml",
        "--work-dir",
        str(work),
        "--set",
        "build_splits.train.max_images=12",
        "--set",
        "build_splits.eval.0.max_images=2",
        "--set",
        "evaluate.batch_size=2",
        "--set",
        "run.ray.num_cpus=1",
    ]
    env = {**os.environ, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    # every stage ran exactly once over both invocations; the other one read its artifact
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("zeroseg-sample")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.status = 'ran'")
    ran = sorted(r.data.tags["stage"] for r in runs)
    assert ran == sorted(["build_splits", "embed_text", "train_classifier", "evaluate"])
    assert sum(o.count(" running (") for o in outs) == 4
    assert len(list((work / "store").glob("*/*/manifest.json"))) == 4
    assert not list((work / "store" / ".leases").glob("*.json"))  # every lease released
