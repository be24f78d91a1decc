"""The evaluate stage (stages/evaluate.py): Ray Data pass with the real MaskCLIP segmenter (tiny
random-weight open_clip model) checked against a direct per-image computation, an oracle
segmenter through the worker (perfect predictions -> 100), output files, errors, MLflow logging.

Inputs are built by hand in tmp_path: classes.json, manifests, small image / label PNGs,
embeddings, a segmenter artifact.
"""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pydantic
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.dag import Artifact, StageContext
from zeroseg.errors import ConfigError, DataError
from zeroseg.metrics import confusion_matrix, segmentation_metrics, zs3_metrics
from zeroseg.models import Segmenter
from zeroseg.models.clip import TINY_MODEL, ClipSpec

TINY = ClipSpec(model=TINY_MODEL, random_init=True)
INPUT = [32, 48]  # MaskCLIP tiny (patch 16): a 2 x 3 score grid, upsampled to each label

VOCABS = {
    "val": {"dataset": "toy", "names": ["sky", "road", "person", "cat", "dog"], "prompt_names": ["sky", "road", "person", "cat", "dog"],
            "seen": [0, 1, 2], "unseen": [3, 4], "ignore_index": 255},
    "cam": {"dataset": "toy2", "names": ["a", "b", "c"], "prompt_names": ["a", "b", "c"],
            "seen": [0], "unseen": [1, 2], "ignore_index": 255},
}
# (set, image sizes): sizes differ inside a batch; labels are never resized
SIZES = {"val": [(20, 30), (24, 28), (20, 30), (18, 40), (26, 26)], "cam": [(16, 24), (22, 18), (16, 24)]}


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
    from zeroseg.models import build_segmenter, save_segmenter
    from zeroseg.models.clip import load_clip

    root = tmp_path_factory.mktemp("evaluate_inputs")
    rng = np.random.default_rng(0)
    bs, et, tc = root / "build_splits", root / "embed_text", root / "train_classifier"
    for d in (bs / "manifests", et / "embeddings", tc):
        d.mkdir(parents=True)
    classes = {"train": {**VOCABS["val"], "names": ["sky", "road", "person"], "prompt_names": ["sky", "road", "person"],
                         "seen": [0, 1, 2], "unseen": []},
               "eval": VOCABS}
    (bs / "classes.json").write_text(json.dumps(classes))
    rows = {}
    for s, sizes in SIZES.items():
        c = len(VOCABS[s]["names"])
        (bs / "labels" / s).mkdir(parents=True)
        (root / "images" / s).mkdir(parents=True)
        recs = []
        for i, (h, w) in enumerate(sizes):
            lab = _labels(rng, h, w, c)
            img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            ip, lp = root / "images" / s / f"{i}.png", bs / "labels" / s / f"{i}.png"
            Image.fromarray(img).save(ip)
            Image.fromarray(lab, mode="L").save(lp)
            recs.append({"image_id": f"{s}{i}", "image_uri": str(ip), "label_uri": str(lp), "height": h, "width": w,
                         "classes": sorted(int(x) for x in np.unique(lab) if x != 255), "dataset": s})
        schema = pa.schema([("image_id", pa.string()), ("image_uri", pa.string()), ("label_uri", pa.string()),
                            ("height", pa.int32()), ("width", pa.int32()), ("classes", pa.list_(pa.int32())),
                            ("dataset", pa.string())])
        pq.write_table(pa.Table.from_pylist(recs, schema=schema), bs / "manifests" / f"{s}.parquet")
        rows[s] = recs
        emb = rng.standard_normal((c, 64)).astype(np.float32)
        np.save(et / "embeddings" / f"{s}.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    seg = build_segmenter("maskclip", load_clip(TINY), {"input_size": INPUT})
    save_segmenter(tc, "maskclip", TINY, seg.cfg, {"size": INPUT, "mean": list(seg.mean), "std": list(seg.std)})
    return {"root": root, "bs": bs, "et": et, "tc": tc, "rows": rows}


def _art(stage, path):
    return Artifact(stage, stage[0] * 64, Path(path), str(path), {"files": []})


def _ctx(inputs, out, config, run_id=None, et=None):
    out.mkdir(parents=True, exist_ok=True)
    arts = {"build_splits": _art("build_splits", inputs["bs"]), "embed_text": _art("embed_text", et or inputs["et"]),
            "train_classifier": _art("train_classifier", inputs["tc"])}
    return StageContext("evaluate", "f" * 64, config, arts, out, out.parent, str(out.parent / "_train"), "evaluate-fff",
                        mlflow_run_id=run_id, log=lambda *_: None)


def _conf(**kw):
    from stages.evaluate import EvaluateConfig

    return EvaluateConfig(**kw)


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
        img = np.asarray(Image.open(r["image_uri"]).convert("RGB"))
        lab = np.asarray(Image.open(r["label_uri"]))
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        x = (F.interpolate(x, size=INPUT, mode="bilinear", align_corners=False, antialias=True) - mean) / std
        with torch.no_grad():
            sc = F.interpolate(seg(x, emb), size=lab.shape, mode="bilinear", align_corners=False)[0]
        p = torch.softmax(sc, 0)
        p[v["seen"]] -= gamma
        gz += confusion_matrix(p.argmax(0).numpy(), lab, c)
        pu = sc[unseen].argmax(0).numpy()
        for k, cls in enumerate(unseen):
            zs[k] += np.bincount(pu[lab == cls], minlength=len(unseen))
    return gz, zs


# One Ray run for the whole module (actor start-up dominates: ~10-20 s on a loaded 2-core box):
# both sets named in reverse order, max_images, seen-class calibration, batches of 2.
MAX_IMAGES, GAMMA = 4, 0.3
N_IMAGES = {s: min(MAX_IMAGES, len(v)) for s, v in SIZES.items()}  # val 4 of 5, cam 3


@pytest.fixture(scope="module")
def full_run(inputs, ray_one_cpu):
    from stages.evaluate import Evaluate

    out = inputs["root"] / "out_full"
    conf = _conf(sets=["cam", "val"], max_images=MAX_IMAGES, gamma=GAMMA, batch_size=2, device="auto")
    metrics = Evaluate().run(_ctx(inputs, out, conf))
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
        assert got["images"] == n and got["pixels"] == sum(h * w for h, w in SIZES[s][:n]) and got["gamma"] == GAMMA
        ref = segmentation_metrics(gz, VOCABS[s]["seen"], VOCABS[s]["unseen"])
        for k, v in ref.summary().items():
            if np.isfinite(v):  # NaN (e.g. no unseen class present) -> null in JSON, left out of the dict
                assert got["gzs3"][k] == pytest.approx(v) and metrics[f"{s}/{k}"] == pytest.approx(v), k
                assert 0.0 <= v <= 100.0
            else:
                assert got["gzs3"][k] is None and f"{s}/{k}" not in metrics
        assert [r["name"] for r in got["gzs3"]["per_class"]] == VOCABS[s]["names"]
        assert sum(r["gt_pixels"] for r in got["gzs3"]["per_class"]) == int(gz.sum())
        zref = zs.diagonal().sum() / zs.sum() * 100
        assert got["zs3"]["pAcc"] == pytest.approx(zref) and metrics[f"{s}/zs3_pAcc"] == pytest.approx(zref)
        zm = zs3_metrics(zs)["mIoU"]
        if np.isfinite(zm):
            assert got["zs3"]["mIoU"] == pytest.approx(zm) and metrics[f"{s}/zs3_mIoU"] == pytest.approx(zm)
        else:
            assert got["zs3"]["mIoU"] is None and f"{s}/zs3_mIoU" not in metrics
        md = (out / f"per_class_{s}.md").read_text()
        assert "| id | class | split | IoU (%) | Acc (%) | GT pixels" in md and VOCABS[s]["names"][-1] in md
        assert (out / f"per_class_iou_{s}.png").read_bytes()[:4] == b"\x89PNG"
    assert set(metrics) >= {"val/pAcc", "val/mIoU", "cam/pAcc", "fps"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())


def test_fps_record(full_run):
    out, metrics = full_run
    fps = json.loads((out / "fps.json").read_text())
    p = fps["protocol"]
    assert p["batch_size"] == 2 and p["resolution"] == INPUT and p["device"] == "cpu"
    assert p["warmup_batches_excluded_per_worker"] == 1 and p["concurrency"] == 1
    # one actor, 7 images in batches of <= 2: the first batch is warm-up
    total = sum(N_IMAGES.values())
    timed = fps["overall"]["images_timed"]
    assert 0 < timed <= total - 1 and fps["overall"]["images_per_s"] > 0 and fps["overall"]["megapixels_per_s"] > 0
    assert sum(v["images"] for v in fps["sets"].values()) == total == fps["end_to_end"]["images"]
    assert metrics["fps"] == pytest.approx(fps["overall"]["images_per_s"])
    # the driver's summary prints this key (it has no "<set>/" prefix, so it is not in the table)
    from pipeline.run import fps_line

    assert fps_line(metrics).startswith(f"FPS: {metrics['fps']:.2f} images/s")


def test_worker_matches_reference_without_ray(inputs):
    """The worker in-process (real MaskCLIP): all of cam in one batch, no calibration."""
    from stages.evaluate import EvalWorker, load_eval_sets

    sets = load_eval_sets(_ctx(inputs, inputs["root"] / "o_w", _conf()), ["cam"])
    ws = {"cam": {k: sets["cam"][k] for k in ("embeddings", "seen", "unseen", "ignore_index")}}
    w = EvalWorker(str(inputs["tc"]), ws, gamma=0.0, device="cpu", resolution=None, warmup_batches=0)
    rows = inputs["rows"]["cam"]
    out = w({"eval_set": np.array(["cam"] * len(rows), dtype=object),
             "image_uri": np.array([r["image_uri"] for r in rows], dtype=object),
             "label_uri": np.array([r["label_uri"] for r in rows], dtype=object)})
    gz, zs = _reference(inputs, "cam")
    np.testing.assert_array_equal(np.frombuffer(out["gzs3"][0], np.int64).reshape(3, 3), gz)
    np.testing.assert_array_equal(np.frombuffer(out["zs3"][0], np.int64).reshape(2, 2), zs)
    assert out["timed"][0] and out["images"][0] == 3 and (out["height"][0], out["width"][0]) == tuple(INPUT)


class _Oracle(Segmenter):
    """Reads the class id back from the image (red channel = 20 * id): perfect scores at the
    input resolution, which equals the label resolution (no resampling blur)."""

    def __init__(self, size):
        super().__init__()
        self.input_size, self.mean, self.std = size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images, text):
        ids = torch.round(images[:, 0] * 255 / 20).long()
        return F.one_hot(ids, text.shape[0]).permute(0, 3, 1, 2).float() * 5.0


def test_worker_with_oracle_segmenter_scores_100(tmp_path, monkeypatch):
    import zeroseg.models
    from stages.evaluate import EvalWorker

    size, c = (12, 16), 4
    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": _Oracle(size))
    rng = np.random.default_rng(1)
    uris, labs = [], []
    for i in range(3):
        lab = _labels(rng, *size, c)
        img = np.zeros((*size, 3), np.uint8)
        img[..., 0] = np.where(lab == 255, 0, lab * 20)
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        Image.fromarray(lab, mode="L").save(tmp_path / f"l{i}.png")
        uris.append((str(tmp_path / f"i{i}.png"), str(tmp_path / f"l{i}.png")))
        labs.append(lab)
    sets = {"s": {"embeddings": np.eye(c, 8, dtype=np.float32), "seen": [0, 1], "unseen": [2, 3], "ignore_index": 255}}
    w = EvalWorker("unused", sets, gamma=0.0, device="cpu", resolution=None, warmup_batches=1)
    out = w({"eval_set": np.array(["s"] * 3, dtype=object), "image_uri": np.array([u for u, _ in uris], dtype=object),
             "label_uri": np.array([v for _, v in uris], dtype=object)})
    assert list(out["eval_set"]) == ["s"] and not out["timed"][0] and out["images"][0] == 3
    gz = np.frombuffer(out["gzs3"][0], np.int64).reshape(c, c)
    zs = np.frombuffer(out["zs3"][0], np.int64).reshape(2, 2)
    valid = sum(int((lab != 255).sum()) for lab in labs)
    assert gz.sum() == valid and np.count_nonzero(gz - np.diag(np.diag(gz))) == 0
    m = segmentation_metrics(gz, [0, 1], [2, 3])
    assert m.mIoU == m.mIoU_seen == m.mIoU_unseen == m.hIoU == m.pAcc == 100.0
    assert zs3_metrics(zs)["mIoU"] == 100.0
    # second call: timed
    assert w({"eval_set": np.array(["s"], dtype=object), "image_uri": np.array([uris[0][0]], dtype=object),
              "label_uri": np.array([uris[0][1]], dtype=object)})["timed"][0]
    # a label value out of range names the file
    Image.fromarray(np.full(size, 9, np.uint8), mode="L").save(tmp_path / "bad.png")
    with pytest.raises(DataError, match=r"bad\.png.*ground-truth value 9"):
        w({"eval_set": np.array(["s"], dtype=object), "image_uri": np.array([uris[0][0]], dtype=object),
           "label_uri": np.array([str(tmp_path / "bad.png")], dtype=object)})


def test_input_errors(inputs, tmp_path):
    from stages.evaluate import load_eval_sets

    with pytest.raises(ConfigError, match=r"unknown eval set 'cma'; did you mean 'cam'"):
        load_eval_sets(_ctx(inputs, tmp_path / "o1", _conf()), ["cma"])
    # embeddings missing for a set
    et = tmp_path / "et"
    (et / "embeddings").mkdir(parents=True)
    np.save(et / "embeddings" / "val.npy", np.load(inputs["et"] / "embeddings" / "val.npy"))
    with pytest.raises(DataError, match=r"eval set 'cam' has no text embeddings.*embeddings/cam\.npy"):
        load_eval_sets(_ctx(inputs, tmp_path / "o2", _conf(), et=et), None)
    # wrong row count
    np.save(et / "embeddings" / "cam.npy", np.ones((4, 64), np.float32))
    with pytest.raises(DataError, match=r"eval set 'cam': embeddings/cam\.npy has 4 rows.*lists 3 classes"):
        load_eval_sets(_ctx(inputs, tmp_path / "o3", _conf(), et=et), None)
    sets = load_eval_sets(_ctx(inputs, tmp_path / "o4", _conf()), None)
    assert list(sets) == ["val", "cam"] and sets["val"]["unseen"] == [3, 4] and sets["cam"]["embeddings"].shape == (3, 64)


def test_config_schema():
    from stages.evaluate import Evaluate, EvaluateConfig

    assert Evaluate.name == "evaluate" and Evaluate.needs == ("build_splits", "embed_text", "train_classifier")
    c = EvaluateConfig()
    assert (c.sets, c.batch_size, c.gamma, c.device, c.num_gpus_per_worker, c.concurrency, c.warmup_batches,
            c.max_images, c.resolution) == (None, 4, 0.0, "auto", None, 1, 1, None, None)
    for bad in ({"gama": 0.1}, {"device": "tpu"}, {"batch_size": 0}, {"resolution": [224]}, {"gamma": -1}):
        (field,) = bad
        with pytest.raises(pydantic.ValidationError, match=rf"(?m)^{field}\b"):  # the error names the field
            EvaluateConfig(**bad)


def test_mlflow_helper(tmp_path, monkeypatch):
    import types

    import mlflow

    from stages.evaluate import log_to_mlflow

    calls = []
    monkeypatch.setattr(mlflow, "log_metrics", lambda m: calls.append(("metrics", m)))
    monkeypatch.setattr(mlflow, "log_artifacts", lambda d: calls.append(("artifacts", d)))
    monkeypatch.setattr(mlflow, "active_run", lambda: types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1")))
    log_to_mlflow(None, {"a": 1.0}, tmp_path)  # no run id: skipped
    assert calls == []
    log_to_mlflow("r1", {"val/iou/traffic light": 12.5, "val/iou/x": float("nan"), "val/iou/a:b": 1}, tmp_path)
    assert calls == [("metrics", {"val/iou/traffic light": 12.5, "val/iou/a_b": 1.0}), ("artifacts", str(tmp_path))]
    # another run than the active one: the client API, in batches of 1000 (MLflow's limit)
    batches, arts = [], []

    class Client:
        def log_batch(self, run_id, metrics):
            batches.append((run_id, len(metrics)))

        def log_artifacts(self, run_id, d):
            arts.append((run_id, d))

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    log_to_mlflow("r2", {f"val/iou/c{i}": float(i) for i in range(2500)}, tmp_path)
    assert batches == [("r2", 1000), ("r2", 1000), ("r2", 500)] and arts == [("r2", str(tmp_path))]
    assert len(calls) == 2  # nothing more through the fluent API
