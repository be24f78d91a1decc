"""ZegFormer's inference hyperparameters (Ding et al., "Decoupling Zero-Shot Semantic
Segmentation", CVPR 2022, Sec. 3.2), torch-free.

ZegFormer's trained part is the proposal model (``pretrain_proposals`` with ``class_head:
text``: MaskFormer whose segment-level semantic embeddings are classified against text, Eq. 1;
``zeroseg.config.proposals``); what the ``zegformer`` method adds is inference only: the CLIP
image-embedding branch on sub-images of the proposals and the fusion of the two segment
classifications (Eq. 3). Defaults are the released code's (dingjiansw101/ZegFormer
``mask_former/mask_former_model.py``; ``../shared/papers/released-code.md`` sections 1.3-1.4).
See ``zeroseg.models.zegformer`` for the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Eq. 3's lambda in the released code (``lambda_balance = 2 / 3.``, hard-coded; the paper gives
#: no value).
RELEASED_LAMBDA = 2.0 / 3.0


class ZegFormerConfig(BaseModel):
    """``train_classifier.model`` of ``method: zegformer``.

    Fields:
        image_branch: classify each proposal's sub-image with the CLIP image encoder too (the
            paper's ZegFormer-img and the fused ZegFormer; released ``CLIP_CLASSIFICATION: True``
            in the ``*_gzss_eval.yaml`` configs). Off: only ZegFormer-seg (Eq. 2 with Eq. 1's
            probabilities) is computed.
        clip_style: how a sub-image is made from a proposal (Sec. 3.2 "f(m_q, I)", ablated in
            Sec. 4.5; released ``CLIP_CLS_STYLE``): ``crop_and_mask`` (released ``cropmask``,
            default: the image times the binary mask, cropped to the mask's box), ``crop`` (the
            box of the unmasked image) or ``mask`` (the whole image times the mask).
        mask_threshold: a proposal's binary mask is ``sigmoid(mask logit) > mask_threshold``
            (released: 0.5, hard-coded).
        crop_size: side of the square sub-images in pixels, or None for the CLIP image encoder's
            native input size (224 for ViT-B/16: the paper's 224 x 224, Sec. 4.2). The encoder
            takes only its native size (checked when the model is built).
        lambda_balance: Eq. 3's lambda in [0, 1] (released: 2/3, hard-coded as
            ``lambda_balance``; the paper gives no value).
        fusion: ``released`` (Eq. 3 as in the paper and the released ``ENSEMBLING: True``: seen
            classes ``p^lambda * mean_seen(p')^(1 - lambda)``, unseen classes
            ``p^(1 - lambda) * p'^lambda``) or ``all_classes`` (released ``ENSEMBLING_ALL_CLS``:
            ``p^(1 - lambda) * p'^lambda`` for every class).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_branch: bool = True
    clip_style: Literal["crop_and_mask", "crop", "mask"] = "crop_and_mask"
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    crop_size: Annotated[int, Field(strict=True, ge=1)] | None = None
    lambda_balance: float = Field(RELEASED_LAMBDA, ge=0.0, le=1.0)
    fusion: Literal["released", "all_classes"] = "released"


__all__ = ["RELEASED_LAMBDA", "ZegFormerConfig"]
