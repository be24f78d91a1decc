"""The training data feed: transforms (NumPy/PIL) and the Ray Data pipeline of stages/feeds.py on
real CamVid frames, read through a build_splits-layout artifact (path-free manifest + runtime
image roots)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors (what the CLI does)
from pipeline.dag import Artifact
from pipeline.errors import find_user_error
from zeroseg.data.transforms import (
    AugmentConfig,
    decode_image,
    decode_label,
    make_lut,
    normalize,
    remap_label,
    sample_rng,
    train_transform,
)
from zeroseg.errors import DataError

CAMVID_VOID = 11
LUT = make_lut(list(range(11)))  # CamVid ids 0..10 are training ids 0..10; 11 (void) -> 255
KEY = "b" * 64
#: The build_splits manifest schema (docs/architecture.md), written out here.
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.string()),
        ("label", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("classes", pa.list_(pa.int32())),
        ("dataset", pa.string()),
    ]
)


def camvid_pairs(shared_data: Path, n: int) -> list[tuple[str, Path, Path]]:
    imgs = sorted((shared_data / "camvid-val" / "images").glob("*.png"))[:n]
    return [(p.stem, p, p.parent.parent / "labels" / p.name) for p in imgs]


def build_splits_artifact(
    root: Path, pairs: list[tuple[str, Path, Path]], split: str = "train", image_root: Path | None = None
) -> Artifact:
    """A build_splits-layout artifact over real images: ``manifests/<split>.parquet`` naming each
    image relative to the split's image folder, label PNGs copied to ``labels/<split>/``, and the
    image folder as the stage's runtime output."""
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    image_root = image_root or pairs[0][1].parent
    rows = []
    for image_id, img_p, lbl_p in pairs:
        shutil.copy(lbl_p, root / "labels" / split / f"{image_id}.png")
        rows.append(
            {
                "image_id": image_id,
                "image": img_p.relative_to(image_root).as_posix(),
                "label": f"labels/{split}/{image_id}.png",
                "height": 360,
                "width": 480,
                "classes": list(range(11)),
                "dataset": "camvid",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "manifests" / f"{split}.parquet")
    return Artifact(
        "build_splits", KEY, root, str(root), {"files": []}, runtime={"image_roots": {split: str(image_root)}}
    )


# -- transforms (no Ray) -----------------------------------------------------------------------
def test_decode_real_camvid_frame(shared_data):
    _, img_p, lbl_p = camvid_pairs(shared_data, 1)[0]
    img = decode_image(img_p)
    lbl = decode_label(lbl_p.read_bytes())
    assert img.dtype == np.uint8 and img.shape == (360, 480, 3)
    assert lbl.dtype == np.uint8 and lbl.shape == (360, 480)
    assert lbl.max() <= CAMVID_VOID


def test_decode_errors_name_the_problem(shared_data, tmp_path):
    _, img_p, _ = camvid_pairs(shared_data, 1)[0]
    with pytest.raises(DataError, match="mode 'RGB'"):
        decode_label(img_p)  # an RGB image is not a label map
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        decode_image(bad)


def test_lut_maps_listed_ids_and_ignores_the_rest():
    assert LUT.dtype == np.uint8 and LUT.shape == (256,)
    assert list(LUT[:11]) == list(range(11)) and LUT[CAMVID_VOID] == 255 and LUT[200] == 255
    lut = make_lut({3: 0, 7: 1})
    assert (lut[3], lut[7], lut[0]) == (0, 1, 255)
    assert list(remap_label(np.array([[3, 7, 5]], np.uint8), lut)[0]) == [0, 1, 255]
    with pytest.raises(ValueError, match="ignore_index"):
        make_lut({1: 255})
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        make_lut({300: 1})


def test_train_transform_shapes_dtypes_and_determinism(shared_data):
    _, img_p, lbl_p = camvid_pairs(shared_data, 1)[0]
    img, lbl = decode_image(img_p), remap_label(decode_label(lbl_p), LUT)
    cfg = AugmentConfig(crop_size=(128, 160), ratio_range=(0.5, 1.5))
    a = train_transform(img, lbl, cfg, sample_rng(0, "frame", 0))
    b = train_transform(img, lbl, cfg, sample_rng(0, "frame", 0))
    c = train_transform(img, lbl, cfg, sample_rng(0, "frame", 1))
    assert a[0].dtype == np.float32 and a[0].shape == (3, 128, 160) and a[0].flags.c_contiguous
    assert a[1].dtype == np.uint8 and a[1].shape == (128, 160)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])  # another epoch draws another augmentation
    assert set(np.unique(a[1])) <= set(range(11)) | {255}


def test_identity_settings_give_normalised_image_and_flip(shared_data):
    _, img_p, lbl_p = camvid_pairs(shared_data, 1)[0]
    img, lbl = decode_image(img_p), decode_label(lbl_p)
    cfg = AugmentConfig(crop_size=(360, 480), ratio_range=(1, 1), flip_prob=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    x, y = train_transform(img, lbl, cfg, np.random.default_rng(0))
    np.testing.assert_allclose(x, (img[:, ::-1].transpose(2, 0, 1) / 255.0 - 0.5) / 0.5, atol=1e-5)
    assert np.array_equal(y, lbl[:, ::-1])


def test_small_images_are_padded_with_zero_and_ignore():
    img = np.full((20, 30, 3), 255, np.uint8)
    lbl = np.zeros((20, 30), np.uint8)
    cfg = AugmentConfig(crop_size=(32, 40), ratio_range=(1, 1), flip_prob=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)
    x, y = train_transform(img, lbl, cfg, np.random.default_rng(0))
    assert x.shape == (3, 32, 40) and y.shape == (32, 40)
    assert np.allclose(x[:, :20, :30], 1.0) and np.all(x[:, 20:, :] == 0) and np.all(x[:, :, 30:] == 0)
    assert np.all(y[:20, :30] == 0) and np.all(y[20:, :] == 255) and np.all(y[:, 30:] == 255)


def test_rescale_relative_to_reference_scale():
    from zeroseg.data.transforms import rescale_size

    assert rescale_size((360, 480), 1.0, (2048, 512)) == (512, 683)  # short edge hits 512
    assert rescale_size((360, 480), 0.5, None) == (180, 240)


def test_normalize_and_config_validation():
    x = normalize(np.array([[[255, 0, 51]]], np.uint8), (0.5, 0.5, 0.2), (0.5, 0.5, 0.1))
    np.testing.assert_allclose(x[:, 0, 0], [1.0, -1.0, 0.0], atol=1e-6)
    with pytest.raises(ValidationError, match="crop_sise"):
        AugmentConfig(crop_sise=(1, 1))
    with pytest.raises(ValidationError, match="long_edge, short_edge"):
        AugmentConfig(scale=(512, 2048))
    with pytest.raises(ValidationError, match="low <= high"):
        AugmentConfig(ratio_range=(2.0, 0.5))


def test_mismatched_image_and_label_sizes():
    with pytest.raises(DataError, match="label is"):
        train_transform(
            np.zeros((10, 12, 3), np.uint8), np.zeros((10, 10), np.uint8), AugmentConfig(), np.random.default_rng(0)
        )


# -- the Ray Data pipeline ----------------------------------------------------------------------
def _epoch(ds) -> list[dict[str, np.ndarray]]:
    return list(ds.iter_batches(batch_size=None, batch_format="numpy"))


def test_manifest_table_resolves_uris(shared_data, tmp_path):
    from stages.feeds import URI_COLUMNS, manifest_table

    pairs = camvid_pairs(shared_data, 3)
    art = build_splits_artifact(tmp_path / "bs", pairs)
    t = manifest_table(art, "train")
    assert set(URI_COLUMNS) <= set(t.column_names)
    rows = t.to_pylist()
    assert [r["image_id"] for r in rows] == [p[0] for p in pairs]
    for r, (image_id, img_p, _) in zip(rows, pairs):
        assert r["image_uri"] == f"{img_p.parent}/{img_p.name}" and Path(r["image_uri"]).is_file()
        assert r["label_uri"] == f"{tmp_path / 'bs'}/labels/train/{image_id}.png"
    # the same artifact in a bucket: labels from the bucket, images from this invocation's roots
    remote = Artifact(
        "build_splits", KEY, art.path, "gs://b/store/build_splits/" + KEY, {"files": []}, runtime=art.runtime
    )
    r = manifest_table(remote, "train").to_pylist()[0]
    assert r["label_uri"] == f"gs://b/store/build_splits/{KEY}/labels/train/{pairs[0][0]}.png"
    assert r["image_uri"] == str(pairs[0][1])


def test_train_dataset_decodes_remaps_and_normalises(shared_data, tmp_path, ray_local):
    from stages.feeds import train_dataset

    pairs = camvid_pairs(shared_data, 4)
    art = build_splits_artifact(tmp_path / "bs", pairs)
    cfg = AugmentConfig(crop_size=(360, 480), ratio_range=(1, 1), flip_prob=0.0)
    ds = train_dataset(art, LUT, cfg, seed=0, block_rows=2, shuffle=False)
    ds.context.execution_options.preserve_order = True
    batches = _epoch(ds)
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.dtype == np.float32 and images.shape == (4, 3, 360, 480)
    assert labels.dtype == np.uint8 and labels.shape == (4, 360, 480)
    for i, (_, img_p, lbl_p) in enumerate(pairs):
        raw = decode_label(lbl_p)
        assert np.array_equal(labels[i], LUT[raw])  # training ids, void -> 255
        assert (labels[i] == 255).sum() == (raw == CAMVID_VOID).sum()
        np.testing.assert_allclose(images[i], normalize(decode_image(img_p), cfg.mean, cfg.std), atol=1e-5)


def test_train_dataset_is_seeded_per_epoch(shared_data, tmp_path, ray_local):
    from stages.feeds import train_dataset

    art = build_splits_artifact(tmp_path / "bs", camvid_pairs(shared_data, 6))
    cfg = AugmentConfig(crop_size=(64, 64))

    def build():
        ds = train_dataset(art, LUT, cfg, seed=3, block_rows=2)
        ds.context.execution_options.preserve_order = True
        return ds

    ds1, ds2 = build(), build()
    e0, e1 = _epoch(ds1), _epoch(ds1)
    f0 = _epoch(ds2)
    cat = lambda bs: np.concatenate([b["image"] for b in bs])  # noqa: E731
    assert np.array_equal(cat(e0), cat(f0))  # same seed, same epoch: identical samples and order
    assert not np.array_equal(cat(e0), cat(e1))  # the next epoch: new order/augmentation


def test_manifest_errors(shared_data, tmp_path, ray_local):
    from stages.feeds import manifest_table, train_dataset

    bad = tmp_path / "bad"
    (bad / "manifests").mkdir(parents=True)
    pq.write_table(pa.table({"image_id": ["a"], "image": ["x.png"]}), bad / "manifests" / "train.parquet")
    art = Artifact("build_splits", KEY, bad, str(bad), {"files": []}, runtime={"image_roots": {}})
    with pytest.raises(DataError, match=r"lacks column\(s\) \['label', 'height', 'width', 'classes', 'dataset'\]"):
        manifest_table(art, "train")
    (bad / "manifests" / "val.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match=r"cannot read manifest .*val\.parquet"):
        manifest_table(art, "val")
    with pytest.raises(
        FileNotFoundError, match=r"artifact build_splits/bbbbbbbbbbbb has no file 'manifests/test\.parquet'"
    ):
        manifest_table(art, "test")
    # a manifest whose dataset has no image folder in this invocation
    pairs = camvid_pairs(shared_data, 1)
    good = build_splits_artifact(tmp_path / "good", pairs)
    good.runtime = {"image_roots": {"val": "/data/coco"}}
    with pytest.raises(DataError, match=r"no image folder known for split 'train'"):
        train_dataset(good, LUT, AugmentConfig(crop_size=(32, 32)), seed=0)
    # an empty manifest, a malformed lookup table
    empty = tmp_path / "empty"
    (empty / "manifests").mkdir(parents=True)
    pq.write_table(SCHEMA.empty_table(), empty / "manifests" / "train.parquet")
    with pytest.raises(DataError, match="has no rows"):
        train_dataset(
            Artifact("build_splits", KEY, empty, str(empty), {"files": []}, runtime={"image_roots": {"train": "/d"}}),
            LUT,
            AugmentConfig(crop_size=(32, 32)),
            seed=0,
        )
    with pytest.raises(ValueError, match=r"lut must be uint8 \[256\]"):
        train_dataset(build_splits_artifact(tmp_path / "g2", pairs), LUT.astype(np.int64), AugmentConfig(), seed=0)


def test_a_bad_training_image_reaches_the_driver_as_a_data_error(shared_data, tmp_path, ray_local):
    from stages.feeds import train_dataset

    _, img_p, lbl_p = camvid_pairs(shared_data, 1)[0]
    images = tmp_path / "images"
    images.mkdir()
    good = images / img_p.name
    shutil.copy(img_p, good)
    broken = images / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    art = build_splits_artifact(tmp_path / "bs", [("good", good, lbl_p), ("rotten", broken, lbl_p)], image_root=images)
    ds = train_dataset(art, LUT, AugmentConfig(crop_size=(32, 32)), seed=0, block_rows=1)
    with pytest.raises(Exception) as e:  # Ray Data wraps it; the driver recovers the typed error
        _epoch(ds)
    err = find_user_error(e.value)
    assert isinstance(err, DataError), f"{type(e.value).__name__}: {e.value}"
    assert str(err).startswith("training image 'rotten': ") and "broken.png" in str(err)


def test_png_bytes_and_uris_decode_alike(shared_data):
    from pipeline.uri import read_bytes

    _, img_p, _ = camvid_pairs(shared_data, 1)[0]
    raw = img_p.read_bytes()
    assert read_bytes(str(img_p)) == raw and read_bytes(f"file://{img_p}") == raw
    decoded = {
        "path": decode_image(img_p),
        "str": decode_image(str(img_p)),
        "bytes": decode_image(read_bytes(str(img_p))),
        "file_uri": decode_image(read_bytes(f"file://{img_p}")),
    }
    ref = np.asarray(Image.open(img_p).convert("RGB"))  # an independent decode
    for how, arr in decoded.items():
        assert arr.dtype == np.uint8 and arr.shape == ref.shape, how
        assert np.array_equal(arr, ref), how


def test_decode_pair_names_the_bad_file(shared_data, tmp_path):
    from stages.feeds import decode_pair

    _, img_p, lbl_p = camvid_pairs(shared_data, 1)[0]
    image, label = decode_pair(str(img_p), f"file://{lbl_p}")
    assert image.shape == (360, 480, 3) and label.shape == (360, 480) and label.dtype == np.uint8
    assert np.array_equal(label, np.asarray(Image.open(lbl_p)))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"broken\.png"):
        decode_pair(str(broken), str(lbl_p))
    with pytest.raises(DataError, match=r"file://.*broken\.png: "):
        decode_pair(f"file://{broken}", str(lbl_p))
    with pytest.raises(DataError, match=r"gone\.png.*FileNotFoundError"):
        decode_pair(str(img_p), str(tmp_path / "gone.png"))
    with pytest.raises(DataError, match=r"file://.*gone\.png cannot be read"):
        decode_pair(f"file://{tmp_path / 'gone.png'}", str(lbl_p))
