"""MaskFormer's transformer decoder (DETR's, ``ENC_LAYERS: 0``) and the heads' ``MLP``.

:class:`DecoderLayer` is also DeOP's decoder layer (:mod:`zeroseg.models.deop`) and the base of
PADing's noisy one (:class:`zeroseg.models.pading.NoisyDecoderLayer`).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DecoderLayer(nn.Module):
    """DETR's post-norm ``TransformerDecoderLayer`` (``normalize_before=False``, ReLU)::

        t = norm1(t + drop(self_attn(q=t+qpos, k=t+qpos, v=t)))
        t = norm2(t + drop(cross_attn(q=t+qpos, k=mem+pos, v=mem)))
        t = norm3(t + drop(linear2(drop(relu(linear1(t))))))

    Shapes batch first: ``t [B, Q, d]``, ``mem [B, HW, d]``; ``qpos [B, Q, d]`` / ``pos [B, HW, d]``
    or, broadcast over the batch, ``[Q, d]`` / ``[HW, d]``.

    Also DeOP's decoder layer (released ``TransformerDecoderLayerLinear`` with
    ``DECODER_MASK_FEATURE False``, MaskFormer's ``forward_post``; :class:`zeroseg.models.deop.HeatmapDecoder`)
    and the base of PADing's :class:`~zeroseg.models.pading.NoisyDecoderLayer`.
    """

    def __init__(self, d: int, nheads: int, dim_ff: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, nheads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(d, dim_ff), nn.Linear(dim_ff, d)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop, self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(4))

    def forward(self, t: torch.Tensor, mem: torch.Tensor, qpos: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = t + qpos
        t = self.norm1(t + self.drop1(self.self_attn(q, q, t, need_weights=False)[0]))
        t = self.norm2(t + self.drop2(self.cross_attn(t + qpos, mem + pos, mem, need_weights=False)[0]))
        return self.norm3(t + self.drop3(self.linear2(self.drop(F.relu(self.linear1(t))))))


class TransformerDecoder(nn.Module):
    """DETR's decoder with ``return_intermediate``: ``forward(mem [B, HW, d], pos [B, HW, d], qpos
    [B, Q, d]) -> [L, B, Q, d]``, the shared final LayerNorm applied to every layer's output.
    Targets start at zero; parameters with more than one dimension are Xavier-uniform
    (DETR's ``Transformer._reset_parameters``)."""

    def __init__(self, d: int, nheads: int, dim_ff: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(d, nheads, dim_ff, dropout) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(d)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, mem: torch.Tensor, pos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
        t = torch.zeros_like(qpos)
        outs = []
        for layer in self.layers:
            t = layer(t, mem, qpos, pos)
            outs.append(self.norm(t))
        return torch.stack(outs)


class MLP(nn.Module):
    """``n`` linear layers with ReLU between them (DETR's ``MLP``): ``in -> hidden .. -> out``."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, n: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (n - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


__all__ = ["MLP", "DecoderLayer", "TransformerDecoder"]
