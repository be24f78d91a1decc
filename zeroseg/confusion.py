"""Confusion matrices of label maps and the zero-shot predictions they count: the NumPy and
torch confusion matrices (one bincount per call), the GZS3 prediction with seen-class
calibration (ZegFormer Eq. 2) and the GZS3 / ZS3 matrices of one set of scores.

The conventions (rows ground truth, ignore 255, GZS3 / ZS3) are those of ``zeroseg.metrics``
(its module docstring), which turns the matrices into percent metrics. Functions taking torch
tensors compute on the tensors' device (CPU or GPU). Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _class_rows(counts, gt, c: int, ignore_index: int, ignore_row: int):
    """The class rows ``counts[:C]`` of the row scheme's ``[nrows, C]`` counts (NumPy or torch:
    one host sync for torch). Raises ValueError naming the first ground-truth value of ``gt``
    outside ``[0, C)`` that is not ``ignore_index`` when an invalid row holds a pixel."""
    bad = counts[c:].sum() - (counts[ignore_row].sum() if ignore_row >= c else 0)
    if int(bad):
        values = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else gt
        raise ValueError(
            f"ground-truth value {_first_bad(values, c, ignore_index)} is outside [0, {c}) and is not the "
            f"ignore index {ignore_index}"
        )
    return counts[:c]


def _confusion_np(pred: np.ndarray, gt: np.ndarray, c: int, ignore_index: int, check_pred: bool) -> np.ndarray:
    nrows, ignore_row = _row_mode(gt.dtype, c, ignore_index)
    if check_pred:
        pred = _check_pred_np(pred, gt, c, ignore_index)
    counts = _pair_counts_np(gt, pred, c, nrows, lambda g: _to_rows_np(g, c, ignore_index))
    return _class_rows(counts, gt, c, ignore_index, ignore_row)


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
    return _class_rows(counts, gt, c, ignore_index, ignore_row)


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


__all__ = [
    "calibrated_argmax",
    "check_split",
    "confusion_matrix",
    "confusion_matrix_torch",
    "gzs3_zs3_confusion",
]
