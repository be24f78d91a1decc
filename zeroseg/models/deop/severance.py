"""DeOP's patch severance (Sec. 4.1): attention hooks on the shared ViT trunk that cut the patch
tokens off from each other, generalized (GPS, Eq. 2) or guided by the proposal masks (MPS, Eq. 1).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config.deop import DeOPConfig
from zeroseg.models.trunk import (
    AttentionHook,
    BlockContext,
    blended_attention,
    identity_attention,
    value_scaled_attention,
)


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


__all__ = ["mask_guided_attention", "proposal_patch_weights", "proposal_token_masks", "severance_hook"]
