"""Where a checkpoint lives and what a record says of it: the names shared by the checkpoint files
(:mod:`.checkpoint`) and the in-process record (:mod:`.in_process`), which both import this.

A checkpoint is a directory ``<storage>/<name>/checkpoint_<step:08d>/`` holding ``model.pt``,
``train_state.pt`` and ``train_state.json`` (see :mod:`.checkpoint`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pipeline import uri as uri_

CHECKPOINT_PREFIX = "checkpoint_"
MODEL_PT = "model.pt"
STATE_PT = "train_state.pt"
STATE_JSON = "train_state.json"


@dataclasses.dataclass
class CheckpointInfo:
    """A checkpoint a record lists.

    Attributes:
        uri: its directory (local absolute path or URI under the storage path).
        step: optimisation steps done when it was written.
        state: what was recorded with it: ``step``, ``epoch``, ``batch_in_epoch``,
            ``world_size``, ``global_batch_size``, ``precision``, ``loss``, ... (Ray's reported
            metrics for a worker run; the index entry for an in-process one).
        source: ``"ray"`` (Ray Train's record) or ``"in_process"``.
    """

    uri: str
    step: int
    state: dict[str, Any]
    source: str = "ray"

    @property
    def dir_name(self) -> str:
        return self.uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def dir_name(step: int) -> str:
    """``checkpoint_<step:08d>``."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def step_of(path: str) -> int:
    """The step in a checkpoint directory's name (``.../checkpoint_00000012`` -> 12; -1: none)."""
    leaf = str(path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    tail = leaf[len(CHECKPOINT_PREFIX) :] if leaf.startswith(CHECKPOINT_PREFIX) else ""
    return int(tail) if tail.isdigit() else -1


def run_dir(storage_path: str, name: str) -> tuple[Any, str]:
    """``(filesystem, path)`` of the run directory ``<storage_path>/<name>``."""
    return uri_.filesystem(uri_.join(storage_path, name))


__all__ = [
    "CHECKPOINT_PREFIX",
    "MODEL_PT",
    "STATE_JSON",
    "STATE_PT",
    "CheckpointInfo",
    "dir_name",
    "run_dir",
    "step_of",
]
