"""Evaluators: metrics accumulated batch by batch and merged (detectron2's ``DatasetEvaluator``
shape, with partial states).

An evaluator has ``reset()``, ``process(inputs, outputs)`` (one batch), ``merge(other)`` (add
another partial state) and ``finalize()`` (the result). The pipeline's batch-inference component
(``pipeline.inference``) runs ``reset`` + ``process`` next to the model in each actor and merges
the partial states on the driver; the same objects work in a plain loop (tests, notebooks).

:class:`GZS3Evaluator` holds, per evaluation set, the GZS3 ``[C, C]`` and ZS3 ``[U, U]``
confusion matrices (SPNet / ZS3Net protocol, ``zeroseg.metrics``): scores are upsampled
bilinearly to each label's size, seen-class calibration (ZegFormer Eq. 2) is applied, pixels are
counted. Only the matrices travel between processes.

Batch contract (what a predictor hands an evaluator):
    inputs: ``{"labels": [uint8 [H_i, W_i]], "label_uris": [str], "sets": [str]}`` per image
    (``uint16`` labels with ``ignore_index`` 65535 for sets of more than 255 classes);
    outputs: ``{"groups": [{"set": name, "index": [row, ...], "scores": S}], "probabilities":
    bool, "activation": str (optional)}`` (one group per evaluation set present in the batch).
    ``S`` is float ``[b, C, h, w]`` (images of one size) or a list of ``b`` tensors
    ``[1, C, h_i, w_i]`` (the slide / short-side protocols: a size per image), on the model's
    device; for a segmenter with ``variants``, a dict ``{variant: S}``. ``probabilities``: the
    scores (after ``activation``) are per-class probabilities rather than logits;
    ``activation`` (``zeroseg.protocols.activate``, default ``"none"``): applied by the evaluator
    after upsampling to the label size (``evaluate.activation_at: label``).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from zeroseg.errors import DataError


def _merge_per_set(dst: Any, src: Any, fields: Sequence[str]) -> None:
    """Add ``src``'s per-set partial state into ``dst`` (evaluators of one class): for each set
    ``src`` has (the keys of its first field), ``dst._ensure(set)``, then
    ``getattr(dst, f)[set] += getattr(src, f)[set]`` for every field ``f``, in order."""
    for n in getattr(src, fields[0]):
        dst._ensure(n)
        for f in fields:
            getattr(dst, f)[n] += getattr(src, f)[n]


class GZS3Evaluator:
    """GZS3 and ZS3 confusion matrices per evaluation set.

    Args:
        sets: ``{name: {"num_classes": C, "seen": [...], "unseen": [...], "ignore_index": 255}}``.
        gamma: seen-class calibration (ZegFormer Eq. 2), in probability units.
        variant: score this variant of a segmenter with ``variants`` (the groups' ``scores`` are
            then ``{variant: ...}``); None for a plain segmenter. One evaluator per variant.

    Per image: scores bilinearly upsampled to the label size (``align_corners=False``), then the
    batch's ``activation`` if any, then the calibrated argmax (gamma subtracted from
    probabilities, ``zeroseg.confusion.calibrated_argmax``) and the counting.

    ``finalize()`` returns ``{name: {"gzs3": int64 [C, C], "zs3": int64 [U, U], "images": n,
    "pixels": labelled + ignored pixels}}``; ``zeroseg.metrics.segmentation_metrics`` /
    ``zs3_metrics`` turn them into mIoU(S/U), hIoU, pAcc, ...

    Raises (from ``process``):
        DataError: a label value outside the set's class ids (naming the label file), scores
            with another class count than the set's, or no scores for the evaluator's variant.
    """

    def __init__(self, sets: Mapping[str, Mapping[str, Any]], gamma: float = 0.0, variant: str | None = None):
        self.sets = {
            n: {
                "num_classes": int(s["num_classes"]),
                "seen": [int(i) for i in s["seen"]],
                "unseen": [int(i) for i in s["unseen"]],
                "ignore_index": int(s.get("ignore_index", 255)),
            }
            for n, s in sets.items()
        }
        self.gamma = float(gamma)
        self.variant = variant
        self.reset()

    def reset(self) -> None:
        """Empty partial state (matrices are allocated per set on first use: a batch's partial
        state holds only the sets it has)."""
        self.gzs3: dict[str, np.ndarray] = {}
        self.zs3: dict[str, np.ndarray] = {}
        self.images: dict[str, int] = {}
        self.pixels: dict[str, int] = {}

    def _ensure(self, name: str) -> None:
        if name not in self.gzs3:
            s = self.sets[name]
            self.gzs3[name] = np.zeros((s["num_classes"],) * 2, np.int64)
            self.zs3[name] = np.zeros((len(s["unseen"]),) * 2, np.int64)
            self.images[name] = self.pixels[name] = 0

    def process(self, inputs: Mapping[str, Sequence[Any]], outputs: Mapping[str, Any]) -> None:
        import torch
        import torch.nn.functional as F

        from zeroseg.confusion import gzs3_zs3_confusion
        from zeroseg.protocols import activate

        probabilities = bool(outputs.get("probabilities", False))
        activation = str(outputs.get("activation", "none"))
        for group in outputs["groups"]:
            name, s = group["set"], self.sets[group["set"]]
            scores = group["scores"]
            if self.variant is not None:
                if not isinstance(scores, Mapping) or self.variant not in scores:
                    have = sorted(scores) if isinstance(scores, Mapping) else "a single output"
                    raise DataError(
                        f"the segmenter returned no scores for variant {self.variant!r} (eval set {name!r}; it "
                        f"returned {have}); its forward must return {{variant: scores}} for every name in variants"
                    )
                scores = scores[self.variant]
            elif isinstance(scores, Mapping):
                raise DataError(
                    f"the segmenter returned the variants {sorted(scores)} for eval set {name!r}; this evaluator "
                    "scores a single output (give it variant=<name>)"
                )
            per_image = (
                list(scores) if isinstance(scores, (list, tuple)) else [scores[j : j + 1] for j in range(len(scores))]
            )
            c = s["num_classes"]
            if len(per_image) != len(group["index"]) or any(t.ndim != 4 or t.shape[:2] != (1, c) for t in per_image):
                got = [tuple(t.shape) for t in per_image] if isinstance(scores, (list, tuple)) else tuple(scores.shape)
                raise DataError(
                    f"the segmenter returned scores {got} for eval set {name!r} with {c} classes and "
                    f"{len(group['index'])} images; expected [B, C, h, w]"
                )
            self._ensure(name)
            device = per_image[0].device
            gz = torch.zeros((c, c), dtype=torch.int64, device=device)
            zs = torch.zeros((len(s["unseen"]),) * 2, dtype=torch.int64, device=device)
            for j, row in enumerate(group["index"]):
                lab = np.asarray(inputs["labels"][row])
                if lab.dtype == np.uint16:  # 16-bit labels (> 255 classes, ignore 65535): torch's uint16 does little
                    lab = lab.astype(np.int32)
                lab_t = torch.from_numpy(
                    lab if lab.flags.writeable and lab.flags.c_contiguous else np.array(lab, order="C")
                ).to(device)
                sc = per_image[j].float()
                if tuple(sc.shape[-2:]) != lab.shape:
                    sc = F.interpolate(sc, size=lab.shape, mode="bilinear", align_corners=False)
                sc = activate(sc, activation)
                try:
                    g, z = gzs3_zs3_confusion(
                        sc,
                        lab_t[None],
                        s["seen"],
                        s["unseen"],
                        self.gamma,
                        s["ignore_index"],
                        probabilities=probabilities,
                    )
                except ValueError as e:
                    raise DataError(
                        f"label {inputs['label_uris'][row]} (eval set {name!r}, {c} classes): {e}"
                    ) from None
                gz += g
                zs += z
                self.images[name] += 1
                self.pixels[name] += int(lab.size)
            self.gzs3[name] += gz.cpu().numpy()  # synchronises CUDA
            self.zs3[name] += zs.cpu().numpy()

    def merge(self, other: GZS3Evaluator) -> None:
        """Add another partial state (the sets it has)."""
        _merge_per_set(self, other, ("gzs3", "zs3", "images", "pixels"))

    def finalize(self) -> dict[str, dict[str, Any]]:
        """``{set: {"gzs3", "zs3", "images", "pixels"}}`` for every configured set."""
        for n in self.sets:
            self._ensure(n)
        return {
            n: {"gzs3": self.gzs3[n], "zs3": self.zs3[n], "images": self.images[n], "pixels": self.pixels[n]}
            for n in self.sets
        }


class VariantsGZS3Evaluator:
    """:class:`GZS3Evaluator` for each variant a segmenter reports, created as the variants appear
    (evaluate's evaluator: whether a segmenter has variants, and which, may depend on its config,
    so the driver learns them from the predictor's outputs).

    Args: as :class:`GZS3Evaluator` (``sets``, ``gamma``).

    Outputs: the :class:`GZS3Evaluator` batch contract plus ``"variants": [name, ...]`` (the
    segmenter's ``variants``, in its order) when the scores are ``{variant: ...}``; without it
    the single output is scored under the variant ``None``.

    ``variants``: the variants seen, in the segmenter's order (``[None]`` for a plain segmenter;
    ``[]`` before any batch). ``finalize()``: ``{variant: GZS3Evaluator.finalize()}`` in that order.

    Raises (from ``process``): as :class:`GZS3Evaluator`.
    """

    def __init__(self, sets: Mapping[str, Mapping[str, Any]], gamma: float = 0.0):
        self.set_specs = {n: dict(s) for n, s in sets.items()}
        self.gamma = float(gamma)
        self.reset()

    def reset(self) -> None:
        self.by_variant: dict[str | None, GZS3Evaluator] = {}

    @property
    def variants(self) -> list[str | None]:
        return list(self.by_variant)

    def _get(self, variant: str | None) -> GZS3Evaluator:
        ev = self.by_variant.get(variant)
        if ev is None:
            ev = self.by_variant[variant] = GZS3Evaluator(self.set_specs, self.gamma, variant=variant)
        return ev

    def process(self, inputs: Mapping[str, Sequence[Any]], outputs: Mapping[str, Any]) -> None:
        for v in outputs.get("variants") or [None]:
            self._get(v).process(inputs, outputs)

    def merge(self, other: VariantsGZS3Evaluator) -> None:
        for v, ev in other.by_variant.items():
            self._get(v).merge(ev)

    def finalize(self) -> dict[str | None, dict[str, dict[str, Any]]]:
        return {v: ev.finalize() for v, ev in self.by_variant.items()}


# =============================================================================================
# proposal recall (stage pretrain_proposals)
# =============================================================================================
#: Recall groups of :class:`ProposalRecallEvaluator`: ground-truth segments of seen classes, of
#: unseen classes, and both (DeOP Appendix Table 8 columns).
RECALL_GROUPS = ("seen", "unseen", "all")


def segment_best_iou(mask_logits: Any, label: np.ndarray, ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """For each ground-truth segment of ``label``, the best IoU any proposal reaches with it.

    A ground-truth segment is the set of pixels of one class in the (semantic) label map; a
    proposal is the binary mask ``sigmoid(logit) > 0.5`` (ZegFormer's mask threshold, released
    code ``mask_former_model.py``) of one query after bilinear upsampling of its logits to the
    label's size. IoU is counted over labelled pixels only (pixels equal to ``ignore_index``
    belong to neither side).

    Args:
        mask_logits: float tensor ``[Q, h, w]`` (mask logits of ``Q`` proposals, any device).
        label: ``uint8/int [H, W]`` class ids, ``ignore_index`` = unlabelled.
        ignore_index: the unlabelled id.

    Returns:
        ``(class_ids int64 [K], best_iou float64 [K])``: the ``K`` classes present (ascending)
        and, for each, ``max_q |P_q & G| / |P_q | G|`` in ``[0, 1]`` (0 with no proposal).

    Raises:
        ValueError: ``mask_logits`` is not 3-D.
    """
    import torch
    import torch.nn.functional as F

    from zeroseg.proposal_recall import segment_max_iou

    if mask_logits.ndim != 3:
        raise ValueError(f"mask_logits must be [Q, h, w], got {tuple(mask_logits.shape)}")
    lab = np.asarray(label)
    lab_t = torch.from_numpy(np.array(lab, dtype=np.int64)).to(mask_logits.device)
    logits = mask_logits[None].float()
    if tuple(logits.shape[-2:]) != lab.shape:
        logits = F.interpolate(logits, size=lab.shape, mode="bilinear", align_corners=False)
    valid = lab_t != ignore_index
    ids = torch.unique(lab_t[valid])
    segments = lab_t[None] == ids[:, None, None]  # [K, H, W] one class's pixels each
    # sigmoid > 0.5 <=> logit > 0; the one IoU implementation (ignored pixels on neither side)
    best = segment_max_iou(logits[0] > 0, segments, valid)
    return ids.cpu().numpy(), best


class ProposalRecallEvaluator:
    """Recall of mask proposals: the fraction of ground-truth segments that some proposal covers
    with IoU >= t, for seen, unseen and all segments (DeOP Appendix Table 8: Recall@30 / @50 on
    COCO-Stuff; the paper gives no protocol beyond the thresholds).

    Protocol (:func:`segment_best_iou`): a ground-truth segment is one class's pixels in an image;
    every query's mask counts (no score filtering: ZegFormer's and DeOP's released inference use
    all 100); a proposal is ``sigmoid > 0.5`` at the label's resolution; ignored pixels are left
    out; a segment is recalled at ``t`` when its best IoU is ``>= t``.

    Args:
        sets: ``{name: {"num_classes": C, "seen": [...], "unseen": [...], "ignore_index": 255}}``.
        thresholds: IoU thresholds in ``(0, 1]`` (default DeOP's 0.3 and 0.5).

    Batch contract: ``inputs``: ``{"labels": [uint8 [H_i, W_i]], "label_uris": [str], "sets":
    [str]}``; ``outputs``: ``{"mask_logits": float [B, Q, h, w]}`` (row ``i`` = image ``i``).

    ``finalize()`` returns ``{set: {"images": n, "segments": {group: n}, "recalled": {group:
    [n per threshold]}, "recall": {group: {t: fraction or NaN (no segment)}}}}`` for the groups
    ``seen``, ``unseen``, ``all``.

    Raises (from ``process``):
        DataError: a label value that is neither a seen nor an unseen class id of its set (naming
            the label file).
    """

    def __init__(self, sets: Mapping[str, Mapping[str, Any]], thresholds: Sequence[float] = (0.3, 0.5)):
        self.sets = {
            n: {
                "num_classes": int(s["num_classes"]),
                "seen": sorted(int(i) for i in s["seen"]),
                "unseen": sorted(int(i) for i in s["unseen"]),
                "ignore_index": int(s.get("ignore_index", 255)),
            }
            for n, s in sets.items()
        }
        self.thresholds = tuple(float(t) for t in thresholds)
        if not self.thresholds or any(not 0.0 < t <= 1.0 for t in self.thresholds):
            raise ValueError(f"recall IoU thresholds must be in (0, 1], got {list(thresholds)}")
        self.reset()

    def reset(self) -> None:
        """Empty partial state (per set, allocated on first use)."""
        self.hits: dict[str, np.ndarray] = {}  # int64 [2 (seen, unseen), T]
        self.totals: dict[str, np.ndarray] = {}  # int64 [2]
        self.images: dict[str, int] = {}

    def _ensure(self, name: str) -> None:
        if name not in self.hits:
            self.hits[name] = np.zeros((2, len(self.thresholds)), np.int64)
            self.totals[name] = np.zeros(2, np.int64)
            self.images[name] = 0

    def process(self, inputs: Mapping[str, Sequence[Any]], outputs: Mapping[str, Any]) -> None:
        logits = outputs["mask_logits"]
        thr = np.asarray(self.thresholds)
        for i, name in enumerate(inputs["sets"]):
            s = self.sets[name]
            ids, best = segment_best_iou(logits[i], inputs["labels"][i], s["ignore_index"])
            seen, unseen = np.isin(ids, s["seen"]), np.isin(ids, s["unseen"])
            bad = ids[~(seen | unseen)]
            if bad.size:
                raise DataError(
                    f"label {inputs['label_uris'][i]} (eval set {name!r}): class id(s) {bad.tolist()} are neither "
                    f"seen nor unseen classes of the set ({s['num_classes']} classes, ignore {s['ignore_index']})"
                )
            self._ensure(name)
            hit = best[:, None] >= thr[None]  # [K, T]
            for g, member in enumerate((seen, unseen)):
                self.hits[name][g] += hit[member].sum(0)
                self.totals[name][g] += int(member.sum())
            self.images[name] += 1

    def merge(self, other: ProposalRecallEvaluator) -> None:
        """Add another partial state (the sets it has)."""
        _merge_per_set(self, other, ("hits", "totals", "images"))

    def finalize(self) -> dict[str, dict[str, Any]]:
        """Counts and recall per configured set (see class docstring)."""
        out = {}
        for n in self.sets:
            self._ensure(n)
            hits = {"seen": self.hits[n][0], "unseen": self.hits[n][1], "all": self.hits[n].sum(0)}
            totals = {"seen": int(self.totals[n][0]), "unseen": int(self.totals[n][1])}
            totals["all"] = totals["seen"] + totals["unseen"]
            out[n] = {
                "images": self.images[n],
                "segments": totals,
                "recalled": {g: [int(x) for x in hits[g]] for g in RECALL_GROUPS},
                "recall": {
                    g: {
                        t: (float(h) / totals[g] if totals[g] else float("nan"))
                        for t, h in zip(self.thresholds, hits[g])
                    }
                    for g in RECALL_GROUPS
                },
            }
        return out


__all__ = ["RECALL_GROUPS", "GZS3Evaluator", "ProposalRecallEvaluator", "VariantsGZS3Evaluator", "segment_best_iou"]
