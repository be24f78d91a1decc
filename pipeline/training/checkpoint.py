"""Checkpoints: their files, and the records that say which ones exist.

A checkpoint is a directory ``<storage>/<name>/checkpoint_<step:08d>/`` with

* ``model.pt``: the model state the loop registered (``Loop.restore(model_state=...)``'s getter,
  e.g. only a method's trainable weights; by default the unwrapped model's whole state dict);
* ``train_state.pt``: optimiser, scheduler, gradient scaler and extra objects' state dicts and the
  position (step, epoch, micro-batches consumed in it, world size, ...);
* ``train_state.json``: the position and the other files' sizes, for people and tools.

Two records say which checkpoints a run has; nothing else does (a directory neither lists is
garbage, removed by :func:`sweep_unrecorded`):

* **Ray Train's** checkpoint manager, for runs with workers (``num_workers >= 1``): every
  checkpoint a worker reported and the controller registered, pruned to
  ``CheckpointConfig(num_to_keep)``, persisted as Ray's run snapshot in the run directory and read
  back through the public ``ray.train.Result.from_path`` (:func:`ray_checkpoints`). Ray 2.60 never
  looks at directories its snapshot does not list: a checkpoint uploaded by a worker but not yet
  registered when the driver died, or one Ray dropped from its list but had not deleted yet, stays
  on disk for ever unless swept. On restart Ray reloads its snapshot, checks that every listed
  checkpoint still exists (else ``CheckpointManagerInitializationError``: never delete a listed
  one) and hands the latest to the workers (``ray.train.get_checkpoint()``).
* **The in-process record** (``num_workers=0``, where Ray persists nothing):
  :mod:`.in_process`, an index file written after each checkpoint's files.

A run resumes from the newest checkpoint (by step) of the two; normally only one of them has any
(both do when a run switches between in-process and workers, see ``fit``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pipeline import uri as uri_
from pipeline.errors import CheckpointMismatchError

from . import in_process
from .layout import CHECKPOINT_PREFIX, MODEL_PT, STATE_JSON, STATE_PT, CheckpointInfo, dir_name, run_dir, step_of


# ------------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------------
def write_checkpoint(
    directory: str | Path, model_state: Mapping[str, Any], objects: Mapping[str, Any], info: Mapping[str, Any]
) -> None:
    """Write a checkpoint's three files into the local ``directory``.

    Args:
        model_state: name -> tensor (``model.pt``).
        objects: name -> state dict of the optimiser, scheduler, scaler, ... (``train_state.pt``).
        info: JSON-able position and bookkeeping (``train_state.pt`` and ``train_state.json``).
    """
    import torch

    d = Path(directory)
    torch.save(dict(model_state), d / MODEL_PT)
    torch.save({**info, "objects": dict(objects)}, d / STATE_PT)
    sizes = {f: (d / f).stat().st_size for f in (MODEL_PT, STATE_PT)}
    (d / STATE_JSON).write_text(json.dumps({**info, "files": sizes}, indent=1, default=str))


def load_model_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The model state saved in a local checkpoint directory (CPU tensors)."""
    import torch

    return torch.load(Path(checkpoint_dir) / MODEL_PT, map_location="cpu", weights_only=True)


def load_train_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``train_state.pt`` of a local checkpoint directory: the position and ``objects`` (state
    dicts by name), CPU tensors."""
    import torch

    return torch.load(Path(checkpoint_dir) / STATE_PT, map_location="cpu", weights_only=True)


def restore_checkpoint(
    directory: Path,
    where: str,
    set_model_state: Callable[[Mapping[str, Any]], Any],
    objects: Mapping[str, Any],
    note: Callable[[str], None],
) -> dict[str, Any]:
    """Load the local checkpoint ``directory`` into a train loop's model and objects.

    Args:
        directory: the checkpoint's local directory.
        where: its URI (named in errors and notes).
        set_model_state: loads ``model.pt``'s state dict strictly (raising on any mismatch).
        objects: name -> object with ``load_state_dict`` (optimiser, scheduler, gradient
            scaler, extras); None ones are skipped. A missing ``grad_scaler`` state (written at
            another precision) is only noted: the scaler starts fresh.
        note: a line for the driver's log.

    Returns:
        ``train_state.pt``'s content: the position (``step``, ``epoch``, ``batch_in_epoch``,
        ``world_size``, ...) and ``objects``.

    Raises:
        CheckpointMismatchError: the model state does not fit (keys or shapes), or an object's
            state is missing or does not fit: names the checkpoint and the loader's message.
    """
    try:
        set_model_state(load_model_state(directory))
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointMismatchError(
            f"checkpoint {where} does not match the model ({type(e).__name__}: {e}). "
            "Was it written for another model config?"
        ) from e
    state = load_train_state(directory)
    for key, obj in objects.items():
        if obj is None:
            continue
        if key not in state["objects"]:
            if key == "grad_scaler":  # written at another precision: a fresh scaler
                note(f"note: checkpoint {where} has no gradient scaler state; starting a fresh one")
                continue
            raise CheckpointMismatchError(
                f"checkpoint {where} has no {key!r} state (it holds {sorted(state['objects'])}); "
                "was it written by another train loop?"
            )
        try:
            obj.load_state_dict(state["objects"][key])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointMismatchError(
                f"checkpoint {where}: the {key!r} state does not fit ({type(e).__name__}: {e})"
            ) from e
    return state


def resume_source(
    storage_path: str, name: str, ray_checkpoint: Any, start_from: Mapping[str, Any] | None
) -> tuple[str, Any] | None:
    """``(uri, context manager giving a local directory)`` of the checkpoint a worker resumes
    from: the newer of Ray's (``ray_checkpoint``: ``ray.train.get_checkpoint()``, workers only)
    and the one the driver chose from the records (``start_from``: ``{"uri", "step"}``); None
    when neither is given."""
    best: tuple[int, str, Any] | None = None
    if ray_checkpoint is not None:
        leaf = str(ray_checkpoint.path).rstrip("/").rsplit("/", 1)[-1]
        best = (step_of(leaf), uri_.join(storage_path, name, leaf), ray_checkpoint)
    if start_from is not None and (best is None or int(start_from["step"]) > best[0]):
        best = (int(start_from["step"]), start_from["uri"], None)
    if best is None:
        return None
    _, where, ckpt = best
    return where, (ckpt.as_directory() if ckpt is not None else uri_.local_copy(where))


# ------------------------------------------------------------------------------------------------
# records
# ------------------------------------------------------------------------------------------------
def _cannot_list(storage_path: str, name: str, e: BaseException) -> OSError:
    return OSError(
        f"cannot list the checkpoints under {uri_.join(storage_path, name)} "
        f"({type(e).__name__}: {e}); check the storage path, credentials and network"
    )


def ray_checkpoints(storage_path: str, name: str) -> list[CheckpointInfo]:
    """The checkpoints Ray Train's record lists for run ``name`` (oldest first; [] when the run
    has no Ray record yet), from ``ray.train.Result.from_path``.

    Raises:
        OSError: the storage cannot be read (credentials, network, permissions), naming the
            path: resuming must not silently start over from step 0.
        ray.train.v2 CheckpointManagerInitializationError: Ray's snapshot lists a checkpoint
            that no longer exists, or was written by another Ray version.
    """
    import pyarrow.fs as pafs

    fs, path = run_dir(storage_path, name)
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return []
    except OSError as e:
        raise _cannot_list(storage_path, name, e) from e
    from ray.train.v2.api.result import Result

    try:
        result = Result.from_path(uri_.join(storage_path, name))
    except RuntimeError:  # Result.from_path: no run directory or no snapshot (nothing registered yet)
        return []
    out = []
    for ckpt, metrics in result.best_checkpoints or []:
        leaf = str(ckpt.path).rstrip("/").rsplit("/", 1)[-1]
        state = dict(metrics or {})
        step = int(state.get("step", step_of(leaf)))
        out.append(CheckpointInfo(uri=uri_.join(storage_path, name, leaf), step=step, state=state, source="ray"))
    return sorted(out, key=lambda c: c.step)


def list_checkpoints(storage_path: str, name: str) -> list[CheckpointInfo]:
    """Every checkpoint of run ``name`` that a record lists (Ray Train's and the in-process
    one), oldest first. ``storage_path``: a local path or a pyarrow URI (``s3://``, ``gs://``);
    a run directory that does not exist has none.

    Raises:
        OSError: the storage cannot be listed, naming the path (see :func:`ray_checkpoints`).
    """
    found = {c.dir_name: c for c in ray_checkpoints(storage_path, name)}
    for c in in_process.record(storage_path, name):
        found.setdefault(c.dir_name, c)
    return sorted(found.values(), key=lambda c: (c.step, c.source == "ray"))


def latest_checkpoint(storage_path: str, name: str) -> CheckpointInfo | None:
    """The newest recorded checkpoint of run ``name`` (Ray's at equal steps), or None."""
    cps = list_checkpoints(storage_path, name)
    return cps[-1] if cps else None


def sweep_unrecorded(storage_path: str, name: str) -> list[str]:
    """Delete the ``checkpoint_*`` directories of run ``name`` that no record lists (uploaded by
    a worker that died before Ray registered them, dropped by Ray but not yet deleted, or an
    in-process copy cut short). Only call it while no fit of this run is active.

    Returns:
        The deleted directories' names.

    Raises:
        OSError: the storage cannot be listed or written.
    """
    import pyarrow.fs as pafs

    fs, path = run_dir(storage_path, name)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise _cannot_list(storage_path, name, e) from e
    dirs = [i for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)]
    if not dirs:
        return []
    keep = {c.dir_name for c in list_checkpoints(storage_path, name)}
    gone = []
    for info in sorted(dirs, key=lambda i: i.base_name):
        if info.base_name not in keep:
            fs.delete_dir(info.path)
            gone.append(info.base_name)
    return gone


__all__ = [
    "CheckpointInfo",
    "dir_name",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "load_train_state",
    "ray_checkpoints",
    "restore_checkpoint",
    "resume_source",
    "step_of",
    "sweep_unrecorded",
    "write_checkpoint",
]
