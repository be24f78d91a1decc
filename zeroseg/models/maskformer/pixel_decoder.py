"""MaskFormer's pixel decoder (``BasePixelDecoder``): an FPN over the backbone's res2..res5 to
per-pixel embeddings at stride 4.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.models.maskformer.layers import c2_xavier_fill, group_norm


class _ConvNorm(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, relu: bool) -> None:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)  # no bias under a norm (detectron2)
        c2_xavier_fill(conv)
        super().__init__(conv, group_norm(cout), *([nn.ReLU(inplace=True)] if relu else []))


class PixelDecoder(nn.Module):
    """MaskFormer's ``BasePixelDecoder``: a top-down FPN over res2..res5.

    ``y5 = relu(GN(conv3x3(res5)))``; for ``l = 4, 3, 2``: ``y_l = relu(GN(conv3x3(GN(conv1x1(res_l))
    + nearest_up(y_{l+1}))))``; ``mask_features = conv3x3(y2)`` (with bias, no norm).

    ``forward(feats) -> mask_features [B, mask_dim, H/4, W/4]``.
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int, mask_dim: int) -> None:
        super().__init__()
        *low, top = in_channels
        self.top = _ConvNorm(top, conv_dim, 3, relu=True)
        self.lateral = nn.ModuleList([_ConvNorm(c, conv_dim, 1, relu=False) for c in low])
        self.output = nn.ModuleList([_ConvNorm(conv_dim, conv_dim, 3, relu=True) for _ in low])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        y = self.top(feats["res5"])
        for i in reversed(range(len(self.lateral))):  # res4, res3, res2
            lat = self.lateral[i](feats[f"res{i + 2}"])
            y = self.output[i](lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
        return self.mask_features(y)


__all__ = ["PixelDecoder"]
