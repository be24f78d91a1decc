"""The evaluate job's glue (stages/jobs/evaluate.py ``run`` / ``score_model``), in process:
which seen-class calibration gamma it applies (``evaluate.gamma`` vs the artifact's
``default_gamma``), and how a ``compare`` model's metrics are kept apart from the main model's.

No Ray: ``ray`` in the job module is replaced by a stand-in (initialised, ``from_arrow`` = the
table itself) and ``reduce`` by an in-process pass (the predictor built from the job's own
arguments, one batch, the job's own evaluators); the segmenters are scripted (constant logits
per pixel, ``zeroseg.models.load_segmenter`` replaced), so every expected confusion count
follows from a hand computation written beside the test.
"""

from __future__ import annotations

import copy
import json
import math
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors
from pipeline.dag import Artifact, StageContext
from pipeline.inference import Timing
from stages.evaluate import EvaluateConfig
from zeroseg.models import Segmenter
from zeroseg.models.clip import TINY_MODEL

H, W = 1, 4  # label size = the segmenters' input size: no resampling anywhere
CLIP = {"model": TINY_MODEL, "random_init": True}  # only its embedding size (64) is read on the driver
# seen-class probability margins p(seen) - p(unseen) of the 4 pixels of every image (2 classes)
MARGINS = (0.04, 0.12, 0.3, -0.5)


def _logit_gap(d: float) -> float:
    """Logits (l, 0) whose softmax gives p0 - p1 = d: p0 - p1 = tanh(l / 2) -> l = 2 atanh(d)."""
    return 2 * math.atanh(d)


class Scripted(Segmenter):
    """Class 0 vs class 1 logits from :data:`MARGINS` (the same for every image), or, with
    ``variants``, ``{variant: those logits shifted by the variant's offset}``."""

    def __init__(self, margins=MARGINS, variants=None):
        super().__init__()
        self.input_size, self.mean, self.std = (H, W), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.margins = list(margins)
        self.offsets = dict(variants or {})
        if variants:
            self.variants = tuple(variants)

    def _scores(self, n, margins):
        s = torch.zeros((n, 2, H, W))
        s[:, 0, 0] = torch.tensor([_logit_gap(d) for d in margins])
        return s

    def forward(self, images, text):
        assert text.shape == (2, 64)
        if not self.offsets:
            return self._scores(len(images), self.margins)
        return {v: self._scores(len(images), [d + o for d in self.margins]) for v, o in self.offsets.items()}


def _in_process_reduce(ds, predictor, predictor_kwargs, evaluators, **_):
    """``pipeline.inference.reduce`` without Ray: one predictor, one batch of every row."""
    pred = predictor(**predictor_kwargs)
    cols = {c: np.array(ds.column(c).to_pylist(), dtype=object) for c in ds.column_names}
    inputs = pred.load(cols)
    out = pred(inputs)
    merged = {}
    for name, ev in evaluators.items():
        m = copy.deepcopy(ev)
        m.reset()
        m.process(inputs, out)
        merged[name] = m
    return merged, Timing()


@pytest.fixture()
def job(monkeypatch):
    """The evaluate job module with Ray stubbed out and ``reduce`` in process; ``segmenters``:
    ``{artifact dir name: segmenter}`` that ``load_segmenter`` returns."""
    import stages.jobs.evaluate as ev
    import zeroseg.models

    segmenters: dict[str, Segmenter] = {}
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, data=types.SimpleNamespace(from_arrow=lambda t: t))
    monkeypatch.setattr(ev, "ray", fake_ray)
    monkeypatch.setattr(ev, "reduce", _in_process_reduce)
    monkeypatch.setattr(ev, "resolve_device", lambda *a, **k: ("cpu", 0.0))  # (it asks the Ray cluster)
    monkeypatch.setattr(ev, "plot_per_class_iou", lambda *a, **k: None)  # matplotlib: not the point here
    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": segmenters[Path(d).name])
    return types.SimpleNamespace(module=ev, segmenters=segmenters)


def _inputs(root: Path, n_images: int = 2) -> dict[str, Artifact]:
    """build_splits (one eval set ``s``: seen class 0, unseen class 1; every pixel labelled 0
    except the last pixel of image 0, labelled 1) and embed_text artifacts."""
    bs, et = root / "bs", root / "et"
    (bs / "manifests").mkdir(parents=True)
    (bs / "labels").mkdir()
    (et / "embeddings").mkdir(parents=True)
    vocab = {
        "dataset": "toy",
        "names": ["a", "b"],
        "prompt_names": ["a", "b"],
        "seen": [0],
        "unseen": [1],
        "ignore_index": 255,
    }
    (bs / "classes.json").write_text(json.dumps({"train": {**vocab, "unseen": []}, "eval": {"s": vocab}}))
    rows = []
    for i in range(n_images):
        lab = np.zeros((H, W), np.uint8)
        if i == 0:
            lab[0, -1] = 1
        Image.fromarray(lab, mode="L").save(bs / "labels" / f"{i}.png")
        Image.fromarray(np.full((H, W, 3), 7 * i, np.uint8)).save(bs / f"img{i}.png")
        rows.append(
            {
                "image_id": f"s{i}",
                "image": f"img{i}.png",
                "label": f"labels/{i}.png",
                "height": H,
                "width": W,
                "classes": sorted(set(lab.ravel().tolist())),
                "dataset": "toy",
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), bs / "manifests" / "s.parquet")
    np.save(et / "embeddings" / "s.npy", np.eye(2, 64, dtype=np.float32))
    np.save(et / "embeddings" / "train.npy", np.eye(2, 64, dtype=np.float32))
    return {
        "splits": Artifact(
            "build_splits", "b" * 64, bs, str(bs), {"files": []}, runtime={"image_roots": {"s": str(bs)}}
        ),
        "text": Artifact("embed_text", "e" * 64, et, str(et), {"files": []}),
    }


def _segmenter_artifact(root: Path, stage: str, name: str, **extra) -> Artifact:
    d = root / name
    d.mkdir()
    doc = {
        "method": "maskclip",
        "class": "zeroseg.models.maskclip:MaskCLIP",  # read for encodes_text only (False)
        "clip": CLIP,
        "model": {},
        "input": {"size": [H, W], "mean": [0.0] * 3, "std": [1.0] * 3},
        **extra,
    }
    (d / "segmenter.json").write_text(json.dumps(doc))
    return Artifact(stage, name[0] * 64, d, str(d), {"files": []})


def _ctx(root: Path, inputs: dict[str, Artifact], config: EvaluateConfig) -> StageContext:
    out = root / "out"
    out.mkdir()
    return StageContext(
        "evaluate", "f" * 64, config, inputs, out, root, str(root / "_train"), "evaluate-f", log=lambda *_: None
    )


def _expected_cm(gamma: float, margins=MARGINS, n_images: int = 2) -> list[list[int]]:
    """``cm[gt, pred]`` by hand: pixel ``j`` is predicted seen (0) iff ``p0 - gamma > p1``, i.e.
    ``margins[j] > gamma``; ground truth 0 everywhere but pixel 3 of image 0 (class 1)."""
    cm = np.zeros((2, 2), np.int64)
    for i in range(n_images):
        for j, d in enumerate(margins):
            gt = 1 if (i == 0 and j == W - 1) else 0
            cm[gt, 0 if d > gamma else 1] += 1
    return cm.tolist()


# ---------------------------------------------------------------------------------------------
# gamma: evaluate.gamma, else the artifact's default_gamma, else 0
# ---------------------------------------------------------------------------------------------
# margins 0.04, 0.12, 0.3, -0.5: gamma 0 keeps pixels 0-2 seen; 0.1 moves pixel 0 (0.04 < 0.1) to
# unseen; 0.2 moves pixels 0 and 1; 0.35 all three. Each row: (evaluate.gamma, default_gamma in
# segmenter.json (absent: None), the gamma applied).
GAMMA_CASES = [
    (None, 0.2, 0.2),  # unset: the model's default
    (0.0, 0.2, 0.0),  # an explicit 0.0 is kept (not taken for "unset")
    (0.1, 0.2, 0.1),  # explicit wins over the default
    (0.35, 0.0, 0.35),  # explicit wins over a default of 0
    (None, None, 0.0),  # nothing stated anywhere: no calibration
    (None, 0.0, 0.0),  # a self-trained ZegCLIP's default (released: no calibration)
]


@pytest.mark.parametrize("cfg_gamma,default,applied", GAMMA_CASES)
def test_evaluate_applies_the_explicit_gamma_else_the_models_default(tmp_path, job, cfg_gamma, default, applied):
    inputs = _inputs(tmp_path)
    extra = {} if default is None else {"default_gamma": default}
    inputs["model"] = _segmenter_artifact(tmp_path, "train_classifier", "model", **extra)
    job.segmenters["model"] = Scripted()
    cfg = EvaluateConfig(gamma=cfg_gamma)
    metrics = job.module.run(_ctx(tmp_path, inputs, cfg))
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(doc) == ["s"]
    assert doc["s"]["gamma"] == applied
    assert doc["s"]["gzs3"]["confusion_matrix"] == _expected_cm(applied)
    # the flat metrics follow the same matrix: pAcc = diagonal / 8 pixels
    cm = np.array(_expected_cm(applied))
    assert metrics["s/pAcc"] == pytest.approx(100 * np.trace(cm) / 8)
    # the per-class page states the gamma applied
    md = (tmp_path / "out" / "per_class_s.md").read_text()
    assert f"gamma {applied:g}," in md


def test_the_gammas_of_the_cases_give_different_answers():
    """The cases above would not tell a wrong resolution apart if two gammas gave one matrix."""
    cms = {g: str(_expected_cm(g)) for g in (0.0, 0.1, 0.2, 0.35)}
    assert len(set(cms.values())) == 4
    # by hand: gamma 0.2 -> image 0: pixels 0, 1 predicted unseen (gt 0), pixel 2 seen (gt 0),
    # pixel 3 (margin -0.5) unseen (gt 1); image 1: 0, 1 unseen, 2 seen, 3 unseen (gt 0)
    assert _expected_cm(0.2) == [[2, 5], [0, 1]]
    assert _expected_cm(0.0) == [[6, 1], [0, 1]]


def test_score_model_reports_the_gamma_it_applied(tmp_path, job):
    """``score_model``'s returned gamma (what report_set writes) is the one the evaluators used."""
    inputs = _inputs(tmp_path)
    art = _segmenter_artifact(tmp_path, "train_classifier", "model", default_gamma=0.2)
    job.segmenters["model"] = Scripted()
    ctx = _ctx(tmp_path, {**inputs, "model": art}, EvaluateConfig())
    from stages.common import vocabularies

    vocabs = vocabularies(inputs["splits"])
    for cfg, want in ((EvaluateConfig(), 0.2), (EvaluateConfig(gamma=0.0), 0.0), (EvaluateConfig(gamma=0.1), 0.1)):
        by_variant, _, _, text, gamma, gpus = job.module.score_model(ctx, cfg, art, ["s"], vocabs)
        assert gamma == want and text == "embeddings" and gpus == 0.0
        assert list(by_variant) == [None]
        assert by_variant[None]["s"]["gzs3"].tolist() == _expected_cm(want)
        assert by_variant[None]["s"]["images"] == 2 and by_variant[None]["s"]["pixels"] == 2 * H * W


def test_zegformer_default_gamma_is_the_released_calibration():
    """ZegFormer's default_gamma comes from ``train_classifier.gamma`` (released configs
    ``GZERO_CALIBRATE: 0.1`` for COCO-Stuff / VOC, released-code.md 1.4); 0.0 (ADE-847) is kept.
    That the artifact states it and evaluate applies it: the ZegFormer sample DAG test
    (tests/test_zegformer.py: every entry's gamma 0.1, matrices from a reference forward at 0.1)."""
    from stages.methods.zegformer import RELEASED_GAMMA, ZegFormerMethod

    assert RELEASED_GAMMA == 0.1
    assert ZegFormerMethod(method="zegformer", clip=CLIP).gamma == 0.1
    assert ZegFormerMethod(method="zegformer", clip=CLIP, gamma=0.0).gamma == 0.0


# ---------------------------------------------------------------------------------------------
# compare: a second model beside the main one, its metrics apart
# ---------------------------------------------------------------------------------------------
def test_compare_metrics_are_the_compared_models_own(tmp_path, job):
    """Main model (self_train, default gamma 0, variants x (offset 0) and y (offset -0.2)) and the
    compared model (train_classifier, default gamma 0.1, variants p (offset -0.25), q): each entry's
    matrix is its own model's at its own gamma; the compared model reports its first variant only,
    under ``train_classifier/``; the main model's variants under ``<variant>/``."""
    inputs = _inputs(tmp_path)
    inputs["model"] = _segmenter_artifact(tmp_path, "self_train", "main", default_gamma=0.0)
    inputs["compare"] = _segmenter_artifact(tmp_path, "train_classifier", "cmp", default_gamma=0.1)
    job.segmenters["main"] = Scripted(variants={"x": 0.0, "y": -0.2})
    job.segmenters["cmp"] = Scripted(variants={"p": -0.25, "q": 0.5})
    metrics = job.module.run(_ctx(tmp_path, inputs, EvaluateConfig()))
    out = tmp_path / "out"
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc) == ["s", "y/s", "train_classifier/s"]
    # by hand: main x at gamma 0 -> margins as is; main y at gamma 0 -> margins - 0.2
    # (-0.16, -0.08, 0.1, -0.7): only pixel 2 seen; compare p at gamma 0.1 -> margins - 0.25
    # (-0.21, -0.13, 0.05, -0.75): every pixel unseen (at gamma 0 pixel 2 would stay seen; its
    # variant q, margins + 0.5, would keep pixels 0-2 seen)
    want = {
        "s": ("x", 0.0, _expected_cm(0.0)),
        "y/s": ("y", 0.0, _expected_cm(0.0, [d - 0.2 for d in MARGINS])),
        "train_classifier/s": ("p", 0.1, _expected_cm(0.1, [d - 0.25 for d in MARGINS])),
    }
    assert want["s"][2] == [[6, 1], [0, 1]] and want["y/s"][2] == [[2, 5], [0, 1]]
    assert want["train_classifier/s"][2] == [[0, 7], [0, 1]]
    for key, (variant, gamma, cm) in want.items():
        assert doc[key]["variant"] == variant and doc[key]["gamma"] == gamma, key
        assert doc[key]["gzs3"]["confusion_matrix"] == cm, key
        c = np.array(cm, float)
        iou = np.diag(c) / (c.sum(0) + c.sum(1) - np.diag(c))
        assert metrics[f"{key}/mIoU"] == pytest.approx(100 * iou.mean()), key
        assert metrics[f"{key}/mIoU_seen"] == pytest.approx(100 * iou[0]), key
        assert metrics[f"{key}/pAcc"] == pytest.approx(100 * np.trace(c) / c.sum()), key
    # the compared model's entry names its artifact; the main model's entries do not
    assert doc["train_classifier/s"]["model"] == {"stage": "train_classifier", "key": "c" * 64}
    assert "model" not in doc["s"] and "model" not in doc["y/s"]
    # nothing of the compared model's other variant, nor a main-model key under its prefix
    assert not any(k.startswith("train_classifier/q/") or k.startswith("q/") for k in metrics)
    assert {k.split("/")[0] for k in metrics} == {"s", "y", "train_classifier"}
    assert set(metrics) == {f"{p}s/{m}" for p in ("", "y/", "train_classifier/") for m in _flat_names(doc["s"])}
    # the files: the main model's at the top, each variant / compared model in its own folder
    assert (out / "per_class_s.md").is_file() and (out / "y" / "per_class_s.md").is_file()
    assert (out / "train_classifier" / "per_class_s.md").is_file()
    assert "[p]" in (out / "train_classifier" / "per_class_s.md").read_text().splitlines()[0]
    assert "gamma 0.1," in (out / "train_classifier" / "per_class_s.md").read_text()


def _flat_names(entry) -> set[str]:
    """The flat metric names of one entry: the finite GZS3 summaries plus zs3_mIoU / zs3_pAcc."""
    names = {k for k in ("pAcc", "mAcc", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU") if entry["gzs3"][k] is not None}
    return names | {f"zs3_{k}" for k in ("mIoU", "pAcc") if entry["zs3"][k] is not None}


def test_compare_without_variants_and_main_with_equal_gamma_stay_apart(tmp_path, job):
    """Two plain models, both at gamma 0.1 (evaluate.gamma explicit): the entries differ exactly as
    the two models' margins do (the compared model's scores are not the main model's)."""
    inputs = _inputs(tmp_path)
    inputs["model"] = _segmenter_artifact(tmp_path, "train_generator", "main", default_gamma=0.5)
    inputs["compare"] = _segmenter_artifact(tmp_path, "train_classifier", "cmp")
    job.segmenters["main"] = Scripted()
    job.segmenters["cmp"] = Scripted(margins=(0.9, 0.9, 0.9, 0.9))
    job.module.run(_ctx(tmp_path, inputs, EvaluateConfig(gamma=0.1)))
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert list(doc) == ["s", "train_classifier/s"]
    assert doc["s"]["gamma"] == doc["train_classifier/s"]["gamma"] == 0.1
    assert doc["s"]["gzs3"]["confusion_matrix"] == _expected_cm(0.1) == [[4, 3], [0, 1]]
    assert doc["train_classifier/s"]["gzs3"]["confusion_matrix"] == [[7, 0], [1, 0]]  # all predicted seen
    assert "variant" not in doc["s"] and "variant" not in doc["train_classifier/s"]
    fps = json.loads((tmp_path / "out" / "fps.json").read_text())
    assert fps["overall"]["images"] == 2  # the main model's pass only
