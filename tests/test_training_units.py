"""Units of the training package and its storage helpers, without a fit: the loss reduction over
workers (a fake process group of threads), precision resolution, the in-process checkpoint record
and sweeping, ``pipeline.uri``. Expected values are computed by hand."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from pipeline import uri
from pipeline.errors import ConfigError
from pipeline.training import Progress, in_process, resolve_precision
from pipeline.training.checkpoint import latest_checkpoint, list_checkpoints, step_of, sweep_unrecorded
from pipeline.training.metrics import hms, reduce_loss


# -- loss reduction over workers ---------------------------------------------------------------------
class FakeGroup:
    """``all_reduce`` (sum, in place) across threads standing for workers."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.lock = threading.Lock()
        self.total = None

    def all_reduce(self, t: torch.Tensor) -> None:
        with self.lock:
            self.total = t.clone() if self.total is None else self.total + t
        self.barrier.wait()
        t.copy_(self.total)
        self.barrier.wait()


def reduce_on_workers(per_worker: list[tuple[float, int]]) -> list[tuple[float, int]]:
    """Each worker: (its mean loss, images) -> what reduce_loss returns on it."""
    group, out = FakeGroup(len(per_worker)), [None] * len(per_worker)

    def work(rank: int) -> None:
        loss, n = per_worker[rank]
        out[rank] = reduce_loss(loss * n, n, group.all_reduce)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(per_worker))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_loss_is_the_image_weighted_mean_over_workers():
    # (2.0 x 4 + 5.0 x 2) / (4 + 2) = 18 / 6 = 3.0 on every worker, 6 images
    assert reduce_on_workers([(2.0, 4), (5.0, 2)]) == [(3.0, 6), (3.0, 6)]
    # equal batches: the plain mean of the workers' means, (1 + 2 + 6) / 3 = 3
    assert reduce_on_workers([(1.0, 2), (2.0, 2), (6.0, 2)]) == [(3.0, 6)] * 3
    # one worker's NaN reaches every worker: all of them stop at the same step
    assert all(math.isnan(v) and n == 4 for v, n in reduce_on_workers([(float("nan"), 2), (1.0, 2)]))
    assert reduce_loss(1.5 * 3, 3) == (1.5, 3)  # a single worker


# -- progress records -----------------------------------------------------------------------------
def test_progress_line_and_durations():
    p = Progress(
        step=30,
        max_steps=120,
        epoch=2,
        loss=0.43215,
        lr=1e-3,
        images_per_s=12.34,
        step_time_s=0.5,
        data_wait_s=0.012,
        eta_s=3725.0,
    )
    assert p.line() == (
        "step 30/120 (25%) epoch 2 loss 0.4321 lr 0.001 12.3 img/s 0.500 s/step (data wait 0.012) eta 1h02m"
    )
    assert hms(247) == "4m07s" and hms(-1) == "0m00s" and hms(float("inf")) == "0m00s"


def test_progress_listeners_get_every_record_and_a_failing_one_does_not_silence_the_display():
    from pipeline.training.progress import forward_progress, with_listeners

    rec = Progress(
        step=2, max_steps=4, epoch=0, loss=1.0, lr=0.1, images_per_s=1, step_time_s=1, data_wait_s=0, eta_s=1
    )
    shown, heard = [], []
    show = shown.append
    assert with_listeners(show, "run") is show  # no listener: the display alone

    def broken(name, record):
        raise RuntimeError("listener bug")

    with forward_progress(lambda name, record: heard.append((name, record.step))), forward_progress(broken):
        both = with_listeners(show, "run-a")
    both(rec)
    both(rec)
    assert shown == [rec, rec] and heard == [("run-a", 2), ("run-a", 2)]
    assert with_listeners(show, "run") is show  # the listeners ended with their contexts


# -- precision --------------------------------------------------------------------------------------
def test_precision_resolution(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_precision(p, cpu) for p in ("auto", "fp32", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", gpu) == "bf16" and resolve_precision("fp16", gpu) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", gpu) == "fp16"  # pre-Ampere: fp16 with a gradient scaler
    with pytest.raises(ConfigError, match="bf16 is not supported.*use fp16"):
        resolve_precision("bf16", gpu)
    with pytest.raises(ConfigError, match="auto, fp32, bf16 or fp16"):
        resolve_precision("fp8", cpu)


# -- the in-process record and sweeping -------------------------------------------------------------
def fake_checkpoint(tmp: Path, step: int) -> Path:
    d = tmp / f"src{step}"
    d.mkdir()
    (d / "model.pt").write_bytes(b"m" * step)
    (d / "train_state.pt").write_bytes(b"s")
    (d / "train_state.json").write_text(json.dumps({"step": step}))
    return d


def test_in_process_record_keeps_the_newest_and_sweeping_removes_unlisted_dirs(tmp_path):
    store = str(tmp_path / "store")
    assert in_process.record(store, "r") == [] and latest_checkpoint(store, "r") is None
    for step in (2, 4, 6):
        where = in_process.persist(
            fake_checkpoint(tmp_path, step),
            store,
            "r",
            f"checkpoint_{step:08d}",
            {"step": step, "epoch": step // 3},
            keep=2,
        )
        assert where == str((tmp_path / "store" / "r" / f"checkpoint_{step:08d}").resolve())
    run = tmp_path / "store" / "r"
    assert sorted(p.name for p in run.glob("checkpoint_*")) == ["checkpoint_00000004", "checkpoint_00000006"]
    assert [(c.step, c.source, c.state["epoch"]) for c in list_checkpoints(store, "r")] == [
        (4, "in_process", 1),
        (6, "in_process", 2),
    ]
    assert (run / "checkpoint_00000006" / "model.pt").read_bytes() == b"m" * 6
    # a copy cut short and a directory nobody recorded: swept; the recorded ones stay
    (run / "checkpoint_00000008").mkdir()
    (run / "checkpoint_00000008" / "model.pt").write_bytes(b"partial")
    (run / "checkpoint_00000001").mkdir()
    (run / "notes").mkdir()
    assert sweep_unrecorded(store, "r") == ["checkpoint_00000001", "checkpoint_00000008"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == [
        "checkpoint_00000004",
        "checkpoint_00000006",
        "notes",
    ]
    assert sweep_unrecorded(store, "r") == [] and sweep_unrecorded(store, "no-such-run") == []
    assert in_process.clear(store, "r", before_step=6) == ["checkpoint_00000004"]
    assert [c.step for c in in_process.record(store, "r")] == [6]
    (run / in_process.INDEX).write_text("{not json")
    with pytest.raises(OSError, match="cannot read the in-process checkpoint index .*in_process_checkpoints.json"):
        in_process.record(store, "r")


def test_step_of_checkpoint_names():
    assert step_of("s3://b/x/checkpoint_00000012") == 12 and step_of("/a/checkpoint_00000003/") == 3
    assert step_of("checkpoint_2024-01-01_00-00") == -1 and step_of("/a/other") == -1


# -- storage locations ----------------------------------------------------------------------------------
def test_uri_helpers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert uri.is_local("work/store") and uri.is_local("file:///data") and not uri.is_local("s3://b/p")
    assert uri.local_path("work/store") == tmp_path / "work" / "store"
    assert uri.local_path("file:///data/x") == Path("/data/x")
    with pytest.raises(ValueError, match="not a local path"):
        uri.local_path("gs://bucket/x")
    assert uri.join("work", "a", "b") == str(tmp_path / "work" / "a" / "b")
    assert uri.join("s3://bucket/store/", "_train", "run") == "s3://bucket/store/_train/run"
    assert (
        uri.join("s3://bucket/store?endpoint_override=localhost:9000", "a/", "/b")
        == "s3://bucket/store/a/b?endpoint_override=localhost:9000"
    )
    fs, path = uri.filesystem("file://" + str(tmp_path))
    assert fs.type_name == "local" and path == str(tmp_path)

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a")
    (src / "sub" / "b.txt").write_text("b")
    (src / "marker.json").write_text("{}")
    dest = "file://" + str(tmp_path / "remote" / "ckpt")
    (tmp_path / "remote" / "ckpt").mkdir(parents=True)
    (tmp_path / "remote" / "ckpt" / "stale").write_text("old")
    uri.copy_dir_from_local(src, dest, last="marker.json")
    got = sorted(str(p.relative_to(tmp_path / "remote" / "ckpt")) for p in (tmp_path / "remote" / "ckpt").rglob("*"))
    assert got == ["a.bin", "marker.json", "sub", "sub/b.txt"]  # replaced, not merged
    back = uri.copy_dir_to_local(dest, tmp_path / "back")
    assert (back / "sub" / "b.txt").read_text() == "b" and (back / "a.bin").read_bytes() == b"a"
    with pytest.raises(FileNotFoundError, match="no directory at"):
        uri.copy_dir_to_local(str(tmp_path / "missing"), tmp_path / "x")
