"""Stage ``evaluate``: run a segmenter over every evaluation set and score it (GZS3 and ZS3).

Reads ``classes.json`` and ``manifests/<set>.parquet`` of build_splits (``splits``),
``embeddings/<set>.npy`` of embed_text (``text``) and a segmenter artifact (``model``: of
train_classifier, or of train_generator / self_train when the config has them; set
``evaluate.model`` when it has several). One batch-inference pass (``pipeline.inference``) over
all selected sets::

    manifest rows of every set (+ set column) -> ray.data.from_arrow
      -> actor pool of SegmenterPredictor (the model loaded once per actor)
      -> GZS3Evaluator partial states, merged on the driver

:class:`SegmenterPredictor` decodes each image and label PNG and turns the image into class scores
with the configured test protocol (``evaluate.protocol``, geometry in ``zeroseg.protocols``):

- ``resize`` (default): the image resized to the segmenter's ``input_size`` (or ``resolution``),
  normalised with the segmenter's mean/std, ``segmenter(images, text_embeddings)`` on the batch;
- ``slide`` (ZegCLIP's released test): short side resized to ``short_side`` (default: the crop's
  short side), windows of ``crop`` (default: ``input_size``) every ``stride`` pixels, each
  window's scores upsampled to the window, averaged over overlaps;
- ``short_side`` (detectron2 methods: ZegFormer, DeOP): short side resized to ``short_side``
  (long side at most ``max_long_side``), zero-padded right/bottom to the segmenter's
  ``size_divisibility``, one forward, scores upsampled to the padded size and the padding cropped.

Images of different sizes (slide, short_side) are never padded to each other: slide runs the
windows of one image per forward (``batch_size`` windows at a time), short_side batches the images
whose padded size is equal and runs the others one per forward.

A segmenter with an ``activation`` (ZegCLIP: sigmoid) is run through ``logits``: the logits are
upsampled to the network input (the window, the padded or the resized image) and the activation
is applied there, as ZegCLIP's released code does (``activation_at: input``, the default; with
``label`` the evaluator applies it after upsampling to the label size). This also holds for
``resize``: ZegCLIP's scores are ``sigmoid(upsampled logits)`` at ``input_size``, then upsampled
to the label (before, the sigmoid was taken at the patch grid). Segmenters without activation
(MaskCLIP) are unchanged: under ``resize`` their patch-grid scores go straight to the label size.

``zeroseg.evaluation.GZS3Evaluator`` upsamples each image's scores bilinearly to *its label's*
size (labels are never resized), subtracts gamma (after any activation) and counts the GZS3
``[C, C]`` and ZS3 ``[U, U]`` confusion matrices. Nothing of size H x W returns to the driver,
which computes the metrics (percent; conventions in ``zeroseg.metrics``).

A segmenter with ``variants`` (ZegFormer: fused, seg-only, image-only) is scored once per variant
in the same pass (``zeroseg.evaluation.VariantsGZS3Evaluator``: one ``GZS3Evaluator`` per variant
the actors report, so variants may depend on the model config): ``variants[0]`` under the usual
keys and files, the others as ``<variant>/<set>/<metric>``, ``metrics.json`` entries
``"<variant>/<set>"`` and files under ``<variant>/``. A segmenter whose class says
``encodes_text`` gets ``encode_text(prompt_names)`` of each set (``classes.json``), computed once
per actor, instead of embed_text's embeddings.

Writes ``metrics.json``, ``per_class_<set>.md``, ``per_class_iou_<set>.png`` and ``fps.json``;
returns ``{"<set>/hIoU": .., "<set>/mIoU_seen": .., ..., "fps": ..}`` (finite values only).

FPS protocol (``fps.json``): per actor, the first ``warmup_batches`` batches are not timed; a
timed batch counts the seconds from decoded host arrays to the confusion matrices back on the host
(host-to-device copy, resize + normalise, the protocol's segmenter forwards, bilinear upsampling,
calibrated argmax, bincount; the final device-to-host copy synchronises CUDA). Image decoding is
timed separately. ``megapixels_per_s`` counts the original images' pixels (= label pixels).
``overall`` keeps the summed per-actor compute seconds and timed images (what a comparison with
the bare model forward on the same images needs); ``end_to_end`` the whole pass.

Wiring only; the science is in ``zeroseg.metrics``, ``zeroseg.evaluation`` and ``zeroseg.models``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.config import Runtime
from pipeline.dag import Input, Stage, StageConfig, StageContext
from stages.common import text_embeddings, vocabularies
from zeroseg.config import square
from zeroseg.data.transforms import Size
from zeroseg.errors import ConfigError, DataError

SET_COLUMN = "eval_set"
#: The project's stages whose artifact is a segmenter (evaluate's ``model`` and ``compare`` roles);
#: any other catalogue stage that declares ``produces = SEGMENTER`` fills them too (a method that
#: brings its own stage, ``pipeline.dag.Input.kind``).
MODEL_STAGES = ("train_classifier", "train_generator", "self_train")
#: The kind of artifact evaluate scores (``zeroseg.models``' segmenter directory).
SEGMENTER = "segmenter"
#: Metrics the summary table shows first (rows), in this order.
HEADLINE = ("hIoU", "mIoU_seen", "mIoU_unseen", "mIoU", "pAcc", "mAcc", "zs3_mIoU")


class EvaluateConfig(StageConfig):
    """``evaluate`` config section.

    ``sets``: eval sets of ``classes.json`` to score (default: all). ``gamma``: seen-class
    calibration (ZegFormer Eq. 2, subtracted from class probabilities; 0 = none); unset: each
    model's own ``default_gamma`` (``segmenter.json``: 0.1 for an inductive ZegCLIP, 0 for a
    self-trained one, as released; 0 when the artifact states none).
    ``max_images``: first N images of each set only. ``resolution``: ``[H, W]`` to resize images
    to instead of the segmenter's ``input_size`` (protocol ``resize`` only).

    Test protocol (module docstring, ``zeroseg.protocols``): ``protocol``: ``resize`` (default),
    ``slide`` (ZegCLIP: ``crop`` default the segmenter's ``input_size``, ``stride`` required:
    512 / 426 in the released configs; ``short_side`` default the crop's short side) or
    ``short_side`` (detectron2: ``short_side`` required, 640 COCO-Stuff / 512 VOC;
    ``max_long_side`` optional, detectron2's ``MAX_SIZE_TEST``). ``crop`` / ``stride`` take
    ``N`` or ``[H, W]``. ``activation_at``: where a segmenter's activation is applied:
    ``input`` (network input resolution, ZegCLIP's released code) or ``label`` (after upsampling
    to the label size).

    Runtime (not in the key): ``batch_size`` (images per batch and per forward; ``slide``: windows
    per forward, ``short_side``: at most the images of equal padded size), ``device`` (``auto``: cuda
    when the Ray cluster has GPUs; ``cpu``, ``cuda``, ``cuda:N``), ``num_gpus_per_worker``
    (default: 1 on cuda, 0 on cpu), ``concurrency`` (inference actors), ``warmup_batches``
    (batches per actor left out of the FPS timing).
    """

    sets: list[str] | None = None
    gamma: float | None = Field(None, ge=0.0)
    max_images: int | None = Field(None, ge=1)
    resolution: Size | None = None
    protocol: Literal["resize", "slide", "short_side"] = "resize"
    crop: Size | None = None
    stride: Size | None = None
    short_side: int | None = Field(None, gt=0)
    max_long_side: int | None = Field(None, gt=0)
    activation_at: Literal["input", "label"] = "input"
    batch_size: Annotated[int, Runtime(why="inference batch size")] = Field(4, ge=1)
    device: Annotated[str, Runtime(why="device")] = "auto"
    num_gpus_per_worker: Annotated[float | None, Runtime(why="resources")] = Field(None, ge=0.0)
    concurrency: Annotated[int, Runtime(why="concurrency")] = Field(1, ge=1)
    warmup_batches: Annotated[int, Runtime(why="timing")] = Field(1, ge=0)

    _square = field_validator("crop", "stride", mode="before")(square)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @model_validator(mode="after")
    def _protocol_keys(self) -> EvaluateConfig:
        """Each protocol's keys, and only those (a key another protocol uses is an error, not ignored)."""
        own = {
            "resize": {"resolution"},
            "slide": {"crop", "stride", "short_side"},
            "short_side": {"short_side", "max_long_side"},
        }
        for key in ("resolution", "crop", "stride", "short_side", "max_long_side"):
            if getattr(self, key) is not None and key not in own[self.protocol]:
                users = [p for p, keys in own.items() if key in keys]
                raise ValueError(
                    f"evaluate.{key} applies to protocol {' / '.join(users)}, not {self.protocol!r}; remove it "
                    f"or set evaluate.protocol"
                )
        if self.protocol == "slide":
            if self.stride is None:
                raise ValueError(
                    "evaluate.protocol slide needs evaluate.stride (ZegCLIP's released test: crop 512, stride 426)"
                )
            if self.crop is not None and (self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]):
                raise ValueError(
                    f"evaluate.stride {list(self.stride)} is larger than evaluate.crop {list(self.crop)}: some "
                    "pixels would be in no window"
                )
        if self.protocol == "short_side" and self.short_side is None:
            raise ValueError(
                "evaluate.protocol short_side needs evaluate.short_side (detectron2's INPUT.MIN_SIZE_TEST: 640 "
                "COCO-Stuff, 512 VOC)"
            )
        return self

    def protocol_args(self) -> dict[str, Any] | None:
        """The predictor's ``protocol`` argument, or None for the default (``resize``, activation at
        the input): then the predictor is called with the arguments it always had."""
        if self.protocol == "resize" and self.activation_at == "input":
            return None
        return {
            "protocol": self.protocol,
            "crop": list(self.crop) if self.crop else None,
            "stride": list(self.stride) if self.stride else None,
            "short_side": self.short_side,
            "max_long_side": self.max_long_side,
            "activation_at": self.activation_at,
            "windows_per_forward": self.batch_size,
        }


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
        resolution: ``(H, W)`` override of the segmenter's ``input_size`` (protocol resize), or None.
        protocol: :meth:`EvaluateConfig.protocol_args` (``protocol``, ``crop``, ``stride``,
            ``short_side``, ``max_long_side``, ``activation_at``, ``windows_per_forward``), or None
            for ``resize`` with the activation at the input.
        prompt_names: ``{set: [prompt name per class]}`` for a segmenter that ``encodes_text``
            (its ``encode_text`` replaces the embeddings files), else None.

    ``load(batch)``: ``{"images": [uint8 [H, W, 3]], "labels": [uint8 or uint16 (more than 255 classes) [H, W]], "label_uris",
    "sets"}``; ``__call__(inputs)``: the ``zeroseg.evaluation`` outputs (scores per set group: a
    batch tensor under ``resize``, a list of per-image tensors under ``slide`` / ``short_side``
    and whenever an activation is applied at the input; ``{variant: ...}`` for a segmenter with
    variants).

    Raises:
        ConfigError: a CUDA device on an actor without one; a slide stride larger than the crop.
        DataError: an undecodable image or label, an unreadable model or embeddings file; a
            segmenter whose attributes contradict each other (an activation without
            ``scores_are_probabilities``, ``encodes_text`` only on the instance, an unknown
            activation) or whose ``encode_text`` returns the wrong shape.
    """

    # what a predictor built without the protocol arguments runs (also an instance made with
    # __new__ and given only seg / text / size / mean / std / device: the plain resize protocol)
    protocol = "resize"
    crop: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    short_side: int | None = None
    max_long_side: int | None = None
    activation_at = "input"
    windows_per_forward = 4

    def __init__(
        self,
        segmenter_uri: str,
        embeddings: Mapping[str, str],
        device: str,
        resolution: tuple[int, int] | None,
        protocol: Mapping[str, Any] | None = None,
        prompt_names: Mapping[str, list[str]] | None = None,
    ) -> None:
        import torch

        from pipeline.uri import local_copy, read_bytes
        from zeroseg.models import load_segmenter
        from zeroseg.protocols import ACTIVATIONS

        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"evaluate.device {device!r}: this worker has no CUDA device "
                "(set evaluate.device: cpu, or give the workers GPUs)"
            )
        self.device = torch.device(device)
        with local_copy(segmenter_uri) as seg_dir:
            self.seg = load_segmenter(seg_dir, device=self.device)
        cls = type(self.seg).__name__
        self.size = tuple(int(s) for s in (resolution or self.seg.input_size))
        self.mean = torch.tensor(self.seg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.seg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        act = str(getattr(self.seg, "activation", "none"))
        if act not in ACTIVATIONS:
            raise DataError(f"{cls}.activation is {act!r}; expected one of {', '.join(ACTIVATIONS)}")
        if act != "none" and not self.seg.scores_are_probabilities:
            raise DataError(
                f"{cls}.activation is {act!r} but scores_are_probabilities is False: its activated scores are "
                "probabilities; set scores_are_probabilities = True (calibration subtracts gamma from them)"
            )
        p = dict(protocol or {})
        self.protocol = p.get("protocol", "resize")
        self.activation_at = p.get("activation_at", "input")
        self.windows_per_forward = int(p.get("windows_per_forward") or 4)
        self.max_long_side = p.get("max_long_side")
        if self.protocol == "slide":
            self.crop = tuple(int(c) for c in (p.get("crop") or self.seg.input_size))
            self.stride = tuple(int(s) for s in p["stride"])
            if self.stride[0] > self.crop[0] or self.stride[1] > self.crop[1]:
                raise ConfigError(
                    f"evaluate.stride {list(self.stride)} is larger than the crop {list(self.crop)} (the "
                    f"segmenter's input_size when evaluate.crop is not set): some pixels would be in no window"
                )
            self.short_side = int(p.get("short_side") or min(self.crop))
        elif self.protocol == "short_side":
            self.short_side = int(p["short_side"])
        self.text = {}
        if getattr(self.seg, "encodes_text", False):
            if prompt_names is None:
                raise DataError(
                    f"{cls} embeds class names itself (encodes_text) but evaluate read the attribute from its class "
                    "as False and passed no prompt names; declare encodes_text = True on the class"
                )
            for name, names in prompt_names.items():
                with torch.inference_mode():
                    t = self.seg.encode_text(list(names))
                if t.ndim != 2 or t.shape[0] != len(names):
                    raise DataError(
                        f"{cls}.encode_text returned {tuple(t.shape)} for the {len(names)} prompt names of eval set "
                        f"{name!r}; expected [{len(names)}, D]"
                    )
                self.text[name] = t.detach().float().to(self.device)
        else:
            for name, uri in embeddings.items():
                import io

                try:
                    arr = np.load(io.BytesIO(read_bytes(uri)), allow_pickle=False)
                except (OSError, ValueError) as e:
                    raise DataError(f"cannot read text embeddings {uri}: {e}") from None
                self.text[name] = torch.from_numpy(np.array(arr, dtype=np.float32)).to(self.device)
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.info = {
            "input_size": list(self.size) if self.protocol == "resize" else (list(self.crop) if self.crop else None),
            "protocol": {
                "protocol": self.protocol,
                "crop": list(self.crop) if self.crop else None,
                "stride": list(self.stride) if self.stride else None,
                "short_side": self.short_side,
                "max_long_side": self.max_long_side,
                "size_divisibility": int(getattr(self.seg, "size_divisibility", 1) or 1),
                "activation": act,
                "activation_at": self.activation_at,
                "text": "encode_text" if getattr(self.seg, "encodes_text", False) else "embeddings",
            },
        }

    def load(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        from stages.feeds import decode_set_batch

        return decode_set_batch(batch, SET_COLUMN, "eval set")

    def __call__(self, inputs: Mapping[str, list[Any]]) -> dict[str, Any]:
        import torch

        groups = []
        with torch.inference_mode():
            for name in dict.fromkeys(inputs["sets"]):
                idx = [i for i, s in enumerate(inputs["sets"]) if s == name]
                scores = self._scores([inputs["images"][i] for i in idx], self.text[name])
                groups.append({"set": name, "index": idx, "scores": scores})
        out: dict[str, Any] = {"groups": groups, "probabilities": bool(self.seg.scores_are_probabilities)}
        variants = tuple(getattr(self.seg, "variants", ()) or ())
        if variants:
            out["variants"] = list(variants)  # the segmenter's order: variants[0] is reported first
        act = str(getattr(self.seg, "activation", "none"))
        if act != "none" and self.activation_at == "label":
            out["activation"] = act  # the evaluator applies it after upsampling to the label size
        return out

    def _scores(self, images: list[np.ndarray], text: Any) -> Any:
        """Scores of one set's images under the protocol (see the class docstring)."""
        import torch

        from zeroseg.protocols import as_variants, forward_padded, padded_size, short_side_size, slide_window_scores

        seg = self.seg
        act = str(getattr(seg, "activation", "none"))
        at_input = act if self.activation_at == "input" else "none"
        if act != "none":

            def fn(x):
                return seg.logits(x, text)
        else:

            def fn(x):
                return seg(x, text)

        divisor = int(getattr(seg, "size_divisibility", 1) or 1)
        if self.protocol == "resize":
            x = torch.cat([self._prepare(im) for im in images])
            if at_input == "none":
                return self._unwrap(as_variants(fn(x)))  # the batch's scores as they are
            return self._unwrap(forward_padded(fn, x, 1, at_input))  # logits -> input_size -> activation
        if self.protocol == "slide":
            per = []
            for im in images:
                size = short_side_size(im.shape[0], im.shape[1], self.short_side, self.max_long_side)
                x = self._prepare(im, size, antialias=False)  # mmcv.imrescale: cv2 bilinear, no antialiasing
                per.append(
                    slide_window_scores(fn, x, self.crop, self.stride, divisor, at_input, self.windows_per_forward)
                )
            return self._unwrap({k: [d[k] for d in per] for k in per[0]})
        # short_side: images of equal padded size share a forward (same result as one per forward)
        xs, by_pad = [], {}
        for i, im in enumerate(images):
            size = short_side_size(im.shape[0], im.shape[1], self.short_side, self.max_long_side)
            xs.append(self._prepare(im, size, antialias=True))  # detectron2: PIL bilinear (antialiased)
            by_pad.setdefault(padded_size(*size, divisor), []).append(i)
        slots: dict[str, list[Any]] = {}
        for idx in by_pad.values():
            for k, per_image in forward_padded(fn, [xs[i] for i in idx], divisor, at_input).items():
                col = slots.setdefault(k, [None] * len(images))
                for i, s in zip(idx, per_image):
                    col[i] = s
        return self._unwrap(slots)

    def _unwrap(self, out: dict[str, Any]) -> Any:
        """``{variant: scores}`` as the evaluator takes it: the scores alone for a segmenter
        without variants.

        Raises:
            DataError: outputs that do not match the segmenter's ``variants``.
        """
        from zeroseg.protocols import SINGLE

        variants = tuple(getattr(self.seg, "variants", ()) or ())
        cls = type(self.seg).__name__
        if not variants:
            if set(out) != {SINGLE}:
                raise DataError(
                    f"{cls} returned the variants {sorted(out)} but declares none; set {cls}.variants (the first "
                    "is reported under the usual metric keys)"
                )
            return out[SINGLE]
        bad = [v for v in variants if not isinstance(v, str) or not v or "/" in v]
        if bad:
            raise DataError(
                f"{cls}.variants {bad}: a variant name must be a non-empty string without '/' (it names metrics "
                "<variant>/<set>/<metric> and a folder)"
            )
        if set(out) != set(variants):
            raise DataError(f"{cls} declares the variants {list(variants)} but returned {sorted(out)}")
        return out

    def _prepare(self, image: np.ndarray, size: tuple[int, int] | None = None, antialias: bool = True):
        """``uint8 [H, W, 3]`` -> normalised float ``[1, 3, *size]`` on the device (bilinear, default
        size: the resize protocol's)."""
        import torch
        import torch.nn.functional as F

        size = tuple(size or self.size)
        a = image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")
        x = torch.from_numpy(a).to(self.device).permute(2, 0, 1)[None].float().div_(255.0)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
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


def manifest_rows(ctx: StageContext, name: str, max_images: int | None) -> int:
    """How many images of eval set ``name`` evaluate scores (its manifest's rows, at most ``max_images``)."""
    import pyarrow.parquet as pq

    n = pq.read_metadata(ctx.inputs["splits"].file(f"manifests/{name}.parquet")).num_rows
    return n if max_images is None else min(n, max_images)


def score_model(
    ctx: StageContext,
    cfg: EvaluateConfig,
    model: Any,
    names: list[str],
    vocabs: Mapping[str, Any],
    progress: Any = None,
) -> tuple[dict[Any, Any], Any, float, str, float, float]:
    """One batch-inference pass of the segmenter artifact ``model`` over the sets ``names``
    (``progress(n)``: called with the images done, per batch).

    Returns:
        ``(counts by variant, timing, pass seconds, text source, gamma, GPUs per worker)``:
        ``{variant (None: a plain segmenter): {set: counts}}`` (``VariantsGZS3Evaluator.finalize``),
        ``pipeline.inference``'s timing, the wall time of the pass, ``"embeddings"`` or
        ``"encode_text"``, the calibration applied (``evaluate.gamma``, else the artifact's
        ``default_gamma``, else 0).

    Raises:
        ConfigError, DataError: as :meth:`Evaluate.run`.
    """
    import ray

    from pipeline.inference import reduce
    from zeroseg.config.clip import model_embed_dim
    from zeroseg.evaluation import VariantsGZS3Evaluator
    from zeroseg.models import import_class, read_segmenter_json

    seg_doc = read_segmenter_json(model.file("segmenter.json").parent)
    gamma = float(cfg.gamma if cfg.gamma is not None else seg_doc.get("default_gamma", 0.0))
    # read from the class (no model is built on the driver): the actors' arguments depend on it
    encodes_text = bool(getattr(import_class(seg_doc["class"], where="segmenter.json"), "encodes_text", False))
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
    set_specs = {
        n: {
            "num_classes": len(vocabs[n].names),
            "seen": vocabs[n].seen,
            "unseen": vocabs[n].unseen,
            "ignore_index": vocabs[n].ignore_index,
        }
        for n in names
    }
    # one GZS3Evaluator per variant the segmenter reports (its variants may depend on its config)
    evaluators = {"gzs3": VariantsGZS3Evaluator(set_specs, gamma=gamma)}
    predictor_kwargs: dict[str, Any] = {
        "segmenter_uri": model.uri,
        "embeddings": {n: ctx.inputs["text"].file_uri(f"embeddings/{n}.npy") for n in names},
        "device": device,
        "resolution": tuple(cfg.resolution) if cfg.resolution else None,
    }
    if cfg.protocol_args() is not None:
        predictor_kwargs["protocol"] = cfg.protocol_args()
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
        "model": Input(MODEL_STAGES, doc="the segmenter to evaluate", kind=SEGMENTER),
        "compare": Input(
            MODEL_STAGES,
            kind=SEGMENTER,
            required=False,
            auto=False,
            doc="a second segmenter scored beside model on the same sets (e.g. the inductive ZegCLIP beside its "
            "self-trained model)",
        ),
    }

    def terminal(self, config: EvaluateConfig) -> bool:
        """Evaluation metrics are an end in themselves: nothing needs to read them."""
        return True

    def run(self, ctx: StageContext) -> dict[str, float]:
        import ray

        from zeroseg.metrics import json_safe

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
        result: dict[str, float] = {}
        doc: dict[str, Any] = {}
        log_extra: dict[str, float] = {}
        out = Path(ctx.output_dir)
        models = [("", ctx.inputs["model"])]
        if ctx.inputs.get("compare") is not None:
            models.append((f"{ctx.inputs['compare'].stage}/", ctx.inputs["compare"]))
        fps: dict[str, Any] = {}
        rows = sum(manifest_rows(ctx, n, cfg.max_images) for n in names)
        bar = ctx.progress(rows * len(models), "images")
        for model_prefix, art in models:
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
            from pipeline import tracking

            tracking.log_metrics(log_extra, run_id=ctx.mlflow_run_id)
            tracking.log_artifacts(out, run_id=ctx.mlflow_run_id)
        return result

    def note(self, metrics: Mapping[str, Any]) -> str:
        return "see metrics below"

    def summary(self, metrics: Mapping[str, Any]) -> list[Any]:
        """The metric x set table (one more per extra variant: ``<variant>/<set>/<metric>`` keys)
        and the FPS line."""
        out: list[Any] = [metrics_table(metrics)]
        extra = dict.fromkeys(k.split("/", 1)[0] for k in metrics if k.count("/") == 2)
        out += [metrics_table(metrics, variant=v) for v in extra]
        out += [comparison_table(metrics, v) for v in extra if v in MODEL_STAGES]
        line = fps_line(metrics)
        if line:
            out.append(line)
        return out


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
    from zeroseg.metrics import per_class_table, segmentation_metrics, zs3_metrics
    from zeroseg.plots import plot_per_class_iou

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


def _fmt(v: Any) -> str:
    """A metric value in percent, two decimals."""
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: Mapping[str, Any], variant: str | None = None) -> Any:
    """Evaluate's flat ``{"<set>/<metric>": value}`` as a metric x set table; with ``variant``,
    the ``{"<variant>/<set>/<metric>": value}`` entries of that variant instead.

    Metrics are rows so the table stays narrow (a ``ray job`` log is 80 columns wide) however
    many metrics there are; values are percent with two decimals; sets keep the order of the
    metrics (the evaluation order).
    """
    from rich.table import Table

    sets: dict[str, dict[str, Any]] = {}
    for k, v in metrics.items():
        parts = k.split("/")
        if variant is None and len(parts) == 2:
            sets.setdefault(parts[0], {})[parts[1]] = v
        elif variant is not None and len(parts) == 3 and parts[0] == variant:
            sets.setdefault(parts[1], {})[parts[2]] = v
    rows = [m for m in HEADLINE if any(m in d for d in sets.values())]
    rows += sorted({m for d in sets.values() for m in d} - set(rows))
    if variant in MODEL_STAGES:
        title = f"evaluation of the compared model ({variant}, evaluate.compare)"
    else:
        title = "evaluation" + (f", variant {variant}" if variant else "")
    t = Table(title=f"{title} (percent; GZS3 unless marked zs3)", title_justify="left")
    t.add_column("metric", no_wrap=True)
    for s in sets:
        t.add_column(s, justify="right", no_wrap=True)
    for m in rows:
        t.add_row(m, *[_fmt(d[m]) if m in d else "-" for d in sets.values()])
    return t


def comparison_table(metrics: Mapping[str, Any], compared: str) -> Any:
    """The evaluated model beside the compared one (``evaluate.compare``): per set and headline
    metric, the compared model's value, the model's and the difference (model - compared), in
    percentage points."""
    from rich.table import Table

    t = Table(title=f"model vs {compared} (evaluate.compare; percent, difference in points)", title_justify="left")
    for col in ("set", "metric", compared, "model", "difference"):
        t.add_column(col, justify="left" if col in ("set", "metric") else "right", no_wrap=True)
    sets = dict.fromkeys(k.split("/")[1] for k in metrics if k.startswith(f"{compared}/") and k.count("/") == 2)
    for name in sets:
        for m in ("hIoU", "mIoU_seen", "mIoU_unseen", "mIoU", "pAcc"):
            a, b = metrics.get(f"{compared}/{name}/{m}"), metrics.get(f"{name}/{m}")
            if a is None or b is None:
                continue
            t.add_row(name, m, _fmt(float(a)), _fmt(float(b)), f"{float(b) - float(a):+.2f}")
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
    "MODEL_STAGES",
    "SEGMENTER",
    "comparison_table",
    "Evaluate",
    "EvaluateConfig",
    "SegmenterPredictor",
    "fps_line",
    "fps_record",
    "metrics_table",
    "report_set",
    "resolve_device",
]
