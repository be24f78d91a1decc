"""Mask-folder reader (VOC / ADE20K / CamVid layout): an image directory and a label directory
of class-index PNGs (8-bit, or 16-bit for more than 255 classes) -> per-image records, and the
per-image remapping of a label file to vocabulary ids.

The label rules (``ignore_index``, ``reduce_zero_label``, 16-bit labels) are in the
``zeroseg.data.readers`` module docstring; the common parts (:class:`DatasetListing`,
``read_class_file``) are there too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from zeroseg.data.classes import IGNORE_INDEX, MAX_CLASSES, label_dtype_name, label_ignore_index
from zeroseg.data.readers import IMAGE_SUFFIXES, DatasetListing, read_class_file
from zeroseg.errors import ConfigError, DataError


# -- mask folders ----------------------------------------------------------------------------
def read_mask_folder(
    images: str | os.PathLike,
    labels: str | os.PathLike,
    classes: str | os.PathLike | Sequence[str],
    *,
    ignore_index: int | None = None,
    reduce_zero_label: bool = False,
    label_suffix: str = ".png",
    ids_file: str | os.PathLike | None = None,
    dataset: str = "masks",
) -> DatasetListing:
    """List a mask-folder dataset (VOC / ADE20K / CamVid layout): an image directory and a label
    directory whose PNGs share the images' file stems.

    Args:
        images: image directory (files with an image suffix, not recursive).
        labels: label directory; the label of ``images/<stem>.<ext>`` is ``labels/<stem><label_suffix>``.
        classes: a list of names (label-value order), or a json file
            ``{"classes": [...], "ignore_index": k}``.
        ignore_index: the dataset's ignore value (overrides the file's; default 255, or 65535 for
            more than 255 classes).
        reduce_zero_label: value 0 is ignore and v -> v - 1 (ADE20K, VOC without background);
            ``classes`` then names values 1, 2, ...
        label_suffix: label file suffix after the stem.
        ids_file: optional text file of stems to use, one per line (e.g. VOC
            ``ImageSets/Segmentation/train.txt``); default: every image in ``images``.
        dataset: the dataset name, for messages.

    Returns:
        a :class:`DatasetListing` (records sorted by stem; each names its label file).

    Raises:
        DataError: a missing directory or class file; an image without a label file (naming
            both); two images with the same stem; an ids_file stem without image.
        ConfigError: an ignore index that is also a class value.
    """
    images_dir, labels_dir = Path(images), Path(labels)
    files: list[Path] = []
    if isinstance(classes, (str, os.PathLike)):
        names, file_ignore = read_class_file(classes)
        files.append(Path(classes))
    else:
        names, file_ignore = list(classes), None
    default_ignore = label_ignore_index(min(len(names), MAX_CLASSES))  # 255, or 65535 above 255 classes
    ign = ignore_index if ignore_index is not None else (file_ignore if file_ignore is not None else default_ignore)
    if not reduce_zero_label and 0 <= ign < len(names):
        raise ConfigError(
            f"dataset {dataset!r}: ignore_index {ign} is also the label value of class "
            f"{names[ign]!r}; fix ignore_index or the class list"
        )
    if reduce_zero_label and 1 <= ign <= len(names):
        raise ConfigError(
            f"dataset {dataset!r}: ignore_index {ign} is also the label value of class "
            f"{names[ign - 1]!r} (reduce_zero_label); fix ignore_index or the class list"
        )
    for d, what in ((images_dir, "image"), (labels_dir, "label")):
        if not d.is_dir():
            raise DataError(f"dataset {dataset!r}: {what} directory {d} does not exist")
    by_stem: dict[str, Path] = {}
    for p in sorted(images_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in by_stem:
                raise DataError(
                    f"dataset {dataset!r}: images {by_stem[p.stem].name} and {p.name} share the stem "
                    f"{p.stem!r}; labels are matched by stem, so stems must be unique"
                )
            by_stem[p.stem] = p
    if ids_file is not None:
        idf = Path(ids_file)
        if not idf.is_file():
            raise DataError(f"dataset {dataset!r}: ids_file {idf} does not exist")
        files.append(idf)
        stems = sorted({ln.strip() for ln in idf.read_text().splitlines() if ln.strip()})
    else:
        stems = sorted(by_stem)
    records = []
    for s in stems:
        img = by_stem.get(s)
        if img is None:
            raise DataError(
                f"dataset {dataset!r}: ids_file {ids_file} lists {s!r} but {images_dir} has no image "
                f"with that stem (suffixes {', '.join(sorted(IMAGE_SUFFIXES))}); fix the id or add the image"
            )
        lbl = labels_dir / (s + label_suffix)
        if not lbl.is_file():
            raise DataError(
                f"dataset {dataset!r}: missing label file {lbl} for image {img}; every image needs a "
                f"label with the same stem in {labels_dir} (or list the images to use in ids_file)"
            )
        records.append(
            {
                "image_id": s,
                "image_path": str(img.resolve()),
                "kind": "mask",
                "label_path": str(lbl.resolve()),
                "num_classes": len(names),
                "ignore_index": int(ign),
                "reduce_zero_label": bool(reduce_zero_label),
                "no_annotations": False,
            }
        )
    return DatasetListing(names=names, records=records, ignore_index=int(ign), files=files)


def read_mask_label(
    path: str | os.PathLike, num_classes: int, ignore_index: int = IGNORE_INDEX, reduce_zero_label: bool = False
) -> np.ndarray:
    """Read a class-index label image and remap it to vocabulary ids.

    Args:
        path: the label image: PIL mode ``L`` or ``P`` (palette indices are the values), or a
            16-bit single-channel PNG / TIFF (modes ``I;16``, ``I;16B``, ``I`` with values in
            ``[0, 65535]``: ADE20k-Full's released labels).
        num_classes: number of classes C in the class list.
        ignore_index: the dataset's ignore value -> the vocabulary's ignore
            (``label_ignore_index(C)``: 255 for C <= 255, else 65535).
        reduce_zero_label: 0 -> ignore and v -> v - 1 (then values 1..C are the classes).

    Returns:
        ``uint8 [H, W]`` with values in ``[0, C)`` or 255 when C <= 255, else ``uint16 [H, W]``
        with values in ``[0, C)`` or 65535.

    Raises:
        DataError: missing or undecodable file, a multi-channel label, or a value that is neither
            a class nor the ignore index (naming the file, the values and C).
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.load()
            mode = im.mode
            arr = np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"missing label file {p}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"label file {p} cannot be decoded ({type(e).__name__}: {e}); replace it") from None
    if mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I"):
        raise DataError(
            f"label file {p} has PIL mode {mode!r}; expected a single-channel 8-bit PNG (mode L or P) "
            "or a 16-bit grayscale PNG / TIFF with one class index per pixel (colour-coded labels must "
            "be converted first)"
        )
    if mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise DataError(
            f"label file {p} (PIL mode I) has values outside [0, 65535] "
            f"({int(arr.min())}..{int(arr.max())}); expected class indices"
        )
    size = 256 if mode in ("L", "P") else 65536
    arr = arr.astype(np.intp, copy=False)
    ign_out = label_ignore_index(num_classes)
    invalid = 65536
    lut = np.full(max(size, num_classes + 1, ignore_index + 1), invalid, dtype=np.int32)
    if reduce_zero_label:
        lut[1 : num_classes + 1] = np.arange(num_classes)
        lut[0] = ign_out
    else:
        lut[:num_classes] = np.arange(num_classes)
    lut[ignore_index] = ign_out
    out = lut[arr]
    bad = out == invalid
    if bad.any():
        vals = sorted(int(v) for v in np.unique(arr[bad]))
        valid = f"1..{num_classes}" if reduce_zero_label else f"0..{num_classes - 1}"
        raise DataError(
            f"label file {p} has value(s) {vals[:10]} outside the class list: {num_classes} classes "
            f"(valid values {valid}) and ignore_index {ignore_index}; fix the class list or ignore_index"
        )
    return out.astype(label_dtype_name(num_classes))
