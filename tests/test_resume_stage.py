"""A training stage killed mid-way resumes after a runtime-only change: the same key, the same
checkpoints, the same MLflow run (its curves go on), from the last checkpoint, not step 0."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parent.parent
BASE = [
    "build_splits.train.max_images=12",
    "build_splits.eval.0.max_images=2",
    "evaluate.batch_size=2",
    "train_classifier.scaling.num_workers=0",
    "train_classifier.train.max_steps=40",
    "train_classifier.train.checkpoint_every=5",
    "train_classifier.train.log_every=5",
]


def _cmd(work, extra=()):
    cmd = [sys.executable, "pipeline/run.py", "--config", "configs/sample_zegclip.yaml", "--work-dir", str(work)]
    for o in [*BASE, *extra]:
        cmd += ["--set", o]
    return cmd


@pytest.mark.slow
def test_killed_training_resumes_after_a_runtime_only_change(tmp_path, shared_data):
    work = tmp_path / "w"
    env = {**os.environ, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        _cmd(work),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    train = work / "store" / "_train"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        done = [p for p in train.glob("train_classifier-*/checkpoint_*") if (p / "train_state.json").exists()]
        if done:
            break
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    assert done, "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)

    runtime_only = [
        "train_classifier.train.max_failures=5",
        "train_classifier.train.log_every=10",
        "train_classifier.train.checkpoint_every=10",
        "train_classifier.train.keep_checkpoints=3",
        "evaluate.concurrency=1",
    ]
    again = subprocess.run(_cmd(work, runtime_only), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "build_splits cached" in again.stdout.replace("✓ ", "")  # the upstream stages are reused
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("zeroseg-sample")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.stage = 'train_classifier'")
    assert len(runs) == 1  # the killed attempt's run was continued, not orphaned
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.tags["runtime.train.max_failures"] == "5"
    resumed = int(run.data.metrics["resumed_from_step"])
    assert resumed >= 5 and resumed % 5 == 0  # from a checkpoint of the killed attempt, not step 0
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(steps) and steps[-1] == 40 and min(steps) <= resumed  # one curve, both attempts
    # no run was left RUNNING: the killed parent was marked KILLED by the second invocation
    assert not client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'")
