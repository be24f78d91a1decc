"""Content-addressed artifact store on a local path or an ``s3://`` / ``gs://`` URI.

Layout::

    <root>/<stage>/<key>/...             a stage's files
    <root>/<stage>/<key>/manifest.json   written last: the artifact exists exactly when it does
    <root>/_train/<stage>-<key16>/       Ray Train checkpoints of a training stage
    <root>/.leases/<stage>-<key>.json    who is computing an artifact right now
    <root>/.staging/                     local stores: stage outputs being written

A stage is done exactly when its manifest exists and every file it lists has the recorded size
(and sha256, with ``verify="sha256"``). Publishing writes the files first and the manifest last
(a local rename of the staging directory, then an atomic manifest rename; on an object store
every file is uploaded before the single manifest PUT), so an interrupted publish leaves no
manifest and the next attempt starts over. Remote artifacts are downloaded to a local cache
before use.

Concurrency: two invocations that need the same key (sweep trials, two users on one store) take
a *lease* first (:meth:`ArtifactStore.lease`, :mod:`pipeline.lease`): one computes, the others
wait and then read its artifact. A lease names its holder (host, pid) and is refreshed every few seconds; a lease whose
holder process is gone (same host) or whose heartbeat is older than ``lease_ttl`` is broken, so a
killed holder blocks no one for long. On a local (or NFS) store the lease is an exclusively
created file; on an object store it is written and read back (best effort: object stores as
reached through pyarrow offer no create-if-absent).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from pipeline import uri as uri_
from pipeline.dag import Artifact
from pipeline.errors import PipelineError, StoreError
from pipeline.lease import LEASES, Lease, LeaseInfo, Leases, holder_alive

MANIFEST = "manifest.json"
STAGING = ".staging"
TRAIN = "_train"
#: Seconds a remote store may take to answer the first request before it is called unreachable.
PROBE_TIMEOUT = 20.0


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


class CorruptArtifact(PipelineError, RuntimeError):
    """A manifest exists but a listed file is missing or differs (re-run the stage with --force)."""


# =============================================================================================
# opening a store: fail fast and clearly
# =============================================================================================
def _probe(fs: pafs.FileSystem, base: str, local: bool, uri: str, timeout: float) -> None:
    """Create ``base`` and write + delete a probe file, within ``timeout`` seconds.

    Raises:
        StoreError: the store cannot be written or does not answer in time, naming it and what
            is missing.
    """
    result: dict[str, BaseException | None] = {}

    def work() -> None:
        probe = f"{base}/.write-test-{uuid.uuid4().hex[:8]}"
        try:
            fs.create_dir(base, recursive=True)
            with fs.open_output_stream(probe) as f:
                f.write(b"ok")
            fs.delete_file(probe)
            result["e"] = None
        except BaseException as e:  # noqa: BLE001 - pyarrow raises OSError/PermissionError/ArrowException
            result["e"] = e

    t = threading.Thread(target=work, daemon=True, name="store-probe")
    t.start()
    t.join(timeout)
    if "e" not in result:
        raise StoreError(
            f"artifact store {uri!r} did not answer within {timeout:.0f} s; {uri_.missing_credentials_hint(uri)}"
        )
    e = result["e"]
    if e is not None:
        if local:
            raise StoreError(
                f"artifact store {uri!r} is not writable ({type(e).__name__}: {e}); pass a writable "
                "directory with --store or run.store"
            )
        first = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise StoreError(f"artifact store {uri!r} cannot be used ({first}); {uri_.missing_credentials_hint(uri)}")


# =============================================================================================
# the store
# =============================================================================================
class ArtifactStore(Leases):
    """Artifact store rooted at a local path or a pyarrow.fs URI.

    Args:
        root: local directory or ``s3://bucket/prefix`` / ``gs://bucket/prefix``.
        cache_dir: local directory for verified copies of remote artifacts.
        verify: ``"sha256"`` (default) or ``"size"`` (for very large stores).
        lease_ttl: seconds without a heartbeat after which a lease counts as abandoned.
        probe_timeout: seconds a remote store may take to answer the first write.
        filesystem: ``(pyarrow filesystem, base path)`` to use instead of opening ``root``; the
            store then behaves as an object store (files uploaded, manifest last, a local cache).

    ``file://<path>`` is a local path that every node of a cluster mounts (shared storage); a
    plain path is this machine's.

    Raises:
        StoreError: the root cannot be created or written, or a remote store does not answer
            within ``probe_timeout`` seconds (naming the store and the credentials that are
            missing).
    """

    def __init__(
        self,
        root: str,
        cache_dir: str | os.PathLike,
        verify: str = "sha256",
        *,
        lease_ttl: float = 60.0,
        probe_timeout: float = PROBE_TIMEOUT,
        filesystem: tuple[pafs.FileSystem, str] | None = None,
    ):
        self.root_uri = root
        self.verify = verify
        self.cache_dir = Path(cache_dir)
        self.lease_ttl = lease_ttl
        self.local = filesystem is None and ("://" not in root or root.startswith("file://"))
        try:
            if filesystem is not None:
                self.fs, self.base = filesystem[0], filesystem[1].rstrip("/")
            elif self.local:
                self.fs, self.base = pafs.LocalFileSystem(), str(Path(root.removeprefix("file://")).resolve())
            else:
                self.fs, self.base = uri_.filesystem(root)
        except (OSError, ValueError) as e:
            raise StoreError(
                f"artifact store {root!r} cannot be opened ({e}); {uri_.missing_credentials_hint(root)}"
            ) from None
        _probe(self.fs, self.base, self.local, root, probe_timeout)

    # -- paths -----------------------------------------------------------------------------
    def _dir(self, stage: str, key: str) -> str:
        return f"{self.base}/{stage}/{key}"

    def uri(self, stage: str, key: str) -> str:
        """Where an artifact lives, as a user would type it (a ``?query`` of the store kept last)."""
        if self.local:
            return self._dir(stage, key)
        return uri_.join(self.root_uri, stage, key)

    def train_storage(self) -> str:
        """``RunConfig.storage_path`` for Ray Train checkpoints (beside the artifacts)."""
        return f"{self.base}/{TRAIN}" if self.local else uri_.join(self.root_uri, TRAIN)

    # -- reading ---------------------------------------------------------------------------
    def exists(self, stage: str, key: str) -> bool:
        """Whether a manifest exists (cheap; does not verify)."""
        return self.fs.get_file_info(f"{self._dir(stage, key)}/{MANIFEST}").type == pafs.FileType.File

    def read_manifest(self, stage: str, key: str) -> dict[str, Any] | None:
        """The parsed manifest, or None when there is none (or it is unreadable)."""
        path = f"{self._dir(stage, key)}/{MANIFEST}"
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (FileNotFoundError, ValueError):
            return None
        except OSError:
            if self.fs.get_file_info(path).type != pafs.FileType.File:
                return None
            raise

    def get(self, stage: str, key: str) -> Artifact | None:
        """The verified artifact, or None when not done.

        A local artifact is verified whole (sizes, and sha256 with ``verify="sha256"``). A remote
        one is verified by the sizes the store lists; each file is downloaded into the cache on
        first use (:meth:`Artifact.file`) and its sha256 checked then, so a driver never copies
        what only workers read (build_splits' label PNGs).

        Raises:
            CorruptArtifact: the manifest exists but a file is missing or its size/sha256
                differs (the caller re-runs the stage).
        """
        manifest = self.read_manifest(stage, key)
        if manifest is None:
            return None
        if manifest.get("key") != key:
            raise CorruptArtifact(f"{stage}/{key[:12]}: manifest key {manifest.get('key')!r} != directory")
        if self.local:
            path = Path(self._dir(stage, key))
            for f in manifest.get("files", []):
                self._check_file(stage, key, path / f["path"], f)
            return Artifact(stage=stage, key=key, path=path, uri=self.uri(stage, key), manifest=manifest)
        files = manifest.get("files", [])
        infos = self.fs.get_file_info([f"{self._dir(stage, key)}/{f['path']}" for f in files]) if files else []
        for f, info in zip(files, infos):
            if info.type != pafs.FileType.File:
                raise CorruptArtifact(f"{stage}/{key[:12]}: listed file {f['path']} is missing")
            if info.size != f["size"]:
                raise CorruptArtifact(
                    f"{stage}/{key[:12]}: {f['path']} has {info.size} bytes, manifest says {f['size']}"
                )
        path = self.cache_dir / stage / key
        cached = path / MANIFEST
        if cached.exists() and json.loads(cached.read_text()).get("published_at") != manifest.get("published_at"):
            shutil.rmtree(path)  # a re-published artifact: drop the stale copies
        path.mkdir(parents=True, exist_ok=True)
        if not cached.exists():
            tmp = path / f".{MANIFEST}.{uuid.uuid4().hex[:6]}"
            tmp.write_text(json.dumps(manifest))
            os.replace(tmp, cached)
        by_path = {f["path"]: f for f in files}
        return Artifact(
            stage=stage,
            key=key,
            path=path,
            uri=self.uri(stage, key),
            manifest=manifest,
            fetch=lambda rel: self._fetch(stage, key, rel, by_path[rel], path),
        )

    def _fetch(self, stage: str, key: str, rel: str, entry: dict[str, Any], path: Path) -> Path:
        """Download one file of a remote artifact into its cache directory, verified."""
        dest = path / rel
        if dest.is_file() and dest.stat().st_size == entry["size"]:
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:6]}")
        pafs.copy_files(
            f"{self._dir(stage, key)}/{rel}",
            str(tmp),
            source_filesystem=self.fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        try:
            self._check_file(stage, key, tmp, entry)
        except CorruptArtifact:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, dest)
        return dest

    def _check_file(self, stage: str, key: str, p: Path, entry: dict[str, Any]) -> None:
        if not p.is_file():
            raise CorruptArtifact(f"{stage}/{key[:12]}: listed file {entry['path']} is missing")
        if p.stat().st_size != entry["size"]:
            raise CorruptArtifact(
                f"{stage}/{key[:12]}: {entry['path']} has {p.stat().st_size} bytes, manifest says {entry['size']}"
            )
        if self.verify == "sha256" and sha256_file(p) != entry["sha256"]:
            raise CorruptArtifact(f"{stage}/{key[:12]}: {entry['path']} sha256 differs from the manifest")

    def artifacts(self, stage: str | None = None) -> Iterator[tuple[str, str, pafs.FileInfo]]:
        """``(stage, key, manifest file info)`` of every published artifact (of ``stage``)."""
        sel = pafs.FileSelector(self.base, allow_not_found=True)
        stages = (
            [stage]
            if stage
            else [
                i.base_name
                for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.Directory and not i.base_name.startswith((".", "_"))
            ]
        )
        for s in stages:
            dirs = [
                i
                for i in self.fs.get_file_info(pafs.FileSelector(f"{self.base}/{s}", allow_not_found=True))
                if i.type == pafs.FileType.Directory and not i.base_name.startswith(".")
            ]
            infos = self.fs.get_file_info([f"{d.path}/{MANIFEST}" for d in dirs]) if dirs else []
            for d, info in zip(dirs, infos):
                if info.type == pafs.FileType.File:
                    yield s, d.base_name, info

    def latest(self, stage: str) -> dict[str, Any] | None:
        """The manifest of the most recently published artifact of ``stage`` (None: none)."""
        best = max(self.artifacts(stage), key=lambda t: t[2].mtime_ns or 0, default=None)
        return self.read_manifest(stage, best[1]) if best else None

    def size(self, stage: str, key: str) -> int:
        """Bytes under an artifact's directory."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._dir(stage, key), recursive=True, allow_not_found=True))
        return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)

    # -- writing ---------------------------------------------------------------------------
    def staging_dir(self, stage: str, key: str) -> Path:
        """A fresh local directory for a stage to write into (unique per attempt)."""
        parent = Path(self.base) / STAGING if self.local else self.cache_dir / STAGING
        d = parent / f"{stage}-{key[:16]}-{uuid.uuid4().hex[:8]}"
        d.mkdir(parents=True)
        return d

    def publish(self, stage: str, key: str, staging: Path, record: dict[str, Any]) -> Artifact:
        """Move a finished stage's files into place and write the manifest last.

        An existing artifact of the key (a forced re-run) is replaced: its manifest goes first, so
        no reader trusts a half-replaced directory.

        Args:
            staging: the directory the stage wrote into (consumed).
            record: manifest fields besides ``key``, ``stage``, ``files``, ``published_at``.

        Raises:
            RuntimeError: the stage wrote a file named ``manifest.json``.
            OSError: the store failed mid-way (no manifest is written: the artifact stays
                not-done and the next attempt starts over).
        """
        files = []
        for p in sorted(staging.rglob("*")):
            if p.is_file():
                rel = p.relative_to(staging).as_posix()
                if rel == MANIFEST:
                    raise RuntimeError(f"stage {stage} wrote {MANIFEST}, a reserved name")
                files.append({"path": rel, "size": p.stat().st_size, "sha256": sha256_file(p)})
        manifest = {"key": key, "stage": stage, **record, "files": files, "published_at": time.time()}
        data = json.dumps(manifest, indent=2, default=str).encode()  # key order kept (metrics in run order)
        dest = self._dir(stage, key)
        if self.local:
            dpath = Path(dest)
            dpath.parent.mkdir(parents=True, exist_ok=True)
            if dpath.exists():  # a forced re-run, or an earlier attempt cut short before its manifest
                (dpath / MANIFEST).unlink(missing_ok=True)
                trash = dpath.parent / f".replaced-{key[:16]}-{uuid.uuid4().hex[:6]}"
                dpath.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            staging.rename(dpath)
            tmp = dpath / f".{MANIFEST}.{uuid.uuid4().hex[:6]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # on disk before it is named: a crash leaves no empty manifest
            os.replace(tmp, dpath / MANIFEST)
            path = dpath
        else:
            if self.fs.get_file_info(dest).type != pafs.FileType.NotFound:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(f"{dest}/{MANIFEST}")
                self.fs.delete_dir(dest)
            self.fs.create_dir(dest, recursive=True)
            local = pafs.LocalFileSystem()
            for parent in sorted({f["path"].rpartition("/")[0] for f in files} - {""}):
                self.fs.create_dir(f"{dest}/{parent}", recursive=True)  # a no-op on object stores
            for f in files:  # one object each; the manifest after all of them
                pafs.copy_files(
                    str(staging / f["path"]),
                    f"{dest}/{f['path']}",
                    source_filesystem=local,
                    destination_filesystem=self.fs,
                )
            with self.fs.open_output_stream(f"{dest}/{MANIFEST}") as out:
                out.write(data)
            (staging / MANIFEST).write_bytes(data)
            path = self.cache_dir / stage / key
            if path.exists():
                shutil.rmtree(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(path)
        return Artifact(stage=stage, key=key, path=path, uri=self.uri(stage, key), manifest=manifest)

    def discard(self, staging: Path) -> None:
        """Remove a staging directory (a failed attempt)."""
        shutil.rmtree(staging, ignore_errors=True)

    def delete(self, stage: str, key: str) -> None:
        """Remove an artifact (manifest first) and its training checkpoints."""
        dest = self._dir(stage, key)
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(f"{dest}/{MANIFEST}")
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(dest)
        self.delete_checkpoints(stage, key)
        if not self.local:
            shutil.rmtree(self.cache_dir / stage / key, ignore_errors=True)

    def checkpoint_dir(self, stage: str, key: str) -> str:
        """Ray Train ``RunConfig.name`` of a training stage's artifact (under :meth:`train_storage`)."""
        return f"{stage}-{key[:16]}"

    def delete_checkpoints(self, stage: str, key: str) -> None:
        """Remove a training stage's Ray Train checkpoints (no-op when there are none)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(f"{self.base}/{TRAIN}/{self.checkpoint_dir(stage, key)}")


__all__ = [
    "LEASES",
    "MANIFEST",
    "STAGING",
    "TRAIN",
    "ArtifactStore",
    "CorruptArtifact",
    "Lease",
    "LeaseInfo",
    "holder_alive",
    "sha256_file",
]
