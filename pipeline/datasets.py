"""Ray Data feeds built from ``build_splits`` manifests.

The training feed (:func:`train_dataset`) is::

    ray.data.read_parquet(manifest).select_columns([image_id, image_uri, label_uri])
      -> materialize()                                    # once: a few KB of rows in the object store
      -> random_shuffle(seed, reseeded every pass)        # a different, seeded row order per epoch
      -> repartition(target_num_rows_per_block=block_rows)  # blocks of 32 rows: parallel decode tasks, little per-task overhead
      -> map_batches(decode + remap + augment + normalise, batch_format="numpy")
         # -> {"image": float32 [B, 3, h, w], "label": uint8 [B, h, w]}

and training workers read it with ``ray.train.get_dataset_shard("train").iter_torch_batches``
(see ``pipeline/training.py``: ``Loop.batches``). No PyTorch DataLoader is involved.

The manifest is read with Ray Data's V1 Parquet reader (the V2 reader of Ray 2.60 provisions 32
footer-reader actors per execution: 6-15 s for a 12-row manifest on 2 cores, measured; V1: 0.1 s)
and materialised once (a few KB of rows), so an epoch does not re-list or re-read it.

Determinism: a sample's augmentation is drawn from ``sample_rng(seed, image_id, pass)`` where
``pass`` is the dataset's execution index (0, 1, 2, ... one per epoch; ``fit`` offsets it to the
resumed epoch); the row order of pass ``p`` is seeded by ``(seed, p)``. Both are independent of
how many decode tasks run and where. With ``preserve_order`` (``TrainSection.deterministic_data``)
the rows each worker receives, and their order, are a function of ``(seed, epoch, world size)``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zeroseg.data.transforms import (
    AugmentConfig,
    decode_image,
    decode_label,
    remap_label,
    sample_rng,
    train_transform,
)
from zeroseg.errors import DataError

if TYPE_CHECKING:
    import ray.data

#: Columns every manifest has (docs/architecture.md, build_splits).
MANIFEST_COLUMNS = ("image_id", "image_uri", "label_uri", "height", "width", "classes", "dataset")


def read_manifest(uri: str | Path, columns: list[str] | None = None) -> ray.data.Dataset:
    """``ray.data.read_parquet`` of a manifest, with its schema checked.

    Args:
        uri: a ``.parquet`` file or directory, local path or ``s3://``/``gs://`` URI.
        columns: columns to read (default: all).

    Raises:
        DataError: the manifest is missing, unreadable or lacks a required column (named).
    """
    import ray.data

    from ray.data import DataContext

    uri = str(uri)
    ctx = DataContext.get_current()
    v2 = getattr(ctx, "use_datasource_v2", None)
    try:
        if v2 is not None:
            # Ray 2.60's V2 Parquet reader starts 32 footer-reader actors per read (6-12 s on a
            # 2-core machine for a 12-row manifest, measured); the V1 reader takes 0.1 s.
            ctx.use_datasource_v2 = False
        ds = ray.data.read_parquet(uri)
        schema = ds.schema()
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read manifest {uri}: {type(e).__name__}: {e}") from None
    finally:
        if v2 is not None:
            ctx.use_datasource_v2 = v2
    wanted = columns if columns is not None else list(MANIFEST_COLUMNS)
    have = set(schema.names) if schema is not None else set()
    missing = [c for c in wanted if c not in have]
    if missing:
        raise DataError(f"manifest {uri} lacks column(s) {missing}; it has {sorted(have)} "
                        f"(expected the build_splits schema {list(MANIFEST_COLUMNS)})")
    return ds.select_columns(columns) if columns is not None else ds


def read_bytes(uri: str) -> bytes:
    """The bytes of a local path or a ``scheme://`` URI (pyarrow filesystems: s3, gs, hdfs, ...)."""
    if "://" not in uri or uri.startswith("file://"):
        with open(uri.removeprefix("file://"), "rb") as f:
            return f.read()
    fs, path = _fs_from_uri(uri.rsplit("/", 1)[0])
    with fs.open_input_stream(f"{path}/{uri.rsplit('/', 1)[1]}") as f:
        return f.read()


@functools.lru_cache(maxsize=64)
def _fs_from_uri(prefix: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(prefix)


def pass_index() -> int:
    """The current Ray Data execution index of the dataset being computed (0 outside Ray Data).

    Ray increments it after every complete pass (epoch) of a dataset; ``RandomSeedConfig``
    (``reseed_after_execution=True``) and ``ray.data.expressions.random`` use the same counter.
    """
    try:
        from ray.data import DataContext

        return int(getattr(DataContext.get_current(), "_execution_idx", 0))
    except Exception:  # noqa: BLE001 - Ray internals moved: fall back to a fixed pass
        return 0


def decode_train_batch(batch: dict[str, np.ndarray], *, lut: np.ndarray, augment: AugmentConfig,
                       seed: int, epoch: int | None = None) -> dict[str, np.ndarray]:
    """The training ``map_batches`` UDF: decode, remap labels, augment, normalise.

    Args:
        batch: numpy batch with ``image_id``, ``image_uri``, ``label_uri`` (strings).
        lut: ``uint8 [256]`` vocabulary id -> training id (255 = ignore).
        augment: augmentation settings.
        seed: the run's data seed.
        epoch: the pass index for the augmentation seed (default: :func:`pass_index`).

    Returns:
        ``{"image": float32 [B, 3, h, w], "label": uint8 [B, h, w]}`` with ``(h, w) =
        augment.crop_size``.

    Raises:
        DataError: an image or label cannot be read or decoded, or their sizes differ (names the
            image id and files).
    """
    epoch = pass_index() if epoch is None else epoch
    ids, img_uris, lbl_uris = batch["image_id"], batch["image_uri"], batch["label_uri"]
    n = len(ids)
    ch, cw = augment.crop_size
    images = np.empty((n, 3, ch, cw), dtype=np.float32)
    labels = np.empty((n, ch, cw), dtype=np.uint8)
    for i in range(n):
        image_id, img_uri, lbl_uri = str(ids[i]), str(img_uris[i]), str(lbl_uris[i])
        try:
            image, label = decode_pair(img_uri, lbl_uri)
            label = remap_label(label, lut)
            images[i], labels[i] = train_transform(image, label, augment, sample_rng(seed, image_id, epoch))
        except DataError as e:
            raise DataError(f"training image {image_id!r}: {e}") from None
    return {"image": images, "label": labels}


def decode_pair(image_uri: str, label_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode a manifest row's image and label PNG (local paths or store URIs).

    Returns:
        ``(image uint8 [H, W, 3] RGB, label uint8 [H, W] training/vocabulary ids, 255 ignore)``.

    Raises:
        DataError: a missing, unreadable or undecodable file, naming its URI.
    """
    out = []
    for uri, decode in ((image_uri, decode_image), (label_uri, decode_label)):
        if "://" not in uri:
            out.append(decode(uri))  # a local path: decode_* name it in their errors
            continue
        try:
            data = read_bytes(uri)
        except OSError as e:  # FileNotFoundError, permission, store errors
            raise DataError(f"{uri} cannot be read ({type(e).__name__}: {e})") from None
        try:
            out.append(decode(data))
        except DataError as e:
            raise DataError(f"{uri}: {e}") from None
    return out[0], out[1]


def train_dataset(manifest_uri: str | Path, lut: np.ndarray, augment: AugmentConfig, seed: int, *,
                  block_rows: int = 32, num_cpus: float = 1.0, concurrency: int | tuple[int, int] | None = None,
                  shuffle: bool = True) -> ray.data.Dataset:
    """The training feed: manifest rows -> augmented ``image``/``label`` arrays.

    Args:
        manifest_uri: the train manifest (``manifests/train.parquet`` of build_splits).
        lut: ``uint8 [256]`` vocabulary id -> training id, everything else 255 (see
            ``zeroseg.data.transforms.make_lut``).
        augment: augmentation settings (crop size, rescale, flip, mean/std).
        seed: data seed (row order per epoch, per-sample augmentation).
        block_rows: rows per decode task (also the ``map_batches`` batch size).
        num_cpus: CPUs reserved per decode task (fractions allowed).
        concurrency: ``map_batches`` concurrency (``None``: Ray Data decides).
        shuffle: shuffle the rows every epoch (seeded by ``(seed, pass)``).

    Returns:
        A lazy dataset with columns ``image`` (float32 ``[3, h, w]``) and ``label``
        (uint8 ``[h, w]``) per row.

    Raises:
        DataError: the manifest is missing, has no rows, or lacks a column.
        ValueError: ``lut`` is not ``uint8 [256]``.
    """
    from ray.data import RandomSeedConfig

    lut = np.asarray(lut)
    if lut.shape != (256,) or lut.dtype != np.uint8:
        raise ValueError(f"lut must be uint8 [256], got {lut.dtype} {lut.shape}")
    ds = read_manifest(manifest_uri, columns=["image_id", "image_uri", "label_uri"]).materialize()
    if ds.count() == 0:
        raise DataError(f"training manifest {manifest_uri} has no rows")
    if shuffle:
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=int(seed), reseed_after_execution=True))
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    # Ray Data's per-operator reservations split the CPUs between the (trivial) shuffle and
    # repartition operators and the decoder: measured on 2 CPUs, decode ran ~1 task at a time
    # with them and ~1.5 without.
    ds.context.op_resource_reservation_enabled = False
    return ds.map_batches(
        decode_train_batch,
        fn_kwargs={"lut": lut, "augment": augment, "seed": int(seed)},
        batch_size=block_rows,
        batch_format="numpy",
        num_cpus=num_cpus,
        concurrency=concurrency,
    )
