"""Transductive self-training (ZegCLIP+ST, stage ``self_train``) and the leakage guard.

Expected values are worked out by hand on handcrafted label maps and logits (the released
pseudo-labelling: argmax over the unseen channels of sigmoid(logits) on the eligible pixels,
ZiqinZhou66/ZegCLIP ``decode_seg.py``), never taken from the code under test. The sample DAG
(configs/sample_zegclip_st.yaml: transductive split, inductive half, self_train, evaluate of both
models) runs once in process, then again as a user runs it (fully cached).
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors (what the CLI does)
from pipeline.config import load_config
from pipeline.dag import Artifact
from pipeline.errors import ConfigError, find_user_error
from pipeline.plan import plan
from stages.catalog import STAGES
from stages.feeds import decode_train_batch, leakage_guard, train_dataset
from zeroseg.data.classes import Vocabulary
from zeroseg.data.label_policy import apply_unseen_policy, check_transductive_vocabulary, heldout_label
from zeroseg.data.split_files import manifest_schema, write_classes_json
from zeroseg.data.transforms import AugmentConfig, make_lut
from zeroseg.errors import ConfigError as VocabularyError
from zeroseg.errors import DataError, LeakageError
from zeroseg.self_training import PseudoLabelStats, eligible_pixels, pseudo_label_targets

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "sample_zegclip_st.yaml"
U, IG = 254, 255  # the unlabelled-unseen value and ignore of uint8 labels


# ------------------------------------------------------------------ build_splits: the transductive labels
def test_transductive_policy_marks_unseen_pixels_and_holds_their_classes_out():
    label = np.array([[0, 3, 255], [3, 1, 2]], dtype=np.uint8)  # class 3 is unseen
    marked, n = apply_unseen_policy(label, [3], "unlabeled")
    assert n == 2
    assert marked.tolist() == [[0, U, IG], [U, 1, 2]]  # no unseen id; its pixels distinct from ignore
    assert heldout_label(label, [3]).tolist() == [[IG, 3, IG], [3, IG, IG]]  # the class, for the diagnostic only
    inductive, _ = apply_unseen_policy(label, [3], "ignore")
    assert inductive.tolist() == [[0, IG, IG], [IG, 1, 2]]
    wide = label.astype(np.uint16)
    wide[wide == 255] = 65535
    assert apply_unseen_policy(wide, [3], "unlabeled")[0].tolist() == [[0, 65534, 65535], [65534, 1, 2]]


def test_transductive_needs_a_free_label_value_and_policy_ignore():
    assert check_transductive_vocabulary(254, "toy") == 254
    with pytest.raises(VocabularyError, match=r"build_splits.transductive: .*255 classes.*254 is a class id"):
        check_transductive_vocabulary(255, "toy")
    assert check_transductive_vocabulary(300, "toy") == 65534
    cfg = load_config(CONFIG, ["build_splits.unseen_policy=drop"])
    with pytest.raises(ConfigError, match="unseen_policy 'drop' contradicts it"):
        plan(cfg, STAGES)


# ------------------------------------------------------------------ pseudo-labels (zeroseg.self_training)
# 2 x 3 label map: seen 0 | unlabelled-unseen | ignore  /  seen 1 | unlabelled-unseen | ignore (padding)
TARGET = torch.tensor([[[0, U, IG], [1, U, IG]]])
VALID = torch.tensor([[[1, 1, 1], [1, 1, 0]]], dtype=torch.bool)


def test_eligible_pixels_per_mode():
    only = eligible_pixels(TARGET, "unseen_only", unlabeled_index=U, ignore_index=IG, valid=VALID)
    assert only.int().tolist() == [[[0, 1, 0], [0, 1, 0]]]
    every = eligible_pixels(TARGET, "all_unlabeled", unlabeled_index=U, ignore_index=IG, valid=VALID)
    assert every.int().tolist() == [[[0, 1, 1], [0, 1, 0]]]  # ignore included, the padding not
    with pytest.raises(ValueError, match="unseen_only, all_unlabeled"):
        eligible_pixels(TARGET, "everything", unlabeled_index=U, ignore_index=IG)


def _logits(per_class):
    """[1, C, 2, 3] logits from {class: 2 x 3 values} (other classes -10)."""
    x = torch.full((1, 4, 2, 3), -10.0)
    for c, v in per_class.items():
        x[0, c] = torch.tensor(v, dtype=torch.float32)
    return x


def test_pseudo_labels_never_overwrite_a_seen_pixel():
    # classes 0, 1 seen, 2, 3 unseen; unseen 3 scores highest everywhere, seen 0 higher still
    logits = _logits({0: [[9.0] * 3] * 2, 2: [[1.0] * 3] * 2, 3: [[5.0] * 3] * 2})
    eligible = eligible_pixels(TARGET, "all_unlabeled", unlabeled_index=U, ignore_index=IG, valid=VALID)
    out, labelled = pseudo_label_targets(logits, TARGET, [2, 3], eligible, ignore_index=IG)
    # seen pixels keep 0 and 1; eligible pixels get 3 (argmax over the unseen channels only, the
    # seen channel 0 is higher but excluded, as released); the padding stays ignore
    assert out.tolist() == [[[0, 3, 3], [1, 3, IG]]]
    assert labelled.int().tolist() == [[[0, 1, 1], [0, 1, 0]]]
    with pytest.raises(ValueError, match="seen ground-truth label is marked eligible"):
        pseudo_label_targets(logits, TARGET, [2, 3], torch.ones_like(eligible), ignore_index=IG)


def test_pseudo_label_threshold():
    # sigmoid(0) = 0.5 at the first unlabelled pixel, sigmoid(2) = 0.881 at the second (class 2)
    logits = _logits({2: [[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]], 3: [[-1.0, -1.0, -1.0], [-1.0, 1.0, -1.0]]})
    eligible = eligible_pixels(TARGET, "unseen_only", unlabeled_index=U, ignore_index=IG)
    none, _ = pseudo_label_targets(logits, TARGET, [2, 3], eligible, ignore_index=IG)
    assert none.tolist() == [[[0, 2, IG], [1, 2, IG]]]
    kept, labelled = pseudo_label_targets(logits, TARGET, [2, 3], eligible, ignore_index=IG, threshold=0.7)
    assert kept.tolist() == [[[0, IG, IG], [1, 2, IG]]]  # 0.5 < 0.7: left unlabelled (ignore)
    assert labelled.int().tolist() == [[[0, 0, 0], [0, 1, 0]]]


def test_pseudo_label_stats_by_hand():
    stats = PseudoLabelStats([2, 3])
    # held-out ground truth: 2 2 3 / 3 ignore 3 ; pseudo-labels: 2 3 3 / none 3 3
    held = torch.tensor([[[2, 2, 3], [3, IG, 3]]])
    pseudo = torch.tensor([[[2, 3, 3], [IG, 3, 3]]])
    labelled = pseudo != IG
    stats.add(stats.counts(pseudo, labelled, held, num_classes=4))
    # confusion rows gt (2, 3), cols pseudo (2, 3, none): [[1, 1, 0], [0, 2, 1]]; one pseudo-label
    # on a pixel of unknown ground truth
    assert stats.confusion.tolist() == [[1, 1, 0], [0, 2, 1]]
    s = stats.summary(["two", "three"])
    # IoU(2) = 1 / (2 + 1 - 1) = 50; IoU(3) = 2 / (3 + 3 - 2) = 50
    assert [r["iou"] for r in s["per_class"]] == pytest.approx([50.0, 50.0])
    assert s["miou"] == pytest.approx(50.0)
    assert s["accuracy"] == pytest.approx(100 * 3 / 5) and s["coverage"] == pytest.approx(100 * 4 / 5)
    assert s["unknown_labelled"] == 1
    again = PseudoLabelStats([2, 3])
    again.load_state_dict(stats.state_dict())  # a training checkpoint's extra object
    assert again.confusion.tolist() == stats.confusion.tolist()


# ------------------------------------------------------------------ the leakage guard (runtime)
VOCAB = Vocabulary("toy", ("a", "b", "c", "d"), ("a", "b", "c", "d"), (0, 1), (2, 3))


def _split_artifact(root: Path, label: np.ndarray) -> Artifact:
    """An inductive build_splits-layout artifact with one 8 x 8 image and the given label."""
    (root / "manifests").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    img = root / "img.png"
    Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(img)
    Image.fromarray(label).save(root / "labels" / "train" / "x.png")
    write_classes_json(root / "classes.json", VOCAB, {})
    row = {"image_id": "x", "image": "img.png", "label": "labels/train/x.png", "height": 8, "width": 8}
    pq.write_table(
        pa.Table.from_pylist([{**row, "classes": [0], "dataset": "toy"}], schema=manifest_schema()),
        root / "manifests" / "train.parquet",
    )
    return Artifact(
        "build_splits", "c" * 64, root, str(root), {"files": []}, runtime={"image_roots": {"train": str(root)}}
    )


def test_leakage_guard_fires_on_a_poisoned_inductive_feed(tmp_path, ray_local):
    poisoned = np.zeros((8, 8), np.uint8)
    poisoned[2, 3] = 3  # one pixel of unseen class d in a training label
    art = _split_artifact(tmp_path / "a", poisoned)
    lut = make_lut([0, 1], source_classes=4)  # the inductive table: 0 -> 0, 1 -> 1, the rest ignore
    guard = leakage_guard(art, lut)
    assert guard[[2, 3]].all() and not guard[[0, 1, 255]].any()
    aug = AugmentConfig(crop_size=(8, 8), ratio_range=(1, 1), flip_prob=0)
    batch = {
        k: np.array(v, dtype=object)
        for k, v in {
            "image_id": ["x"],
            "image_uri": [str(art.path / "img.png")],
            "label_uri": [str(art.path / "labels/train/x.png")],
        }.items()
    }
    with pytest.raises(
        LeakageError, match=r"training image 'x' .*1 pixel\(s\) labelled with unseen class id\(s\) \[3\]"
    ):
        decode_train_batch(batch, lut=lut, augment=aug, seed=0, epoch=0, forbidden=guard)
    # without the guard the remap would hide it (3 -> ignore): the feed would look clean
    clean = decode_train_batch(batch, lut=lut, augment=aug, seed=0, epoch=0)
    assert int(clean["label"][0, 2, 3]) == 255
    # through the Ray Data feed every training stage uses: the driver gets the LeakageError
    with pytest.raises(Exception) as e:
        train_dataset(art, lut, aug, seed=0, block_rows=1, guard=guard, shuffle=False).take_batch(1)
    assert isinstance(find_user_error(e.value), LeakageError), e.value
    # a lookup table that maps an unseen class to a training id is refused before any feed
    with pytest.raises(LeakageError, match=r"maps unseen class\(es\) \['c'\]"):
        leakage_guard(art, make_lut({0: 0, 1: 1, 2: 2}, source_classes=4))


def test_leakage_guard_fires_in_extract_features_load(tmp_path):
    from stages.jobs.extract_features import FeaturePredictor, decode_feature_batch

    poisoned = np.zeros((8, 8), np.uint8)
    poisoned[5, 1] = poisoned[6, 1] = 2  # two pixels of unseen class c in a training label
    art = _split_artifact(tmp_path / "a", poisoned)
    guard = leakage_guard(art, make_lut([0, 1], source_classes=4))
    batch = {
        "row": np.array([0]),
        "image_id": np.array(["x"], dtype=object),
        "image_uri": np.array([str(art.path / "img.png")], dtype=object),
        "label_uri": np.array([str(art.path / "labels/train/x.png")], dtype=object),
    }
    with pytest.raises(
        LeakageError, match=r"training image 'x' .*2 pixel\(s\) labelled with unseen class id\(s\) \[2\]"
    ):
        decode_feature_batch(batch, guard)
    # the inference actor's load checks with the table it was given (no model needed to decode)
    actor = object.__new__(FeaturePredictor)
    actor.forbidden = guard
    with pytest.raises(LeakageError, match=r"unseen class id\(s\) \[2\]"):
        actor.load(batch)
    clean = np.zeros((8, 8), np.uint8)
    clean[0, 0] = 1
    ok = _split_artifact(tmp_path / "b", clean)
    batch["label_uri"] = np.array([str(ok.path / "labels/train/x.png")], dtype=object)
    got = decode_feature_batch(batch, guard)
    assert got["rows"] == [0] and int(got["labels"][0][0, 0]) == 1 and got["images"][0].shape == (8, 8, 3)


# ------------------------------------------------------------------ the leakage guard (plan time)
def test_self_train_on_an_inductive_split_is_a_plan_time_error():
    cfg = load_config(CONFIG, ["build_splits.transductive=false"])
    with pytest.raises(ConfigError, match=r"self_train needs a transductive split.*build_splits.transductive"):
        plan(cfg, STAGES)
    cfg = load_config(CONFIG, ["train_classifier.method=maskclip"])
    cfg.sections["train_classifier"] = {"method": "maskclip"}
    with pytest.raises(ConfigError, match="train_classifier.method is 'maskclip'"):
        plan(cfg, STAGES)
    inductive = load_config(REPO / "configs" / "sample_zegclip.yaml")
    assert "self_train" not in plan(inductive, STAGES).nodes  # an inductive config plans as before


# ------------------------------------------------------------------ the sample DAG
TEST_OVERRIDES = (
    "build_splits.train.max_images=16",  # 11 train / 5 val images
    "build_splits.eval.0.max_images=2",
    "evaluate.batch_size=2",
    "train_classifier.train.max_steps=4",
    "train_classifier.train.checkpoint_every=2",
    "train_classifier.train.log_every=2",
    "self_train.train.max_steps=4",
    "self_train.train.checkpoint_every=2",
    "self_train.train.log_every=2",
    # in process (the TorchTrainer's num_workers=0 path): the 2-worker fit is the ZegCLIP sample's test
    "train_classifier.scaling.num_workers=0",
    "self_train.scaling.num_workers=0",
)


def _run_in_process(work: Path):
    from pipeline.cli import build_parser, cmd_run
    from pipeline.console import Console

    argv = ["run", "--config", str(CONFIG), "--work-dir", str(work)]
    for o in TEST_OVERRIDES:
        argv += ["--set", o]
    out = io.StringIO()
    code, p = cmd_run(build_parser().parse_args(argv), Console(file=out))
    return code, p, out.getvalue()


def _artifact(work: Path, stage: str) -> Path:
    [m] = (work / "store" / stage).glob("*/manifest.json")
    return m.parent


@pytest.mark.slow
def test_sample_dag_self_trains_evaluates_both_and_is_cached(tmp_path, ray_local, shared_data, monkeypatch):
    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    code, p, out = _run_in_process(tmp_path)
    assert code == 0, f"{[n.error for n in p]}\n{out[-4000:]}"
    assert [n.name for n in p] == ["build_splits", "embed_text", "train_classifier", "self_train", "evaluate"]

    # the transductive split: unseen pixels marked, not labelled; their classes held out
    splits = _artifact(tmp_path, "build_splits")
    classes = json.loads((splits / "classes.json").read_text())
    assert classes["transductive"] == {"unlabeled_index": 254, "heldout": "heldout/train"}
    stats = json.loads((splits / "stats.json").read_text())  # the policy the training labels were written with
    assert stats["unseen_policy"] == stats["splits"]["train"]["policy"] == "unlabeled"
    unseen = set(classes["train"]["unseen"])
    table = pq.read_table(splits / "manifests" / "train.parquet").to_pylist()
    marked = 0
    for row in table:
        lab = np.asarray(Image.open(splits / row["label"]))
        held = np.asarray(Image.open(splits / row["heldout"]))
        assert not np.isin(lab, list(unseen)).any()  # no training label holds an unseen class
        assert np.array_equal(lab == 254, np.isin(held, list(unseen)))  # marked exactly where held out
        marked += int((lab == 254).sum())
    assert marked > 0  # the sample has unseen pixels in its training images

    # warm start: the student starts from exactly the inductive weights
    from stages.jobs.self_train import student_model

    tc = _artifact(tmp_path, "train_classifier")
    doc = json.loads((tc / "segmenter.json").read_text())
    assert doc["default_gamma"] == 0.1  # the released inductive inference
    student = student_model({"clip": doc["clip"], "model": doc["model"], "init_from": str(tc)})
    saved = torch.load(tc / "weights.pt", weights_only=True)
    got = student.trainable_state_dict()
    assert sorted(got) == sorted(saved) and all(torch.equal(got[k], saved[k]) for k in saved)

    # the self-trained artifact: its default gamma, the diagnostic
    st = _artifact(tmp_path, "self_train")
    st_doc = json.loads((st / "segmenter.json").read_text())
    assert st_doc["default_gamma"] == 0.0 and st_doc["self_training"]["init_from"] == tc.name
    diag = json.loads((st / "pseudo_labels.json").read_text())
    cm_pixels = sum(r["pixels"] for r in diag["per_class"])
    assert diag["pixels"] == cm_pixels > 0 and diag["coverage"] == pytest.approx(100.0)  # unseen_only, no threshold
    st_metrics = json.loads((st / "manifest.json").read_text())["metrics"]
    assert st_metrics["steps"] == 4 and st_metrics["pseudo_miou"] == pytest.approx(diag["miou"])

    # evaluate: the self-trained model (gamma 0) beside the inductive one (its gamma 0.1)
    ev = _artifact(tmp_path, "evaluate")
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["val"]["gamma"] == 0.0 and metrics["train_classifier/val"]["gamma"] == 0.1
    assert metrics["train_classifier/val"]["model"]["key"] == tc.name
    flat = json.loads((ev / "manifest.json").read_text())["metrics"]
    for s in ("val", "camvid"):
        for prefix, entry in (("", metrics[s]), ("train_classifier/", metrics[f"train_classifier/{s}"])):
            cm = np.array(entry["gzs3"]["confusion_matrix"])
            assert flat[f"{prefix}{s}/pAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    # independent value checks (tests/test_glue_reference.py): every metric of both models from
    # their matrices, the pixel counts from the label PNGs, and each model's matrices equal to a
    # per-image reference forward of its own saved weights at its own gamma (released: 0.1
    # inductive ZegCLIP, 0 self-trained)
    from test_glue_reference import check_sample_evaluate

    ref = check_sample_evaluate(
        tmp_path,
        p,
        shared_data,
        {"": "self_train", "train_classifier/": "train_classifier"},
        {"": 0.0, "train_classifier/": 0.1},
    )
    assert set(ref) == {"val", "camvid", "train_classifier/val", "train_classifier/camvid"}
    assert "model vs train_classifier" in out

    # MLflow: the comparison and the pseudo-label curve
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    by_stage = {r.data.tags.get("stage") or r.info.run_name: r for r in runs}
    ev_run = next(r for r in runs if "train_classifier/val/hIoU" in r.data.metrics)
    assert "val/hIoU" in ev_run.data.metrics
    st_run = next(r for r in runs if "self_train/pseudo_miou" in r.data.metrics)
    assert st_run.data.metrics["self_train/pseudo_miou"] == pytest.approx(diag["miou"])
    assert by_stage

    # the same command again, as a user runs it: every stage cached, no Ray, no training
    cmd = [sys.executable, "pipeline/run.py", "--config", str(CONFIG), "--work-dir", str(tmp_path)]
    for o in TEST_OVERRIDES:
        cmd += ["--set", o]
    env = {**os.environ, "ZEROSEG_DATA": str(shared_data)}
    env.pop("RAY_ADDRESS", None)
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count(" cached (") == 5 and "running" not in again.stdout and "ray:" not in again.stdout


def test_self_train_feed_carries_heldout_labels_and_the_padding_apart(tmp_path):
    """decode_train_batch(heldout=True) on a 4 x 6 image cropped to 6 x 6 (2 padded rows): the
    label keeps the marker (self_train's table maps it to itself), the held-out column the unseen
    ids with the same geometry, ``valid`` 0 exactly on the padding."""
    Image.fromarray(np.full((4, 6, 3), 90, np.uint8)).save(tmp_path / "img.png")
    label = np.array([[0, 0, U, U, IG, 1]] * 4, np.uint8)
    held = np.array([[IG, IG, 3, 2, IG, IG]] * 4, np.uint8)
    Image.fromarray(label).save(tmp_path / "lab.png")
    Image.fromarray(held).save(tmp_path / "held.png")
    batch = {
        "image_id": np.array(["x"], dtype=object),
        "image_uri": np.array([str(tmp_path / "img.png")], dtype=object),
        "label_uri": np.array([str(tmp_path / "lab.png")], dtype=object),
        "heldout_uri": np.array([str(tmp_path / "held.png")], dtype=object),
    }
    lut = make_lut({0: 0, 1: 1, U: U}, ignore_index=255, source_classes=4)
    aug = AugmentConfig(crop_size=(6, 6), ratio_range=(1, 1), flip_prob=0)
    guard = np.zeros(256, bool)
    guard[[2, 3]] = True
    out = decode_train_batch(batch, lut=lut, augment=aug, seed=0, epoch=0, forbidden=guard, heldout=True)
    assert out["label"][0].tolist() == [[0, 0, U, U, IG, 1]] * 4 + [[IG] * 6] * 2
    assert out["heldout"][0].tolist() == [[IG, IG, 3, 2, IG, IG]] * 4 + [[IG] * 6] * 2
    assert out["valid"][0].tolist() == [[1] * 6] * 4 + [[0] * 6] * 2
    # all_unlabeled: the ignore pixel inside the image is eligible, the padding is not
    t = torch.from_numpy(out["label"]).long()
    e = eligible_pixels(t, "all_unlabeled", unlabeled_index=U, ignore_index=IG, valid=torch.from_numpy(out["valid"]))
    assert e[0].int().tolist() == [[0, 0, 1, 1, 1, 0]] * 4 + [[0] * 6] * 2


def test_a_missing_heldout_label_is_a_data_error_naming_the_file(tmp_path):
    """Local path or ``file://`` URI (the store branch of decode_pair): a DataError naming the image
    and the missing held-out file, never a bare OSError."""
    Image.fromarray(np.full((4, 6, 3), 90, np.uint8)).save(tmp_path / "img.png")
    Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "lab.png")
    lut = make_lut({0: 0, 1: 1}, source_classes=4)
    aug = AugmentConfig(crop_size=(6, 6), ratio_range=(1, 1), flip_prob=0)
    missing = tmp_path / "gone.png"
    for uri in (str(missing), f"file://{missing}"):
        batch = {
            "image_id": np.array(["x"], dtype=object),
            "image_uri": np.array([str(tmp_path / "img.png")], dtype=object),
            "label_uri": np.array([str(tmp_path / "lab.png")], dtype=object),
            "heldout_uri": np.array([uri], dtype=object),
        }
        with pytest.raises(DataError, match=r"training image 'x': .*gone\.png") as e:
            decode_train_batch(batch, lut=lut, augment=aug, seed=0, epoch=0, heldout=True)
        assert not isinstance(e.value, LeakageError)


# =============================================================================================
# zeroseg.self_training: edge values worked by hand (glue helper, issue 19)
# =============================================================================================
def test_eligible_pixels_without_valid_and_valid_ignored_for_unseen_only():
    """all_unlabeled without ``valid``: every unlabelled or ignored pixel; unseen_only never looks
    at ``valid`` (a marked pixel on a False ``valid`` stays eligible)."""
    target = torch.tensor([[[0, U, IG], [U, 1, IG]]])
    valid = torch.tensor([[[1, 1, 1], [0, 1, 0]]], dtype=torch.bool)
    every = eligible_pixels(target, "all_unlabeled", unlabeled_index=U, ignore_index=IG)
    assert every.int().tolist() == [[[0, 1, 1], [1, 0, 1]]]
    only = eligible_pixels(target, "unseen_only", unlabeled_index=U, ignore_index=IG, valid=valid)
    assert only.int().tolist() == [[[0, 1, 0], [1, 0, 0]]]
    # the valid mask may arrive as 0/1 integers
    some = eligible_pixels(target, "all_unlabeled", unlabeled_index=U, ignore_index=IG, valid=valid.int())
    assert some.int().tolist() == [[[0, 1, 1], [0, 0, 0]]] and some.dtype == torch.bool


def test_pseudo_labels_map_the_unseen_order_and_keep_a_threshold_tie():
    """Unseen classes given as [3, 1] (not sorted): channel 3 wins at pixel 0, channel 1 at pixel
    1 (the label is the class id, not the position in the list); sigmoid(0) = 0.5 at pixel 1 meets
    a threshold of exactly 0.5 (>=: kept); 0.49 under 0.5 at pixel 2 is dropped."""
    target = torch.tensor([[[U, U, U, 0]]])
    logits = torch.full((1, 4, 1, 4), -10.0)
    logits[0, 3, 0, 0], logits[0, 1, 0, 0] = 2.0, 1.0
    logits[0, 1, 0, 1], logits[0, 3, 0, 1] = 0.0, -1.0
    logits[0, 1, 0, 2] = float(np.log(0.49 / 0.51))  # sigmoid = 0.49
    logits[0, 0, 0, 3] = 5.0
    logits.requires_grad_(True)
    eligible = target == U
    out, labelled = pseudo_label_targets(logits, target, [3, 1], eligible, ignore_index=IG, threshold=0.5)
    assert out.tolist() == [[[3, 1, IG, 0]]] and out.dtype == torch.long and not out.requires_grad
    assert labelled.tolist() == [[[True, True, False, False]]]
    free, labelled = pseudo_label_targets(logits, target, [3, 1], eligible, ignore_index=IG)
    assert free.tolist() == [[[3, 1, 1, 0]]] and labelled.tolist() == [[[True, True, True, False]]]


def test_pseudo_label_targets_seen_pixels_and_errors():
    """With 4 classes and ignore 3 (an id inside the class range), a 3 pixel is not seen: it
    becomes ignore; an id beyond the classes (7) is not seen either."""
    target = torch.tensor([[[0, 3, 7, 2]]])
    logits = torch.zeros((1, 4, 1, 4))
    out, labelled = pseudo_label_targets(
        logits, target, [2], torch.zeros_like(target, dtype=torch.bool), ignore_index=3
    )
    assert out.tolist() == [[[0, 3, 3, 2]]] and not labelled.any()
    with pytest.raises(ValueError, match="at least one unseen class"):
        pseudo_label_targets(logits, target, [], torch.zeros_like(target, dtype=torch.bool), ignore_index=IG)
    for lg, tg in ((logits[0], target), (logits, target[:, :, :3]), (torch.zeros((2, 4, 1, 4)), target)):
        with pytest.raises(ValueError, match="do not match"):
            pseudo_label_targets(lg, tg, [2], torch.zeros_like(tg, dtype=torch.bool), ignore_index=IG)
    with pytest.raises(ValueError, match="do not match"):
        pseudo_label_targets(logits, target, [2], torch.zeros((1, 1, 3), dtype=torch.bool), ignore_index=IG)


def test_pseudo_label_stats_over_batches_and_when_empty():
    """Unseen [3, 1] (the order of the confusion rows), 5 classes. Batch 1: held-out 3 3 1 255,
    pseudo 1 3 (none) 1 -> rows gt 3: [pseudo 3: 1, pseudo 1: 1], gt 1: [none]; one pseudo-label
    on an unknown pixel. Batch 2: held-out 1, pseudo 1, and a pseudo-label of a seen id 0 on a
    gt-3 pixel (counted as none). Totals: [[1, 1, 1], [0, 1, 1]], unknown 1."""
    stats = PseudoLabelStats([3, 1])
    empty = stats.summary()
    assert math.isnan(empty["miou"]) and math.isnan(empty["accuracy"]) and math.isnan(empty["coverage"])
    assert empty["pixels"] == 0 and [r["iou"] for r in empty["per_class"]] == [None, None]
    assert [r["name"] for r in empty["per_class"]] == ["3", "1"]  # default names: the ids
    held = torch.tensor([[[3, 3, 1, IG]]])
    pseudo = torch.tensor([[[1, 3, IG, 1]]])
    stats.add(stats.counts(pseudo, pseudo != IG, held, num_classes=5))
    assert stats.confusion.tolist() == [[1, 1, 0], [0, 0, 1]] and stats.unknown_labelled == 1
    held2 = torch.tensor([[[1, 3]]])
    pseudo2 = torch.tensor([[[1, 0]]])
    c2 = stats.counts(pseudo2, torch.tensor([[[True, True]]]), held2, num_classes=5)
    assert c2.dtype == torch.int64 and c2.tolist() == [0, 0, 1, 0, 1, 0, 0]
    stats.add(c2.numpy())
    assert stats.confusion.tolist() == [[1, 1, 1], [0, 1, 1]] and stats.unknown_labelled == 1
    s = stats.summary()
    # IoU(3) = 1 / (3 + 1 - 1) = 33.3; IoU(1) = 1 / (2 + 2 - 1) = 33.3 (column 1 = 1 + 1)
    assert [r["iou"] for r in s["per_class"]] == pytest.approx([100 / 3, 100 / 3])
    assert [r["pixels"] for r in s["per_class"]] == [3, 2] and [r["id"] for r in s["per_class"]] == [3, 1]
    assert s["accuracy"] == pytest.approx(100 * 2 / 5) and s["coverage"] == pytest.approx(100 * 3 / 5)
    assert s["pixels"] == 5 and s["unknown_labelled"] == 1
    # one class never seen in ground truth nor pseudo-labels: left out of the mean
    one = PseudoLabelStats([2, 4])
    one.add(one.counts(torch.tensor([[[2]]]), torch.tensor([[[True]]]), torch.tensor([[[2]]]), num_classes=5))
    assert one.summary()["miou"] == pytest.approx(100.0) and one.summary()["per_class"][1]["iou"] is None
    # the checkpoint state round trip, and a state of other classes refused
    again = PseudoLabelStats([3, 1])
    again.load_state_dict(stats.state_dict())
    assert again.confusion.tolist() == stats.confusion.tolist() and again.unknown_labelled == 1
    assert again.confusion.dtype == np.int64
    with pytest.raises(ValueError, match=r"unseen classes \[1, 3\], not \[3, 1\]"):
        again.load_state_dict({**stats.state_dict(), "unseen": [1, 3]})


def test_pseudo_label_stats_count_class_zero_and_unknown_apart():
    """Unseen [0, 2] of 3 classes (class id 0 is a real unseen class). Held-out 0 IG IG 2,
    pseudo-labels 2 0 2 (none): gt 0 -> pseudo 2 (row 0, col 1); two pseudo-labels on unknown
    pixels; gt 2 without one (row 1, col 2). Counts: [0, 1, 0, 0, 0, 1] + unknown 2."""
    stats = PseudoLabelStats([0, 2])
    held = torch.tensor([[[0, IG, IG, 2]]])
    pseudo = torch.tensor([[[2, 0, 2, IG]]])
    c = stats.counts(pseudo, pseudo != IG, held, num_classes=3)
    assert c.tolist() == [0, 1, 0, 0, 0, 1, 2]
    stats.add(c)
    assert stats.confusion.tolist() == [[0, 1, 0], [0, 0, 1]] and stats.unknown_labelled == 2
    assert stats.confusion.dtype == np.int64
    s = stats.summary(["zero", "two"])
    assert [r["name"] for r in s["per_class"]] == ["zero", "two"]  # the names given, in unseen order
    # IoU(0) = 0 / (1 + 0 - 0) = 0; IoU(2) = 0 / (1 + 1 - 0) = 0; nobody right, one of two covered
    assert [r["iou"] for r in s["per_class"]] == [0.0, 0.0] and s["miou"] == 0.0
    assert s["accuracy"] == 0.0 and s["coverage"] == pytest.approx(50.0) and s["unknown_labelled"] == 2
    state = stats.state_dict()
    assert state["confusion"] == [[0, 1, 0], [0, 0, 1]] and state["unknown"] == 2 and state["unseen"] == [0, 2]


def test_a_target_equal_to_the_class_count_is_not_seen_and_a_flat_state_loads():
    """4 classes: a target value 4 (one past the last id) is no seen class: ignore in the output.
    A statistics state whose confusion is a flat list loads into the [U, U + 1] matrix."""
    target = torch.tensor([[[4, 1]]])
    out, _ = pseudo_label_targets(
        torch.zeros((1, 4, 1, 2)), target, [3], torch.zeros_like(target, dtype=torch.bool), ignore_index=IG
    )
    assert out.tolist() == [[[IG, 1]]]
    stats = PseudoLabelStats([3, 1])
    stats.load_state_dict({"unseen": [3, 1], "confusion": [1, 2, 3, 4, 5, 6], "unknown": 0})
    assert stats.confusion.tolist() == [[1, 2, 3], [4, 5, 6]]
