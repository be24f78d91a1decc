"""The build_splits stage on the real sample data (coco128-seg + camvid-val) through Ray Data:
outputs, the path-free manifests and how they resolve (stages.feeds.manifest_table with the
stage's runtime outputs), plan-time checks, keys (Runtime data paths + content fingerprint) and
typed errors carried back from the Ray workers."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors (what the CLI does)
from pipeline.config import digest, hashed_view, runtime_view
from pipeline.dag import Artifact, StageContext
from pipeline.errors import find_user_error
from stages.build_splits import BuildSplits, BuildSplitsConfig, named_split, validation_split
from stages.feeds import leakage_guard, manifest_table
from zeroseg.data.splits import assign_val
from zeroseg.data.transforms import make_lut
from zeroseg.errors import BadImageError, ConfigError, DataError, LeakageError

KEY = "ab" * 32
UNSEEN = ["cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors"]
COLUMNS = ["image_id", "image", "label", "height", "width", "classes", "dataset"]


@pytest.fixture(scope="module")
def ray_session(ray_local):
    yield ray_local  # the session's one embedded cluster (conftest.py)


def raw_config(data, **over):
    raw = {
        "train": {
            "name": "coco128",
            "format": "coco",
            "annotations": f"{data}/coco128-seg/annotations.json",
            "images": f"{data}/coco128-seg/images/train2017",
            "coco_kind": "instances",
            "max_images": 12,
        },
        "split": {"unseen": UNSEEN},
        "unseen_policy": "ignore",
        "val_fraction": 0.25,
        "seed": 0,
        "on_bad_image": "error",
        "eval": [
            {
                "name": "camvid",
                "format": "mask_folder",
                "images": f"{data}/camvid-val/images",
                "labels": f"{data}/camvid-val/labels",
                "classes": f"{data}/camvid-val/classes.json",
                "class_map": {"pedestrian": "person", "bicyclist": "bicycle"},
                "max_images": 4,
            }
        ],
    }
    raw.update(over)
    return raw


def make_config(data, **over):
    return BuildSplitsConfig.model_validate(raw_config(data, **over))


def expected_val_ids(data, cfg):
    """The held-out ids computed here, independently of the stage: the first ``max_images`` coco
    image ids (file-name stems) in sorted order, then :func:`assign_val` with the config's fraction and seed."""
    images = json.loads((data / "coco128-seg/annotations.json").read_text())["images"]
    ids = sorted(im["file_name"].rsplit(".", 1)[0] for im in images)[: cfg.train.max_images]
    return ids, assign_val(ids, cfg.val_fraction, cfg.seed)


def run_stage(cfg, tmp_path):
    out = tmp_path / "staging"
    out.mkdir(parents=True)
    ctx = StageContext(
        stage="build_splits",
        key=KEY,
        config=cfg,
        inputs={},
        output_dir=out,
        work_dir=tmp_path,
        train_storage=str(tmp_path / "store" / "_train"),
        train_name="build_splits-test",
        log=lambda m: None,
    )
    return BuildSplits().run(ctx), out


def artifact(cfg, out, uri):
    """The artifact as the pipeline hands it downstream: files in ``out``, published at ``uri``,
    with the producing stage's runtime outputs attached."""
    return Artifact("build_splits", KEY, Path(out), str(uri), {"files": []}, runtime=BuildSplits().runtime_outputs(cfg))


def user_error(fn, *args):
    """The user error ``fn`` raises, as the driver recovers it (``pipeline.errors.find_user_error``)."""
    with pytest.raises(Exception) as e:
        fn(*args)
    found = find_user_error(e.value)
    assert found is not None, f"no user error in {type(e.value).__name__}: {e.value}"
    return found


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
        assert t.column_names == COLUMNS
    classes = json.loads((out / "classes.json").read_text())
    train = classes["train"]
    assert train["dataset"] == "coco128" and len(train["names"]) == 80 and train["ignore_index"] == 255
    assert [train["names"][i] for i in train["unseen"]] == sorted(UNSEEN, key=train["names"].index)
    cam = classes["eval"]["camvid"]
    assert cam["prompt_names"][9:] == ["person", "bicycle"]
    assert [cam["names"][i] for i in cam["seen"]] == ["car", "pedestrian", "bicyclist"]
    assert classes["eval"]["val"]["unseen"] == train["unseen"]
    assert "road" in stats["camvid"]["unseen_present"] and stats["camvid"]["pixels_per_class"]["sky"] > 0


def test_manifests_hold_no_absolute_path(built, shared_data):
    cfg, _, out, _ = built
    coco = {
        im["file_name"].rsplit(".", 1)[0]: im["file_name"]
        for im in json.loads((shared_data / "coco128-seg/annotations.json").read_text())["images"]
    }
    data_dir = str(shared_data.resolve())
    for split in ("train", "val", "camvid"):
        for r in pq.read_table(out / "manifests" / f"{split}.parquet").to_pylist():
            # image: relative to its dataset's image folder; label: relative to the artifact
            assert r["label"] == f"labels/{split}/{r['image_id']}.png" and (out / r["label"]).is_file()
            want = f"{r['image_id']}.png" if split == "camvid" else coco[r["image_id"]]
            assert r["image"] == want and not os.path.isabs(r["image"])
            assert r["dataset"] == ("camvid" if split == "camvid" else "coco128")
            assert all(data_dir not in str(v) for v in r.values())
    for name in ("classes.json", "stats.json"):
        assert data_dir not in (out / name).read_text(), name


def test_manifest_table_resolves_against_this_invocation(built, shared_data):
    cfg, _, out, tmp = built
    roots = BuildSplits().runtime_outputs(cfg)
    coco = str((shared_data / "coco128-seg/images/train2017").resolve())
    assert roots == {
        "image_roots": {"train": coco, "val": coco, "camvid": str((shared_data / "camvid-val/images").resolve())}
    }
    published = tmp / "store" / "build_splits" / KEY
    art = artifact(cfg, out, published)
    for split in ("train", "val", "camvid"):
        t = manifest_table(art, split)
        assert t.column_names == [*COLUMNS, "image_uri", "label_uri"]
        for r in t.to_pylist():
            root = roots["image_roots"][split]
            assert r["image_uri"] == f"{root}/{r['image']}" and Path(r["image_uri"]).is_file()
            assert r["label_uri"] == f"{published}/labels/{split}/{r['image_id']}.png"
    # a store URI: labels are read from the bucket; images from where the data is mounted here
    s3 = artifact(cfg, out, f"s3://bucket/zeroseg/build_splits/{KEY}/")
    r = manifest_table(s3, "val").to_pylist()[0]
    assert r["label_uri"] == f"s3://bucket/zeroseg/build_splits/{KEY}/labels/val/{r['image_id']}.png"
    assert r["image_uri"].startswith(roots["image_roots"]["val"] + "/")
    # without the runtime outputs the images cannot be found: named
    bare = Artifact("build_splits", KEY, out, str(published), {"files": []})
    with pytest.raises(DataError, match=r"no image folder known for split 'camvid'"):
        manifest_table(bare, "camvid")
    with pytest.raises(FileNotFoundError, match=r"no file 'manifests/nope.parquet'"):
        manifest_table(art, "nope")


def test_train_labels_never_hold_unseen_ids(built, shared_data):
    cfg, _, out, tmp = built
    unseen = set(json.loads((out / "classes.json").read_text())["train"]["unseen"])
    art = artifact(cfg, out, out)
    rows = manifest_table(art, "train").to_pylist()
    for r in rows:
        label = np.asarray(Image.open(r["label_uri"]))
        assert label.dtype == np.uint8 and label.shape == (r["height"], r["width"])
        present = set(np.unique(label).tolist()) - {255}
        assert present == set(r["classes"]) and not present & unseen
        assert Image.open(r["image_uri"]).size == (r["width"], r["height"])
    # val keeps unseen classes: 000000000025 (held out with seed 0) shows giraffes
    ids, val_ids = expected_val_ids(shared_data, cfg)
    assert "000000000025" in val_ids
    val = {r["image_id"]: r for r in manifest_table(art, "val").to_pylist()}
    train_ids = {r["image_id"] for r in rows}
    assert set(val) == val_ids  # eval sets keep every image
    assert train_ids == set(ids) - val_ids - {"000000000072"}  # 072: only giraffes -> dropped
    assert set(val["000000000025"]["classes"]) & unseen
    cam = manifest_table(art, "camvid").to_pylist()[0]
    assert cam["dataset"] == "camvid" and max(cam["classes"]) <= 10
    assert 11 not in set(np.unique(np.asarray(Image.open(cam["label_uri"]))).tolist())


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


def test_data_paths_stay_out_of_the_key(shared_data, tmp_path, monkeypatch):
    """Relative, absolute and symlinked spellings of the same data: same hashed view, same
    fingerprint, same image folders (resolved); only the runtime view differs."""
    link = tmp_path / "mounted"
    link.symlink_to(shared_data, target_is_directory=True)
    monkeypatch.chdir(shared_data.parent)
    spellings = [
        make_config(shared_data.resolve()),
        make_config(Path(shared_data.name)),
        make_config(link),
        make_config(f"./{shared_data.name}/../{shared_data.name}"),
    ]
    stage = BuildSplits()
    base = spellings[0]
    assert "images" not in hashed_view(base)["train"] and "annotations" not in hashed_view(base)["train"]
    # optional data paths (labels, panoptic_masks, ids_file: ``DataPath | None``) are runtime too
    assert {"images", "labels", "classes", "panoptic_masks", "ids_file"}.isdisjoint(hashed_view(base)["eval"][0])
    assert {"panoptic_masks", "labels", "ids_file"}.isdisjoint(hashed_view(base)["train"])
    rt = runtime_view(base)
    assert rt["train.images"] == f"{shared_data.resolve()}/coco128-seg/images/train2017"
    assert rt["eval.0.labels"] == f"{shared_data.resolve()}/camvid-val/labels"  # list items are shown too
    for c in spellings[1:]:
        assert digest(hashed_view(c)) == digest(hashed_view(base))
        assert stage.fingerprint(c) == stage.fingerprint(base)
        assert stage.runtime_outputs(c) == stage.runtime_outputs(base)
    assert runtime_view(spellings[2])["train.images"] != runtime_view(base)["train.images"]
    # what does enter: hashed fields, and classes given inline (a class *file* is a runtime path)
    assert hashed_view(make_config(shared_data, seed=1)) != hashed_view(base)
    inline = make_config(shared_data, eval=[{**raw_config(shared_data)["eval"][0], "classes": ["a", "b"]}])
    assert hashed_view(inline)["eval"][0]["classes"] == ["a", "b"]


def test_fingerprint_follows_the_dataset_content(tmp_path):
    train = _tiny_mask_dataset(tmp_path / "ds")
    cfg = make_config(tmp_path, train=train, split={"unseen": ["b"]}, val_fraction=0.0, eval=[])
    stage = BuildSplits()
    fp = stage.fingerprint(cfg)
    Image.new("RGB", (6, 4)).save(Path(train["images"]) / "d.jpg")  # an added image
    fp2 = stage.fingerprint(cfg)
    assert fp2 != fp
    (Path(train["images"]) / "d.jpg").unlink()
    assert stage.fingerprint(cfg) == fp
    Image.fromarray(np.zeros((4, 6), np.uint8), mode="L").save(Path(train["labels"]) / "z.png")  # an added label
    assert stage.fingerprint(cfg) != fp


def test_unknown_class_names_fail_at_plan_time_and_in_the_stage(ray_session, shared_data, tmp_path):
    cfg = make_config(shared_data, split={"unseen": ["girafe"]})
    with pytest.raises(ConfigError, match=r"'girafe'.*'coco128'.*'giraffe'"):
        BuildSplits().check(cfg)  # plan time: no Ray, no listing of the images
    with pytest.raises(ConfigError, match=r"'girafe'.*'coco128'.*'giraffe'"):
        run_stage(cfg, tmp_path)
    cam = raw_config(shared_data)["eval"][0]
    bad_key = make_config(shared_data, eval=[{**cam, "class_map": {"pedestrain": "person"}}])
    with pytest.raises(ConfigError, match=r"'pedestrain'.*'pedestrian'"):
        BuildSplits().check(bad_key)
    bad_target = make_config(shared_data, eval=[{**cam, "class_map": {"pedestrian": "persn"}}])
    with pytest.raises(ConfigError, match=r"'persn' is not a class of the training dataset 'coco128'.*'person'"):
        BuildSplits().check(bad_target)
    assert BuildSplits().check(make_config(shared_data)) is None


def test_plan_time_checks_name_missing_and_empty_paths(shared_data, tmp_path):
    stage = BuildSplits()
    with pytest.raises(ConfigError, match=r"dataset 'coco128': .*nope\.json does not exist"):
        stage.check(
            make_config(
                shared_data, train={**raw_config(shared_data)["train"], "annotations": str(tmp_path / "nope.json")}
            )
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"dataset 'coco128': images folder .*empty is empty"):
        stage.check(
            make_config(shared_data, train={**raw_config(shared_data)["train"], "images": str(tmp_path / "empty")})
        )
    cam = raw_config(shared_data)["eval"][0]
    with pytest.raises(ConfigError, match=r"dataset 'camvid': labels folder .*gone does not exist"):
        stage.check(make_config(shared_data, eval=[{**cam, "labels": str(tmp_path / "gone")}]))
    with pytest.raises(ConfigError, match=r"dataset 'camvid': .*classes\.jsn does not exist"):
        stage.check(make_config(shared_data, eval=[{**cam, "classes": str(tmp_path / "classes.jsn")}]))


def test_config_validation(shared_data):
    with pytest.raises(ValidationError, match="unseen_polcy"):
        make_config(shared_data, unseen_polcy="drop")
    with pytest.raises(ValidationError, match="needs \\['labels'\\]"):
        make_config(shared_data, eval=[{"name": "c", "format": "mask_folder", "images": "x", "classes": ["a"]}])
    with pytest.raises(ValidationError, match="do not apply to format 'coco'"):
        make_config(
            shared_data, train={"name": "t", "format": "coco", "images": "x", "annotations": "a.json", "labels": "y"}
        )
    with pytest.raises(ValidationError, match="eval datasets only"):
        make_config(
            shared_data,
            train={"name": "t", "format": "coco", "images": "x", "annotations": "a.json", "class_map": {"a": "b"}},
        )
    with pytest.raises(ValidationError, match="already used"):
        make_config(shared_data, eval=[{"name": "val", "format": "coco", "images": "x", "annotations": "a.json"}])
    with pytest.raises(ValidationError, match="builtin"):
        make_config(shared_data, split={"builtin": "coco171"})
    assert make_config(shared_data, split={"builtin": "coco_stuff171"}).split.builtin == "coco_stuff171"


def _tiny_mask_dataset(root, seed=0):
    """Three 6x4 mask-folder images (classes a, b; 9 = void); c.jpg is a truncated JPEG."""
    img, lbl = root / "img", root / "lbl"
    img.mkdir(parents=True)
    lbl.mkdir()
    rng = np.random.default_rng(seed)
    for i, stem in enumerate(("a", "b", "c")):
        Image.fromarray(rng.integers(0, 255, (4, 6, 3), dtype=np.uint8)).save(img / f"{stem}.jpg", quality=95)
        lab = np.full((4, 6), i % 2, np.uint8)
        lab[0, 0] = 9
        Image.fromarray(lab, mode="L").save(lbl / f"{stem}.png")
    data = (img / "c.jpg").read_bytes()
    (img / "c.jpg").write_bytes(data[: len(data) // 2])
    return {
        "name": "tiny",
        "format": "mask_folder",
        "images": str(img),
        "labels": str(lbl),
        "classes": ["a", "b"],
        "ignore_index": 9,
    }


def test_bad_images_fail_or_are_skipped_and_counted(ray_session, shared_data, tmp_path):
    train = _tiny_mask_dataset(tmp_path / "ds")
    cfg = make_config(shared_data, train=train, split={"unseen": ["b"]}, val_fraction=0.0, eval=[])
    # raised in a Ray Data worker, recovered on the driver as the same typed error
    err = user_error(run_stage, cfg, tmp_path / "err")
    assert isinstance(err, BadImageError)
    assert err.args[0].startswith(f"image {tmp_path / 'ds' / 'img' / 'c.jpg'} is corrupt or truncated")
    assert "on_bad_image: skip" in str(err)
    cfg.on_bad_image = "skip"
    metrics, out = run_stage(cfg, tmp_path / "skip")
    stats = json.loads((out / "stats.json").read_text())["splits"]["train"]
    assert metrics["skipped_images"] == 1 and stats["skipped_files"][0]["file"] == "c.jpg"  # relative, like manifests
    # a.png is class a (seen) -> kept; b.png is all class b (unseen, policy ignore) -> nothing left -> dropped
    assert stats["dropped"] == {"no_labelled_pixels": 1} and metrics["train_images"] == 1
    row = pq.read_table(out / "manifests" / "train.parquet").to_pylist()[0]
    label = np.asarray(Image.open(out / "labels" / "train" / "a.png"))
    assert row["image_id"] == "a" and row["classes"] == [0] and label[0, 0] == 255 and (label.ravel()[1:] == 0).all()
    assert row["image"] == "a.jpg" and row["label"] == "labels/train/a.png"


def test_label_errors_reach_the_driver_as_data_errors(ray_session, shared_data, tmp_path):
    train = _tiny_mask_dataset(tmp_path / "ds")
    Image.fromarray(np.full((4, 6), 7, np.uint8), mode="L").save(Path(train["labels"]) / "a.png")
    cfg = make_config(
        shared_data, train=train, split={"unseen": ["b"]}, val_fraction=0.0, eval=[], on_bad_image="skip"
    )  # label errors are never skipped
    err = user_error(run_stage, cfg, tmp_path / "out")
    assert type(err) is DataError and "a.png" in str(err) and "value(s) [7] outside the class list" in str(err)


def test_train_and_eval_datasets_of_the_same_name_resolve_their_own_images(ray_session, shared_data, tmp_path):
    """An eval dataset may share the training dataset's ``name`` (the config allows it); each
    manifest must still resolve to its own dataset's image folder."""
    train = _tiny_mask_dataset(tmp_path / "a")
    other = _tiny_mask_dataset(tmp_path / "b", seed=1)
    cfg = make_config(
        shared_data,
        train=train,
        split={"unseen": []},
        val_fraction=0.0,
        on_bad_image="skip",
        eval=[{**other, "name": "tiny"}],
    )
    assert cfg.train.name == cfg.eval[0].name == "tiny"
    _, out = run_stage(cfg, tmp_path / "out")
    art = artifact(cfg, out, out)
    for split, root in (("train", train["images"]), ("tiny", other["images"])):
        for r in manifest_table(art, split).to_pylist():
            assert r["image_uri"] == f"{Path(root).resolve()}/{r['image']}", split


# -- seen-class validation (split.pseudo_unseen, ZegFormer Sec. 4.1) ------------------------------
#: classes a, x, b, c; x is the benchmark's unseen class, b plays unseen (pseudo-unseen)
VAL_CLASSES = ["a", "x", "b", "c"]
ALL = [[0, 0, 1, 1, 2, 3], [0, 1, 1, 2, 3, 3], [9, 0, 1, 2, 2, 3], [0, 0, 1, 2, 3, 9]]  # 9 = void
#: by hand: the run's vocabulary is a, b, c (x leaves it, c moves from 3 to 2); in training b is
#: ignored like an unseen class; on val b is the unseen class 1; x and void are ignore everywhere
TRAIN_MAP = {0: 0, 1: 255, 2: 255, 3: 2, 9: 255}
VAL_MAP = {0: 0, 1: 255, 2: 1, 3: 2, 9: 255}


def _validation_dataset(root):
    """Six 4x6 mask-folder images. With seed 0 and val_fraction 0.5, r and s are held out
    (sha256("0:r"), sha256("0:s") -> 0.214, 0.365 < 0.5; p 0.511, q 0.894, t 0.722, v 0.588)."""
    img, lbl = root / "img", root / "lbl"
    img.mkdir(parents=True)
    lbl.mkdir()
    labels = {
        "p": ALL,
        "r": ALL,
        "q": [[1, 1, 2, 2, 9, 9]] * 4,  # x and b only
        "s": [[1, 1, 1, 3, 3, 3]] * 4,  # x and c
        "t": [[0, 0, 0, 2, 2, 2]] * 4,  # a and b
        "v": [[0, 0, 3, 3, 3, 0]] * 4,  # a and c
    }
    for stem, lab in labels.items():
        Image.new("RGB", (6, 4), (10, 20, 30)).save(img / f"{stem}.png")
        Image.fromarray(np.asarray(lab, np.uint8), mode="L").save(lbl / f"{stem}.png")
    train = {"name": "tiny", "format": "mask_folder", "images": str(img), "labels": str(lbl)}
    return {**train, "classes": VAL_CLASSES, "ignore_index": 9}, labels


def _by_hand(lab, mapping):
    return np.vectorize(mapping.get)(np.asarray(lab)).astype(np.uint8)


def test_seen_class_validation_split(ray_session, shared_data, tmp_path):
    train, labels = _validation_dataset(tmp_path / "ds")
    split = {"unseen": ["x"], "pseudo_unseen": ["b"]}
    cfg = make_config(shared_data, train=train, split=split, val_fraction=0.5, seed=0, eval=[])
    assert BuildSplits().check(cfg) is None
    metrics, out = run_stage(cfg, tmp_path / "out")
    classes = json.loads((out / "classes.json").read_text())
    for vocab in (classes["train"], classes["eval"]["val"]):  # x is in no vocabulary: nothing embeds or scores it
        assert vocab["names"] == vocab["prompt_names"] == ["a", "b", "c"]
        assert vocab["seen"] == [0, 2] and vocab["unseen"] == [1] and vocab["ignore_index"] == 255
    assert classes["pseudo_unseen"]["pseudo_unseen"] == ["b"] and classes["pseudo_unseen"]["excluded"] == ["x"]
    assert classes["pseudo_unseen"]["how"] == {"pseudo_unseen": ["b"], "seed": 0}
    art = artifact(cfg, out, out)
    got = {
        split: {r["image_id"]: np.asarray(Image.open(r["label_uri"])) for r in manifest_table(art, split).to_pylist()}
        for split in ("train", "val")
    }
    # q (x and b only) has nothing left to train on: dropped, as an image of unseen classes only is
    assert set(got["train"]) == {"p", "t", "v"} and set(got["val"]) == {"r", "s"}
    for split, mapping in (("train", TRAIN_MAP), ("val", VAL_MAP)):
        for stem, label in got[split].items():
            np.testing.assert_array_equal(label, _by_hand(labels[stem], mapping), err_msg=f"{split}/{stem}")
    stats = json.loads((out / "stats.json").read_text())
    tr, va = stats["splits"]["train"], stats["splits"]["val"]
    assert tr["dropped"] == {"no_labelled_pixels": 1} and metrics["train_images"] == 3
    # pixels of x (excluded) and of b (pseudo-unseen, before the policy), counted by hand in the labels above
    assert (tr["excluded_pixels"], va["excluded_pixels"]) == (6 + 8, 6 + 12)
    assert (tr["unseen_pixels"], tr["images_with_unseen"]) == (5 + 8 + 12, 3)
    assert (
        tr["unseen_present"] == [] and va["unseen_present"] == ["b"] and set(tr["pixels_per_class"]) == {"a", "b", "c"}
    )
    assert stats["pseudo_unseen"] == classes["pseudo_unseen"]
    # the training stages' leakage guard forbids the pseudo-unseen id in a training label, as an unseen one
    assert np.flatnonzero(leakage_guard(art, make_lut({0: 0, 2: 1}, source_classes=3))).tolist() == [1]
    with pytest.raises(LeakageError, match=r"unseen class\(es\) \['b'\]"):
        leakage_guard(art, make_lut({0: 0, 1: 1, 2: 2}, source_classes=3))


def test_seen_class_validation_errors_name_the_key_and_the_fix(shared_data, tmp_path):
    train, _ = _validation_dataset(tmp_path / "ds")

    def cfg(**split):
        return make_config(shared_data, train=train, split={"unseen": ["x"], **split}, val_fraction=0.5, eval=[])

    stage = BuildSplits()
    with pytest.raises(ConfigError, match=r"split\.pseudo_unseen: 'bb' is not a class of dataset 'tiny'; nearest: 'b'"):
        stage.check(cfg(pseudo_unseen=["bb"]))
    with pytest.raises(ConfigError, match=r"split\.pseudo_unseen: \['x'\] is an unseen class .*remove it"):
        stage.check(cfg(pseudo_unseen=["a", "x"]))
    with pytest.raises(ConfigError, match=r"pseudo_unseen names all 3 seen classes of 'tiny'.*leave at least one"):
        stage.check(cfg(pseudo_unseen=["c", "a", "b"]))
    with pytest.raises(ConfigError, match=r"pseudo_unseen names \['b'\] more than once"):
        stage.check(cfg(pseudo_unseen=["b", "b"]))
    with pytest.raises(ConfigError, match=r"pseudo_unseen_count = 3, but .* has 3 seen classes.*set it below 3"):
        stage.check(cfg(pseudo_unseen_count=3))
    # drawn from build_splits.seed: the seen class whose sha256("<seed>:<name>") is smallest
    unit = {n: hashlib.sha256(f"0:{n}".encode()).digest()[:8] for n in ("a", "b", "c")}
    assert validation_split(cfg(pseudo_unseen_count=1), named_split(cfg(), VAL_CLASSES))[0].unseen_names == (
        min(unit, key=unit.get),
    )
    with pytest.raises(ValidationError, match="either split.pseudo_unseen .* or split.pseudo_unseen_count"):
        cfg(pseudo_unseen=["b"], pseudo_unseen_count=1)
    with pytest.raises(ValidationError, match=r"pseudo_unseen: \[\] makes no seen-class validation split"):
        cfg(pseudo_unseen=[])
    with pytest.raises(ValidationError, match=r"split\.pseudo_unseen: .*val_fraction is 0; set val_fraction > 0"):
        make_config(
            shared_data, train=train, split={"unseen": ["x"], "pseudo_unseen": ["b"]}, val_fraction=0.0, eval=[]
        )
    # the benchmark's test set is refused: its scores would be neither protocol
    with pytest.raises(
        ValidationError, match=r"split\.pseudo_unseen_count: .*\['camvid'\].*--set build_splits\.eval=\[\]"
    ):
        make_config(shared_data, split={"unseen": UNSEEN, "pseudo_unseen_count": 2})
    # hashed: the validation split re-keys build_splits, and with it everything downstream
    views = {
        digest(hashed_view(c))
        for c in (cfg(), cfg(pseudo_unseen=["b"]), cfg(pseudo_unseen=["a"]), cfg(pseudo_unseen_count=1))
    }
    assert len(views) == 4
