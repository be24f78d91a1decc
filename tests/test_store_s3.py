"""The ``s3://`` store through pyarrow's real S3 client, against a local S3 server (moto).

No bucket can be reached from CI, so a moto server on localhost speaks the S3 protocol; pyarrow
finds it through ``AWS_ENDPOINT_URL`` exactly as it would find MinIO or any S3-compatible store.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.store import ArtifactStore, CorruptArtifact

REPO = Path(__file__).resolve().parent.parent
KEY = "b" * 64
BUCKET = "zeroseg-test"


@pytest.fixture(scope="module")
def s3_env():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True).create_dir(
            BUCKET
        )
        yield env
    server.stop()


def _staged(store, text):
    d = store.staging_dir("stage_x", KEY)
    (d / "sub").mkdir()
    (d / "sub" / "f.txt").write_text(text)
    return d


def test_s3_publish_get_and_tamper_detection(s3_env, tmp_path):
    root = f"s3://{BUCKET}/unit"
    store = ArtifactStore(root, tmp_path / "cache")
    assert not store.local and not store.exists("stage_x", KEY)
    art = store.publish("stage_x", KEY, _staged(store, "hello"), {"metrics": {"m": 2.0}})
    assert art.uri == f"{root}/stage_x/{KEY}"
    fs, base = pafs.FileSystem.from_uri(root)
    assert fs.get_file_info(f"{base}/stage_x/{KEY}/manifest.json").type == pafs.FileType.File

    got = ArtifactStore(root, tmp_path / "cache2").get("stage_x", KEY)  # downloads into its cache
    assert got.path.is_relative_to(tmp_path / "cache2")
    assert got.file("sub/f.txt").read_text() == "hello" and got.manifest["metrics"] == {"m": 2.0}

    with fs.open_output_stream(f"{base}/stage_x/{KEY}/sub/f.txt") as f:
        f.write(b"HELLO")  # same size, other bytes, written behind the store's back
    tampered = ArtifactStore(root, tmp_path / "cache3").get("stage_x", KEY)  # sizes agree: listed as done
    with pytest.raises(CorruptArtifact, match="sha256"):
        tampered.file("sub/f.txt")  # its bytes are checked when fetched
    assert not (tmp_path / "cache3" / "stage_x" / KEY / "sub" / "f.txt").exists()  # and not kept
    with fs.open_output_stream(f"{base}/stage_x/{KEY}/sub/f.txt") as f:
        f.write(b"HELLO, longer")
    with pytest.raises(CorruptArtifact, match="bytes"):  # a size the listing shows: caught at once
        ArtifactStore(root, tmp_path / "cache4").get("stage_x", KEY)


def test_sample_pipeline_with_an_s3_store(s3_env, shared_data, tmp_path):
    """`--store s3://...`: every stage publishes to S3, labels are read back from S3 by Ray Data
    workers, and a re-run finds everything cached there."""
    store = f"s3://{BUCKET}/pipeline"
    cmd = [
        sys.executable,
        "pipeline/run.py",
        "--config",
        "configs/sample.yaml",
        "--work-dir",
        str(tmp_path),
        "--store",
        store,
        "--set",
        "build_splits.train.max_images=8",
        "--set",
        "build_splits.eval.0.max_images=2",
        "--set",
        "evaluate.batch_size=2",
    ]
    env = {**os.environ, **s3_env, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    # build_splits first; then, with an empty local cache, the rest: evaluate's workers must read
    # the label PNGs from the bucket, and the driver fetches only what it reads itself
    first = subprocess.run(
        [*cmd, "--stages", "build_splits"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    shutil.rmtree(tmp_path / "cache")
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    fs, base = pafs.FileSystem.from_uri(store)
    manifests = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    stages = {Path(i.path).parent.parent.name for i in manifests if i.base_name == "manifest.json"}
    assert stages == {"build_splits", "embed_text", "train_classifier", "evaluate"}
    [bs] = [i.path for i in manifests if i.base_name == "manifest.json" and "/build_splits/" in i.path]
    train = fs.open_input_file(str(Path(bs).parent / "manifests" / "train.parquet"))
    import pyarrow.parquet as pq

    labels = pq.read_table(train).column("label").to_pylist()
    assert labels and all(u.startswith("labels/train/") for u in labels)  # relative: no store path inside
    # the driver fetched what it reads (manifests, classes.json), not the label PNGs: the Ray Data
    # workers read those from the bucket
    cached = {p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert any(c.endswith("manifests/val.parquet") for c in cached)  # evaluate read it on the driver
    assert not any("/labels/" in c for c in cached if c.startswith("build_splits/"))
    [ev] = [i.path for i in manifests if i.base_name == "manifest.json" and "/evaluate/" in i.path]
    with fs.open_input_stream(str(Path(ev).parent / "metrics.json")) as f:
        assert "val" in json.loads(f.read())
    assert not (tmp_path / "store").exists()  # nothing went to the local default store

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count(" cached (") == 4 and "running" not in again.stdout
    assert again.stderr == ""  # library output goes to the invocation's log file
