"""Image/label decoding, label remapping and training augmentation (NumPy + PIL only).

Everything here is a pure function of its inputs and an explicit ``numpy.random.Generator``:
no torch, no Ray, no global random state. ``pipeline/datasets.py`` calls these inside Ray Data
``map_batches``; evaluation and tests call them directly.

Conventions:

* images are ``uint8 [H, W, 3]`` RGB until :func:`normalize`, which returns ``float32 [3, H, W]``
  (CHW) computed as ``(pixel / 255 - mean) / std`` (mean/std given for images in ``[0, 1]``);
* labels are ``uint8 [H, W]``; 255 is *ignore* (never a training id); a vocabulary of more than
  255 classes has ``uint16`` labels with 65535 = ignore, and training ids of more than 255 seen
  classes are ``uint16`` with 65535 = ignore too (:func:`make_lut`); every geometric transform
  keeps the label's dtype and pads with its ignore value;
* sizes are ``(height, width)`` in pixels.

The training pipeline (:func:`train_transform`) is, in order: random rescale (aspect ratio kept,
ratio drawn uniformly from ``ratio_range``), random crop to ``crop_size`` (a plain uniform crop,
no category-ratio rejection), horizontal flip with probability ``flip_prob``, normalisation, and
bottom/right padding to ``crop_size`` (image 0 in normalised space, label ignore) when the rescaled
image is smaller than the crop. No photometric distortion.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping, Sequence
from os import PathLike
from typing import Annotated

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zeroseg.config import Size
from zeroseg.data.classes import IGNORE_INDEX, IGNORE_INDEX_16, label_ignore_index
from zeroseg.errors import DataError

#: CLIP's pixel statistics for images in [0, 1] (open_clip OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class AugmentConfig(BaseModel):
    """Training augmentation settings (a config section; unknown keys are errors).

    Attributes:
        crop_size: ``(height, width)`` of every training sample, pixels.
        scale: ``(long_edge, short_edge)`` reference size, pixels (mmseg ``img_scale``, e.g.
            ``(2048, 512)``): the image is rescaled, aspect ratio kept, to fit inside
            ``scale * ratio``. ``None`` applies the ratio to the original image size.
        ratio_range: ``(low, high)`` of the uniformly drawn rescale ratio; ``(1, 1)`` disables
            random rescaling.
        flip_prob: probability of a horizontal flip, in ``[0, 1]``.
        mean, std: per-channel RGB statistics for images in ``[0, 1]``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_size: Size = (512, 512)
    scale: Size | None = None
    ratio_range: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.5, 2.0)
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = CLIP_STD

    @field_validator("ratio_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] > v[1]:
            raise ValueError(f"ratio_range must be (low, high) with low <= high, got {v}")
        return v

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentConfig:
        if self.scale is not None and self.scale[0] < self.scale[1]:
            raise ValueError(
                f"scale is (long_edge, short_edge): got {self.scale}; did you mean {(self.scale[1], self.scale[0])}?"
            )
        return self


# -- decoding --------------------------------------------------------------------------------
def _open(data: bytes | str | PathLike, what: str) -> Image.Image:
    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        im = Image.open(src)
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        name = "<bytes>" if isinstance(data, (bytes, bytearray, memoryview)) else str(data)
        raise DataError(f"cannot decode {what} {name}: {type(e).__name__}: {e}") from None


def decode_image(data: bytes | str | PathLike) -> np.ndarray:
    """Decode an image file (path or encoded bytes) to ``uint8 [H, W, 3]`` RGB.

    Grey, palette and RGBA images are converted to RGB (alpha dropped).

    Raises:
        DataError: the data is not a decodable image (names the file).
    """
    im = _open(data, "image")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8)


def decode_label(data: bytes | str | PathLike) -> np.ndarray:
    """Decode a label map (path or encoded PNG bytes) to ``uint8 [H, W]`` class ids, or
    ``uint16 [H, W]`` for a 16-bit label (build_splits writes those for vocabularies of more than
    255 classes, 65535 = ignore).

    Accepts single-channel 8-bit images (``L`` or ``P``: palette *indices* are the ids) and 16-bit
    grayscale images (``I;16``, ``I;16B``; ``I`` with values in ``[0, 65535]``).

    Raises:
        DataError: undecodable, or not a single-channel 8/16-bit image (e.g. an RGB colour label).
    """
    im = _open(data, "label")
    name = data if isinstance(data, (str, PathLike)) else "<bytes>"
    if im.mode in ("L", "P"):
        return np.asarray(im, dtype=np.uint8)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im)
        if im.mode == "I" and arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise DataError(f"label {name} (PIL mode I) has values outside [0, 65535]")
        return arr.astype(np.uint16)
    raise DataError(
        f"label {name} has PIL mode {im.mode!r}; expected a single-channel 8-bit PNG (mode L or P) "
        "or a 16-bit grayscale PNG holding one class id per pixel"
    )


# -- label remapping -------------------------------------------------------------------------
def make_lut(
    mapping: Mapping[int, int] | Sequence[int], ignore_index: int | None = None, *, source_classes: int = 255
) -> np.ndarray:
    """A lookup table from dataset/vocabulary ids to training ids.

    The table has one entry per value a source label can hold: 256 for a vocabulary of at most
    255 classes (``uint8`` labels), 65536 above (``uint16`` labels, 65535 = ignore). Its dtype is
    the training labels': ``uint8`` with ignore 255 when there are at most 255 training ids,
    else ``uint16`` with ignore 65535 (``zeroseg.data.classes.label_ignore_index`` of the number
    of training ids). The defaults give exactly the former ``uint8 [256]`` table.

    Args:
        mapping: ``{source_id: train_id}``, or a sequence of source ids whose position is the
            training id (``[3, 7]`` maps 3 -> 0 and 7 -> 1). Every other id maps to
            ``ignore_index``.
        ignore_index: the target of unmapped ids; default 255 for at most 255 distinct training
            ids, else 65535. 255 or 65535 (the dtype follows it).
        source_classes: the vocabulary size C of the source labels (default 255: ``uint8``
            labels; above 255 the table has 65536 entries).

    Raises:
        ValueError: a source id outside the table, a training id outside ``[0, ignore_index)`` or
            equal to it, or an ``ignore_index`` other than 255 / 65535.
    """
    if isinstance(mapping, Mapping):
        pairs = [(int(src), int(dst)) for src, dst in mapping.items()]
    else:
        pairs = [(int(src), dst) for dst, src in enumerate(mapping)]
    if ignore_index is None:  # by the number of distinct training ids
        ignore_index = label_ignore_index(len({t for _, t in pairs}))
    if ignore_index not in (IGNORE_INDEX, IGNORE_INDEX_16):
        raise ValueError(f"ignore_index must be {IGNORE_INDEX} or {IGNORE_INDEX_16}, got {ignore_index}")
    size = 256 if label_ignore_index(source_classes) == IGNORE_INDEX else 65536
    lut = np.full(size, ignore_index, dtype=np.uint8 if ignore_index == IGNORE_INDEX else np.uint16)
    for src, train_id in pairs:
        if not (0 <= src < size and 0 <= train_id <= ignore_index):
            raise ValueError(f"label ids must be in [0, {size - 1}] -> [0, {ignore_index}]: {src} -> {train_id}")
        if train_id == ignore_index:
            raise ValueError(f"training id {train_id} collides with ignore_index {ignore_index}")
        lut[src] = train_id
    return lut


def lut_ignore_index(lut: np.ndarray) -> int:
    """The training ignore value of a :func:`make_lut` table: 255 (``uint8``) or 65535 (``uint16``)."""
    return IGNORE_INDEX if lut.dtype == np.uint8 else IGNORE_INDEX_16


def check_lut(lut: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``lut`` is a :func:`make_lut` table: ``uint8`` or ``uint16``,
    256 or 65536 entries."""
    if lut.ndim != 1 or lut.shape[0] not in (256, 65536) or lut.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"lut must be uint8 [256] (or uint8/uint16 [65536] for 16-bit labels), got {lut.dtype} {lut.shape}"
        )


def remap_label(label: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map every pixel through ``lut`` (:func:`make_lut`): training ids / ignore, in the lut's
    dtype (``uint8`` / 255, or ``uint16`` / 65535).

    Args:
        label: ``uint8 [H, W]`` or ``uint16 [H, W]`` vocabulary ids.
        lut: ``[256]`` for ``uint8`` labels, ``[65536]`` for ``uint16`` labels (a 65536 table also
            takes ``uint8`` labels).

    Raises:
        ValueError: a malformed ``lut``, or a ``uint16`` label with a 256-entry ``lut``.
    """
    check_lut(lut)
    if label.dtype != np.uint8 and lut.shape[0] < 65536:
        raise ValueError(
            f"a {label.dtype} label needs a 65536-entry lut (make_lut(..., source_classes=C) with C > 255)"
        )
    return lut[label]


# -- randomness ------------------------------------------------------------------------------
def sample_rng(seed: int, key: str | int, epoch: int = 0) -> np.random.Generator:
    """A generator determined by ``(seed, key, epoch)`` only (``key``: e.g. the image id).

    Independent of batch composition, task layout and process, so a sample's augmentation is
    reproducible wherever it is computed.
    """
    k = zlib.crc32(key.encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, k, int(epoch) & 0xFFFFFFFF])


# -- geometric transforms --------------------------------------------------------------------
def rescale_size(hw: tuple[int, int], ratio: float, scale: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(h, w)`` after rescaling by ``ratio`` (relative to ``scale`` when given), aspect kept."""
    h, w = hw
    if scale is None:
        f = ratio
    else:
        long_edge, short_edge = scale[0] * ratio, scale[1] * ratio
        f = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize to ``size = (h, w)``: bilinear for the image, nearest for the label."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    lbl = None if label is None else np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return img, lbl


def _crop_origin(hw: tuple[int, int], crop_size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
    ch, cw = crop_size
    h, w = hw
    y0 = int(rng.integers(0, h - ch + 1)) if h > ch else 0
    x0 = int(rng.integers(0, w - cw + 1)) if w > cw else 0
    return y0, x0


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` = ``(image / 255 - mean) / std``."""
    scale = 1.0 / (255.0 * np.asarray(std, dtype=np.float32))
    shift = np.asarray(mean, dtype=np.float32) / np.asarray(std, dtype=np.float32)
    out = image.astype(np.float32) * scale - shift
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def pad_to(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pad a CHW float image (with 0) and its label (with its ignore: 255 for ``uint8``, 65535
    for ``uint16``) at the bottom/right to ``size``."""
    ch, cw = size
    _, h, w = image.shape
    if (h, w) == (ch, cw):
        return image, label
    img = np.zeros((image.shape[0], ch, cw), dtype=image.dtype)
    img[:, :h, :w] = image
    fill = IGNORE_INDEX if label.dtype == np.uint8 else IGNORE_INDEX_16
    lbl = np.full((ch, cw), fill, dtype=label.dtype)
    lbl[:h, :w] = label
    return img, lbl


def train_transform(
    image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale -> random crop -> flip -> normalise -> pad (see module docstring).

    Args:
        image: ``uint8 [H, W, 3]`` RGB.
        label: ``uint8 [H, W]`` training ids / 255 (or ``uint16`` / 65535), same H, W as the image.
        cfg: augmentation settings.
        rng: the sample's generator (:func:`sample_rng`); the output is a function of
            ``(image, label, cfg, rng state)``.

    Returns:
        ``(float32 [3, crop_h, crop_w], label [crop_h, crop_w])`` (the label's dtype).

    Raises:
        DataError: image and label sizes differ.
    """
    image, label, _ = train_transform_with(image, label, None, cfg, rng)
    return image, label


def train_transform_with(
    image: np.ndarray, label: np.ndarray, extra: np.ndarray | None, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """:func:`train_transform` that also applies the same geometry (nearest rescale, crop, flip,
    padding with its ignore) to a second label map ``extra`` of the label's size (self_train's
    held-out unseen label); the random draws are :func:`train_transform`'s, so ``image`` and
    ``label`` come out exactly as there.

    Raises:
        DataError: image and label (or ``extra``) sizes differ.
    """
    if image.shape[:2] != label.shape or (extra is not None and extra.shape != label.shape):
        other = label if image.shape[:2] != label.shape else extra
        raise DataError(
            f"image is {image.shape[1]}x{image.shape[0]} but its label is {other.shape[1]}x{other.shape[0]} (W x H)"
        )
    lo, hi = cfg.ratio_range
    ratio = float(rng.uniform(lo, hi)) if hi > lo else lo
    size = rescale_size(image.shape[:2], ratio, cfg.scale)
    image, label = resize(image, label, size)
    if extra is not None and extra.shape != label.shape:
        extra = np.asarray(Image.fromarray(extra).resize((size[1], size[0]), Image.NEAREST))
    ch, cw = cfg.crop_size
    y0, x0 = _crop_origin(image.shape[:2], cfg.crop_size, rng)
    image, label = image[y0 : y0 + ch, x0 : x0 + cw], label[y0 : y0 + ch, x0 : x0 + cw]
    if extra is not None:
        extra = extra[y0 : y0 + ch, x0 : x0 + cw]
    if cfg.flip_prob > 0 and rng.random() < cfg.flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]
        extra = None if extra is None else extra[:, ::-1]
    out = normalize(image, cfg.mean, cfg.std)
    out_img, out_lbl = pad_to(out, np.ascontiguousarray(label), cfg.crop_size)
    if extra is not None:
        _, extra = pad_to(out, np.ascontiguousarray(extra), cfg.crop_size)
    return out_img, out_lbl, extra
