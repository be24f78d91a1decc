"""Initialisation and normalisation helpers of MaskFormer's convolutions (detectron2's).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math

from torch import nn


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's ``c2_xavier_fill``: ``kaiming_uniform_(a=1)`` weights, zero bias (Caffe2's
    XavierFill), used by MaskFormer for every conv of the pixel decoder and the input projection."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (MaskFormer's ``GN``), or the largest divisor of 32 that divides
    ``channels`` when it is small or not a multiple of 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


__all__ = ["c2_xavier_fill", "group_norm"]
