"""The 2-D sine positional encoding of DETR / MaskFormer, shared by MaskFormer's transformer
decoder (:mod:`zeroseg.models.maskformer`) and DeOP's heatmap decoder (:mod:`zeroseg.models.deop`).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math

import torch


def sine_position_encoding(
    h: int,
    w: int,
    channels: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """DETR's ``PositionEmbeddingSine(channels // 2, normalize=True)`` without a padding mask (the
    keys of MaskFormer's transformer decoder and of DeOP's heatmap decoder).

    Row / column indices ``1..h`` / ``1..w`` normalised to ``(0, 2*pi]`` (``i / (n + 1e-6) *
    2 pi``, as DETR: divided by the last index plus eps); per axis ``channels // 2`` features,
    feature ``k`` the ``sin`` (even ``k``) / ``cos`` (odd ``k``) of ``pos / temperature ** (2
    floor(k / 2) / (channels / 2))``, interleaved; the y features first, then x. Computed in
    float32, then cast to ``dtype``.

    Args:
        h, w: grid size (tokens).
        channels: encoding width (a multiple of 4).
        device: where to build it.
        dtype: the returned dtype.
        temperature: the frequency base.

    Returns:
        ``[h*w, channels]`` (row-major tokens: token ``i * w + j`` is row ``i``, column ``j``;
        ``[b, channels, h, w]`` in DETR's layout is ``.T.reshape(channels, h, w)`` expanded).

    Raises:
        ValueError: ``channels`` not a multiple of 4.
    """
    if channels % 4:
        raise ValueError(f"sine position encoding needs channels divisible by 4, got {channels}")
    npf = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    k = torch.arange(npf, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t  # [h, npf], [w, npf]
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)], dim=-1)
    return pos.reshape(h * w, channels).to(dtype)


__all__ = ["sine_position_encoding"]
