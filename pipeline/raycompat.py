"""Ray's private fields that zeroseg relies on, the one place that touches them.

1. Ray Data's pass counter (:func:`pass_index`, :func:`set_pass_index`).
2. A Ray Train V2 run's controller actor and worker placement group, seen from a worker
   (:func:`train_run_handles`): what a stopped sweep trial needs to end its fit.

Ray Data's pass counter:

Ray Data counts complete executions ("passes", one per epoch of a training feed) of a dataset in
the private field ``DataContext._execution_idx`` (Ray 2.60: ``ExecutionIdxUpdateCallback`` adds 1
after every execution that succeeds; ``RandomSeedConfig(reseed_after_execution=True)`` and
``ray.data.expressions.random`` seed from it). The training feed seeds its per-epoch row order
and per-sample augmentation from it (``stages.feeds.decode_train_batch``), and ``pipeline.training`` starts
it at the resumed epoch (``fit.prepare_dataset``), so a resumed run sees the samples an
uninterrupted one would.

Being private, the field may move in a Ray upgrade: ``tests/test_raycompat.py`` fails loudly
then; at run time a missing field gives one warning and pass 0 (reads) or is skipped (writes):
training still runs, only resume-exact data order is lost.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["ATTRIBUTE", "pass_index", "set_pass_index", "train_run_handles"]

#: The private ``DataContext`` field (Ray 2.60).
ATTRIBUTE = "_execution_idx"

_warned = False


def _warn_missing() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"ray.data.DataContext has no {ATTRIBUTE!r} (Ray upgrade?): per-epoch data seeds use pass 0 "
            "and a resumed run may see other samples than an uninterrupted one; see pipeline/training/raycompat.py",
            RuntimeWarning,
            stacklevel=3,
        )


def pass_index(context: Any = None) -> int:
    """The pass (execution) index of ``context`` (default: ``DataContext.get_current()``, which
    inside a Ray Data task is the context of the dataset being computed): 0, 1, 2, ... one per
    complete pass. 0 outside Ray Data or when the field is missing (one warning)."""
    try:
        if context is None:
            from ray.data import DataContext

            context = DataContext.get_current()
    except Exception:  # noqa: BLE001 - no Ray Data here: a fixed pass
        return 0
    if not hasattr(context, ATTRIBUTE):
        _warn_missing()
        return 0
    return int(getattr(context, ATTRIBUTE))


def set_pass_index(context: Any, index: int) -> bool:
    """Set the pass index of a dataset's ``DataContext`` (``ds.context``): its next execution
    is pass ``index``. Returns False (after one warning) when the field is missing.

    Raises:
        ValueError: ``index`` is negative.
    """
    if index < 0:
        raise ValueError(f"pass index must be >= 0, got {index}")
    if not hasattr(context, ATTRIBUTE):
        _warn_missing()
        return False
    setattr(context, ATTRIBUTE, int(index))
    return True


def train_run_handles() -> dict[str, Any]:
    """The running Ray Train V2 fit's controller actor and its workers' placement group, as seen
    from one of its workers: ``{"controller": ActorHandle | None, "placement_group":
    PlacementGroup | None}`` (both picklable; None where Ray no longer offers it).

    Used to end a fit whose driver was told to stop (a sweep trial that ASHA stopped,
    ``pipeline.training.progress.relay``): Ray Tune then kills the trial's actor, and the Train
    controller it owns dies with it, ungracefully, so the controller never removes its worker
    group's placement group. Ray Train's own ``PlacementGroupCleaner`` would, but it watches the
    controller through Ray's state API, which needs the dashboard (off in our embedded clusters)
    and a correct ``/tmp/ray/ray_current_cluster``; without it the group holds its CPUs/GPUs until
    the job ends. The controller handle is the private ``TrainContext.controller_actor`` (Ray
    2.60; ``tests/test_raycompat.py`` fails loudly if it moves); its ``abort`` is what Ray Train
    itself calls on Ctrl-C. The placement group is public (``get_current_placement_group``).
    """
    import ray.util

    handles: dict[str, Any] = {"controller": None, "placement_group": None}
    try:
        handles["placement_group"] = ray.util.get_current_placement_group()
    except Exception:  # noqa: BLE001 - not in a placement group / not in Ray
        pass
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        handles["controller"] = get_train_context().controller_actor
    except Exception:  # noqa: BLE001 - Train V1, in-process, or a Ray upgrade moved it
        pass
    return handles
