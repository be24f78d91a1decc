"""Image feeds from build_splits manifests: the training feed (Ray Data -> Ray Train workers) and
the rows of an inference pass.

A manifest names images relative to their dataset's image folder and labels relative to the
build_splits artifact (``zeroseg.data.splits.manifest_schema``). :func:`manifest_table` reads it
on the driver with pyarrow (a few bytes per image) and resolves both against the current
invocation: the image folder from the build_splits node's runtime outputs (``image_roots``: where
each split's dataset is mounted here), the labels from the artifact's URI (a local path or the store's
``s3://`` / ``gs://`` URI, read from there by the workers).

The training feed (:func:`train_dataset`)::

    ray.data.from_arrow(manifest rows)                    # a few KB in the object store
      -> random_shuffle(seed, reseeded every pass)        # a different, seeded row order per epoch
      -> repartition(target_num_rows_per_block=block_rows)  # blocks of 32 rows: parallel decode tasks
      -> map_batches(decode + remap + augment + normalise, batch_format="numpy")
         # -> {"image": float32 [B, 3, h, w], "label": uint8 [B, h, w]}  (int32 above 255 seen classes)

read by training workers with ``ray.train.get_dataset_shard("train").iter_torch_batches``.

The leakage guard's runtime half (:func:`leakage_guard`): every training stage hands the feed the
table of label values no training label may hold (the unseen class ids of the training
vocabulary); the decode UDF checks each decoded label PNG against it *before* the remap (which would
hide a leak by mapping the id to ignore) and raises ``LeakageError`` naming the image. The lookup
table is checked on the driver: it may not map an unseen id to anything but ignore. A transductive
split's training labels hold no unseen id either (their unseen pixels carry the unlabelled value);
self_train's feed adds the held-out unseen labels as a separate ``heldout`` column (``heldout=True``),
which only its diagnostic reads.

Determinism: a sample's augmentation is drawn from ``sample_rng(seed, image_id, pass)`` where
``pass`` is the dataset's execution index (0, 1, 2, ... one per epoch; the training package
offsets it to the resumed epoch); the row order of pass ``p`` is seeded by ``(seed, p)``. Both
are independent of how many decode tasks run and where.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.dag import Artifact
from pipeline.errors import carry_user_errors
from pipeline.uri import read_bytes
from stages.common import vocabularies
from zeroseg.data.classes import Vocabulary
from zeroseg.data.split_files import manifest_schema
from zeroseg.data.transforms import (
    AugmentConfig,
    check_lut,
    decode_image,
    decode_label,
    lut_ignore_index,
    make_lut,
    remap_label,
    sample_rng,
    train_transform,
    train_transform_with,
)
from zeroseg.errors import DataError, LeakageError

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

#: Columns of a resolved manifest (:func:`manifest_table`) that the feeds use.
URI_COLUMNS = ("image_id", "image_uri", "label_uri")
#: The column :func:`set_rows` adds: the eval set a row belongs to.
SET_COLUMN = "eval_set"


def manifest_table(splits: Artifact, split: str) -> pa.Table:
    """The rows of ``manifests/<split>.parquet`` of a build_splits artifact, with absolute
    ``image_uri`` and ``label_uri`` columns added for this invocation.

    Raises:
        DataError: the manifest is missing, unreadable or lacks a column of the build_splits
            schema; the artifact has no image folder for the manifest's dataset.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = splits.file(f"manifests/{split}.parquet")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise DataError(f"cannot read manifest {path}: {type(e).__name__}: {e}") from None
    want = manifest_schema().names
    missing = [c for c in want if c not in table.column_names]
    if missing:
        raise DataError(
            f"manifest {path} lacks column(s) {missing}; it has {table.column_names} (expected the "
            f"build_splits schema {want}; re-run build_splits)"
        )
    root = (splits.runtime.get("image_roots") or {}).get(split)
    if root is None:
        raise DataError(
            f"build_splits artifact {splits.key[:12]}: no image folder known for split {split!r} in this "
            "invocation (the pipeline passes it from the build_splits config: runtime_outputs)"
        )
    image_uri = [f"{root.rstrip('/')}/{p}" for p in table.column("image").to_pylist()]
    label_uri = [splits.file_uri(p) for p in table.column("label").to_pylist()]
    return table.append_column("image_uri", pa.array(image_uri, pa.string())).append_column(
        "label_uri", pa.array(label_uri, pa.string())
    )


def decode_pair(image_uri: str, label_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode a manifest row's image and label PNG (local paths or store URIs).

    Returns:
        ``(image uint8 [H, W, 3] RGB, label uint8 [H, W] vocabulary ids, 255 ignore)``; the label is
        ``uint16`` with 65535 ignore for a vocabulary of more than 255 classes.

    Raises:
        DataError: a missing, unreadable or undecodable file, naming its URI.
    """
    return _decode_uri(image_uri, decode_image), _decode_uri(label_uri, decode_label)


def _decode_uri(uri: str, decode: Callable[[Any], np.ndarray]) -> np.ndarray:
    """``decode`` (``decode_image`` / ``decode_label``) of one file, a local path or a store URI.

    Raises:
        DataError: a missing, unreadable or undecodable file, naming ``uri``.
    """
    if "://" not in uri:
        return decode(uri)  # a local path: decode_* name it in their errors
    try:
        data = read_bytes(uri)
    except OSError as e:  # FileNotFoundError, permission, store errors
        raise DataError(f"{uri} cannot be read ({type(e).__name__}: {e})") from None
    try:
        return decode(data)
    except DataError as e:
        raise DataError(f"{uri}: {e}") from None


def leakage_guard(splits: Artifact, lut: np.ndarray) -> np.ndarray:
    """The runtime leakage guard of a training feed over ``splits`` with lookup table ``lut``:
    ``bool [len(lut)]``, True for the label values no training label may hold (the unseen class
    ids of ``classes.json``'s training vocabulary); pass it to :func:`train_dataset`.

    Raises:
        LeakageError: ``lut`` maps an unseen class id to a training id (naming the class).
        DataError: ``classes.json`` is missing or malformed.
    """
    lut = np.asarray(lut)
    vocab = vocabularies(splits)["train"]
    ignore = lut_ignore_index(lut)
    unseen = [int(u) for u in vocab.unseen if int(u) < len(lut)]
    bad = [u for u in unseen if int(lut[u]) != ignore]
    if bad:
        raise LeakageError(
            f"leakage guard: the training lookup table maps unseen class(es) "
            f"{[vocab.names[u] for u in bad]} (ids {bad}) to training ids {[int(lut[u]) for u in bad]}; unseen "
            "classes must map to ignore"
        )
    forbidden = np.zeros(len(lut), dtype=bool)
    forbidden[unseen] = True
    return forbidden


def check_leakage(label: np.ndarray, forbidden: np.ndarray | None, image_id: str, uri: str) -> None:
    """Raise ``LeakageError`` when the decoded training ``label`` (vocabulary ids) holds a value
    ``forbidden`` marks (:func:`leakage_guard`), naming the image, the file and the ids."""
    if forbidden is None:
        return
    hit = forbidden[label]
    if hit.any():
        ids = sorted({int(v) for v in np.unique(label[hit])})
        raise LeakageError(
            f"leakage guard: training image {image_id!r} ({uri}) has {int(hit.sum())} pixel(s) labelled with "
            f"unseen class id(s) {ids}; a training label never holds an unseen class (re-run build_splits; "
            "the build_splits artifact was altered)"
        )


def decode_set_batch(batch: Mapping[str, np.ndarray], set_column: str, what: str) -> dict[str, list[Any]]:
    """Decode a Ray Data batch of eval-set manifest rows (an evaluator's ``load``).

    Args:
        batch: columns ``set_column`` (the set's name), ``image_uri``, ``label_uri``.
        set_column: the set-name column (``pipeline.inference`` adds it).
        what: how errors name the set, e.g. ``"eval set"``.

    Returns:
        ``{"images": [uint8 [H, W, 3]], "labels": [uint8 or uint16 [H, W]], "label_uris": [str],
        "sets": [str]}``, one entry per row, in order.

    Raises:
        DataError: a row's image or label cannot be read or decoded, naming the set and the URI.
    """
    out: dict[str, list[Any]] = {"images": [], "labels": [], "label_uris": [], "sets": []}
    for name, img_uri, lbl_uri in zip(batch[set_column], batch["image_uri"], batch["label_uri"]):
        try:
            image, label = decode_pair(str(img_uri), str(lbl_uri))
        except DataError as e:
            raise DataError(f"{what} {str(name)!r}: {e}") from None
        out["images"].append(image)
        out["labels"].append(label)
        out["label_uris"].append(str(lbl_uri))
        out["sets"].append(str(name))
    return out


def decode_train_batch(
    batch: dict[str, np.ndarray],
    *,
    lut: np.ndarray,
    augment: AugmentConfig,
    seed: int,
    epoch: int | None = None,
    forbidden: np.ndarray | None = None,
    heldout: bool = False,
) -> dict[str, np.ndarray]:
    """The training ``map_batches`` UDF: decode, check (leakage guard), remap labels, augment, normalise.

    Args:
        batch: numpy batch with ``image_id``, ``image_uri``, ``label_uri`` (strings).
        lut: vocabulary id -> training id (``zeroseg.data.transforms.make_lut``: ``uint8 [256]``,
            255 = ignore; ``[65536]`` for 16-bit labels; ``uint16`` with 65535 = ignore above 255
            training ids).
        augment: augmentation settings.
        seed: the run's data seed.
        epoch: the pass index for the augmentation seed (default: the Ray Data pass index).
        forbidden: :func:`leakage_guard`'s table (None: no check).
        heldout: also decode the ``heldout_uri`` column's held-out unseen labels (transductive
            splits) into ``heldout`` (int32: unseen vocabulary ids, 255 / 65535 elsewhere), with the
            same geometry as the label (``zeroseg.data.transforms.train_transform_with``), and
            ``valid`` (uint8: 0 on the padding the augmentation added, 1 on the image).

    Returns:
        ``{"image": float32 [B, 3, h, w], "label": uint8 [B, h, w]}`` with ``(h, w) =
        augment.crop_size``; with a ``uint16`` lut the labels are ``int32`` (training ids, 65535
        ignore: torch's uint16 tensors support few operations); plus ``"heldout"`` and ``"valid"``
        with ``heldout``.

    Raises:
        LeakageError: a label holds an unseen class id (``forbidden``).
        DataError: an image or label cannot be read or decoded, or their sizes differ (names the
            image id and files).
    """
    from pipeline.raycompat import pass_index

    epoch = pass_index() if epoch is None else epoch
    ids, img_uris, lbl_uris = batch["image_id"], batch["image_uri"], batch["label_uri"]
    n = len(ids)
    ch, cw = augment.crop_size
    images = np.empty((n, 3, ch, cw), dtype=np.float32)
    labels = np.empty((n, ch, cw), dtype=np.uint8 if lut.dtype == np.uint8 else np.int32)
    held = np.empty((n, ch, cw), dtype=np.int32) if heldout else None
    valid = np.empty((n, ch, cw), dtype=np.uint8) if heldout else None
    for i in range(n):
        image_id, img_uri, lbl_uri = str(ids[i]), str(img_uris[i]), str(lbl_uris[i])
        try:
            image, label = decode_pair(img_uri, lbl_uri)
            check_leakage(label, forbidden, image_id, lbl_uri)
            label = remap_label(label, lut)
            rng = sample_rng(seed, image_id, epoch)
            if held is None:
                images[i], labels[i] = train_transform(image, label, augment, rng)
            else:
                h_uri = str(batch["heldout_uri"][i])
                h = _decode_uri(h_uri, decode_label)
                # inside the image "not unseen" becomes ignore - 1 (no class of a transductive
                # vocabulary), so that ignore after the transform is exactly the padding
                hi = 255 if h.dtype == np.uint8 else 65535
                h = np.where(h == hi, hi - 1, h).astype(h.dtype)
                images[i], labels[i], ht = train_transform_with(image, label, h, augment, rng)
                valid[i] = ht != hi
                held[i] = np.where(ht >= hi - 1, hi, ht)
        except LeakageError:
            raise
        except DataError as e:
            raise DataError(f"training image {image_id!r}: {e}") from None
    out = {"image": images, "label": labels}
    if held is not None:
        out["heldout"], out["valid"] = held, valid
    return out


def train_dataset(
    splits: Artifact,
    lut: np.ndarray,
    augment: AugmentConfig,
    seed: int,
    *,
    split: str = "train",
    block_rows: int = 32,
    num_cpus: float = 1.0,
    concurrency: int | tuple[int, int] | None = None,
    shuffle: bool = True,
    guard: np.ndarray | None = None,
    heldout: bool = False,
) -> ray.data.Dataset:
    """The training feed: manifest rows -> augmented ``image``/``label`` arrays.

    Args:
        splits: the build_splits artifact.
        lut: vocabulary id -> training id, everything else ignore (see
            ``zeroseg.data.transforms.make_lut``: ``uint8 [256]`` / 255, or 65536 entries for
            16-bit labels, ``uint16`` / 65535 above 255 training ids).
        augment: augmentation settings (crop size, rescale, flip, mean/std).
        seed: data seed (row order per epoch, per-sample augmentation).
        split: the manifest to read.
        block_rows: rows per decode task (also the ``map_batches`` batch size).
        num_cpus: CPUs reserved per decode task (fractions allowed).
        concurrency: ``map_batches`` concurrency (``None``: Ray Data decides).
        shuffle: shuffle the rows every epoch (seeded by ``(seed, pass)``).
        guard: :func:`leakage_guard`'s table: every decoded label is checked against it (the
            training stages pass it; None: no check).
        heldout: add the ``heldout`` column (the manifest's held-out unseen labels of a
            transductive split; :func:`decode_train_batch`).

    Returns:
        A lazy dataset with columns ``image`` (float32 ``[3, h, w]``) and ``label``
        (uint8 ``[h, w]``; int32 with 65535 ignore for a ``uint16`` lut) per row.

    Raises:
        DataError: the manifest is missing, has no rows, or lacks a column.
        ValueError: ``lut`` is not a ``make_lut`` table.
    """
    import ray.data
    from ray.data import RandomSeedConfig

    lut = np.asarray(lut)
    check_lut(lut)
    table = manifest_table(splits, split)
    if heldout:
        if "heldout" not in table.column_names:
            raise DataError(
                f"manifests/{split}.parquet of build_splits {splits.key[:12]} has no held-out unseen labels "
                "(column 'heldout'): the split is not transductive (build_splits.transductive: true)"
            )
        import pyarrow as pa

        uris = [splits.file_uri(p) for p in table.column("heldout").to_pylist()]
        table = table.select(list(URI_COLUMNS)).append_column("heldout_uri", pa.array(uris, pa.string()))
    else:
        table = table.select(list(URI_COLUMNS))
    if table.num_rows == 0:
        raise DataError(f"training manifest manifests/{split}.parquet of build_splits {splits.key[:12]} has no rows")
    ds = ray.data.from_arrow(table)
    if shuffle:
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=int(seed), reseed_after_execution=True))
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    # Ray Data's per-operator reservations split the CPUs between the (trivial) shuffle and
    # repartition operators and the decoder: measured on 2 CPUs, decode ran ~1 task at a time
    # with them and ~1.5 without.
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        carry_user_errors(decode_train_batch),
        fn_kwargs={"lut": lut, "augment": augment, "seed": int(seed), "forbidden": guard, "heldout": heldout},
        batch_size=block_rows,
        batch_format="numpy",
        num_cpus=num_cpus,
        concurrency=concurrency,
    )


def set_rows(splits: Artifact, sets: Sequence[str], max_images: int | None, what: str = "eval set") -> pa.Table:
    """One pyarrow table of the manifest rows (:data:`URI_COLUMNS`, URIs resolved) of every set in
    ``sets``, in order, with the :data:`SET_COLUMN` column naming each row's set; the first
    ``max_images`` rows of each set only (None: all). ``what``: the sets' name in messages.

    Raises:
        DataError: a set whose manifest has no images (or see :func:`manifest_table`).
    """
    import pyarrow as pa

    parts = []
    for name in sets:
        t = manifest_table(splits, name).select(list(URI_COLUMNS))
        if max_images is not None:
            t = t.slice(0, max_images)
        if t.num_rows == 0:
            raise DataError(f"{what} {name!r}: its manifest has no images")
        parts.append(t.append_column(SET_COLUMN, pa.array([name] * t.num_rows, pa.string())))
    return pa.concat_tables(parts)


def set_specs(vocabs: Mapping[str, Vocabulary], sets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{set: {"num_classes", "seen", "unseen", "ignore_index"}}`` of ``sets``' vocabularies: what
    the evaluators of an inference pass over :func:`set_rows` take per set (``zeroseg.evaluation``)."""
    return {
        n: {
            "num_classes": len(vocabs[n].names),
            "seen": vocabs[n].seen,
            "unseen": vocabs[n].unseen,
            "ignore_index": vocabs[n].ignore_index,
        }
        for n in sets
    }


def seen_class_lut(vocab: Vocabulary) -> np.ndarray:
    """The lookup table of a seen-class training feed: vocabulary id -> seen training id (the
    position in ``vocab.seen``), every other id (unseen included) -> ignore: 255, or 65535 above
    255 seen classes (``zeroseg.data.transforms.make_lut``)."""
    return make_lut({int(c): i for i, c in enumerate(vocab.seen)}, source_classes=len(vocab.names))


@dataclasses.dataclass(frozen=True)
class TrainingFeed:
    """A training stage's feed (:func:`training_feed`).

    Attributes:
        dataset: the Ray Data training feed (:func:`train_dataset`).
        lut: its lookup table (vocabulary id -> training target).
        ignore_index: the targets' ignore value (255, or 65535 for a 16-bit table).
    """

    dataset: Any
    lut: np.ndarray
    ignore_index: int


def training_feed(
    splits: Artifact,
    augment: AugmentConfig,
    seed: int,
    *,
    block_rows: int,
    lut: np.ndarray | None = None,
    heldout: bool = False,
) -> TrainingFeed:
    """The training feed of a stage over ``splits``' training manifest, guarded against leakage:
    the table ``lut`` (default :func:`seen_class_lut` of the training vocabulary: the seen-class
    feed of train_classifier's methods and pretrain_proposals), its :func:`leakage_guard` checked
    on the driver and handed to :func:`train_dataset` with ``augment``, ``seed``, ``block_rows``
    and ``heldout`` (self_train's diagnostic column).

    Raises:
        LeakageError: ``lut`` maps an unseen class id to a training id.
        DataError: ``classes.json`` or the manifest is missing or malformed.
    """
    if lut is None:
        lut = seen_class_lut(vocabularies(splits)["train"])
    guard = leakage_guard(splits, lut)
    ds = train_dataset(splits, lut, augment, seed, block_rows=block_rows, guard=guard, heldout=heldout)
    return TrainingFeed(ds, lut, lut_ignore_index(lut))


__all__ = [
    "SET_COLUMN",
    "TrainingFeed",
    "URI_COLUMNS",
    "check_leakage",
    "decode_pair",
    "decode_train_batch",
    "leakage_guard",
    "manifest_table",
    "seen_class_lut",
    "set_rows",
    "set_specs",
    "train_dataset",
    "training_feed",
]
