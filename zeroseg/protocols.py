"""Test protocols: how an image of any size becomes per-class scores of a segmenter.

The papers evaluate at different geometries; ``stages/evaluate.py`` selects one with
``evaluate.protocol`` and calls these functions (torch only; no Ray, no pipeline):

``resize`` (this repository's original protocol)
    the whole image resized to the segmenter's ``input_size`` (or ``evaluate.resolution``),
    one forward, scores upsampled bilinearly to the label size by the evaluator.

``slide`` (ZegCLIP's released test, mmseg ``EncoderDecoder.slide_inference``)
    1. the image is resized keeping its aspect ratio so that its **short side** is
       ``short_side`` (default: the crop's short side, 512). Source: ZegCLIP's test pipeline
       ``Resize(img_scale=(2048, 512), keep_ratio=True, min_size=512)``; with ``min_size`` mmseg
       rescales the short side to 512 and the 2048 long-side cap no longer applies
       (``mmseg/datasets/pipelines/transforms.py`` ``Resize._resize_img``); sizes are rounded
       ``int(x + 0.5)`` (mmcv ``_scale_size``). :func:`short_side_size`.
    2. windows of ``crop`` (512 x 512) every ``stride`` (426) pixels; the last window of a row or
       column is moved back so that it ends at the border; an image smaller than the crop gives
       one window of the image's size (:func:`window_grid`, mmseg's grid).
    3. each window's scores are upsampled bilinearly to the window size, the activation is applied
       there (ZegCLIP's head upsamples its mask logits to the 512 x 512 input and takes the sigmoid
       in ``semantic_inference``, i.e. **inside** each window), summed into the image and divided
       by the number of windows covering each pixel (:func:`slide_window_scores`);
    4. the evaluator upsamples the averaged scores bilinearly to the label size (mmseg
       ``rescale``) and applies the seen-class calibration there. ZegCLIP subtracts gamma inside
       each window, before the averaging; subtracting a constant per channel commutes with the
       averaging and with bilinear resizing (both weight sums are 1), so the scores are the same.

    Paper vs code: the issue text asked for "logits averaged over overlaps, upsampled before the
    sigmoid"; in the released code the sigmoid is applied per window (after upsampling that
    window's logits to the window size) and the *probabilities* are averaged. The released order is
    the default (``activation_at="input"``); ``activation_at="label"`` averages logits and applies
    the activation after the upsampling to the label size.

``short_side`` (the detectron2 methods: ZegFormer, DeOP; ``ResizeShortestEdge`` at test time)
    short side resized to ``short_side`` (COCO-Stuff 640, VOC 512: ``INPUT.MIN_SIZE_TEST``), the
    long side capped at ``max_long_side`` (``INPUT.MAX_SIZE_TEST``) by scaling both sides, the
    normalised image zero-padded right/bottom to a multiple of the segmenter's
    ``size_divisibility`` (detectron2 ``ImageList.from_tensors``, after normalisation), one
    forward, the scores upsampled to the padded size, the padding cropped off (detectron2
    ``sem_seg_postprocess``), then the evaluator upsamples to the label size
    (:func:`forward_padded`).

The activation (``Segmenter.activation``: ``none``, ``sigmoid``, ``softmax`` over classes) is
applied by these functions to scores at the network input's resolution (a window, the padded
image, the resized image), after bilinear upsampling of the pre-activation scores
(``Segmenter.logits``), when ``activation`` is given; with ``"none"`` they only move scores.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Activation = Literal["none", "sigmoid", "softmax"]
ACTIVATIONS: tuple[str, ...] = ("none", "sigmoid", "softmax")
#: The key of a segmenter's only output in the ``{variant: scores}`` dicts of this module.
SINGLE = ""

ScoreFn = Callable[[torch.Tensor], "torch.Tensor | Mapping[str, torch.Tensor]"]


def activate(scores: torch.Tensor, activation: str) -> torch.Tensor:
    """``scores`` ``[B, C, H, W]`` through the activation: ``none`` (unchanged), ``sigmoid``
    (per class: ZegCLIP Sec. 3.4), ``softmax`` (over the class dimension 1).

    Raises:
        ValueError: an unknown activation name.
    """
    if activation == "none":
        return scores
    if activation == "sigmoid":
        return torch.sigmoid(scores)
    if activation == "softmax":
        return torch.softmax(scores, dim=1)
    raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


def as_variants(out: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A segmenter output as ``{variant: scores}`` (a single tensor under :data:`SINGLE`)."""
    if isinstance(out, Mapping):
        return dict(out)
    return {SINGLE: out}


def short_side_size(height: int, width: int, short_side: int, max_long_side: int | None = None) -> tuple[int, int]:
    """``(H', W')`` of an ``height x width`` image resized keeping its aspect ratio so that its
    short side is ``short_side``; if the long side would then exceed ``max_long_side``, both sides
    are scaled down so that it equals it. Rounded ``int(x + 0.5)``.

    The rule of detectron2's ``ResizeShortestEdge.get_output_shape`` (ZegFormer, DeOP: short
    side 640 COCO-Stuff / 512 VOC) and of mmseg's ``Resize`` with ``keep_ratio`` and ``min_size``
    (ZegCLIP: 512, no long-side cap).

    Raises:
        ValueError: a non-positive size.
    """
    if min(height, width, short_side) <= 0 or (max_long_side is not None and max_long_side <= 0):
        raise ValueError(
            f"sizes must be positive: image {height}x{width}, short_side {short_side}, max {max_long_side}"
        )
    scale = short_side / min(height, width)
    h, w = height * scale, width * scale
    if max_long_side is not None and max(h, w) > max_long_side:
        s = max_long_side / max(h, w)
        h, w = h * s, w * s
    return int(h + 0.5), int(w + 0.5)


def window_grid(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """The sliding windows ``(y1, y2, x1, x2)`` (end exclusive) over an ``height x width`` image,
    row by row (mmseg ``slide_inference``; ZegCLIP's released test: crop 512, stride 426).

    ``ceil((H - crop_h) / stride_h) + 1`` rows (at least 1), windows starting every ``stride``
    pixels; a window that would cross the border is moved back to end at it; an image smaller than
    the crop gives windows of the image's size in that dimension. Every window has the size
    ``(min(crop_h, H), min(crop_w, W))``.

    Raises:
        ValueError: non-positive sizes, or a stride larger than the crop (pixels would be left out).
    """
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    if min(height, width, ch, cw, sh, sw) <= 0:
        raise ValueError(f"sizes must be positive: image {height}x{width}, crop {ch}x{cw}, stride {sh}x{sw}")
    if sh > ch or sw > cw:
        raise ValueError(f"stride {sh}x{sw} is larger than the crop {ch}x{cw}: some pixels would be in no window")
    rows = max(height - ch + sh - 1, 0) // sh + 1
    cols = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * sh + ch, height), min(j * sw + cw, width)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    """``512`` -> ``(512, 512)``; ``[h, w]`` -> ``(h, w)``."""
    if isinstance(v, int):
        return int(v), int(v)
    h, w = v
    return int(h), int(w)


def padded_size(height: int, width: int, divisor: int) -> tuple[int, int]:
    """The smallest ``(H', W') >= (height, width)`` that are multiples of ``divisor`` (>= 1)."""
    d = max(int(divisor), 1)
    return math.ceil(height / d) * d, math.ceil(width / d) * d


def forward_padded(
    fn: ScoreFn,
    images: torch.Tensor | Sequence[torch.Tensor],
    divisor: int = 1,
    activation: str = "none",
) -> dict[str, list[torch.Tensor]]:
    """One forward of images of possibly different sizes, padded; scores cropped back per image.

    The images (normalised) are zero-padded right/bottom to a common size, the smallest multiple
    of ``divisor`` that holds the largest (detectron2 ``ImageList.from_tensors``: padding after
    normalisation, value 0); ``fn`` runs once on the batch; each output is upsampled bilinearly
    (``align_corners=False``) to the padded size, passed through ``activation`` and cropped to each
    image's own size (detectron2 ``sem_seg_postprocess``). Batch images of equal padded size to
    get exactly what one image per forward gives (for models whose images do not interact).

    Args:
        fn: ``images [B, 3, H', W'] -> scores [B, C, h, w]`` or ``{variant: scores}``.
        images: ``[B, 3, H, W]`` or a sequence of ``[3, H_i, W_i]`` / ``[1, 3, H_i, W_i]``.
        divisor: pad to multiples of it (``Segmenter.size_divisibility``; 1 = no padding beyond
            the largest image).
        activation: see :func:`activate`, applied at the padded resolution.

    Returns:
        ``{variant: [scores [1, C, H_i, W_i] float32 per image]}`` (:data:`SINGLE` for a single
        output), on ``fn``'s device.

    Raises:
        ValueError: no images, images not 3-channel, or ``fn`` returning scores that are not
            ``[B, C, h, w]`` for the ``B`` images given.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        imgs = list(images.unbind(0))
        batch0 = images
    else:
        imgs = [x[0] if x.ndim == 4 else x for x in images]
        batch0 = None
    if not imgs:
        raise ValueError("forward_padded needs at least one image")
    if any(x.ndim != 3 or x.shape[0] != 3 for x in imgs):
        raise ValueError(f"images must be [3, H, W], got {[tuple(x.shape) for x in imgs]}")
    sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in imgs]
    ph, pw = padded_size(max(h for h, _ in sizes), max(w for _, w in sizes), divisor)
    if batch0 is not None and tuple(batch0.shape[-2:]) == (ph, pw):
        batch = batch0
    else:
        batch = imgs[0].new_zeros((len(imgs), 3, ph, pw))
        for i, x in enumerate(imgs):
            batch[i, :, : x.shape[-2], : x.shape[-1]] = x
    out: dict[str, list[torch.Tensor]] = {}
    for key, s in as_variants(fn(batch)).items():
        if s.ndim != 4 or s.shape[0] != len(imgs):
            raise ValueError(
                f"the segmenter returned scores {tuple(s.shape)}{f' for variant {key!r}' if key else ''} "
                f"for {len(imgs)} images; expected [{len(imgs)}, C, h, w]"
            )
        s = s.float()
        if tuple(s.shape[-2:]) != (ph, pw):
            s = F.interpolate(s, size=(ph, pw), mode="bilinear", align_corners=False)
        s = activate(s, activation)
        out[key] = [s[i : i + 1, :, :h, :w] for i, (h, w) in enumerate(sizes)]
    return out


def slide_window_scores(
    fn: ScoreFn,
    image: torch.Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    divisor: int = 1,
    activation: str = "none",
    windows_per_forward: int = 4,
) -> dict[str, torch.Tensor]:
    """Sliding-window scores of one (resized, normalised) image (mmseg ``slide_inference``).

    Each window of :func:`window_grid` goes through :func:`forward_padded` (its scores upsampled
    to the window size, the activation applied there); the window scores are summed into the
    image and divided by the number of windows covering each pixel (every pixel is covered at
    least once).

    Args:
        fn: ``images [B, 3, h, w] -> scores [B, C, h', w']`` or ``{variant: scores}``.
        image: ``[1, 3, H, W]`` (or ``[3, H, W]``).
        crop, stride: ``(h, w)`` in pixels (ZegCLIP: 512, 426).
        divisor: ``Segmenter.size_divisibility`` (a window is padded to it, then cropped back).
        activation: applied to each window's upsampled scores (ZegCLIP's released order).
        windows_per_forward: windows batched into one forward (memory only; same scores).

    Returns:
        ``{variant: scores [1, C, H, W] float32}``.

    Raises:
        ValueError: see :func:`window_grid` and :func:`forward_padded`.
    """
    x = image if image.ndim == 4 else image[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"slide_window_scores takes one image [1, 3, H, W], got {tuple(image.shape)}")
    H, W = int(x.shape[-2]), int(x.shape[-1])
    boxes = window_grid(H, W, crop, stride)
    count = torch.zeros((1, 1, H, W), dtype=torch.float32, device=x.device)
    for y1, y2, x1, x2 in boxes:
        count[..., y1:y2, x1:x2] += 1
    acc: dict[str, torch.Tensor] = {}
    step = max(int(windows_per_forward), 1)
    for start in range(0, len(boxes), step):
        part = boxes[start : start + step]
        outs = forward_padded(fn, [x[0, :, y1:y2, x1:x2] for y1, y2, x1, x2 in part], divisor, activation)
        for key, per_window in outs.items():
            a = acc.get(key)
            if a is None:
                a = acc[key] = torch.zeros((1, per_window[0].shape[1], H, W), dtype=torch.float32, device=x.device)
            for (y1, y2, x1, x2), s in zip(part, per_window):
                a[..., y1:y2, x1:x2] += s
    return {key: a / count for key, a in acc.items()}


__all__ = [
    "ACTIVATIONS",
    "SINGLE",
    "Activation",
    "activate",
    "as_variants",
    "forward_padded",
    "padded_size",
    "short_side_size",
    "slide_window_scores",
    "window_grid",
]
