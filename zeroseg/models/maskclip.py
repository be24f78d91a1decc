"""MaskCLIP: training-free dense CLIP baseline (Zhou, Loy and Dai, "Extract Free Dense Labels
from CLIP", ECCV 2022).

Each patch's embedding from the frozen CLIP image tower (:func:`zeroseg.models.clip.dense_features`:
the last block's value embedding instead of its query-key attention, MaskCLIP Sec. 3.2) is
compared with the class text embeddings by cosine similarity; the class with the highest
similarity labels the patch. Nothing is trained. The released code's optional refinements
(key smoothing, prompt denoising, MaskCLIP+ pseudo-label training) are not implemented.

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
from zeroseg.config.maskclip import MaskCLIPConfig
from zeroseg.models import Segmenter
from zeroseg.models.clip import (
    check_dense_visual,
    check_input_size,
    dense_features,
    image_norm,
    native_input_size,
    patch_size,
)

#: Model config keys of :class:`MaskCLIP` and their defaults: the dump of
#: :class:`zeroseg.config.maskclip.MaskCLIPConfig` (the one schema; its docstring says what each is).
MASKCLIP_DEFAULT_CONFIG: dict[str, Any] = MaskCLIPConfig().model_dump(mode="json")


def resolve_maskclip_config(
    clip_model: nn.Module, cfg: MaskCLIPConfig | Mapping[str, Any] | None = None
) -> MaskCLIPConfig:
    """``cfg`` (a validated :class:`~zeroseg.config.maskclip.MaskCLIPConfig`, or a mapping of its
    keys, validated here) with ``input_size`` and ``logit_scale`` made concrete for ``clip_model``.

    Returns:
        the config with ``input_size`` ``(H, W)`` and ``logit_scale`` a float (its JSON dump:
        ``{"input_size": [H, W], "logit_scale": float}``).

    Raises:
        ConfigError: an unknown key (naming the nearest), a bad ``input_size`` (not ``[H, W]``
            positive ints, or not a multiple of the CLIP patch size) or ``logit_scale``.
    """
    c = validated(MaskCLIPConfig, cfg, "MaskCLIP model")
    size = tuple(int(s) for s in (c.input_size or native_input_size(clip_model)))
    check_input_size(clip_model, list(size), "MaskCLIP input_size")
    scale = c.logit_scale
    if scale == "model":
        scale = float(clip_model.logit_scale.detach().exp().reshape(-1)[0])
    return c.model_copy(update={"input_size": size, "logit_scale": float(scale)})


class MaskCLIP(Segmenter):
    """Training-free dense CLIP segmenter (MaskCLIP).

    Args:
        clip_model: an open_clip ``CLIP`` with a ViT image tower (or the tower itself). Only the
            image tower is kept; it is frozen (``requires_grad=False``) and put in eval mode.
        cfg: the validated :class:`MaskCLIPConfig` (or a mapping of its keys, validated here:
            ``segmenter.json``'s ``"model"``); defaults in :data:`MASKCLIP_DEFAULT_CONFIG`.

    Attributes (``Segmenter`` contract): ``input_size`` ``(H, W)``; ``mean``/``std``: the CLIP
    model's pixel normalisation (``visual.preprocess_cfg``, OpenAI's by default); ``cfg``: the
    resolved :class:`MaskCLIPConfig` (concrete ``input_size`` and ``logit_scale``); ``logit_scale``: float.

    ``forward(images [B, 3, H, W], text_embeddings [C, D]) -> scores [B, C, H/p, W/p]`` float32:
    ``logit_scale * cos(patch_embedding, text_embedding)`` (both L2-normalised here), at the
    patch grid (``p`` = patch size). ``trainable_names()`` is empty: no ``weights.pt``.

    Raises:
        ConfigError: bad config. ValueError: a non-ViT image tower; at call time, text
        embeddings not ``[C >= 1, D]``.
    """

    def __init__(self, clip_model: nn.Module, cfg: MaskCLIPConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        visual = getattr(clip_model, "visual", clip_model)
        check_dense_visual(visual)
        self.cfg = resolve_maskclip_config(clip_model, cfg)
        self.visual = visual
        self.visual.requires_grad_(False)
        self.visual.eval()
        self.embed_dim = int(visual.output_dim)
        self.input_size = tuple(self.cfg.input_size)
        self.mean, self.std = image_norm(visual)
        self.logit_scale = self.cfg.logit_scale
        self.size_divisibility = math.lcm(*patch_size(visual))  # evaluate's short-side protocol pads to it

    def train(self, mode: bool = True) -> MaskCLIP:
        """The frozen tower always stays in eval mode (no dropout / patch dropout)."""
        super().train(mode)
        self.visual.eval()
        return self

    def trainable_names(self) -> list[str]:
        return []

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` -> L2-normalised patch embeddings ``[B, D, H/p, W/p]`` float32."""
        _, patches = dense_features(self.visual, images)
        return F.normalize(patches.float(), dim=1)

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] < 1 or text_embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"text_embeddings must be [C >= 1, {self.embed_dim}], got {tuple(text_embeddings.shape)}")
        patches = self.patch_embeddings(images)
        t = F.normalize(text_embeddings.to(device=patches.device, dtype=torch.float32), dim=-1)
        return self.logit_scale * torch.einsum("bdhw,cd->bchw", patches, t)
