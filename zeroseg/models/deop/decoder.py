"""DeOP's classification anchor learning (Sec. 4.2): the query-based heatmap decoder (Eq. 3) and
the conv-based one (Eq. 4), which pool the CLIP features into one embedding per proposal.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.models.maskformer.transformer_decoder import DecoderLayer
from zeroseg.models.position import sine_position_encoding


def heatmap_pool(
    q: torch.Tensor,
    k: torch.Tensor,
    features: torch.Tensor,
    masks: torch.Tensor,
    heads: int,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The heatmap output layer's pooling (DeOP Eq. 3 and Sec. 4.2.2, ``F_I = H (.) F_V``;
    released ``MultiHeadAttentionMy`` with ``outDecoderLayer=True``).

    Per head ``h`` with ``d = C / heads`` channels: ``H_h = dropout(softmax(q_h k_h^T / sqrt(d))) * M``
    (softmax over the ``N`` tokens, then times the proposal's mask, the same for every head), and
    the head's output is ``H_h @ features[..., h*d:(h+1)*d]``: each head pools its own channel slice
    of the raw features (no value projection, no output projection). The heads are concatenated.

    Args:
        q: ``[B, Q, C]`` projected queries (before the ``1/sqrt(d)`` scaling).
        k: ``[B, N, C]`` projected keys.
        features: ``[B, N, C]`` the features pooled (DeOP: the L2-normalised CLIP features ``F_V``).
        masks: ``[B, Q, N]`` proposal masks in [0, 1] (sigmoid, resized to the grid).
        heads: number of heads (``C`` divisible by it).
        dropout / training: dropout on the softmax weights (released: always applied, also at
            inference, because ``training`` is never passed; here only in training mode).

    Returns:
        ``[B, Q, C]`` pooled embeddings (not normalised).

    Raises:
        ValueError: shapes that do not fit.
    """
    B, Q, C = q.shape
    N = k.shape[1]
    if C % heads or k.shape != (B, N, C) or features.shape != (B, N, C) or masks.shape != (B, Q, N):
        raise ValueError(
            f"heatmap pooling: q [B, Q, C], k and features [B, N, C], masks [B, Q, N] with C divisible by "
            f"{heads} heads; got q {tuple(q.shape)}, k {tuple(k.shape)}, features {tuple(features.shape)}, "
            f"masks {tuple(masks.shape)}"
        )
    d = C // heads
    qh = q.reshape(B, Q, heads, d).transpose(1, 2) * d**-0.5  # [B, h, Q, d]
    kh = k.reshape(B, N, heads, d).transpose(1, 2)  # [B, h, N, d]
    vh = features.reshape(B, N, heads, d).transpose(1, 2)
    w = torch.softmax(qh @ kh.transpose(-1, -2), dim=-1)  # [B, h, Q, N]
    w = F.dropout(w, p=dropout, training=training)
    w = w * masks.unsqueeze(1).to(w.dtype)
    return (w @ vh.to(w.dtype)).transpose(1, 2).reshape(B, Q, C)


class HeatmapDecoder(nn.Module):
    """Query-based heatmap decoder (DeOP Sec. 4.2.1, Eq. 3; released ``TransformerDecoderLinear``).

    ``Q`` learnable anchor-query positions (``nn.Embedding(Q, W)``, released ``query_embedding``),
    target initialised to zeros, ``K`` :class:`DecoderLayer` s over the memory (the L2-normalised
    CLIP features, keys with the sine positional encoding), then the heatmap output layer:
    self-attention + LayerNorm, then :func:`heatmap_pool` with query/key projections and the
    proposals' sigmoid masks; the pooled embedding is L2-normalised (released: ``/ norm``, ``+1e-10``
    when a norm is 0). Query ``i`` is paired with proposal ``i``.

    ``forward(memory [B, N, W], grid (h, w), masks [B, Q, N]) -> segment embeddings [B, Q, W]``.

    Raises:
        ValueError: ``width`` not divisible by ``heads`` or by 4.
    """

    def __init__(self, num_queries: int, width: int, heads: int, ffn: int, dropout: float, layers: int) -> None:
        super().__init__()
        if width % heads or width % 4:
            raise ValueError(f"heatmap decoder width {width} must be divisible by heads {heads} and by 4")
        self.width, self.heads, self.dropout = width, heads, dropout
        self.query_embed = nn.Embedding(num_queries, width)
        self.layers = nn.ModuleList([DecoderLayer(width, heads, ffn, dropout) for _ in range(layers)])
        # output layer (released TransformerDecoderOutLayerLinear): self-attention, norm1, heatmap pooling
        self.out_self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.out_norm = nn.LayerNorm(width)
        self.out_drop = nn.Dropout(dropout)
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        for lin in (self.q_proj, self.k_proj):  # released: xavier-uniform in_proj, zero bias
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, memory: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor) -> torch.Tensor:
        B, N, W = memory.shape
        if W != self.width or N != grid[0] * grid[1]:
            raise ValueError(
                f"heatmap decoder memory must be [B, {grid[0]}*{grid[1]}, {self.width}], got {tuple(memory.shape)}"
            )
        pos = sine_position_encoding(grid[0], grid[1], W, memory.device, memory.dtype)
        qpos = self.query_embed.weight.to(memory.dtype)
        tgt = torch.zeros(B, qpos.shape[0], W, dtype=memory.dtype, device=memory.device)
        for layer in self.layers:
            tgt = layer(tgt, memory, qpos, pos)
        q = tgt + qpos
        tgt = self.out_norm(tgt + self.out_drop(self.out_self_attn(q, q, tgt, need_weights=False)[0]))
        pooled = heatmap_pool(
            self.q_proj(tgt + qpos),
            self.k_proj(memory + pos),
            memory,
            masks,
            self.heads,
            dropout=self.dropout,
            training=self.training,
        )
        n = pooled.norm(dim=-1, keepdim=True)
        return pooled / torch.where(n == 0, torch.full_like(n, 1e-10), n)


class ConvHeatmapDecoder(nn.Module):
    """Conv-based anchor heatmap decoder (DeOP Sec. 4.2.1, Eq. 4; not in the released code, whose
    ``DECODER_CONV_*`` keys have no implementation): per proposal ``n`` the masked feature map
    ``F_V * M_n`` goes through ``K`` conv3x3-BN-ReLU layers (``width`` channels; paper: 512) and a
    conv1x1 to one channel; a softmax over the grid gives the heatmap ``H_n``; the segment
    embedding is ``sum_p H_n[p] F_V[p]``, L2-normalised (as the query-based decoder's).

    ``forward(memory [B, N, D], grid (h, w), masks [B, Q, N]) -> [B, Q, D]``.
    """

    def __init__(self, in_dim: int, width: int, layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        c = in_dim
        for _ in range(layers):
            mods += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.cbr = nn.Sequential(*mods)
        self.out = nn.Conv2d(c, 1, 1)

    def forward(self, memory: torch.Tensor, grid: tuple[int, int], masks: torch.Tensor) -> torch.Tensor:
        B, N, D = memory.shape
        Q = masks.shape[1]
        fmap = memory.transpose(1, 2).reshape(B, 1, D, grid[0], grid[1])
        x = (fmap * masks.reshape(B, Q, 1, grid[0], grid[1]).to(memory.dtype)).reshape(B * Q, D, grid[0], grid[1])
        h = torch.softmax(self.out(self.cbr(x)).reshape(B, Q, N).float(), dim=-1)  # Eq. 4's sigma
        pooled = h.to(memory.dtype) @ memory  # [B, Q, D]
        return F.normalize(pooled, dim=-1)


__all__ = ["ConvHeatmapDecoder", "DecoderLayer", "HeatmapDecoder", "heatmap_pool"]
