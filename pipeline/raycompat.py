"""Ray Data's pass counter, the one place that touches it.

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

__all__ = ["ATTRIBUTE", "pass_index", "set_pass_index"]

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
