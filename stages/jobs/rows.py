"""The rows of an inference pass over several sets of a build_splits artifact (evaluate's eval
sets, pretrain_proposals' recall sets)."""

from __future__ import annotations

import pyarrow as pa

from pipeline.dag import Artifact
from stages.feeds import URI_COLUMNS, manifest_table
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


__all__ = ["set_rows"]
