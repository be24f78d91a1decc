"""The frequency rule for the seen/unseen split (ZegFormer Sec. 4.1, ADE20k-Full: seen = classes
present in more than 10 training images): the rule by hand, its errors, its config section, and
the build_splits stage on the real coco128 sample with the expected split counted independently
with pycocotools."""

import hashlib
import json
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from pydantic import ValidationError

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors (what the CLI does)
from pipeline.config import hashed_view
from pipeline.dag import StageContext
from stages.build_splits import BuildSplits, BuildSplitsConfig
from zeroseg.data.split_rules import frequency_split, images_per_class
from zeroseg.errors import ConfigError

KEY = "cd" * 32
ADE_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "ade20k_full_zegformer.yaml"
MIN_IMAGES = 4  # coco128: 12 classes are in exactly 4 training-set images, so the boundary is exercised


# -- the rule by hand ------------------------------------------------------------------------
def test_seen_means_more_than_min_images():
    names = ["wall", "sky", "lamp", "tiara", "yurt"]
    counts = [11, 10, 0, 3, 12]
    v = frequency_split(names, counts, min_images=10, dataset="toy", images=20)
    assert v.seen_names == ("wall", "yurt")  # 11 and 12 > 10
    assert v.unseen_names == ("sky", "lamp", "tiara")  # exactly 10, absent, 3
    assert v.names == tuple(names) and v.prompt_names == tuple(names)
    # min_images 0: every class present at least once is seen
    v0 = frequency_split(names, counts, min_images=0, dataset="toy", images=20)
    assert v0.unseen_names == ("lamp",)


def test_no_seen_or_no_unseen_class_names_the_key():
    names, counts = ["a", "b", "c"], [3, 5, 2]
    with pytest.raises(ConfigError, match=r"build_splits\.split\.min_images = 5.*no class would be seen.*below 5"):
        frequency_split(names, counts, min_images=5, dataset="toy", images=6)
    with pytest.raises(ConfigError, match=r"build_splits\.split\.min_images = 1.*no class would be unseen.*at least 2"):
        frequency_split(names, counts, min_images=1, dataset="toy", images=6)
    with pytest.raises(ConfigError, match="2 class counts for 3 classes"):
        frequency_split(names, [1, 2], min_images=1, dataset="toy", images=6)


def test_images_per_class_counts_each_image_once_and_skips_unreadable_ones():
    results = [
        {"status": "kept", "classes": [0, 2]},
        {"status": "kept", "classes": [2]},
        {"status": "kept", "classes": []},  # nothing labelled: counted as an image, no class
        {"status": "dropped", "classes": [1]},  # a policy-free pass drops nothing; counted if it did
        {"status": "skipped", "classes": []},
    ]
    assert images_per_class(results, 4) == ([1, 1, 2, 0], 4)


# -- the config section ------------------------------------------------------------------------
def _cfg(split, **over):
    raw = {
        "train": {"name": "toy", "format": "mask_folder", "images": "i", "labels": "l", "classes": ["a", "b"]},
        "split": split,
        **over,
    }
    return BuildSplitsConfig.model_validate(raw)


def test_split_section_validation():
    assert _cfg({"rule": "frequency", "min_images": 10}).split.min_images == 10
    with pytest.raises(ValidationError, match=r"split.rule frequency needs split.min_images"):
        _cfg({"rule": "frequency"})
    with pytest.raises(ValidationError, match=r"remove split.unseen"):
        _cfg({"rule": "frequency", "min_images": 10, "unseen": ["a"]})
    with pytest.raises(ValidationError, match=r"min_images applies to split.rule: frequency only"):
        _cfg({"unseen": ["a"], "min_images": 10})
    with pytest.raises(ValidationError, match=r"greater than or equal to 0"):
        _cfg({"rule": "frequency", "min_images": -1})
    with pytest.raises(ValidationError, match=r"split.rule: frequency with split.min_images"):
        _cfg({})


def test_rule_and_threshold_enter_the_key():
    ten = hashed_view(_cfg({"rule": "frequency", "min_images": 10}))
    assert ten != hashed_view(_cfg({"rule": "frequency", "min_images": 11}))
    assert ten != hashed_view(_cfg({"unseen": ["a"]}))


# -- the stage on coco128 ----------------------------------------------------------------------
def _held_out(image_id: str, fraction: float, seed: int) -> bool:
    """build_splits' documented val rule, written out here: sha256("seed:id")[:8] / 2^64 < fraction."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{image_id}".encode()).digest()[:8], "big") / 2.0**64
    return u < fraction


def _expected(data, val_fraction, seed, min_images):
    """From pycocotools, over the coco128 images minus the held-out ones: per category name the
    number of training images with a non-crowd annotation of it, the number of training images,
    and how many of them hold a category present in at most ``min_images`` of them."""
    coco = COCO(str(data / "coco128-seg" / "annotations.json"))
    assert not coco.getAnnIds(iscrowd=True)  # so "annotated" == "has labelled pixels"
    train = [i for i, im in coco.imgs.items() if not _held_out(im["file_name"].rsplit(".", 1)[0], val_fraction, seed)]
    counts, images_of = {}, {}
    for cat in coco.loadCats(coco.getCatIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=train, catIds=[cat["id"]], iscrowd=False))
        images_of[cat["name"]] = {a["image_id"] for a in anns}
        counts[cat["name"]] = len(images_of[cat["name"]])
    with_unseen = set().union(*(ims for n, ims in images_of.items() if counts[n] <= min_images))
    return counts, len(train), len(with_unseen)


def _run(cfg, tmp_path):
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


def _coco_config(data, **over):
    raw = {
        "train": {
            "name": "coco128",
            "format": "coco",
            "annotations": f"{data}/coco128-seg/annotations.json",
            "images": f"{data}/coco128-seg/images/train2017",
        },
        "split": {"rule": "frequency", "min_images": MIN_IMAGES},
        "unseen_policy": "ignore",
        "val_fraction": 0.25,
        "seed": 0,
    }
    raw.update(over)
    return BuildSplitsConfig.model_validate(raw)


def test_frequency_split_on_coco128_matches_pycocotools(ray_local, shared_data, tmp_path):
    cfg = _coco_config(shared_data)
    BuildSplits().check(cfg)  # plan time: the rule needs no counting yet
    expected, n_train, with_unseen = _expected(shared_data, 0.25, 0, MIN_IMAGES)
    want_seen = sorted(n for n, c in expected.items() if c > MIN_IMAGES)
    want_unseen = sorted(n for n, c in expected.items() if c <= MIN_IMAGES)
    assert 0 < len(want_seen) < 80 and any(c == MIN_IMAGES for c in expected.values())
    metrics, out = _run(cfg, tmp_path)

    classes = json.loads((out / "classes.json").read_text())
    train = classes["train"]
    assert sorted(train["names"][i] for i in train["seen"]) == want_seen
    assert sorted(train["names"][i] for i in train["unseen"]) == want_unseen
    # the counts are recorded, per class, in classes.json and stats.json
    split = classes["split"]
    assert split["rule"] == "frequency" and split["min_images"] == MIN_IMAGES
    assert split["counted_images"] == n_train < 128
    assert split["images_per_class"] == {n: expected[n] for n in train["names"]}
    stats = json.loads((out / "stats.json").read_text())
    assert stats["split"] == split
    assert stats["splits"]["train"]["images_total"] == n_train
    # the held-out val set is scored against the same split
    val = classes["eval"]["val"]
    assert sorted(val["names"][i] for i in val["seen"]) == want_seen
    # the policy then applies to the derived unseen classes: no unseen class reaches a training
    # label, and the images that had one are those pycocotools finds (coco128 has no crowd regions)
    assert stats["splits"]["train"]["unseen_present"] == []
    assert stats["splits"]["train"]["images_with_unseen"] == with_unseen
    assert metrics["train_images"] > 0


def test_a_threshold_that_leaves_no_seen_class_fails_naming_the_key(ray_local, shared_data, tmp_path):
    cfg = _coco_config(shared_data, split={"rule": "frequency", "min_images": 500}, val_fraction=0.0)
    cfg.train.max_images = 8
    with pytest.raises(ConfigError, match=r"build_splits\.split\.min_images = 500.*no class would be seen"):
        _run(cfg, tmp_path)


# -- the ADE20k-Full config ------------------------------------------------------------------------
def test_ade20k_full_config_is_zegformers_benchmark(monkeypatch, tmp_path):
    """configs/ade20k_full_zegformer.yaml: 847 classes in the released label-id order (spot
    checks from ZegFormer's category list: trainId 0 'wall', 1 'building, edifice', 846 'adding
    machine, totalizer, totaliser'), the frequency rule at 10 (Sec. 4.1), the same list for val,
    the released ADE-847 test settings (gamma 0, short side 512 up to 2048, imagenet_select)."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.catalog import STAGES

    class Cached:
        def exists(self, stage, key):
            return True

        def latest(self, stage):
            return None

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(ADE_CONFIG), STAGES, store=Cached())
    bs = p.nodes["build_splits"].config
    names = bs.train.classes
    assert len(names) == len(set(names)) == 847
    assert (names[0], names[1], names[846]) == ("wall", "building, edifice", "adding machine, totalizer, totaliser")
    assert bs.eval[0].classes == names and bs.train.format == bs.eval[0].format == "mask_folder"
    assert (bs.split.rule, bs.split.min_images, bs.unseen_policy) == ("frequency", 10, "ignore")
    ev = p.nodes["evaluate"].config
    assert (ev.protocol, ev.short_side, ev.max_long_side) == ("short_side", 512, 2048)
    # gamma 0 is the segmenter's own default (train_classifier.gamma, written to segmenter.json);
    # evaluate leaves it unset, so it applies the model's
    assert ev.gamma is None and p.nodes["train_classifier"].config.gamma == 0.0
    assert p.nodes["embed_text"].config.templates == "imagenet_select"
    assert p.nodes["train_classifier"].config.method == "zegformer"


def test_ade20k_full_config_plans_with_16_bit_labels(monkeypatch, tmp_path):
    """847 classes need 16-bit labels: build_splits' plan-time checks (the class list, the split
    section, ignore_index 65535 of the released .tif labels) accept the config, and the plan runs
    build_splits (nothing in the store)."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.catalog import STAGES

    class Empty:
        def exists(self, stage, key):
            return False

        def latest(self, stage):
            return None

    for split in ("training", "validation"):
        for sub, name in (("images_detectron2", "a.jpg"), ("annotations_detectron2", "a.tif")):
            d = tmp_path / "ADE20K_2021_17_01" / sub / split
            d.mkdir(parents=True)
            (d / name).write_bytes(b"")
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    p = plan(load_config(ADE_CONFIG), STAGES, store=Empty())
    bs = p.nodes["build_splits"]
    assert bs.config.train.ignore_index == 65535 and bs.config.eval[0].ignore_index == 65535
    assert bs.action == "run"
