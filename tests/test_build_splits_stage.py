"""The build_splits stage on the real sample data (coco128-seg + camvid-val) through Ray Data."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from pipeline.dag import StageContext
from stages.build_splits import BuildSplits, BuildSplitsConfig
from zeroseg.data.splits import assign_val
from zeroseg.errors import ConfigError, DataError

KEY = "ab" * 32
UNSEEN = ["cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors"]


@pytest.fixture(scope="module")
def ray_session(ray_local):
    yield ray_local  # the session's one embedded cluster (conftest.py)


def make_config(data, **over):
    raw = {
        "train": {"name": "coco128", "format": "coco", "annotations": str(data / "coco128-seg/annotations.json"),
                  "images": str(data / "coco128-seg/images/train2017"), "coco_kind": "instances", "max_images": 12},
        "split": {"unseen": UNSEEN},
        "unseen_policy": "ignore",
        "val_fraction": 0.25,
        "seed": 0,
        "on_bad_image": "error",
        "eval": [{"name": "camvid", "format": "mask_folder", "images": str(data / "camvid-val/images"),
                  "labels": str(data / "camvid-val/labels"), "classes": str(data / "camvid-val/classes.json"),
                  "class_map": {"pedestrian": "person", "bicyclist": "bicycle"}, "max_images": 4}],
    }
    raw.update(over)
    return BuildSplitsConfig.model_validate(raw)


def expected_val_ids(data, cfg):
    """The held-out ids computed here, independently of the stage: the first ``max_images`` coco
    image ids (file-name stems) in sorted order, then :func:`assign_val` with the config's fraction and seed."""
    images = json.loads((data / "coco128-seg/annotations.json").read_text())["images"]
    ids = sorted(im["file_name"].rsplit(".", 1)[0] for im in images)[: cfg.train.max_images]
    return ids, assign_val(ids, cfg.val_fraction, cfg.seed)


def run_stage(cfg, tmp_path):
    out = tmp_path / "staging"
    out.mkdir(parents=True)
    ctx = StageContext(stage="build_splits", key=KEY, config=cfg, inputs={}, output_dir=out, work_dir=tmp_path,
                       train_storage=str(tmp_path / "store" / "_train"), train_name="build_splits-test",
                       log=lambda m: None, artifact_uri=str(tmp_path / "store" / "build_splits" / KEY))
    return BuildSplits().run(ctx), out


@pytest.fixture(scope="module")
def built(ray_session, shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build_splits")
    cfg = make_config(shared_data)
    metrics, out = run_stage(cfg, tmp)
    return cfg, metrics, out, tmp


def test_outputs_and_metrics(built, shared_data):
    cfg, metrics, out, tmp = built
    stats = json.loads((out / "stats.json").read_text())["splits"]
    assert set(stats) == {"train", "val", "camvid"}
    # the first 12 coco128 images, some held out by hash (seed 0); 000000000072 shows only giraffes (unseen),
    # so under policy ignore its label is all 255 and it is dropped (when it stays in train: checked here)
    ids, val_ids = expected_val_ids(shared_data, cfg)
    assert len(ids) == 12 and 0 < len(val_ids) < 12 and "000000000072" not in val_ids
    assert stats["train"]["images_total"] + stats["val"]["images_total"] == 12
    assert stats["val"]["images_total"] == len(val_ids)
    assert stats["train"]["images_total"] == 12 - len(val_ids)
    assert stats["train"]["dropped"] == {"no_labelled_pixels": 1} and stats["train"]["images_with_unseen"] == 1
    assert stats["train"]["unseen_present"] == [] and stats["val"]["unseen_present"] == ["giraffe"]
    assert metrics["train_images"] == stats["train"]["kept"] > 0
    assert metrics["val_images"] == stats["val"]["kept"] == stats["val"]["images_total"] > 0
    assert metrics["camvid_images"] == 4 and metrics["skipped_images"] == 0
    assert metrics["dropped_images"] == stats["train"]["dropped_total"]
    for split, n in (("train", metrics["train_images"]), ("val", metrics["val_images"]), ("camvid", 4)):
        t = pq.read_table(out / "manifests" / f"{split}.parquet")
        assert t.num_rows == n
        assert t.column_names == ["image_id", "image_uri", "label_uri", "height", "width", "classes", "dataset"]
    classes = json.loads((out / "classes.json").read_text())
    train = classes["train"]
    assert train["dataset"] == "coco128" and len(train["names"]) == 80 and train["ignore_index"] == 255
    assert [train["names"][i] for i in train["unseen"]] == sorted(UNSEEN, key=train["names"].index)
    cam = classes["eval"]["camvid"]
    assert cam["prompt_names"][9:] == ["person", "bicycle"]
    assert [cam["names"][i] for i in cam["seen"]] == ["car", "pedestrian", "bicyclist"]
    assert classes["eval"]["val"]["unseen"] == train["unseen"]
    assert "road" in stats["camvid"]["unseen_present"] and stats["camvid"]["pixels_per_class"]["sky"] > 0


def test_train_labels_never_hold_unseen_ids_and_uris_point_at_the_published_artifact(built, shared_data):
    cfg, _, out, tmp = built
    unseen = set(json.loads((out / "classes.json").read_text())["train"]["unseen"])
    published = tmp / "store" / "build_splits" / KEY
    rows = pq.read_table(out / "manifests" / "train.parquet").to_pylist()
    for r in rows:
        rel = f"labels/train/{r['image_id']}.png"
        assert r["label_uri"] == f"{published}/{rel}"
        label = np.asarray(Image.open(out / rel))
        assert label.dtype == np.uint8 and label.shape == (r["height"], r["width"])
        present = set(np.unique(label).tolist()) - {255}
        assert present == set(r["classes"]) and not present & unseen
        assert Image.open(r["image_uri"]).size == (r["width"], r["height"])
    # val keeps unseen classes: 000000000025 (held out with seed 0) shows giraffes
    ids, val_ids = expected_val_ids(shared_data, cfg)
    assert "000000000025" in val_ids
    val = {r["image_id"]: r for r in pq.read_table(out / "manifests" / "val.parquet").to_pylist()}
    train_ids = {r["image_id"] for r in rows}
    assert set(val) == val_ids  # eval sets keep every image
    assert train_ids == set(ids) - val_ids - {"000000000072"}  # 072: only giraffes -> dropped
    assert set(val["000000000025"]["classes"]) & unseen
    cam = pq.read_table(out / "manifests" / "camvid.parquet").to_pylist()[0]
    assert cam["dataset"] == "camvid" and max(cam["classes"]) <= 10
    assert 11 not in set(np.unique(np.asarray(Image.open(out / "labels/camvid" / f"{cam['image_id']}.png"))).tolist())


def test_drop_policy_and_fingerprint(built, shared_data, tmp_path):
    cfg, metrics, _, _ = built
    cfg_drop = make_config(shared_data, unseen_policy="drop", val_fraction=0.0, eval=[])
    m, out = run_stage(cfg_drop, tmp_path)
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    # PADing: both giraffe images (000000000025, 000000000072) are dropped, everything else kept
    assert stats["images_total"] == 12 and stats["dropped"] == {"unseen_pixels": 2} and stats["kept"] == 10
    assert not (out / "manifests" / "val.parquet").exists() and m["train_images"] == stats["kept"]
    stage = BuildSplits()
    fp = stage.fingerprint(cfg)
    assert fp == stage.fingerprint(make_config(shared_data)) and len(fp) == 64
    # the fingerprint covers dataset files only: policy, fraction and seed leave it alone ...
    assert fp == stage.fingerprint(make_config(shared_data, unseen_policy="drop", val_fraction=0.0, seed=7))
    # ... while dropping the camvid eval set (its folders no longer inputs), and nothing else, changes it
    assert fp != stage.fingerprint(make_config(shared_data, eval=[]))
    assert fp != stage.fingerprint(cfg_drop)


def test_unknown_split_class_fails_the_stage_with_a_suggestion(ray_session, shared_data, tmp_path):
    cfg = make_config(shared_data, split={"unseen": ["girafe"]})
    with pytest.raises(ConfigError, match=r"'girafe'.*'coco128'.*'giraffe'"):
        run_stage(cfg, tmp_path)


def test_config_validation(shared_data):
    with pytest.raises(ValidationError, match="unseen_polcy"):
        make_config(shared_data, unseen_polcy="drop")
    with pytest.raises(ValidationError, match="needs \\['labels'\\]"):
        make_config(shared_data, eval=[{"name": "c", "format": "mask_folder", "images": "x", "classes": ["a"]}])
    with pytest.raises(ValidationError, match="do not apply to format 'coco'"):
        make_config(shared_data, train={"name": "t", "format": "coco", "images": "x", "annotations": "a.json",
                                        "labels": "y"})
    with pytest.raises(ValidationError, match="eval datasets only"):
        make_config(shared_data, train={"name": "t", "format": "coco", "images": "x", "annotations": "a.json",
                                        "class_map": {"a": "b"}})
    with pytest.raises(ValidationError, match="already used"):
        make_config(shared_data, eval=[{"name": "val", "format": "coco", "images": "x", "annotations": "a.json"}])
    with pytest.raises(ValidationError, match="builtin"):
        make_config(shared_data, split={"builtin": "coco171"})
    assert make_config(shared_data, split={"builtin": "coco_stuff171"}).split.builtin == "coco_stuff171"


def _tiny_mask_dataset(root):
    """Three 6x4 mask-folder images (classes a, b; 9 = void); c.jpg is a truncated JPEG."""
    img, lbl = root / "img", root / "lbl"
    img.mkdir(parents=True)
    lbl.mkdir()
    rng = np.random.default_rng(0)
    for i, stem in enumerate(("a", "b", "c")):
        Image.fromarray(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)).save(img / f"{stem}.jpg", quality=95)
        lab = np.full((4, 6), i % 2, np.uint8)
        lab[0, 0] = 9
        Image.fromarray(lab, mode="L").save(lbl / f"{stem}.png")
    data = (img / "c.jpg").read_bytes()
    (img / "c.jpg").write_bytes(data[: len(data) // 2])
    return {"name": "tiny", "format": "mask_folder", "images": str(img), "labels": str(lbl),
            "classes": ["a", "b"], "ignore_index": 9}


def test_bad_images_fail_or_are_skipped_and_counted(ray_session, shared_data, tmp_path):
    train = _tiny_mask_dataset(tmp_path / "ds")
    cfg = make_config(shared_data, train=train, split={"unseen": ["b"]}, val_fraction=0.0, eval=[])
    with pytest.raises(DataError, match=r"c\.jpg is corrupt or truncated.*on_bad_image: skip"):
        run_stage(cfg, tmp_path / "err")
    cfg.on_bad_image = "skip"
    metrics, out = run_stage(cfg, tmp_path / "skip")
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    assert metrics["skipped_images"] == 1 and stats["skipped_files"][0]["file"].endswith("c.jpg")
    # a.png is class a (seen) -> kept; b.png is all class b (unseen, policy ignore) -> nothing left -> dropped
    assert stats["dropped"] == {"no_labelled_pixels": 1} and metrics["train_images"] == 1
    row = pq.read_table(out / "manifests" / "train.parquet").to_pylist()[0]
    label = np.asarray(Image.open(out / "labels" / "train" / "a.png"))
    assert row["image_id"] == "a" and row["classes"] == [0] and label[0, 0] == 255 and (label.ravel()[1:] == 0).all()
