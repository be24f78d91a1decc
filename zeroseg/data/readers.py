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
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zeroseg.data.classes import IGNORE_INDEX, MAX_CLASSES, label_dtype_name, label_ignore_index
from zeroseg.errors import BadImageError, ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
COCO_KINDS = ("instances", "stuff", "panoptic")
#: COCO-Stuff's catch-all stuff category: not one of the 171 classes (-> ignore).
COCO_STUFF_OTHER = (183, "other")


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


# -- COCO ------------------------------------------------------------------------------------
def read_coco(
    annotations: str | os.PathLike | Sequence[str | os.PathLike],
    images: str | os.PathLike,
    *,
    kind: str = "instances",
    panoptic_masks: str | os.PathLike | None = None,
    dataset: str = "coco",
) -> DatasetListing:
    """List a COCO-format dataset.

    Args:
        annotations: one COCO json, or several whose categories are united (e.g. instances and
            stuff json of the same images -> COCO-Stuff-171); images are matched by id.
        images: the image directory; ``file_name`` of each image is relative to it.
        kind: ``instances`` (polygons / RLE per instance), ``stuff`` (COCO-Stuff RLE; category
            ``other`` -> ignore) or ``panoptic`` (COCO panoptic json + PNG segment maps).
        panoptic_masks: the panoptic PNG directory (default: the json path without ``.json``,
            e.g. ``panoptic_train2017/`` beside ``panoptic_train2017.json``).
        dataset: the dataset name, for messages.

    Returns:
        a :class:`DatasetListing`: names in increasing category-id order, one record per image
        (``image_id`` = the file name's stem) with its annotations mapped to vocabulary ids.

    Raises:
        DataError: a missing or invalid json, a missing top-level key (``images``,
            ``annotations``, ``categories``), an annotation naming an unknown image or category,
            the same category id with two names, or two images with the same file stem.
        ConfigError: an unknown ``kind``; more than 255 categories (COCO-format labels are
            rasterised to ``uint8``; a larger vocabulary needs ``format: mask_folder`` with 16-bit
            label files).
    """
    if kind not in COCO_KINDS:
        raise ConfigError(f"coco_kind {kind!r} is unknown; use one of {', '.join(COCO_KINDS)}")
    paths = [Path(annotations)] if isinstance(annotations, (str, os.PathLike)) else [Path(a) for a in annotations]
    if not paths:
        raise ConfigError(f"dataset {dataset!r}: no annotation file given")
    images_dir = Path(images)
    cats: dict[int, str] = {}
    imgs: dict[Any, dict[str, Any]] = {}
    anns_by_img: dict[Any, list[dict[str, Any]]] = {}
    for p in paths:
        data = load_json(p, "annotation")
        if not isinstance(data, dict):
            raise DataError(f"annotation file {p}: top level must be a JSON object (COCO format)")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(
                    f"annotation file {p} has no {key!r} list; expected COCO {kind} format "
                    "with 'images', 'annotations' and 'categories'"
                )
        for c in data["categories"]:
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise DataError(f"annotation file {p}: category {c!r} lacks 'id' or 'name'")
            cid, name = int(c["id"]), str(c["name"])
            if cats.get(cid, name) != name:
                raise DataError(
                    f"annotation file {p}: category id {cid} is {name!r} here but {cats[cid]!r} "
                    "in an earlier annotation file"
                )
            cats[cid] = name
        for im in data["images"]:
            try:
                iid, fn, h, w = im["id"], str(im["file_name"]), int(im["height"]), int(im["width"])
            except (KeyError, TypeError, ValueError):
                raise DataError(
                    f"annotation file {p}: image entry {str(im)[:200]} lacks id/file_name/height/width"
                ) from None
            prev = imgs.get(iid)
            if prev is not None and (prev["file_name"], prev["height"], prev["width"]) != (fn, h, w):
                raise DataError(
                    f"annotation file {p}: image id {iid} is {fn} {w}x{h} here but "
                    f"{prev['file_name']} {prev['width']}x{prev['height']} in an earlier file"
                )
            imgs[iid] = {"file_name": fn, "height": h, "width": w}
        for a in data["annotations"]:
            if not isinstance(a, dict) or "image_id" not in a:
                raise DataError(f"annotation file {p}: annotation {str(a)[:200]} lacks 'image_id'")
            a = dict(a)
            a["_file"] = str(p)
            anns_by_img.setdefault(a["image_id"], []).append(a)
    for iid, anns in anns_by_img.items():
        if iid not in imgs:
            raise DataError(
                f"annotation file {anns[0]['_file']}: annotation id {anns[0].get('id')} refers to "
                f"image id {iid!r}, which is not in 'images'"
            )

    ignored_cats = set()
    if kind == "stuff" and cats.get(COCO_STUFF_OTHER[0]) == COCO_STUFF_OTHER[1]:
        ignored_cats.add(COCO_STUFF_OTHER[0])
    vocab_ids = sorted(c for c in cats if c not in ignored_cats)
    names = [cats[c] for c in vocab_ids]
    if len(names) > 255:
        raise ConfigError(
            f"dataset {dataset!r}: {len(names)} categories; COCO-format labels are rasterised to uint8 "
            "(at most 255 classes); convert the labels to 16-bit PNGs and use format: mask_folder"
        )
    to_vocab = {c: i for i, c in enumerate(vocab_ids)}
    for c in ignored_cats:
        to_vocab[c] = IGNORE_INDEX

    masks_dir = None
    if kind == "panoptic":
        masks_dir = Path(panoptic_masks) if panoptic_masks else paths[0].with_suffix("")
        if not masks_dir.is_dir():
            raise DataError(
                f"panoptic PNG directory {masks_dir} does not exist; set panoptic_masks to the "
                "folder of the panoptic segment PNGs"
            )

    records: list[dict[str, Any]] = []
    seen_ids: dict[str, Any] = {}
    for iid, im in imgs.items():
        image_id = _stem(im["file_name"])
        if image_id in seen_ids:
            raise DataError(
                f"dataset {dataset!r}: images {seen_ids[image_id]!r} and {iid!r} have the same file stem "
                f"{image_id!r}; image ids (file stems) must be unique"
            )
        seen_ids[image_id] = iid
        rec: dict[str, Any] = {
            "image_id": image_id,
            "image_path": str((images_dir / im["file_name"]).resolve()),
            "height": im["height"],
            "width": im["width"],
        }
        anns = anns_by_img.get(iid, [])
        if kind == "panoptic":
            if len(anns) > 1:
                raise DataError(f"panoptic json: image {iid} has {len(anns)} annotation entries; expected one")
            segs = []
            png = None
            for a in anns:
                png = str((masks_dir / a.get("file_name", image_id + ".png")).resolve())
                for s in a.get("segments_info", []):
                    if "id" not in s:
                        raise DataError(
                            f"annotation file {a['_file']}: a segments_info entry of image {iid} "
                            f"lacks 'id' ({s}); every panoptic segment needs its PNG id"
                        )
                    segs.append(
                        {
                            "id": int(s["id"]),
                            "label": _map_cat(s, to_vocab, a["_file"]),
                            "category_id": int(s["category_id"]),
                            "iscrowd": int(s.get("iscrowd", 0)),
                        }
                    )
            rec.update(kind="panoptic", png=png, segments=segs, no_annotations=not segs)
        else:
            out = []
            for a in anns:
                if "segmentation" not in a:
                    raise DataError(f"annotation file {a['_file']}: annotation id {a.get('id')} lacks 'segmentation'")
                out.append(
                    {
                        "id": a.get("id", len(out)),
                        "label": _map_cat(a, to_vocab, a["_file"]),
                        "category_id": int(a["category_id"]),
                        "iscrowd": int(a.get("iscrowd", 0)),
                        "segmentation": a["segmentation"],
                        "file": a["_file"],
                    }
                )
            rec.update(kind="coco", anns=out, no_annotations=not out)
        records.append(rec)
    records.sort(key=lambda r: r["image_id"])
    return DatasetListing(names=names, records=records, files=paths)


def _map_cat(a: dict[str, Any], to_vocab: dict[int, int], file: str) -> int:
    try:
        cid = int(a["category_id"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"annotation file {file}: annotation id {a.get('id')} lacks a valid 'category_id'") from None
    if cid not in to_vocab:
        raise DataError(
            f"annotation file {file}: annotation id {a.get('id')} has category_id {cid}, which is not in "
            f"'categories' (known ids: {sorted(to_vocab)[:20]}...)"
        )
    return to_vocab[cid]


def _stem(file_name: str) -> str:
    return Path(file_name).with_suffix("").as_posix().replace("/", "__")


def _rle(seg: Any, height: int, width: int, ann_id: Any, file: str) -> Any:
    """pycocotools RLE of one annotation's segmentation (``COCO.annToRLE``), or None if empty."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):  # polygons
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or len(poly) % 2:
                raise DataError(
                    f"annotation file {file}: annotation id {ann_id} has a malformed polygon "
                    "(expected a flat list [x1, y1, x2, y2, ...])"
                )
            if len(poly) >= 6:
                polys.append([float(v) for v in poly])
        if not polys:
            return None
        return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        if list(seg["size"]) != [height, width]:
            raise DataError(
                f"annotation file {file}: annotation id {ann_id} has an RLE of size {seg['size']} "
                f"for an image of size [{height}, {width}] (height, width)"
            )
        if isinstance(seg["counts"], list):  # uncompressed RLE
            return mask_utils.frPyObjects(seg, height, width)
        counts = seg["counts"].encode() if isinstance(seg["counts"], str) else seg["counts"]
        return {"size": list(seg["size"]), "counts": counts}
    raise DataError(
        f"annotation file {file}: annotation id {ann_id} has a segmentation that is neither polygons nor RLE"
    )


def rasterize_coco(
    anns: Sequence[dict[str, Any]],
    height: int,
    width: int,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Rasterise one image's COCO annotations (pycocotools ``frPyObjects`` / ``decode``).

    Args:
        anns: the record's annotations: ``{"id", "label" (vocabulary id or 255), "iscrowd",
            "segmentation", "file"}``.
        height, width: the image size in pixels.

    Returns:
        ``(label, crowd)``: ``label`` is ``uint8 [height, width]`` vocabulary ids, 255 where no
        annotation lies or a crowd region is on top (module docstring: smaller area wins, ties
        -> later annotation id wins); ``crowd`` lists ``(vocabulary id, pixel count)`` of every
        crowd annotation (its class is not in the label; the unseen policy needs it).

    Raises:
        DataError: a malformed segmentation (names the annotation id and file).
    """
    from pycocotools import mask as mask_utils

    label = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    items = []
    crowd = []
    for a in anns:
        rle = _rle(a["segmentation"], height, width, a.get("id"), a.get("file", "?"))
        if rle is None:
            continue
        area = int(mask_utils.area(rle))
        if a.get("iscrowd"):
            crowd.append((int(a["label"]), area))
        items.append((-area, _sort_id(a.get("id")), rle, IGNORE_INDEX if a.get("iscrowd") else int(a["label"])))
    items.sort(key=lambda t: (t[0], t[1]))
    for _, _, rle, value in items:
        with warnings.catch_warnings():  # pycocotools' decode trips a NumPy 2 copy= deprecation
            warnings.simplefilter("ignore", DeprecationWarning)
            m = mask_utils.decode(rle)
        if m.ndim == 3:
            m = m.max(axis=2)
        label[m.astype(bool)] = value
    return label, crowd


def _sort_id(i: Any) -> tuple[int, Any]:
    return (0, i) if isinstance(i, (int, float)) else (1, str(i))


def read_panoptic_label(
    png: str | None,
    segments: Sequence[dict[str, Any]],
    height: int,
    width: int,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Label map from a COCO panoptic PNG (segment id = R + 256 G + 256^2 B).

    Args:
        png: the segment PNG path (None when the image has no panoptic entry: all ignore).
        segments: ``{"id", "label" (vocabulary id or 255), "iscrowd"}`` per segment.
        height, width: the image size, pixels.

    Returns:
        ``(label uint8 [height, width], crowd [(vocabulary id, pixels)])``; pixels of segment id
        0 or of a segment not in ``segments`` and crowd segments are 255.

    Raises:
        DataError: the PNG is missing, unreadable, not RGB, or of a different size.
    """
    label = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
    if png is None:
        return label, []
    try:
        with Image.open(png) as im:
            if im.mode != "RGB":
                raise DataError(
                    f"panoptic PNG {png} is mode {im.mode}, not RGB: segment ids are encoded as "
                    "R + 256 G + 65536 B, so the file must be the RGB PNG of the COCO panoptic release"
                )
            rgb = np.asarray(im, dtype=np.uint32)
    except FileNotFoundError:
        raise DataError(f"panoptic PNG {png} does not exist (listed in the panoptic json)") from None
    except OSError as e:
        raise DataError(f"panoptic PNG {png} cannot be decoded ({e})") from None
    if rgb.shape[:2] != (height, width):
        raise DataError(f"panoptic PNG {png} is {rgb.shape[1]}x{rgb.shape[0]} but its image is {width}x{height}")
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    crowd = []
    for s in segments:
        m = ids == s["id"]
        if s.get("iscrowd"):
            crowd.append((int(s["label"]), int(m.sum())))
            continue
        label[m] = int(s["label"])
    return label, crowd


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
