"""Content-addressed artifact store on a local path or an ``s3://`` / ``gs://`` URI.

Layout: ``<root>/<stage>/<key>/`` holds a stage's files; ``manifest.json`` is written last and
atomically (temp file + rename locally; a single object PUT on object stores). A stage is done
exactly when its manifest exists and every file it lists has the recorded size (and sha256,
with ``verify="sha256"``). Remote artifacts are downloaded to a local cache before use.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline.dag import Artifact
from zeroseg.errors import ConfigError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class CorruptArtifact(RuntimeError):
    """A manifest exists but a listed file is missing or differs."""


class ArtifactStore:
    """Artifact store rooted at a local path or a pyarrow.fs URI.

    Args:
        root: local directory or ``s3://bucket/prefix`` / ``gs://bucket/prefix``.
        cache_dir: local directory for verified copies of remote artifacts.
        verify: ``"sha256"`` (default) or ``"size"`` (for very large stores).

    Raises:
        ConfigError: the root cannot be created or written, naming it and how to fix it.
    """

    def __init__(self, root: str, cache_dir: str | os.PathLike, verify: str = "sha256"):
        self.root_uri = root
        self.verify = verify
        self.cache_dir = Path(cache_dir)
        if "://" in root:
            self.fs, self.base = pafs.FileSystem.from_uri(root)
            self.local = False
        else:
            self.fs, self.base = pafs.LocalFileSystem(), str(Path(root).resolve())
            self.local = True
        self._check_writable()

    # -- paths -----------------------------------------------------------------------------
    def _dir(self, stage: str, key: str) -> str:
        return f"{self.base}/{stage}/{key}"

    def uri(self, stage: str, key: str) -> str:
        """Where an artifact lives, as a user would type it."""
        if self.local:
            return self._dir(stage, key)
        return f"{self.root_uri.rstrip('/')}/{stage}/{key}"

    def train_storage(self) -> str:
        """``RunConfig.storage_path`` for Ray Train checkpoints (beside the artifacts)."""
        return f"{self.base}/_train" if self.local else f"{self.root_uri.rstrip('/')}/_train"

    def _check_writable(self) -> None:
        probe = f"{self.base}/.write-test-{uuid.uuid4().hex[:8]}"
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as e:  # pyarrow raises OSError/PermissionError/ArrowException
            raise ConfigError(
                f"artifact store {self.root_uri!r} is not writable ({type(e).__name__}: {e}); "
                "pass a writable directory or bucket with --store or run.store"
            ) from None

    # -- reading ---------------------------------------------------------------------------
    def exists(self, stage: str, key: str) -> bool:
        """Whether a manifest exists (cheap; does not verify)."""
        info = self.fs.get_file_info(f"{self._dir(stage, key)}/{MANIFEST}")
        return info.type == pafs.FileType.File

    def read_manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        path = f"{self._dir(stage, key)}/{MANIFEST}"
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())

    def get(self, stage: str, key: str) -> Artifact | None:
        """The verified artifact, or None when not done.

        Raises:
            CorruptArtifact: the manifest exists but a file is missing or its size/sha256
                differs (the caller re-runs the stage).
        """
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            return None
        if self.local:
            path = Path(self._dir(stage, key))
        else:
            path = self.cache_dir / stage / key
            if not (path / MANIFEST).exists():
                tmp = path.with_name(f".{key}.{uuid.uuid4().hex[:6]}")
                tmp.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(self._dir(stage, key), str(tmp), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
                if path.exists():
                    shutil.rmtree(path)
                tmp.rename(path)
        self._verify(stage, key, path, manifest)
        return Artifact(stage=stage, key=key, path=path, uri=self.uri(stage, key), manifest=manifest)

    def _verify(self, stage: str, key: str, path: Path, manifest: dict[str, Any]) -> None:
        if manifest.get("key") != key:
            raise CorruptArtifact(f"{stage}/{key[:12]}: manifest key {manifest.get('key')!r} != directory")
        for f in manifest.get("files", []):
            p = path / f["path"]
            if not p.is_file():
                raise CorruptArtifact(f"{stage}/{key[:12]}: listed file {f['path']} is missing")
            if p.stat().st_size != f["size"]:
                raise CorruptArtifact(
                    f"{stage}/{key[:12]}: {f['path']} has {p.stat().st_size} bytes, manifest says {f['size']}"
                )
            if self.verify == "sha256" and sha256_file(p) != f["sha256"]:
                raise CorruptArtifact(f"{stage}/{key[:12]}: {f['path']} sha256 differs from the manifest")

    # -- writing ---------------------------------------------------------------------------
    def staging_dir(self, stage: str, key: str) -> Path:
        """A fresh local directory for a stage to write into."""
        if self.local:
            d = Path(self.base) / ".staging" / f"{stage}-{key[:16]}-{uuid.uuid4().hex[:6]}"
        else:
            d = self.cache_dir / ".staging" / f"{stage}-{key[:16]}-{uuid.uuid4().hex[:6]}"
        d.mkdir(parents=True)
        return d

    def publish(self, stage: str, key: str, staging: Path, record: dict[str, Any]) -> Artifact:
        """Move a finished stage's files into place and write the manifest last.

        Args:
            staging: the directory the stage wrote into (consumed).
            record: manifest fields besides ``key`` and ``files`` (inputs, config, metrics, ...).
        """
        files = []
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(staging).as_posix()
                if rel == MANIFEST:
                    raise RuntimeError(f"stage {stage} wrote {MANIFEST}, a reserved name")
                files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
        manifest = {"key": key, "stage": stage, **record, "files": files, "published_at": time.time()}
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        dest = self._dir(stage, key)
        if self.local:
            dpath = Path(dest)
            if dpath.exists():  # an earlier, unfinished or forced attempt
                shutil.rmtree(dpath)
            dpath.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(dpath)
            tmp = dpath / f".{MANIFEST}.{uuid.uuid4().hex[:6]}"
            tmp.write_bytes(data)
            os.replace(tmp, dpath / MANIFEST)
            path = dpath
        else:
            if self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
                self.fs.delete_dir(dest)
            self.fs.create_dir(dest, recursive=True)
            pafs.copy_files(str(staging), dest, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
            with self.fs.open_output_stream(f"{dest}/{MANIFEST}") as f:
                f.write(data)
            (staging / MANIFEST).write_bytes(data)
            path = self.cache_dir / stage / key
            if path.exists():
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(path)
        return Artifact(stage=stage, key=key, path=path, uri=self.uri(stage, key), manifest=manifest)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)
