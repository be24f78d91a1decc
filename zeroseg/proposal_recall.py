"""Proposal recall of a mask proposal model (DeOP Appendix Table 8: Recall@30 / Recall@50):
the best IoU any proposal reaches with each ground-truth segment, and mergeable recall counts
split by seen / unseen segment class.

``zeroseg.evaluation.ProposalRecallEvaluator`` applies it batch by batch. Imports neither Ray nor
the pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

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


__all__ = ["PROPOSAL_RECALL_GROUPS", "RecallCounts", "proposal_recall", "segment_max_iou"]
