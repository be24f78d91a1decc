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
    check_class_ids(target, logits.shape[1], ignore_index)


def check_class_ids(
    target: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    expects: str = "one channel per training (seen) class",
) -> None:
    """Refuse a label map that a loss over ``num_classes`` classes cannot train on.

    Args:
        target: integer class ids (any shape).
        num_classes: ``C``; valid ids are ``0..C-1`` and ``ignore_index``.
        ignore_index: label value of ignored pixels (default 255).
        expects: what the message says the logits must have.

    Raises:
        ValueError: float ids, or ids neither ``< C`` nor ``ignore_index`` (the first 10 listed).
    """
    if target.dtype.is_floating_point:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        vals = sorted(set(target[bad].unique().tolist()))[:10]
        raise ValueError(
            f"target has class ids {vals} outside 0..{num_classes - 1} that are not ignore_index={ignore_index}: "
            f"the logits must have {expects}"
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
# Mask classification: the per-mask losses and the targets of MaskFormer's set criterion
# =============================================================================================
# The Hungarian matcher and the set criterion of the proposal model are
# ``zeroseg.models.maskformer.criterion``; these are the focal and dice losses of its matched masks
# and the targets of a label map (one binary mask per class present).
# Unlike the ZegCLIP losses above, ignored pixels are NOT left out: they are 0 in every target
# mask, so the mask losses push every mask to 0 there ("unseen pixels are ignored, images kept"
# in the released data preparation means exactly that).


def mask_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_masks: float, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Sigmoid focal loss of matched masks (MaskFormer's ``sigmoid_focal_loss``; Lin et al. 2017).

    Per pixel ``a_t (1 - p_t)^g * BCE(x, y)`` with ``p_t = p y + (1 - p)(1 - y)``,
    ``a_t = a y + (1 - a)(1 - y)`` (``alpha < 0``: no balance); mean over the pixels of each
    mask, sum over masks, divided by ``num_masks``.

    Args:
        logits, targets: ``[M, P]`` (float logits; binary targets).
        num_masks: the normaliser (:func:`zeroseg.models.maskformer.num_masks_across_workers`).

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
