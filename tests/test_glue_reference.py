"""An independent check of an evaluate artifact, for the sample DAG tests of every method
(MaskCLIP, ZegCLIP, ZegCLIP+ST, ZegFormer, DeOP, PADing), and its own test on a hand example.

:func:`check_evaluate_artifact` recomputes, with NumPy formulas written here (never
``zeroseg.metrics``), every number evaluate reports from its own saved confusion matrices, and
predicts the row sums of those matrices and the pixel counts from the label PNGs build_splits
wrote (read here with PIL, in the manifest's order, the first ``images`` rows):

* GZS3 (``[C, C]``, rows = ground truth): ``IoU_c = TP / (TP + FP + FN)`` (NaN when the class is
  neither in the ground truth nor predicted), ``mIoU`` = mean over the non-NaN classes, seen /
  unseen means over classes.json's seen / unseen ids, ``hIoU = 2 S U / (S + U)``, ``pAcc =
  trace / sum``, ``mAcc`` = mean over classes present in the ground truth of ``TP / GT``;
* the matrix's row ``c`` sums to the labelled pixels of class ``c`` in the label files (ignore
  left out), ``pixels`` = all pixels of those files, ``images`` = the rows scored;
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

METRICS = ("pAcc", "mAcc", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")


def _nanmean(x) -> float:
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def hand_metrics(cm, seen, unseen) -> dict[str, float]:
    """Percent GZS3 metrics of the confusion matrix ``cm[gt, pred]`` (module docstring)."""
    cm = np.asarray(cm, float)
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pred - tp  # TP + FN + FP
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, 100 * tp / union, np.nan)
        acc = np.where(gt > 0, 100 * tp / gt, np.nan)
    s, u = _nanmean(iou[list(seen)]), _nanmean(iou[list(unseen)])
    h = float("nan") if math.isnan(s) or math.isnan(u) else (0.0 if s + u == 0 else 2 * s * u / (s + u))
    total = cm.sum()
    return {
        "pAcc": float(100 * tp.sum() / total) if total else float("nan"),
        "mAcc": _nanmean(acc),
        "mIoU": _nanmean(iou),
        "mIoU_seen": s,
        "mIoU_unseen": u,
        "hIoU": h,
    }


def label_counts(bs_dir: Path, name: str, n: int, num_classes: int, ignore: int = 255) -> tuple[np.ndarray, int]:
    """Labelled pixels per class and all pixels of the first ``n`` label files of eval set ``name``
    (the manifest's order: evaluate's rows)."""
    rows = pq.read_table(Path(bs_dir) / "manifests" / f"{name}.parquet").to_pylist()[:n]
    labs = [np.asarray(Image.open(Path(bs_dir) / r["label"])) for r in rows]
    values = np.concatenate([lab[lab != ignore].ravel() for lab in labs]).astype(np.int64)
    return np.bincount(values, minlength=num_classes), sum(int(lab.size) for lab in labs)


def _same(got, want) -> None:
    if math.isnan(want):
        assert got is None or (isinstance(got, float) and math.isnan(got)), (got, want)
    else:
        assert got == pytest.approx(want, abs=1e-9), (got, want)


def check_evaluate_artifact(ev_dir: Path, bs_dir: Path, flat: dict[str, float] | None = None) -> dict[str, dict]:
    """Check every entry of ``ev_dir/metrics.json`` (``<set>``, ``<variant>/<set>``,
    ``<stage>/<set>``) against the recomputation of the module docstring; ``flat``: the stage's
    returned metrics (``manifest.json``'s ``metrics``), default read from ``ev_dir``.

    Returns:
        ``{entry: hand metrics}`` (for tests that compare entries, e.g. model vs compare).
    """
    doc = json.loads((Path(ev_dir) / "metrics.json").read_text())
    if flat is None:
        flat = json.loads((Path(ev_dir) / "manifest.json").read_text())["metrics"]
    classes = json.loads((Path(bs_dir) / "classes.json").read_text())["eval"]
    out = {}
    assert doc
    for key, entry in doc.items():
        name = key.rsplit("/", 1)[-1]
        v = classes[name]
        c = len(v["names"])
        cm = np.asarray(entry["gzs3"]["confusion_matrix"], np.int64)
        assert cm.shape == (c, c), key
        counts, pixels = label_counts(bs_dir, name, int(entry["images"]), c, int(v.get("ignore_index", 255)))
        np.testing.assert_array_equal(cm.sum(1), counts, err_msg=key)  # each labelled pixel counted once, in its row
        assert entry["pixels"] == pixels, key
        ref = hand_metrics(cm, v["seen"], v["unseen"])
        for k, want in ref.items():
            _same(entry["gzs3"][k], want)
            if math.isfinite(want):
                assert flat[f"{key}/{k}"] == pytest.approx(want, abs=1e-9), (key, k)
            else:
                assert f"{key}/{k}" not in flat, (key, k)
        assert [r["gt_pixels"] for r in entry["gzs3"]["per_class"]] == counts.tolist(), key
        out[key] = ref
    return out


def reference_confusion(
    seg_dir: Path,
    bs_dir: Path,
    text_dir: Path,
    image_root: Path,
    name: str,
    n: int,
    gamma: float,
) -> dict[str | None, np.ndarray]:
    """GZS3 confusion ``[C, C]`` of the segmenter artifact ``seg_dir`` on the first ``n`` images of
    eval set ``name`` under evaluate's default protocol (``resize`` to the segmenter's input
    size), recomputed here image by image from the saved weights: PIL decode, scale to [0, 1],
    bilinear antialiased resize, ``(x - mean) / std``; the forward (a segmenter with a sigmoid
    activation: its logits upsampled to the input size, then the sigmoid; ``encodes_text``: its
    own class-name embeddings, else ``embeddings/<set>.npy``); for each variant (``None``: a
    plain segmenter) its scores, bilinear upsampling to the label size; probabilities (softmax of logits unless the scores are
    probabilities), ``gamma`` subtracted on the seen classes (ZegFormer Eq. 2), argmax; counted
    against the label PNG with ignore left out. Returns ``{variant: cm}`` (one forward per image
    serves every variant)."""
    import torch
    import torch.nn.functional as F

    from zeroseg.models import load_segmenter

    seg = load_segmenter(seg_dir)
    v = json.loads((Path(bs_dir) / "classes.json").read_text())["eval"][name]
    c = len(v["names"])
    if getattr(seg, "encodes_text", False):
        with torch.no_grad():
            text = seg.encode_text(list(v["prompt_names"])).float()
    else:
        text = torch.from_numpy(np.load(Path(text_dir) / "embeddings" / f"{name}.npy").astype(np.float32))
    mean = torch.tensor(seg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(seg.std, dtype=torch.float32).view(1, 3, 1, 1)
    size = tuple(int(s) for s in seg.input_size)
    cms: dict[str | None, np.ndarray] = {}
    rows = pq.read_table(Path(bs_dir) / "manifests" / f"{name}.parquet").to_pylist()[:n]
    for r in rows:
        img = np.asarray(Image.open(Path(image_root) / r["image"]).convert("RGB"))
        lab = np.asarray(Image.open(Path(bs_dir) / r["label"]))
        x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - mean) / std
        with torch.no_grad():
            if getattr(seg, "activation", "none") == "sigmoid":
                lg = seg.logits(x, text)
                s = torch.sigmoid(F.interpolate(lg.float(), size=size, mode="bilinear", align_corners=False))
            else:
                s = seg(x, text)
        valid = lab != int(v.get("ignore_index", 255))
        for variant, sv in s.items() if isinstance(s, dict) else [(None, s)]:
            sv = F.interpolate(sv.float(), size=lab.shape, mode="bilinear", align_corners=False)
            p = sv if getattr(seg, "scores_are_probabilities", False) else torch.softmax(sv, 1)
            p = p.clone()
            p[:, list(v["seen"])] -= gamma
            pred = p.argmax(1)[0].numpy()
            cm = np.bincount(lab[valid].astype(np.int64) * c + pred[valid], minlength=c * c).reshape(c, c)
            cms[variant] = cms.get(variant, 0) + cm
    return cms


def assert_same_confusion(got, want, what: str = "") -> None:
    """Equal up to a handful of pixels (the reference runs one image per forward, evaluate a batch:
    float rounding may flip a near-tie; any glue error moves far more)."""
    got, want = np.asarray(got, np.int64), np.asarray(want, np.int64)
    assert got.shape == want.shape and got.sum() == want.sum(), what
    moved = int(np.abs(got - want).sum()) // 2
    assert moved <= max(2, want.sum() // 2000), (what, moved, got.tolist(), want.tolist())


#: Where the sample's eval images are, relative to the shared data (configs/datasets/sample.yaml:
#: the held-out set ``val`` comes from the COCO training images).
SAMPLE_IMAGE_ROOTS = {"val": "coco128-seg/images/train2017", "camvid": "camvid-val/images"}


def check_sample_evaluate(
    work: Path, plan, data: Path, models: dict[str, str], gammas: dict[str, float]
) -> dict[str, dict]:
    """The sample DAG's evaluate artifact: :func:`check_evaluate_artifact`, the gamma of every
    entry, and every entry's matrix equal to :func:`reference_confusion` of its model.

    Args:
        work: the run's work dir; plan: its plan (the stage keys).
        models: ``{entry prefix: stage}`` (``""``: the main model, ``"train_classifier/"`` a
            compared one); an entry ``<variant>/<set>`` of the main model uses the main model.
        gammas: ``{entry prefix: the gamma that model's entries must state}`` (the expected
            value of the test: evaluate.gamma, else the model's documented default).
    """
    store = Path(work) / "store"
    keys = plan if isinstance(plan, dict) else plan.keys()  # a Plan, or {stage: key}
    ev_dir = store / "evaluate" / keys["evaluate"]
    bs_dir = store / "build_splits" / keys["build_splits"]
    text_dir = store / "embed_text" / keys["embed_text"]
    ref = check_evaluate_artifact(ev_dir, bs_dir)
    doc = json.loads((ev_dir / "metrics.json").read_text())
    cache: dict[tuple, dict] = {}
    for key, entry in doc.items():
        name = key.rsplit("/", 1)[-1]
        prefix = next((p for p in sorted(models, key=len, reverse=True) if p and key.startswith(p)), "")
        assert entry["gamma"] == pytest.approx(gammas[prefix]), key
        seg_dir = store / models[prefix] / keys[models[prefix]]
        at = (prefix, name, entry["images"])
        if at not in cache:
            root = Path(data) / SAMPLE_IMAGE_ROOTS[name]
            cache[at] = reference_confusion(seg_dir, bs_dir, text_dir, root, name, entry["images"], gammas[prefix])
        assert_same_confusion(entry["gzs3"]["confusion_matrix"], cache[at][entry.get("variant")], key)
    return ref


# ---------------------------------------------------------------------------------------------
# the helper's own test: a 3-class example worked on paper
# ---------------------------------------------------------------------------------------------
def test_hand_metrics_on_a_worked_example():
    """cm (rows gt, cols pred) = [[3, 1, 0], [0, 2, 2], [1, 0, 1]], seen {0, 1}, unseen {2}:
    TP 3, 2, 1; GT 4, 4, 2; pred 4, 3, 3 -> union 5, 5, 4 -> IoU 60, 40, 25 (percent);
    mIoU 125/3, seen 50, unseen 25, hIoU 2*50*25/75 = 100/3; pAcc 6/10 = 60; mAcc (75+50+50)/3."""
    m = hand_metrics([[3, 1, 0], [0, 2, 2], [1, 0, 1]], [0, 1], [2])
    assert m == pytest.approx(
        {"pAcc": 60.0, "mAcc": 175 / 3, "mIoU": 125 / 3, "mIoU_seen": 50.0, "mIoU_unseen": 25.0, "hIoU": 100 / 3}
    )
    # a class absent from both ground truth and prediction is left out of the means (NaN IoU)
    m = hand_metrics([[2, 0, 0], [0, 0, 0], [1, 0, 1]], [0, 1], [2])
    assert m["mIoU_seen"] == pytest.approx(100 * 2 / 3) and m["mIoU"] == pytest.approx((200 / 3 + 50) / 2)
    assert math.isnan(hand_metrics([[1, 0], [0, 0]], [0], [1])["hIoU"])  # no unseen class anywhere


def test_check_evaluate_artifact_catches_a_wrong_number(tmp_path):
    """One set, 2 label files written here; a metrics.json built by hand passes, and each
    single wrong number (a moved pixel, an mIoU, the pixel count) fails."""
    bs, ev = tmp_path / "bs", tmp_path / "ev"
    (bs / "manifests").mkdir(parents=True)
    (bs / "labels").mkdir()
    ev.mkdir()
    labs = [np.array([[0, 0, 1], [2, 255, 1]], np.uint8), np.array([[2, 2], [0, 255]], np.uint8)]
    for i, lab in enumerate(labs):
        Image.fromarray(lab, mode="L").save(bs / "labels" / f"{i}.png")
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pylist([{"label": f"labels/{i}.png"} for i in range(3)]), bs / "manifests" / "s.parquet"
    )
    (bs / "classes.json").write_text(
        json.dumps({"eval": {"s": {"names": ["a", "b", "c"], "seen": [0, 1], "unseen": [2], "ignore_index": 255}}})
    )
    # labelled pixels: class 0: 3, class 1: 2, class 2: 3 (the third manifest row is not scored)
    cm = [[3, 0, 0], [1, 1, 0], [0, 1, 2]]
    ref = hand_metrics(cm, [0, 1], [2])
    entry = {
        "images": 2,
        "pixels": 10,
        "gzs3": {
            **ref,
            "confusion_matrix": cm,
            "per_class": [{"gt_pixels": n} for n in (3, 2, 3)],
        },
    }

    def write(e, flat=None):
        (ev / "metrics.json").write_text(json.dumps({"s": e}))
        return check_evaluate_artifact(ev, bs, flat if flat is not None else {f"s/{k}": v for k, v in ref.items()})

    assert write(entry)["s"] == ref
    bad_cm = [[3, 0, 0], [0, 2, 0], [0, 1, 2]]  # a pixel moved between rows
    with pytest.raises(AssertionError):
        write({**entry, "gzs3": {**entry["gzs3"], "confusion_matrix": bad_cm}})
    with pytest.raises(AssertionError):
        write({**entry, "gzs3": {**entry["gzs3"], "mIoU": ref["mIoU"] + 0.5}})
    with pytest.raises(AssertionError):
        write({**entry, "pixels": 8})  # ignore pixels are pixels too
    with pytest.raises(AssertionError):
        write(entry, {**{f"s/{k}": v for k, v in ref.items()}, "s/hIoU": ref["mIoU"]})
