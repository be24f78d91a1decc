"""Stage ``evaluate``: run a segmenter over every evaluation set and score it (GZS3 and ZS3).

Reads ``classes.json`` and ``manifests/<set>.parquet`` of build_splits (``splits``),
``embeddings/<set>.npy`` of embed_text (``text``) and a segmenter artifact (``model``: of
train_classifier, or of train_generator / self_train when the config has them; set
``evaluate.model`` when it has several). One batch-inference pass (``pipeline.inference``) over
all selected sets::

    manifest rows of every set (+ set column) -> ray.data.from_arrow
      -> actor pool of SegmenterPredictor (the model loaded once per actor)
      -> GZS3Evaluator partial states, merged on the driver

:class:`SegmenterPredictor` decodes each image and label PNG, resizes the image to the
segmenter's ``input_size`` (or ``resolution``), normalises it with the segmenter's mean/std and
runs ``segmenter(images, text_embeddings)``; ``zeroseg.evaluation.GZS3Evaluator`` upsamples each
image's scores bilinearly to *its label's* size (labels are never resized) and counts the GZS3
``[C, C]`` and ZS3 ``[U, U]`` confusion matrices. Nothing of size H x W returns to the driver,
which computes the metrics (percent; conventions in ``zeroseg.metrics``).

Writes ``metrics.json``, ``per_class_<set>.md``, ``per_class_iou_<set>.png`` and ``fps.json``;
returns ``{"<set>/hIoU": .., "<set>/mIoU_seen": .., ..., "fps": ..}`` (finite values only).

FPS protocol (``fps.json``): per actor, the first ``warmup_batches`` batches are not timed; a
timed batch counts the seconds from decoded host arrays to the confusion matrices back on the host
(host-to-device copy, resize + normalise, segmenter forward, bilinear upsampling, calibrated argmax,
bincount; the final device-to-host copy synchronises CUDA). Image decoding is timed separately.
``megapixels_per_s`` counts the original images' pixels (= label pixels).

Wiring only; the science is in ``zeroseg.metrics``, ``zeroseg.evaluation`` and ``zeroseg.models``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator

from pipeline.config import Runtime
from pipeline.dag import Input, Stage, StageConfig, StageContext
from stages.common import text_embeddings, vocabularies
from zeroseg.data.transforms import Size
from zeroseg.errors import ConfigError, DataError

SET_COLUMN = "eval_set"
#: Metrics the summary table shows first (rows), in this order.
HEADLINE = ("hIoU", "mIoU_seen", "mIoU_unseen", "mIoU", "pAcc", "mAcc", "zs3_mIoU")


class EvaluateConfig(StageConfig):
    """``evaluate`` config section.

    ``sets``: eval sets of ``classes.json`` to score (default: all). ``gamma``: seen-class
    calibration (ZegFormer Eq. 2, subtracted from class probabilities; 0 = none).
    ``max_images``: first N images of each set only. ``resolution``: ``[H, W]`` to resize images
    to instead of the segmenter's ``input_size``.

    Runtime (not in the key): ``batch_size`` (images per forward), ``device`` (``auto``: cuda
    when the Ray cluster has GPUs; ``cpu``, ``cuda``, ``cuda:N``), ``num_gpus_per_worker``
    (default: 1 on cuda, 0 on cpu), ``concurrency`` (inference actors), ``warmup_batches``
    (batches per actor left out of the FPS timing).
    """

    sets: list[str] | None = None
    gamma: float = Field(0.0, ge=0.0)
    max_images: int | None = Field(None, ge=1)
    resolution: Size | None = None
    batch_size: Annotated[int, Runtime(why="inference batch size")] = Field(4, ge=1)
    device: Annotated[str, Runtime(why="device")] = "auto"
    num_gpus_per_worker: Annotated[float | None, Runtime(why="resources")] = Field(None, ge=0.0)
    concurrency: Annotated[int, Runtime(why="concurrency")] = Field(1, ge=1)
    warmup_batches: Annotated[int, Runtime(why="timing")] = Field(1, ge=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


# =============================================================================================
# the predictor (runs in inference actors)
# =============================================================================================
class SegmenterPredictor:
    """Inference-actor model (``pipeline.inference``): decoded images -> class scores per set.

    Args:
        segmenter_uri: the model artifact (a local path or a store URI; ``zeroseg.models.load_segmenter``).
        embeddings: ``{set: URI of embeddings/<set>.npy}`` (small arguments: each actor reads the
            files itself).
        device: torch device string.
        resolution: ``(H, W)`` override of the segmenter's ``input_size``, or None.

    ``load(batch)``: ``{"images": [uint8 [H, W, 3]], "labels": [uint8 [H, W]], "label_uris",
    "sets"}``; ``__call__(inputs)``: the ``zeroseg.evaluation`` outputs (scores per set group).

    Raises:
        ConfigError: a CUDA device on an actor without one.
        DataError: an undecodable image or label, an unreadable model or embeddings file.
    """

    def __init__(
        self, segmenter_uri: str, embeddings: Mapping[str, str], device: str, resolution: tuple[int, int] | None
    ) -> None:
        import torch

        from pipeline.uri import local_copy, read_bytes
        from zeroseg.models import load_segmenter

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"evaluate.device {device!r}: this worker has no CUDA device "
                "(set evaluate.device: cpu, or give the workers GPUs)"
            )
        self.device = torch.device(device)
        with local_copy(segmenter_uri) as seg_dir:
            self.seg = load_segmenter(seg_dir, device=self.device)
        self.size = tuple(int(s) for s in (resolution or self.seg.input_size))
        self.mean = torch.tensor(self.seg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.seg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.text = {}
        for name, uri in embeddings.items():
            import io

            try:
                arr = np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read text embeddings {uri}: {e}") from None
            self.text[name] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(self.device)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.info = {"input_size": list(self.size)}

    def load(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        from stages.feeds import decode_pair

        out: dict[str, list[Any]] = {"images": [], "labels": [], "label_uris": [], "sets": []}
        for name, img_uri, lbl_uri in zip(batch[SET_COLUMN], batch["image_uri"], batch["label_uri"]):
            try:
                image, label = decode_pair(str(img_uri), str(lbl_uri))
            except DataError as e:
                raise DataError(f"eval set {str(name)!r}: {e}") from None
            out["images"].append(image)
            out["labels"].append(label)
            out["label_uris"].append(str(lbl_uri))
            out["sets"].append(str(name))
        return out

    def __call__(self, inputs: Mapping[str, list[Any]]) -> dict[str, Any]:
        import torch

        groups = []
        with torch.inference_mode():
            for name in dict.fromkeys(inputs["sets"]):
                idx = [i for i, s in enumerate(inputs["sets"]) if s == name]
                x = torch.cat([self._prepare(inputs["images"][i]) for i in idx])
                groups.append({"set": name, "index": idx, "scores": self.seg(x, self.text[name])})
        return {"groups": groups, "probabilities": bool(self.seg.scores_are_probabilities)}

    def _prepare(self, image: np.ndarray):
        """``uint8 [H, W, 3]`` -> normalised float ``[1, 3, *size]`` on the device."""
        import torch
        import torch.nn.functional as F

        a = image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")
        x = torch.from_numpy(a).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std


# =============================================================================================
# driver side
# =============================================================================================
def resolve_device(cfg: EvaluateConfig) -> tuple[str, float]:
    """``(torch device string, GPUs per worker)`` from the config and the Ray cluster.

    Raises:
        ConfigError: GPUs requested but the cluster has none (the actors would never start).
    """
    import ray

    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    device = cfg.device if cfg.device != "auto" else ("cuda" if cluster_gpus > 0 else "cpu")
    gpus = (
        cfg.num_gpus_per_worker if cfg.num_gpus_per_worker is not None else (1.0 if device.startswith("cuda") else 0.0)
    )
    if gpus > 0 and cluster_gpus == 0:
        raise ConfigError(
            f"evaluate asks for {gpus:g} GPU(s) per worker (device {device!r}) but the Ray cluster has "
            "no GPUs; set evaluate.device: cpu"
        )
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(
            "evaluate.device is cuda but evaluate.num_gpus_per_worker is 0: Ray would hide the GPUs "
            "from the workers; set it > 0"
        )
    return device, float(gpus)


def eval_rows(ctx: StageContext, sets: list[str], max_images: int | None):
    """One pyarrow table of every selected set's manifest rows (URIs resolved), with the set
    column; the first ``max_images`` rows of each set only.

    Raises:
        DataError: a set whose manifest has no images.
    """
    import pyarrow as pa

    from stages.feeds import URI_COLUMNS, manifest_table

    parts = []
    for name in sets:
        t = manifest_table(ctx.inputs["splits"], name).select(list(URI_COLUMNS))
        if max_images is not None:
            t = t.slice(0, max_images)
        if t.num_rows == 0:
            raise DataError(f"eval set {name!r}: its manifest has no images")
        parts.append(t.append_column(SET_COLUMN, pa.array([name] * t.num_rows, pa.string())))
    return pa.concat_tables(parts)


class Evaluate(Stage):
    """GZS3 / ZS3 evaluation of a segmenter on every eval set (see module docstring)."""

    name = "evaluate"
    Config = EvaluateConfig
    INPUTS = {
        "splits": Input(("build_splits",), doc="manifests and classes.json"),
        "text": Input(("embed_text",), doc="class text embeddings"),
        "model": Input(("train_classifier", "train_generator", "self_train"), doc="the segmenter to evaluate"),
    }

    def run(self, ctx: StageContext) -> dict[str, float]:
        import ray

        from pipeline.inference import reduce
        from zeroseg.config.clip import model_embed_dim
        from zeroseg.evaluation import GZS3Evaluator
        from zeroseg.metrics import json_safe, per_class_table, segmentation_metrics, zs3_metrics
        from zeroseg.models import read_segmenter_json
        from zeroseg.plots import plot_per_class_iou

        cfg: EvaluateConfig = ctx.config
        if not ray.is_initialized():  # the driver normally initialises Ray
            raise RuntimeError("evaluate needs an initialised Ray (ray.init) before run()")
        vocabs = vocabularies(ctx.inputs["splits"])
        evals = [n for n in vocabs if n != "train"]
        if not evals:
            raise DataError(
                "classes.json lists no eval sets: nothing to evaluate (configure build_splits.eval or a "
                "validation fraction)"
            )
        names = list(cfg.sets) if cfg.sets else evals
        for n in names:
            if n not in evals:
                from pipeline.dag import nearest

                raise ConfigError(
                    f"evaluate.sets: unknown eval set {n!r}{nearest(n, evals)} (eval sets: {', '.join(evals)})"
                )
        seg_doc = read_segmenter_json(ctx.inputs["model"].file("segmenter.json").parent)
        text_embeddings(
            ctx.inputs["text"],
            vocabs,
            names,
            dim=model_embed_dim(seg_doc["clip"]),
            clip_model=seg_doc["clip"].get("model"),
        )  # the one check: rows per class, the model's size
        device, gpus = resolve_device(cfg)

        t0 = time.perf_counter()
        table = eval_rows(ctx, names, cfg.max_images)
        ds = ray.data.from_arrow(table)
        evaluator = GZS3Evaluator(
            {
                n: {
                    "num_classes": len(vocabs[n].names),
                    "seen": vocabs[n].seen,
                    "unseen": vocabs[n].unseen,
                    "ignore_index": vocabs[n].ignore_index,
                }
                for n in names
            },
            gamma=cfg.gamma,
        )
        bar = ctx.progress(table.num_rows, "images")
        merged, timing = reduce(
            ds,
            SegmenterPredictor,
            {
                "segmenter_uri": ctx.inputs["model"].uri,
                "embeddings": {n: ctx.inputs["text"].file_uri(f"embeddings/{n}.npy") for n in names},
                "device": device,
                "resolution": tuple(cfg.resolution) if cfg.resolution else None,
            },
            {"gzs3": evaluator},
            batch_size=cfg.batch_size,
            concurrency=cfg.concurrency,
            num_gpus=gpus,
            warmup_batches=cfg.warmup_batches,
            progress=lambda n: bar.update(advance=n),
        )
        pass_seconds = time.perf_counter() - t0
        counts = merged["gzs3"].finalize()

        result: dict[str, float] = {}
        doc: dict[str, Any] = {}
        log_extra: dict[str, float] = {}
        out = Path(ctx.output_dir)
        for name in names:
            v, c = vocabs[name], counts[name]
            m = segmentation_metrics(c["gzs3"], v.seen, v.unseen)
            z = zs3_metrics(c["zs3"])
            doc[name] = {
                "images": c["images"],
                "pixels": c["pixels"],
                "gamma": cfg.gamma,
                "gzs3": {
                    **m.summary(),
                    "per_class": m.per_class(list(v.names)),
                    "confusion_matrix": c["gzs3"].tolist(),
                },
                "zs3": {
                    "mIoU": z["mIoU"],
                    "pAcc": z["pAcc"],
                    "mAcc": z["mAcc"],
                    "per_class": [
                        {"id": cid, "name": v.names[cid], "iou": iou} for cid, iou in zip(v.unseen, z["iou"])
                    ],
                },
            }
            for k, val in m.summary().items():
                result[f"{name}/{k}"] = val
            result[f"{name}/zs3_mIoU"], result[f"{name}/zs3_pAcc"] = z["mIoU"], z["pAcc"]
            for row in m.per_class(list(v.names)):
                if row["iou"] is not None:
                    log_extra[f"{name}/iou/{row['name']}"] = row["iou"]
            title = f"{name}: per-class IoU (GZS3{f', gamma={cfg.gamma:g}' if cfg.gamma else ''})"
            (out / f"per_class_{name}.md").write_text(
                f"# {name}: per-class GZS3 results (percent)\n\n"
                + " | ".join(f"{k} {val:.2f}" if math.isfinite(val) else f"{k} n/a" for k, val in m.summary().items())
                + f"\n\nimages {c['images']}, gamma {cfg.gamma:g}; IoU n/a = class absent from ground "
                "truth and prediction (excluded from means)\n\n" + per_class_table(m, list(v.names))
            )
            plot_per_class_iou(
                m.iou,
                list(v.names),
                v.seen,
                v.unseen,
                out / f"per_class_iou_{name}.png",
                title=title,
                summary=m.summary(),
            )

        fps = fps_record(cfg, timing, counts, gpus, pass_seconds)
        if fps["overall"]["images_per_s"] is not None:
            result["fps"] = fps["overall"]["images_per_s"]
        (out / "metrics.json").write_text(json.dumps(json_safe(doc), indent=1) + "\n")
        (out / "fps.json").write_text(json.dumps(json_safe(fps), indent=2) + "\n")
        result = {k: float(v) for k, v in result.items() if math.isfinite(v)}
        if ctx.mlflow_run_id:  # the driver logs the returned metrics; the stage adds per-class IoU and its files
            from pipeline import tracking

            tracking.log_metrics(log_extra, run_id=ctx.mlflow_run_id)
            tracking.log_artifacts(out, run_id=ctx.mlflow_run_id)
        return result

    def note(self, metrics: Mapping[str, Any]) -> str:
        return "see metrics below"

    def summary(self, metrics: Mapping[str, Any]) -> list[Any]:
        """The metric x set table and the FPS line."""
        out: list[Any] = [metrics_table(metrics)]
        line = fps_line(metrics)
        if line:
            out.append(line)
        return out


def fps_record(
    cfg: EvaluateConfig, timing: Any, counts: Mapping[str, Mapping[str, Any]], gpus: float, pass_seconds: float
) -> dict[str, Any]:
    """``fps.json``: the timing protocol and the rates (see module docstring)."""
    images = sum(int(c["images"]) for c in counts.values())
    pixels = sum(int(c["pixels"]) for c in counts.values())
    secs = timing.compute_seconds
    ok = timing.rows_timed > 0 and secs > 0
    mp = pixels * timing.rows_timed / max(images, 1) / secs / 1e6 if ok else None
    return {
        "protocol": {
            "batch_size": cfg.batch_size,
            "resolution": timing.info.get("input_size"),
            "device": ", ".join(sorted(timing.devices)) or "none",
            "num_gpus_per_worker": gpus,
            "concurrency": cfg.concurrency,
            "warmup_batches_excluded_per_worker": cfg.warmup_batches,
            "timed": "decoded host arrays -> confusion matrices on the host: host-to-device copy, resize + "
            "normalise, segmenter forward, bilinear upsampling to label size, calibrated argmax, "
            "bincount (CUDA synchronised by the device-to-host copy); image decoding excluded",
            "megapixels": "original image (= label) pixels, pro rata over the timed images",
            "note": "images_per_s is summed over all workers' timed seconds: with concurrency > 1 it is the "
            "per-worker rate, not the aggregate",
        },
        "overall": {
            "images": images,
            "images_timed": timing.rows_timed,
            "seconds_timed": secs,
            "decode_seconds": timing.load_seconds,
            "images_per_s": timing.rows_timed / secs if ok else None,
            "megapixels_per_s": mp,
        },
        "end_to_end": {
            "images": images,
            "seconds": pass_seconds,
            "images_per_s": images / pass_seconds if pass_seconds > 0 else None,
            "includes": "manifest read, actor start-up, model load, decoding, inference",
        },
    }


def _fmt(v: Any) -> str:
    """A metric value in percent, two decimals."""
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: Mapping[str, Any]) -> Any:
    """Evaluate's flat ``{"<set>/<metric>": value}`` as a metric x set table.

    Metrics are rows so the table stays narrow (a ``ray job`` log is 80 columns wide) however
    many metrics there are; values are percent with two decimals; sets keep the order of the
    metrics (the evaluation order).
    """
    from rich.table import Table

    sets: dict[str, dict[str, Any]] = {}
    for k, v in metrics.items():
        if "/" in k:
            s, m = k.split("/", 1)
            sets.setdefault(s, {})[m] = v
    rows = [m for m in HEADLINE if any(m in d for d in sets.values())]
    rows += sorted({m for d in sets.values() for m in d} - set(rows))
    t = Table(title="evaluation (percent; GZS3 unless marked zs3)", title_justify="left")
    t.add_column("metric", no_wrap=True)
    for s in sets:
        t.add_column(s, justify="right", no_wrap=True)
    for m in rows:
        t.add_row(m, *[_fmt(d[m]) if m in d else "-" for d in sets.values()])
    return t


def fps_line(metrics: Mapping[str, Any]) -> str | None:
    """Evaluate's ``fps`` metric with its timing protocol; None when absent or not finite."""
    v = metrics.get("fps")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return (
        f"FPS: {v:.2f} images/s per inference worker (timed: host arrays -> confusion matrices, i.e. "
        "resize + normalise, forward, upsampling, argmax, counting; warm-up batches and image decoding "
        "excluded; details in evaluate's fps.json)"
    )


__all__ = [
    "Evaluate",
    "EvaluateConfig",
    "SegmenterPredictor",
    "fps_line",
    "fps_record",
    "metrics_table",
    "resolve_device",
]
