"""``zeroseg gc``: find (and remove) what no kept run references.

An artifact is *referenced* when an MLflow run of the tracking store that is not deleted carries
its key (every stage run does, ``tags.artifact_key``, cached ones included), or when it is a node
of a config given with ``--keep`` (the config the command is run with always counts). So deleting
runs in the MLflow UI and then running ``gc --delete`` frees their artifacts, and a config one
still works with never loses its cache.

Besides unreferenced artifacts, ``gc`` lists Ray Train checkpoint directories of unreferenced keys,
leases whose holder is gone, and staging directories of attempts that died (no live lease).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import pyarrow.fs as pafs

from pipeline.store import LEASES, STAGING, TRAIN, ArtifactStore, holder_alive


@dataclasses.dataclass
class Item:
    """One thing ``gc`` lists: ``kind`` (artifact, checkpoints, lease, staging), stage, key,
    bytes, a note, and the path to delete."""

    kind: str
    stage: str
    key: str
    bytes: int
    note: str
    path: str


@dataclasses.dataclass
class Report:
    """What ``gc`` found: the items, their total bytes and how many artifacts are kept."""

    items: list[Item]
    bytes: int
    kept: int


def referenced_keys(plans: Sequence[Any], tracking_uri: str | None) -> tuple[set[str], str]:
    """Keys referenced by the plans' nodes and by every non-deleted MLflow run of the tracking
    store (any experiment). Returns ``(keys, description of the sources)``."""
    keys = {n.key for p in plans for n in p}
    sources = [f"{len(plans)} config(s)"]
    if tracking_uri:
        import mlflow

        client = mlflow.tracking.MlflowClient(tracking_uri)
        exps = client.search_experiments()
        n = 0
        for exp in exps:
            token = None
            while True:
                page = client.search_runs(
                    [exp.experiment_id], filter_string="tags.artifact_key != ''", max_results=1000, page_token=token
                )
                for r in page:
                    keys.add(r.data.tags["artifact_key"])
                    n += 1
                token = page.token
                if not token:
                    break
        sources.append(f"{n} MLflow stage run(s)")
    return keys, ", ".join(sources)


def _size(store: ArtifactStore, path: str) -> int:
    infos = store.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def collect(store: ArtifactStore, referenced: set[str], *, delete: bool = False, grace: float = 600.0) -> Report:
    """List (and with ``delete`` remove) unreferenced artifacts and checkpoints, dead leases and
    abandoned staging directories of ``store``.

    Args:
        referenced: keys to keep (:func:`referenced_keys`).
        grace: seconds: anything younger, and any key a live lease holds (an invocation at work),
            is kept whatever references it (its MLflow run may not be written yet).
    """
    items: list[Item] = []
    kept = 0
    now = time.time()
    live: set[str] = set()
    for path, holder in store.leases():
        name = path.rsplit("/", 1)[1][: -len(".json")]
        stage, _, key = name.rpartition("-")
        if holder_alive(holder, store.lease_ttl):
            live.add(key)
        else:
            items.append(Item("lease", stage, key, 0, f"held by {holder.describe()}, gone", path))
    keep = referenced | live
    for stage, key, info in store.artifacts():
        if key in keep or now - info.mtime.timestamp() < grace:
            kept += 1
            continue
        items.append(Item("artifact", stage, key, store.size(stage, key), "no run references it", f"{stage}/{key}"))
    prefixes = {k[:16] for k in keep}
    for i in store.fs.get_file_info(pafs.FileSelector(f"{store.base}/{TRAIN}", allow_not_found=True)):
        if i.type != pafs.FileType.Directory or now - i.mtime.timestamp() < grace:
            continue
        stage, _, k16 = i.base_name.rpartition("-")
        if k16 not in prefixes:
            items.append(Item("checkpoints", stage, k16, _size(store, i.path), "Ray Train checkpoints", i.path))
    if store.local:
        for i in store.fs.get_file_info(pafs.FileSelector(f"{store.base}/{STAGING}", allow_not_found=True)):
            parts = i.base_name.rsplit("-", 2)
            if len(parts) == 3 and now - i.mtime.timestamp() >= grace and not any(k.startswith(parts[1]) for k in live):
                items.append(Item("staging", parts[0], parts[1], _size(store, i.path), "an attempt that died", i.path))
    if delete:
        for it in items:
            if it.kind == "artifact":
                store.delete(it.stage, it.key)
            elif it.kind == "lease":
                store._break_lease(it.path, store._read_lease(it.path))  # only if it is still the dead one
            else:
                with contextlib.suppress(FileNotFoundError):
                    store.fs.delete_dir(it.path)
    return Report(items, sum(i.bytes for i in items), kept)


__all__ = ["Item", "LEASES", "Report", "collect", "referenced_keys"]
