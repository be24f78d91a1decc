"""Segmentation metrics for zero-shot semantic segmentation: confusion matrices, IoU, accuracy,
mIoU over seen / unseen classes, hIoU, and the GZS3 / ZS3 predictions with seen-class
calibration.

Conventions (binding for every number the pipeline reports):

- **Confusion matrix** ``cm[g, p]``: int64 ``[C, C]``, rows = ground-truth class ``g``, columns =
  predicted class ``p``, counted over every *valid* pixel (ground truth != ``ignore_index``,
  255) of the whole evaluation set (accumulated, not averaged per image: mmseg's
  ``total_area_*``). Built with one ``bincount(C * gt + pred, minlength=C*C)`` per call.
- **Units: percent** (0-100), like the papers' tables.
- **Per-class IoU** = TP / (TP + FP + FN) = ``cm[c,c] / (row_c + col_c - cm[c,c])``; **per-class
  accuracy** = TP / (TP + FN) = ``cm[c,c] / row_c``.
- **Absent classes** follow mmseg (the ZegFormer / ZegCLIP / PADing code base:
  ``mmseg.core.evaluation.metrics`` computes ``IoU = intersect / union`` and averages with
  ``np.nanmean``): a class with no ground-truth pixels **and** no predicted pixels has IoU NaN
  (0/0) and is left out of every mean; a class with no ground-truth pixels that *is* predicted
  somewhere has IoU 0 and counts (pulling the mean down). Accuracy is NaN for every class
  without ground-truth pixels. A mean over no finite value is NaN.
- **mIoU(S), mIoU(U)**: the NaN-skipping mean IoU over the seen / unseen class ids;
  **hIoU** = 2·S·U / (S + U) (ZegCLIP Eq. 9), 0 when S + U = 0, NaN when S or U is NaN.
- **pAcc** = trace / total valid pixels; **mAcc** = NaN-skipping mean of per-class accuracy.
- **GZS3**: every pixel is labelled by the argmax over *all* classes (seen + unseen), after the
  optional calibration (ZegFormer Eq. 2): ``argmax_c p(c) - gamma * [c in S]`` where ``p`` is the
  softmax over classes of the scores (ZegFormer calibrates probabilities, gamma in [0, 1]).
  With ``gamma == 0`` this is the plain argmax of the scores.
- **ZS3**: the argmax over the *unseen* classes only, evaluated on the pixels whose ground truth
  is an unseen class; its confusion matrix is ``[U, U]`` indexed by position in ``unseen_ids``.

Functions taking torch tensors compute on the tensors' device (CPU or GPU); the metric
functions take NumPy confusion matrices. Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from zeroseg.data.classes import IGNORE_INDEX  # ground-truth value of pixels that are not evaluated


# --------------------------------------------------------------------------------------------
# confusion matrices
# --------------------------------------------------------------------------------------------
# How one bincount handles ignore and validation without masked copies: every pixel gets a
# *row*: for uint8 labels the label value itself (rows 0..255: class rows [0, C), the ignore row
# 255, anything else invalid); for other dtypes [0, C) kept, ignore -> C, anything else -> C + 1.
# ``bincount(row * C + pred)`` then counts every pixel; the class rows are the confusion matrix,
# the ignore row is dropped, and a non-zero invalid row is an error. Predictions are checked with
# one min/max (a prediction outside [0, C) at an ignored pixel takes a slower masked path).
def _first_bad(values: np.ndarray, num_classes: int, ignore_index: int | None) -> int:
    """The first value of ``values`` outside ``[0, C)`` (and not ``ignore_index``)."""
    v = values.reshape(-1)
    bad = (v < 0) | (v >= num_classes)
    if ignore_index is not None:
        bad &= v != ignore_index
    return int(v[np.flatnonzero(bad)[0]])


def _check_args(num_classes: int, ignore_index: int) -> int:
    c = int(num_classes)
    if c < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if 0 <= ignore_index < c:
        raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes {c})")
    return c


#: CPU tensors are counted with NumPy (zero-copy views); False forces ``torch.bincount`` on CPU
#: too (the code path CUDA tensors take; the tests flip it to cover that path without a GPU).
NUMPY_ON_CPU = True

#: Pixels per NumPy bincount: the int index temporaries stay in cache (measured on CamVid labels:
#: 64K-pixel chunks ~2x faster than one whole-batch bincount; benchmarks/bench_evaluator.py).
CHUNK_PIXELS = 1 << 16


def _row_mode(gt_dtype: np.dtype, c: int, ignore_index: int) -> tuple[int, int]:
    """``(number of rows, ignore row)`` of the row scheme (see the comment above)."""
    if gt_dtype == np.uint8:
        return 256, ignore_index if 0 <= ignore_index < 256 else -1
    return c + 2, c


def _to_rows_np(g: np.ndarray, c: int, ignore_index: int) -> np.ndarray:
    """Fresh intp row index of every pixel of ``g`` (writable: used in place)."""
    if g.dtype == np.uint8:
        return g.astype(np.intp)
    g = g.astype(np.intp, copy=False)
    return np.where((g >= 0) & (g < c), g, np.where(g == ignore_index, c, c + 1))


def _pair_counts_np(gt: np.ndarray, pred: np.ndarray, ncols: int, nrows: int, to_rows) -> np.ndarray:
    """``[nrows, ncols]`` int64 counts of ``(to_rows(gt), pred)`` pairs, in cache-sized chunks."""
    g, p = gt.reshape(-1), pred.reshape(-1)
    bins = nrows * ncols
    out = np.zeros(bins, np.int64)
    step = max(CHUNK_PIXELS, 2 * bins)
    for i in range(0, g.size, step):
        idx = to_rows(g[i : i + step])
        idx *= ncols
        idx += p[i : i + step]
        out += np.bincount(idx, minlength=bins)
    return out.reshape(nrows, ncols)


def _check_pred_np(pred: np.ndarray, gt: np.ndarray, c: int, ignore_index: int) -> np.ndarray:
    """``pred`` if all values are in ``[0, C)``; else (values out of range only at ignored
    pixels) a copy with those set to 0. Raises ValueError for a bad value at a valid pixel."""
    if pred.size == 0 or (pred.min() >= 0 and pred.max() < c):
        return pred
    valid = _to_rows_np(gt, c, ignore_index) < c
    pv = pred[valid]
    if pv.size and (pv.min() < 0 or pv.max() >= c):
        raise ValueError(f"prediction value {_first_bad(pv, c, None)} is outside [0, {c}) at a valid pixel")
    return np.where(valid, pred, 0)


def _confusion_np(pred: np.ndarray, gt: np.ndarray, c: int, ignore_index: int, check_pred: bool) -> np.ndarray:
    nrows, ignore_row = _row_mode(gt.dtype, c, ignore_index)
    if check_pred:
        pred = _check_pred_np(pred, gt, c, ignore_index)
    counts = _pair_counts_np(gt, pred, c, nrows, lambda g: _to_rows_np(g, c, ignore_index))
    bad = int(counts[c:].sum()) - (int(counts[ignore_row].sum()) if ignore_row >= c else 0)
    if bad:
        raise ValueError(
            f"ground-truth value {_first_bad(gt, c, ignore_index)} is outside [0, {c}) and is not the "
            f"ignore index {ignore_index}"
        )
    return counts[:c]


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """Confusion matrix of predicted against ground-truth label maps (NumPy).

    One ``np.bincount(C * gt + pred)`` over all pixels of the batch; ignored pixels fall into an
    extra row that is dropped, so there are no masked copies.

    Args:
        pred: integer array, any shape (e.g. ``[B, H, W]`` or ``[H, W]``): predicted class ids in
            ``[0, C)`` wherever the ground truth is valid (values at ignored pixels are not used).
        gt: integer array of the same shape (uint8 label maps are the fast path): class ids in
            ``[0, C)`` or ``ignore_index``.
        num_classes: ``C``.
        ignore_index: ground-truth value excluded from the count (default 255); not a class id.

    Returns:
        int64 ``[C, C]``, ``cm[g, p]`` = number of valid pixels with ground truth ``g`` predicted
        as ``p``.

    Raises:
        ValueError: shapes differ; a ground-truth value outside ``[0, C)`` other than
            ``ignore_index``, or a prediction outside ``[0, C)`` at a valid pixel (the message
            names the value); ``ignore_index`` in ``[0, C)``.
    """
    c = _check_args(num_classes, ignore_index)
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must have the same shape")
    if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
        raise ValueError(f"pred and gt must be integer arrays, got {pred.dtype} and {gt.dtype}")
    return _confusion_np(pred, gt, c, ignore_index, check_pred=True)


def _confusion_t(pred: torch.Tensor, gt: torch.Tensor, c: int, ignore_index: int, check_pred: bool) -> torch.Tensor:
    """Device dispatch: CPU tensors go through NumPy's bincount on zero-copy views (several
    times faster than ``torch.bincount`` on CPU); CUDA tensors use ``torch.bincount``."""
    if gt.device.type == "cpu" and NUMPY_ON_CPU:
        return torch.from_numpy(_confusion_np(pred.numpy(), gt.numpy(), c, ignore_index, check_pred))
    if gt.dtype == torch.uint8:
        rows, nrows, ignore_row = gt.long(), 256, ignore_index if 0 <= ignore_index < 256 else -1
    else:
        g = gt.long()
        rows = torch.where((g >= 0) & (g < c), g, torch.where(g == ignore_index, c, c + 1))
        nrows, ignore_row = c + 2, c
    if check_pred and pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
        valid = rows < c
        pv = pred[valid]
        if pv.numel() and (int(pv.min()) < 0 or int(pv.max()) >= c):
            raise ValueError(
                f"prediction value {_first_bad(pv.cpu().numpy(), c, None)} is outside [0, {c}) at a valid pixel"
            )
        pred = torch.where(valid, pred, torch.zeros_like(pred))
    idx = rows.mul_(c).add_(pred)
    counts = torch.bincount(idx.reshape(-1), minlength=nrows * c).view(nrows, c)
    bad = counts[c:].sum() - (counts[ignore_row].sum() if ignore_row >= c else 0)
    if int(bad):  # one host sync per call
        raise ValueError(
            f"ground-truth value {_first_bad(gt.cpu().numpy(), c, ignore_index)} is outside [0, {c}) "
            f"and is not the ignore index {ignore_index}"
        )
    return counts[:c]


def confusion_matrix_torch(
    pred: torch.Tensor, gt: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Confusion matrix of torch label maps, computed on their device (CPU or CUDA).

    Same algorithm and conventions as :func:`confusion_matrix` (``torch.bincount`` on CUDA;
    NumPy's bincount through zero-copy views on CPU).

    Args:
        pred: integer tensor, any shape (e.g. ``[B, H, W]``), class ids in ``[0, C)`` wherever
            the ground truth is valid.
        gt: integer tensor of the same shape, on the same device (uint8 is the fast path):
            class ids in ``[0, C)`` or ``ignore_index``.
        num_classes: ``C``.
        ignore_index: ground-truth value excluded from the count (default 255).

    Returns:
        int64 ``[C, C]`` on the tensors' device, ``cm[g, p]`` as in :func:`confusion_matrix`.

    Raises:
        ValueError: shapes or devices differ; a ground-truth value outside ``[0, C)`` other than
            ``ignore_index``, or a prediction outside ``[0, C)`` at a valid pixel (naming the value).
    """
    c = _check_args(num_classes, ignore_index)
    if pred.shape != gt.shape or pred.device != gt.device:
        raise ValueError(
            f"pred {tuple(pred.shape)} on {pred.device} and gt {tuple(gt.shape)} on {gt.device} must "
            "have the same shape and device"
        )
    if pred.is_floating_point() or gt.is_floating_point():
        raise ValueError(f"pred and gt must be integer tensors, got {pred.dtype} and {gt.dtype}")
    return _confusion_t(pred.detach(), gt.detach(), c, ignore_index, check_pred=True)


def _ids(ids: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int, what: str) -> list[int]:
    out = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    bad = [i for i in out if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"{what} ids {bad} are outside [0, {num_classes})")
    if len(set(out)) != len(out):
        raise ValueError(f"{what} ids {out} contain duplicates")
    return out


def check_split(seen_ids: Sequence[int], unseen_ids: Sequence[int], num_classes: int) -> tuple[list[int], list[int]]:
    """Validated ``(seen, unseen)`` id lists.

    Args:
        seen_ids: seen class ids (ints, a 1-D array or tensor).
        unseen_ids: unseen class ids.
        num_classes: ``C``; every id must lie in ``[0, C)``.

    Returns:
        ``(seen, unseen)`` as lists of Python ints, order kept.

    Raises:
        ValueError: an id outside ``[0, C)``, a duplicate, or an id both seen and unseen.
    """
    s, u = _ids(seen_ids, num_classes, "seen"), _ids(unseen_ids, num_classes, "unseen")
    both = sorted(set(s) & set(u))
    if both:
        raise ValueError(f"class ids {both} are both seen and unseen")
    return s, u


def calibrated_argmax(
    scores: torch.Tensor, seen_ids: Sequence[int], gamma: float = 0.0, probabilities: bool = False
) -> torch.Tensor:
    """GZS3 prediction with seen-class calibration (ZegFormer Eq. 2).

    ``argmax_c p_c - gamma * [c in S]`` over all classes, where ``p`` are class probabilities:
    ``softmax(scores)`` for logits, ``scores`` themselves when ``probabilities`` is set (ZegCLIP's
    per-class sigmoid outputs, from which its released code subtracts gamma directly; a softmax
    over values in (0, 1) would be nearly flat and let gamma dominate). With ``gamma == 0`` this
    is the plain ``argmax_c scores_c``.

    Args:
        scores: float ``[B, C, H, W]`` class scores: logits (any scale), or probabilities in
            [0, 1] with ``probabilities=True`` (see ``Segmenter.scores_are_probabilities``).
        seen_ids: the seen class ids ``S``.
        gamma: calibration factor, in probability units (ZegFormer, ZegCLIP: in [0, 1]).
        probabilities: the scores are already per-class probabilities.

    Returns:
        int64 ``[B, H, W]`` class ids in ``[0, C)``, on the scores' device.

    Raises:
        ValueError: ``scores`` is not 4-D.
    """
    if scores.ndim != 4:
        raise ValueError(f"scores must be [B, C, H, W], got {tuple(scores.shape)}")
    if gamma == 0.0 or not len(seen_ids):
        return scores.argmax(dim=1)
    c = scores.shape[1]
    offset = torch.zeros(c, dtype=torch.float32, device=scores.device)
    offset[torch.as_tensor(list(seen_ids), dtype=torch.long, device=scores.device)] = float(gamma)
    probs = scores.float() if probabilities else torch.softmax(scores.float(), dim=1)
    return (probs - offset.view(1, c, 1, 1)).argmax(dim=1)


def gzs3_zs3_confusion(
    scores: torch.Tensor,
    labels: torch.Tensor,
    seen_ids: Sequence[int],
    unseen_ids: Sequence[int],
    gamma: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    probabilities: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both zero-shot confusion matrices from one set of scores, on the scores' device.

    Protocol: GZS3 (generalised, all classes compete) and ZS3 (only unseen classes compete, only
    unseen ground-truth pixels count) as defined by SPNet (Xian et al., CVPR 2019) and ZS3Net
    (Bucher et al., NeurIPS 2019) and used by ZegFormer / ZegCLIP.

    Args:
        scores: float ``[B, C, H, W]`` class scores at the label resolution.
        labels: integer ``[B, H, W]`` (uint8 preferred) ground truth, ids in ``[0, C)`` or
            ``ignore_index``; moved to the scores' device if needed.
        seen_ids, unseen_ids: disjoint class id lists.
        gamma: seen-class calibration for GZS3 (:func:`calibrated_argmax`, ZegFormer Eq. 2);
            ZS3 is unaffected (its argmax has no seen class).
        ignore_index: ground-truth value excluded (default 255).
        probabilities: the scores are per-class probabilities (passed to
            :func:`calibrated_argmax`).

    Returns:
        ``(gzs3 [C, C], zs3 [U, U])`` int64 on the scores' device. GZS3: argmax over all classes,
        every valid pixel. ZS3: argmax over ``scores[:, unseen_ids]``, only pixels whose ground
        truth is unseen; index ``k`` = class ``unseen_ids[k]``.

    Raises:
        ValueError: shape mismatch, bad ids, or a label value outside ``[0, C)`` other than
            ``ignore_index`` (naming the value).
    """
    if (
        scores.ndim != 4
        or labels.ndim != 3
        or scores.shape[0] != labels.shape[0]
        or scores.shape[2:] != labels.shape[1:]
    ):
        raise ValueError(
            f"scores must be [B, C, H, W] and labels [B, H, W] with the same B, H, W; got "
            f"{tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    c = _check_args(scores.shape[1], ignore_index)
    seen, unseen = check_split(seen_ids, unseen_ids, c)
    labels = labels.detach().to(scores.device)
    gzs3 = _confusion_t(
        calibrated_argmax(scores.detach(), seen, gamma, probabilities), labels, c, ignore_index, check_pred=False
    )
    u = len(unseen)
    if u == 0:
        return gzs3, torch.zeros((0, 0), dtype=torch.int64, device=scores.device)
    # ZS3: (label value, unseen argmax) pairs counted in one bincount; rows of the unseen ids kept.
    # Labels are valid here (checked above), so rows are the label values (ignore included).
    uidx = torch.as_tensor(unseen, dtype=torch.long, device=scores.device)
    pred_u = scores.detach().index_select(1, uidx).argmax(dim=1)
    if labels.device.type == "cpu" and NUMPY_ON_CPU:
        lab = labels.numpy()
        if lab.dtype == np.uint8:
            nrows, to_rows = 256, lambda g: g.astype(np.intp)
        else:
            nrows, to_rows = c + 1, lambda g: np.where(g == ignore_index, c, g).astype(np.intp)
        counts = _pair_counts_np(lab, pred_u.numpy(), u, nrows, to_rows)
        return gzs3, torch.from_numpy(counts[unseen])
    if labels.dtype == torch.uint8:
        rows, nrows = labels.long(), 256
    else:
        g = labels.long()
        rows, nrows = torch.where(g == ignore_index, c, g), c + 1
    counts = torch.bincount(rows.mul_(u).add_(pred_u).reshape(-1), minlength=nrows * u).view(nrows, u)
    return gzs3, counts.index_select(0, uidx)


# --------------------------------------------------------------------------------------------
# metrics from a confusion matrix (NumPy, percent)
# --------------------------------------------------------------------------------------------
def nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries (mmseg's ``np.nanmean``), NaN when there are none (no warning)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _as_cm(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(cm, torch.Tensor):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square [C, C], got {cm.shape}")
    return cm.astype(np.float64)


def per_class_iou(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class IoU in percent: ``100 * TP / (TP + FP + FN)``.

    Args:
        cm: ``[C, C]`` confusion matrix (rows ground truth, columns prediction), NumPy or torch.

    Returns:
        float64 ``[C]``; NaN for a class with no ground-truth and no predicted pixels; 0 for a
        class predicted but absent from the ground truth (mmseg's convention).

    Raises:
        ValueError: ``cm`` is not a square 2-D matrix.
    """
    m = _as_cm(cm)
    tp = np.diag(m)
    union = m.sum(1) + m.sum(0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, 100.0 * tp / np.where(union > 0, union, 1), np.nan)


def per_class_accuracy(cm: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-class accuracy (recall) in percent: ``100 * TP / (TP + FN)``.

    Args:
        cm: ``[C, C]`` confusion matrix (rows ground truth, columns prediction), NumPy or torch.

    Returns:
        float64 ``[C]``; NaN for a class without ground-truth pixels.

    Raises:
        ValueError: ``cm`` is not a square 2-D matrix.
    """
    m = _as_cm(cm)
    gt = m.sum(1)
    return np.where(gt > 0, 100.0 * np.diag(m) / np.where(gt > 0, gt, 1), np.nan)


def pixel_accuracy(cm: np.ndarray | torch.Tensor) -> float:
    """pAcc in percent: correctly labelled valid pixels / valid pixels.

    Args:
        cm: ``[C, C]`` confusion matrix, NumPy or torch.

    Returns:
        ``100 * trace / sum``; NaN when the matrix counts no pixel.

    Raises:
        ValueError: ``cm`` is not a square 2-D matrix.
    """
    m = _as_cm(cm)
    total = m.sum()
    return float(100.0 * np.trace(m) / total) if total > 0 else float("nan")


def harmonic_iou(miou_seen: float, miou_unseen: float) -> float:
    """hIoU = 2·S·U / (S + U) (ZegCLIP Eq. 9); 0 when S + U = 0; NaN when S or U is NaN.

    Units follow the inputs (percent throughout this module).
    """
    s, u = float(miou_seen), float(miou_unseen)
    if math.isnan(s) or math.isnan(u):
        return float("nan")
    return 0.0 if s + u == 0 else 2.0 * s * u / (s + u)


@dataclasses.dataclass
class SegMetrics:
    """GZS3 metrics of one evaluation set, all in percent (NaN: undefined, see module docstring).

    Attributes:
        pAcc, mAcc, mIoU: over all classes. mIoU_seen, mIoU_unseen, hIoU: ZegCLIP's mIoU(S),
            mIoU(U), hIoU (Eq. 9).
        iou, acc: float64 ``[C]`` per class. gt_pixels, pred_pixels: int64 ``[C]``.
        seen_ids, unseen_ids: the split used.
    """

    pAcc: float
    mAcc: float
    mIoU: float
    mIoU_seen: float
    mIoU_unseen: float
    hIoU: float
    iou: np.ndarray
    acc: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    seen_ids: list[int]
    unseen_ids: list[int]

    def summary(self) -> dict[str, float]:
        """The scalar metrics ``{pAcc, mAcc, mIoU, mIoU_seen, mIoU_unseen, hIoU}``."""
        return {k: getattr(self, k) for k in ("pAcc", "mAcc", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU")}

    def per_class(self, names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One dict per class: id, name, split (seen/unseen/-), iou, acc (percent or None),
        gt_pixels, pred_pixels."""
        split = _split_names(len(self.iou), self.seen_ids, self.unseen_ids)
        return [
            {
                "id": i,
                "name": names[i] if names is not None else str(i),
                "split": split[i],
                "iou": _finite_or_none(self.iou[i]),
                "acc": _finite_or_none(self.acc[i]),
                "gt_pixels": int(self.gt_pixels[i]),
                "pred_pixels": int(self.pred_pixels[i]),
            }
            for i in range(len(self.iou))
        ]


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def json_safe(x: Any) -> Any:
    """JSON-safe copy of nested dicts / lists / tuples: NaN / inf floats -> None, NumPy scalars ->
    Python (tuples become lists); anything else unchanged."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return _finite_or_none(x)
    return x


def _split_names(c: int, seen_ids: Sequence[int], unseen_ids: Sequence[int]) -> list[str]:
    out = ["-"] * c
    for i in seen_ids:
        out[i] = "seen"
    for i in unseen_ids:
        out[i] = "unseen"
    return out


def segmentation_metrics(
    cm: np.ndarray | torch.Tensor, seen_ids: Sequence[int], unseen_ids: Sequence[int]
) -> SegMetrics:
    """pAcc, mAcc, mIoU, mIoU(S), mIoU(U), hIoU and per-class IoU / accuracy, in percent.

    Args:
        cm: ``[C, C]`` confusion matrix (rows ground truth), NumPy or torch (any device).
        seen_ids, unseen_ids: disjoint class ids (classes in neither count in mIoU only).

    Returns:
        :class:`SegMetrics`. Means skip NaN classes (mmseg's nanmean); hIoU per ZegCLIP Eq. 9.

    Raises:
        ValueError: a non-square matrix or bad ids.
    """
    m = _as_cm(cm)
    c = m.shape[0]
    seen, unseen = check_split(seen_ids, unseen_ids, c)
    iou, acc = per_class_iou(m), per_class_accuracy(m)
    s = nanmean(iou[seen]) if seen else float("nan")
    u = nanmean(iou[unseen]) if unseen else float("nan")
    return SegMetrics(
        pAcc=pixel_accuracy(m),
        mAcc=nanmean(acc),
        mIoU=nanmean(iou),
        mIoU_seen=s,
        mIoU_unseen=u,
        hIoU=harmonic_iou(s, u),
        iou=iou,
        acc=acc,
        gt_pixels=m.sum(1).astype(np.int64),
        pred_pixels=m.sum(0).astype(np.int64),
        seen_ids=seen,
        unseen_ids=unseen,
    )


def zs3_metrics(cm_unseen: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """ZS3 metrics from the ``[U, U]`` unseen-only confusion matrix, in percent.

    ZS3 protocol of SPNet (Xian et al., CVPR 2019) and ZS3Net (Bucher et al., NeurIPS 2019), as
    reported by ZegFormer / ZegCLIP: only unseen classes are candidates and only pixels whose
    ground truth is unseen are scored (matrix from :func:`gzs3_zs3_confusion`).

    Args:
        cm_unseen: ``[U, U]`` confusion matrix indexed by position in ``unseen_ids``, NumPy or torch.

    Returns:
        ``{"mIoU", "pAcc", "mAcc", "iou": [U] list (None for NaN)}``; NaN when ``U == 0`` or no
        pixel has an unseen ground truth.

    Raises:
        ValueError: ``cm_unseen`` is not a square 2-D matrix.
    """
    m = _as_cm(cm_unseen)
    if m.shape[0] == 0:
        return {"mIoU": float("nan"), "pAcc": float("nan"), "mAcc": float("nan"), "iou": []}
    iou = per_class_iou(m)
    return {
        "mIoU": nanmean(iou),
        "pAcc": pixel_accuracy(m),
        "mAcc": nanmean(per_class_accuracy(m)),
        "iou": [_finite_or_none(x) for x in iou],
    }


def per_class_table(metrics: SegMetrics, names: Sequence[str]) -> str:
    """Markdown table, one row per class: class, split (seen/unseen), IoU (%), Acc (%), GT pixels.

    NaN (class absent from ground truth and prediction; accuracy without ground truth) is
    written ``n/a``.

    Raises:
        ValueError: ``names`` has another length than the number of classes.
    """
    if len(names) != len(metrics.iou):
        raise ValueError(f"{len(names)} class names for {len(metrics.iou)} classes")

    def f(x: float) -> str:
        return f"{x:.2f}" if math.isfinite(x) else "n/a"

    lines = [
        "| id | class | split | IoU (%) | Acc (%) | GT pixels | predicted pixels |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    split = _split_names(len(names), metrics.seen_ids, metrics.unseen_ids)
    for i, n in enumerate(names):
        lines.append(
            f"| {i} | {str(n).replace('|', '/')} | {split[i]} | {f(metrics.iou[i])} | {f(metrics.acc[i])} "
            f"| {int(metrics.gt_pixels[i])} | {int(metrics.pred_pixels[i])} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# proposal recall (mask proposal model; DeOP Appendix Table 8)
# --------------------------------------------------------------------------------------------
#: Recall groups: ground-truth segments of seen classes, of unseen classes, and both.
PROPOSAL_RECALL_GROUPS = ("seen", "unseen", "all")


def segment_max_iou(
    proposals: torch.Tensor | np.ndarray,
    segments: torch.Tensor | np.ndarray,
    valid: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """For each ground-truth segment, the largest IoU any proposal reaches with it.

    ``IoU(P_q, G_n) = |P_q & G_n| / |P_q | G_n|`` counted over the ``valid`` pixels only (all
    pixels when None; pass ``label != ignore_index`` to leave ignored pixels out of both sides, the
    convention of ``zeroseg.evaluation.segment_best_iou``).

    Args:
        proposals: ``[Q, H, W]`` binary (bool or 0/1 integers): ``sigmoid(mask logits) > 0.5``
            at the label's resolution (ZegFormer's threshold). ``Q`` may be 0.
        segments: ``[N, H, W]`` binary ground-truth segments (one class's pixels each).
        valid: optional ``[H, W]`` bool.

    Returns:
        float64 ``[N]`` in ``[0, 1]`` (0 when there is no proposal; an empty segment scores 0).

    Raises:
        ValueError: float masks (threshold them first), or mismatched shapes.
    """
    p, g = torch.as_tensor(proposals), torch.as_tensor(segments)
    for name, m in (("proposals", p), ("segments", g)):
        if m.ndim != 3 or m.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be binary [n, H, W] masks (bool or 0/1 ints; threshold logits with > 0 first), "
                f"got {m.dtype} {tuple(m.shape)}"
            )
    if p.shape[1:] != g.shape[1:]:
        raise ValueError(f"proposals {tuple(p.shape)} and segments {tuple(g.shape)} differ in size (resize first)")
    p, g = p.to(g.device).bool().flatten(1), g.bool().flatten(1)
    if valid is not None:
        v = torch.as_tensor(valid, device=g.device).bool()
        if tuple(v.shape) != tuple(segments.shape[1:]):
            raise ValueError(f"valid {tuple(v.shape)} must be [H, W] = {tuple(segments.shape[1:])}")
        v = v.flatten()
        p, g = p[:, v], g[:, v]
    if p.shape[0] == 0 or g.shape[0] == 0:
        return np.zeros(g.shape[0], np.float64)
    pf, gf = p.double(), g.double()
    inter = gf @ pf.T  # [N, Q]
    union = gf.sum(1, keepdim=True) + pf.sum(1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    return iou.max(dim=1).values.cpu().numpy()


@dataclasses.dataclass
class RecallCounts:
    """Mergeable proposal-recall counts (one image, or any set of images after :meth:`merge`).

    Attributes:
        thresholds: IoU thresholds ``t`` (DeOP Table 8: 0.3 and 0.5).
        hits: ``{"seen"|"unseen": int64 [T]}`` segments whose best IoU is ``>= t``.
        segments: ``{"seen"|"unseen": int}`` segments counted.
    """

    thresholds: tuple[float, ...]
    hits: dict[str, np.ndarray]
    segments: dict[str, int]

    @classmethod
    def empty(cls, thresholds: Sequence[float] = (0.3, 0.5)) -> RecallCounts:
        """No segment yet.

        Raises:
            ValueError: no threshold, or one outside ``(0, 1]``.
        """
        ts = tuple(float(t) for t in thresholds)
        if not ts or any(not 0.0 < t <= 1.0 for t in ts):
            raise ValueError(f"recall IoU thresholds must be in (0, 1], got {list(thresholds)}")
        return cls(ts, {g: np.zeros(len(ts), np.int64) for g in ("seen", "unseen")}, {"seen": 0, "unseen": 0})

    def merge(self, other: RecallCounts) -> RecallCounts:
        """Add ``other``'s counts into this one (in place; returns self).

        Raises:
            ValueError: other thresholds.
        """
        if tuple(other.thresholds) != tuple(self.thresholds):
            raise ValueError(f"cannot merge recall counts at thresholds {other.thresholds} into {self.thresholds}")
        for g in ("seen", "unseen"):
            self.hits[g] = self.hits[g] + other.hits[g]
            self.segments[g] += int(other.segments[g])
        return self

    def recall(self) -> dict[str, dict[float, float]]:
        """``{group: {t: hits / segments}}`` for ``seen``, ``unseen``, ``all`` (NaN without segments)."""
        hits = {**self.hits, "all": self.hits["seen"] + self.hits["unseen"]}
        segs = {**self.segments, "all": self.segments["seen"] + self.segments["unseen"]}
        return {
            g: {t: (float(h) / segs[g] if segs[g] else float("nan")) for t, h in zip(self.thresholds, hits[g])}
            for g in PROPOSAL_RECALL_GROUPS
        }


def proposal_recall(
    proposals: torch.Tensor | np.ndarray,
    segments: torch.Tensor | np.ndarray,
    segment_ids: Sequence[int] | np.ndarray | torch.Tensor,
    seen_ids: Sequence[int],
    unseen_ids: Sequence[int],
    thresholds: Sequence[float] = (0.3, 0.5),
    valid: torch.Tensor | np.ndarray | None = None,
) -> RecallCounts:
    """Proposal recall of one image (DeOP Appendix Table 8: Recall@30 / Recall@50).

    A ground-truth segment is recalled at ``t`` when some proposal overlaps it with IoU ``>= t``
    (:func:`segment_max_iou`); all proposals count (no score filter: ZegFormer's and DeOP's
    released inference use all 100). Counts split by whether the segment's class is seen or
    unseen; sum images with :meth:`RecallCounts.merge`, read with :meth:`RecallCounts.recall`.

    Args:
        proposals: ``[Q, H, W]`` binary proposal masks (``sigmoid > 0.5``).
        segments: ``[N, H, W]`` binary GT masks, one per class present
            (``zeroseg.losses.semantic_to_targets(label)["masks"]``).
        segment_ids: ``[N]`` their class ids.
        seen_ids, unseen_ids: the class ids of each group.
        thresholds: IoU thresholds in ``(0, 1]``.
        valid: optional ``[H, W]`` bool of counted pixels (see :func:`segment_max_iou`).

    Returns:
        :class:`RecallCounts`.

    Raises:
        ValueError: bad masks (see :func:`segment_max_iou`), ``len(segment_ids) != N``, a segment
            id in neither group, a bad threshold.
    """
    counts = RecallCounts.empty(thresholds)
    best = segment_max_iou(proposals, segments, valid)  # validates the masks
    ids = np.asarray(torch.as_tensor(segment_ids).cpu(), dtype=np.int64).reshape(-1)
    if ids.size != best.size:
        raise ValueError(f"{ids.size} segment ids for {best.size} segments")
    seen, unseen = np.isin(ids, list(seen_ids)), np.isin(ids, list(unseen_ids))
    if (seen & unseen).any() or not (seen | unseen).all():
        bad = ids[~(seen ^ unseen)].tolist()
        raise ValueError(f"segment class ids {bad} are not in exactly one of seen_ids / unseen_ids")
    hit = best[:, None] >= np.asarray(counts.thresholds)[None]  # [N, T]
    for g, member in (("seen", seen), ("unseen", unseen)):
        counts.hits[g] = hit[member].sum(0).astype(np.int64)
        counts.segments[g] = int(member.sum())
    return counts


__all__ = [
    "IGNORE_INDEX",
    "PROPOSAL_RECALL_GROUPS",
    "RecallCounts",
    "SegMetrics",
    "calibrated_argmax",
    "check_split",
    "confusion_matrix",
    "confusion_matrix_torch",
    "gzs3_zs3_confusion",
    "harmonic_iou",
    "json_safe",
    "nanmean",
    "per_class_accuracy",
    "per_class_iou",
    "per_class_table",
    "pixel_accuracy",
    "proposal_recall",
    "segment_max_iou",
    "segmentation_metrics",
    "zs3_metrics",
]
