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

Where each part lives: the confusion matrices and the GZS3 / ZS3 predictions
(``confusion_matrix``, ``confusion_matrix_torch``, ``calibrated_argmax``, ``gzs3_zs3_confusion``,
``check_split``) in ``zeroseg.confusion``; the metrics from a confusion matrix (this module);
proposal recall (``segment_max_iou``, ``RecallCounts``, ``proposal_recall``) in
``zeroseg.proposal_recall``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from zeroseg.confusion import check_split


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


__all__ = [
    "SegMetrics",
    "harmonic_iou",
    "json_safe",
    "nanmean",
    "per_class_accuracy",
    "per_class_iou",
    "per_class_table",
    "pixel_accuracy",
    "segmentation_metrics",
    "zs3_metrics",
]
