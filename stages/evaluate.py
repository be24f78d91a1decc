"""Stage ``evaluate``: run the segmenter over every evaluation set and score it (GZS3 and ZS3).

Reads ``classes.json`` and ``manifests/<set>.parquet`` of build_splits, ``embeddings/<set>.npy``
of embed_text and the segmenter artifact of train_classifier. One Ray Data pass over all the
selected sets::

    read_manifest(manifests/<set>.parquet) (+ set column), per set -> union -> materialize
      -> map_batches(EvalWorker, compute=ActorPoolStrategy(size=concurrency), batch_size=...)

``EvalWorker`` (a callable class: the segmenter is loaded once per actor) decodes each image and
label PNG, resizes the image to the segmenter's ``input_size`` (or ``resolution``), normalises it
with the segmenter's mean/std, runs ``segmenter(images, text_embeddings)``, upsamples each image's
scores bilinearly to *its label's* size (labels are never resized) and returns the batch's GZS3
``[C, C]`` and ZS3 ``[U, U]`` confusion matrices (``zeroseg.metrics.gzs3_zs3_confusion``, on the
worker's device) plus timings. Nothing of size H x W returns to the driver, which sums the
matrices and computes the metrics (percent; conventions in ``zeroseg.metrics``).

Writes ``metrics.json``, ``per_class_<set>.md``, ``per_class_iou_<set>.png`` and ``fps.json``;
returns ``{"<set>/hIoU": .., "<set>/mIoU_seen": .., ..., "fps": ..}`` (finite values only).

FPS protocol (``fps.json``): per worker, the first ``warmup_batches`` batches are not timed; a
timed batch counts the seconds from decoded host arrays to the confusion matrices back on the host
(host-to-device copy, resize + normalise, segmenter forward, bilinear upsampling, calibrated argmax,
bincount; the final device-to-host copy synchronises CUDA). Image decoding is timed separately.
``megapixels_per_s`` counts the original images' pixels (= label pixels).

Wiring only; the science is in ``zeroseg.metrics`` and ``zeroseg.models``.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from pipeline.dag import Stage, StageConfig, StageContext, register
from zeroseg.data.transforms import Size
from zeroseg.errors import ConfigError, DataError, ZerosegError

MANIFEST_COLUMNS = ["image_id", "image_uri", "label_uri"]
SET_COLUMN = "eval_set"


class EvaluateConfig(StageConfig):
    """``evaluate`` config section.

    ``sets``: eval sets of ``classes.json`` to score (default: all). ``gamma``: seen-class
    calibration (ZegFormer Eq. 2, subtracted from softmax probabilities; 0 = none).
    ``device``: ``auto`` (cuda when the Ray cluster has GPUs), ``cpu``, ``cuda`` or ``cuda:N``.
    ``num_gpus_per_worker``: GPUs reserved per inference actor (default: 1 on cuda, 0 on cpu).
    ``concurrency``: number of inference actors. ``warmup_batches``: batches per actor left out of
    the FPS timing. ``max_images``: first N images of each set only. ``resolution``: ``[H, W]``
    to resize images to instead of the segmenter's ``input_size``.
    """

    sets: list[str] | None = None
    batch_size: int = Field(4, ge=1)
    gamma: float = Field(0.0, ge=0.0)
    device: str = "auto"
    num_gpus_per_worker: float | None = Field(None, ge=0.0)
    concurrency: int = Field(1, ge=1)
    warmup_batches: int = Field(1, ge=0)
    max_images: int | None = Field(None, ge=1)
    resolution: Size | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


# =============================================================================================
# the inference actor (runs inside Ray Data)
# =============================================================================================
class EvalWorker:
    """``map_batches`` callable class: images + labels -> per-batch confusion matrices.

    Args:
        segmenter_dir: the train_classifier artifact (``zeroseg.models.load_segmenter``).
        sets: ``{set: {"embeddings": float32 [C, D], "seen": [...], "unseen": [...],
            "ignore_index": int}}``.
        gamma: GZS3 seen-class calibration (ZegFormer Eq. 2).
        device: torch device string.
        resolution: ``(H, W)`` override of the segmenter's ``input_size``, or None.
        warmup_batches: this actor's first batches flagged untimed.

    A call takes a numpy batch with columns ``eval_set``, ``image_uri``, ``label_uri`` and returns
    one row per eval set present in the batch: ``eval_set``, ``gzs3`` / ``zs3`` (int64 matrices as
    bytes), ``images``, ``pixels``, ``decode_s``, ``compute_s``, ``timed``, ``device``,
    ``height``, ``width``.

    Raises:
        DataError: an undecodable image or label, or a label value outside the set's class ids
            (naming the label file); a score tensor with another class count than the set's.
    """

    def __init__(self, segmenter_dir: str, sets: dict[str, dict[str, Any]], gamma: float, device: str,
                 resolution: tuple[int, int] | None, warmup_batches: int) -> None:
        import torch

        from zeroseg.models import load_segmenter

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"evaluate.device {device!r}: this worker has no CUDA device "
                              "(set evaluate.device: cpu, or give the workers GPUs)")
        self.device = torch.device(device)
        self.seg = load_segmenter(segmenter_dir, device=self.device)
        self.size = tuple(int(s) for s in (resolution or self.seg.input_size))
        self.mean = torch.tensor(self.seg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.seg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.sets = {}
        for name, s in sets.items():
            text = np.array(s["embeddings"], dtype=np.float32, copy=True)  # object-store arrays are read-only
            self.sets[name] = {**s, "text": torch.from_numpy(text).to(self.device)}
        self.gamma = float(gamma)
        self.warmup = int(warmup_batches)
        self.calls = 0
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timed = self.calls >= self.warmup
        self.calls += 1
        names = [str(s) for s in batch[SET_COLUMN]]
        rows: dict[str, list[Any]] = {k: [] for k in ("gzs3", "zs3", "images", "pixels", "decode_s", "compute_s")}
        order = list(dict.fromkeys(names))
        for name in order:
            idx = [i for i, n in enumerate(names) if n == name]
            out = self._run_set(name, [str(batch["image_uri"][i]) for i in idx], [str(batch["label_uri"][i]) for i in idx])
            for k, v in out.items():
                rows[k].append(v)
        n = len(order)
        return {
            SET_COLUMN: np.array(order, dtype=object),
            "gzs3": np.array(rows["gzs3"], dtype=object),
            "zs3": np.array(rows["zs3"], dtype=object),
            "images": np.array(rows["images"], dtype=np.int64),
            "pixels": np.array(rows["pixels"], dtype=np.int64),
            "decode_s": np.array(rows["decode_s"], dtype=np.float64),
            "compute_s": np.array(rows["compute_s"], dtype=np.float64),
            "timed": np.full(n, timed),
            "device": np.array([self.device_name] * n, dtype=object),
            "height": np.full(n, self.size[0], dtype=np.int64),
            "width": np.full(n, self.size[1], dtype=np.int64),
        }

    def _run_set(self, name: str, image_uris: list[str], label_uris: list[str]) -> dict[str, Any]:
        import torch
        import torch.nn.functional as F

        from pipeline.datasets import decode_pair
        from zeroseg.metrics import gzs3_zs3_confusion

        s = self.sets[name]
        t0 = time.perf_counter()
        images, labels = [], []
        for img_uri, lbl_uri in zip(image_uris, label_uris):
            try:
                image, label = decode_pair(img_uri, lbl_uri)
            except DataError as e:
                raise DataError(f"eval set {name!r}: {e}") from None
            images.append(image)
            labels.append(label)
        t1 = time.perf_counter()
        c, u = int(s["text"].shape[0]), len(s["unseen"])
        with torch.inference_mode():
            x = torch.cat([self._prepare(im) for im in images])
            scores = self.seg(x, s["text"])
            if scores.ndim != 4 or scores.shape[0] != len(images) or scores.shape[1] != c:
                raise DataError(f"the segmenter returned scores {tuple(scores.shape)} for {len(images)} images and "
                                f"{c} classes of eval set {name!r}; expected [B, C, h, w] = [{len(images)}, {c}, h, w]")
            gz = torch.zeros((c, c), dtype=torch.int64, device=self.device)
            zs = torch.zeros((u, u), dtype=torch.int64, device=self.device)
            for i, (lab, uri) in enumerate(zip(labels, label_uris)):
                lab_t = torch.from_numpy(_writable(lab)).to(self.device)
                sc = scores[i: i + 1].float()
                if tuple(sc.shape[-2:]) != lab.shape:
                    sc = F.interpolate(sc, size=lab.shape, mode="bilinear", align_corners=False)
                try:
                    g, z = gzs3_zs3_confusion(sc, lab_t[None], s["seen"], s["unseen"], self.gamma, s["ignore_index"],
                                              probabilities=self.seg.scores_are_probabilities)
                except ValueError as e:
                    raise DataError(f"label {uri} (eval set {name!r}, {c} classes): {e}") from None
                gz += g
                zs += z
            gz_np, zs_np = gz.cpu().numpy(), zs.cpu().numpy()  # synchronises CUDA
        t2 = time.perf_counter()
        return {"gzs3": gz_np.astype(np.int64).tobytes(), "zs3": zs_np.astype(np.int64).tobytes(),
                "images": len(images), "pixels": int(sum(lab.size for lab in labels)),
                "decode_s": t1 - t0, "compute_s": t2 - t1}

    def _prepare(self, image: np.ndarray):
        """``uint8 [H, W, 3]`` -> normalised float ``[1, 3, *size]`` on the device."""
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(_writable(image)).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


def _writable(a: np.ndarray) -> np.ndarray:
    """``a`` itself when torch can wrap it (PIL arrays are read-only), else a contiguous copy."""
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C")


# =============================================================================================
# driver side
# =============================================================================================
def load_eval_sets(ctx: StageContext, wanted: list[str] | None) -> dict[str, dict[str, Any]]:
    """The eval sets to score, with their vocabulary, split, embeddings and manifest path.

    Returns:
        ``{set: {"names", "seen", "unseen", "ignore_index", "embeddings" float32 [C, D],
        "manifest" path}}`` in ``wanted`` order (default: classes.json order).

    Raises:
        ConfigError: an unknown set name in ``evaluate.sets`` (naming the nearest and all sets).
        DataError: no eval sets; a set without its embedding file (naming set and file) or with a
            row count other than its class count (naming both counts); a bad seen/unseen split.
    """
    from zeroseg.metrics import check_split

    classes_path = ctx.inputs["build_splits"].file("classes.json")
    evals = (json.loads(classes_path.read_text()).get("eval") or {})
    if not evals:
        raise DataError(f"{classes_path} lists no eval sets: nothing to evaluate (configure build_splits.eval "
                        "or a validation fraction)")
    names = list(wanted) if wanted else list(evals)
    for n in names:
        if n not in evals:
            near = difflib.get_close_matches(n, list(evals), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"evaluate.sets: unknown eval set {n!r}{hint} (eval sets: {', '.join(evals)})")
    out: dict[str, dict[str, Any]] = {}
    for n in names:
        v = evals[n]
        cls_names = list(v["names"])
        rel = f"embeddings/{n}.npy"
        try:
            emb_path = ctx.inputs["embed_text"].file(rel)
        except FileNotFoundError as e:
            raise DataError(f"eval set {n!r} has no text embeddings: {e}") from None
        emb = np.load(emb_path, allow_pickle=False)
        if emb.ndim != 2 or emb.shape[0] != len(cls_names):
            raise DataError(f"eval set {n!r}: {rel} has {emb.shape[0] if emb.ndim else 0} rows (shape {emb.shape}) but "
                            f"classes.json lists {len(cls_names)} classes for it; re-run embed_text")
        try:
            seen, unseen = check_split(v.get("seen", []), v.get("unseen", []), len(cls_names))
        except ValueError as e:
            raise DataError(f"{classes_path}: eval set {n!r}: {e}") from None
        out[n] = {"names": cls_names, "seen": seen, "unseen": unseen,
                  "ignore_index": int(v.get("ignore_index", 255)), "embeddings": emb.astype(np.float32),
                  "manifest": ctx.inputs["build_splits"].file(f"manifests/{n}.parquet")}
    return out


def resolve_device(cfg: EvaluateConfig) -> tuple[str, float]:
    """``(torch device string, GPUs per worker)`` from the config and the Ray cluster.

    Raises:
        ConfigError: GPUs requested but the cluster has none (the actors would never start).
    """
    import ray

    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if cluster_gpus > 0 else "cpu")
    gpus = cfg.num_gpus_per_worker if cfg.num_gpus_per_worker is not None else (1.0 if device.startswith("cuda") else 0.0)
    if gpus > 0 and cluster_gpus == 0:
        raise ConfigError(f"evaluate asks for {gpus:g} GPU(s) per worker (device {device!r}) but the Ray cluster has "
                          "no GPUs; set evaluate.device: cpu")
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError("evaluate.device is cuda but evaluate.num_gpus_per_worker is 0: Ray would hide the GPUs "
                          "from the workers; set it > 0")
    return device, float(gpus)


def _dataset(sets: dict[str, dict[str, Any]], max_images: int | None):
    from pipeline.datasets import read_manifest

    parts = []
    for name, s in sets.items():
        ds = read_manifest(s["manifest"], columns=MANIFEST_COLUMNS)
        if max_images is not None:
            ds = ds.limit(max_images)
        ds = ds.map_batches(_add_set_column, fn_kwargs={"name": name}, batch_format="numpy", batch_size=None)
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # materialised first (a few rows per image): the read tasks never wait for a CPU held by an actor
    return ds.materialize()


def _add_set_column(batch: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    n = len(batch["image_uri"])
    return {**batch, SET_COLUMN: np.array([name] * n, dtype=object)}


def _user_error(e: BaseException) -> ZerosegError | None:
    from pipeline.training import _find_user_error

    return _find_user_error(e)


def log_to_mlflow(run_id: str | None, metrics: dict[str, float], output_dir: Path) -> None:
    """Log ``metrics`` and every file of ``output_dir`` to MLflow run ``run_id``; nothing when
    ``run_id`` is None. Uses the tracking URI the driver set; non-finite values are skipped
    (``pipeline.tracking.log_metrics``, batched for MLflow's 1000-metric limit)."""
    if not run_id:
        return
    from pipeline import tracking

    tracking.log_metrics(metrics, run_id=run_id)
    tracking.log_artifacts(output_dir, run_id=run_id)


@register
class Evaluate(Stage):
    """GZS3 / ZS3 evaluation of the segmenter on every eval set (see module docstring)."""

    name = "evaluate"
    version = "1"
    needs = ("build_splits", "embed_text", "train_classifier")
    Config = EvaluateConfig

    def run(self, ctx: StageContext) -> dict[str, float]:
        import ray

        from zeroseg.metrics import json_safe, per_class_table, segmentation_metrics, zs3_metrics
        from zeroseg.plots import plot_per_class_iou

        cfg: EvaluateConfig = ctx.config
        if not ray.is_initialized():  # the driver (pipeline/run.py) normally initialises Ray
            raise RuntimeError("evaluate needs an initialised Ray (ray.init) before run()")
        sets = load_eval_sets(ctx, cfg.sets)
        device, gpus = resolve_device(cfg)
        seg_dir = str(ctx.inputs["train_classifier"].path)
        worker_sets = {n: {k: s[k] for k in ("embeddings", "seen", "unseen", "ignore_index")} for n, s in sets.items()}

        t0 = time.perf_counter()
        ds = _dataset(sets, cfg.max_images)
        counts = {n: np.zeros((len(s["names"]),) * 2, np.int64) for n, s in sets.items()}
        ucounts = {n: np.zeros((len(s["unseen"]),) * 2, np.int64) for n, s in sets.items()}
        timing = {n: {"images": 0, "pixels": 0, "images_timed": 0, "pixels_timed": 0, "seconds_timed": 0.0,
                      "decode_seconds": 0.0} for n in sets}
        devices, size = set(), None
        out = ds.map_batches(
            EvalWorker,
            fn_constructor_kwargs={"segmenter_dir": seg_dir, "sets": worker_sets, "gamma": cfg.gamma, "device": device,
                                   "resolution": tuple(cfg.resolution) if cfg.resolution else None,
                                   "warmup_batches": cfg.warmup_batches},
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            batch_size=cfg.batch_size, batch_format="numpy", num_gpus=gpus or None, num_cpus=1,
        )
        try:
            for b in out.iter_batches(batch_size=None, batch_format="numpy"):
                for j, name in enumerate(b[SET_COLUMN]):
                    name = str(name)
                    c, u = counts[name].shape[0], ucounts[name].shape[0]
                    counts[name] += np.frombuffer(b["gzs3"][j], np.int64).reshape(c, c)
                    ucounts[name] += np.frombuffer(b["zs3"][j], np.int64).reshape(u, u)
                    t = timing[name]
                    t["images"] += int(b["images"][j])
                    t["pixels"] += int(b["pixels"][j])
                    t["decode_seconds"] += float(b["decode_s"][j])
                    if bool(b["timed"][j]):
                        t["images_timed"] += int(b["images"][j])
                        t["pixels_timed"] += int(b["pixels"][j])
                        t["seconds_timed"] += float(b["compute_s"][j])
                    devices.add(str(b["device"][j]))
                    size = [int(b["height"][j]), int(b["width"][j])]
        except Exception as e:  # noqa: BLE001 - a user error inside a worker is re-raised as itself
            user = _user_error(e)
            if user is not None:
                raise user from None
            raise
        pass_seconds = time.perf_counter() - t0

        result: dict[str, float] = {}
        doc: dict[str, Any] = {}
        log_extra: dict[str, float] = {}
        for name, s in sets.items():
            if timing[name]["images"] == 0:
                raise DataError(f"eval set {name!r}: its manifest {s['manifest']} has no images")
            m = segmentation_metrics(counts[name], s["seen"], s["unseen"])
            z = zs3_metrics(ucounts[name])
            doc[name] = {
                "images": timing[name]["images"], "pixels": timing[name]["pixels"], "gamma": cfg.gamma,
                "gzs3": {**m.summary(), "per_class": m.per_class(s["names"]),
                         "confusion_matrix": counts[name].tolist()},
                "zs3": {"mIoU": z["mIoU"], "pAcc": z["pAcc"], "mAcc": z["mAcc"],
                        "per_class": [{"id": cid, "name": s["names"][cid], "iou": iou}
                                      for cid, iou in zip(s["unseen"], z["iou"])]},
            }
            for k, v in m.summary().items():
                result[f"{name}/{k}"] = v
            result[f"{name}/zs3_mIoU"], result[f"{name}/zs3_pAcc"] = z["mIoU"], z["pAcc"]
            for row in m.per_class(s["names"]):
                if row["iou"] is not None:
                    log_extra[f"{name}/iou/{row['name']}"] = row["iou"]
            title = f"{name}: per-class IoU (GZS3{f', gamma={cfg.gamma:g}' if cfg.gamma else ''})"
            (Path(ctx.output_dir) / f"per_class_{name}.md").write_text(
                f"# {name}: per-class GZS3 results (percent)\n\n"
                + " | ".join(f"{k} {v:.2f}" if math.isfinite(v) else f"{k} n/a" for k, v in m.summary().items())
                + f"\n\nimages {timing[name]['images']}, gamma {cfg.gamma:g}; IoU n/a = class absent from ground "
                  "truth and prediction (excluded from means)\n\n" + per_class_table(m, s["names"]))
            plot_per_class_iou(m.iou, s["names"], s["seen"], s["unseen"],
                               Path(ctx.output_dir) / f"per_class_iou_{name}.png", title=title, summary=m.summary())

        fps = _fps_record(cfg, timing, devices, size, gpus, pass_seconds)
        if fps["overall"]["images_per_s"] is not None:
            result["fps"] = fps["overall"]["images_per_s"]
        (Path(ctx.output_dir) / "metrics.json").write_text(json.dumps(json_safe(doc), indent=1) + "\n")
        (Path(ctx.output_dir) / "fps.json").write_text(json.dumps(json_safe(fps), indent=2) + "\n")
        result = {k: float(v) for k, v in result.items() if math.isfinite(v)}
        for name in sets:
            ctx.log(f"{name}: " + ", ".join(f"{k.split('/', 1)[1]}={v:.2f}" for k, v in result.items()
                                           if k.startswith(name + "/")))
        ctx.log(f"{fps['overall']['images_timed']} images timed on {fps['protocol']['device']}: "
                f"{fps['overall']['images_per_s'] or float('nan'):.2f} images/s")
        # the driver logs the returned summary metrics; the stage adds per-class IoU and its files
        log_to_mlflow(ctx.mlflow_run_id, log_extra, Path(ctx.output_dir))
        return result


def _fps_record(cfg: EvaluateConfig, timing: dict[str, dict[str, Any]], devices: set[str], size: list[int] | None,
                gpus: float, pass_seconds: float) -> dict[str, Any]:
    def rates(images: int, pixels: int, seconds: float) -> dict[str, Any]:
        ok = images > 0 and seconds > 0
        return {"images_timed": images, "seconds_timed": seconds,
                "images_per_s": images / seconds if ok else None,
                "megapixels_per_s": pixels / seconds / 1e6 if ok else None}

    per_set = {n: {"images": t["images"], "decode_seconds": t["decode_seconds"],
                   **rates(t["images_timed"], t["pixels_timed"], t["seconds_timed"])} for n, t in timing.items()}
    overall = rates(sum(t["images_timed"] for t in timing.values()), sum(t["pixels_timed"] for t in timing.values()),
                    sum(t["seconds_timed"] for t in timing.values()))
    total_images = sum(t["images"] for t in timing.values())
    return {
        "protocol": {
            "batch_size": cfg.batch_size, "resolution": size, "device": ", ".join(sorted(devices)) or "none",
            "num_gpus_per_worker": gpus, "concurrency": cfg.concurrency,
            "warmup_batches_excluded_per_worker": cfg.warmup_batches,
            "timed": "decoded host arrays -> confusion matrices on the host: host-to-device copy, resize + "
                     "normalise, segmenter forward, bilinear upsampling to label size, calibrated argmax, "
                     "bincount (CUDA synchronised by the device-to-host copy); image decoding excluded",
            "megapixels": "original image (= label) pixels",
            "note": "images_per_s is summed over all workers' timed seconds: with concurrency > 1 it is the "
                    "per-worker rate, not the aggregate",
        },
        "sets": per_set,
        "overall": overall,
        "end_to_end": {"images": total_images, "seconds": pass_seconds,
                       "images_per_s": total_images / pass_seconds if pass_seconds > 0 else None,
                       "includes": "manifest read, actor start-up, model load, decoding, inference"},
    }


__all__ = ["EvalWorker", "Evaluate", "EvaluateConfig", "load_eval_sets", "log_to_mlflow", "resolve_device"]
