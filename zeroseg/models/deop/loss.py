"""DeOP's training loss (released ``criterion_decoder.loss_labels_bce``): per-pixel focal + dice
on the summed mask x class probabilities, no matching.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroseg.losses import check_class_ids


def deop_pixel_loss(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    focal_weight: float = 2.0,
    dice_weight: float = 0.8,
    output_sig: float = 3.0,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    ignore_index: int = 255,
) -> dict[str, torch.Tensor]:
    """DeOP's released training loss (``criterion_decoder.SetCriterion.loss_labels_bce`` with
    ``bce_loss_ignore`` and ``dice_loss_ignore``; the paper only says "dice + focal", Sec. 3.2).

    No matching: every proposal contributes to every pixel.

    1. ``S[b, c, p] = sum_n sigmoid(m_n)[b, p] * softmax(logits_n)[b, c]`` over the ``C + 1``
       channels (the last = no-object), masks bilinearly upsampled (logits, ``align_corners=False``)
       to the label's size;
    2. ``S' = sigmoid(output_sig * S - output_sig)``;
    3. one-hot targets over ``C + 1`` channels with **ignore pixels mapped to the no-object
       channel**;
    4. focal: ``-a_t (1 - p_t)^gamma log(clamp(p_t, 1e-4, 1 - 1e-4))`` with ``p_t = S' y + (1 - S')(1 - y)``,
       ``a_t = alpha y + (1 - alpha)(1 - y)``, **mean over every element** ``B (C+1) H W``;
    5. dice over the class channels only (no-object zeroed in prediction and target), one dice per
       image over all its class channels and pixels together:
       ``1 - (2 sum S' y + 1) / (sum S' + sum y + 1)``, mean over the images;
    6. ``loss = focal_weight * focal + dice_weight * dice`` (released script: 2.0 and 0.8).

    Args:
        class_logits: ``[B, Q, C + 1]`` segment logits (last column no-object).
        mask_logits: ``[B, Q, h, w]`` proposal mask logits.
        target: ``[B, H, W]`` integer training ids in ``0..C-1`` or ``ignore_index``.

    Returns:
        ``{"loss", "focal", "dice"}`` 0-d float32 tensors.

    Raises:
        ValueError: shapes that do not fit, or a label id neither ``< C`` nor ``ignore_index``.
    """
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    B, Q, C1 = class_logits.shape
    if mask_logits.ndim != 4 or mask_logits.shape[:2] != (B, Q) or target.ndim != 3 or target.shape[0] != B:
        raise ValueError(
            f"deop loss: class_logits [B, Q, C+1], mask_logits [B, Q, h, w], target [B, H, W]; got "
            f"{tuple(class_logits.shape)}, {tuple(mask_logits.shape)}, {tuple(target.shape)}"
        )
    C = C1 - 1
    check_class_ids(target, C, ignore_index, "one column per training (seen) class plus no-object")
    with torch.autocast(device_type=class_logits.device.type, enabled=False):  # float32 throughout
        m = F.interpolate(mask_logits.float(), size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
        p = torch.softmax(class_logits.float(), dim=-1)
        s = torch.einsum("bqhw,bqc->bchw", m.sigmoid(), p)
        s = torch.sigmoid(output_sig * s - output_sig)
        t = torch.where(target == ignore_index, torch.full_like(target, C), target).long()
        y = F.one_hot(t, C1).permute(0, 3, 1, 2).to(s.dtype)
        pt = s * y + (1 - s) * (1 - y)
        at = focal_alpha * y + (1 - focal_alpha) * (1 - y)
        focal = (-at * (1 - pt) ** focal_gamma * torch.log(pt.clamp(1e-4, 1 - 1e-4))).mean()
        sc, yc = s[:, :C].flatten(1), y[:, :C].flatten(1)
        dice = (1 - (2 * (sc * yc).sum(-1) + 1) / (sc.sum(-1) + yc.sum(-1) + 1)).mean()
    return {"loss": focal_weight * focal + dice_weight * dice, "focal": focal, "dice": dice}


__all__ = ["deop_pixel_loss"]
