"""Vocabularies of more than 255 classes (ZegFormer's ADE20k-Full, 847): 16-bit labels with
65535 = ignore end to end (mask-folder reader, build_splits' per-image pass and label PNGs, the
training LUT and augmentation, the losses' targets, GZS3 counting); vocabularies of at most 255
classes keep uint8 / 255. Expected values are worked out by hand on tiny labels."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from stages.feeds import decode_train_batch
from zeroseg.data.classes import eval_vocabulary, resolve_split
from zeroseg.data.mask_folder import read_mask_folder, read_mask_label
from zeroseg.data.readers import encode_png
from zeroseg.data.split_files import write_manifest
from zeroseg.data.split_rules import images_per_class
from zeroseg.data.splits import make_records, process_record
from zeroseg.data.transforms import AugmentConfig, decode_label, lut_ignore_index, make_lut, remap_label
from zeroseg.errors import DataError
from zeroseg.evaluation import GZS3Evaluator
from zeroseg.losses import semantic_to_targets

NAMES = [f"c{i}" for i in range(300)]
# two 2 x 3 labels of the 300-class toy dataset (source values = vocabulary ids, 65535 = ignore)
LABEL_A = np.array([[0, 299, 65535], [256, 256, 7]], np.uint16)
LABEL_B = np.array([[255, 255, 255], [65535, 3, 298]], np.uint16)


def _write_16bit_png(path, arr):
    Image.fromarray(arr.astype(np.uint16)).save(path)  # PIL mode I;16


def _toy_dataset(tmp_path):
    img, lbl = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lbl.mkdir()
    for stem, lab in (("a", LABEL_A), ("b", LABEL_B)):
        Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(img / f"{stem}.png")
        _write_16bit_png(lbl / f"{stem}.png", lab)
    return img, lbl


def _png_array(png: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(png)) as im:
        im.load()
        return im.mode, np.asarray(im)


def test_16_bit_png_round_trip_keeps_every_value():
    arr = np.array([[0, 1, 254, 255], [256, 846, 65534, 65535]], np.uint16)
    png = encode_png(arr)
    mode, back = _png_array(png)
    assert mode == "I;16" and back.dtype == np.uint16
    np.testing.assert_array_equal(back, arr)
    dec = decode_label(png)  # the training feed's / evaluation's decoder
    assert dec.dtype == np.uint16
    np.testing.assert_array_equal(dec, arr)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        encode_png(arr.astype(np.int32))


def test_vocabulary_of_300_classes_has_ignore_65535():
    v = resolve_split(NAMES, dataset="toy", unseen=["c3", "c256"])
    assert v.ignore_index == 65535 and v.unseen == (3, 256) and len(v.seen) == 298
    assert eval_vocabulary(NAMES, dataset="toy", train=v).ignore_index == 65535
    assert resolve_split(NAMES[:255], dataset="toy", unseen=["c3"]).ignore_index == 255


def test_mask_folder_with_300_classes_through_build_splits_functions(tmp_path):
    img, lbl = _toy_dataset(tmp_path)
    listing = read_mask_folder(img, lbl, NAMES, dataset="toy")
    assert listing.ignore_index == 65535  # default above 255 classes
    assert [r["image_id"] for r in listing.records] == ["a", "b"]
    vocab = resolve_split(NAMES, dataset="toy", unseen=["c3", "c256"])

    # the counting pass of the frequency rule: labels before the policy
    recs = make_records(listing.records, split="train", dataset="toy", policy="eval", unseen=(), num_classes=300)
    results = [process_record(r, encode=False)[0] for r in recs]
    assert results[0]["classes"] == [0, 7, 256, 299]
    assert results[1]["classes"] == [3, 255, 298]
    counts, images = images_per_class(results, 300)
    assert images == 2
    assert {c: n for c, n in enumerate(counts) if n} == {0: 1, 3: 1, 7: 1, 255: 1, 256: 1, 298: 1, 299: 1}

    # the training pass, policy ignore: unseen 3 and 256 -> 65535
    recs = make_records(
        listing.records, split="train", dataset="toy", policy="ignore", unseen=vocab.unseen, num_classes=300
    )
    (ra, pa), (rb, pb) = (process_record(r) for r in recs)
    assert (ra["status"], ra["classes"], ra["pixels"], ra["unseen_pixels"]) == (
        "kept",
        [0, 7, 299],
        {"0": 1, "7": 1, "299": 1},
        2,
    )
    assert (rb["status"], rb["classes"], rb["pixels"], rb["unseen_pixels"]) == (
        "kept",
        [255, 298],
        {"255": 3, "298": 1},
        1,
    )
    mode, a = _png_array(pa)
    assert mode == "I;16" and a.dtype == np.uint16
    np.testing.assert_array_equal(a, [[0, 299, 65535], [65535, 65535, 7]])
    _, b = _png_array(pb)
    np.testing.assert_array_equal(b, [[255, 255, 255], [65535, 65535, 298]])  # 255 is a class here

    rows = [{**r, "image": f"{r['image_id']}.png", "label": f"labels/train/{r['image_id']}.png"} for r in (ra, rb)]
    write_manifest(tmp_path / "m.parquet", rows, vocab, inductive_train=True)
    leak = [{**rows[0], "classes": [0, 256]}]
    with pytest.raises(DataError, match=r"carries unseen class\(es\) \['c256'\]"):
        write_manifest(tmp_path / "m2.parquet", leak, vocab, inductive_train=True)


def test_16_bit_tiff_source_labels(tmp_path):
    """ADE20k-Full's released labels are uint16 .tif files (PIL reads them as I;16)."""
    p = tmp_path / "l.tif"
    Image.fromarray(np.array([[1, 300, 0, 256]], np.uint16)).save(p)
    with Image.open(p) as im:
        assert im.mode == "I;16"
    out = read_mask_label(p, 300, ignore_index=65535, reduce_zero_label=True)
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, [[0, 299, 65535, 255]])
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(p)
    with pytest.raises(DataError, match=r"value\(s\) \[300\] outside the class list: 300 classes"):
        read_mask_label(p, 300, ignore_index=65535)
    # an 8-bit source label of a 300-class vocabulary: 255 is a class, the output is uint16
    q = tmp_path / "l8.png"
    Image.fromarray(np.array([[0, 254, 255]], np.uint8), mode="L").save(q)
    out8 = read_mask_label(q, 300, ignore_index=65535)
    assert out8.dtype == np.uint16
    np.testing.assert_array_equal(out8, [[0, 254, 255]])


def test_lut_remaps_16_bit_labels():
    label = np.array([[256, 65535, 3], [299, 5, 256]], np.uint16)
    few = make_lut({256: 0, 299: 1, 3: 2}, source_classes=300)  # 3 training ids: uint8, ignore 255
    assert few.shape == (65536,) and few.dtype == np.uint8 and lut_ignore_index(few) == 255
    np.testing.assert_array_equal(remap_label(label, few), [[0, 255, 2], [1, 255, 0]])
    many = make_lut(list(range(300)), source_classes=300)  # 300 training ids: uint16, ignore 65535
    assert many.dtype == np.uint16 and lut_ignore_index(many) == 65535
    np.testing.assert_array_equal(remap_label(label, many), [[256, 65535, 3], [299, 5, 256]])
    shifted = make_lut({c: c - 1 for c in range(1, 300)}, source_classes=300)  # 299 training ids
    np.testing.assert_array_equal(remap_label(label, shifted), [[255, 65535, 2], [298, 4, 255]])
    with pytest.raises(ValueError, match="65536-entry lut"):
        remap_label(label, make_lut({1: 0}))  # a 256-entry table cannot take 16-bit labels
    with pytest.raises(ValueError, match="collides with ignore_index 255"):
        make_lut({1: 255})


def test_training_feed_remaps_and_pads_16_bit_labels(tmp_path):
    """decode_train_batch on a 16-bit label PNG: 300 seen training ids -> int32 labels with 65535
    ignore, padded with 65535 to the 4 x 4 crop (no rescale, no flip)."""
    img, lbl = _toy_dataset(tmp_path)
    lut = make_lut({c: i for i, c in enumerate(c for c in range(300) if c != 7)}, source_classes=300)  # 299 ids
    batch = {
        "image_id": np.array(["a"], dtype=object),
        "image_uri": np.array([str(img / "a.png")], dtype=object),
        "label_uri": np.array([str(lbl / "a.png")], dtype=object),
    }
    aug = AugmentConfig(crop_size=(4, 4), ratio_range=(1.0, 1.0), flip_prob=0.0)
    out = decode_train_batch(batch, lut=lut, augment=aug, seed=0, epoch=0)
    assert out["label"].dtype == np.int32 and out["label"].shape == (1, 4, 4)
    i = 65535
    # vocabulary ids 0, 299, 256 -> training ids 0, 298, 255 (7 is not a training id: ignore)
    want = [[0, 298, i, i], [255, 255, i, i], [i, i, i, i], [i, i, i, i]]
    np.testing.assert_array_equal(out["label"][0], want)
    # the same label through a uint8 table (3 training ids) keeps uint8 / 255
    small = make_lut({0: 0, 299: 1, 256: 2}, source_classes=300)
    out8 = decode_train_batch(batch, lut=small, augment=aug, seed=0, epoch=0)
    assert out8["label"].dtype == np.uint8
    np.testing.assert_array_equal(out8["label"][0, :2, :3], [[0, 1, 255], [2, 2, 255]])
    assert (out8["label"][0, 2:] == 255).all() and (out8["label"][0, :, 3:] == 255).all()


def test_mask_targets_with_ignore_65535():
    lab = torch.tensor([[0, 299, 65535], [256, 256, 65535]], dtype=torch.int32)
    t = semantic_to_targets(lab, ignore_index=65535)
    assert t["labels"].tolist() == [0, 256, 299]
    assert t["masks"].sum(dim=(1, 2)).tolist() == [1, 2, 1]


def test_gzs3_counting_with_ignore_65535():
    """A 2 x 3 uint16 label of a 300-class set, one ignore pixel; predictions by hand."""
    label = np.array([[0, 299, 65535], [256, 256, 7]], np.uint16)
    unseen = [256, 299]
    seen = [c for c in range(300) if c not in unseen]
    scores = torch.zeros(1, 300, 2, 3)
    for (y, x), c in {(0, 0): 0, (0, 1): 299, (0, 2): 5, (1, 0): 256, (1, 1): 0, (1, 2): 7}.items():
        scores[0, c, y, x] = 10.0
    scores[0, 299, 1, 1] = 1.0  # second best at (1, 1): the ZS3 prediction there (unseen only)
    ev = GZS3Evaluator({"s": {"num_classes": 300, "seen": seen, "unseen": unseen, "ignore_index": 65535}})
    inputs = {"labels": [label], "label_uris": ["a.png"], "sets": ["s"]}
    ev.process(inputs, {"groups": [{"set": "s", "index": [0], "scores": scores}], "probabilities": False})
    res = ev.finalize()["s"]
    g = res["gzs3"]
    assert int(g.sum()) == 5  # the ignore pixel is not counted
    assert {(int(r), int(c)): int(g[r, c]) for r, c in zip(*np.nonzero(np.asarray(g)), strict=True)} == {
        (0, 0): 1,
        (299, 299): 1,
        (256, 256): 1,
        (256, 0): 1,
        (7, 7): 1,
    }
    assert np.asarray(res["zs3"]).tolist() == [[1, 1], [0, 1]]  # rows / cols: 256, 299
    assert res["pixels"] == 6
    bad = np.array([[300, 0, 0], [0, 0, 0]], np.uint16)
    with pytest.raises(DataError, match="300"):
        ev.process(
            {"labels": [bad], "label_uris": ["b.png"], "sets": ["s"]},
            {"groups": [{"set": "s", "index": [0], "scores": scores}], "probabilities": False},
        )


def test_255_class_or_smaller_datasets_keep_uint8_labels(tmp_path):
    img, lbl = tmp_path / "images", tmp_path / "labels"
    img.mkdir()
    lbl.mkdir()
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(img / "a.png")
    Image.fromarray(np.array([[0, 1, 2], [255, 1, 0]], np.uint8), mode="L").save(lbl / "a.png")
    listing = read_mask_folder(img, lbl, ["x", "y", "z"], dataset="small")
    assert listing.ignore_index == 255
    vocab = resolve_split(["x", "y", "z"], dataset="small", unseen=["z"])
    assert vocab.ignore_index == 255
    recs = make_records(listing.records, split="train", dataset="small", policy="ignore", unseen=[2], num_classes=3)
    res, png = process_record(recs[0])
    assert res["classes"] == [0, 1]
    mode, arr = _png_array(png)
    assert mode == "L" and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, [[0, 1, 255], [255, 1, 0]])
    assert read_mask_label(lbl / "a.png", 3).dtype == np.uint8
    lut = make_lut({0: 0, 1: 1})
    assert lut.shape == (256,) and lut.dtype == np.uint8
