"""The training wrapper: resume, checkpoints, NaN, strict loading, lr scaling, MLflow; plus
real 2-worker fits where a worker and then the driver are killed (``slow``)."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.training import (
    CheckpointMismatchError,
    Loop,
    NonFiniteLossError,
    ScalingSection,
    TrainSection,
    fit,
    global_batch_and_lr,
    latest_checkpoint,
    list_checkpoints,
    load_model_state,
    strict_load,
)
from zeroseg.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent

# Ray workers cannot import this test module: ship its functions by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- loops (what a stage writes) ------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self, classes: int = 11, wide: bool = False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.head = torch.nn.Conv2d(8, classes, 1)
        if wide:
            self.extra = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def seg_loop(loop: Loop) -> None:
    """A complete per-worker loop; ``loop.config`` may inject a fault or a NaN."""
    cfg = loop.config
    model = loop.prepare(TinyNet(wide=cfg.get("wide", False)))
    opt = torch.optim.SGD(model.parameters(), lr=loop.lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 24)  # independent of max_steps
    loop.restore(model, opt, sched)
    for batch in loop.batches("train"):
        images, labels = batch["image"], batch["label"].long()
        loss = torch.nn.functional.cross_entropy(model(images), labels, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if cfg.get("nan_at") == loop.step + 1:
            loss = loss * float("nan")
        if cfg.get("kill_at") == loop.step + 1 and loop.rank == cfg.get("kill_rank", 1) \
                and not os.path.exists(cfg["marker"]):
            Path(cfg["marker"]).write_text(str(os.getpid()))
            os._exit(1)  # a worker process dies mid-training, once
        if cfg.get("sleep"):
            time.sleep(cfg["sleep"])
        loop.step_done(loss, images=len(images))


def synthetic_dataset(rows: int = 12, size: int = 16):
    import ray.data

    rng = np.random.default_rng(0)
    return ray.data.from_items([
        {"image": rng.standard_normal((3, size, size)).astype(np.float32),
         "label": rng.integers(0, 11, (size, size)).astype(np.uint8)} for _ in range(rows)
    ])


@pytest.fixture(scope="module")
def camvid_feed(shared_data, tmp_path_factory, ray_local):
    """The real feed: a manifest over 12 CamVid frames -> train_dataset (64x64 crops)."""
    from test_datasets import LUT, camvid_pairs, write_manifest

    from pipeline.datasets import train_dataset
    from zeroseg.data.transforms import AugmentConfig

    manifest = write_manifest(tmp_path_factory.mktemp("feed") / "train.parquet", camvid_pairs(shared_data, 12))
    return train_dataset(manifest, LUT, AugmentConfig(crop_size=(64, 64)), seed=0, block_rows=2)


def T(**kw) -> TrainSection:
    base = dict(max_steps=10, batch_size=4, lr=0.05, checkpoint_every=4, keep_checkpoints=2, log_every=5)
    return TrainSection(**{**base, **kw})


# -- pure logic ----------------------------------------------------------------------------------
def test_global_batch_and_lr_scaling():
    s2 = ScalingSection(num_workers=2)
    assert global_batch_and_lr(s2, T(batch_size=8, reference_batch_size=16)) == (16, 0.05, None)
    g, lr, msg = global_batch_and_lr(s2, T(batch_size=4, reference_batch_size=16, lr_scaling="linear"))
    assert (g, lr) == (8, 0.025) and "scaled linearly" in msg
    g, lr, msg = global_batch_and_lr(s2, T(batch_size=4, reference_batch_size=16, lr_scaling="sqrt"))
    assert math.isclose(lr, 0.05 * math.sqrt(0.5)) and "sqrt" in msg
    g, lr, msg = global_batch_and_lr(ScalingSection(), T(batch_size=4, reference_batch_size=16))
    assert (g, lr) == (4, 0.05) and msg.startswith("WARNING") and "NOT scaled" in msg and "batch_size: 16" in msg


def test_sections_reject_unknown_keys():
    with pytest.raises(ValidationError, match="max_step"):
        TrainSection(max_step=3, batch_size=1, lr=1.0)
    with pytest.raises(ValidationError, match="num_worker"):
        ScalingSection(num_worker=2)


def test_strict_load_lists_missing_and_unexpected_keys():
    sd = TinyNet(wide=True).state_dict()
    sd["head.weight"] = torch.zeros(5, 8, 1, 1)
    with pytest.raises(CheckpointMismatchError) as e:
        strict_load(TinyNet(), {k: v for k, v in sd.items() if k != "conv.bias"}, source="ckpt.pt")
    msg = str(e.value)
    assert "missing keys (1): conv.bias" in msg and "unexpected keys (2): extra.bias, extra.weight" in msg
    assert "head.weight (5, 8, 1, 1) vs model (11, 8, 1, 1)" in msg and "ckpt.pt" in msg
    torch.manual_seed(1)
    src = TinyNet()
    torch.manual_seed(2)
    dst = TinyNet()
    assert not torch.equal(src.conv.weight, dst.conv.weight)
    strict_load(dst, src.state_dict())  # a matching state dict loads
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_list_checkpoints_missing_run_is_empty_but_storage_errors_raise(tmp_path, monkeypatch):
    import pipeline.training as training

    assert list_checkpoints(str(tmp_path / "no-such-store"), "run") == []

    class Unreachable:
        def get_file_info(self, *_):
            raise OSError("AWS Error ACCESS_DENIED during ListObjectsV2")

    monkeypatch.setattr(training, "_fs", lambda uri: (Unreachable(), "bucket/store"))
    with pytest.raises(OSError, match=r"cannot list the checkpoints under s3://bucket/store/run.*ACCESS_DENIED"):
        list_checkpoints("s3://bucket/store", "run")
    with pytest.raises(OSError, match="ACCESS_DENIED"):  # not "no checkpoint": a resume must not restart at 0
        latest_checkpoint("s3://bucket/store", "run")


# -- in-process fits (num_workers=0) --------------------------------------------------------------
def test_resume_in_process_is_exact(camvid_feed, tmp_path):
    """10 steps in one go == 5 steps, then a re-run to 10 (same storage and name)."""
    store = str(tmp_path / "store")
    full = fit(seg_loop, {}, {"train": camvid_feed}, ScalingSection(), T(), store, "full")
    assert full.steps == 10 and full.resumed_from_step == 0 and full.global_batch_size == 4
    assert [c.step for c in list_checkpoints(store, "full")] == [8, 10]  # keep_checkpoints=2

    fit(seg_loop, {}, {"train": camvid_feed}, ScalingSection(), T(max_steps=5), store, "split")
    lines: list[str] = []
    resumed = fit(seg_loop, {}, {"train": camvid_feed}, ScalingSection(), T(), store, "split", log=lines.append)
    assert resumed.resumed_from_step == 5 and resumed.steps == 10
    assert any("found checkpoint at step 5" in ln for ln in lines)
    a, b = load_model_state(full.checkpoint_dir), load_model_state(resumed.checkpoint_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # model, optimiser, scheduler, data position, RNG restored
    state = latest_checkpoint(store, "split").state
    assert state["step"] == 10 and state["world_size"] == 1 and state["global_batch_size"] == 4


def test_finished_run_is_not_trained_again(tmp_path, ray_local):
    store = str(tmp_path / "store")
    ds = synthetic_dataset()
    first = fit(seg_loop, {}, {"train": ds}, ScalingSection(), T(max_steps=3), store, "r")

    def must_not_run(loop):
        raise AssertionError("re-trained a finished run")

    again = fit(must_not_run, {}, {"train": ds}, ScalingSection(), T(max_steps=3), store, "r")
    assert again.steps == 3 and again.checkpoint_dir == first.checkpoint_dir


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path, ray_local):
    store = str(tmp_path / "store")
    with pytest.raises(NonFiniteLossError) as e:
        fit(seg_loop, {"nan_at": 7}, {"train": synthetic_dataset()}, ScalingSection(),
            T(checkpoint_every=3), store, "nan")
    assert e.value.step == 7 and math.isnan(e.value.loss)
    assert e.value.last_checkpoint.endswith("nan/checkpoint_00000006")
    assert "step 7" in str(e.value) and "checkpoint_00000006" in str(e.value)
    assert latest_checkpoint(store, "nan").step == 6


def test_checkpoint_of_another_model_is_an_error(tmp_path, ray_local):
    store, ds = str(tmp_path / "store"), synthetic_dataset()
    fit(seg_loop, {}, {"train": ds}, ScalingSection(), T(max_steps=2, checkpoint_every=2), store, "m")
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing keys \(2\): extra.bias, extra.weight; unexpected keys \(0\): none"):
        fit(seg_loop, {"wide": True}, {"train": ds}, ScalingSection(), T(max_steps=4), store, "m")


def test_loop_mistakes_are_explained(tmp_path, ray_local):
    def no_restore(loop):
        for _ in loop.batches():
            loop.step_done(1.0)

    with pytest.raises(RuntimeError, match="call loop.restore"):
        fit(no_restore, {}, {"train": synthetic_dataset()}, ScalingSection(), T(max_steps=2), str(tmp_path), "a")
    with pytest.raises(DataError, match="no full batch of 16"):
        fit(seg_loop, {}, {"train": synthetic_dataset(rows=8)}, ScalingSection(), T(batch_size=16), str(tmp_path), "b")


def test_in_process_fit_logs_to_mlflow_and_prints_progress(tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    lines: list[str] = []
    fit(seg_loop, {}, {"train": synthetic_dataset()}, ScalingSection(),
        T(max_steps=6, log_every=3, reference_batch_size=8, lr_scaling="linear"), str(tmp_path / "s"), "ml",
        mlflow={"tracking_uri": uri, "run_id": run_id}, log=lines.append)
    assert any("scaled linearly 0.05 -> 0.025" in ln for ln in lines)
    hist = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
            for k in ("train/loss", "train/lr", "train/throughput_img_s", "train/step_time_s")}
    assert [s for s, _ in hist["train/loss"]] == [3, 6] and all(v > 0 for _, v in hist["train/throughput_img_s"])
    assert [s for s, _ in hist["train/step_time_s"]] == [3, 6] and all(v > 0 for _, v in hist["train/step_time_s"])
    assert math.isclose(hist["train/lr"][0][1], 0.025 * (1 - 3 / 24))  # effective lr, then the schedule
    params = client.get_run(run_id).data.params
    assert params["train.global_batch_size"] == "4" and params["train.effective_lr"] == "0.025"
    out = capsys.readouterr().out
    assert "[train] step 3/6 (50%)" in out and "img/s" in out and "s/step" in out


# -- real 2-worker fits (each ~30-60 s of Ray Train start-up on 2 cores) --------------------------------
SCALING_2 = ScalingSection(num_workers=2, resources_per_worker={"CPU": 0.5})  # 1 CPU left for Ray Data


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(camvid_feed, tmp_path):
    """Rank 1 calls os._exit(1) at step 5: Ray Train restarts the group (max_failures=1), the
    new attempt resumes from step 3 and ends with exactly max_steps optimisation steps; rank 0's
    curves reach the stage's MLflow run from the worker process."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("w")).info.run_id
    marker = tmp_path / "killed"
    res = fit(seg_loop, {"kill_at": 5, "marker": str(marker)}, {"train": camvid_feed}, SCALING_2,
              T(max_steps=8, batch_size=2, checkpoint_every=3, log_every=2, max_failures=1),
              str(tmp_path / "store"), "killed", mlflow={"tracking_uri": uri, "run_id": run_id})
    assert marker.exists(), "the fault was not injected"
    assert res.steps == 8 and res.resumed_from_step == 3 and res.world_size == 2 and res.global_batch_size == 4
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [2, 4, 4, 6, 8]  # attempt 1 logged 2 and 4, died at 5; attempt 2 resumed at 3
    assert latest_checkpoint(str(tmp_path / "store"), "killed").state["world_size"] == 2


DRIVER = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import ray
ray.init(address={address!r}, logging_level="WARNING")
from test_datasets import LUT, camvid_pairs, write_manifest
from test_training import SCALING_2, T, seg_loop
from pipeline.datasets import train_dataset
from pipeline.training import fit
from zeroseg.data.transforms import AugmentConfig
ds = train_dataset({manifest!r}, LUT, AugmentConfig(crop_size=(64, 64)), seed=0, block_rows=2)
fit(seg_loop, {{"sleep": 1.0}}, {{"train": ds}}, SCALING_2, T(max_steps=12, batch_size=2, checkpoint_every=2),
    {store!r}, "driver")
print("FINISHED")
"""


@pytest.mark.slow
def test_killed_driver_rerun_resumes(shared_data, tmp_path, ray_local):
    """SIGKILL the driver of a 2-worker fit once a checkpoint exists; re-running the same fit
    (same storage and name) resumes from it instead of starting over."""
    from test_datasets import LUT, camvid_pairs, write_manifest

    from pipeline.datasets import train_dataset
    from zeroseg.data.transforms import AugmentConfig

    manifest = write_manifest(tmp_path / "train.parquet", camvid_pairs(shared_data, 12))
    store = str(tmp_path / "store")
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER.format(
        repo=str(REPO), tests=str(REPO / "tests"), address=ray_local.get_runtime_context().gcs_address,
        manifest=str(manifest), store=store)))
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"})
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            ck = latest_checkpoint(store, "driver")
            if ck is not None and ck.step >= 2:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"no checkpoint appeared (driver exit {proc.poll()}); see {log.name}:\n"
                        + Path(log.name).read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    killed_at = latest_checkpoint(store, "driver").step
    assert 2 <= killed_at < 12 and "FINISHED" not in Path(log.name).read_text()

    ds = train_dataset(manifest, LUT, AugmentConfig(crop_size=(64, 64)), seed=0, block_rows=2)
    res = fit(seg_loop, {}, {"train": ds}, SCALING_2, T(max_steps=12, batch_size=2, checkpoint_every=2), store, "driver")
    assert res.resumed_from_step >= killed_at and res.steps == 12  # resumed, not restarted


def test_workers_holding_every_cpu_is_a_clear_error():
    from pipeline.training import check_cpus_left_for_data

    check_cpus_left_for_data(ScalingSection(num_workers=2, resources_per_worker={"CPU": 0.5}), 2.0)
    with pytest.raises(ConfigError, match=r"hold 2 of the cluster's 2 CPUs.*resources_per_worker"):
        check_cpus_left_for_data(ScalingSection(num_workers=2), 2.0)
    with pytest.raises(ConfigError, match="hold 1 of the cluster's 1"):
        check_cpus_left_for_data(ScalingSection(num_workers=2, resources_per_worker={"CPU": 0.5}), 1.0)
    # GPU workers: Ray reserves no CPU for them unless resources_per_worker names one
    check_cpus_left_for_data(ScalingSection(num_workers=2, use_gpu=True), 1.0)
    check_cpus_left_for_data(ScalingSection(num_workers=2, use_gpu=True, resources_per_worker={"GPU": 1}), 1.0)
    with pytest.raises(ConfigError, match="2 training workers x 4 CPU hold 8 of the cluster's 8"):
        check_cpus_left_for_data(ScalingSection(num_workers=2, use_gpu=True,
                                                resources_per_worker={"CPU": 4, "GPU": 1}), 8.0)
    with pytest.raises(ConfigError, match="rejected by Ray Train.*use_gpu"):
        check_cpus_left_for_data(ScalingSection(num_workers=2, resources_per_worker={"GPU": 1}), 8.0)
