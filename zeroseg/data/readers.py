"""Dataset readers: COCO json (instances, stuff, panoptic) and mask folders -> per-image records
and rasterised ``uint8 [H, W]`` label maps in vocabulary ids (255 = ignore).

Two halves:

* *listing* (driver side, cheap): :func:`read_coco` / :func:`read_mask_folder` parse the
  annotation json or the directory listing and return the dataset's class names plus one
  JSON-serialisable *record* per image (paths, size, the image's annotations already mapped to
  vocabulary ids). Records are what ``stages/build_splits.py`` hands to Ray Data;
* *per image* (worker side): :func:`check_image` (full decode), :func:`rasterize_coco`,
  :func:`read_panoptic_label`, :func:`read_mask_label` turn one record into a label map.

Label rules:

* COCO category ids (things 1..90 sparse, stuff 92..182, panoptic 1..200) map to contiguous
  vocabulary ids in increasing category-id order (the order of the standard COCO category lists;
  for instances + stuff together this is exactly COCO-Stuff-171). With ``kind="stuff"`` the
  catch-all category ``other`` (id 183) is not a class: its pixels are ignore (255), as in
  COCO-Stuff-171.
* Pixels covered by no annotation are 255 (for instances json: stuff is not annotated).
* Overlaps: annotations are painted in decreasing pixel area, so the *smaller* annotation wins
  where two overlap; equal areas are painted in increasing annotation id, so the *later*
  annotation wins. ``iscrowd`` annotations take part in the same order with the value 255
  (ignore): a crowd region is ignore except where a smaller annotation lies on top of it.
* Polygons with fewer than 3 points are skipped (pycocotools cannot rasterise them).
* Mask folders: label PNGs hold one class index per pixel (PIL mode ``L`` or ``P``, or a 16-bit
  PNG / TIFF: modes ``I;16``, ``I;16B``, ``I``); the dataset's ``ignore_index`` becomes 255; with
  ``reduce_zero_label`` (ADE20K, VOC without background) 0 becomes 255 and every other value v
  becomes v - 1; any other value outside the class list is an error.
* More than 255 classes (ZegFormer's ADE20k-Full, 847): the label maps are ``uint16`` with
  65535 = ignore instead (``zeroseg.data.classes.label_ignore_index``), written as 16-bit
  grayscale PNGs (:func:`encode_png`); vocabularies of at most 255 classes keep ``uint8`` / 255.

Modules: this one holds the common parts (:class:`DatasetListing`, class-list and JSON reading,
:func:`check_image`, :func:`encode_png`, :func:`dataset_fingerprint`); the COCO reader
(:func:`read_coco`, :func:`rasterize_coco`, :func:`read_panoptic_label`) is
``zeroseg.data.coco``, the mask-folder reader (:func:`read_mask_folder`, :func:`read_mask_label`)
``zeroseg.data.mask_folder``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zeroseg.data.classes import IGNORE_INDEX, MAX_CLASSES
from zeroseg.errors import BadImageError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class DatasetListing:
    """A listed dataset.

    Attributes:
        names: class names in vocabulary-id order.
        records: one JSON-serialisable dict per image, sorted by ``image_id`` (see
            ``zeroseg.data.splits.process_record`` for the keys).
        ignore_index: the dataset's own ignore value before remapping (mask folders), else 255.
        files: annotation / class files the listing read (fingerprinted by content).
    """

    names: list[str]
    records: list[dict[str, Any]]
    ignore_index: int = IGNORE_INDEX
    files: list[Path] = dataclasses.field(default_factory=list)


# -- class lists -----------------------------------------------------------------------------
def read_class_file(path: str | os.PathLike) -> tuple[list[str], int | None]:
    """Read a class list json: ``{"classes": [name, ...], "ignore_index": int}``
    (like ``../shared/data/camvid-val/classes.json``).

    Returns:
        ``(names in label-value order, ignore_index or None when the file has none)``.

    Raises:
        DataError: the file is missing, not JSON, or lacks a ``classes`` list of strings (named).
    """
    p = Path(path)
    data = load_json(p, "class list")
    if isinstance(data, list):
        data = {"classes": data}
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
        raise DataError(
            f"class list {p}: expected a JSON object with a 'classes' list of names "
            '(e.g. {"classes": ["sky", "road"], "ignore_index": 255})'
        )
    names = data["classes"]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"class list {p}: 'classes' must be a non-empty list of non-empty strings")
    ign = data.get("ignore_index")
    if ign is not None and (not isinstance(ign, int) or not 0 <= ign <= MAX_CLASSES):
        raise DataError(f"class list {p}: 'ignore_index' must be an integer in [0, {MAX_CLASSES}], got {ign!r}")
    return list(names), ign


def load_json(p: Path, what: str) -> Any:
    """Parse a JSON file, naming it (as ``what``) in every error.

    Raises:
        DataError: the file does not exist or is not valid UTF-8 JSON.
    """
    if not p.is_file():
        raise DataError(f"{what} file {p} does not exist (check the path in the config)")
    try:
        with open(p, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what} file {p} is not valid JSON ({e}); re-download or regenerate it") from None


# -- images ----------------------------------------------------------------------------------
def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """Verify that an image file is complete and decodable: PIL ``verify()`` (structure) and a full
    ``load()`` (truncated JPEGs only fail when decoded).

    Returns:
        ``(height, width)`` in pixels.

    Raises:
        BadImageError: the file is missing, not an image, corrupt or truncated (naming it).
    """
    p = Path(path)
    try:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:
            im.load()
            w, h = im.size
    except FileNotFoundError:
        raise BadImageError(f"image file {p} does not exist") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(
            f"image {p} is corrupt or truncated ({type(e).__name__}: {e}); replace it, or set "
            "build_splits.on_bad_image: skip to leave it out"
        ) from None
    return h, w


def encode_png(label: np.ndarray) -> bytes:
    """PNG bytes of a label map: 8-bit grayscale (mode ``L``) for ``uint8 [H, W]``, 16-bit
    grayscale (mode ``I;16``, values kept exactly; PIL reads it back as ``I;16`` / ``uint16``)
    for ``uint16 [H, W]`` (vocabularies of more than 255 classes, 65535 = ignore).

    Raises:
        ValueError: another dtype or not 2-D.
    """
    if label.dtype not in (np.uint8, np.uint16) or label.ndim != 2:
        raise ValueError(f"label must be uint8 or uint16 [H, W], got {label.dtype} {label.shape}")
    buf = io.BytesIO()
    if label.dtype == np.uint8:
        Image.fromarray(label, mode="L").save(buf, format="PNG", compress_level=6)
    else:  # PIL's I;16 is little-endian uint16; fromarray of native uint16 gives I;16
        Image.fromarray(np.ascontiguousarray(label.astype("<u2", copy=False))).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# -- fingerprint -----------------------------------------------------------------------------
def dataset_fingerprint(files: Iterable[str | os.PathLike], dirs: Iterable[str | os.PathLike]) -> str:
    """sha256 over dataset inputs, for the build_splits artifact key.

    Files (annotation json, class lists, id lists) are hashed by content. Directories (images,
    labels, panoptic PNGs) are hashed by their sorted recursive listing of ``(relative path, size
    in bytes)``: reading every image of COCO (~19 GB) on every plan would take minutes, while the
    listing takes about a second and catches added, removed, renamed and re-encoded files. An
    in-place edit that keeps a file's size is not detected (re-run with ``--force``).
    Missing paths enter as "missing" (the stage then fails with a clear error). No path or folder
    name enters: the same data under another mount point or name has the same fingerprint.
    """
    h = hashlib.sha256()
    for f in files:
        p = Path(f)
        h.update(b"file\0")  # by position and content: the name or mount point of a copy does not count
        if p.is_file():
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
        else:
            h.update(b"missing")
    for d in dirs:
        root = Path(d)
        h.update(b"dir\0")
        if not root.is_dir():
            h.update(b"missing")
            continue
        entries = []
        for dirpath, _, filenames in os.walk(root):
            for fn in filenames:
                fp = os.path.join(dirpath, fn)
                try:
                    size = os.stat(fp).st_size
                except OSError:
                    continue
                entries.append((os.path.relpath(fp, root).replace(os.sep, "/"), size))
        for rel, size in sorted(entries):
            h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()
