"""The MaskFormer proposal model (:class:`MaskFormer`) and its semantic inference
(:func:`semantic_scores`); the package docstring (:mod:`zeroseg.models.maskformer`) describes both.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.proposals import ProposalConfig
from zeroseg.errors import ConfigError
from zeroseg.models.maskformer.backbone import IMAGENET_MEAN, IMAGENET_STD, ClipPyramidBackbone, ResNetBackbone
from zeroseg.models.maskformer.criterion import SetCriterion
from zeroseg.models.maskformer.layers import c2_xavier_fill
from zeroseg.models.maskformer.pixel_decoder import PixelDecoder
from zeroseg.models.maskformer.transformer_decoder import MLP, TransformerDecoder
from zeroseg.models.position import sine_position_encoding


class MaskFormer(nn.Module):
    """MaskFormer proposal model (module docstring; ``zeroseg.config.proposals.ProposalConfig``).

    Args:
        cfg: a :class:`ProposalConfig` or its dict form.
        num_classes: ``K``, the classes the head scores (the seen classes). Sizes the ``linear``
            head; recorded for ``text`` (whose ``K`` is the number of text rows at forward time);
            ignored for ``objectness`` (always 1).
        text_dim: CLIP embedding size ``D`` (required for ``text``: ``Linear(hidden, D)`` and the
            no-object embedding ``[1, D]``; ignored otherwise).
        clip_visual: an open_clip ``VisionTransformer`` (required for backbone ``clip``;
            deep-copied and trained).
        load_backbone_weights: False to skip reading ``cfg.backbone_weights`` (when a full state
            dict is loaded right after, :func:`load_proposal_model`).

    Attributes:
        cfg: the validated :class:`ProposalConfig` (``proposals.json``'s ``model`` is its JSON dump).
        num_queries, hidden_dim, class_head, text_dim, num_classes, size_divisibility.
        mean, std: pixel normalisation for images in [0, 1] (ImageNet for ResNets, the CLIP
            model's own for ``clip``: ``zeroseg.models.clip.image_norm``).

    Raises:
        ConfigError: a bad config; ``text`` without ``text_dim``; ``clip`` without
            ``clip_visual`` or with a patch size that does not divide ``size_divisibility``;
            ``num_classes < 1``; backbone weights that cannot be obtained or do not fit.
    """

    def __init__(
        self,
        cfg: ProposalConfig | Mapping[str, Any],
        num_classes: int,
        text_dim: int | None = None,
        clip_visual: nn.Module | None = None,
        *,
        load_backbone_weights: bool = True,
    ) -> None:
        super().__init__()
        c = validated(ProposalConfig, cfg, "model")
        self.cfg = c
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"MaskFormer num_classes must be a positive int (the seen classes), got {num_classes!r}")
        self.num_queries, self.hidden_dim, self.class_head = c.num_queries, c.hidden_dim, c.class_head
        self.size_divisibility = c.size_divisibility
        self.num_classes = 1 if c.class_head == "objectness" else int(num_classes)
        self.text_dim = None
        if c.class_head == "text":
            if text_dim is None or isinstance(text_dim, bool) or int(text_dim) < 1:
                raise ConfigError(
                    "MaskFormer class_head 'text' needs text_dim (the CLIP embedding size D), got "
                    f"{text_dim!r}; use class_head linear/objectness for a head without text"
                )
            self.text_dim = int(text_dim)

        if c.backbone == "clip":
            if clip_visual is None:
                raise ConfigError(
                    "MaskFormer backbone 'clip' needs clip_visual (the open_clip image tower, model.visual)"
                )
            try:
                self.backbone: nn.Module = ClipPyramidBackbone(clip_visual)
            except ValueError as e:
                raise ConfigError(f"model.backbone clip: {e}") from None
            if c.size_divisibility % self.backbone.patch:
                raise ConfigError(
                    f"model.size_divisibility {c.size_divisibility} is not a multiple of the CLIP patch size "
                    f"{self.backbone.patch}"
                )
            from zeroseg.models.clip import image_norm

            self.mean, self.std = image_norm(clip_visual)
        else:
            self.backbone = ResNetBackbone(c.backbone, c.backbone_weights, load=load_backbone_weights)
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

        ch = self.backbone.channels
        self.pixel_decoder = PixelDecoder(ch, c.conv_dim, c.mask_dim)
        if ch[-1] != c.hidden_dim:  # released: a 1x1 projection only when the widths differ
            self.input_proj: nn.Module = nn.Conv2d(ch[-1], c.hidden_dim, 1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.decoder = TransformerDecoder(c.hidden_dim, c.nheads, c.dim_feedforward, c.dropout, c.dec_layers)
        self.mask_embed = MLP(c.hidden_dim, c.hidden_dim, c.mask_dim, 3)
        if c.class_head == "text":
            self.class_embed = nn.Linear(c.hidden_dim, self.text_dim)
            self.bg_feature = nn.Parameter(torch.empty(1, self.text_dim))
            nn.init.kaiming_uniform_(self.bg_feature, a=math.sqrt(5))
        elif c.class_head == "linear":
            self.class_embed = nn.Linear(c.hidden_dim, self.num_classes + 1)
        else:
            self.class_embed = nn.Linear(c.hidden_dim, 2)

    def criterion(self):
        """The training loss of this model: :class:`~zeroseg.models.maskformer.criterion.SetCriterion`
        with the config's weights (its matcher uses them as costs, as released), ``class_agnostic``
        for the ``objectness`` head (every target is "object")."""
        c = self.cfg
        return SetCriterion(
            self.num_classes,
            class_weight=c.class_weight,
            mask_weight=c.mask_weight,
            dice_weight=c.dice_weight,
            no_object_weight=c.no_object_weight,
            class_agnostic=c.class_head == "objectness",
        )

    # ---------------------------------------------------------------- heads

    def classify(self, hs: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """Class logits of decoder outputs ``hs [..., Q, hidden]`` -> ``[..., Q, K + 1]``.

        ``text``: ``s * [cos(x, t_1) .. cos(x, t_K), x_hat . b]`` with ``x_hat`` the L2-normalised
        projection, ``s = logit_scale`` and ``b`` the no-object embedding (normalised only with
        ``no_object_normalized``: ZegFormer Eq. 1; code: raw).

        Raises:
            ValueError: ``text`` without ``[K, D]`` text embeddings.
        """
        if self.class_head != "text":
            return self.class_embed(hs)
        self._check_text(text_embeddings)
        x = F.normalize(self.class_embed(hs), dim=-1)
        t = text_embeddings.to(x.dtype)
        bg = self.bg_feature.to(x.dtype)
        if self.cfg.no_object_normalized:
            bg = F.normalize(bg, dim=-1)
        scale = self.cfg.logit_scale
        return torch.cat([scale * x @ t.T, scale * x @ bg.T], dim=-1)

    def _check_text(self, text_embeddings: torch.Tensor | None) -> None:
        if text_embeddings is None or text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.text_dim:
            got = None if text_embeddings is None else tuple(text_embeddings.shape)
            raise ValueError(
                f"MaskFormer class_head 'text' needs text_embeddings [K, {self.text_dim}] (the seen classes' "
                f"L2-normalised CLIP text embeddings), got {got}"
            )

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor | None = None) -> dict[str, Any]:
        """Mask proposals and their class logits.

        Args:
            images: float ``[B, 3, H, W]`` normalised with :attr:`mean` / :attr:`std`; ``H, W``
                multiples of ``size_divisibility``.
            text_embeddings: ``[K, D]`` L2-normalised (required for ``text``, ignored otherwise).

        Returns:
            ``{"pred_logits": [B, Q, K + 1]`` (last column no-object; objectness ``K = 1``),
            ``"pred_masks": [B, Q, H/4, W/4]`` mask logits, ``"query_embed": [B, Q, hidden]``
            (last decoder layer after the final norm), and in training with ``deep_supervision``
            ``"aux_outputs": [{"pred_logits", "pred_masks"}]`` of the ``dec_layers - 1`` earlier
            layers (first layer first)``}``.

        Raises:
            ValueError: images not ``[B, 3, H, W]`` with ``H, W`` multiples of
                ``size_divisibility``; missing / mis-shaped text embeddings for ``text``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"MaskFormer images must be [B, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.size_divisibility or W % self.size_divisibility:
            raise ValueError(
                f"MaskFormer images {H}x{W} are not multiples of size_divisibility {self.size_divisibility}: "
                "pad (or crop) them first"
            )
        if self.class_head == "text":
            self._check_text(text_embeddings)  # fail before the backbone runs
        feats = self.backbone(images)
        mask_features = self.pixel_decoder(feats)  # [B, mask_dim, H/4, W/4]
        src = self.input_proj(feats["res5"])  # [B, d, H/32, W/32]
        b, d, h, w = src.shape
        pos = sine_position_encoding(h, w, d, src.device, src.dtype).unsqueeze(0).expand(b, -1, -1)  # [B, HW, d]
        mem = src.flatten(2).transpose(1, 2)  # [B, HW, d]
        qpos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        aux = self.training and self.cfg.deep_supervision
        hs = self.decoder(mem, pos, qpos)  # [L, B, Q, d]
        hs_used = hs if aux else hs[-1:]
        logits = self.classify(hs_used, text_embeddings)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs_used), mask_features)
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_masks": masks[-1], "query_embed": hs[-1]}
        if aux:
            out["aux_outputs"] = [{"pred_logits": a, "pred_masks": m} for a, m in zip(logits[:-1], masks[:-1])]
        return out


def semantic_scores(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """MaskFormer's semantic inference (Sec. 3.4; ZegFormer's ``semantic_inference``):
    ``einsum("bqc,bqhw->bchw", softmax(pred_logits)[..., :-1], sigmoid(pred_masks))``.

    Args:
        pred_logits: ``[B, Q, K + 1]`` (last column no-object).
        pred_masks: ``[B, Q, h, w]`` mask logits.

    Returns:
        ``[B, K, h, w]`` per-class scores in ``[0, Q]`` (sums of probabilities).

    Raises:
        ValueError: mismatched batch or query dimensions.
    """
    if pred_logits.ndim != 3 or pred_masks.ndim != 4 or pred_logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(
            f"semantic_scores needs pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w], got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
        )
    cls = pred_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", cls, pred_masks.float().sigmoid())


__all__ = ["MaskFormer", "semantic_scores"]
