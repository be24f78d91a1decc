"""Train/val/eval splits: the per-image pass, unseen-pixel policies, statistics, manifests.

The build_splits stage lists datasets (``zeroseg.data.readers``), tags each record with its split
and policy (:func:`make_records`), runs :func:`process_batch` over all records as a Ray Data
``map_batches`` pass, writes the returned label PNGs, and finishes with :func:`summarize` and
:func:`write_manifest`. Every function here also runs without Ray (tests call them directly).

Unseen-pixel policies for *training* images (never applied to evaluation sets, which keep all
classes):

* ``ignore`` (ZegFormer, ZegCLIP inductive setting): keep the image, set its unseen pixels to
  255 (ignore), so no unseen class reaches a training target;
* ``drop`` (PADing Sec. 4.1: "we discard the training images that contain even one pixel of any
  unseen classes"): leave out every image with at least one unseen pixel. A crowd region of an
  unseen class counts as unseen pixels although crowd regions are ignore in the label.

After the policy a training image whose label is entirely 255 (nothing labelled: no
annotations, only crowd regions, or only unseen pixels under ``ignore``) is dropped with reason
``no_labelled_pixels``: it would contribute nothing but compute. Evaluation sets keep such images
(they count ``no_labelled_pixels`` in the stats) so that an eval set holds every image of its
source.

Transductive training (ZegCLIP Sec. 4.3, ``build_splits.transductive``): policy ``unlabeled``
keeps the image and writes its unseen pixels as :func:`unlabeled_index` (255 - 1 = 254 for
``uint8`` labels, 65534 for ``uint16``), a value distinct from ignore that carries no class: the
training labels say which pixels have no seen label and hidden unseen ground truth, never which
unseen class they hold. The unseen ground truth itself goes to a separate *held-out* label
(:func:`heldout_label`: unseen ids on unseen pixels, ignore elsewhere), read only by self_train's
pseudo-label diagnostic, never as a target. An image whose label is all ignore is still dropped;
one with unlabelled-unseen pixels only is kept (self-training pseudo-labels them).

Frequency split (:func:`frequency_split`, ZegFormer's ADE20k-Full benchmark): seen = the classes
present in more than ``min_images`` training images, counted (:func:`images_per_class`) on the
results of a policy-free pass over the training images (the labels before the unseen policy).

Held-out validation: for a training dataset with a single set, ``val_fraction`` of its images
(chosen by :func:`split_unit`, a hash of image id and seed: the same for any input order) form
the evaluation set ``val`` with ALL classes (unseen ones included).

Seen-class validation (:func:`pseudo_unseen_split`, ZegFormer Sec. 4.1: hyperparameters are tuned
on "a subset of the training classes as a validation set", the cross-validation procedure of
SPNet): some *seen* classes of the benchmark split play unseen (*pseudo-unseen*), and the
benchmark's real unseen classes are *excluded*: they leave the vocabulary, and every label of the
run (training and ``val``) is rewritten into the smaller vocabulary with their pixels as ignore
(:func:`exclude_classes`, before the unseen policy; under ``drop`` an image with an excluded pixel
is dropped too, reason ``excluded_pixels``, as the benchmark run would drop it). The run then is an
ordinary GZS3 split of the remaining classes: the pseudo-unseen classes are its unseen classes
(kept out of training by the policy and the leakage guard, scored as unseen on ``val``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zeroseg.data.classes import IGNORE_INDEX, IGNORE_INDEX_16, Vocabulary, resolve_split
from zeroseg.data.readers import (
    check_image,
    encode_png,
    rasterize_coco,
    read_mask_label,
    read_panoptic_label,
)
from zeroseg.errors import BadImageError, ConfigError, DataError

POLICIES = ("ignore", "drop")
#: The transductive training policy: unseen pixels -> :func:`unlabeled_index` (module docstring).
UNLABELED_POLICY = "unlabeled"
#: Training policies (an all-ignore training image is dropped under each).
TRAIN_POLICIES = (*POLICIES, UNLABELED_POLICY)
EVAL_POLICY = "eval"
ON_BAD_IMAGE = ("error", "skip")
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"

#: Reasons a training image is left out (``stats.json`` ``dropped``).
DROP_UNSEEN = "unseen_pixels"
DROP_EMPTY = "no_labelled_pixels"
#: Policy ``drop`` under seen-class validation: the image holds a pixel of an excluded class (a
#: real unseen class of the benchmark, :func:`pseudo_unseen_split`).
DROP_EXCLUDED = "excluded_pixels"


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


def unlabeled_index(ignore: int) -> int:
    """The label value of an unlabelled-unseen pixel in a transductive training label whose
    ignore is ``ignore``: ``ignore - 1`` (254 for ``uint8`` labels, 65534 for ``uint16``)."""
    return int(ignore) - 1


def check_transductive_vocabulary(num_classes: int, dataset: str, key: str = "build_splits.transductive") -> int:
    """The unlabelled-unseen value for a vocabulary of ``num_classes`` classes (:func:`unlabeled_index`).

    Raises:
        ConfigError: the value is a class id (255 classes in ``uint8`` labels, 65535 in ``uint16``):
            naming ``key``.
    """
    from zeroseg.data.classes import label_ignore_index

    value = unlabeled_index(label_ignore_index(num_classes))
    if num_classes > value:
        raise ConfigError(
            f"{key}: dataset {dataset!r} has {num_classes} classes, so label value {value} is a class id and cannot "
            "mark unlabelled-unseen pixels; transductive splits take at most 254 classes (8-bit labels) or "
            "65534 (16-bit)"
        )
    return value


# -- deterministic splitting -----------------------------------------------------------------
def split_unit(image_id: str, seed: int) -> float:
    """A uniform number in ``[0, 1)`` from ``sha256(f"{seed}:{image_id}")`` (first 8 bytes).

    Depends only on the image id and the seed: the same for any input order or subset."""
    d = hashlib.sha256(f"{int(seed)}:{image_id}".encode()).digest()
    return int.from_bytes(d[:8], "big") / 2.0**64


def assign_val(image_ids: Iterable[str], val_fraction: float, seed: int) -> set[str]:
    """The image ids held out for ``val``: those with ``split_unit(id, seed) < val_fraction``.

    The held-out share is ``val_fraction`` in expectation (binomial), not exactly.

    Raises:
        ConfigError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return {i for i in image_ids if split_unit(i, seed) < val_fraction}


def truncate(records: Sequence[dict[str, Any]], max_images: int | None) -> list[dict[str, Any]]:
    """The first ``max_images`` records by sorted ``image_id`` (all when None)."""
    recs = sorted(records, key=lambda r: r["image_id"])
    return recs if max_images is None else recs[: int(max_images)]


def make_records(
    records: Iterable[dict[str, Any]],
    *,
    split: str,
    dataset: str,
    policy: str,
    unseen: Iterable[int],
    num_classes: int,
    excluded: Iterable[int] = (),
) -> list[dict[str, Any]]:
    """Tag listed records (``readers.read_*``) with what :func:`process_record` needs.

    Args:
        split: the output split name (``train``, ``val`` or an eval set name).
        dataset: the dataset name written into the manifest.
        policy: ``ignore`` or ``drop`` for training, ``eval`` for evaluation sets.
        unseen: the unseen vocabulary ids of this split's vocabulary (after ``excluded`` is
            removed: ids of the label written).
        num_classes: the dataset's vocabulary size (of the labels as read).
        excluded: dataset class ids removed from the vocabulary (seen-class validation,
            :func:`pseudo_unseen_split`): :func:`exclude_classes` rewrites the label first.
    """
    if policy not in (*TRAIN_POLICIES, EVAL_POLICY):
        raise ConfigError(f"unseen_policy {policy!r} is unknown; use one of {', '.join(POLICIES)}")
    u = sorted(int(i) for i in unseen)
    x = sorted(int(i) for i in excluded)
    return [
        {
            **r,
            "split": split,
            "dataset": dataset,
            "policy": policy,
            "unseen": u,
            "num_classes": int(num_classes),
            **({"excluded": x} if x else {}),
        }
        for r in records
    ]


# -- the per-image pass ----------------------------------------------------------------------
def apply_unseen_policy(
    label: np.ndarray, unseen: Sequence[int], policy: str, crowd: Sequence[tuple[int, int]] = ()
) -> tuple[np.ndarray | None, int]:
    """Apply a training policy to one label map.

    Args:
        label: ``uint8 [H, W]`` vocabulary ids, 255 ignore (``uint16``, 65535 ignore, for a
            vocabulary of more than 255 classes).
        unseen: unseen vocabulary ids.
        policy: ``ignore`` (unseen pixels -> ignore), ``drop`` (PADing: drop the image if it has one
            unseen pixel, crowd regions included), ``unlabeled`` (transductive: unseen pixels ->
            :func:`unlabeled_index`) or ``eval`` (unchanged).
        crowd: ``(vocabulary id, pixels)`` of the image's crowd regions.

    Returns:
        ``(label or None when dropped, number of unseen pixels before the policy)``; the label
        is a new array when changed.
    """
    if len(unseen):
        mask = np.isin(label, np.asarray(unseen, dtype=label.dtype))
        n = int(mask.sum())
    else:
        mask, n = None, 0
    n_crowd = sum(px for c, px in crowd if c in set(unseen))
    if policy == "drop":
        return (None if n + n_crowd > 0 else label), n + n_crowd
    if policy in ("ignore", UNLABELED_POLICY) and n:
        label = label.copy()
        ignore = label_ignore(label)
        label[mask] = ignore if policy == "ignore" else unlabeled_index(ignore)
    return label, n + n_crowd


def exclude_classes(
    label: np.ndarray, excluded: Sequence[int], num_classes: int, crowd: Sequence[tuple[int, int]] = ()
) -> tuple[np.ndarray, list[tuple[int, int]], int]:
    """Remove classes from a label map's vocabulary (seen-class validation, :func:`pseudo_unseen_split`).

    The remaining classes keep their order: class ``c`` becomes ``c - (number of excluded ids
    below c)``; excluded pixels become ignore. The result's dtype and ignore follow the smaller
    vocabulary (``uint8`` / 255 up to 255 classes, else ``uint16`` / 65535).

    Args:
        label: ``uint8`` or ``uint16 [H, W]`` ids of a vocabulary of ``num_classes`` classes.
        excluded: the dataset class ids to remove.
        num_classes: the vocabulary size before the removal.
        crowd: ``(class id, pixels)`` of the image's crowd regions (``readers.rasterize_coco``).

    Returns:
        ``(label, crowd, excluded pixels)``: the rewritten label; the crowd regions of the kept
        classes with their new ids; the pixels of excluded classes in the label plus those of
        excluded crowd regions (counted as the unseen policy counts unseen pixels).
    """
    from zeroseg.data.classes import label_ignore_index

    gone = sorted({int(i) for i in excluded})
    keep = [i for i in range(int(num_classes)) if i not in set(gone)]
    new_ignore = label_ignore_index(len(keep))
    lut = np.full(int(label_ignore(label)) + 1, new_ignore, dtype=np.uint8 if new_ignore == IGNORE_INDEX else np.uint16)
    lut[keep] = np.arange(len(keep))
    n = int(np.isin(label, np.asarray(gone, dtype=label.dtype)).sum()) if gone else 0
    new_id = {c: k for k, c in enumerate(keep)}
    kept_crowd = [(new_id[int(c)], px) for c, px in crowd if int(c) in new_id]  # a class-less region counts nowhere
    n += sum(px for c, px in crowd if int(c) in set(gone))
    return lut[label], kept_crowd, n


def heldout_label(label: np.ndarray, unseen: Sequence[int]) -> np.ndarray:
    """The held-out unseen ground truth of a transductive training image: ``label``'s unseen
    class ids on its unseen pixels, ignore everywhere else (same dtype). Read only by
    self_train's pseudo-label diagnostic, never as a training target."""
    out = np.full_like(label, label_ignore(label))
    if len(unseen):
        mask = np.isin(label, np.asarray(unseen, dtype=label.dtype))
        out[mask] = label[mask]
    return out


def label_ignore(label: np.ndarray) -> int:
    """The ignore value of a vocabulary-id label map by its dtype: 255 for ``uint8``, 65535 for
    ``uint16`` (vocabularies of more than 255 classes).

    Raises:
        ValueError: another dtype.
    """
    if label.dtype == np.uint8:
        return IGNORE_INDEX
    if label.dtype == np.uint16:
        return IGNORE_INDEX_16
    raise ValueError(f"label maps are uint8 or uint16, got {label.dtype}")


def process_record(
    record: Mapping[str, Any], on_bad_image: str = "error", encode: bool = True
) -> tuple[dict[str, Any], bytes | None]:
    """:func:`process_record_heldout` without the held-out label (see there)."""
    res, png, _ = process_record_heldout(record, on_bad_image, encode)
    return res, png


def process_record_heldout(
    record: Mapping[str, Any], on_bad_image: str = "error", encode: bool = True
) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """Decode-check, rasterise and apply the policy to one image (the work of one Ray Data row).

    Args:
        record: a record from :func:`make_records` (``kind`` ``coco`` / ``panoptic`` / ``mask``).
        on_bad_image: ``error`` raises on a bad image file; ``skip`` returns status ``skipped``.
        encode: return the label PNG (False: ``png`` is None; the counting pass of the frequency
            rule needs only ``classes``).

    Returns:
        ``(result, png)``: ``result`` is JSON-serialisable: ``image_id``, ``split``, ``dataset``,
        ``image_uri``, ``status`` (``kept`` / ``dropped`` / ``skipped``), ``reason`` (drop
        reason or the skip error), ``height``, ``width`` (pixels), ``classes`` (sorted ids present
        after the policy), ``pixels`` (``{id: count}`` after the policy, kept images only),
        ``unseen_pixels`` (before the policy), ``no_annotations``, ``empty`` (all-ignore label),
        with ``excluded`` in the record ``excluded_pixels`` (:func:`exclude_classes`; under ``drop``
        an image with one is dropped, reason ``excluded_pixels``);
        ``png`` is the encoded label (vocabulary ids; ``uint8`` with 255 ignore, or 16-bit with
        65535 ignore for a vocabulary of more than 255 classes) for kept images, else None;
        third, under policy ``unlabeled``, the encoded :func:`heldout_label` of a kept image (else
        None). Under ``unlabeled`` ``unlabeled_pixels`` counts the marked pixels and ``classes``
        never holds the marker.

    Raises:
        BadImageError: with ``on_bad_image="error"``: a missing, corrupt or truncated image, or an
            image whose size differs from its annotation / label.
        DataError: an invalid annotation or label (always, whatever ``on_bad_image``).
    """
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image {on_bad_image!r} is unknown; use one of {', '.join(ON_BAD_IMAGE)}")
    res: dict[str, Any] = {
        "image_id": record["image_id"],
        "split": record["split"],
        "dataset": record["dataset"],
        "image_uri": record["image_path"],
        "status": "kept",
        "reason": None,
        "height": None,
        "width": None,
        "classes": [],
        "pixels": {},
        "unseen_pixels": 0,
        "no_annotations": bool(record.get("no_annotations")),
        "empty": False,
    }
    kind = record["kind"]
    try:
        h, w = check_image(record["image_path"])
        if kind in ("coco", "panoptic") and (h, w) != (record["height"], record["width"]):
            raise BadImageError(
                f"image {record['image_path']} is {w}x{h} but its annotation says "
                f"{record['width']}x{record['height']} (width x height)"
            )
        if kind == "coco":
            label, crowd = rasterize_coco(record["anns"], h, w)
        elif kind == "panoptic":
            label, crowd = read_panoptic_label(record.get("png"), record["segments"], h, w)
        elif kind == "mask":
            label = read_mask_label(
                record["label_path"], record["num_classes"], record["ignore_index"], record["reduce_zero_label"]
            )
            crowd = []
            if label.shape != (h, w):
                raise BadImageError(
                    f"image {record['image_path']} is {w}x{h} but its label {record['label_path']} "
                    f"is {label.shape[1]}x{label.shape[0]}"
                )
        else:
            raise ValueError(f"unknown record kind {kind!r}")
    except BadImageError as e:
        if on_bad_image == "skip":
            res.update(status="skipped", reason=str(e))
            return res, None, None
        raise
    res.update(height=int(h), width=int(w))
    policy = record["policy"]
    if record.get("excluded"):  # seen-class validation: the benchmark's unseen classes leave the vocabulary
        label, crowd, res["excluded_pixels"] = exclude_classes(label, record["excluded"], record["num_classes"], crowd)
        if policy == "drop" and res["excluded_pixels"]:
            res.update(status="dropped", reason=DROP_EXCLUDED)
            return res, None, None
    held = heldout_label(label, record.get("unseen", ())) if policy == UNLABELED_POLICY else None
    label, n_unseen = apply_unseen_policy(label, record.get("unseen", ()), policy, crowd)
    res["unseen_pixels"] = n_unseen
    if label is None:
        res.update(status="dropped", reason=DROP_UNSEEN)
        return res, None, None
    ignore = label_ignore(label)
    counts = np.bincount(label.ravel(), minlength=ignore + 1)
    res["empty"] = bool(counts[ignore] == label.size)
    if res["empty"] and policy in TRAIN_POLICIES:
        res.update(status="dropped", reason=DROP_EMPTY)
        return res, None, None
    upto = unlabeled_index(ignore) if policy == UNLABELED_POLICY else ignore  # the marker is no class
    present = [int(i) for i in np.flatnonzero(counts[:upto])]
    res["classes"] = present
    res["pixels"] = {str(i): int(counts[i]) for i in present}
    if policy == UNLABELED_POLICY:
        res["unlabeled_pixels"] = int(counts[upto])
    if not encode:
        return res, None, None
    return res, encode_png(label), (encode_png(held) if held is not None else None)


def process_batch(batch: Mapping[str, Any], on_bad_image: str = "error", labels: bool = True) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` UDF over JSON records (``batch_format="numpy"``).

    Args:
        batch: ``{"record": [json string of a make_records record, ...]}``.
        labels: return the label PNGs (False: every ``png`` is ``b""``).

    Returns:
        ``{"result": [json of process_record's result], "png": [label PNG bytes, b"" if none],
        "heldout": [held-out unseen label PNG bytes (policy ``unlabeled``), b"" if none]}``.

    Raises:
        DataError: as :func:`process_record` (the stage runs this wrapped in
            ``pipeline.errors.carry_user_errors``, so the driver gets the same error).
    """
    results, pngs, held = [], [], []
    for raw in batch["record"]:
        res, png, h = process_record_heldout(json.loads(raw), on_bad_image, encode=labels)
        results.append(json.dumps(res))
        pngs.append(png or b"")
        held.append(h or b"")
    return {
        "result": np.array(results, dtype=object),
        "png": np.array(pngs, dtype=object),
        "heldout": np.array(held, dtype=object),
    }


def label_path(output_dir: str | os.PathLike, split: str, image_id: str) -> Path:
    """Where build_splits writes a label PNG: ``<output_dir>/labels/<split>/<image_id>.png``."""
    return Path(output_dir) / "labels" / split / f"{image_id}.png"


def heldout_path(output_dir: str | os.PathLike, split: str, image_id: str) -> Path:
    """Where build_splits writes a transductive training image's held-out unseen label:
    ``<output_dir>/heldout/<split>/<image_id>.png``."""
    return Path(output_dir) / "heldout" / split / f"{image_id}.png"


# -- the frequency rule ----------------------------------------------------------------------
def images_per_class(results: Iterable[Mapping[str, Any]], num_classes: int) -> tuple[list[int], int]:
    """How many images each class is present in.

    Args:
        results: :func:`process_record` results; skipped (unreadable) images are not counted.
        num_classes: the vocabulary size C.

    Returns:
        ``(counts, images)``: ``counts[c]`` = number of counted images whose ``classes`` hold
        ``c`` (an image counts once per class, whatever its pixel count), ``images`` = number
        of counted images.
    """
    counts = [0] * int(num_classes)
    images = 0
    for r in results:
        if r["status"] == "skipped":
            continue
        images += 1
        for c in set(r["classes"]):
            counts[int(c)] += 1
    return counts, images


def frequency_split(
    names: Sequence[str],
    counts: Sequence[int],
    *,
    min_images: int,
    dataset: str,
    images: int,
    key: str = "build_splits.split.min_images",
) -> Vocabulary:
    """The seen/unseen split by class frequency: ZegFormer's ADE20k-Full benchmark.

    A class is *seen* when it is present in more than ``min_images`` training images
    (``counts[c] > min_images``), else *unseen* (absent classes included).

    Source: ZegFormer Sec. 4.1 ("The seen classes are present in more than 10 images, while the
    unseen classes are present in less than 10 images", 572 seen / 275 unseen of ADE20k-Full's 847).
    The paper leaves a class in exactly 10 images unassigned; the released code
    (dingjiansw101/ZegFormer, datasets/ade20k-full-frequency-split/prepare_ade20k_full_frequency_seen.py)
    takes as unseen the classes whose LVIS-style ``frequency`` tag is ``rare`` (1-10 images) and
    as seen the others (more than 10): ``counts > min_images`` is that rule.

    Args:
        names: the training vocabulary in label-id order.
        counts: ``counts[c]`` = training images class ``c`` is present in (:func:`images_per_class`).
        min_images: the threshold (ZegFormer: 10).
        dataset: the dataset name, for messages.
        images: how many images were counted, for messages.
        key: the config key named by the errors.

    Returns:
        a :class:`Vocabulary` (``zeroseg.data.classes.resolve_split`` with the derived unseen list).

    Raises:
        ConfigError: no class or every class is present in more than ``min_images`` images (no
            seen / no unseen class: naming ``key``, the counts and the value that would split);
            ``counts`` not one per class; names as :func:`zeroseg.data.classes.resolve_split`.
    """
    if len(counts) != len(names):
        raise ConfigError(f"dataset {dataset!r}: {len(counts)} class counts for {len(names)} classes")
    seen = [i for i, c in enumerate(counts) if c > min_images]
    unseen = [i for i, c in enumerate(counts) if c <= min_images]
    top = max(counts, default=0)
    if not seen:
        raise ConfigError(
            f"{key} = {min_images}: no class of dataset {dataset!r} is present in more than {min_images} of "
            f"its {images} training images (the most frequent class is in {top}), so no class would be "
            f"seen; set {key} below {top}"
        )
    if not unseen:
        low = min(counts)
        raise ConfigError(
            f"{key} = {min_images}: every class of dataset {dataset!r} is present in more than {min_images} of "
            f"its {images} training images (the rarest class is in {low}), so no class would be unseen; "
            f"set {key} to at least {low}"
        )
    return resolve_split(names, dataset=dataset, unseen=[names[i] for i in unseen])


def frequency_record(vocab: Vocabulary, counts: Sequence[int], *, min_images: int, images: int) -> dict[str, Any]:
    """The ``split`` entry of ``classes.json`` / ``stats.json`` for the frequency rule:
    ``{"rule": "frequency", "min_images", "counted_images", "counted": what was counted,
    "images_per_class": {name: images}}`` (names in label-id order)."""
    return {
        "rule": "frequency",
        "min_images": int(min_images),
        "counted_images": int(images),
        "counted": "training images (held-out val excluded, skipped images excluded) whose label holds at "
        "least one pixel of the class, before the unseen-pixel policy",
        "images_per_class": {n: int(c) for n, c in zip(vocab.names, counts)},
    }


# -- seen-class validation -------------------------------------------------------------------
#: What a seen-class validation run is, for ``classes.json`` / ``stats.json`` and messages.
PSEUDO_UNSEEN_PROTOCOL = (
    "seen-class validation (ZegFormer Sec. 4.1, SPNet's cross-validation): pseudo-unseen seen classes play "
    "unseen; the benchmark's unseen classes are excluded (not in any vocabulary, their pixels ignore); not the "
    "benchmark's test protocol"
)


def draw_pseudo_unseen(names: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` of ``names`` drawn deterministically: those with the smallest
    :func:`split_unit` ``(name, seed)`` (a hash of the class name and the seed), in ``names`` order.

    Depends only on the names, ``count`` and ``seed``, not on their order or the rest of the vocabulary.
    """
    drawn = set(sorted(names, key=lambda n: (split_unit(n, seed), n))[: int(count)])
    return [n for n in names if n in drawn]


def pseudo_unseen_split(
    train: Vocabulary,
    *,
    pseudo_unseen: Sequence[str] | None = None,
    count: int | None = None,
    seed: int = 0,
    key: str = "build_splits.split",
) -> tuple[Vocabulary, tuple[int, ...]]:
    """The vocabulary of a seen-class validation run of the benchmark split ``train``.

    ZegFormer Sec. 4.1 tunes its hyperparameters on "a subset of the training classes as a
    validation set, following the cross-validation procedure" of SPNet (Xian et al., CVPR 2019,
    whose released split holds out 12 of the seen COCO-Stuff classes and 2000 training images;
    ``zeroseg.data.builtin_splits.COCO_STUFF_SPNET_VAL``): some seen classes play unseen, and the real
    unseen classes are never looked at. Here:

    * the *pseudo-unseen* classes are the seen classes named in ``pseudo_unseen``, or ``count``
      seen classes drawn with :func:`draw_pseudo_unseen` (``seed``: ``build_splits.seed``);
    * the benchmark's unseen classes are *excluded*: the returned vocabulary is ``train``'s
      without them (the other classes in their order, ids renumbered; labels are rewritten by
      :func:`exclude_classes`), so no stage sees their names or their pixels;
    * seen = the other seen classes, unseen = the pseudo-unseen ones.

    Args:
        train: the benchmark's training vocabulary (``resolve_split`` / ``frequency_split``).
        pseudo_unseen: seen class names; or ``count``: how many to draw (exactly one of both).
        seed: the draw's seed.
        key: the config key named by the errors.

    Returns:
        ``(vocabulary, excluded)``: the run's training vocabulary (``ignore_index`` by its size) and
        the excluded class ids of ``train`` (its unseen ids).

    Raises:
        ConfigError: naming ``key``: an unknown or repeated name (with the nearest names), a name
            that is an unseen class of the benchmark split, every seen class pseudo-unseen (or
            ``count`` not below the number of seen classes), both or neither of the two ways.
    """
    from zeroseg.data.classes import label_ignore_index, nearest_names

    if (pseudo_unseen is None) == (count is None):
        raise ConfigError(f"{key}: give either pseudo_unseen (class names) or pseudo_unseen_count, exactly one")
    seen_names = train.seen_names
    if pseudo_unseen is not None:
        index = {n: i for i, n in enumerate(train.names)}
        for n in pseudo_unseen:
            if n not in index:
                near = nearest_names(n, train.names)
                hint = f"; nearest: {', '.join(repr(x) for x in near)}" if near else ""
                raise ConfigError(
                    f"{key}.pseudo_unseen: {n!r} is not a class of dataset {train.dataset!r}{hint}; name seen classes "
                    "of its vocabulary"
                )
        dup = sorted({n for n in pseudo_unseen if list(pseudo_unseen).count(n) > 1})
        if dup:
            raise ConfigError(f"{key}.pseudo_unseen names {dup} more than once; list each class once")
        real = [n for n in pseudo_unseen if index[n] in set(train.unseen)]
        if real:
            raise ConfigError(
                f"{key}.pseudo_unseen: {real} {'is an unseen class' if len(real) == 1 else 'are unseen classes'} of "
                f"the benchmark split of {train.dataset!r}; a seen-class validation never looks at the unseen "
                "classes (they are excluded from the run), so pseudo-unseen classes must be seen ones: remove "
                f"{'it' if len(real) == 1 else 'them'} (seen classes: {', '.join(seen_names[:8])}"
                f"{', ...' if len(seen_names) > 8 else ''})"
            )
        if len(set(pseudo_unseen)) >= len(seen_names):
            raise ConfigError(
                f"{key}.pseudo_unseen names all {len(seen_names)} seen classes of {train.dataset!r}: no class would "
                "be left to train on; leave at least one seen class out of the list"
            )
        chosen = set(pseudo_unseen)
    else:
        if int(count) >= len(seen_names):
            raise ConfigError(
                f"{key}.pseudo_unseen_count = {count}, but the benchmark split of {train.dataset!r} has "
                f"{len(seen_names)} seen classes: no class would be left to train on; set it below {len(seen_names)}"
            )
        chosen = set(draw_pseudo_unseen(seen_names, int(count), seed))
    excluded = tuple(train.unseen)
    keep = [i for i in range(len(train.names)) if i not in set(excluded)]
    names = tuple(train.names[i] for i in keep)
    vocab = Vocabulary(
        dataset=train.dataset,
        names=names,
        prompt_names=tuple(train.prompt_names[i] for i in keep),
        seen=tuple(k for k, i in enumerate(keep) if i in set(train.seen) and train.names[i] not in chosen),
        unseen=tuple(k for k, i in enumerate(keep) if train.names[i] in chosen),
        ignore_index=label_ignore_index(len(names)),
    )
    return vocab, excluded


def pseudo_unseen_record(vocab: Vocabulary, benchmark: Vocabulary, how: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pseudo_unseen`` entry of ``classes.json`` / ``stats.json``: ``{"protocol", "how"
    (the config's pseudo_unseen / pseudo_unseen_count and seed), "pseudo_unseen": [names],
    "excluded": [the benchmark's unseen names], "benchmark_classes": n}``."""
    return {
        "protocol": PSEUDO_UNSEEN_PROTOCOL,
        "how": dict(how),
        "pseudo_unseen": list(vocab.unseen_names),
        "excluded": list(benchmark.unseen_names),
        "benchmark_classes": len(benchmark.names),
    }


# -- statistics and outputs ------------------------------------------------------------------
def summarize(results: Iterable[Mapping[str, Any]], vocab: Vocabulary, *, policy: str) -> dict[str, Any]:
    """``stats.json`` entry of one split.

    Args:
        results: :func:`process_record` results of the split.
        vocab: the split's vocabulary.
        policy: ``ignore`` / ``drop`` (training) or ``eval``.

    Returns:
        ``{"dataset", "policy", "images_total", "kept", "dropped": {reason: n}, "dropped_total",
        "skipped", "skipped_files": [{"file", "error"}], "no_annotations", "no_labelled_pixels"
        (kept all-ignore images: eval sets only), "images_with_unseen" (before the policy),
        "unseen_pixels" (before the policy), "excluded_pixels" (seen-class validation only: pixels
        of excluded classes, :func:`exclude_classes`), "pixels_per_class": {name: pixels} (kept images),
        "unseen_present": [unseen class names with pixels in the kept labels]}``.
    """
    results = list(results)
    dropped = Counter(r["reason"] for r in results if r["status"] == "dropped")
    pixels = Counter()
    for r in results:
        if r["status"] == "kept":
            for k, v in r["pixels"].items():
                pixels[int(k)] += v
    skipped = sorted(
        ({"file": r["image_uri"], "error": r["reason"]} for r in results if r["status"] == "skipped"),
        key=lambda d: d["file"],
    )
    return {
        "dataset": vocab.dataset,
        "policy": policy,
        "images_total": len(results),
        "kept": sum(r["status"] == "kept" for r in results),
        "dropped": dict(sorted(dropped.items())),
        "dropped_total": sum(dropped.values()),
        "skipped": len(skipped),
        "skipped_files": skipped,
        "no_annotations": sum(bool(r.get("no_annotations")) for r in results),
        "no_labelled_pixels": sum(r["status"] == "kept" and bool(r.get("empty")) for r in results),
        "images_with_unseen": sum(r.get("unseen_pixels", 0) > 0 for r in results if r["status"] != "skipped"),
        "unseen_pixels": sum(r.get("unseen_pixels", 0) for r in results if r["status"] != "skipped"),
        **(
            {"excluded_pixels": sum(r.get("excluded_pixels", 0) for r in results if r["status"] != "skipped")}
            if any("excluded_pixels" in r for r in results)
            else {}
        ),
        "pixels_per_class": {vocab.names[i]: pixels.get(i, 0) for i in range(len(vocab.names))},
        "unseen_present": [vocab.names[i] for i in vocab.unseen if pixels.get(i, 0) > 0],
    }


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
