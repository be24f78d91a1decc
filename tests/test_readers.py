"""COCO json and mask-folder readers: exact rasterisation, remapping and bad-input errors."""

import json

import numpy as np
import pytest
from PIL import Image

from zeroseg.data.coco import rasterize_coco, read_coco, read_panoptic_label
from zeroseg.data.mask_folder import read_mask_folder, read_mask_label
from zeroseg.data.readers import check_image, dataset_fingerprint, read_class_file
from zeroseg.errors import BadImageError, DataError

W, H = 8, 6


def rect(x0, y0, x1, y1):
    """A polygon covering pixel columns x0..x1-1 and rows y0..y1-1 (pycocotools rasterisation)."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_coco(tmp_path, anns, images=(1, 2), categories=None):
    img_dir = tmp_path / "images"
    img_dir.mkdir(exist_ok=True)
    for i in images:
        Image.new("RGB", (W, H), (i * 40, 0, 0)).save(img_dir / f"{i:04d}.png")
    cats = categories or [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    data = {
        "images": [{"id": i, "file_name": f"{i:04d}.png", "width": W, "height": H} for i in images],
        "annotations": anns,
        "categories": cats,
    }
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(data))
    return p, img_dir


def ann(aid, image, cat, seg, crowd=0):
    return {"id": aid, "image_id": image, "category_id": cat, "segmentation": seg, "iscrowd": crowd}


def test_coco_ids_map_to_contiguous_vocabulary_in_category_order(tmp_path):
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    p, img = write_coco(tmp_path, [ann(1, 1, 18, rect(0, 0, 2, 2))], categories=cats)
    lst = read_coco(p, img)
    assert lst.names == ["person", "car", "dog"]
    assert [r["image_id"] for r in lst.records] == ["0001", "0002"]
    assert lst.records[0]["anns"][0]["label"] == 2
    assert lst.records[0]["no_annotations"] is False and lst.records[1]["no_annotations"] is True
    assert lst.records[0]["image_path"] == str((img / "0001.png").resolve())


def test_rasterise_smaller_wins_then_later_wins_and_crowd_is_ignore(tmp_path):
    anns = [
        ann(10, 1, 1, rect(0, 0, 6, 4)),  # person, 24 px
        ann(11, 1, 3, rect(2, 1, 4, 3)),  # car, 4 px, on top of the person (smaller wins)
        ann(5, 1, 18, rect(6, 0, 8, 6), crowd=1),  # crowd dog, 12 px -> ignore
        ann(7, 1, 1, rect(6, 4, 8, 5)),  # person, 2 px inside the crowd (smaller wins)
        ann(20, 1, 18, rect(0, 4, 2, 6)),  # dog, 4 px
        ann(21, 1, 3, rect(1, 4, 3, 6)),  # car, 4 px: same area, later id wins the overlap
    ]
    p, img = write_coco(tmp_path, anns)
    rec = read_coco(p, img).records[0]
    label, crowd = rasterize_coco(rec["anns"], H, W)
    want = np.full((H, W), 255, np.uint8)
    want[0:4, 0:6] = 0
    want[1:3, 2:4] = 1
    want[4:6, 0:2] = 2
    want[4:6, 1:3] = 1
    want[4:5, 6:8] = 0
    assert label.dtype == np.uint8 and label.shape == (H, W)
    np.testing.assert_array_equal(label, want)
    assert crowd == [(2, 12)]


def test_rasterise_uncompressed_and_compressed_rle(tmp_path):
    from pycocotools import mask as mu

    m = np.zeros((H, W), np.uint8, order="F")
    m[2:4, 3:7] = 1
    compressed = mu.encode(np.asfortranarray(m))
    compressed["counts"] = compressed["counts"].decode()
    runs, cur, n = [], 0, 0  # column-major runs starting with zeros
    for v in m.flatten(order="F"):
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    for seg in ({"size": [H, W], "counts": runs}, compressed):
        label, _ = rasterize_coco([{"id": 1, "label": 1, "iscrowd": 0, "segmentation": seg}], H, W)
        np.testing.assert_array_equal(label == 1, m.astype(bool))
        assert (label[m == 0] == 255).all()


def test_stuff_kind_ignores_other_and_unites_files(tmp_path):
    p, img = write_coco(tmp_path, [ann(1, 1, 1, rect(0, 0, 2, 2))], categories=[{"id": 1, "name": "person"}])
    stuff = json.loads(p.read_text())
    stuff["categories"] = [{"id": 92, "name": "banner"}, {"id": 183, "name": "other"}]
    stuff["annotations"] = [ann(100, 1, 92, rect(0, 0, 8, 3)), ann(101, 1, 183, rect(0, 3, 8, 6))]
    ps = tmp_path / "stuff.json"
    ps.write_text(json.dumps(stuff))
    lst = read_coco([p, ps], img, kind="stuff")
    assert lst.names == ["person", "banner"]
    label, _ = rasterize_coco(lst.records[0]["anns"], H, W)
    assert (label[0:2, 0:2] == 0).all() and (label[0:3, 2:] == 1).all() and (label[3:] == 255).all()
    # as instances, "other" is an ordinary class
    assert read_coco(ps, img, kind="instances").names == ["banner", "other"]


def test_panoptic_png(tmp_path):
    pdir = tmp_path / "pan"
    pdir.mkdir()
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[0:3, :, 0] = 7  # segment 7
    rgb[3:6, 0:4, 1] = 1  # segment 256 (crowd)
    Image.fromarray(rgb).save(pdir / "0001.png")
    img = tmp_path / "images"
    img.mkdir()
    Image.new("RGB", (W, H)).save(img / "0001.jpg")
    data = {
        "images": [{"id": 1, "file_name": "0001.jpg", "width": W, "height": H}],
        "annotations": [
            {
                "image_id": 1,
                "file_name": "0001.png",
                "segments_info": [
                    {"id": 7, "category_id": 5, "iscrowd": 0},
                    {"id": 256, "category_id": 2, "iscrowd": 1},
                ],
            }
        ],
        "categories": [{"id": 2, "name": "a"}, {"id": 5, "name": "b"}],
    }
    (tmp_path / "pan.json").write_text(json.dumps(data))
    rec = read_coco(tmp_path / "pan.json", img, kind="panoptic").records[0]
    label, crowd = read_panoptic_label(rec["png"], rec["segments"], H, W)
    assert (label[0:3] == 1).all() and (label[3:] == 255).all()
    assert crowd == [(0, 12)]

    # a grey (mode L) PNG would decode to ids v * 65793 and match no segment: an error, not all-ignore
    Image.fromarray(rgb[..., 0], mode="L").save(pdir / "0001.png")
    with pytest.raises(DataError, match=r"0001\.png is mode L, not RGB"):
        read_panoptic_label(rec["png"], rec["segments"], H, W)
    data["annotations"][0]["segments_info"][0].pop("id")
    (tmp_path / "pan.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"pan\.json: a segments_info entry of image 1 lacks 'id'"):
        read_coco(tmp_path / "pan.json", img, kind="panoptic")


def test_annotation_json_errors(tmp_path):
    img = tmp_path / "images"
    img.mkdir()
    with pytest.raises(DataError, match=r"annotation file .*nope\.json does not exist"):
        read_coco(tmp_path / "nope.json", img)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=r"bad\.json is not valid JSON"):
        read_coco(bad, img)
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(DataError, match=r"no 'annotations' list"):
        read_coco(bad, img)
    p, img = write_coco(tmp_path, [ann(42, 1, 99, rect(0, 0, 2, 2))])
    with pytest.raises(DataError, match=r"annotation id 42 has category_id 99"):
        read_coco(p, img)
    p, img = write_coco(tmp_path, [ann(43, 77, 1, rect(0, 0, 2, 2))])
    with pytest.raises(DataError, match=r"annotation id 43 refers to image id 77"):
        read_coco(p, img)


def write_mask_folder(tmp_path, labels: dict[str, np.ndarray], classes=("a", "b", "c"), ignore=11):
    img, lbl = tmp_path / "img", tmp_path / "lbl"
    img.mkdir()
    lbl.mkdir()
    for stem, arr in labels.items():
        Image.new("RGB", (arr.shape[1], arr.shape[0])).save(img / f"{stem}.jpg")
        Image.fromarray(arr.astype(np.uint8), mode="L").save(lbl / f"{stem}.png")
    cf = tmp_path / "classes.json"
    cf.write_text(json.dumps({"classes": list(classes), "ignore_index": ignore}))
    return img, lbl, cf


def test_mask_folder_matches_by_stem_and_remaps_ignore(tmp_path):
    arr = np.array([[0, 1, 2, 11], [11, 2, 1, 0]], np.uint8)
    img, lbl, cf = write_mask_folder(tmp_path, {"b_img": arr, "a_img": arr[::-1]})
    lst = read_mask_folder(img, lbl, cf, dataset="toy")
    assert lst.names == ["a", "b", "c"] and lst.ignore_index == 11
    assert [r["image_id"] for r in lst.records] == ["a_img", "b_img"]
    r = lst.records[1]
    assert r["label_path"] == str((lbl / "b_img.png").resolve())
    out = read_mask_label(r["label_path"], r["num_classes"], r["ignore_index"])
    np.testing.assert_array_equal(out, [[0, 1, 2, 255], [255, 2, 1, 0]])
    assert read_class_file(cf) == (["a", "b", "c"], 11)


def test_reduce_zero_label(tmp_path):
    arr = np.array([[0, 1, 2, 3, 255]], np.uint8)
    Image.fromarray(arr, mode="L").save(tmp_path / "l.png")
    out = read_mask_label(tmp_path / "l.png", 3, 255, reduce_zero_label=True)
    np.testing.assert_array_equal(out, [[255, 0, 1, 2, 255]])


def test_label_value_outside_class_list_names_file_value_and_count(tmp_path):
    img, lbl, cf = write_mask_folder(tmp_path, {"x": np.array([[0, 7], [1, 11]], np.uint8)})
    with pytest.raises(DataError, match=r"x\.png has value\(s\) \[7\] outside the class list: 3 classes"):
        read_mask_label(lbl / "x.png", 3, 11)


def test_missing_label_file_names_image_and_label(tmp_path):
    img, lbl, cf = write_mask_folder(tmp_path, {"x": np.zeros((2, 2), np.uint8)})
    Image.new("RGB", (2, 2)).save(img / "orphan.jpg")
    with pytest.raises(DataError, match=r"missing label file .*orphan\.png for image .*orphan\.jpg"):
        read_mask_folder(img, lbl, cf)
    # an ids_file restricts the images (VOC ImageSets layout)
    ids = tmp_path / "ids.txt"
    ids.write_text("x\n")
    assert [r["image_id"] for r in read_mask_folder(img, lbl, cf, ids_file=ids).records] == ["x"]
    ids.write_text("x\ntypo\n")  # a listed stem with no image is an error, not a skipped image
    with pytest.raises(DataError, match=r"ids\.txt lists 'typo' but .*img has no image with that stem"):
        read_mask_folder(img, lbl, cf, ids_file=ids)


def test_rgb_label_is_rejected(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "c.png")
    with pytest.raises(DataError, match="mode 'RGB'"):
        read_mask_label(tmp_path / "c.png", 3)


def test_check_image_catches_truncated_and_corrupt_files(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    assert check_image(good) == (64, 64)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with Image.open(trunc) as im:  # the header is intact: verify() alone does not notice
        im.verify()
    with pytest.raises(BadImageError, match=r"trunc\.jpg is corrupt or truncated"):
        check_image(trunc)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match=r"junk\.jpg"):
        check_image(junk)
    with pytest.raises(BadImageError, match="does not exist"):
        check_image(tmp_path / "missing.jpg")


def test_fingerprint_tracks_content_of_files_and_listing_of_dirs(tmp_path):
    p, img = write_coco(tmp_path, [])
    f0 = dataset_fingerprint([p], [img])
    assert dataset_fingerprint([p], [img]) == f0
    p.write_text(p.read_text().replace('"person"', '"human"'))  # content change, any size
    f1 = dataset_fingerprint([p], [img])
    assert f1 != f0
    Image.new("RGB", (W, H)).save(img / "extra.png")
    assert dataset_fingerprint([p], [img]) != f1
