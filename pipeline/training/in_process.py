"""The in-process record: checkpoints of ``num_workers=0`` runs, where Ray Train persists nothing.

Ray Train runs the loop in the calling process and ``ray.train.report`` keeps only the last
checkpoint object in memory, so this module stores checkpoints itself, in the layout of a worker
run (``<storage>/<name>/checkpoint_<step:08d>/``), and keeps its own record, as Ray's checkpoint
manager does with its snapshot: ``<storage>/<name>/in_process_checkpoints.json`` lists the
complete checkpoints with their position. A checkpoint's files are copied first and the index is
rewritten after (a single write: a local rename, one object PUT); pruning rewrites the index
before deleting, so the index never names a missing or partial directory.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from pipeline import uri as uri_

from .layout import STATE_JSON, CheckpointInfo, run_dir

INDEX = "in_process_checkpoints.json"


def record(storage_path: str, name: str) -> list[CheckpointInfo]:
    """The in-process checkpoints of run ``name``, oldest first ([] when there is no index).

    Raises:
        OSError: the index exists but cannot be read (named), or the storage cannot be reached.
    """
    import pyarrow.fs as pafs

    fs, path = run_dir(storage_path, name)
    index = f"{path}/{INDEX}"
    try:
        if fs.get_file_info(index).type == pafs.FileType.NotFound:
            return []
        with fs.open_input_stream(index) as f:
            entries = json.loads(f.read().decode())["checkpoints"]
    except (OSError, ValueError, KeyError) as e:
        raise OSError(
            f"cannot read the in-process checkpoint index {uri_.join(storage_path, name, INDEX)} "
            f"({type(e).__name__}: {e})"
        ) from e
    out = [
        CheckpointInfo(
            uri=uri_.join(storage_path, name, e["dir"]),
            step=int(e["state"]["step"]),
            state=dict(e["state"]),
            source="in_process",
        )
        for e in entries
    ]
    return sorted(out, key=lambda c: c.step)


def _write_index(storage_path: str, name: str, entries: list[CheckpointInfo]) -> None:
    fs, path = run_dir(storage_path, name)
    fs.create_dir(path, recursive=True)
    data = json.dumps(
        {"checkpoints": [{"dir": c.dir_name, "state": c.state} for c in entries]}, indent=1, default=str
    ).encode()
    final = f"{path}/{INDEX}"
    if uri_.is_local(storage_path):  # atomic rename
        tmp = f"{path}/.{INDEX}.{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, final)
    else:  # an object store PUT is atomic
        with fs.open_output_stream(final) as f:
            f.write(data)


def persist(src: str | Path, storage_path: str, name: str, dir_name: str, state: dict[str, Any], keep: int) -> str:
    """Store the local checkpoint directory ``src`` as ``<storage>/<name>/<dir_name>``, record it
    and prune the record to the newest ``keep``.

    Args:
        src: a local directory written by ``checkpoint.write_checkpoint``.
        state: what to record with it (``step`` at least).
        keep: checkpoints kept (``TrainSection.keep_checkpoints``).

    Returns:
        The checkpoint's URI.

    Raises:
        OSError: the storage cannot be written.
    """
    dest = uri_.join(storage_path, name, dir_name)
    uri_.copy_dir_from_local(src, dest, last=STATE_JSON)
    entries = [c for c in record(storage_path, name) if c.dir_name != dir_name]
    entries = sorted(
        [*entries, CheckpointInfo(dest, int(state["step"]), dict(state), "in_process")], key=lambda c: c.step
    )
    kept, dropped = entries[-keep:], entries[:-keep]
    _write_index(storage_path, name, kept)
    _delete(storage_path, name, dropped)
    return dest


def clear(storage_path: str, name: str, before_step: int) -> list[str]:
    """Drop the in-process checkpoints older than ``before_step`` (after a run went on with
    workers, whose record then holds the newer ones). Returns the dropped directories' names."""
    entries = record(storage_path, name)
    dropped = [c for c in entries if c.step < before_step]
    if not dropped:
        return []
    _write_index(storage_path, name, [c for c in entries if c.step >= before_step])
    _delete(storage_path, name, dropped)
    return [c.dir_name for c in dropped]


def _delete(storage_path: str, name: str, entries: list[CheckpointInfo]) -> None:
    import pyarrow.fs as pafs

    fs, path = run_dir(storage_path, name)
    for c in entries:
        p = f"{path}/{c.dir_name}"
        if fs.get_file_info(p).type != pafs.FileType.NotFound:
            fs.delete_dir(p)
