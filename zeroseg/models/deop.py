"""DeOP (Han et al., ICCV 2023): a decoupled one-pass network for zero-shot segmentation.

Two streams (DeOP Sec. 3.1, Fig. 2):

1. **proposals**: a frozen MaskFormer (the ``pretrain_proposals`` artifact,
   :mod:`zeroseg.models.proposals`) gives ``Q`` mask logits ``m_n`` ``[B, Q, H/4, W/4]``; its own
   class logits are ignored (released code; the paper's proposal network has no class branch).
   Never trained here, always run under ``no_grad`` in eval mode.
2. **classification**: **one** pass of the image through the frozen CLIP ViT (the shared trunk,
   :mod:`zeroseg.models.trunk`) with

   - *patch severance* (Sec. 4.1) on ``severance_layers``: generalized (GPS, Eq. 2: ``identity`` =
     alpha 1, ``alpha``; or the released default ``mask_weighted``: identity attention with each
     token's value scaled by ``sum_n sigmoid(m_n)`` on the patch grid, [CLS] by ``Q``) or
     mask-guided (MPS, Eq. 1, ``mask_guided``);
   - *visual prompts* (Sec. 3.2, Appendix B "adding"): learned position embeddings added at the
     input and at the inputs of blocks 1-5 (released ``learned_position``);

   dense output ``ln_post`` + ``proj`` on the patch tokens, L2-normalised: ``F_V`` ``[B, N, D]``;
3. **classification anchor learning** (Sec. 4.2): the query-based heatmap decoder
   (:class:`HeatmapDecoder`: K standard decoder layers, then the heatmap output layer of Eq. 3
   whose per-head ``softmax(q k^T / sqrt(d)) * sigmoid(m_n)`` pools each head's own channel slice of
   ``F_V``, no value / output projection, released ``MultiHeadAttentionMy(outDecoderLayer=True)``)
   or the conv-based decoder of Eq. 4 (:class:`ConvHeatmapDecoder`); the segment embeddings
   ``F_I`` ``[B, Q, D]`` are L2-normalised;
4. **segment classification**: ``logit_scale x cos`` of ``F_I`` with the class text embeddings and
   a learnable (normalised) no-object embedding -> ``[B, Q, C + 1]`` (released
   ``get_sim_logits``); text embeddings from *learnable text prompts* (16 prefix context
   vectors through the frozen open_clip text tower, :meth:`DeOP.encode_text`);
5. **semantic scores** (released 2.6, MaskFormer's semantic inference; :func:`deop_semantic_scores`):
   the mask logits ``m`` are upsampled bilinearly to the (padded) input size ``H x W`` *before* the
   sigmoid, then ``einsum("bqc,bqhw->bchw", softmax(logits)[..., :-1], sigmoid(up(m)))``
   ``[B, C, H, W]`` (released ``semantic_inference`` after ``sem_seg_postprocess``; training's loss
   instead upsamples to the label's size, :func:`deop_pixel_loss`).

Training (:meth:`DeOP.loss`, :func:`deop_pixel_loss`) is the released per-pixel loss on the
summed mask x class probabilities, no Hungarian matching (released 2.4).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.deop import DeOPConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.models import Segmenter, check_state_dict
from zeroseg.models.proposals import check_proposals_doc, poly_lr_factor
from zeroseg.models.trunk import (
    INPUT,
    AttentionHook,
    BlockContext,
    blended_attention,
    forward_trunk,
    grid_additive,
    identity_attention,
    project,
    value_scaled_attention,
)

# =============================================================================================
# patch severance (Sec. 4.1)
# =============================================================================================


def proposal_patch_weights(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-token value weights of the released mask-weighted GPS (``multi_head_attention_forward_vit_softmax_noattn``).

    The proposal mask logits are resized bilinearly (``align_corners=False``) to the patch grid
    *before* the sigmoid, as released (``F.interpolate(mask_feature, (Mh // 4, Mw // 4))`` then
    ``.sigmoid()``), summed over the proposals; [CLS] gets ``Q`` (released: a column of ones per
    proposal, summed over the 100 proposals).

    Args:
        mask_logits: ``[B, Q, H', W']`` proposal mask logits.
        grid: ``(h, w)`` CLIP patch grid.

    Returns:
        ``[B, 1 + h*w]`` float32 weights: ``[Q, sum_n sigmoid(m_n)[patch_(0,0)], ...]``.
    """
    m = F.interpolate(mask_logits.float(), size=tuple(grid), mode="bilinear", align_corners=False).sigmoid()
    b, q = m.shape[:2]
    w = m.flatten(2).sum(1)  # [B, h*w]
    return torch.cat([torch.full((b, 1), float(q), dtype=w.dtype, device=w.device), w], dim=1)


def proposal_token_masks(mask_logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The proposal masks on the token sequence for mask-guided severance (Eq. 1): sigmoid of the
    logits resized bilinearly to the patch grid, with a [CLS] column of ones (released
    ``..._noattn_maskselfattn``). ``[B, Q, H', W']`` -> ``[B, Q, 1 + h*w]`` float32."""
    m = F.interpolate(mask_logits.float(), size=tuple(grid), mode="bilinear", align_corners=False).sigmoid()
    m = m.flatten(2)
    return torch.cat([torch.ones_like(m[:, :, :1]), m], dim=2)


def mask_guided_attention(masks: torch.Tensor | Callable[[BlockContext], torch.Tensor]) -> AttentionHook:
    """Mask-guided patch severance (DeOP Eq. 1; released ``multi_head_attention_forward_vit_softmax_noattn_maskselfattn``).

    The query-key attention is replaced by ``A = softmax_j(sum_n M_n,i M_n,j)`` (Eq. 1's
    ``M_i = sum_n M_n,i M_n`` as attention logits; the released code applies the softmax, the
    paper's equation has none), the same for every head; the output is ``out_proj(A V)`` with the
    block's own values ``V = W_v y + b_v``.

    Args:
        masks: ``[B, Q, 1 + h*w]`` (:func:`proposal_token_masks`) or ``ctx -> such a tensor``.

    Returns:
        an :data:`~zeroseg.models.trunk.AttentionHook`.

    Raises:
        ValueError: (at call time) prompt tokens in the sequence, or masks not ``[B, Q, L]``.
    """

    def hook(block: nn.Module, y: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        m = masks(ctx) if callable(masks) else masks
        B, L = y.shape[:2]
        if ctx.num_prompts or m.ndim != 3 or m.shape[0] != B or m.shape[2] != L:
            raise ValueError(
                f"mask-guided severance needs masks [B, Q, L] = [{B}, Q, {L}] and no prompt tokens, got "
                f"{tuple(m.shape)} with {ctx.num_prompts} prompts"
            )
        attn = block.attn
        e = attn.embed_dim
        w_v = attn.in_proj_weight[2 * e :] if attn.in_proj_weight is not None else attn.v_proj_weight
        b_v = attn.in_proj_bias[2 * e :] if attn.in_proj_bias is not None else None
        v = F.linear(y, w_v, b_v)
        m = m.to(torch.float32)
        a = torch.softmax(m.transpose(1, 2) @ m, dim=-1)  # [B, L, L]
        return attn.out_proj(a.to(v.dtype) @ v)

    return hook


def severance_hook(cfg: DeOPConfig, mask_logits: torch.Tensor | None) -> AttentionHook:
    """The attention hook of the configured severance (see :class:`~zeroseg.config.deop.DeOPConfig`).

    Raises:
        ValueError: a mask-based variant without ``mask_logits``.
    """
    if cfg.mask_guided or cfg.severance == "mask_weighted":
        if mask_logits is None:
            raise ValueError("mask-based patch severance needs the proposal mask logits")
        if cfg.mask_guided:
            return mask_guided_attention(lambda ctx: proposal_token_masks(mask_logits, ctx.grid))
        return value_scaled_attention(lambda ctx: proposal_patch_weights(mask_logits, ctx.grid))
    if cfg.severance == "identity":
        return identity_attention
    return blended_attention(float(cfg.alpha))


# =============================================================================================
# classification anchor learning (Sec. 4.2)
# =============================================================================================


def sine_position_encoding(h: int, w: int, channels: int, device=None, temperature: float = 10000.0) -> torch.Tensor:
    """The normalised 2-D sine positional encoding of DETR / MaskFormer (``PositionEmbeddingSine(
    channels // 2, normalize=True)``, DeOP's heatmap decoder keys): row and column positions
    ``1..h`` / ``1..w`` scaled to ``(0, 2 pi]``; per axis ``channels // 2`` features, feature ``k``
    ``sin`` (even ``k``) / ``cos`` (odd ``k``) of ``pos / temperature ** (2 floor(k / 2) / (channels / 2))``;
    the y features first. Returns ``[h*w, channels]`` float32 (row-major tokens).

    Raises:
        ValueError: ``channels`` not a multiple of 4.
    """
    if channels % 4:
        raise ValueError(f"sine position encoding needs channels divisible by 4, got {channels}")
    npf = channels // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + eps) * scale
    k = torch.arange(npf, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)

    def enc(p: torch.Tensor) -> torch.Tensor:  # [n] -> [n, npf]
        a = p[:, None] / dim_t
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)

    ey, ex = enc(y), enc(x)  # [h, npf], [w, npf]
    return torch.cat([ey[:, None].expand(h, w, npf), ex[None].expand(h, w, npf)], dim=2).reshape(h * w, channels)


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


class DecoderLayer(nn.Module):
    """A standard post-norm transformer decoder layer (DETR / MaskFormer ``forward_post``; DeOP's
    ``TransformerDecoderLayerLinear`` with ``DECODER_MASK_FEATURE False``): self-attention over the
    queries (``q = k = tgt + query_pos``), cross-attention to the memory (``q = tgt + query_pos``,
    ``k = memory + pos``, ``v = memory``), FFN (ReLU), each with dropout, residual and LayerNorm.

    ``forward(tgt [B, Q, W], memory [B, N, W], pos [N, W], query_pos [Q, W]) -> [B, Q, W]``.
    """

    def __init__(self, width: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(width, ffn)
        self.linear2 = nn.Linear(ffn, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.drop, self.drop1, self.drop2, self.drop3 = (nn.Dropout(dropout) for _ in range(4))

    def forward(self, tgt, memory, pos, query_pos):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        a = self.cross_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop2(a))
        return self.norm3(tgt + self.drop3(self.linear2(self.drop(F.relu(self.linear1(tgt))))))


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
        pos = sine_position_encoding(grid[0], grid[1], W, device=memory.device).to(memory.dtype)
        qpos = self.query_embed.weight.to(memory.dtype)
        tgt = torch.zeros(B, qpos.shape[0], W, dtype=memory.dtype, device=memory.device)
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, qpos)
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


# =============================================================================================
# loss (released criterion_decoder.loss_labels_bce)
# =============================================================================================


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
    if target.dtype.is_floating_point:
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")
    bad = (target != ignore_index) & ((target < 0) | (target >= C))
    if bool(bad.any()):
        vals = sorted(set(target[bad].unique().tolist()))[:10]
        raise ValueError(
            f"target has class ids {vals} outside 0..{C - 1} that are not ignore_index={ignore_index}: "
            "the logits must have one column per training (seen) class plus no-object"
        )
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


# =============================================================================================
# learnable text prompts (Sec. 3.2; released LearnablePromptExtractor)
# =============================================================================================


class TextPrompt(nn.Module):
    """Learnable prefix text prompts through a frozen open_clip text tower (CoOp-style; DeOP
    "online text prompt learning", released ``LearnablePromptExtractor`` with ``PROMPT_SHAPE (n, 0)``).

    The token sequence of class ``c`` is ``[SOS] p_1 .. p_n <name tokens> . [EOS] [pad]...``
    (``p_i`` learnable ``[n, width]``, initialised N(0, 0.02) as released; the released pipeline
    first trains them offline on ground-truth crops, which is not done here); positional
    embedding, the text transformer with the causal mask, ``ln_final``, the feature at the
    ``[EOS]`` position, ``text_projection``, L2-normalised.

    The text tower stays in ``clip`` (the owner's state dict); this module holds only ``ctx``.

    Raises:
        ValueError: a text tower without open_clip's CLIP BPE vocabulary (49408 tokens) or whose
            pooling is not at the [EOS] token; a name too long for the context.
    """

    def __init__(self, clip_model: nn.Module, n_ctx: int) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(clip_model, attr):
                raise ValueError(
                    f"DeOP's learnable text prompts need an open_clip CLIP model with its text tower (no {attr!r})"
                )
        vocab = clip_model.token_embedding.weight.shape[0]
        if vocab != 49408 or getattr(clip_model, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ValueError(
                "DeOP's learnable text prompts need a CLIP text tower with the CLIP BPE vocabulary (49408 "
                f"tokens, got {vocab}) pooled at the [EOS] token (got {getattr(clip_model, 'text_pool_type', None)!r})"
            )
        self.tokenizer = SimpleTokenizer()
        self.context_length = int(clip_model.positional_embedding.shape[0])
        self.width = int(clip_model.token_embedding.weight.shape[1])
        self.n_ctx = int(n_ctx)
        self.ctx = nn.Parameter(torch.randn(n_ctx, self.width) * 0.02) if n_ctx > 0 else None
        (self.dot_id,) = self.tokenizer.encode(".")

    def forward(self, clip_model: nn.Module, names: Sequence[str]) -> torch.Tensor:
        """``names`` (C class names) -> ``[C, D]`` L2-normalised text embeddings."""
        if not len(names):
            raise ValueError("encode_text needs at least one class name")
        tok = self.tokenizer
        emb = clip_model.token_embedding
        dev = emb.weight.device
        ids = [tok.encode(str(n)) for n in names]
        fixed = 1 + self.n_ctx + 2  # [SOS] ctx . [EOS]
        too_long = [n for n, i in zip(names, ids) if fixed + len(i) > self.context_length]
        if too_long:
            raise ValueError(
                f"class names too long for the text context ({self.context_length} tokens with {self.n_ctx} "
                f"prompt tokens): {too_long[:5]}"
            )
        seqs = []
        eos_at = []
        for i in ids:
            pre = torch.tensor([tok.sot_token_id], device=dev)
            post = torch.tensor([*i, self.dot_id, tok.eot_token_id], device=dev)
            pad = torch.zeros(self.context_length - fixed - len(i), dtype=torch.long, device=dev)
            seqs.append((pre, post, pad))
            eos_at.append(fixed + len(i) - 1)
        with torch.no_grad():  # the token embedding is frozen
            pieces = [(emb(a), emb(b), emb(c)) for a, b, c in seqs]
        cast = clip_model.transformer.get_cast_dtype() if hasattr(clip_model.transformer, "get_cast_dtype") else None
        dtype = cast or emb.weight.dtype
        rows = []
        for a, b, c in pieces:
            parts = [a] + ([self.ctx.to(a.dtype)] if self.ctx is not None else []) + [b, c]
            rows.append(torch.cat(parts, dim=0))
        x = torch.stack(rows).to(dtype) + clip_model.positional_embedding.to(dtype)
        x = clip_model.transformer(x, attn_mask=getattr(clip_model, "attn_mask", None))
        x = clip_model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), torch.tensor(eos_at, device=x.device)]
        proj = clip_model.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)


# =============================================================================================
# the segmenter
# =============================================================================================


def build_proposal_network(doc: Mapping[str, Any], clip_model: nn.Module | None = None) -> nn.Module:
    """The proposal model described by a ``proposals.json`` document, with untrained weights
    (no backbone weights fetched: the artifact's ``weights.pt`` replaces them).

    A ``clip`` backbone is built on ``clip_model``'s image tower when its tensors have the shapes
    of the proposals' CLIP architecture (deep-copied by the proposal model), else on ``load_clip``
    of the proposals' ``clip`` spec.

    Raises:
        DataError: a malformed document.
        ConfigError: a bad stored config (see ``zeroseg.models.proposals.MaskFormer``).
    """
    from zeroseg.models.proposals import MaskFormer

    try:
        model_cfg = dict(doc["model"])
        num_classes = int(doc["num_classes"])
        text_dim = doc.get("text_dim")
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"the proposals document is malformed ({type(e).__name__}: {e}); expected keys model, num_classes, "
            "text_dim (a pretrain_proposals artifact's proposals.json)"
        ) from None
    visual = None
    if model_cfg.get("backbone") == "clip":
        from zeroseg.config.clip import model_config
        from zeroseg.models.clip import as_spec, load_clip

        if not doc.get("clip"):
            raise DataError("the proposals document has a clip backbone but no clip spec")
        spec = as_spec(doc["clip"])
        ours = getattr(clip_model, "visual", None)
        want = model_config(spec).get("vision_cfg") or {}
        same = (
            ours is not None
            and int(ours.class_embedding.shape[-1]) == int(want.get("width", -1))
            and len(ours.transformer.resblocks) == int(want.get("layers", -1))
            and tuple(_pair(ours.patch_size)) == _pair(want.get("patch_size", -1))
        )
        visual = ours if same else load_clip(spec).visual
    return MaskFormer(model_cfg, num_classes, text_dim, visual, load_backbone_weights=False)


def _pair(x: Any) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (tuple, list)) else (int(x), int(x))


def check_proposals_fit(doc: Mapping[str, Any], cfg: DeOPConfig, embed_dim: int, where: str = "proposals") -> int:
    """Refuse a proposal model DeOP cannot use; returns its query count ``Q``.

    The refusals shared with ZegFormer (:func:`zeroseg.models.proposals.check_proposals_doc`: a
    query count that disagrees with the model it describes; a ``text`` class head whose embedding
    size is not the CLIP embedding size ``D``: the head is run, though its logits are ignored), then
    DeOP's own: it pairs anchor query ``i`` with proposal ``i`` (released), so
    ``model.num_queries``, when set, must equal the proposals' query count.

    Raises:
        DataError: naming both values and what to change.
    """
    q = check_proposals_doc(doc, embed_dim, who="DeOP", where=where)
    if cfg.num_queries is not None and cfg.num_queries != q:
        raise DataError(
            f"{where} has {q} queries but train_classifier.model.num_queries is {cfg.num_queries}: DeOP pairs "
            f"anchor query i with proposal i; set model.num_queries: {q} (or null), or bind proposals trained "
            f"with {cfg.num_queries} queries"
        )
    return q


def resolve_deop_config(cfg: Mapping[str, Any] | None) -> tuple[DeOPConfig, dict[str, Any]]:
    """Split a DeOP model config into its validated hyperparameters and the proposals document.

    Raises:
        ConfigError: a bad key or value (naming it), or no ``proposals`` document.
    """
    d = dict(cfg or {})
    doc = d.pop("proposals", None)
    if not isinstance(doc, Mapping):
        raise ConfigError(
            "a DeOP model config needs 'proposals' (the pretrain_proposals artifact's proposals.json "
            "content); train_classifier adds it from the bound proposals artifact"
        )
    return validated(DeOPConfig, d, "model"), dict(doc)


class DeOP(Segmenter):
    """DeOP segmenter (see the module docstring).

    Args:
        clip_model: an open_clip ``CLIP`` with a ViT image tower and its text tower (both frozen,
            kept whole under ``clip``; not modified).
        cfg: :class:`~zeroseg.config.deop.DeOPConfig` fields plus ``"proposals"``: the proposals
            artifact's ``proposals.json`` (``model``, ``num_classes``, ``text_dim``,
            ``num_queries``, ``input`` with ``mean`` / ``std``, ``clip``). The proposal model is
            built from it with random weights: load them with :meth:`load_proposal_weights` (a
            saved DeOP carries them in ``weights.pt`` under ``proposals.``).

    Attributes (Segmenter contract): ``input_size``; ``mean`` / ``std``: the proposal network's
    normalisation (released: both streams get the same ImageNet-normalised tensor);
    ``size_divisibility``; ``encodes_text = True`` (:meth:`encode_text`);
    ``scores_are_probabilities = True``.

    ``forward(images [B, 3, H, W], text_embeddings [C, D]) -> [B, C, H, W]`` semantic scores in
    [0, Q] at the input size (a sum over the proposals of class probability x mask probability; not a distribution).

    Trainable: the decoder, the no-object embedding, the visual prompts and the text context
    (:meth:`learned_state_dict`); ``weights.pt`` (:meth:`trainable_names`) also holds the frozen
    proposal model under ``proposals.``.

    Raises:
        ConfigError: a bad config, no proposals document, ``width`` other than the CLIP embedding
            size, sizes that are not multiples of the patch / the proposals' divisibility,
            visual prompt layers or severance layers outside the tower.
        DataError: a proposals document that does not fit (:func:`check_proposals_fit`).
        ValueError: a non-ViT CLIP model or one without a usable text tower.
    """

    scores_are_probabilities = True
    encodes_text = True

    def __init__(self, clip_model: nn.Module, cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        c, doc = resolve_deop_config(cfg)
        self.hp = c
        self.cfg = {**c.model_dump(mode="json"), "proposals": doc}
        if not hasattr(clip_model, "visual"):
            raise ValueError("DeOP needs a whole open_clip CLIP model (image and text towers)")
        self.clip = clip_model
        for p in self.clip.parameters():
            p.requires_grad_(False)
        visual = clip_model.visual
        from zeroseg.models.clip import check_input_size, image_norm, patch_size
        from zeroseg.models.trunk import check_trunk_visual

        check_trunk_visual(visual)
        self.embed_dim = int(visual.output_dim)
        self.patch = patch_size(visual)
        n_blocks = len(visual.transformer.resblocks)
        self.num_queries = check_proposals_fit(doc, c, self.embed_dim)

        # ---- sizes
        check_input_size(visual, c.input_size, "model.input_size")
        try:
            p_div = int(doc["model"].get("size_divisibility", 32))
            self.mean = tuple(float(v) for v in doc["input"]["mean"])
            self.std = tuple(float(v) for v in doc["input"]["std"])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataError(
                f"the proposals document lacks model.size_divisibility / input.mean / input.std ({e})"
            ) from None
        self.divisor = math.lcm(p_div, self.patch[0], self.patch[1])
        for key, size in (("model.input_size", c.input_size), ("model.size_divisibility", (c.size_divisibility,) * 2)):
            if size[0] % self.divisor or size[1] % self.divisor:
                raise ConfigError(
                    f"{key} {list(size)} must be a multiple of {self.divisor} (the proposal network's size "
                    f"divisibility {p_div} and the CLIP patch {list(self.patch)})"
                )
        self.input_size = tuple(int(s) for s in c.input_size)
        self.size_divisibility = int(c.size_divisibility)
        self.clip_mean, self.clip_std = image_norm(clip_model)

        # ---- proposals (frozen)
        self.proposals = build_proposal_network(doc, clip_model)
        for p in self.proposals.parameters():
            p.requires_grad_(False)
        self._proposal_text_dim = doc.get("text_dim")
        self._proposal_head = doc.get("class_head") or doc["model"].get("class_head")

        # ---- severance / visual prompts
        for i in c.severance_layers:
            if not -n_blocks <= i < n_blocks:
                raise ConfigError(f"model.severance_layers: block {i} outside 0..{n_blocks - 1} (or -{n_blocks}..-1)")
        bad = [i for i in c.visual_prompt_layers if i >= n_blocks]
        if bad:
            raise ConfigError(
                f"model.visual_prompt_layers {bad} outside 0..{n_blocks - 1} (0 = the input, l = the input of block l)"
            )
        if c.visual_prompt_size % self.patch[0] or c.visual_prompt_size % self.patch[1]:
            raise ConfigError(
                f"model.visual_prompt_size {c.visual_prompt_size} must be a multiple of the CLIP patch {list(self.patch)}"
            )
        vw = int(visual.class_embedding.shape[-1])
        self.prompt_grid = (c.visual_prompt_size // self.patch[0], c.visual_prompt_size // self.patch[1])
        if c.visual_prompt_layers:
            n_pos = 1 + self.prompt_grid[0] * self.prompt_grid[1]
            # released learned_position: scale * randn with scale = width ** -0.5
            self.visual_prompts = nn.Parameter(torch.randn(len(c.visual_prompt_layers), n_pos, vw) * vw**-0.5)
        else:
            self.visual_prompts = None

        # ---- text prompts
        self.text_prompt = TextPrompt(clip_model, c.text_prompt_tokens)

        # ---- CAL decoder and classifier
        if c.decoder == "heatmap":
            if c.width != self.embed_dim:
                raise ConfigError(
                    f"model.width {c.width} must equal the CLIP embedding size {self.embed_dim}: the heatmap output "
                    "layer pools the CLIP features channel-wise per head (released: 512 for ViT-B/16)"
                )
            self.decoder = HeatmapDecoder(self.num_queries, c.width, c.heads, c.ffn, c.dropout, c.decoder_layers)
        else:
            self.decoder = ConvHeatmapDecoder(self.embed_dim, c.width, c.decoder_layers)
        # released non_object_embedding: N(0, text width ** -0.5), normalised when used
        tw = int(clip_model.token_embedding.weight.shape[1])
        self.no_object = nn.Parameter(torch.randn(1, self.embed_dim) * tw**-0.5)

    # ------------------------------------------------------------------ weights
    def trainable_names(self) -> list[str]:
        """``weights.pt`` keys: everything but the CLIP towers (the learned tensors and the frozen
        proposal model under ``proposals.``, which travels inside the segmenter)."""
        return [k for k in self.state_dict() if not k.startswith("clip.")]

    def learned_names(self) -> list[str]:
        """The tensors training changes (decoder, no-object embedding, visual prompts, text context)."""
        return [k for k in self.state_dict() if not k.startswith(("clip.", "proposals."))]

    def learned_state_dict(self) -> dict[str, torch.Tensor]:
        """:meth:`learned_names`' tensors (what a training checkpoint holds)."""
        names = set(self.learned_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_learned_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of a :meth:`learned_state_dict`.

        Raises:
            WeightsMismatchError: missing / unexpected keys or shape mismatches (listed).
        """
        own = self.state_dict()
        check_state_dict({k: own[k] for k in self.learned_names()}, state_dict, source, "the DeOP model")
        self.load_state_dict(dict(state_dict), strict=False)

    def load_proposal_weights(
        self, state_dict: Mapping[str, torch.Tensor], source: str = "proposals weights.pt"
    ) -> None:
        """Strict load of the proposal model's state dict (a pretrain_proposals ``weights.pt``).

        Raises:
            WeightsMismatchError: missing / unexpected keys or shape mismatches (listed).
        """
        check_state_dict(self.proposals.state_dict(), state_dict, source, "DeOP's proposal model")
        self.proposals.load_state_dict(dict(state_dict), strict=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        names = set(self.learned_names())
        return [p for n, p in self.named_parameters() if n in names]

    def optimizer_param_groups(self, weight_decay: float = 1e-4) -> list[dict[str, Any]]:
        """AdamW groups over :meth:`trainable_parameters` as the released ``build_optimizer``:
        LayerNorm / BatchNorm and ``nn.Embedding`` parameters without weight decay
        (``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` 0), the rest with ``weight_decay``."""
        names = set(self.learned_names())
        decay, no_decay = [], []
        for mname, mod in self.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if full not in names:
                    continue
                norm = isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.Embedding))
                (no_decay if norm else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; the frozen CLIP towers and the proposal model stay in eval mode."""
        super().train(mode)
        self.clip.eval()
        self.proposals.eval()
        return self

    # ------------------------------------------------------------------ text
    def encode_text(self, prompt_names: Sequence[str]) -> torch.Tensor:
        """Class names -> ``[C, D]`` L2-normalised text embeddings with the learned prompt
        (:class:`TextPrompt`); differentiable w.r.t. the context vectors."""
        return self.text_prompt(self.clip, list(prompt_names))

    # ------------------------------------------------------------------ forward
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % self.divisor or images.shape[-1] % self.divisor:
            raise ValueError(
                f"image size {tuple(images.shape[-2:])} must be a multiple of {self.divisor} (proposal network "
                "divisibility and CLIP patch); pad it (evaluate's short-side protocol uses size_divisibility)"
            )

    def proposal_masks(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen proposal model's mask logits ``[B, Q, H/4, W/4]`` (no gradients, eval mode)."""
        with torch.no_grad():
            dummy = None
            if self._proposal_head == "text":  # the head runs but DeOP ignores its logits
                dummy = F.normalize(torch.ones(1, int(self._proposal_text_dim), device=images.device), dim=-1)
            out = self.proposals(images, dummy)
        return out["pred_masks"].detach()

    def clip_features(self, images: torch.Tensor, mask_logits: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The one CLIP pass with patch severance and visual prompts -> ``(F_V [B, N, D]``
        L2-normalised, ``(h, w))``."""
        c = self.hp
        x = images
        if c.clip_input_norm == "clip":  # undo the proposals' normalisation, apply CLIP's
            m0 = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            s0 = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            m1 = torch.tensor(self.clip_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            s1 = torch.tensor(self.clip_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = ((x * s0 + m0) - m1) / s1
        attention = {}
        if c.severance_layers:
            hook = severance_hook(c, mask_logits)
            attention = {int(i): hook for i in c.severance_layers}
        additive: dict[Any, Any] = {}
        if self.visual_prompts is not None:
            for row, layer in enumerate(c.visual_prompt_layers):
                additive[INPUT if layer == 0 else int(layer)] = grid_additive(
                    self.visual_prompts[row], self.prompt_grid
                )
        out = forward_trunk(self.clip.visual, x, attention=attention, additive=additive)
        feats = project(self.clip.visual, out.tokens[:, 1:])
        return F.normalize(feats.float(), dim=-1), out.grid

    def segment(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images ``[B, 3, H, W]`` (normalised with :attr:`mean` / :attr:`std`), text ``[C, D]`` ->
        ``(class logits [B, Q, C + 1]`` (last = no-object), ``proposal mask logits [B, Q, H/4, W/4])``.

        Raises:
            ValueError: images not ``[B, 3, H, W]`` with ``H, W`` multiples of :attr:`divisor`;
                text not ``[C >= 1, D]``.
        """
        self._check_images(images)
        if text_embeddings.ndim != 2 or text_embeddings.shape[-1] != self.embed_dim or text_embeddings.shape[0] < 1:
            raise ValueError(f"text_embeddings must be [C >= 1, {self.embed_dim}], got {tuple(text_embeddings.shape)}")
        mask_logits = self.proposal_masks(images)
        if mask_logits.shape[1] != self.num_queries:
            raise ValueError(f"the proposal model gave {mask_logits.shape[1]} masks, expected {self.num_queries}")
        fv, grid = self.clip_features(images, mask_logits)
        # CAL masks: sigmoid first, then bilinear to the CLIP grid (released semseg_mask_downsample)
        cal = F.interpolate(mask_logits.float().sigmoid(), size=grid, mode="bilinear", align_corners=False)
        emb = self.decoder(fv, grid, cal.flatten(2))  # [B, Q, D], normalised
        # float32 classification: a 100 x cosine in bf16 would be off by ~0.4 logits
        with torch.autocast(device_type=emb.device.type, enabled=False):
            t = F.normalize(text_embeddings.to(device=emb.device, dtype=torch.float32), dim=-1)
            classes = torch.cat([t, F.normalize(self.no_object.float(), dim=-1)], dim=0)
            logits = self.hp.logit_scale * F.normalize(emb.float(), dim=-1) @ classes.T
        return logits, mask_logits

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> semantic scores ``[B, C, H, W]`` at the (padded) input size: mask logits upsampled
        before the sigmoid (:func:`deop_semantic_scores`; module docstring, step 5)."""
        logits, mask_logits = self.segment(images, text_embeddings)
        return deop_semantic_scores(logits, mask_logits, tuple(images.shape[-2:]))

    def loss(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        classes: torch.Tensor | Sequence[str],
        ignore_index: int = 255,
    ) -> dict[str, torch.Tensor]:
        """Training loss on one batch (:func:`deop_pixel_loss` with the config's weights).

        Args:
            images: ``[B, 3, H, W]`` normalised.
            target: ``[B, H', W']`` training ids ``0..C-1`` (255 ignore, trained as no-object).
            classes: the training classes' names (encoded with the learnable prompt, so the context
                vectors train) or their ``[C, D]`` text embeddings.
        """
        text = self.encode_text(classes) if not isinstance(classes, torch.Tensor) else classes
        logits, mask_logits = self.segment(images, text)
        c = self.hp
        return deop_pixel_loss(
            logits,
            mask_logits,
            target.long(),
            focal_weight=c.focal_weight,
            dice_weight=c.dice_weight,
            output_sig=c.output_sig,
            focal_alpha=c.focal_alpha,
            focal_gamma=c.focal_gamma,
            ignore_index=ignore_index,
        )


def deop_semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """DeOP's semantic inference in the released order (released-code.md 2.6: MaskFormer's
    ``sem_seg_postprocess`` then ``semantic_inference``): the proposal mask *logits* are upsampled
    bilinearly (``align_corners=False``) to ``size``, then the sigmoid, then
    ``einsum("bqc,bqhw->bchw", softmax(class_logits)[..., :-1], sigmoid(up(m)))``. Float32 (autocast
    off). The sigmoid does not commute with the interpolation, so this differs from upsampling
    ``sigmoid(m)`` or the scores.

    Args:
        class_logits: ``[B, Q, C + 1]`` segment logits (last column: no-object, dropped after the softmax).
        mask_logits: ``[B, Q, h, w]`` proposal mask logits.
        size: ``(H, W)`` output size in pixels (the padded input size at inference).

    Returns:
        ``[B, C, H, W]`` float32 scores in ``[0, Q]``.
    """
    with torch.autocast(device_type=class_logits.device.type, enabled=False):
        m = F.interpolate(mask_logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return torch.einsum("bqc,bqhw->bchw", class_logits.float().softmax(-1)[..., :-1], m.sigmoid())


__all__ = [
    "ConvHeatmapDecoder",
    "DeOP",
    "DecoderLayer",
    "HeatmapDecoder",
    "TextPrompt",
    "build_proposal_network",
    "check_proposals_fit",
    "deop_pixel_loss",
    "deop_semantic_scores",
    "heatmap_pool",
    "mask_guided_attention",
    "poly_lr_factor",
    "proposal_patch_weights",
    "proposal_token_masks",
    "resolve_deop_config",
    "severance_hook",
    "sine_position_encoding",
]
