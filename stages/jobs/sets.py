"""An inference pass over several sets of a build_splits artifact (evaluate's eval sets,
pretrain_proposals' recall sets): its rows (:func:`set_rows`) and what its evaluators need to know
of each set (:func:`set_specs`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa

from pipeline.dag import Artifact
from stages.feeds import URI_COLUMNS, manifest_table
from zeroseg.data.classes import Vocabulary
from zeroseg.errors import DataError


def set_rows(splits: Artifact, sets: list[str], max_images: int | None, set_column: str, what: str) -> pa.Table:
    """One pyarrow table of every set's manifest rows (``URI_COLUMNS``, URIs resolved by
    ``stages.feeds.manifest_table``) with the set's name in ``set_column``; the first
    ``max_images`` rows of each set only (None: all).

    Args:
        what: the sets' name in messages (``"eval set"``, ``"recall set"``).

    Raises:
        DataError: a set whose manifest has no images (or as ``manifest_table``).
    """
    parts = []
    for name in sets:
        t = manifest_table(splits, name).select(list(URI_COLUMNS))
        if max_images is not None:
            t = t.slice(0, max_images)
        if t.num_rows == 0:
            raise DataError(f"{what} {name!r}: its manifest has no images")
        parts.append(t.append_column(set_column, pa.array([name] * t.num_rows, pa.string())))
    return pa.concat_tables(parts)


def set_specs(vocabs: Mapping[str, Vocabulary], sets: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{set: {"num_classes", "seen", "unseen", "ignore_index"}}`` of the sets' vocabularies: the
    per-set argument of the ``zeroseg.evaluation`` evaluators (and of the proposal recall's)."""
    return {
        n: {
            "num_classes": len(vocabs[n].names),
            "seen": vocabs[n].seen,
            "unseen": vocabs[n].unseen,
            "ignore_index": vocabs[n].ignore_index,
        }
        for n in sets
    }


__all__ = ["set_rows", "set_specs"]
