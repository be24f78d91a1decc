"""Unseen-pixel policies of training labels and the per-label rewrites of build_splits.

A training label goes through :func:`exclude_classes` (seen-class validation: the benchmark's
unseen classes leave the vocabulary) and then :func:`apply_unseen_policy` (``ignore``, ``drop``
or the transductive ``unlabeled``); under ``unlabeled`` :func:`heldout_label` keeps its unseen
ground truth apart. Evaluation sets keep every class (policy ``eval``). The rules and their
sources are in the ``zeroseg.data.splits`` module docstring. Nothing here imports Ray or the
pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from zeroseg.data.classes import IGNORE_INDEX, IGNORE_INDEX_16, label_ignore_index
from zeroseg.errors import ConfigError

POLICIES = ("ignore", "drop")
#: The transductive training policy: unseen pixels -> :func:`unlabeled_index` (module docstring).
UNLABELED_POLICY = "unlabeled"
#: Training policies (an all-ignore training image is dropped under each).
TRAIN_POLICIES = (*POLICIES, UNLABELED_POLICY)
EVAL_POLICY = "eval"


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
    value = unlabeled_index(label_ignore_index(num_classes))
    if num_classes > value:
        raise ConfigError(
            f"{key}: dataset {dataset!r} has {num_classes} classes, so label value {value} is a class id and cannot "
            "mark unlabelled-unseen pixels; transductive splits take at most 254 classes (8-bit labels) or "
            "65534 (16-bit)"
        )
    return value


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
        crowd: ``(class id, pixels)`` of the image's crowd regions (``zeroseg.data.coco.rasterize_coco``).

    Returns:
        ``(label, crowd, excluded pixels)``: the rewritten label; the crowd regions of the kept
        classes with their new ids; the pixels of excluded classes in the label plus those of
        excluded crowd regions (counted as the unseen policy counts unseen pixels).
    """
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
