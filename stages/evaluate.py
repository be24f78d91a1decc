"""Stage ``evaluate``: run a segmenter over every evaluation set and score it (GZS3 and ZS3).

Reads ``classes.json`` and ``manifests/<set>.parquet`` of build_splits (``splits``),
``embeddings/<set>.npy`` of embed_text (``text``) and a segmenter artifact (``model``: of
train_classifier, or of train_generator / self_train when the config has them; set
``evaluate.model`` when it has several). One batch-inference pass (``pipeline.inference``) over
all selected sets::

    manifest rows of every set (+ set column) -> ray.data.from_arrow
      -> actor pool of SegmenterPredictor (the model loaded once per actor)
      -> GZS3Evaluator partial states, merged on the driver

This module is the stage's spec (config, inputs, summary; torch-free); the pass is its job,
``stages.jobs.evaluate``. Its ``SegmenterPredictor`` decodes each image and label PNG and turns
the images into class scores with ``zeroseg.inference.infer`` under the configured test protocol
(``evaluate.protocol``, :meth:`EvaluateConfig.eval_protocol`; geometry in ``zeroseg.protocols``):

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

Wiring only; the science is in ``zeroseg.inference``, ``zeroseg.metrics``, ``zeroseg.evaluation``
and ``zeroseg.models``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from rich.table import Table

from pipeline.config import Runtime
from pipeline.dag import Input, StageConfig
from stages.common import Device, JobStage
from zeroseg.config import square
from zeroseg.config.protocol import EvalProtocol
from zeroseg.data.transforms import Size

#: The column of the pass's rows naming each row's eval set.
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
    device: Device = "auto"
    num_gpus_per_worker: Annotated[float | None, Runtime(why="resources")] = Field(None, ge=0.0)
    concurrency: Annotated[int, Runtime(why="concurrency")] = Field(1, ge=1)
    warmup_batches: Annotated[int, Runtime(why="timing")] = Field(1, ge=0)

    _square = field_validator("crop", "stride", mode="before")(square)

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

    def eval_protocol(self) -> EvalProtocol:
        """The test protocol of these keys (``zeroseg.inference.infer``'s argument; ``slide``
        batches ``batch_size`` windows per forward)."""
        return EvalProtocol(
            name=self.protocol,
            resolution=self.resolution,
            crop=self.crop,
            stride=self.stride,
            short_side=self.short_side,
            max_long_side=self.max_long_side,
            activation_at=self.activation_at,
            windows_per_forward=self.batch_size,
        )


class Evaluate(JobStage):
    """GZS3 / ZS3 evaluation of a segmenter on every eval set (see module docstring; the pass:
    ``stages.jobs.evaluate``)."""

    name = "evaluate"
    job = "stages.jobs.evaluate"
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
    "HEADLINE",
    "MODEL_STAGES",
    "SEGMENTER",
    "Evaluate",
    "EvaluateConfig",
    "comparison_table",
    "fps_line",
    "metrics_table",
]
