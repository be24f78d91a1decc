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

Modules: this one holds the records, the per-image pass (:func:`process_record`,
:func:`process_batch`), the held-out ``val`` draw and :func:`summarize`; the unseen-pixel
policies and label rewrites (:func:`apply_unseen_policy`, :func:`exclude_classes`,
:func:`heldout_label`, :func:`unlabeled_index`, the policy names) are in
``zeroseg.data.label_policy``; the frequency rule and seen-class validation
(:func:`frequency_split`, :func:`images_per_class`, :func:`pseudo_unseen_split`,
:func:`draw_pseudo_unseen` and their records) in ``zeroseg.data.split_rules``; the artifact's
files (:func:`write_manifest`, :func:`manifest_schema`, ``classes.json`` reading and writing,
label paths) in ``zeroseg.data.split_files``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from zeroseg.data.classes import Vocabulary
from zeroseg.data.coco import rasterize_coco, read_panoptic_label
from zeroseg.data.label_policy import (
    EVAL_POLICY,
    POLICIES,
    TRAIN_POLICIES,
    UNLABELED_POLICY,
    apply_unseen_policy,
    exclude_classes,
    heldout_label,
    label_ignore,
    unlabeled_index,
)
from zeroseg.data.mask_folder import read_mask_label
from zeroseg.data.readers import check_image, encode_png
from zeroseg.errors import BadImageError, ConfigError

ON_BAD_IMAGE = ("error", "skip")
TRAIN_SPLIT = "train"
VAL_SPLIT = "val"

#: Reasons a training image is left out (``stats.json`` ``dropped``).
DROP_UNSEEN = "unseen_pixels"
DROP_EMPTY = "no_labelled_pixels"
#: Policy ``drop`` under seen-class validation: the image holds a pixel of an excluded class (a
#: real unseen class of the benchmark, :func:`pseudo_unseen_split`).
DROP_EXCLUDED = "excluded_pixels"


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
    """Tag listed records (``read_coco`` / ``read_mask_folder``) with what :func:`process_record` needs.

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


# -- statistics ------------------------------------------------------------------------------
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
