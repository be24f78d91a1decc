"""Mask classification: Hungarian matching and MaskFormer's set criterion (the proposal model's
training loss).

The proposal model (:class:`zeroseg.models.maskformer.MaskFormer`) predicts Q (mask, class) pairs
per image; each ground-truth segment (one per class present:
:func:`zeroseg.losses.semantic_to_targets`) is matched to one prediction by bipartite matching,
the unmatched predictions are trained as no-object. As released by MaskFormer / ZegFormer
(``mask_former/modeling/matcher.py``, ``criterion.py``; ``../shared/papers/released-code.md``
section 1.1):

- matching cost ``C = cost_class * (-p_q(c_n)) + cost_mask * focal(q, n) + cost_dice * dice(q, n)``,
  GT masks resized (nearest) to the prediction's resolution; weights 1 / 20 / 1;
- losses: CE over K + 1 classes (no-object weight 0.1), sigmoid focal (alpha 0.25, gamma 2;
  weight 20) and dice (+1 smoothing; weight 1) of the matched masks
  (:func:`zeroseg.losses.mask_focal_loss`, :func:`zeroseg.losses.mask_dice_loss`), predictions
  bilinearly upsampled to the target size, both divided by the number of target masks (summed
  over workers, divided by the world size, at least 1); the same terms, freshly matched, on every
  earlier decoder layer.

Unlike the ZegCLIP losses of :mod:`zeroseg.losses`, ignored pixels are NOT left out: they are 0 in
every target mask, so the mask losses push every mask to 0 there ("unseen pixels are ignored,
images kept" in the released data preparation means exactly that).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from zeroseg.losses import mask_dice_loss, mask_focal_loss


def hungarian_match(cost: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost bipartite matching of predictions (rows) to targets (columns).

    ``scipy.optimize.linear_sum_assignment`` (as MaskFormer's matcher). With ``Q >= N`` every
    target gets one prediction.

    Args:
        cost: ``[Q, N]`` finite costs (a tensor on any device, or an array).

    Returns:
        ``(rows, cols)`` int64 arrays of length ``min(Q, N)``, rows ascending: prediction
        ``rows[i]`` is matched to target ``cols[i]``.

    Raises:
        ValueError: not 2-D, or a non-finite cost (NaN from a diverged model).
    """
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().float().cpu().numpy() if isinstance(cost, torch.Tensor) else np.asarray(cost, np.float64)
    if c.ndim != 2:
        raise ValueError(f"hungarian_match needs a [Q, N] cost matrix, got shape {c.shape}")
    if c.size and not np.isfinite(c).all():
        raise ValueError("hungarian_match: the cost matrix has NaN/inf entries (has the model diverged?)")
    rows, cols = linear_sum_assignment(c)
    return rows.astype(np.int64), cols.astype(np.int64)


def batch_sigmoid_focal_cost(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Pairwise sigmoid focal loss (MaskFormer's ``batch_sigmoid_focal_loss``).

    ``cost[q, n] = mean_p [ y_np * a * (1 - s_qp)^g * -log s_qp + (1 - y_np) * (1 - a) * s_qp^g
    * -log(1 - s_qp) ]`` with ``s = sigmoid(logits)``.

    Args:
        logits: ``[Q, P]`` mask logits (P pixels).
        targets: ``[N, P]`` binary masks.

    Returns:
        ``[Q, N]`` float32.
    """
    x = logits.float()
    t = targets.float()
    p = x.sigmoid()
    pos = (1 - p).pow(gamma) * F.binary_cross_entropy_with_logits(x, torch.ones_like(x), reduction="none")
    neg = p.pow(gamma) * F.binary_cross_entropy_with_logits(x, torch.zeros_like(x), reduction="none")
    if alpha >= 0:
        pos, neg = pos * alpha, neg * (1 - alpha)
    return (pos @ t.T + neg @ (1 - t).T) / max(x.shape[1], 1)


def batch_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Pairwise dice loss (MaskFormer's ``batch_dice_loss``): ``cost[q, n] = 1 - (2 sum_p s_qp
    y_np + 1) / (sum_p s_qp + sum_p y_np + 1)``, ``s = sigmoid(logits)``.

    Args:
        logits: ``[Q, P]``; targets: ``[N, P]`` binary.

    Returns:
        ``[Q, N]`` float32 in ``[0, 1)``.
    """
    s = logits.float().sigmoid()
    t = targets.float()
    num = 2 * s @ t.T
    den = s.sum(-1)[:, None] + t.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def _check_targets(targets: list[dict[str, torch.Tensor]], batch: int) -> None:
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for a batch of {batch} predictions (one dict per image)")
    for i, t in enumerate(targets):
        if "labels" not in t or "masks" not in t:
            raise ValueError(f"target {i} must be {{'labels': int64 [N], 'masks': [N, H, W]}}, got keys {sorted(t)}")
        if t["masks"].ndim != 3 or t["masks"].shape[0] != t["labels"].shape[0]:
            raise ValueError(
                f"target {i}: masks {tuple(t['masks'].shape)} must be [N, H, W] with N = len(labels) = "
                f"{t['labels'].shape[0]}"
            )


class HungarianMatcher:
    """MaskFormer's matcher (``HungarianMatcher(cost_class=1, cost_mask=20, cost_dice=1)``,
    the released ZegFormer / MaskFormer weights).

    Per image: ``C = cost_class * -softmax(pred_logits)[:, labels] + cost_mask *
    batch_sigmoid_focal_cost + cost_dice * batch_dice_cost`` (``[Q, N]``), the target masks
    resized (nearest) to the prediction's resolution ``[h, w]``; then :func:`hungarian_match`.
    No gradients.

    ``__call__(outputs, targets) -> [(rows int64 [M_i], cols int64 [M_i]) per image]`` (tensors on
    CPU), ``outputs = {"pred_logits": [B, Q, K + 1], "pred_masks": [B, Q, h, w]}``, ``targets`` a
    list of ``{"labels": int64 [N_i], "masks": [N_i, H, W]}``.

    Raises:
        ValueError: malformed targets, a label outside ``0..K``, a non-finite cost.
    """

    def __init__(
        self,
        cost_class: float = 1.0,
        cost_mask: float = 20.0,
        cost_dice: float = 1.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class, self.cost_mask, self.cost_dice = float(cost_class), float(cost_mask), float(cost_dice)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)

    @torch.no_grad()
    def __call__(
        self, outputs: dict, targets: list[dict[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        logits, masks = outputs["pred_logits"], outputs["pred_masks"]
        _check_targets(targets, logits.shape[0])
        out = []
        for b, t in enumerate(targets):
            labels = t["labels"].to(logits.device).long()
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            if int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1] - 1:
                raise ValueError(
                    f"target {b}: labels {labels.tolist()} outside 0..{logits.shape[-1] - 2} (the head's classes)"
                )
            prob = logits[b].float().softmax(-1)  # [Q, K+1]
            cost_class = -prob[:, labels]  # [Q, N]
            pm = masks[b].float()  # [Q, h, w]
            tm = t["masks"].to(pm.device).float()
            tm = F.interpolate(tm[:, None], size=pm.shape[-2:], mode="nearest")[:, 0]
            pm, tm = pm.flatten(1), tm.flatten(1)
            c = (
                self.cost_mask * batch_sigmoid_focal_cost(pm, tm, self.focal_alpha, self.focal_gamma)
                + self.cost_class * cost_class
                + self.cost_dice * batch_dice_cost(pm, tm)
            )
            rows, cols = hungarian_match(c)
            out.append((torch.from_numpy(rows), torch.from_numpy(cols)))
        return out


def num_masks_across_workers(targets: list[dict[str, torch.Tensor]], device: torch.device | str = "cpu") -> float:
    """MaskFormer's loss normaliser: the target masks of this worker's batch, summed over workers
    with ``torch.distributed.all_reduce`` when a process group is initialised, divided by the
    world size (the mean per worker; DDP then averages gradients), at least 1.

    Every worker must call it at every step (it is a collective)."""
    n = torch.tensor([float(sum(int(t["labels"].numel()) for t in targets))], device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(n)
        world = torch.distributed.get_world_size()
    return max(float(n.item()) / world, 1.0)


class SetCriterion:
    """MaskFormer's ``SetCriterion`` with losses ``labels`` and ``masks`` (ZegFormer / MaskFormer
    released; weights from ``ProposalConfig``: class 1, mask 20, dice 1, no-object 0.1).

    For the final layer and, if present, each ``outputs["aux_outputs"]`` entry (matched anew):

    - ``loss_ce``: ``cross_entropy(pred_logits [B, Q, K + 1], target classes)``, matched queries
      take their target's class, the others no-object ``K``; class weights 1, no-object
      ``no_object_weight`` (torch's weighted mean: divided by the summed weights);
    - ``loss_mask`` / ``loss_dice``: :func:`mask_focal_loss` / :func:`mask_dice_loss` of the
      matched predictions, bilinearly upsampled (``align_corners=False``) to their target's
      ``[H, W]``, normalised by :func:`num_masks_across_workers`.

    ``__call__(outputs, targets) -> {"loss", "loss_ce", "loss_mask", "loss_dice"}``: the three
    terms are the final layer's (unweighted); ``loss = sum over layers of class_weight * ce +
    mask_weight * focal + dice_weight * dice`` (aux layers with the same weights, as released).

    Args:
        num_classes: ``K`` (the logits have ``K + 1`` columns; checked at call time).
        matcher: default ``HungarianMatcher(class_weight, mask_weight, dice_weight)`` (the released
            matcher uses the loss weights as costs).
        class_agnostic: every target label becomes 0 ("object"; the ``objectness`` head, K = 1).
        focal_alpha / focal_gamma: 0.25 / 2 as released.

    Raises (at call time):
        ValueError: logits without ``num_classes + 1`` columns, malformed targets, labels out of
            range (see :class:`HungarianMatcher`).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        *,
        class_weight: float = 1.0,
        mask_weight: float = 20.0,
        dice_weight: float = 1.0,
        no_object_weight: float = 0.1,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        class_agnostic: bool = False,
    ) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"SetCriterion num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.class_weight, self.mask_weight, self.dice_weight = (
            float(class_weight),
            float(mask_weight),
            float(dice_weight),
        )
        self.no_object_weight = float(no_object_weight)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        self.class_agnostic = bool(class_agnostic)
        self.matcher = matcher or HungarianMatcher(class_weight, mask_weight, dice_weight, focal_alpha, focal_gamma)

    def _layer(self, out: dict, targets: list[dict[str, torch.Tensor]], num_masks: float) -> dict[str, torch.Tensor]:
        logits, masks = out["pred_logits"], out["pred_masks"]
        indices = self.matcher(out, targets)
        k = self.num_classes
        tgt_cls = torch.full(logits.shape[:2], k, dtype=torch.int64, device=logits.device)
        for b, (rows, cols) in enumerate(indices):
            tgt_cls[b, rows.to(logits.device)] = targets[b]["labels"].to(logits.device).long()[cols.to(logits.device)]
        weight = torch.ones(k + 1, device=logits.device)
        weight[-1] = self.no_object_weight
        loss_ce = F.cross_entropy(logits.float().transpose(1, 2), tgt_cls, weight)
        focal = masks.new_zeros((), dtype=torch.float32)
        dice = masks.new_zeros((), dtype=torch.float32)
        for b, (rows, cols) in enumerate(indices):
            if rows.numel() == 0:
                continue
            tm = targets[b]["masks"].to(masks.device)[cols.to(masks.device)].float()  # [M, H, W]
            pm = masks[b][rows.to(masks.device)].float()  # [M, h, w]
            pm = F.interpolate(pm[:, None], size=tm.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            focal = focal + mask_focal_loss(pm.flatten(1), tm.flatten(1), num_masks, self.focal_alpha, self.focal_gamma)
            dice = dice + mask_dice_loss(pm.flatten(1), tm.flatten(1), num_masks)
        if not any(r.numel() for r, _ in indices):  # keep the masks in the graph (DDP: every parameter used)
            focal = focal + masks.sum() * 0.0
        return {"loss_ce": loss_ce, "loss_mask": focal, "loss_dice": dice}

    def __call__(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        logits = outputs["pred_logits"]
        if logits.ndim != 3 or logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion for {self.num_classes} classes needs pred_logits [B, Q, {self.num_classes + 1}] "
                f"(last column no-object), got {tuple(logits.shape)}"
            )
        _check_targets(targets, logits.shape[0])
        if self.class_agnostic:
            targets = [{"labels": torch.zeros_like(t["labels"]), "masks": t["masks"]} for t in targets]
        num_masks = num_masks_across_workers(targets, logits.device)
        terms = self._layer(outputs, targets, num_masks)
        total = self._weighted(terms)
        for aux in outputs.get("aux_outputs") or []:
            total = total + self._weighted(self._layer(aux, targets, num_masks))
        return {"loss": total, **terms}

    def _weighted(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.class_weight * t["loss_ce"] + self.mask_weight * t["loss_mask"] + self.dice_weight * t["loss_dice"]


__all__ = [
    "HungarianMatcher",
    "SetCriterion",
    "batch_dice_cost",
    "batch_sigmoid_focal_cost",
    "hungarian_match",
    "num_masks_across_workers",
]
