"""Artifact store: manifest written last and atomically, verification on read."""

import json
import os

import pytest

from pipeline.store import ArtifactStore, CorruptArtifact
from zeroseg.errors import ConfigError

KEY = "a" * 64


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
        with pytest.raises(ConfigError, match="not writable.*--store"):
            ArtifactStore(target, tmp_path / "cache")
    finally:
        ro.chmod(0o700)


def test_pyarrow_uri_store_downloads_to_cache(tmp_path):
    # file:// goes through pyarrow.fs exactly like s3:// or gs:// (remote code path + local cache)
    root = tmp_path / "remote"
    store = ArtifactStore(f"file://{root}", tmp_path / "cache")
    assert not store.local
    store.publish("stage_x", KEY, _stage_output(store), {})
    fresh = ArtifactStore(f"file://{root}", tmp_path / "cache2")
    art = fresh.get("stage_x", KEY)
    assert art.path.is_relative_to(tmp_path / "cache2")
    assert art.file("sub/f.txt").read_text() == "hello"
    assert art.uri == f"file://{root}/stage_x/{KEY}"
