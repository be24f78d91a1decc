"""The files of a build_splits artifact: the Parquet manifests (:func:`manifest_schema`,
:func:`write_manifest`, with the inductive leakage check), ``classes.json``
(:func:`write_classes_json`, :func:`read_classes_json`, :func:`read_transductive`) and where the
label PNGs go (:func:`label_path`, :func:`heldout_path`). Nothing here imports Ray or the
pipeline (pyarrow is imported where a manifest is built).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zeroseg.data.classes import Vocabulary
from zeroseg.errors import DataError


def manifest_schema(heldout: bool = False):
    """The pyarrow schema of a manifest (docs/architecture.md, build_splits): ``image`` is the
    image's path relative to its dataset's image folder, ``label`` the label PNG's path relative
    to the build_splits artifact (a manifest holds no absolute path). ``heldout``: the schema of
    a transductive training manifest, with the ``heldout`` column (the held-out unseen label's
    path relative to the artifact)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("image_id", pa.string()),
            ("image", pa.string()),
            ("label", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("classes", pa.list_(pa.int32())),
            ("dataset", pa.string()),
            *((("heldout", pa.string()),) if heldout else ()),
        ]
    )


def label_path(output_dir: str | os.PathLike, split: str, image_id: str) -> Path:
    """Where build_splits writes a label PNG: ``<output_dir>/labels/<split>/<image_id>.png``."""
    return Path(output_dir) / "labels" / split / f"{image_id}.png"


def heldout_path(output_dir: str | os.PathLike, split: str, image_id: str) -> Path:
    """Where build_splits writes a transductive training image's held-out unseen label:
    ``<output_dir>/heldout/<split>/<image_id>.png``."""
    return Path(output_dir) / "heldout" / split / f"{image_id}.png"


def write_manifest(
    path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], vocab: Vocabulary, inductive_train: bool
) -> None:
    """Write one manifest as Parquet (:func:`manifest_schema`), rows in the given order.

    Args:
        path: the ``.parquet`` file to write (parent directories are created).
        rows: dicts with ``image_id``, ``image`` (relative to the dataset's image folder),
            ``label`` (relative to the artifact), ``height``, ``width``, ``classes`` (vocabulary ids
            present in the label), ``dataset``; and ``heldout`` (relative to the artifact) in
            every row of a transductive training manifest (the column is written when all rows have it).
        vocab: the manifest's vocabulary.
        inductive_train: the manifest is an inductive training manifest: no row may carry an
            unseen class.

    Raises:
        DataError: with ``inductive_train``, a row whose ``classes`` holds an unseen class
            (naming the image and the classes: unseen pixels would leak into training); a class
            id outside the vocabulary; a duplicate image id.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    unseen = set(vocab.unseen)
    ids = set()
    for r in rows:
        cls = [int(c) for c in r["classes"]]
        bad = [c for c in cls if not 0 <= c < len(vocab.names)]
        if bad:
            raise DataError(
                f"manifest {path}: image {r['image_id']!r} has class ids {bad} outside the "
                f"{len(vocab.names)} classes of {vocab.dataset!r}"
            )
        if inductive_train:
            leak = sorted(set(cls) & unseen)
            if leak:
                raise DataError(
                    f"inductive training manifest {path}: image {r['image_id']!r} carries unseen "
                    f"class(es) {[vocab.names[c] for c in leak]} (ids {leak}); unseen pixels must be "
                    "ignored (policy ignore) or the image dropped (policy drop)"
                )
        if r["image_id"] in ids:
            raise DataError(f"manifest {path}: image id {r['image_id']!r} appears twice")
        ids.add(r["image_id"])
    heldout = bool(rows) and all("heldout" in r for r in rows)
    table = pa.Table.from_pylist(
        [
            {
                "image_id": str(r["image_id"]),
                "image": str(r["image"]),
                "label": str(r["label"]),
                "height": int(r["height"]),
                "width": int(r["width"]),
                "classes": [int(c) for c in r["classes"]],
                "dataset": str(r["dataset"]),
                **({"heldout": str(r["heldout"])} if heldout else {}),
            }
            for r in rows
        ],
        schema=manifest_schema(heldout=heldout),
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, p)


def write_classes_json(
    path: str | os.PathLike,
    train: Vocabulary,
    evals: Mapping[str, Vocabulary],
    split: Mapping[str, Any] | None = None,
    transductive: Mapping[str, Any] | None = None,
    pseudo_unseen: Mapping[str, Any] | None = None,
) -> None:
    """``classes.json``: ``{"train": vocab, "eval": {name: vocab}}`` (docs/architecture.md), plus
    ``"split"``: how the seen/unseen split was made, when given (:func:`frequency_record`),
    ``"transductive"``: ``{"unlabeled_index", "heldout"}`` for a transductive split
    (:func:`read_transductive`), and ``"pseudo_unseen"`` for a seen-class validation run
    (:func:`pseudo_unseen_record`)."""
    data: dict[str, Any] = {"train": train.to_json(), "eval": {k: v.to_json() for k, v in evals.items()}}
    if split is not None:
        data["split"] = dict(split)
    if transductive is not None:
        data["transductive"] = dict(transductive)
    if pseudo_unseen is not None:
        data["pseudo_unseen"] = dict(pseudo_unseen)
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def read_classes_json(path: str | os.PathLike) -> tuple[Vocabulary, dict[str, Vocabulary]]:
    """Inverse of :func:`write_classes_json`: ``(train vocabulary, {eval name: vocabulary})``.

    Raises:
        DataError: missing or malformed file.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
        return Vocabulary.from_json(d["train"]), {k: Vocabulary.from_json(v) for k, v in d["eval"].items()}
    except FileNotFoundError:
        raise DataError(f"classes file {p} does not exist (written by build_splits)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"classes file {p} is malformed ({type(e).__name__}: {e})") from None


def read_transductive(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``"transductive"`` entry of a ``classes.json`` (``{"unlabeled_index": int, "heldout":
    folder}``), or None for an inductive split.

    Raises:
        DataError: missing or malformed file.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text()).get("transductive")
    except FileNotFoundError:
        raise DataError(f"classes file {p} does not exist (written by build_splits)") from None
    except (json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"classes file {p} is malformed ({type(e).__name__}: {e})") from None
    if d is None:
        return None
    try:
        return {"unlabeled_index": int(d["unlabeled_index"]), "heldout": str(d["heldout"])}
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"classes file {p}: malformed 'transductive' entry ({type(e).__name__}: {e})") from None
