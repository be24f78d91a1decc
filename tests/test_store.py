"""Artifact store: manifest written last and atomically, verification on read, the object-store
publish order and an interrupted upload, leases between concurrent invocations, gc."""

import json
import os
import threading
import time

import pyarrow.fs as pafs
import pytest

from pipeline.errors import StoreError
from pipeline.store import ArtifactStore, CorruptArtifact, LeaseInfo

KEY = "a" * 64


class RecordingFS(pafs.FileSystemHandler):
    """A local directory seen through pyarrow's ``PyFileSystem``, as an object store would be:
    records every write (``open_output_stream`` path) in order and can fail the N-th write."""

    def __init__(self, root, fail_at=None):
        self.root = str(root)
        self.fs = pafs.SubTreeFileSystem(self.root, pafs.LocalFileSystem())
        self.writes: list[str] = []
        self.fail_at = fail_at

    def get_type_name(self):
        return "recording"

    def equals(self, other):
        return other is self

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.fs.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        if self.fail_at is not None and len(self.writes) + 1 == self.fail_at:
            raise OSError(f"connection reset while uploading {path}")
        self.writes.append(path)
        return self.fs.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


@pytest.fixture
def store(tmp_path):
    """A local store at ``tmp_path/store`` with its cache at ``tmp_path/cache``."""
    return ArtifactStore(str(tmp_path / "store"), tmp_path / "cache")


def _stage_output(store, text="hello"):
    d = store.staging_dir("stage_x", KEY)
    (d / "sub").mkdir()
    (d / "sub" / "f.txt").write_text(text)
    (d / "g.bin").write_bytes(b"\x00\x01")
    return d


def test_publish_then_get_roundtrip(store):
    assert not store.exists("stage_x", KEY) and store.get("stage_x", KEY) is None
    art = store.publish("stage_x", KEY, _stage_output(store), {"metrics": {"m": 1.0}})
    assert store.exists("stage_x", KEY)
    got = store.get("stage_x", KEY)
    assert got.file("sub/f.txt").read_text() == "hello"
    assert {f["path"] for f in got.manifest["files"]} == {"sub/f.txt", "g.bin"}
    assert got.manifest["metrics"] == {"m": 1.0} and art.key == KEY


def test_crash_before_manifest_leaves_stage_not_done(store, tmp_path, monkeypatch):
    staging = _stage_output(store)

    def boom(*a, **k):
        raise OSError("disk full while writing the manifest")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        store.publish("stage_x", KEY, staging, {})
    monkeypatch.undo()
    # files may be in place, but without a manifest the stage is not done
    assert (tmp_path / "store" / "stage_x" / KEY / "sub" / "f.txt").exists()
    assert not store.exists("stage_x", KEY)
    assert store.get("stage_x", KEY) is None
    # a later attempt publishes cleanly over the leftovers
    store.publish("stage_x", KEY, _stage_output(store, "second"), {})
    assert store.get("stage_x", KEY).file("sub/f.txt").read_text() == "second"


def test_tampered_file_fails_verification(store, tmp_path):
    store.publish("stage_x", KEY, _stage_output(store), {})
    f = tmp_path / "store" / "stage_x" / KEY / "sub" / "f.txt"
    f.write_text("HELLO")  # same size, different content
    with pytest.raises(CorruptArtifact, match="sha256"):
        store.get("stage_x", KEY)
    size_only = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", verify="size")
    assert size_only.get("stage_x", KEY) is not None
    f.write_text("longer text")
    with pytest.raises(CorruptArtifact, match="bytes"):
        size_only.get("stage_x", KEY)


def test_manifest_key_mismatch_is_corrupt(store, tmp_path):
    store.publish("stage_x", KEY, _stage_output(store), {})
    m = tmp_path / "store" / "stage_x" / KEY / "manifest.json"
    data = json.loads(m.read_text())
    data["key"] = "b" * 64
    m.write_text(json.dumps(data))
    with pytest.raises(CorruptArtifact, match="manifest key"):
        store.get("stage_x", KEY)


def test_unwritable_store_is_a_clear_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not bind
            target = "/proc/zeroseg-store"
        else:
            target = str(ro / "store")
        with pytest.raises(StoreError, match="not writable.*--store"):
            ArtifactStore(target, tmp_path / "cache")
    finally:
        ro.chmod(0o700)


def _object_store(tmp_path, name="remote", cache="cache", **kw):
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    handler = RecordingFS(root, **kw)
    store = ArtifactStore(f"rec://{name}", tmp_path / cache, filesystem=(pafs.PyFileSystem(handler), "root"))
    return store, handler


def test_object_store_downloads_to_cache(tmp_path):
    store, _ = _object_store(tmp_path)
    assert not store.local
    store.publish("stage_x", KEY, _stage_output(store), {})
    fresh, _ = _object_store(tmp_path, cache="cache2")
    art = fresh.get("stage_x", KEY)
    assert art.path.is_relative_to(tmp_path / "cache2")
    assert art.file("sub/f.txt").read_text() == "hello"
    assert art.uri == f"rec://remote/stage_x/{KEY}"


def test_object_store_publishes_the_manifest_last(tmp_path):
    store, rec = _object_store(tmp_path)
    rec.writes.clear()
    store.publish("stage_x", KEY, _stage_output(store), {})
    prefix = f"root/stage_x/{KEY}/"
    uploads = [w for w in rec.writes if w.startswith(prefix)]
    assert uploads[-1] == prefix + "manifest.json"
    assert sorted(uploads[:-1]) == [prefix + "g.bin", prefix + "sub/f.txt"]


def test_interrupted_upload_leaves_no_artifact_and_the_next_attempt_publishes(tmp_path):
    store, rec = _object_store(tmp_path)
    rec.writes.clear()
    rec.fail_at = 2  # the second file of the artifact: one file uploaded, no manifest
    with pytest.raises(OSError, match="connection reset"):
        store.publish("stage_x", KEY, _stage_output(store), {})
    assert len(rec.writes) == 1 and not rec.writes[0].endswith("manifest.json")
    assert not store.exists("stage_x", KEY) and store.get("stage_x", KEY) is None
    rec.fail_at = None
    store.publish("stage_x", KEY, _stage_output(store, "second"), {})
    fresh, _ = _object_store(tmp_path, cache="cache3")
    assert fresh.get("stage_x", KEY).file("sub/f.txt").read_text() == "second"


def test_a_forced_replacement_drops_the_old_manifest_first(tmp_path):
    store, rec = _object_store(tmp_path)
    store.publish("stage_x", KEY, _stage_output(store, "one"), {})
    rec.fail_at = len(rec.writes) + 1  # the first upload of the replacement fails
    with pytest.raises(OSError):
        store.publish("stage_x", KEY, _stage_output(store, "two"), {})
    assert not store.exists("stage_x", KEY)  # never the old manifest over half-new files


# -- leases ---------------------------------------------------------------------------------
def test_lease_one_computes_the_other_waits_and_reads(store):
    first = store.lease("stage_x", KEY)
    assert first is not None
    waited, got = [], {}

    def second():
        got["lease"] = store.lease("stage_x", KEY, on_wait=waited.append, poll=0.05)

    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert t.is_alive() and len(waited) == 1 and waited[0].pid == os.getpid()
    store.publish("stage_x", KEY, _stage_output(store), {})
    first.release()
    t.join(5)
    assert got["lease"] is None  # published meanwhile: read it instead of computing
    assert not store.leases()


def test_a_lease_of_a_dead_holder_is_broken(store, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = LeaseInfo.mine("someone-else")
    info.pid = int(dead.stdout)
    assert store._write_lease(store._lease_path("stage_x", KEY), info)
    lease = store.lease("stage_x", KEY, poll=0.05)  # does not wait for the dead process
    assert lease is not None and lease.info.pid == os.getpid()
    lease.release()


def test_a_lease_whose_heartbeat_stopped_is_broken(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", lease_ttl=0.5)
    info = LeaseInfo.mine("other-host")
    info.host, info.heartbeat = "another-machine", time.time() - 10
    store._write_lease(store._lease_path("stage_x", KEY), info)
    t0 = time.time()
    lease = store.lease("stage_x", KEY, poll=0.05)
    assert lease is not None and time.time() - t0 < 5
    lease.release()


def test_a_live_lease_is_kept_by_its_heartbeat(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", lease_ttl=1.0)
    lease = store.lease("stage_x", KEY, heartbeat=0.1)
    time.sleep(1.5)  # longer than the ttl: the heartbeat keeps it fresh
    other = ArtifactStore(str(tmp_path / "store"), tmp_path / "cache", lease_ttl=1.0)
    info = other._read_lease(other._lease_path("stage_x", KEY))
    assert info is not None and time.time() - info.heartbeat < 1.0
    lease.release()


def _holder(pid, pid_start, host=None, heartbeat=1000.0):
    import socket

    return LeaseInfo("o", host or socket.gethostname(), pid, pid_start, 900.0, heartbeat)


def test_holder_alive_checks_the_pid_start_time_and_the_heartbeat():
    """The holder is the process with the recorded pid *and* start time (within 1 s), while its
    heartbeat is at most ``ttl`` old; on another host only the heartbeat can be checked."""
    import subprocess
    import sys

    import psutil

    from pipeline.lease import holder_alive

    me, started = os.getpid(), psutil.Process().create_time()
    assert holder_alive(_holder(me, started), ttl=30, now=1010.0)
    # the same pid, another process (a recycled pid): its start time differs
    assert not holder_alive(_holder(me, started - 100.0), ttl=30, now=1010.0)
    assert not holder_alive(_holder(me, started + 1.1), ttl=30, now=1010.0)
    assert holder_alive(_holder(me, started + 0.9), ttl=30, now=1010.0)  # clock rounding: same
    assert holder_alive(_holder(me, started - 0.9), ttl=30, now=1010.0)
    # a dead pid
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True).stdout)
    assert not holder_alive(_holder(dead, started), ttl=30, now=1010.0)
    # the heartbeat: 1000.0 + ttl 30 -> alive up to 1030.0 inclusive
    assert holder_alive(_holder(me, started), ttl=30, now=1030.0)
    assert not holder_alive(_holder(me, started), ttl=30, now=1030.5)
    # another host: the pid means nothing here (dead here, maybe alive there): the heartbeat decides
    assert holder_alive(_holder(dead, 1.0, host="another-machine"), ttl=30, now=1010.0)
    assert not holder_alive(_holder(me, started, host="another-machine"), ttl=30, now=1031.0)


def test_a_lease_of_a_recycled_pid_is_broken(store):
    """A lease naming a live pid whose process started at another time (the holder died and the
    pid was reused, here by this very process) does not make the next invocation wait."""
    info = LeaseInfo.mine("the-dead-holder")
    info.pid_start -= 3600.0  # the holder started an hour before the process now holding its pid
    assert store._write_lease(store._lease_path("stage_x", KEY), info)
    waited = []
    lease = store.lease("stage_x", KEY, poll=0.05, on_wait=waited.append)
    assert lease is not None and lease.info.owner != "the-dead-holder" and not waited
    lease.release()


def test_a_lease_of_a_live_holder_makes_the_next_one_wait_until_it_dies(store):
    import subprocess
    import sys

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = LeaseInfo.mine("a-live-holder")
        info.pid, info.pid_start = proc.pid, psutil.Process(proc.pid).create_time()
        assert store._write_lease(store._lease_path("stage_x", KEY), info)
        waited, got = [], {}
        t = threading.Thread(
            target=lambda: got.update(lease=store.lease("stage_x", KEY, poll=0.05, on_wait=waited.append))
        )
        t.start()
        time.sleep(0.4)
        assert t.is_alive() and [w.pid for w in waited] == [proc.pid]  # waits, told once
    finally:
        proc.kill()
        proc.wait()
    t.join(10)
    assert got["lease"] is not None and got["lease"].info.pid == os.getpid()
    got["lease"].release()


# -- the manifest, listing, paths, deletion ------------------------------------------------
def test_the_manifest_lists_every_file_with_its_size_and_sha256(store, tmp_path):
    import hashlib

    from pipeline.store import sha256_file

    t0 = time.time()
    store.publish("stage_x", KEY, _stage_output(store, "hello"), {"metrics": {"m": 2.0}})
    m = json.loads((tmp_path / "store" / "stage_x" / KEY / "manifest.json").read_text())
    # sorted by path; sizes and digests from hashlib over the bytes written above
    assert m["files"] == [
        {"path": "g.bin", "size": 2, "sha256": hashlib.sha256(b"\x00\x01").hexdigest()},
        {"path": "sub/f.txt", "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
    ]
    assert (
        (m["key"], m["stage"]) == (KEY, "stage_x")
        and m["metrics"] == {"m": 2.0}
        and t0 <= m["published_at"] <= time.time()
    )
    assert store.size("stage_x", KEY) == 2 + 5 + (tmp_path / "store" / "stage_x" / KEY / "manifest.json").stat().st_size
    # sha256_file reads in chunks: a chunk smaller than the file gives the same digest
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 5)
    assert sha256_file(big, chunk=7) == sha256_file(big) == hashlib.sha256(bytes(range(256)) * 5).hexdigest()


def test_a_stage_may_not_write_a_manifest(store):
    d = _stage_output(store)
    (d / "manifest.json").write_text("{}")
    with pytest.raises(RuntimeError, match="reserved"):
        store.publish("stage_x", KEY, d, {})
    assert not store.exists("stage_x", KEY)


def test_artifacts_lists_published_ones_only_and_latest_is_the_newest(store, tmp_path):
    k2, k3 = "b" * 64, "c" * 64
    store.publish("stage_x", KEY, _stage_output(store, "one"), {"n": 1})
    time.sleep(0.02)
    d = store.staging_dir("stage_x", k2)
    (d / "f").write_text("two")
    store.publish("stage_x", k2, d, {"n": 2})
    d = store.staging_dir("stage_y", k3)
    (d / "f").write_text("three")
    store.publish("stage_y", k3, d, {"n": 3})
    (tmp_path / "store" / "stage_x" / ("d" * 64)).mkdir()  # no manifest: not an artifact
    (tmp_path / "store" / "stage_x" / ".hidden").mkdir()
    store.lease("stage_x", "e" * 64).release()  # .leases/ is not a stage
    (tmp_path / "store" / "_train" / "x").mkdir(parents=True)  # nor the checkpoints
    store.staging_dir("stage_z", KEY)  # nor .staging/
    assert sorted((s, k) for s, k, _ in store.artifacts()) == [("stage_x", KEY), ("stage_x", k2), ("stage_y", k3)]
    assert sorted(k for _, k, _ in store.artifacts("stage_x")) == [KEY, k2]
    assert list(store.artifacts("stage_none")) == []
    assert store.latest("stage_x")["n"] == 2 and store.latest("stage_y")["n"] == 3
    assert store.latest("stage_none") is None
    os.utime(tmp_path / "store" / "stage_x" / KEY / "manifest.json", (time.time() + 60, time.time() + 60))
    assert store.latest("stage_x")["n"] == 1  # by the manifest's modification time


def test_paths_of_a_local_store(store, tmp_path):
    root = (tmp_path / "store").resolve()
    assert store.uri("stage_x", KEY) == f"{root}/stage_x/{KEY}"
    assert store.train_storage() == f"{root}/_train"
    assert store.checkpoint_dir("stage_x", KEY) == f"stage_x-{KEY[:16]}"
    d = store.staging_dir("stage_x", KEY)
    assert d.parent == root / ".staging" and d.name.startswith(f"stage_x-{KEY[:16]}-") and d.is_dir()
    assert store.staging_dir("stage_x", KEY) != d  # unique per attempt
    assert ArtifactStore(f"file://{tmp_path / 'store'}", tmp_path / "c").local


def test_delete_removes_the_manifest_the_files_and_the_checkpoints(store, tmp_path):
    store.publish("stage_x", KEY, _stage_output(store), {})
    other = "b" * 64
    ck = tmp_path / "store" / "_train" / store.checkpoint_dir("stage_x", KEY) / "checkpoint_000001"
    ck.mkdir(parents=True)
    keep = tmp_path / "store" / "_train" / store.checkpoint_dir("stage_x", other)
    keep.mkdir(parents=True)
    store.delete("stage_x", KEY)
    assert not store.exists("stage_x", KEY) and not (tmp_path / "store" / "stage_x" / KEY).exists()
    assert not ck.parent.exists() and keep.is_dir()
    store.delete("stage_x", KEY)  # twice: nothing left, no error
    store.delete_checkpoints("stage_x", other)
    assert not keep.exists()


def test_an_unreadable_manifest_is_not_done(store, tmp_path):
    store.publish("stage_x", KEY, _stage_output(store), {})
    (tmp_path / "store" / "stage_x" / KEY / "manifest.json").write_text("{not json")
    assert store.read_manifest("stage_x", KEY) is None and store.get("stage_x", KEY) is None


def test_object_store_checks_sizes_and_digests_and_refreshes_a_republished_copy(tmp_path):
    store, _ = _object_store(tmp_path)
    store.publish("stage_x", KEY, _stage_output(store, "one"), {})
    assert store.staging_dir("stage_x", KEY).parent == tmp_path / "cache" / ".staging"
    assert store.train_storage() == "rec://remote/_train"
    reader, _ = _object_store(tmp_path, cache="rcache")
    assert reader.get("stage_x", KEY).file("sub/f.txt").read_text() == "one"
    # re-published (forced) with new content of the same size: the reader's copy is dropped
    time.sleep(0.01)
    store.publish("stage_x", KEY, _stage_output(store, "two"), {})
    assert reader.get("stage_x", KEY).file("sub/f.txt").read_text() == "two"
    # a remote file whose size differs from the manifest
    remote = tmp_path / "remote" / "root" / "stage_x" / KEY / "sub" / "f.txt"
    remote.write_text("three!")
    with pytest.raises(CorruptArtifact, match="6 bytes, manifest says 3"):
        reader.get("stage_x", KEY)
    # the same size, other bytes: caught when the file is fetched, and not left in the cache
    remote.write_text("six")
    fresh, _ = _object_store(tmp_path, cache="fcache")
    art = fresh.get("stage_x", KEY)
    with pytest.raises(CorruptArtifact, match="sha256"):
        art.file("sub/f.txt")
    assert not (tmp_path / "fcache" / "stage_x" / KEY / "sub" / "f.txt").exists()
    remote.unlink()
    with pytest.raises(CorruptArtifact, match="missing"):
        fresh.get("stage_x", KEY)
    fresh.delete("stage_x", KEY)
    assert not fresh.exists("stage_x", KEY) and not (tmp_path / "fcache" / "stage_x" / KEY).exists()
