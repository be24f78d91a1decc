"""The training wrapper end to end: resume (step by step, with bf16/fp16, accumulation and
clipping), checkpoints, NaN, state-dict checks, lr scaling, MLflow and progress; plus real 2-worker
fits where a worker and then the driver are killed (``slow``).

Expected values come from an uninterrupted run or from plain torch in the test, never from the
code under test. Pure units (loss reduction, precision, records, URIs) are in
``test_training_units.py``; Ray Data's pass counter in ``test_raycompat.py``."""

from __future__ import annotations

import json
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

from pipeline.errors import ConfigError
from pipeline.training import (
    CheckpointMismatchError,
    Loop,
    NonFiniteLossError,
    Progress,
    ScalingSection,
    TrainingDataError,
    TrainSection,
    fit,
    global_batch_and_lr,
    latest_checkpoint,
    list_checkpoints,
    load_model_state,
)

REPO = Path(__file__).resolve().parent.parent

# Ray workers cannot import this test module: ship its functions by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# -- loops (what a stage writes) ------------------------------------------------------------------
class TinyNet(torch.nn.Module):
    def __init__(self, classes: int = 11, wide: bool = False, dropout: float = 0.0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.drop = torch.nn.Dropout2d(dropout)
        self.head = torch.nn.Conv2d(8, classes, 1)
        if wide:
            self.extra = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.conv(x))))


def _trace(cfg: dict, record: dict) -> None:
    if cfg.get("trace"):
        with open(cfg["trace"], "a") as f:
            f.write(json.dumps(record) + "\n")


def seg_loop(loop: Loop) -> None:
    """A complete per-worker loop; ``loop.config`` may inject a fault, a NaN or a crash, and
    trace every micro-batch (loss, one RNG draw) to a file."""
    cfg = loop.config
    model = loop.prepare(TinyNet(wide=cfg.get("wide", False), dropout=cfg.get("dropout", 0.0)))
    if cfg.get("init_out") and loop.rank == 0:
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, cfg["init_out"])
    opt = torch.optim.SGD(model.parameters(), lr=loop.lr, momentum=cfg.get("momentum", 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 24)  # independent of max_steps
    loop.restore(model, opt, sched)
    model.train()
    accum = loop.train.grad_accum_steps
    for k, batch in enumerate(loop.batches("train")):
        if cfg.get("check_sync") and loop.world_size > 1:  # DDP all-reduces on a step's last micro-batch only
            assert model.require_backward_grad_sync == (k % accum == accum - 1), (k, accum)
        images, labels = batch["image"], batch["label"].long()
        with loop.autocast():
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=255)
        if cfg.get("nan_at") == loop.global_step + 1:
            loss = loss * float("nan")
        if cfg.get("crash_at") == loop.global_step + 1 and not os.path.exists(cfg["marker"]):
            Path(cfg["marker"]).write_text("crashed")
            raise RuntimeError("injected crash")  # the in-process run dies mid-training, once
        if (
            cfg.get("kill_at") == loop.global_step + 1
            and loop.rank == cfg.get("kill_rank", 1)
            and not os.path.exists(cfg["marker"])
        ):
            Path(cfg["marker"]).write_text(str(os.getpid()))
            os._exit(1)  # a worker process dies mid-training, once
        if cfg.get("sleep"):
            time.sleep(cfg["sleep"])
        _trace(cfg, {"step": loop.global_step + 1, "loss": float(loss), "draw": float(torch.rand(()))})
        loop.step(loss, images=len(images))


def synthetic_dataset(rows: int = 12, size: int = 16):
    import ray.data

    rng = np.random.default_rng(0)
    return ray.data.from_items(synthetic_rows(rows, size, rng))


def synthetic_rows(rows: int = 12, size: int = 16, rng=None):
    rng = rng or np.random.default_rng(0)
    return [
        {
            "image": rng.standard_normal((3, size, size)).astype(np.float32),
            "label": rng.integers(0, 11, (size, size)).astype(np.uint8),
        }
        for _ in range(rows)
    ]


def synthetic_feed(rows: int = 12, size: int = 32, seed: int = 0):
    """A feed built like the real one (``stages.feeds.train_dataset``) without files: rows
    reshuffled every pass (``RandomSeedConfig`` reseeded per execution), blocks of 2 rows, and a
    per-sample augmentation (flip, noise) seeded by ``(seed, row id, Ray Data's pass index)``;
    labels 0..10 with an ignored (255) border."""
    import ray.data
    from ray.data import RandomSeedConfig

    ds = ray.data.from_items([{"id": i} for i in range(rows)])
    ds = ds.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    ds = ds.repartition(target_num_rows_per_block=2)
    return ds.map_batches(
        _augmented_samples, fn_kwargs={"size": size, "seed": seed}, batch_size=2, batch_format="numpy"
    )


def _augmented_samples(batch: dict, size: int, seed: int) -> dict:
    from pipeline.raycompat import pass_index

    images, labels = [], []
    for i in batch["id"]:
        base = np.random.default_rng(int(i))  # the "decoded image"
        img = base.standard_normal((3, size, size)).astype(np.float32)
        lbl = base.integers(0, 11, (size, size)).astype(np.uint8)
        lbl[:, :2] = 255
        aug = np.random.default_rng([seed, int(i), pass_index()])
        if aug.random() < 0.5:
            img, lbl = img[:, :, ::-1], lbl[:, ::-1]
        images.append(img + 0.1 * aug.standard_normal(img.shape).astype(np.float32))
        labels.append(lbl)
    return {"image": np.ascontiguousarray(np.stack(images)), "label": np.ascontiguousarray(np.stack(labels))}


@pytest.fixture(scope="module")
def feed(ray_local):
    """The training feed of these tests (:func:`synthetic_feed`)."""
    return synthetic_feed()


def T(**kw) -> TrainSection:
    base = dict(max_steps=10, batch_size=4, lr=0.05, checkpoint_every=4, keep_checkpoints=2, log_every=5)
    return TrainSection(**{**base, **kw})


def read_trace(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def checkpoint_dirs(store: str, name: str) -> list[str]:
    return sorted(p.name for p in (Path(store) / name).glob("checkpoint_*") if p.is_dir())


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


def test_global_batch_counts_gradient_accumulation():
    """global batch = workers x batch x accumulation (2 x 2 x 4 = 16: the reference, no message)."""
    s2 = ScalingSection(num_workers=2)
    assert global_batch_and_lr(s2, T(batch_size=2, grad_accum_steps=4, reference_batch_size=16)) == (16, 0.05, None)
    g, lr, msg = global_batch_and_lr(
        s2, T(batch_size=2, grad_accum_steps=2, reference_batch_size=16, lr_scaling="linear")
    )
    assert (g, lr) == (8, 0.025) and "2 worker(s) x 2 x 2 accumulation steps" in msg
    g, lr, msg = global_batch_and_lr(s2, T(batch_size=2, grad_accum_steps=2, reference_batch_size=16))
    assert (g, lr) == (8, 0.05) and "NOT scaled" in msg
    assert "batch_size: 4 per worker" in msg and "grad_accum_steps: 4" in msg  # 2 x 4 x 2 = 2 x 2 x 4 = 16
    assert global_batch_and_lr(ScalingSection(), T(batch_size=4, grad_accum_steps=4, reference_batch_size=16)) == (
        16,
        0.05,
        None,
    )


def test_sections_reject_unknown_keys_and_bad_options():
    with pytest.raises(ValidationError, match="max_step"):
        TrainSection(max_step=3, batch_size=1, lr=1.0)
    with pytest.raises(ValidationError, match="num_worker"):
        ScalingSection(num_worker=2)
    with pytest.raises(ValidationError, match="precision"):
        T(precision="fp8")
    with pytest.raises(ValidationError, match="grad_accum_steps"):
        T(grad_accum_steps=0)
    with pytest.raises(ValidationError, match="clip_grad_norm"):
        T(clip_grad_norm=0.0)
    assert T().precision == "auto" and T().grad_accum_steps == 1 and T().clip_grad_norm is None


def test_list_checkpoints_missing_run_is_empty_but_storage_errors_raise(tmp_path, monkeypatch):
    import pipeline.uri

    assert list_checkpoints(str(tmp_path / "no-such-store"), "run") == []

    class Unreachable:
        def get_file_info(self, *_):
            raise OSError("AWS Error ACCESS_DENIED during ListObjectsV2")

    monkeypatch.setattr(pipeline.uri, "filesystem", lambda uri: (Unreachable(), "bucket/store/run"))
    with pytest.raises(OSError, match=r"cannot list the checkpoints under s3://bucket/store/run.*ACCESS_DENIED"):
        list_checkpoints("s3://bucket/store", "run")
    with pytest.raises(OSError, match="ACCESS_DENIED"):  # not "no checkpoint": a resume must not restart at 0
        latest_checkpoint("s3://bucket/store", "run")


# -- in-process fits (num_workers=0) --------------------------------------------------------------
def test_resume_in_process_is_exact(feed, tmp_path):
    """10 steps in one go == 5 steps, then a re-run to 10 (same storage and name)."""
    store = str(tmp_path / "store")
    full = fit(seg_loop, {}, {"train": feed}, ScalingSection(), T(), store, "full")
    assert full.steps == 10 and full.resumed_from_step == 0 and full.global_batch_size == 4
    assert [c.step for c in list_checkpoints(store, "full")] == [8, 10]  # keep_checkpoints=2
    assert checkpoint_dirs(store, "full") == ["checkpoint_00000008", "checkpoint_00000010"]

    fit(seg_loop, {}, {"train": feed}, ScalingSection(), T(max_steps=5), store, "split")
    lines: list[str] = []
    resumed = fit(seg_loop, {}, {"train": feed}, ScalingSection(), T(), store, "split", log=lines.append)
    assert resumed.resumed_from_step == 5 and resumed.steps == 10
    assert any("found checkpoint at step 5" in ln for ln in lines)
    assert any(ln.startswith("resumed from step 5 (epoch 1, batch 2)") for ln in lines)  # 5 x 4 = 12 + 8 rows
    a, b = load_model_state(full.checkpoint_dir), load_model_state(resumed.checkpoint_dir)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # model, optimiser, scheduler, data position, RNG restored
    state = latest_checkpoint(store, "split").state
    assert state["step"] == 10 and state["world_size"] == 1 and state["global_batch_size"] == 4


RESUME_CASES = {
    # name: (train options, steps, checkpoint_every, crash in step, resumed from)
    "fp32": (dict(batch_size=4), 7, 2, 5, 4),
    "bf16_accum2_clip": (dict(batch_size=2, precision="bf16", grad_accum_steps=2, clip_grad_norm=0.5), 7, 2, 5, 4),
    "fp16_accum3_scaler": (dict(batch_size=2, precision="fp16", grad_accum_steps=3), 5, 3, 4, 3),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_killed_in_process_run_resumes_step_by_step(case, feed, tmp_path):
    """A run that dies in step ``crash`` and is re-run makes, from the checkpoint on, the same
    micro-batches as an uninterrupted run: the same losses and RNG draws (dropout on), bitwise,
    and the same final weights; with bf16 autocast + accumulation + clipping and with fp16 + its
    gradient scaler (both run on CPU with torch 2.13; ``auto`` is fp32 on CPU)."""
    opts, steps, every, crash, resumed_at = RESUME_CASES[case]
    train = T(max_steps=steps, checkpoint_every=every, log_every=2, **opts)
    store = str(tmp_path / "store")
    ref_trace, trace1, trace2 = tmp_path / "ref.jsonl", tmp_path / "a1.jsonl", tmp_path / "a2.jsonl"
    ref = fit(
        seg_loop,
        {"dropout": 0.3, "trace": str(ref_trace)},
        {"train": feed},
        ScalingSection(),
        train,
        store,
        "ref",
        log=lambda m: None,
    )
    crashing = {"dropout": 0.3, "crash_at": crash, "marker": str(tmp_path / "crashed")}
    with pytest.raises(RuntimeError, match="injected crash"):
        fit(
            seg_loop,
            {**crashing, "trace": str(trace1)},
            {"train": feed},
            ScalingSection(),
            train,
            store,
            "run",
            log=lambda m: None,
        )
    assert latest_checkpoint(store, "run").step == resumed_at
    res = fit(
        seg_loop,
        {**crashing, "trace": str(trace2)},
        {"train": feed},
        ScalingSection(),
        train,
        store,
        "run",
        log=lambda m: None,
    )
    assert res.resumed_from_step == resumed_at and res.steps == steps
    assert res.precision == opts.get("precision", "fp32")
    expected = [r for r in read_trace(ref_trace) if r["step"] > resumed_at]
    assert len(expected) == (steps - resumed_at) * train.grad_accum_steps
    assert read_trace(trace2) == expected  # every micro-batch: loss and RNG draw, bitwise
    assert read_trace(trace1) == [r for r in read_trace(ref_trace) if r["step"] < crash]  # attempt 1 until the crash
    a, b = ref.model_state(), res.model_state()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    objs_ref = torch.load(ref.checkpoint_dir / "train_state.pt", weights_only=False)["objects"]
    objs_res = torch.load(res.checkpoint_dir / "train_state.pt", weights_only=False)["objects"]
    if opts.get("precision") == "fp16":
        assert objs_res["grad_scaler"] == objs_ref["grad_scaler"] and objs_res["grad_scaler"]["scale"] > 0
    else:
        assert "grad_scaler" not in objs_res
    assert len(checkpoint_dirs(store, "run")) <= train.keep_checkpoints


def test_gradient_accumulation_equals_the_large_batch(tmp_path, ray_local):
    """2 micro-batches of 2 with accumulation == 1 batch of 4 (same rows, equal-size micro-batches
    with no ignored pixel: the mean of the micro-batch means is the batch mean)."""
    ds, store = synthetic_dataset(), str(tmp_path / "store")
    big = fit(
        seg_loop,
        {"momentum": 0.0},
        {"train": ds},
        ScalingSection(),
        T(max_steps=3, batch_size=4),
        store,
        "big",
        log=lambda m: None,
    )
    acc = fit(
        seg_loop,
        {"momentum": 0.0},
        {"train": ds},
        ScalingSection(),
        T(max_steps=3, batch_size=2, grad_accum_steps=2),
        store,
        "acc",
        log=lambda m: None,
    )
    assert big.global_batch_size == acc.global_batch_size == 4
    a, b = big.model_state(), acc.model_state()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(a["head.weight"], TinyNet().head.weight)  # it trained
    assert math.isclose(acc.metrics["loss"], big.metrics["loss"], rel_tol=1e-5)  # the logged loss too


@pytest.mark.parametrize("clip", [0.02, 1e6])
def test_gradient_clipping_by_total_norm(clip, tmp_path, ray_local):
    """One SGD step: w1 = w0 - lr * g * min(1, clip / ||g||), g over every parameter (by hand)."""
    rows = synthetic_rows()
    init = tmp_path / "init.pt"
    res = fit(
        seg_loop,
        {"momentum": 0.0, "init_out": str(init)},
        {"train": synthetic_dataset()},
        ScalingSection(),
        T(max_steps=1, batch_size=4, clip_grad_norm=clip),
        str(tmp_path / "s"),
        "clip",
        log=lambda m: None,
    )
    net = TinyNet()
    net.load_state_dict(torch.load(init))
    x = torch.stack([torch.from_numpy(r["image"]) for r in rows[:4]])
    y = torch.stack([torch.from_numpy(r["label"]).long() for r in rows[:4]])
    torch.nn.functional.cross_entropy(net(x), y, ignore_index=255).backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in net.parameters()))
    factor = min(1.0, clip / float(norm))
    assert (factor < 0.5) == (clip == 0.02)  # the small clip is active, the large one is not
    got = res.model_state()
    for n, p in net.named_parameters():
        torch.testing.assert_close(got[n], p.detach() - 0.05 * p.grad * factor, rtol=1e-5, atol=1e-7)
    assert math.isclose(res.metrics["grad_norm"], float(norm), rel_tol=1e-5)


def test_finished_run_is_not_trained_again(tmp_path, ray_local):
    store = str(tmp_path / "store")
    ds = synthetic_dataset()
    lines: list[str] = []
    first = fit(
        seg_loop, {}, {"train": ds}, ScalingSection(), T(max_steps=3, log_every=3), store, "r", log=lines.append
    )
    assert any(ln.startswith("step 3/3 (100%) epoch 0 loss ") for ln in lines)  # no progress callback: a line

    def must_not_run(loop):
        raise AssertionError("re-trained a finished run")

    again = fit(must_not_run, {}, {"train": ds}, ScalingSection(), T(max_steps=3), store, "r")
    assert again.steps == 3 and again.checkpoint_dir == first.checkpoint_dir


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path, ray_local):
    store = str(tmp_path / "store")
    with pytest.raises(NonFiniteLossError) as e:
        fit(
            seg_loop,
            {"nan_at": 7},
            {"train": synthetic_dataset()},
            ScalingSection(),
            T(checkpoint_every=3),
            store,
            "nan",
        )
    assert e.value.step == 7 and math.isnan(e.value.loss)
    assert e.value.last_checkpoint.endswith("nan/checkpoint_00000006")
    assert "step 7" in str(e.value) and "checkpoint_00000006" in str(e.value)
    assert latest_checkpoint(store, "nan").step == 6


def test_checkpoint_of_another_model_is_an_error(tmp_path, ray_local):
    """Without model_state, torch's strict load_state_dict is the check, wrapped in one error that
    names the checkpoint."""
    store, ds = str(tmp_path / "store"), synthetic_dataset()
    fit(seg_loop, {}, {"train": ds}, ScalingSection(), T(max_steps=2, checkpoint_every=2), store, "m")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"(?s)checkpoint .*m/checkpoint_00000002 does not match the model .*"
        r'Missing key\(s\) in state_dict: "extra.weight", "extra.bias"',
    ):
        fit(seg_loop, {"wide": True}, {"train": ds}, ScalingSection(), T(max_steps=4), store, "m")


def head_only_loop(loop: Loop) -> None:
    """Checkpoints hold only the head (the conv is a frozen "backbone"), loaded by a strict
    loader of the loop's own that records what it got."""
    cfg = loop.config
    net = TinyNet()
    for p in net.conv.parameters():
        p.requires_grad_(False)
    model = loop.prepare(net)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=loop.lr)

    def get():
        return {k: v for k, v in net.state_dict().items() if k.startswith("head.")}

    def strict_set(sd):
        Path(cfg["loaded"]).write_text(json.dumps(sorted(sd)))
        want = cfg.get("want", ["head.bias", "head.weight"])
        if sorted(sd) != want:
            raise ValueError(f"head weights: expected {want}, got {sorted(sd)}")
        net.load_state_dict(sd, strict=False)

    loop.restore(model, opt, model_state=(get, strict_set))
    for batch in loop.batches():
        loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"].long())
        loop.step(loss)


def test_model_state_hooks_save_and_load_only_the_trainable_weights(tmp_path, ray_local):
    store, ds, loaded = str(tmp_path / "store"), synthetic_dataset(), tmp_path / "loaded.json"
    first = fit(head_only_loop, {"loaded": str(loaded)}, {"train": ds}, ScalingSection(), T(max_steps=2), store, "h")
    assert sorted(first.model_state()) == ["head.bias", "head.weight"]  # no frozen conv in the checkpoint
    assert not loaded.exists()
    again = fit(head_only_loop, {"loaded": str(loaded)}, {"train": ds}, ScalingSection(), T(max_steps=3), store, "h")
    assert again.resumed_from_step == 2 and json.loads(loaded.read_text()) == ["head.bias", "head.weight"]
    with pytest.raises(
        CheckpointMismatchError,
        match=r"checkpoint .*h/checkpoint_00000003 does not match the model \(ValueError: head "
        r"weights: expected \['head.weight'\]",
    ):
        fit(
            head_only_loop,
            {"loaded": str(loaded), "want": ["head.weight"]},
            {"train": ds},
            ScalingSection(),
            T(max_steps=4),
            store,
            "h",
        )


def test_loop_mistakes_are_explained(tmp_path, ray_local):
    def no_restore(loop):
        for _ in loop.batches():
            loop.step_done(1.0)

    def step_without_restore(loop):
        for _ in loop.batches():
            loop.step(torch.ones((), requires_grad=True))

    def manual_with_accumulation(loop):
        model = loop.prepare(TinyNet())
        loop.restore(model, torch.optim.SGD(model.parameters(), lr=0.1))
        for _ in loop.batches():
            loop.step_done(1.0)

    ds = synthetic_dataset()
    with pytest.raises(RuntimeError, match="call loop.restore"):
        fit(no_restore, {}, {"train": ds}, ScalingSection(), T(max_steps=2), str(tmp_path), "a")
    with pytest.raises(RuntimeError, match=r"call loop.restore\(model, optimizer, scheduler\) before loop.step"):
        fit(step_without_restore, {}, {"train": ds}, ScalingSection(), T(max_steps=2), str(tmp_path), "c")
    with pytest.raises(ConfigError, match="grad_accum_steps > 1.*loop.step"):
        fit(
            manual_with_accumulation,
            {},
            {"train": ds},
            ScalingSection(),
            T(max_steps=2, grad_accum_steps=2),
            str(tmp_path),
            "d",
        )
    with pytest.raises(TrainingDataError, match="no full batch of 16"):
        fit(seg_loop, {}, {"train": synthetic_dataset(rows=8)}, ScalingSection(), T(batch_size=16), str(tmp_path), "b")


def test_in_process_fit_logs_to_mlflow_and_reports_progress(tmp_path, ray_local, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    lines: list[str] = []
    records: list[Progress] = []
    fit(
        seg_loop,
        {},
        {"train": synthetic_dataset()},
        ScalingSection(),
        T(max_steps=6, log_every=3, reference_batch_size=8, lr_scaling="linear"),
        str(tmp_path / "s"),
        "ml",
        mlflow={"tracking_uri": uri, "run_id": run_id},
        log=lines.append,
        progress=records.append,
    )
    assert any("scaled linearly 0.05 -> 0.025" in ln for ln in lines)
    hist = {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)]
        for k in (
            "train/loss",
            "train/lr",
            "train/throughput_img_s",
            "train/step_time_s",
            "train/global_batch_size",
            "train/effective_lr",
        )
    }
    assert [s for s, _ in hist["train/loss"]] == [3, 6] and all(v > 0 for _, v in hist["train/throughput_img_s"])
    assert [s for s, _ in hist["train/step_time_s"]] == [3, 6] and all(v > 0 for _, v in hist["train/step_time_s"])
    assert math.isclose(hist["train/lr"][0][1], 0.025 * (1 - 3 / 24))  # effective lr, then the schedule
    assert hist["train/global_batch_size"] == [(0, 4.0)] and hist["train/effective_lr"] == [(0, 0.025)]
    assert [(p.step, p.max_steps) for p in records] == [(3, 6), (6, 6)]
    assert [p.loss for p in records] == [v for _, v in hist["train/loss"]]
    assert records[0].lr == hist["train/lr"][0][1] and records[1].eta_s == 0 and records[0].images_per_s > 0
    assert not any(ln.startswith("step ") for ln in lines)  # the callback replaces the progress lines
    assert "step 3/6" not in capsys.readouterr().out  # nothing printed per step


def test_failing_progress_callback_and_tracking_do_not_stop_training(tmp_path, ray_local, capsys):
    def broken(p):
        raise ValueError("display gone")

    res = fit(
        seg_loop,
        {},
        {"train": synthetic_dataset()},
        ScalingSection(),
        T(max_steps=4, log_every=1),
        str(tmp_path / "s"),
        "p",
        mlflow={"tracking_uri": f"sqlite:///{tmp_path}/no/such/dir/x.db", "run_id": "0123"},
        progress=broken,
        log=lambda m: None,
    )
    assert res.steps == 4
    err = capsys.readouterr().err
    assert err.count("progress callback") == 1 and "display gone" in err
    assert err.count("MLflow logging of the training curves disabled") == 1


# -- real 2-worker fits (each ~30-60 s of Ray Train start-up on 2 cores) --------------------------------
SCALING_2 = ScalingSection(num_workers=2, resources_per_worker={"CPU": 0.5})  # 1 CPU left for Ray Data


@pytest.mark.slow
def test_killed_worker_restarts_from_last_checkpoint(feed, tmp_path, capfd):
    """Rank 1 calls os._exit(1) at step 5: Ray Train restarts the group (max_failures=1), the
    new attempt resumes from step 3 and ends with exactly max_steps optimisation steps; rank 0's
    curves reach the stage's MLflow run from the worker process, and its progress reaches the
    driver's callback (workers print no step lines). With bf16 and 2 accumulation steps (DDP
    synchronises on the second micro-batch only, checked in the loop): 2 x 2 x 2 = 8 per step."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("w")).info.run_id
    marker = tmp_path / "killed"
    records: list[Progress] = []
    res = fit(
        seg_loop,
        {"kill_at": 5, "marker": str(marker), "check_sync": True},
        {"train": feed},
        SCALING_2,
        T(
            max_steps=8,
            batch_size=2,
            grad_accum_steps=2,
            precision="bf16",
            checkpoint_every=3,
            log_every=2,
            max_failures=1,
        ),
        str(tmp_path / "store"),
        "killed",
        mlflow={"tracking_uri": uri, "run_id": run_id},
        progress=records.append,
    )
    assert marker.exists(), "the fault was not injected"
    assert res.steps == 8 and res.resumed_from_step == 3 and res.world_size == 2 and res.global_batch_size == 8
    assert res.precision == "bf16"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == [2, 4, 4, 6, 8]  # attempt 1 logged 2 and 4, died at 5; attempt 2 resumed at 3
    assert [p.step for p in records] == steps and all(p.max_steps == 8 for p in records)
    assert latest_checkpoint(str(tmp_path / "store"), "killed").state["world_size"] == 2
    assert checkpoint_dirs(str(tmp_path / "store"), "killed") == ["checkpoint_00000006", "checkpoint_00000008"]
    out = capfd.readouterr()
    assert "step 4/8" not in out.out + out.err  # neither workers nor the driver print per-step lines


DRIVER = """
import sys
sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
import ray
ray.init(address={address!r}, logging_level="WARNING")
from test_training import SCALING_2, T, seg_loop, synthetic_feed
from pipeline.training import fit
ds = synthetic_feed()
fit(seg_loop, {{"sleep": 1.0}}, {{"train": ds}}, SCALING_2, T(max_steps=12, batch_size=2, checkpoint_every=2),
    {store!r}, "driver")
print("FINISHED")
"""


@pytest.mark.slow
def test_killed_driver_rerun_resumes_from_rays_record_and_prunes(tmp_path, ray_local):
    """SIGKILL the driver of a 2-worker fit once a checkpoint exists; re-running the same fit
    (same storage and name) resumes from the newest checkpoint Ray registered, not from a newer
    directory Ray never registered (planted here, as a worker upload cut off by the kill leaves
    one), deletes such directories and ends with keep_checkpoints (2) checkpoint directories.
    Then the same run goes on in-process (world size 2 -> 1: position mapped by samples)."""
    from pipeline.training.checkpoint import ray_checkpoints

    store = str(tmp_path / "store")
    script = tmp_path / "driver.py"
    script.write_text(
        textwrap.dedent(
            DRIVER.format(
                repo=str(REPO),
                tests=str(REPO / "tests"),
                address=ray_local.get_runtime_context().gcs_address,
                store=store,
            )
        )
    )
    log = open(tmp_path / "driver.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "RAY_TRAIN_V2_ENABLED": "1"},
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                ck = ray_checkpoints(store, "driver")
            except Exception:  # noqa: BLE001 - Ray's snapshot read while the controller rewrites it
                ck = []
            if ck and ck[-1].step >= 4:
                break
            time.sleep(0.5)
        else:
            pytest.fail(
                f"no checkpoint appeared (driver exit {proc.poll()}); see {log.name}:\n"
                + Path(log.name).read_text()[-3000:]
            )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert "FINISHED" not in Path(log.name).read_text()
    time.sleep(2)  # let Ray reap the dead driver's controller and workers
    registered = [c.step for c in ray_checkpoints(store, "driver")]
    killed_at = registered[-1]
    assert 4 <= killed_at < 12 and len(registered) <= 2
    # an upload Ray never registered (what a kill between a worker's upload and registration leaves)
    import shutil

    orphan = f"checkpoint_{killed_at + 1:08d}"
    shutil.copytree(Path(store) / "driver" / f"checkpoint_{killed_at:08d}", Path(store) / "driver" / orphan)
    assert latest_checkpoint(store, "driver").step == killed_at  # records only: the orphan is not a checkpoint

    ds = synthetic_feed()
    lines: list[str] = []
    res = fit(
        seg_loop,
        {},
        {"train": ds},
        SCALING_2,
        T(max_steps=12, batch_size=2, checkpoint_every=2),
        store,
        "driver",
        log=lines.append,
    )
    assert res.resumed_from_step == killed_at and res.steps == 12  # resumed from Ray's record, not restarted
    assert any(
        ln.startswith("removed ") and "no record lists (left by an interrupted run)" in ln and orphan in ln
        for ln in lines
    )
    assert checkpoint_dirs(store, "driver") == ["checkpoint_00000010", "checkpoint_00000012"]
    assert [c.step for c in ray_checkpoints(store, "driver")] == [10, 12]

    lines.clear()
    more = fit(
        seg_loop,
        {},
        {"train": ds},
        ScalingSection(),
        T(max_steps=14, batch_size=2, checkpoint_every=2),
        store,
        "driver",
        log=lines.append,
    )
    assert more.resumed_from_step == 12 and more.steps == 14 and more.world_size == 1
    # 12 steps x 2 workers x 2 rows = 48 rows = 4 epochs of 12: epoch 4, batch 0 for any world size
    assert any("world size changed 2 -> 1" in ln for ln in lines)
    assert [(c.step, c.source) for c in list_checkpoints(store, "driver")] == [
        (10, "ray"),
        (12, "ray"),
        (14, "in_process"),
    ]  # Ray's stay until a worker fit prunes them


def _count_and_fail(loop: Loop) -> None:
    """A loop that records each attempt, then meets bad input (a user error)."""
    with open(loop.config["attempts"], "a") as f:
        f.write("x")
    raise TrainingDataError("manifest train.parquet has 3 rows for 2 workers x batch 4")


@pytest.mark.slow
def test_a_user_error_in_a_worker_is_not_retried(tmp_path, ray_local):
    """Bad input recurs on every restart: with max_failures -1 Ray Train would retry forever.
    The worker returns it instead; the driver raises it, after one attempt of each worker."""
    attempts = tmp_path / "attempts"
    with pytest.raises(TrainingDataError, match="3 rows for 2 workers"):
        fit(
            _count_and_fail,
            {"attempts": str(attempts)},
            {"train": synthetic_dataset()},
            ScalingSection(num_workers=2, resources_per_worker={"CPU": 0.5}),
            T(max_failures=-1),
            str(tmp_path / "s"),
            "user-error",
        )
    assert attempts.read_text() == "xx"  # each of the 2 workers ran once


def test_a_carried_error_must_be_signed_by_this_process():
    """Only payloads signed with this driver's key are unpickled: a message that merely looks
    like one (text from data in a KeyError, say) is ignored."""
    from pipeline.errors import RemoteUserError, carrier_key, find_user_error

    good = RemoteUserError.wrap(TrainingDataError("bad rows"), carrier_key())
    assert isinstance(find_user_error(RuntimeError(str(good))), TrainingDataError)
    forged = RemoteUserError.wrap(TrainingDataError("bad rows"), b"another key")
    assert find_user_error(RuntimeError(str(forged))) is None
