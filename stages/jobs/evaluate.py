"""The evaluate stage's job (``stages.evaluate``: its config, inputs, summary and the module
docstring with the protocols and the FPS record): one batch-inference pass per segmenter over
every selected eval set, the metrics and the files.

::

    manifest rows of every set (+ set column; stages.feeds.set_rows) -> ray.data.from_arrow
      -> actor pool of SegmenterPredictor (the model loaded once per actor; decode, then
         zeroseg.inference.infer per set of the batch)
      -> VariantsGZS3Evaluator partial states, merged on the driver (pipeline.inference.reduce)
      -> metrics.json, per_class_<set>.md, per_class_iou_<set>.png, fps.json
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from pipeline import tracking
from pipeline.dag import StageContext, nearest
from pipeline.inference import Timing, reduce
from pipeline.uri import local_copy, read_bytes
from stages.common import text_embeddings, vocabularies
from stages.evaluate import EvaluateConfig
from stages.feeds import SET_COLUMN, decode_set_batch, set_rows, set_specs
from stages.jobs.device import actor_device, resolve_device
from zeroseg import models  # by attribute: a test (or notebook) may replace load_segmenter / import_class
from zeroseg.config.clip import model_embed_dim
from zeroseg.errors import ConfigError, DataError
from zeroseg.evaluation import VariantsGZS3Evaluator
from zeroseg.inference import activation_of, encode_prompts, infer, normalisation, resolve_protocol, variants_of
from zeroseg.metrics import json_safe, per_class_table, segmentation_metrics, zs3_metrics
from zeroseg.plots import plot_per_class_iou


# =============================================================================================
# the predictor (runs in inference actors)
# =============================================================================================
class SegmenterPredictor:
    """Inference-actor model (``pipeline.inference``): decoded images -> class scores per set,
    through :func:`zeroseg.inference.infer` under the config's protocol.

    Args:
        cfg: the validated evaluate config (its protocol: ``EvaluateConfig.eval_protocol``).
        segmenter_uri: the model artifact (a local path or a store URI; ``zeroseg.models.load_segmenter``).
        embeddings: ``{set: URI of embeddings/<set>.npy}`` (small arguments: each actor reads the
            files itself).
        device: the resolved torch device string (:func:`stages.jobs.device.resolve_device`).
        prompt_names: ``{set: [prompt name per class]}`` for a segmenter that ``encodes_text``
            (its ``encode_text`` replaces the embeddings files), else None.

    ``load(batch)``: ``{"images": [uint8 [H, W, 3]], "labels": [uint8 or uint16 (more than 255 classes) [H, W]], "label_uris",
    "sets"}``; ``__call__(inputs)``: the ``zeroseg.evaluation`` outputs (``groups``: per set its
    rows and scores, as ``infer`` returns them; ``probabilities``; ``variants`` for a segmenter
    with variants; ``activation`` when the evaluator applies it at the label size).

    Raises:
        ConfigError: a CUDA device on an actor without one; a slide stride larger than the crop.
        DataError: an unreadable model or embeddings file; a segmenter whose attributes contradict
            each other (an activation without ``scores_are_probabilities``, ``encodes_text`` only
            on the instance, an unknown activation) or whose ``encode_text`` returns the wrong shape.
    """

    def __init__(
        self,
        cfg: EvaluateConfig,
        segmenter_uri: str,
        embeddings: Mapping[str, str],
        device: str,
        prompt_names: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.device, self.device_name = actor_device(device, "evaluate.device")
        with local_copy(segmenter_uri) as seg_dir:
            self.seg = models.load_segmenter(seg_dir, device=self.device)
        cls = type(self.seg).__name__
        self.mean, self.std = normalisation(self.seg, self.device)
        self.act = activation_of(self.seg)
        try:
            self.protocol = resolve_protocol(self.seg, cfg.eval_protocol())
        except ConfigError as e:
            raise ConfigError(f"evaluate.{e}") from None
        self.text: dict[str, torch.Tensor] = {}
        encodes = bool(getattr(self.seg, "encodes_text", False))
        if encodes:
            if prompt_names is None:
                raise DataError(
                    f"{cls} embeds class names itself (encodes_text) but evaluate read the attribute from its class "
                    "as False and passed no prompt names; declare encodes_text = True on the class"
                )
            for name, names in prompt_names.items():
                self.text[name] = encode_prompts(self.seg, names, f"eval set {name!r}").to(self.device)
        else:
            for name, uri in embeddings.items():
                try:
                    arr = np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise DataError(f"cannot read text embeddings {uri}: {e}") from None
                self.text[name] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(self.device)
        p = self.protocol
        self.info = {
            "input_size": list(p.resolution) if p.name == "resize" else (list(p.crop) if p.crop else None),
            "protocol": {
                "protocol": p.name,
                "crop": list(p.crop) if p.crop else None,
                "stride": list(p.stride) if p.stride else None,
                "short_side": p.short_side,
                "max_long_side": p.max_long_side,
                "size_divisibility": int(getattr(self.seg, "size_divisibility", 1) or 1),
                "activation": self.act,
                "activation_at": p.activation_at,
                "text": "encode_text" if encodes else "embeddings",
            },
        }

    def load(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        return decode_set_batch(batch, SET_COLUMN, "eval set")

    def __call__(self, inputs: Mapping[str, list[Any]]) -> dict[str, Any]:
        groups = []
        for name in dict.fromkeys(inputs["sets"]):
            idx = [i for i, s in enumerate(inputs["sets"]) if s == name]
            images = [inputs["images"][i] for i in idx]
            scores = infer(self.seg, images, self.text[name], self.protocol, mean=self.mean, std=self.std)
            groups.append({"set": name, "index": idx, "scores": scores})
        out: dict[str, Any] = {"groups": groups, "probabilities": bool(self.seg.scores_are_probabilities)}
        variants = variants_of(self.seg)
        if variants:
            out["variants"] = list(variants)  # the segmenter's order: variants[0] is reported first
        if self.act != "none" and self.protocol.activation_at == "label":
            out["activation"] = self.act  # the evaluator applies it after upsampling to the label size
        return out


# =============================================================================================
# driver side
# =============================================================================================
def run(ctx: StageContext) -> dict[str, float]:
    """The stage's run (``stages.evaluate.Evaluate``): score ``model`` (and ``compare``) on the
    sets, write the files, log the per-class IoU and the files to the stage's MLflow run.

    Returns:
        ``{"<set>/hIoU": .., ..., "<variant>/<set>/<metric>": .., "fps": ..}`` (finite values only).

    Raises:
        ConfigError: an unknown eval set; DataError: no eval set, or as the inputs' readers.
    """
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
            raise ConfigError(
                f"evaluate.sets: unknown eval set {n!r}{nearest(n, evals)} (eval sets: {', '.join(evals)})"
            )
    result: dict[str, float] = {}
    doc: dict[str, Any] = {}
    log_extra: dict[str, float] = {}
    out = Path(ctx.output_dir)
    scored = [("", ctx.inputs["model"])]
    if ctx.inputs.get("compare") is not None:
        scored.append((f"{ctx.inputs['compare'].stage}/", ctx.inputs["compare"]))
    fps: dict[str, Any] = {}
    rows = sum(manifest_rows(ctx, n, cfg.max_images) for n in names)
    bar = ctx.progress(rows * len(scored), "images")
    for model_prefix, art in scored:
        by_variant, timing, pass_seconds, text_source, gamma, gpus = score_model(
            ctx, cfg, art, names, vocabs, progress=lambda n: bar.update(advance=n)
        )
        variants = list(by_variant)
        counts = by_variant[variants[0]]
        reports = [(variants[0], "", counts)]
        if not model_prefix:  # the compared model: its first variant only
            reports += [(v, f"{v}/", by_variant[v]) for v in variants[1:]]
        for variant, vprefix, var_counts in reports:
            prefix = model_prefix + vprefix
            vdir = out / prefix if prefix else out
            vdir.mkdir(parents=True, exist_ok=True)
            for name in names:
                entry, flat, per_class = report_set(
                    name, vocabs[name], var_counts[name], cfg, vdir, variant=variant, text=text_source, gamma=gamma
                )
                if model_prefix:
                    entry["model"] = {"stage": art.stage, "key": art.key}
                doc[f"{prefix}{name}"] = entry
                result.update({f"{prefix}{name}/{k}": val for k, val in flat.items()})
                log_extra.update({f"{prefix}{name}/iou/{k}": val for k, val in per_class.items()})
        if not model_prefix:
            fps = fps_record(cfg, timing, counts, gpus, pass_seconds)
            if fps["overall"]["images_per_s"] is not None:
                result["fps"] = fps["overall"]["images_per_s"]
    (out / "metrics.json").write_text(json.dumps(json_safe(doc), indent=1) + "\n")
    (out / "fps.json").write_text(json.dumps(json_safe(fps), indent=2) + "\n")
    result = {k: float(v) for k, v in result.items() if math.isfinite(v)}
    if ctx.mlflow_run_id:  # the driver logs the returned metrics; the stage adds per-class IoU and its files
        tracking.log_metrics(log_extra, run_id=ctx.mlflow_run_id)
        tracking.log_artifacts(out, run_id=ctx.mlflow_run_id)
    return result


def manifest_rows(ctx: StageContext, name: str, max_images: int | None) -> int:
    """How many images of eval set ``name`` evaluate scores (its manifest's rows, at most ``max_images``)."""
    n = pq.read_metadata(ctx.inputs["splits"].file(f"manifests/{name}.parquet")).num_rows
    return n if max_images is None else min(n, max_images)


def score_model(
    ctx: StageContext,
    cfg: EvaluateConfig,
    model: Any,
    names: list[str],
    vocabs: Mapping[str, Any],
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[Any, Any], Timing, float, str, float, float]:
    """One batch-inference pass of the segmenter artifact ``model`` over the sets ``names``
    (``progress(n)``: called with the images done, per batch).

    Returns:
        ``(counts by variant, timing, pass seconds, text source, gamma, GPUs per worker)``:
        ``{variant (None: a plain segmenter): {set: counts}}`` (``VariantsGZS3Evaluator.finalize``),
        ``pipeline.inference``'s timing, the wall time of the pass, ``"embeddings"`` or
        ``"encode_text"``, the calibration applied (``evaluate.gamma``, else the artifact's
        ``default_gamma``, else 0).

    Raises:
        ConfigError, DataError: as :func:`run`.
    """
    seg_doc = models.read_segmenter_json(model.file("segmenter.json").parent)
    gamma = float(cfg.gamma if cfg.gamma is not None else seg_doc.get("default_gamma", 0.0))
    # read from the class (no model is built on the driver): the actors' arguments depend on it
    encodes_text = bool(getattr(models.import_class(seg_doc["class"], where="segmenter.json"), "encodes_text", False))
    text_embeddings(
        ctx.inputs["text"],
        vocabs,
        names,
        dim=model_embed_dim(seg_doc["clip"]),
        clip_model=seg_doc["clip"].get("model"),
    )  # the one check: rows per class, the model's size
    device, gpus = resolve_device(
        cfg.device, "evaluate.device", cfg.num_gpus_per_worker, "evaluate.num_gpus_per_worker"
    )

    t0 = time.perf_counter()
    table = set_rows(ctx.inputs["splits"], names, cfg.max_images, "eval set")
    ds = ray.data.from_arrow(table)
    # one GZS3Evaluator per variant the segmenter reports (its variants may depend on its config)
    evaluators = {"gzs3": VariantsGZS3Evaluator(set_specs(vocabs, names), gamma=gamma)}
    predictor_kwargs: dict[str, Any] = {
        "cfg": cfg,
        "segmenter_uri": model.uri,
        "embeddings": {n: ctx.inputs["text"].file_uri(f"embeddings/{n}.npy") for n in names},
        "device": device,
    }
    if encodes_text:
        predictor_kwargs["prompt_names"] = {n: list(vocabs[n].prompt_names) for n in names}
    merged, timing = reduce(
        ds,
        SegmenterPredictor,
        predictor_kwargs,
        evaluators,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_gpus=gpus,
        warmup_batches=cfg.warmup_batches,
        progress=progress,
    )
    pass_seconds = time.perf_counter() - t0
    by_variant = merged["gzs3"].finalize()
    return by_variant, timing, pass_seconds, "encode_text" if encodes_text else "embeddings", gamma, gpus


def report_set(
    name: str,
    vocab: Any,
    counts: Mapping[str, Any],
    cfg: EvaluateConfig,
    out_dir: Path,
    variant: str | None = None,
    text: str = "embeddings",
    gamma: float | None = None,
) -> tuple[dict[str, Any], dict[str, float], dict[str, float]]:
    """One set's (one variant's) metrics from its confusion matrices: its ``metrics.json`` entry,
    its flat metrics (``{"hIoU": .., "zs3_mIoU": .., ...}``), its per-class IoU by class name; and
    its ``per_class_<set>.md`` / ``per_class_iou_<set>.png`` written into ``out_dir``. ``gamma``:
    the calibration applied (default: the config's, 0 when unset)."""
    g = float(gamma if gamma is not None else (cfg.gamma or 0.0))
    v, c = vocab, counts
    m = segmentation_metrics(c["gzs3"], v.seen, v.unseen)
    z = zs3_metrics(c["zs3"])
    entry: dict[str, Any] = {
        "images": c["images"],
        "pixels": c["pixels"],
        "gamma": g,
        "protocol": cfg.protocol,
        "text": text,
        "gzs3": {**m.summary(), "per_class": m.per_class(list(v.names)), "confusion_matrix": c["gzs3"].tolist()},
        "zs3": {
            "mIoU": z["mIoU"],
            "pAcc": z["pAcc"],
            "mAcc": z["mAcc"],
            "per_class": [{"id": cid, "name": v.names[cid], "iou": iou} for cid, iou in zip(v.unseen, z["iou"])],
        },
    }
    if variant is not None:
        entry["variant"] = variant
    flat = dict(m.summary())
    flat["zs3_mIoU"], flat["zs3_pAcc"] = z["mIoU"], z["pAcc"]
    per_class = {row["name"]: row["iou"] for row in m.per_class(list(v.names)) if row["iou"] is not None}
    label = f"{name}{f' [{variant}]' if variant else ''}"
    title = f"{label}: per-class IoU (GZS3{f', gamma={g:g}' if g else ''})"
    (out_dir / f"per_class_{name}.md").write_text(
        f"# {label}: per-class GZS3 results (percent)\n\n"
        + " | ".join(f"{k} {val:.2f}" if math.isfinite(val) else f"{k} n/a" for k, val in m.summary().items())
        + f"\n\nimages {c['images']}, gamma {g:g}, protocol {cfg.protocol}; IoU n/a = class absent from "
        "ground truth and prediction (excluded from means)\n\n" + per_class_table(m, list(v.names))
    )
    plot_per_class_iou(
        m.iou, list(v.names), v.seen, v.unseen, out_dir / f"per_class_iou_{name}.png", title=title, summary=m.summary()
    )
    return entry, flat, per_class


def fps_record(
    cfg: EvaluateConfig, timing: Timing, counts: Mapping[str, Mapping[str, Any]], gpus: float, pass_seconds: float
) -> dict[str, Any]:
    """``fps.json``: the timing protocol and the rates (``stages.evaluate``'s module docstring)."""
    images = sum(int(c["images"]) for c in counts.values())
    pixels = sum(int(c["pixels"]) for c in counts.values())
    secs = timing.compute_seconds
    ok = timing.rows_timed > 0 and secs > 0
    mp = pixels * timing.rows_timed / max(images, 1) / secs / 1e6 if ok else None
    return {
        "protocol": {
            "eval_protocol": timing.info.get("protocol") or {"protocol": cfg.protocol},
            "batch_size": cfg.batch_size,
            "resolution": timing.info.get("input_size"),
            "device": ", ".join(sorted(timing.devices)) or "none",
            "num_gpus_per_worker": gpus,
            "concurrency": cfg.concurrency,
            "warmup_batches_excluded_per_worker": cfg.warmup_batches,
            "timed": "decoded host arrays -> confusion matrices on the host: host-to-device copy, resize + "
            "normalise, the protocol's segmenter forwards (slide: every window; short_side: padding and "
            "cropping), bilinear upsampling to label size, calibrated argmax, bincount (CUDA synchronised "
            "by the device-to-host copy); image decoding excluded",
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


__all__ = ["SegmenterPredictor", "fps_record", "manifest_rows", "report_set", "run", "score_model"]
