"""The evaluate stage (stages/evaluate.py) and the batch-inference component it runs on
(pipeline/inference.py).

* the real MaskCLIP segmenter (tiny random-weight open_clip model) through the stage's Ray pass,
  checked against a per-image computation done here (plain NumPy confusion matrices and metrics);
* scripted predictors through the stage: an oracle (returns the ground truth: 100 everywhere) and
  a constant segmenter (always class k: IoU_k = pixels of k / valid pixels, 0 for every other
  present class), expected values counted from the label PNGs here;
* ``pipeline.inference.reduce`` with a toy predictor and a toy evaluator, and a DataError raised
  inside a predictor actor reaching the caller as itself;
* the predictor and evaluator in-process (no Ray), errors, the config and the MLflow helpers.

Inputs are built by hand in tmp_path: classes.json, path-free manifests (images relative to
their dataset's folder, given as the build_splits runtime outputs), label PNGs, embeddings, a
segmenter artifact. The metric functions of ``zeroseg.metrics`` are never used for expected values.
"""

import json
import math
import operator
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F
from PIL import Image

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors (what the CLI does)
from pipeline.dag import Artifact, StageContext
from stages.evaluate import EvaluateConfig
from stages.jobs.evaluate import SegmenterPredictor
from zeroseg.errors import ConfigError, DataError
from zeroseg.models import Segmenter
from zeroseg.models.clip import TINY_MODEL, ClipSpec

# the scripted predictors and the toy evaluator below run in Ray actors that cannot import this module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = ClipSpec(model=TINY_MODEL, random_init=True)
INPUT = [32, 48]  # MaskCLIP tiny (patch 16): a 2 x 3 score grid, upsampled to each label

VOCABS = {
    "val": {
        "dataset": "toy",
        "names": ["sky", "road", "person", "cat", "dog"],
        "prompt_names": ["sky", "road", "person", "cat", "dog"],
        "seen": [0, 1, 2],
        "unseen": [3, 4],
        "ignore_index": 255,
    },
    "cam": {
        "dataset": "toy2",
        "names": ["a", "b", "c"],
        "prompt_names": ["a", "b", "c"],
        "seen": [0],
        "unseen": [1, 2],
        "ignore_index": 255,
    },
}
# (set, image sizes): sizes differ inside a batch; labels are never resized
SIZES = {"val": [(20, 30), (24, 28), (20, 30), (18, 40), (26, 26)], "cam": [(16, 24), (22, 18), (16, 24)]}
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


@pytest.fixture(scope="module")
def ray_one_cpu(ray_local):
    yield ray_local  # the session's one embedded cluster (conftest.py)


def _labels(rng, h, w, c):
    """Blocky label map (class per 4x4 block) with a few ignore pixels."""
    lab = rng.integers(0, c, size=((h + 3) // 4, (w + 3) // 4)).repeat(4, 0).repeat(4, 1)[:h, :w].astype(np.uint8)
    lab[rng.random((h, w)) < 0.1] = 255
    return lab


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Upstream artifacts: build_splits (classes.json, manifests, PNGs), embed_text, train_classifier."""
    from zeroseg.models import save_segmenter
    from zeroseg.models.clip import load_clip
    from zeroseg.models.maskclip import MaskCLIP

    root = tmp_path_factory.mktemp("evaluate_inputs")
    rng = np.random.default_rng(0)
    bs, et, tc = root / "build_splits", root / "embed_text", root / "train_classifier"
    for d in (bs / "manifests", et / "embeddings", tc):
        d.mkdir(parents=True)
    classes = {
        "train": {
            **VOCABS["val"],
            "names": ["sky", "road", "person"],
            "prompt_names": ["sky", "road", "person"],
            "seen": [0, 1, 2],
            "unseen": [],
        },
        "eval": VOCABS,
    }
    (bs / "classes.json").write_text(json.dumps(classes))
    rows, roots = {}, {}
    for s, sizes in SIZES.items():
        c = len(VOCABS[s]["names"])
        (bs / "labels" / s).mkdir(parents=True)
        images = root / "images" / s
        (images / "sub").mkdir(parents=True)
        roots[s] = str(images)  # runtime_outputs: one image folder per split
        recs = []
        for i, (h, w) in enumerate(sizes):
            lab = _labels(rng, h, w, c)
            img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ip, lp = images / "sub" / f"{i}.png", bs / "labels" / s / f"{i}.png"
            Image.fromarray(img).save(ip)
            Image.fromarray(lab, mode="L").save(lp)
            recs.append(
                {
                    "image_id": f"{s}{i}",
                    "image": f"sub/{i}.png",
                    "label": f"labels/{s}/{i}.png",
                    "height": h,
                    "width": w,
                    "classes": sorted(int(x) for x in np.unique(lab) if x != 255),
                    "dataset": VOCABS[s]["dataset"],
                    "image_path": ip,
                    "label_path": lp,
                }
            )
        pq.write_table(
            pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in recs], schema=SCHEMA),
            bs / "manifests" / f"{s}.parquet",
        )
        rows[s] = recs
        emb = rng.standard_normal((c, 64)).astype(np.float32)
        np.save(et / "embeddings" / f"{s}.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    save_segmenter(tc, MaskCLIP(load_clip(TINY), {"input_size": INPUT}), TINY, "maskclip")
    return {"root": root, "bs": bs, "et": et, "tc": tc, "rows": rows, "roots": {"image_roots": roots}}


def _art(stage, path, runtime=None):
    return Artifact(stage, stage[0] * 64, Path(path), str(path), {"files": []}, runtime=runtime or {})


def _ctx(inputs, out, config, tracking=None, et=None):
    out.mkdir(parents=True, exist_ok=True)
    arts = {
        "splits": _art("build_splits", inputs["bs"], inputs["roots"]),
        "text": _art("embed_text", et or inputs["et"]),
        "model": _art("train_classifier", inputs["tc"]),
    }
    return StageContext(
        "evaluate",
        "f" * 64,
        config,
        arts,
        out,
        out.parent,
        str(out.parent / "_train"),
        "evaluate-fff",
        tracking=tracking,
        log=lambda *_: None,
    )


def _conf(**kw):
    from stages.evaluate import EvaluateConfig

    return EvaluateConfig(**kw)


# ---------------------------------------------------------------------------------------------
# expected values, computed here
# ---------------------------------------------------------------------------------------------
def _confusion(pred, gt, c):
    """``cm[g, p]`` over the pixels whose ground truth is not 255 (plain NumPy)."""
    valid = gt != 255
    return np.bincount(gt[valid].astype(np.int64) * c + pred[valid], minlength=c * c).reshape(c, c)


def _mean(x):
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def _hand_metrics(cm, seen, unseen):
    """Percent metrics of a confusion matrix (mmseg conventions: IoU NaN for a class neither in
    ground truth nor predicted, NaN-skipping means; hIoU = 2SU / (S + U), ZegCLIP Eq. 9)."""
    cm = np.asarray(cm, float)
    tp, gt, pred = np.diag(cm), cm.sum(1), cm.sum(0)
    union = gt + pred - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, 100 * tp / union, np.nan)
        acc = np.where(gt > 0, 100 * tp / gt, np.nan)
    s, u = _mean(iou[seen]), _mean(iou[unseen])
    h = float("nan") if math.isnan(s) or math.isnan(u) else (0.0 if s + u == 0 else 2 * s * u / (s + u))
    return {
        "pAcc": 100 * tp.sum() / cm.sum(),
        "mAcc": _mean(acc),
        "mIoU": _mean(iou),
        "mIoU_seen": s,
        "mIoU_unseen": u,
        "hIoU": h,
    }, iou


def _gt_pixels(inputs, s, n=None):
    """Labelled pixels per class over the first ``n`` label PNGs of set ``s``, and all pixels."""
    c = len(VOCABS[s]["names"])
    labs = [np.asarray(Image.open(r["label_path"])) for r in inputs["rows"][s][:n]]
    counts = np.bincount(np.concatenate([lab[lab != 255] for lab in labs]).astype(np.int64), minlength=c)
    return counts, sum(lab.size for lab in labs)


def _reference(inputs, s, gamma=0.0, n=None):
    """Per image, without Ray: resize -> normalise -> segmenter -> upsample -> (calibrated) argmax."""
    from zeroseg.models import load_segmenter

    seg = load_segmenter(inputs["tc"])
    v = VOCABS[s]
    c, unseen = len(v["names"]), v["unseen"]
    emb = torch.from_numpy(np.load(inputs["et"] / "embeddings" / f"{s}.npy"))
    mean, std = torch.tensor(seg.mean).view(1, 3, 1, 1), torch.tensor(seg.std).view(1, 3, 1, 1)
    gz, zs = np.zeros((c, c), np.int64), np.zeros((len(unseen),) * 2, np.int64)
    for r in inputs["rows"][s][:n]:
        img = np.array(Image.open(r["image_path"]).convert("RGB"))
        lab = np.asarray(Image.open(r["label_path"]))
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        x = (F.interpolate(x, size=INPUT, mode="bilinear", align_corners=False, antialias=True) - mean) / std
        with torch.no_grad():
            sc = F.interpolate(seg(x, emb), size=lab.shape, mode="bilinear", align_corners=False)[0]
        p = torch.softmax(sc, 0)
        p[v["seen"]] -= gamma  # ZegFormer Eq. 2
        gz += _confusion(p.argmax(0).numpy(), lab, c)
        pu = sc[unseen].argmax(0).numpy()
        for k, cls in enumerate(unseen):
            zs[k] += np.bincount(pu[lab == cls], minlength=len(unseen))
    return gz, zs


# ---------------------------------------------------------------------------------------------
# MaskCLIP through the stage
# ---------------------------------------------------------------------------------------------
# One Ray run for the MaskCLIP case (actor start-up dominates: ~10-20 s on a loaded 2-core box):
# both sets named in reverse order, max_images, seen-class calibration, batches of 2.
MAX_IMAGES, GAMMA = 4, 0.3
N_IMAGES = {s: min(MAX_IMAGES, len(v)) for s, v in SIZES.items()}  # val 4 of 5, cam 3


@pytest.fixture(scope="module")
def full_run(inputs, ray_one_cpu):
    from pipeline import tracking
    from stages.evaluate import Evaluate

    out = inputs["root"] / "out_full"
    conf = _conf(sets=["cam", "val"], max_images=MAX_IMAGES, gamma=GAMMA, batch_size=2, device="auto")
    calls = []
    with pytest.MonkeyPatch.context() as mp:  # no MLflow run: the stage logs nothing itself
        mp.setattr(tracking, "log_metrics", lambda *a, **k: calls.append(("metrics", a, k)))
        mp.setattr(tracking, "log_artifacts", lambda *a, **k: calls.append(("artifacts", a, k)))
        metrics = Evaluate().run(_ctx(inputs, out, conf))
    assert calls == []
    return out, metrics


def test_full_run_matches_the_direct_computation(inputs, full_run):
    out, metrics = full_run
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc) == ["cam", "val"]
    for s in ("val", "cam"):
        n = N_IMAGES[s]
        gz, zs = _reference(inputs, s, gamma=GAMMA, n=n)
        got = doc[s]
        np.testing.assert_array_equal(np.array(got["gzs3"]["confusion_matrix"]), gz)
        counts, pixels = _gt_pixels(inputs, s, n)
        np.testing.assert_array_equal(gz.sum(1), counts)  # every labelled pixel counted once
        assert got["images"] == n and got["pixels"] == pixels == sum(h * w for h, w in SIZES[s][:n])
        assert got["gamma"] == GAMMA
        ref, iou = _hand_metrics(gz, VOCABS[s]["seen"], VOCABS[s]["unseen"])
        for k, v in ref.items():
            if np.isfinite(v):  # NaN (e.g. no unseen class present) -> null in JSON, left out of the dict
                assert got["gzs3"][k] == pytest.approx(v) and metrics[f"{s}/{k}"] == pytest.approx(v), k
                assert 0.0 <= v <= 100.0
            else:
                assert got["gzs3"][k] is None and f"{s}/{k}" not in metrics
        per = got["gzs3"]["per_class"]
        assert [r["name"] for r in per] == VOCABS[s]["names"]
        assert [r["gt_pixels"] for r in per] == counts.tolist() and sum(r["gt_pixels"] for r in per) == int(gz.sum())
        assert [r["iou"] for r in per] == pytest.approx([None if np.isnan(x) else x for x in iou])
        zref = zs.diagonal().sum() / zs.sum() * 100
        assert got["zs3"]["pAcc"] == pytest.approx(zref) and metrics[f"{s}/zs3_pAcc"] == pytest.approx(zref)
        zm = _hand_metrics(zs, list(range(len(zs))), [])[0]["mIoU"]
        if np.isfinite(zm):
            assert got["zs3"]["mIoU"] == pytest.approx(zm) and metrics[f"{s}/zs3_mIoU"] == pytest.approx(zm)
        else:
            assert got["zs3"]["mIoU"] is None and f"{s}/zs3_mIoU" not in metrics
        assert [r["id"] for r in got["zs3"]["per_class"]] == VOCABS[s]["unseen"]
        md = (out / f"per_class_{s}.md").read_text()
        assert "| id | class | split | IoU (%) | Acc (%) | GT pixels" in md and VOCABS[s]["names"][-1] in md
        assert (out / f"per_class_iou_{s}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(metrics) >= {"val/pAcc", "val/mIoU", "cam/pAcc", "fps"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())


def test_fps_record(full_run):
    from stages.evaluate import Evaluate, fps_line

    out, metrics = full_run
    fps = json.loads((out / "fps.json").read_text())
    p = fps["protocol"]
    assert p["batch_size"] == 2 and p["device"] == "cpu" and p["num_gpus_per_worker"] == 0.0
    assert p["resolution"] == list(INPUT)  # no evaluate.resolution given: the segmenter's input_size
    assert p["warmup_batches_excluded_per_worker"] == 1 and p["concurrency"] == 1
    # one actor, 7 images in batches of <= 2: the first batch is warm-up
    total = sum(N_IMAGES.values())
    timed = fps["overall"]["images_timed"]
    assert 0 < timed <= total - 1 and fps["overall"]["images_per_s"] > 0 and fps["overall"]["megapixels_per_s"] > 0
    assert fps["overall"]["images"] == total == fps["end_to_end"]["images"]
    assert fps["overall"]["images_per_s"] == pytest.approx(timed / fps["overall"]["seconds_timed"])
    assert metrics["fps"] == pytest.approx(fps["overall"]["images_per_s"])
    # the driver's summary prints this key (it has no "<set>/" prefix, so it is not in the table)
    assert fps_line(metrics).startswith(f"FPS: {metrics['fps']:.2f} images/s")
    assert fps_line({}) is None and fps_line({"fps": float("nan")}) is None and fps_line({"fps": True}) is None
    summary = Evaluate().summary(metrics)
    assert len(summary) == 2 and summary[1] == fps_line(metrics)


def test_metrics_table_rows_are_metrics_and_columns_sets():
    import io

    from rich.console import Console

    from stages.evaluate import metrics_table

    m = {"cam/pAcc": 50.0, "cam/hIoU": 12.345, "val/hIoU": 1.0, "val/zz_extra": 2.0, "fps": 3.0}
    t = metrics_table(m)
    assert [c.header for c in t.columns] == ["metric", "cam", "val"]
    con = Console(width=80, file=io.StringIO(), color_system=None)
    con.print(t)
    cells = [ln.replace("│", " ").split() for ln in con.file.getvalue().splitlines()]
    body = [c for c in cells if c and c[0] in ("hIoU", "pAcc", "zz_extra")]
    assert body == [["hIoU", "12.35", "1.00"], ["pAcc", "50.00", "-"], ["zz_extra", "-", "2.00"]]


# ---------------------------------------------------------------------------------------------
# scripted predictors through the stage: oracle and constant
# ---------------------------------------------------------------------------------------------
CONSTANT = 1  # the class the constant segmenter always predicts on set "cam" (unseen class "b")


class ScriptedPredictor(SegmenterPredictor):
    """The stage's predictor with the model replaced: on set ``val`` an oracle (one-hot of the
    ground truth at the label's size), on set ``cam`` a constant segmenter (class
    :data:`CONSTANT` everywhere, at a 2 x 3 grid upsampled by the evaluator). Decoding
    (``load``) is the stage's own."""

    def __init__(self, cfg, segmenter_uri, embeddings, device, prompt_names=None):
        # (not "classes": cloudpickle would then ship the torch.classes submodule, which does not pickle)
        self.device_name = "scripted"
        self.n_classes = {n: np.load(uri).shape[0] for n, uri in embeddings.items()}

    def __call__(self, inputs):
        groups = []
        for name in dict.fromkeys(inputs["sets"]):
            idx = [i for i, s in enumerate(inputs["sets"]) if s == name]
            c = self.n_classes[name]
            if name == "val":
                assert len(idx) == 1  # batch_size 1: one label size per group
                lab = torch.from_numpy(np.array(inputs["labels"][idx[0]], dtype=np.int64))
                lab[lab == 255] = 0  # ignored anyway
                scores = F.one_hot(lab, c).permute(2, 0, 1)[None].float() * 5.0
            else:
                scores = torch.zeros((len(idx), c, 2, 3))
                scores[:, CONSTANT] = 1.0
            groups.append({"set": name, "index": idx, "scores": scores})
        return {"groups": groups, "probabilities": False}


@pytest.fixture(scope="module")
def scripted_run(inputs, ray_one_cpu):
    import stages.jobs.evaluate
    from pipeline import tracking
    from stages.evaluate import Evaluate

    out = inputs["root"] / "out_scripted"
    logged = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stages.jobs.evaluate, "SegmenterPredictor", ScriptedPredictor)
        mp.setattr(tracking, "log_metrics", lambda m, run_id=None, **k: logged.append(("metrics", dict(m), run_id)))
        mp.setattr(tracking, "log_artifacts", lambda d, run_id=None: logged.append(("artifacts", Path(d), run_id)))
        metrics = Evaluate().run(
            _ctx(inputs, out, _conf(batch_size=1), tracking={"tracking_uri": "sqlite:///unused.db", "run_id": "r1"})
        )
    return out, metrics, logged


def test_oracle_segmenter_scores_100(inputs, scripted_run):
    out, metrics, _ = scripted_run
    doc = json.loads((out / "metrics.json").read_text())["val"]
    counts, pixels = _gt_pixels(inputs, "val")
    assert (counts > 0).all()  # every class present: every IoU is defined
    cm = np.array(doc["gzs3"]["confusion_matrix"])
    np.testing.assert_array_equal(cm, np.diag(counts))  # all on the diagonal, every labelled pixel once
    assert doc["images"] == len(SIZES["val"]) and doc["pixels"] == pixels
    for k in ("mIoU", "mIoU_seen", "mIoU_unseen", "hIoU", "pAcc", "mAcc"):
        assert doc["gzs3"][k] == 100.0 and metrics[f"val/{k}"] == 100.0, k
    assert [r["iou"] for r in doc["gzs3"]["per_class"]] == [100.0] * 5
    assert doc["zs3"]["mIoU"] == doc["zs3"]["pAcc"] == 100.0 == metrics["val/zs3_mIoU"]


def test_constant_segmenter_scores_its_pixel_share(inputs, scripted_run):
    out, metrics, _ = scripted_run
    doc = json.loads((out / "metrics.json").read_text())["cam"]
    counts, _ = _gt_pixels(inputs, "cam")
    assert (counts > 0).all()
    valid = counts.sum()
    k = CONSTANT
    # predicted class k everywhere: IoU_k = |gt k| / |valid|, every other present class 0
    want_iou = [0.0, 0.0, 0.0]
    want_iou[k] = 100 * counts[k] / valid
    cm = np.array(doc["gzs3"]["confusion_matrix"])
    assert cm[:, k].tolist() == counts.tolist() and cm.sum() == valid
    assert [r["iou"] for r in doc["gzs3"]["per_class"]] == pytest.approx(want_iou)
    assert [r["acc"] for r in doc["gzs3"]["per_class"]] == pytest.approx([0.0, 100.0, 0.0])
    seen, unseen = VOCABS["cam"]["seen"], VOCABS["cam"]["unseen"]  # [0], [1, 2]
    want = {
        "pAcc": 100 * counts[k] / valid,
        "mAcc": 100 / 3,
        "mIoU": want_iou[k] / 3,
        "mIoU_seen": 0.0,
        "mIoU_unseen": (want_iou[1] + want_iou[2]) / 2,
        "hIoU": 0.0,
    }
    for name, v in want.items():
        assert doc["gzs3"][name] == pytest.approx(v) and metrics[f"cam/{name}"] == pytest.approx(v), name
    assert seen == [0] and unseen == [1, 2]
    # ZS3: only unseen classes compete, only unseen pixels count: always class k = 1
    u = counts[1] + counts[2]
    assert doc["zs3"]["pAcc"] == pytest.approx(100 * counts[1] / u)
    assert doc["zs3"]["mIoU"] == pytest.approx(100 * counts[1] / u / 2)
    assert [r["iou"] for r in doc["zs3"]["per_class"]] == pytest.approx([100 * counts[1] / u, 0.0])


def test_stage_logs_per_class_iou_and_its_files_to_its_mlflow_run(scripted_run):
    out, _, logged = scripted_run
    assert [(what, run) for what, _, run in logged] == [("metrics", "r1"), ("artifacts", "r1")]
    per_class = logged[0][1]
    assert {k: v for k, v in per_class.items() if k.startswith("val/")} == {
        f"val/iou/{n}": 100.0 for n in VOCABS["val"]["names"]
    }
    assert per_class["cam/iou/a"] == 0.0 and per_class["cam/iou/c"] == 0.0 and 0 < per_class["cam/iou/b"] < 100
    assert logged[1][1] == out


# ---------------------------------------------------------------------------------------------
# pipeline.inference.reduce with a toy predictor and a toy evaluator
# ---------------------------------------------------------------------------------------------
def _toy_label(i):
    """The label map of row ``i`` (4 x 5, classes 0..3, some 255)."""
    lab = (np.arange(20).reshape(4, 5) * (i + 1) % 5).astype(np.uint8)
    lab[lab == 4] = 255
    return lab


class ToyPredictor:
    """Rows ``{"id": i}`` -> label maps (shifted by ``shift``, mod 4); raises DataError for ``bad_id``."""

    def __init__(self, shift, bad_id=None, broken=False):
        if broken:  # e.g. a bad model file found while the actor starts
            raise DataError("toy model file is broken")
        self.shift, self.bad_id, self.device_name = int(shift), bad_id, "toy-device"

    def load(self, batch):
        return {"ids": [int(i) for i in batch["id"]]}

    def __call__(self, inputs):
        if self.bad_id in inputs["ids"]:
            raise DataError(f"row {self.bad_id}: a label the toy cannot read")
        out = []
        for i in inputs["ids"]:
            lab = _toy_label(i)
            out.append(np.where(lab == 255, 255, (lab + self.shift) % 4).astype(np.uint8))
        return {"labels": out}


class _ByValue:
    """Carries an object through the standard ``pickle`` by value (cloudpickle inside)."""

    def __init__(self, obj):
        self.obj = obj

    def __reduce__(self):
        return (ray.cloudpickle.loads, (ray.cloudpickle.dumps(self.obj),))


class _ShippedByValue:
    """``pipeline.inference.reduce`` sends evaluators to the actors with the standard ``pickle``
    (by class reference), and the actors cannot import this test module: instances of these toy
    evaluators carry their class by value."""

    def __reduce__(self):
        return (operator.call, (object.__new__, _ByValue(type(self))), dict(self.__dict__))


class PixelCounter(_ShippedByValue):
    """Toy evaluator: labelled pixels per class and rows seen."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.reset()

    def reset(self):
        self.counts = np.zeros(self.num_classes, np.int64)
        self.rows = 0

    def process(self, inputs, outputs):
        for lab in outputs["labels"]:
            self.counts += np.bincount(lab[lab != 255], minlength=self.num_classes)
        self.rows += len(inputs["ids"])

    def merge(self, other):
        self.counts += other.counts
        self.rows += other.rows

    def finalize(self):
        return {"counts": self.counts.tolist(), "rows": self.rows}


class IdSum(_ShippedByValue):
    """A second toy evaluator: the sum of the row ids."""

    def reset(self):
        self.total = 0

    def process(self, inputs, outputs):
        self.total += sum(inputs["ids"])

    def merge(self, other):
        self.total += other.total

    def finalize(self):
        return self.total


def test_reduce_merges_toy_evaluators_over_an_actor_pool(ray_one_cpu):
    import ray.data

    from pipeline.inference import reduce

    n = 7
    ds = ray.data.from_items([{"id": i} for i in range(n)])
    template = PixelCounter(4)
    seen_rows = []
    merged, timing = reduce(
        ds,
        ToyPredictor,
        {"shift": 1},
        {"pixels": template, "ids": IdSum()},
        batch_size=2,
        warmup_batches=1,
        progress=seen_rows.append,
    )
    want = np.zeros(4, np.int64)
    for i in range(n):
        lab = _toy_label(i)
        want += np.bincount((lab[lab != 255] + 1) % 4, minlength=4)
    assert merged["pixels"].finalize() == {"counts": want.tolist(), "rows": n}
    assert merged["ids"].finalize() == sum(range(n))
    assert template.counts.tolist() == [0, 0, 0, 0] and template.rows == 0  # the caller's instance is untouched
    assert sum(seen_rows) == n and timing.rows == n and timing.devices == {"toy-device"}
    assert 0 < timing.rows_timed < n  # one actor: its first batch is warm-up
    assert timing.load_seconds >= 0 and timing.compute_seconds > 0 and timing.rows_per_second > 0


def test_a_data_error_in_a_predictor_actor_reaches_the_caller_as_itself(ray_one_cpu):
    import ray.data

    from pipeline.inference import reduce

    ds = ray.data.from_items([{"id": i} for i in range(4)])
    with pytest.raises(DataError) as e:
        reduce(ds, ToyPredictor, {"shift": 0, "bad_id": 2}, {"pixels": PixelCounter(4)}, batch_size=2)
    assert type(e.value) is DataError and str(e.value) == "row 2: a label the toy cannot read"
    with pytest.raises(DataError) as e:
        reduce(ds, ToyPredictor, {"shift": 0, "broken": True}, {"pixels": PixelCounter(4)}, batch_size=2)
    assert type(e.value) is DataError and str(e.value) == "toy model file is broken"


# ---------------------------------------------------------------------------------------------
# the predictor and the evaluator in-process (no Ray)
# ---------------------------------------------------------------------------------------------
def _batch(rows, name):
    return {
        "eval_set": np.array([name] * len(rows), dtype=object),
        "image_uri": np.array([str(r["image_path"]) for r in rows], dtype=object),
        "label_uri": np.array([str(r["label_path"]) for r in rows], dtype=object),
    }


def _evaluator(sets, gamma=0.0):
    from zeroseg.evaluation import GZS3Evaluator

    return GZS3Evaluator(
        {
            n: {"num_classes": len(v["names"]), "seen": v["seen"], "unseen": v["unseen"], "ignore_index": 255}
            for n, v in sets.items()
        },
        gamma=gamma,
    )


def test_predictor_and_evaluator_match_reference_without_ray(inputs):
    """The stage's predictor in-process (real MaskCLIP): all of cam in one batch, no calibration."""
    w = SegmenterPredictor(
        EvaluateConfig(), str(inputs["tc"]), {"cam": str(inputs["et"] / "embeddings" / "cam.npy")}, "cpu"
    )
    assert w.protocol.resolution == tuple(INPUT) and w.device_name == "cpu"
    rows = inputs["rows"]["cam"]
    batch = w.load(_batch(rows, "cam"))
    assert [lab.shape for lab in batch["labels"]] == [tuple(s) for s in SIZES["cam"]]  # labels never resized
    out = w(batch)
    assert [g["set"] for g in out["groups"]] == ["cam"] and out["groups"][0]["index"] == [0, 1, 2]
    assert tuple(out["groups"][0]["scores"].shape) == (3, 3, 2, 3) and out["probabilities"] is False
    ev = _evaluator({"cam": VOCABS["cam"]})
    ev.process(batch, out)
    res = ev.finalize()["cam"]
    gz, zs = _reference(inputs, "cam")
    np.testing.assert_array_equal(res["gzs3"], gz)
    np.testing.assert_array_equal(res["zs3"], zs)
    assert res["images"] == 3 and res["pixels"] == sum(h * w for h, w in SIZES["cam"])
    # partial states merge by addition
    other = _evaluator({"cam": VOCABS["cam"]})
    other.process(batch, out)
    other.merge(ev)
    np.testing.assert_array_equal(other.finalize()["cam"]["gzs3"], 2 * gz)


class _Oracle(Segmenter):
    """Reads the class id back from the image (red channel = 20 * id): perfect scores at the
    input resolution, which equals the label resolution (no resampling blur)."""

    def __init__(self, size):
        super().__init__()
        self.input_size, self.mean, self.std = size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images, text):
        ids = torch.round(images[:, 0] * 255 / 20).long()
        return F.one_hot(ids, text.shape[0]).permute(0, 3, 1, 2).float() * 5.0


def test_predictor_with_an_oracle_segmenter_scores_100(tmp_path, monkeypatch):
    """The image -> scores path of the stage's predictor with an oracle reading the class from the
    pixels (in-process; ``zeroseg.models.load_segmenter`` replaced)."""
    import zeroseg.models

    size, c = (12, 16), 4
    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": _Oracle(size))
    rng = np.random.default_rng(1)
    rows, labs = [], []
    for i in range(3):
        lab = _labels(rng, *size, c)
        img = np.zeros((*size, 3), np.uint8)
        img[..., 0] = np.where(lab == 255, 0, lab * 20)
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        Image.fromarray(lab, mode="L").save(tmp_path / f"l{i}.png")
        rows.append({"image_path": tmp_path / f"i{i}.png", "label_path": tmp_path / f"l{i}.png"})
        labs.append(lab)
    np.save(tmp_path / "s.npy", np.eye(c, 8, dtype=np.float32))
    w = SegmenterPredictor(EvaluateConfig(), "unused", {"s": str(tmp_path / "s.npy")}, "cpu")
    sets = {"s": {"names": list("abcd"), "seen": [0, 1], "unseen": [2, 3]}}
    ev = _evaluator(sets)
    batch = w.load(_batch(rows, "s"))
    ev.process(batch, w(batch))
    res = ev.finalize()["s"]
    gz, zs = res["gzs3"], res["zs3"]
    counts = np.bincount(np.concatenate([lab[lab != 255] for lab in labs]), minlength=c)
    np.testing.assert_array_equal(gz, np.diag(counts))
    assert res["images"] == 3 and res["pixels"] == 3 * size[0] * size[1]
    m, _ = _hand_metrics(gz, [0, 1], [2, 3])
    assert m == {"pAcc": 100.0, "mAcc": 100.0, "mIoU": 100.0, "mIoU_seen": 100.0, "mIoU_unseen": 100.0, "hIoU": 100.0}
    np.testing.assert_array_equal(zs, np.diag(counts[2:]))
    # a label value out of range names the file
    Image.fromarray(np.full(size, 9, np.uint8), mode="L").save(tmp_path / "bad.png")
    bad = w.load(_batch([{"image_path": rows[0]["image_path"], "label_path": tmp_path / "bad.png"}], "s"))
    with pytest.raises(DataError, match=r"bad\.png.*ground-truth value 9"):
        _evaluator(sets).process(bad, w(bad))
    # an undecodable image names the set and the file
    (tmp_path / "rotten.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"eval set 's': .*rotten\.png"):
        w.load(_batch([{"image_path": tmp_path / "rotten.png", "label_path": rows[0]["label_path"]}], "s"))


# ---------------------------------------------------------------------------------------------
# errors, config, MLflow helpers
# ---------------------------------------------------------------------------------------------
def test_input_errors(inputs, tmp_path, ray_one_cpu):
    from stages.common import text_embeddings, vocabularies
    from stages.evaluate import Evaluate

    with pytest.raises(ConfigError, match=r"unknown eval set 'cma'; did you mean 'cam'"):
        Evaluate().run(_ctx(inputs, tmp_path / "o1", _conf(sets=["cma"])))
    # embeddings missing for a set
    et = tmp_path / "et"
    (et / "embeddings").mkdir(parents=True)
    np.save(et / "embeddings" / "val.npy", np.load(inputs["et"] / "embeddings" / "val.npy"))
    with pytest.raises(DataError, match=r"vocabulary 'cam' has no text embeddings.*embeddings/cam\.npy"):
        Evaluate().run(_ctx(inputs, tmp_path / "o2", _conf(), et=et))
    # wrong row count
    np.save(et / "embeddings" / "cam.npy", np.ones((4, 64), np.float32))
    with pytest.raises(DataError, match=r"embeddings/cam\.npy has shape \(4, 64\) but vocabulary 'cam' has 3 classes"):
        Evaluate().run(_ctx(inputs, tmp_path / "o3", _conf(), et=et))
    splits = _art("build_splits", inputs["bs"])
    vocabs = vocabularies(splits)
    assert list(vocabs) == ["train", "val", "cam"] and list(vocabs["val"].unseen) == [3, 4]
    emb = text_embeddings(_art("embed_text", inputs["et"]), vocabs, ["val", "cam"])
    assert list(emb) == ["val", "cam"] and emb["cam"].shape == (3, 64) and emb["cam"].dtype == np.float32
    # no eval set at all
    bs = tmp_path / "bs_no_eval"
    bs.mkdir()
    (bs / "classes.json").write_text(json.dumps({"train": VOCABS["cam"], "eval": {}}))
    ctx = _ctx(inputs, tmp_path / "o4", _conf())
    ctx.inputs["splits"] = _art("build_splits", bs)
    with pytest.raises(DataError, match="lists no eval sets"):
        Evaluate().run(ctx)


def test_resolve_device_on_a_cpu_cluster(ray_one_cpu):
    from stages.jobs.device import actor_device, resolve_device

    def resolve(cfg):  # what evaluate's job calls
        return resolve_device(cfg.device, "evaluate.device", cfg.num_gpus_per_worker, "evaluate.num_gpus_per_worker")

    assert resolve(_conf()) == ("cpu", 0.0)
    assert resolve(_conf(device="cpu")) == ("cpu", 0.0)
    with pytest.raises(ConfigError, match=r"asks for 1 GPU\(s\) per worker.*set evaluate.device: cpu"):
        resolve(_conf(device="cuda"))
    with pytest.raises(ConfigError, match=r"evaluate.num_gpus_per_worker is 0"):
        resolve(_conf(device="cuda:1", num_gpus_per_worker=0))
    # extract_features' setting: no GPUs per worker of its own (1 on cuda)
    assert resolve_device("auto", "extract_features.device") == ("cpu", 0.0)
    with pytest.raises(ConfigError, match=r"extract_features.device is 'cuda'.*set extract_features.device: cpu"):
        resolve_device("cuda", "extract_features.device")
    assert actor_device("cpu", "evaluate.device") == (torch.device("cpu"), "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"evaluate.device 'cuda:0': this worker has no CUDA device"):
            actor_device("cuda:0", "evaluate.device")
    # the one validator (stages.common.Device) names the field
    from stages.extract_features import ExtractFeaturesConfig

    for conf, key in ((EvaluateConfig, "device"), (ExtractFeaturesConfig, "device")):
        with pytest.raises(pydantic.ValidationError, match=rf"{key} must be auto, cpu, cuda or cuda:N, got 'gpu'"):
            conf(device="gpu")
        assert conf(device="cuda:3").device == "cuda:3"


def test_config_schema():
    from pipeline.config import digest, hashed_view, runtime_view
    from stages.catalog import STAGES
    from stages.evaluate import Evaluate, EvaluateConfig

    assert Evaluate.name == "evaluate" and Evaluate in STAGES
    assert {r: i.stages for r, i in Evaluate.INPUTS.items()} == {
        "splits": ("build_splits",),
        "text": ("embed_text",),
        "model": ("train_classifier", "train_generator", "self_train"),
        "compare": ("train_classifier", "train_generator", "self_train"),
    }
    # compare (a second model scored beside model) binds only when named
    assert [r for r, i in Evaluate.INPUTS.items() if not i.required] == ["compare"]
    assert not Evaluate.INPUTS["compare"].auto
    c = EvaluateConfig()
    assert (
        c.sets,
        c.batch_size,
        c.gamma,
        c.device,
        c.num_gpus_per_worker,
        c.concurrency,
        c.warmup_batches,
        c.max_images,
        c.resolution,
    ) == (None, 4, None, "auto", None, 1, 1, None, None)  # gamma unset: the model artifact's default_gamma
    for bad in ({"gama": 0.1}, {"device": "tpu"}, {"batch_size": 0}, {"resolution": [224]}, {"gamma": -1}):
        (field,) = bad
        with pytest.raises(pydantic.ValidationError, match=rf"(?m)^{field}\b"):  # the error names the field
            EvaluateConfig(**bad)
    # what enters the key: the scoring settings; resources, batching and timing do not
    assert hashed_view(c) == {
        "sets": None,
        "gamma": None,
        "max_images": None,
        "resolution": None,
        # the test protocol (tests/test_protocols.py) changes the scores: hashed
        "protocol": "resize",
        "crop": None,
        "stride": None,
        "short_side": None,
        "max_long_side": None,
        "activation_at": "input",
    }
    assert set(runtime_view(c)) == {"batch_size", "device", "num_gpus_per_worker", "concurrency", "warmup_batches"}
    runtime = EvaluateConfig(batch_size=16, device="cpu", num_gpus_per_worker=0, concurrency=3, warmup_batches=0)
    assert digest(hashed_view(runtime)) == digest(hashed_view(c))
    assert digest(hashed_view(EvaluateConfig(gamma=0.1))) != digest(hashed_view(c))
    assert digest(hashed_view(EvaluateConfig(resolution=[64, 64]))) != digest(hashed_view(c))


def test_mlflow_helpers(tmp_path, monkeypatch):
    """What evaluate logs per class goes through ``pipeline.tracking``: finite numbers only, keys
    sanitised, the active run through the fluent API, another run through the client in batches
    of 1000 (MLflow's limit)."""
    import types

    import mlflow

    from pipeline import tracking

    calls = []
    monkeypatch.setattr(mlflow, "log_metrics", lambda m, step=None: calls.append(("metrics", m)))
    monkeypatch.setattr(mlflow, "log_artifacts", lambda d: calls.append(("artifacts", d)))
    monkeypatch.setattr(mlflow, "active_run", lambda: types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1")))
    tracking.log_metrics(
        {"val/iou/traffic light": 12.5, "val/iou/x": float("nan"), "val/iou/a:b": 1, "flag": True, "name": "x"},
        run_id="r1",
    )
    tracking.log_artifacts(tmp_path, run_id="r1")
    assert calls == [("metrics", {"val/iou/traffic light": 12.5, "val/iou/a_b": 1.0}), ("artifacts", str(tmp_path))]
    tracking.log_metrics({"x": float("inf")}, run_id="r1")  # nothing finite: nothing sent
    assert len(calls) == 2
    batches, arts = [], []

    class Client:
        def __init__(self, tracking_uri=None):
            pass

        def log_batch(self, run_id, metrics):
            batches.append((run_id, len(metrics)))

        def log_artifacts(self, run_id, d):
            arts.append((run_id, d))

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    tracking.log_metrics({f"val/iou/c{i}": float(i) for i in range(2500)}, run_id="r2")
    tracking.log_artifacts(tmp_path, run_id="r2")
    assert batches == [("r2", 1000), ("r2", 1000), ("r2", 500)] and arts == [("r2", str(tmp_path))]
    assert len(calls) == 2  # nothing more through the fluent API


def test_probability_scores_are_calibrated_by_direct_subtraction(tmp_path, monkeypatch):
    """ZegCLIP-like scores (per-class sigmoid probabilities) p = (0.6 seen, 0.45 unseen), gamma 0.1:
    subtracting gamma directly keeps the seen class (0.5 > 0.45); a softmax first would not
    (softmax(0.6, 0.45) differs by tanh(0.075) = 0.075 < 0.1) and predict the unseen class."""
    import torch

    import zeroseg.models
    from zeroseg.evaluation import GZS3Evaluator

    class Sigmoidish(torch.nn.Module):
        scores_are_probabilities = True
        input_size, mean, std = (1, 1), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

        def forward(self, x, text):
            return torch.tensor([[[[0.6]], [[0.45]]]]).expand(len(x), 2, 1, 1)

    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": Sigmoidish())
    np.save(tmp_path / "s.npy", np.zeros((2, 4), np.float32))
    pred = SegmenterPredictor(EvaluateConfig(), "unused", {"s": str(tmp_path / "s.npy")}, "cpu")
    inputs = {
        "images": [np.zeros((1, 1, 3), np.uint8)],
        "labels": [np.zeros((1, 1), np.uint8)],
        "label_uris": ["x.png"],
        "sets": ["s"],
    }
    out = pred(inputs)
    assert out["probabilities"] is True
    ev = GZS3Evaluator({"s": {"num_classes": 2, "seen": [0], "unseen": [1]}}, gamma=0.1)
    ev.process(inputs, out)
    assert ev.finalize()["s"]["gzs3"].tolist() == [[1, 0], [0, 0]]  # the seen pixel stays seen
    ev.reset()
    ev.process(inputs, {**out, "probabilities": False})
    assert ev.finalize()["s"]["gzs3"].tolist() == [[0, 1], [0, 0]]  # the softmax route would flip it
