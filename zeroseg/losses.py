"""Segmentation losses for ZegCLIP: non-mutually-exclusive focal + dice (ZegCLIP Eqs. 4-6) and CE.

ZegCLIP Sec. 3.4 ("Design 2: NEL"): every class gets an independent sigmoid over its mask logits
(Eq. 2) and is trained as a per-class binary mask problem, with the focal variant of BCE (Eq. 4,
gamma = 2, Lin et al.) plus a dice loss (Eq. 5), combined as ``alpha * focal + beta * dice``
(Eq. 6). The mutually exclusive baseline (softmax + cross-entropy over the classes, the "EL" of
Sec. 3.2 / Table 5) is ``kind="ce"``.

No Hungarian matching: ZegCLIP's queries are the class text embeddings, so query ``c`` is matched to
class ``c`` by construction; the per-class binary targets are built directly from the label map
(one-hot over the *training* ids ``0..C-1``, i.e. the seen classes during training).

Conventions (all functions):
    logits: ``[B, C, H, W]`` float, mask logits (pre-sigmoid), already at the label's size.
    target: ``[B, H, W]`` long, class ids in ``0..C-1``; ``ignore_index`` (255) pixels are left
        out of every loss term (their logits get no gradient).
    Returned losses are 0-d tensors. Raise ``ValueError`` on shape mismatch or a label id that is
    neither ``< C`` nor ``ignore_index``.

Where the paper is silent we follow the MaskFormer convention the paper cites for this loss
("as previous work [9]") and ZegCLIP's released code: per-mask terms are summed over (image,
class) and divided by ``num_masks``, the number of (image, class) pairs with at least one pixel
of that class (at least 1); dice is computed only for those present masks. Unlike the released
code (which treats ignored pixels as negatives in the focal term) ignored pixels are excluded from
both terms, and the focal term has no alpha class-balance by default (Eq. 4 has none; the released
code uses 0.25: pass ``focal_alpha=0.25`` to reproduce it).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from zeroseg.config.zegclip import ZEGCLIP_LOSS_WEIGHTS
from zeroseg.data.classes import IGNORE_INDEX

LOSS_KINDS = ("focal_dice", "ce")


def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be [B, C, H, W], got shape {tuple(logits.shape)}")
    if target.ndim != 3 or target.shape[0] != logits.shape[0] or target.shape[-2:] != logits.shape[-2:]:
        raise ValueError(
            f"target must be [B, H, W] matching logits {tuple(logits.shape)} (upsample the logits to the "
            f"label size first), got {tuple(target.shape)}"
        )
    if target.dtype.is_floating_point:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    C = logits.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        vals = sorted(set(target[bad].unique().tolist()))[:10]
        raise ValueError(
            f"target has class ids {vals} outside 0..{C - 1} that are not ignore_index={ignore_index}: "
            "the logits must have one channel per training (seen) class"
        )


def one_hot_targets(
    target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class binary masks from a label map.

    Args:
        target: ``[B, H, W]`` integer class ids in ``0..num_classes-1`` or ``ignore_index``.
        num_classes: ``C``, the number of mask channels.
        ignore_index: label value of ignored pixels (default 255).

    Returns:
        ``(masks [B, C, H, W] float32 in {0, 1}, valid [B, H, W] bool)``; ignored pixels are 0 in
        every mask and False in ``valid``.

    Raises:
        RuntimeError: a non-ignored id outside ``0..C-1`` (from ``F.one_hot``, on CPU; no check
            here: the loss functions validate ids first and raise ``ValueError``).
    """
    valid = target != ignore_index
    safe = torch.where(valid, target, torch.zeros_like(target))
    masks = F.one_hot(safe.long(), num_classes).permute(0, 3, 1, 2).to(torch.float32)
    masks = masks * valid.unsqueeze(1)
    return masks, valid


def _num_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    present = masks.flatten(2).sum(-1) > 0  # [B, C]
    return present, present.sum().clamp(min=1).to(masks.dtype)


def _check_focal_alpha(focal_alpha: float | None) -> None:
    if focal_alpha is not None and not 0.0 <= focal_alpha <= 1.0:
        raise ValueError(f"focal_alpha must be None (no class balance) or in [0, 1], got {focal_alpha}")


def _focal(
    logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, gamma: float, focal_alpha: float | None
) -> torch.Tensor:
    """:func:`sigmoid_focal_loss` on checked inputs and their :func:`one_hot_targets`."""
    x = logits.float()
    ce = F.binary_cross_entropy_with_logits(x, masks, reduction="none")  # -log p_t
    p = torch.sigmoid(x)
    p_t = p * masks + (1 - p) * (1 - masks)
    loss = ce * (1 - p_t).pow(gamma)
    if focal_alpha is not None:
        loss = loss * (focal_alpha * masks + (1 - focal_alpha) * (1 - masks))
    v = valid.unsqueeze(1).to(loss.dtype)
    n_valid = v.flatten(2).sum(-1).clamp(min=1)  # [B, 1]
    per_mask = (loss * v).flatten(2).sum(-1) / n_valid  # [B, C]
    _, num_masks = _num_masks(masks)
    return per_mask.sum() / num_masks


def _dice(logits: torch.Tensor, masks: torch.Tensor, valid: torch.Tensor, smooth: float, squared: bool) -> torch.Tensor:
    """:func:`dice_loss` on checked inputs and their :func:`one_hot_targets`."""
    p = torch.sigmoid(logits.float()) * valid.unsqueeze(1)
    inter = (p * masks).flatten(2).sum(-1)
    if squared:
        denom = p.pow(2).flatten(2).sum(-1) + masks.pow(2).flatten(2).sum(-1)
    else:
        denom = p.flatten(2).sum(-1) + masks.flatten(2).sum(-1)
    per_mask = 1 - (2 * inter + smooth) / (denom + smooth).clamp(min=1e-12)  # [B, C]
    present, num_masks = _num_masks(masks)
    return (per_mask * present).sum() / num_masks


def sigmoid_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    focal_alpha: float | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Sigmoid focal loss over per-class binary masks (ZegCLIP Eq. 4; Lin et al., RetinaNet).

    Per pixel, with ``p = sigmoid(x)`` and ``y`` the binary target:
    ``-[y (1 - p)^gamma log p + (1 - y) p^gamma log(1 - p)]`` (times ``a`` for positives and
    ``1 - a`` for negatives when ``focal_alpha = a`` is given). Averaged over the valid pixels of
    each image (the ``1/hw`` of Eq. 4), summed over classes and images, divided by ``num_masks``
    (module docstring).

    Args:
        logits: ``[B, C, H, W]`` float mask logits (pre-sigmoid) at the label's size.
        target: ``[B, H, W]`` integer class ids in ``0..C-1`` or ``ignore_index``.
        gamma: focusing exponent (ZegCLIP: 2; 0 gives plain BCE).
        focal_alpha: positive-class weight ``a`` in ``[0, 1]``; None = no class balance (Eq. 4).
        ignore_index: label value left out of the loss (default 255).

    Returns:
        0-d float32 tensor (unitless, nats).

    Raises:
        ValueError: shape mismatch, float targets, a label id neither ``< C`` nor
            ``ignore_index``, or ``focal_alpha`` outside ``[0, 1]``.
    """
    _check(logits, target, ignore_index)
    _check_focal_alpha(focal_alpha)
    masks, valid = one_hot_targets(target, logits.shape[1], ignore_index)
    return _focal(logits, masks, valid, gamma, focal_alpha)


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    squared: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Dice loss over the classes present in each image (ZegCLIP Eq. 5).

    Per (image, class) present: ``1 - (2 sum p*y + s) / (sum p^2 + sum y^2 + s)`` over valid pixels,
    ``p = sigmoid(logit)`` (``squared=False`` uses ``sum p + sum y``, as ZegCLIP's released code
    does); ``s = smooth`` (Eq. 5 has none; 1.0 as in the released code avoids 0/0). Averaged over
    the present masks; 0 (with a graph) when no pixel is labelled.

    Args:
        logits: ``[B, C, H, W]`` float mask logits (pre-sigmoid) at the label's size.
        target: ``[B, H, W]`` integer class ids in ``0..C-1`` or ``ignore_index``.
        smooth: additive smoothing ``s`` of numerator and denominator.
        squared: squared (V-Net) denominators; False for plain sums.
        ignore_index: label value left out of the loss (default 255).

    Returns:
        0-d float32 tensor in ``[0, 1]``.

    Raises:
        ValueError: shape mismatch, float targets, or a label id neither ``< C`` nor
            ``ignore_index``.
    """
    _check(logits, target, ignore_index)
    masks, valid = one_hot_targets(target, logits.shape[1], ignore_index)
    return _dice(logits, masks, valid, smooth, squared)


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Softmax cross-entropy over the C classes, mean over valid pixels (the mutually exclusive "EL"
    baseline of ZegCLIP Sec. 3.2 / Table 5). 0 (with a graph) when every pixel is ignored."""
    _check(logits, target, ignore_index)
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index)


def segmentation_loss_terms(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "focal_dice",
    alpha: float = ZEGCLIP_LOSS_WEIGHTS["alpha"],
    beta: float = ZEGCLIP_LOSS_WEIGHTS["beta"],
    gamma: float = ZEGCLIP_LOSS_WEIGHTS["gamma"],
    focal_alpha: float | None = None,
    dice_smooth: float = 1.0,
    dice_squared: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """The loss and its components.

    ``kind="focal_dice"`` (ZegCLIP Eq. 6): ``{"loss": alpha*focal + beta*dice, "focal", "dice"}``;
    ``kind="ce"``: ``{"loss": ce, "ce"}``. Shapes/conventions in the module docstring.

    Raises:
        ValueError: unknown ``kind`` (or the checks of the component losses).
    """
    if kind == "focal_dice":
        _check(logits, target, ignore_index)
        _check_focal_alpha(focal_alpha)
        masks, valid = one_hot_targets(target, logits.shape[1], ignore_index)  # shared by both terms
        focal = _focal(logits, masks, valid, gamma, focal_alpha)
        dice = _dice(logits, masks, valid, dice_smooth, dice_squared)
        return {"loss": alpha * focal + beta * dice, "focal": focal, "dice": dice}
    if kind == "ce":
        ce = cross_entropy_loss(logits, target, ignore_index=ignore_index)
        return {"loss": ce, "ce": ce}
    raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
    """``segmentation_loss_terms(logits, target, **kwargs)["loss"]`` (a 0-d tensor)."""
    return segmentation_loss_terms(logits, target, **kwargs)["loss"]


# =============================================================================================
# Mask classification: Hungarian matching and MaskFormer's set criterion (proposal model)
# =============================================================================================
# The proposal model (``zeroseg.models.proposals.MaskFormer``) predicts Q (mask, class) pairs per
# image; each ground-truth segment (one per class present: :func:`semantic_to_targets`) is matched
# to one prediction by bipartite matching, the unmatched predictions are trained as no-object.
# As released by MaskFormer / ZegFormer (``mask_former/modeling/matcher.py``, ``criterion.py``;
# ``../shared/papers/released-code.md`` section 1.1):
#   matching cost  C = cost_class * (-p_q(c_n)) + cost_mask * focal(q, n) + cost_dice * dice(q, n),
#                  GT masks resized (nearest) to the prediction's resolution; weights 1 / 20 / 1;
#   losses         CE over K + 1 classes (no-object weight 0.1), sigmoid focal (alpha 0.25,
#                  gamma 2; weight 20) and dice (+1 smoothing; weight 1) of the matched masks,
#                  predictions bilinearly upsampled to the target size, both divided by the
#                  number of target masks (summed over workers, divided by the world size,
#                  at least 1); the same terms, freshly matched, on every earlier decoder layer.
# Unlike the ZegCLIP losses above, ignored pixels are NOT left out: they are 0 in every target
# mask, so the mask losses push every mask to 0 there ("unseen pixels are ignored, images kept"
# in the released data preparation means exactly that).


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


def mask_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss of matched masks (MaskFormer's ``sigmoid_focal_loss``; Lin et al. 2017).

    Per pixel ``a_t (1 - p_t)^g * BCE(x, y)`` with ``p_t = p y + (1 - p)(1 - y)``,
    ``a_t = a y + (1 - a)(1 - y)`` (``alpha < 0``: no balance); mean over the pixels of each
    mask, sum over masks, divided by ``num_masks``.

    Args:
        logits, targets: ``[M, P]`` (float logits; binary targets).
        num_masks: the normaliser (:func:`num_masks_across_workers`).

    Returns:
        0-d float32.
    """
    x, y = logits.float(), targets.float()
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.mean(1).sum() / num_masks


def mask_dice_loss(logits: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """Dice loss of matched masks (MaskFormer's ``dice_loss``): per mask ``1 - (2 sum p y + 1) /
    (sum p + sum y + 1)``, ``p = sigmoid(logits)`` (plain sums, +1 smoothing), summed over masks and
    divided by ``num_masks``. ``logits, targets``: ``[M, P]``. Returns a 0-d float32."""
    p, y = logits.float().sigmoid(), targets.float()
    loss = 1 - (2 * (p * y).sum(-1) + 1) / (p.sum(-1) + y.sum(-1) + 1)
    return loss.sum() / num_masks


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


def semantic_to_targets(label: torch.Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX) -> dict[str, torch.Tensor]:
    """Mask-classification targets of a semantic label map (MaskFormer's semantic dataset mapper).

    One binary mask per class present (ascending ids); ``ignore_index`` pixels are 0 in every mask
    (released ZegFormer data preparation: unseen pixels become 255, images are kept, and the mask
    losses then push predictions to 0 there).

    Args:
        label: ``[H, W]`` integer class ids (training ids of the head's classes) or ``ignore_index``.

    Returns:
        ``{"labels": int64 [N], "masks": bool [N, H, W]}`` on the label's device (CPU for an array).

    Raises:
        ValueError: not 2-D or not integer.
    """
    lab = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if lab.ndim != 2 or lab.dtype.is_floating_point or lab.dtype == torch.bool:
        raise ValueError(f"semantic_to_targets needs an integer [H, W] label map, got {lab.dtype} {tuple(lab.shape)}")
    lab = lab.long()
    ids = torch.unique(lab)
    ids = ids[ids != ignore_index]
    return {"labels": ids, "masks": lab[None] == ids[:, None, None]}
