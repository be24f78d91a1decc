"""A segmenter applied to images under a test protocol: decoded images + class text embeddings ->
class scores (mmseg's ``EncoderDecoder.inference``). No Ray, no pipeline: a notebook or a
benchmark calls it as the evaluate stage's actors do (``stages.jobs.evaluate``)::

    from zeroseg.config.protocol import EvalProtocol
    from zeroseg.inference import infer

    scores = infer(segmenter, [image_uint8_hwc, ...], text_embeddings, EvalProtocol(name="slide", stride=426))

The protocols' geometry (resizing, windows, padding, the activation at the input resolution) is in
``zeroseg.protocols``; this module prepares the images (scale, resize, normalise), checks the
segmenter's optional attributes against each other (``zeroseg.models.Segmenter``: ``activation``
with ``scores_are_probabilities``, ``variants``, ``encode_text``'s shape), fills the protocol's
defaults from the segmenter and dispatches.

Scores leave here at the network input's resolution (or the segmenter's output grid under
``resize`` without an activation); the evaluator (``zeroseg.evaluation``) upsamples them to each
label and applies the calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from zeroseg.config.protocol import EvalProtocol
from zeroseg.errors import ConfigError, DataError
from zeroseg.protocols import (
    ACTIVATIONS,
    SINGLE,
    as_variants,
    forward_padded,
    padded_size,
    short_side_size,
    slide_window_scores,
)

#: What :func:`infer` returns for one text: a batch tensor, a list of per-image tensors, or
#: ``{variant: either}`` for a segmenter with ``variants``.
Scores = Any


def activation_of(segmenter: Any) -> str:
    """The segmenter's ``activation`` (``none``, ``sigmoid``, ``softmax``), checked.

    Raises:
        DataError: an unknown activation, or an activation without ``scores_are_probabilities``
            (calibration subtracts gamma from the activated scores, so they must be probabilities).
    """
    cls = type(segmenter).__name__
    act = str(getattr(segmenter, "activation", "none"))
    if act not in ACTIVATIONS:
        raise DataError(f"{cls}.activation is {act!r}; expected one of {', '.join(ACTIVATIONS)}")
    if act != "none" and not getattr(segmenter, "scores_are_probabilities", False):
        raise DataError(
            f"{cls}.activation is {act!r} but scores_are_probabilities is False: its activated scores are "
            "probabilities; set scores_are_probabilities = True (calibration subtracts gamma from them)"
        )
    return act


def variants_of(segmenter: Any) -> tuple[str, ...]:
    """The segmenter's ``variants`` (empty: a single output), in its order (``variants[0]`` is
    reported first)."""
    return tuple(getattr(segmenter, "variants", ()) or ())


def unwrap_variants(segmenter: Any, out: Mapping[str, Any]) -> Scores:
    """``{variant: scores}`` (``zeroseg.protocols``' form) as the evaluator takes it: the scores
    alone for a segmenter without variants, else the dict.

    Raises:
        DataError: outputs that do not match the segmenter's ``variants``, or a variant name that
            is empty or holds ``/`` (it names metrics ``<variant>/<set>/<metric>`` and a folder).
    """
    variants = variants_of(segmenter)
    cls = type(segmenter).__name__
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
    return dict(out)


def encode_prompts(segmenter: Any, prompt_names: Sequence[str], label: str) -> torch.Tensor:
    """The class embeddings a segmenter that ``encodes_text`` makes of ``prompt_names``.

    Args:
        segmenter: a segmenter whose ``encode_text`` embeds class names (DeOP).
        prompt_names: one per class, in class order (``classes.json``'s ``prompt_names``).
        label: what the names are, for the error (e.g. ``"eval set 'val'"``).

    Returns:
        ``float32 [C, D]`` on the segmenter's device (detached).

    Raises:
        DataError: ``encode_text`` returned anything but ``[C, D]``.
    """
    names = list(prompt_names)
    with torch.inference_mode():
        t = segmenter.encode_text(names)
    if t.ndim != 2 or t.shape[0] != len(names):
        raise DataError(
            f"{type(segmenter).__name__}.encode_text returned {tuple(t.shape)} for the {len(names)} prompt names "
            f"of {label}; expected [{len(names)}, D]"
        )
    return t.detach().float()


def normalisation(segmenter: Any, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)`` of the segmenter (``Segmenter.mean`` / ``std``) as ``float32 [1, 3, 1, 1]``
    on ``device``."""
    mean = torch.tensor(segmenter.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(segmenter.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return mean, std


def prepare_image(
    image: np.ndarray, size: Sequence[int], mean: torch.Tensor, std: torch.Tensor, antialias: bool = True
) -> torch.Tensor:
    """``uint8 [H, W, 3]`` RGB -> the network input ``float32 [1, 3, *size]`` on ``mean``'s
    device: scaled to [0, 1], resized bilinearly (``align_corners=False``; ``antialias`` as given:
    PIL-like when True, cv2-like when False) when the size differs, then ``(x - mean) / std``
    (``mean`` / ``std``: ``[1, 3, 1, 1]``)."""
    size = tuple(size)
    a = image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")
    x = torch.from_numpy(a).to(mean.device).permute(2, 0, 1)[None].float().div_(255.0)
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return (x - mean) / std


def prepare_images(
    images: Sequence[np.ndarray], size: Sequence[int], mean: torch.Tensor, std: torch.Tensor, antialias: bool = True
) -> torch.Tensor:
    """:func:`prepare_image` of each image, concatenated: ``float32 [B, 3, *size]`` (the resize
    protocol's batch; the proposal model's input)."""
    return torch.cat([prepare_image(im, size, mean, std, antialias) for im in images])


def resolve_protocol(segmenter: Any, protocol: EvalProtocol) -> EvalProtocol:
    """``protocol`` with the defaults that depend on the segmenter filled (idempotent):
    ``resize``: ``resolution`` (default its ``input_size``); ``slide``: ``crop`` (default its
    ``input_size``), ``stride``, ``short_side`` (default the crop's short side); ``short_side``:
    unchanged. Sizes become tuples of ints.

    Raises:
        ConfigError: ``slide`` without a stride or with a stride larger than the crop (pixels would
            be in no window); ``short_side`` without a short side. Each message starts with the
            protocol key concerned.
    """
    p = protocol
    if p.name == "resize":
        return p.model_copy(update={"resolution": tuple(int(s) for s in (p.resolution or segmenter.input_size))})
    if p.name == "slide":
        crop = tuple(int(c) for c in (p.crop or segmenter.input_size))
        if p.stride is None:
            raise ConfigError("stride: protocol slide needs a stride (ZegCLIP's released test: crop 512, stride 426)")
        stride = tuple(int(s) for s in p.stride)
        if stride[0] > crop[0] or stride[1] > crop[1]:
            raise ConfigError(
                f"stride {list(stride)} is larger than the crop {list(crop)} (the segmenter's input_size when crop "
                "is not set): some pixels would be in no window"
            )
        return p.model_copy(update={"crop": crop, "stride": stride, "short_side": int(p.short_side or min(crop))})
    if p.short_side is None:
        raise ConfigError("short_side: protocol short_side needs a short side (detectron2's INPUT.MIN_SIZE_TEST)")
    return p


def infer(
    segmenter: Any,
    images: Sequence[np.ndarray],
    text: torch.Tensor,
    protocol: EvalProtocol | None = None,
    *,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> Scores:
    """Class scores of ``images`` under ``protocol`` (``zeroseg.protocols``), in inference mode.

    - ``resize``: every image resized to ``resolution`` (antialiased), one forward of the batch;
    - ``slide``: per image, short side resized to ``short_side`` (no antialiasing: mmcv's
      ``imrescale``), windows of ``crop`` every ``stride``, ``windows_per_forward`` windows per
      forward, averaged over overlaps (:func:`zeroseg.protocols.slide_window_scores`);
    - ``short_side``: per image, short side ``short_side`` (long side at most ``max_long_side``,
      antialiased: detectron2's PIL resize); images of equal padded size share a forward
      (:func:`zeroseg.protocols.forward_padded`: the same scores as one per forward).

    A segmenter with an ``activation`` runs through ``logits``; with ``activation_at: input`` the
    logits are upsampled to the network input (the resized image, the window, the padded image)
    and activated there; with ``label`` they are returned as logits (the caller applies
    :func:`zeroseg.protocols.activate` after upsampling to the label size).

    Args:
        segmenter: a ``zeroseg.models.Segmenter`` (``forward(images [B, 3, H, W], text [C, D])
            -> [B, C, h, w]`` or ``{variant: ...}``; ``input_size``, ``mean``, ``std``; the
            optional attributes of its class docstring).
        images: decoded ``uint8 [H_i, W_i, 3]`` RGB images (any sizes).
        text: ``float32 [C, D]`` class embeddings on the segmenter's device.
        protocol: the test protocol (default :class:`EvalProtocol`: ``resize`` to ``input_size``);
            defaults are filled by :func:`resolve_protocol`.
        mean, std: ``float32 [1, 3, 1, 1]`` on the device (default: :func:`normalisation` of the
            segmenter on ``text``'s device; pass them to build them once).

    Returns:
        ``resize`` without an activation at the input: ``float32 [B, C, h, w]`` (the segmenter's
        output grid); otherwise a list of ``float32 [1, C, H'_i, W'_i]`` per image at its network
        input's size (``resize``: ``resolution``; ``slide`` / ``short_side``: the resized image).
        For a segmenter with ``variants``: ``{variant: that}``.

    Raises:
        ConfigError: see :func:`resolve_protocol`.
        DataError: see :func:`activation_of` and :func:`unwrap_variants`.
        ValueError: scores that are not ``[B, C, h, w]`` (``zeroseg.protocols``).
    """
    p = resolve_protocol(segmenter, protocol or EvalProtocol())
    if mean is None or std is None:
        mean, std = normalisation(segmenter, text.device)
    act = activation_of(segmenter)
    at_input = act if p.activation_at == "input" else "none"
    if act != "none":

        def fn(x: torch.Tensor) -> Any:
            return segmenter.logits(x, text)
    else:

        def fn(x: torch.Tensor) -> Any:
            return segmenter(x, text)

    divisor = int(getattr(segmenter, "size_divisibility", 1) or 1)
    with torch.inference_mode():
        if p.name == "resize":
            x = prepare_images(images, p.resolution, mean, std)
            if at_input == "none":
                return unwrap_variants(segmenter, as_variants(fn(x)))  # the batch's scores as they are
            return unwrap_variants(segmenter, forward_padded(fn, x, 1, at_input))  # logits -> input -> activation
        if p.name == "slide":
            per = []
            for im in images:
                size = short_side_size(im.shape[0], im.shape[1], p.short_side, p.max_long_side)
                x = prepare_image(im, size, mean, std, antialias=False)  # mmcv.imrescale: cv2 bilinear
                per.append(slide_window_scores(fn, x, p.crop, p.stride, divisor, at_input, p.windows_per_forward))
            return unwrap_variants(segmenter, {k: [d[k] for d in per] for k in per[0]})
        # short_side: images of equal padded size share a forward (same result as one per forward)
        xs, by_pad = [], {}
        for i, im in enumerate(images):
            size = short_side_size(im.shape[0], im.shape[1], p.short_side, p.max_long_side)
            xs.append(prepare_image(im, size, mean, std, antialias=True))  # detectron2: PIL bilinear (antialiased)
            by_pad.setdefault(padded_size(*size, divisor), []).append(i)
        slots: dict[str, list[Any]] = {}
        for idx in by_pad.values():
            for k, per_image in forward_padded(fn, [xs[i] for i in idx], divisor, at_input).items():
                col = slots.setdefault(k, [None] * len(images))
                for i, s in zip(idx, per_image):
                    col[i] = s
        return unwrap_variants(segmenter, slots)


__all__ = [
    "EvalProtocol",
    "Scores",
    "activation_of",
    "encode_prompts",
    "infer",
    "normalisation",
    "prepare_image",
    "prepare_images",
    "resolve_protocol",
    "unwrap_variants",
    "variants_of",
]
