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


# -- cached and resumed runs, in process (the training-free sample) -------------------------
CHEAP = ("build_splits.train.max_images=4", "build_splits.eval.0.max_images=2", "evaluate.batch_size=2")


def _run(work, *args):
    """``zeroseg run`` of configs/sample.yaml (MaskCLIP: nothing trains) in this process."""
    import io

    from pipeline.cli import build_parser, cmd_run
    from pipeline.console import Console

    argv = ["run", "--config", str(REPO / "configs/sample.yaml"), "--work-dir", str(work)]
    for o in CHEAP:
        argv += ["--set", o]
    out = io.StringIO()
    code, plan = cmd_run(build_parser().parse_args([*argv, *args]), Console(file=out))
    assert code == 0, out.getvalue()[-3000:]
    return plan


def test_a_completed_run_recomputes_nothing_and_a_partial_one_only_what_is_missing(
    tmp_path, shared_data, ray_local, monkeypatch
):
    """The two cheapest stages (build_splits, embed_text of the tiny CLIP): a repeat of a
    completed run runs no stage and rewrites no manifest; after a crash before embed_text
    published (its manifest missing), only embed_text runs again, on the same key."""
    from pipeline.catalogue import load_catalogue
    from pipeline.store import MANIFEST

    ran = []
    for cls in load_catalogue().stages:  # count the stage runs (they run in the driver)
        real = cls.run
        monkeypatch.setattr(cls, "run", lambda self, ctx, _real=real: ran.append(self.name) or _real(self, ctx))
    work = tmp_path / "w"
    dag = ["build_splits", "embed_text"]
    first = _run(work, "--stages", *dag)
    assert ran == dag and {n.name: n.status for n in first if n.name in dag} == dict.fromkeys(dag, "ran")
    keys = {n: first.keys()[n] for n in dag}
    manifests = {n: work / "store" / n / keys[n] / MANIFEST for n in dag}

    def stamps(names):
        return {n: (manifests[n].stat().st_mtime_ns, manifests[n].read_bytes()) for n in names}

    before = stamps(dag)
    # completed: everything cached, nothing runs, no artifact is rewritten
    ran.clear()
    again = _run(work, "--stages", *dag)
    assert ran == [] and {n.name: n.status for n in again if n.name in dag} == dict.fromkeys(dag, "cached")
    assert {n: again.keys()[n] for n in dag} == keys and stamps(dag) == before
    # killed before embed_text published: only embed_text runs, on the same key
    manifests["embed_text"].unlink()
    ran.clear()
    resumed = _run(work, "--stages", *dag)
    assert ran == ["embed_text"]
    assert {n.name: n.status for n in resumed if n.name in dag} == {"build_splits": "cached", "embed_text": "ran"}
    assert {n: resumed.keys()[n] for n in dag} == keys and manifests["embed_text"].is_file()
    assert stamps(["build_splits"]) == {"build_splits": before["build_splits"]}


def test_the_worker_count_is_in_a_training_key_and_its_resources_are_not(tmp_path):
    """``scaling.num_workers`` is hashed (the world size sets the global batch: 2 workers x
    batch_size is twice one worker's), so a run with another worker count is another artifact
    with its own checkpoints, never a resume of the first; ``resources_per_worker`` is runtime:
    the same key, the same checkpoint directory, so such a run resumes."""
    from pipeline.catalogue import load_catalogue
    from pipeline.config import load_config
    from pipeline.plan import plan
    from pipeline.store import ArtifactStore
    from pipeline.training.config import global_batch_and_lr

    cat = load_catalogue()

    def node(*overrides):
        p = plan(load_config(REPO / "configs/sample_zegclip.yaml", [*BASE, *overrides]), cat.stages, checks=False)
        return p.nodes["train_classifier"]

    one, two = node("train_classifier.scaling.num_workers=1"), node("train_classifier.scaling.num_workers=2")
    res = node("train_classifier.scaling.num_workers=1", "train_classifier.scaling.resources_per_worker.CPU=0.5")
    b = one.config.train.batch_size
    assert global_batch_and_lr(two.config.scaling, two.config.train)[0] == 2 * b
    assert global_batch_and_lr(one.config.scaling, one.config.train)[0] == b
    assert one.key != two.key and res.key == one.key
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")
    assert store.checkpoint_dir("train_classifier", res.key) == store.checkpoint_dir("train_classifier", one.key)
    assert store.checkpoint_dir("train_classifier", two.key) != store.checkpoint_dir("train_classifier", one.key)
