"""COCO-format reader: COCO json (instances, stuff, panoptic) -> per-image records, and the
per-image rasterisation of a record's annotations (polygons / RLE, panoptic PNG) into a label
map in vocabulary ids (255 = ignore).

The label rules (category ids -> vocabulary ids, ``other`` -> ignore, overlaps, crowd regions)
are in the ``zeroseg.data.readers`` module docstring; the common parts (:class:`DatasetListing`,
``load_json``) are there too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from zeroseg.data.classes import IGNORE_INDEX
from zeroseg.data.readers import DatasetListing, load_json
from zeroseg.errors import ConfigError, DataError

COCO_KINDS = ("instances", "stuff", "panoptic")
#: COCO-Stuff's catch-all stuff category: not one of the 171 classes (-> ignore).
COCO_STUFF_OTHER = (183, "other")


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
