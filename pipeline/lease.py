"""Leases: who is computing an artifact right now (:meth:`Leases.lease`), so that two
invocations that need the same key (sweep trials, two users on one store) compute it once.

A lease is a JSON file ``<store root>/.leases/<stage>-<key>.json`` naming its holder (host, pid)
and refreshed every few seconds (:class:`Lease`); a lease whose holder process is gone (same
host) or whose heartbeat is older than the store's ``lease_ttl`` is broken, so a killed holder
blocks no one for long. On a local (or NFS) store the lease is an exclusively created file; on an
object store it is written and read back (best effort: object stores as reached through pyarrow
offer no create-if-absent).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

#: The store's folder of lease files.
LEASES = ".leases"


@dataclasses.dataclass
class LeaseInfo:
    """Who holds a lease: ``owner`` (a random id per acquisition), ``host``, ``pid``,
    ``pid_start`` (process start time, so a recycled pid is not mistaken for the holder),
    ``started`` and ``heartbeat`` (epoch seconds)."""

    owner: str
    host: str
    pid: int
    pid_start: float
    started: float
    heartbeat: float

    @staticmethod
    def mine(owner: str) -> LeaseInfo:
        import psutil

        now = time.time()
        return LeaseInfo(owner, socket.gethostname(), os.getpid(), psutil.Process().create_time(), now, now)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, since {time.strftime('%H:%M:%S', time.localtime(self.started))}"


def holder_alive(info: LeaseInfo, ttl: float, now: float | None = None) -> bool:
    """Whether a lease's holder may still be working: its heartbeat is younger than ``ttl``
    seconds and, on this host, its process (same pid and start time) exists."""
    now = time.time() if now is None else now
    if now - info.heartbeat > ttl:
        return False
    if info.host == socket.gethostname():
        import psutil

        try:
            return abs(psutil.Process(info.pid).create_time() - info.pid_start) < 1.0
        except psutil.NoSuchProcess:
            return False
    return True


class Lease:
    """A held lease (context manager); refreshes its heartbeat until released."""

    def __init__(self, store: Leases, path: str, info: LeaseInfo, heartbeat_s: float):
        self.store, self.path, self.info = store, path, info
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True, name="lease-heartbeat")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            cur = self.store._read_lease(self.path)
            if cur is None or cur.owner != self.info.owner:
                self.lost = True
                return
            self.info.heartbeat = time.time()
            with contextlib.suppress(OSError):
                self.store._write_lease(self.path, self.info, replace=True)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        self._thread.join(5)
        cur = self.store._read_lease(self.path)
        if cur is not None and cur.owner == self.info.owner:
            with contextlib.suppress(OSError):
                self.store.fs.delete_file(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class Leases:
    """The lease files of an artifact store (a base class of ``pipeline.store.ArtifactStore``).

    Needs of the store: ``fs`` (a pyarrow filesystem), ``base`` (its root on ``fs``), ``local``
    (a local path: exclusive file creation works), ``lease_ttl`` (seconds without a heartbeat
    after which a lease is abandoned) and ``exists(stage, key)`` (whether the artifact is
    published).
    """

    fs: pafs.FileSystem
    base: str
    local: bool
    lease_ttl: float

    def exists(self, stage: str, key: str) -> bool:  # pragma: no cover - the store's
        raise NotImplementedError

    def _lease_path(self, stage: str, key: str) -> str:
        return f"{self.base}/{LEASES}/{stage}-{key}.json"

    def _read_lease(self, path: str) -> LeaseInfo | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return LeaseInfo(**json.loads(f.read().decode()))
        except (FileNotFoundError, ValueError, TypeError):
            return None
        except OSError:
            return None

    def _write_lease(self, path: str, info: LeaseInfo, replace: bool = False) -> bool:
        """Write a lease; without ``replace`` only if none exists. Returns whether it did."""
        data = json.dumps(dataclasses.asdict(info)).encode()
        if self.local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            if replace:
                tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:6]}")
                tmp.write_bytes(data)
                os.replace(tmp, p)
                return True
            # written whole to a private name, then linked into place: the lease is never seen
            # half-written, and os.link fails if another holder's lease is there (atomic on NFS too)
            tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:6]}")
            tmp.write_bytes(data)
            try:
                os.link(tmp, p)
            except FileExistsError:
                return False
            finally:
                tmp.unlink(missing_ok=True)
            return True
        if not replace and self.fs.get_file_info(path).type == pafs.FileType.File:
            return False
        with self.fs.open_output_stream(path) as f:
            f.write(data)
        if not replace:  # object stores: last writer wins; read back after a moment to settle races
            time.sleep(0.5)
            cur = self._read_lease(path)
            return cur is not None and cur.owner == info.owner
        return True

    def _break_lease(self, path: str, stale: LeaseInfo | None) -> None:
        """Remove an abandoned lease (only if it is still the one judged stale)."""
        if self.local:
            p = Path(path)
            grave = p.with_name(f".broken-{p.name}.{uuid.uuid4().hex[:6]}")
            try:
                p.rename(grave)  # atomic: of several breakers one takes it
            except FileNotFoundError:
                return
            taken = self._read_lease(str(grave))
            if taken is not None and stale is not None and taken.owner != stale.owner:
                # another breaker replaced the stale lease with its own meanwhile: put it back
                with contextlib.suppress(FileExistsError):
                    os.link(grave, p)
            grave.unlink(missing_ok=True)
            return
        cur = self._read_lease(path)
        if stale is None or (cur is not None and cur.owner == stale.owner):
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(path)

    def lease(
        self,
        stage: str,
        key: str,
        *,
        replace: bool = False,
        on_wait: Callable[[LeaseInfo], None] | None = None,
        poll: float = 1.0,
        heartbeat: float = 5.0,
    ) -> Lease | None:
        """Acquire the right to compute ``stage/key``, waiting while a live holder computes it.

        Args:
            replace: the caller means to replace an existing artifact (``--force``, or one that
                failed verification): acquire even if a manifest exists.
            on_wait: called once with the holder when this call starts waiting for another one.

        Returns:
            a :class:`Lease` (release it when the artifact is published or the attempt failed),
            or None when the artifact was published meanwhile (read it instead).
        """
        path = self._lease_path(stage, key)
        owner = uuid.uuid4().hex
        told = None
        while True:
            if not replace and self.exists(stage, key):
                return None
            info = LeaseInfo.mine(owner)
            if self._write_lease(path, info):
                if not replace and self.exists(stage, key):  # published between our check and the lease
                    Lease(self, path, info, heartbeat).release()
                    return None
                return Lease(self, path, info, heartbeat)
            cur = self._read_lease(path)
            if cur is None:
                info_ = self.fs.get_file_info(path)
                if info_.type == pafs.FileType.File and time.time() - info_.mtime.timestamp() > self.lease_ttl:
                    self._break_lease(path, None)  # unreadable for longer than a heartbeat: abandoned
                time.sleep(min(poll, 0.2))  # released meanwhile, or being written
                continue
            if not holder_alive(cur, self.lease_ttl):
                self._break_lease(path, cur)
                continue
            if on_wait is not None and told != cur.owner:
                on_wait(cur)
                told = cur.owner
            time.sleep(poll)

    def leases(self) -> list[tuple[str, LeaseInfo]]:
        """``(lease file, holder)`` of every lease present."""
        out = []
        for i in self.fs.get_file_info(pafs.FileSelector(f"{self.base}/{LEASES}", allow_not_found=True)):
            if i.type == pafs.FileType.File and i.base_name.endswith(".json") and not i.base_name.startswith("."):
                info = self._read_lease(i.path)
                if info is not None:
                    out.append((i.path, info))
        return out


__all__ = ["LEASES", "Lease", "LeaseInfo", "Leases", "holder_alive"]
