"""One CLIP ViT image trunk with per-block hooks, shared by every method that reads CLIP's image tower.

The forward of an open_clip ``VisionTransformer`` (patch embedding ``conv1``, the [CLS] token,
the positional embedding, ``ln_pre``, the residual attention blocks, ``ln_post``, ``proj``) is
written once here; the methods differ only in what they change inside the blocks:

- **deep prompts** (ZegCLIP Eq. 3, also DeOP's ``learn_token`` variant): before block ``l``,
  ``M_l`` learnable tokens are inserted right after [CLS]; the outputs at the previous block's
  prompt positions are discarded (``[g^l, _, H^l] = Layer^l([g^{l-1}, P^{l-1}, H^{l-1}])``).
  Argument ``prompts`` of :func:`run_blocks`.
- **attention replacement** per block: the block's ``attn(ln_1(x))`` is replaced by a hook
  ``hook(block, ln_1(x), ctx) -> [B, L, width]``; the residual, ``ls_1``, ``ln_2``, MLP and
  ``ls_2`` of the block stay. Ready-made hooks: :func:`standard_attention` (the block's own),
  :func:`identity_attention` (complete patch severance, DeOP alpha = 1), :func:`blended_attention`
  (DeOP Eq. 2, generalized patch severance with a scalar or per-token alpha),
  :func:`value_scaled_attention` (DeOP's released default: identity attention with each token's
  value scaled by a per-token weight) and :func:`maskclip_attention` (MaskCLIP: [CLS] attends
  normally, every other token keeps only its value path). Argument ``attention``.
- **additive per-layer prompts** (DeOP's "learned position" visual prompts): a tensor added to the
  [CLS] + patch tokens of the residual stream together with the positional embedding
  (key :data:`INPUT`, before ``ln_pre``) or at the input of a block. Argument ``additive``.
- **intermediate features**: the token outputs of chosen blocks (ZegFormer / DeOP), argument
  ``return_layers``.

Blocks are numbered from 0 (bottom) as in open_clip's ``transformer.resblocks``; negative
numbers count from the top (-1 = last block; DeOP's ``alpha_{-1}``). ZegCLIP's 1-based
``prompt_layers`` (Table 8) are converted by :class:`~zeroseg.models.prompt.PromptedVisionTransformer`.

Token layout inside the blocks: ``[CLS, P_1 .. P_M, patch_(0,0), patch_(0,1), ..., patch_(h-1,w-1)]``
(batch first, ``[B, L, width]``, ``L = 1 + M + h*w``); every tensor a caller gets back has the
prompts removed: ``[B, 1 + h*w, width]``.

What is open_clip's and what is not (open_clip 3.3, ``open_clip/transformer.py``):

- used as they are: ``conv1``, ``class_embedding``, ``ln_pre``, ``ln_post``, ``proj``, and each
  ``ResidualAttentionBlock``: a block without a hook is called as a module (``block(x)``, so its
  forward hooks fire); a hooked block is run from its own submodules ``ln_1`` / ``attn`` /
  ``ls_1`` / ``ln_2`` / ``mlp`` / ``ls_2`` in the order of ``ResidualAttentionBlock.forward``.
  Either transformer layout works: ``transformer.batch_first`` False (sequence first) is handled
  by transposing around each block call, ``attn.batch_first`` around each attention call.
- not used, because their semantics differ: ``VisionTransformer._embeds`` (it adds the
  positional embedding without resizing it and applies ``patch_dropout``; here the embedding is
  resized bicubically, ``align_corners=False``, in float32, without antialiasing, as MaskCLIP's
  released ViT does (``interpolate_mode='bicubic'``), and patch dropout is never applied: dense
  prediction needs every patch. ZegCLIP's released backbone resizes *bilinearly* instead (and adds
  ``class_embedding`` to the [CLS] position a second time); the trunk keeps bicubic for both);
  ``Transformer.forward`` / ``forward_intermediates`` (no way to insert prompts or replace
  an attention; ``grad_checkpointing`` and ``attn_mask`` are therefore not honoured: the vision
  tower has no mask); ``VisionTransformer._pool`` (with ``final_ln_after_pool`` it leaves the
  patch tokens without ``ln_post``; :func:`project` applies ``ln_post`` and ``proj`` to every
  token, which is what the dense methods need and equals ``_pool`` + ``proj`` for the [CLS] token).

Imports neither Ray nor the pipeline, nor any other zeroseg module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn

#: Key of an ``additive`` entry applied at the input, with the positional embedding (before ``ln_pre``).
INPUT = "input"

#: Submodules a block needs for an attention hook (open_clip's ``ResidualAttentionBlock``).
BLOCK_PARTS = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")


@dataclass(frozen=True)
class BlockContext:
    """Where a hook is called: block ``layer`` (0-based) of ``num_layers``, with ``num_prompts``
    prompt tokens at sequence positions ``1..num_prompts`` and a patch grid ``grid = (h, w)``.
    The sequence is ``[CLS, prompts, patches]``, ``seq_len = 1 + num_prompts + h*w`` tokens."""

    layer: int
    num_layers: int
    num_prompts: int
    grid: tuple[int, int]

    @property
    def num_prefix(self) -> int:
        """Tokens before the first patch: [CLS] and the prompts."""
        return 1 + self.num_prompts

    @property
    def seq_len(self) -> int:
        return 1 + self.num_prompts + self.grid[0] * self.grid[1]


@dataclass
class TrunkOutput:
    """Result of :func:`run_blocks` / :func:`forward_trunk`.

    Attributes:
        tokens: ``[B, 1 + h*w, width]`` output of the last block ([CLS] first, then the patches
            row-major; prompts removed), before ``ln_post`` (apply :func:`project`).
        grid: ``(h, w)`` patch grid.
        intermediates: block index (0-based, negative requests normalised) -> ``[B, 1 + h*w,
            width]`` output of that block (prompts removed, before ``ln_post``), for the blocks
            named in ``return_layers``.
    """

    tokens: torch.Tensor
    grid: tuple[int, int]
    intermediates: dict[int, torch.Tensor] = field(default_factory=dict)


#: ``hook(block, y, ctx) -> [B, L, width]``: replaces ``block.attn(y)`` (after ``out_proj``, before
#: ``ls_1`` and the residual); ``y = block.ln_1(x)`` is ``[B, L, width]`` batch first.
AttentionHook = Callable[[nn.Module, torch.Tensor, BlockContext], torch.Tensor]
#: ``prompts(layer, x) -> [B, M, width] | [M, width] | None``: the prompt tokens to insert before
#: block ``layer`` (``x`` is that block's input ``[B, L, width]``, for batch size, dtype, device).
PromptHook = Callable[[int, torch.Tensor], Union[torch.Tensor, None]]
#: An additive prompt: ``[1 + h*w, width]`` or ``[B, 1 + h*w, width]`` for the current grid, or
#: ``fn(grid) -> such a tensor`` (e.g. :func:`grid_additive`).
Additive = Union[torch.Tensor, Callable[[tuple[int, int]], torch.Tensor]]


# --------------------------------------------------------------------------- helpers


def _pair(x) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        return (int(x[0]), int(x[1]))
    return (int(x), int(x))


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ViT positional embedding to another patch grid.

    Args:
        pos: ``[1 + gh*gw, width]``; row 0 is the [CLS] position and is kept as is.
        old_grid: ``(gh, gw)`` the embedding was trained for.
        new_grid: ``(nh, nw)`` wanted.

    Returns:
        ``[1 + nh*nw, width]``, same dtype (interpolated in float32, ``align_corners=False``, no
        antialiasing, as MaskCLIP's released code does; ZegCLIP's released backbone uses bilinear
        interpolation here). The input itself when the grids agree.

    Raises:
        ValueError: ``pos`` does not have ``1 + gh*gw`` rows.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if pos.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(f"positional embedding has {pos.shape[0]} rows, expected 1 + {old_grid[0]}*{old_grid[1]}")
    if old_grid == new_grid:
        return pos
    cls_pos, grid = pos[:1], pos[1:]
    width = pos.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width).to(pos.dtype)
    return torch.cat([cls_pos, grid], dim=0)


def grid_additive(pos: torch.Tensor, source_grid: tuple[int, int]) -> Callable[[tuple[int, int]], torch.Tensor]:
    """An :data:`Additive` from a learned ``[1 + gh*gw, width]`` embedding trained on
    ``source_grid``: bicubically resized (:func:`resize_pos_embed`) to each call's grid, as DeOP's
    ``learned_position`` (trained at 384/16 = 24x24, resized to the image's grid).

    Raises:
        ValueError: (at call time) ``pos`` does not have ``1 + gh*gw`` rows.
    """
    source_grid = _pair(source_grid)
    return lambda grid: resize_pos_embed(pos, source_grid, grid)


def check_trunk_visual(visual: nn.Module) -> None:
    """Raise ``ValueError`` (naming what is wrong) unless ``visual`` looks like an open_clip
    ``VisionTransformer`` the trunk can run: the attributes it uses, [CLS]-token pooling, no
    attentional pooler, a 2-D ``[1 + gh*gw, width]`` positional embedding."""
    for attr in (
        "conv1",
        "class_embedding",
        "positional_embedding",
        "ln_pre",
        "transformer",
        "ln_post",
        "proj",
        "grid_size",
        "patch_size",
    ):
        if not hasattr(visual, attr):
            raise ValueError(
                f"the image tower {type(visual).__name__} is not an open_clip VisionTransformer "
                f"(no attribute {attr!r}); a ViT CLIP model such as ViT-B-16 is needed"
            )
    if not hasattr(visual.transformer, "resblocks"):
        raise ValueError("the image tower's transformer has no resblocks")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError(
            "the ViT trunk supports towers pooled by their [CLS] token (pool_type 'tok', no "
            f"attentional pooler); got pool_type={getattr(visual, 'pool_type', None)!r}"
        )
    if visual.positional_embedding.ndim != 2:
        raise ValueError("the ViT trunk expects a [1 + gh*gw, width] positional embedding")


def _layer_index(i: int, n: int, what: str) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise ValueError(f"{what}: block indices must be ints, got {i!r}")
    j = i + n if i < 0 else i
    if not 0 <= j < n:
        raise ValueError(f"{what}: block {i} outside 0..{n - 1} (or -{n}..-1)")
    return j


def _additive_tensor(a: Additive, grid: tuple[int, int], x: torch.Tensor, where: str) -> torch.Tensor:
    t = a(grid) if callable(a) else a
    n = 1 + grid[0] * grid[1]
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3 or t.shape[1] != n or t.shape[2] != x.shape[-1] or t.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"additive prompt at {where} must be [1 + h*w, width] or [B, 1 + h*w, width] = "
            f"[{x.shape[0]}, {n}, {x.shape[-1]}] for grid {grid}, got {tuple(t.shape)}"
        )
    return t.to(x.dtype)


def _drop_prompts(x: torch.Tensor, num_prompts: int) -> torch.Tensor:
    if not num_prompts:
        return x
    return torch.cat([x[:, :1], x[:, 1 + num_prompts :]], dim=1)


# --------------------------------------------------------------------------- the trunk


def embed(
    visual: nn.Module, images: torch.Tensor, *, additive_input: Additive | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Token embedding of the image tower: patchify (``conv1``), prepend [CLS], add the positional
    embedding (resized bicubically when the patch grid differs from ``visual.grid_size``), add
    ``additive_input`` if given (DeOP's input-level learned position), ``ln_pre``.

    Args:
        visual: an open_clip ``VisionTransformer`` (:func:`check_trunk_visual`).
        images: ``[B, 3, H, W]`` normalised pixels; the grid is ``(H // p, W // p)`` for patch size
            ``p`` (a remainder is cropped by the strided patch convolution).
        additive_input: an :data:`Additive` for the grid, added with the positional embedding.

    Returns:
        ``(x [B, 1 + h*w, width], (h, w))`` in the tower's dtype.

    Raises:
        ValueError: ``images`` not ``[B, 3, H, W]`` with ``H, W >= p``; a wrongly shaped additive.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    ph, pw = _pair(visual.patch_size)
    if images.shape[-2] < ph or images.shape[-1] < pw:
        raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than one patch {(ph, pw)}")
    x = visual.conv1(images.to(visual.conv1.weight.dtype))  # [B, width, h, w]
    b, width, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls_tok = visual.class_embedding.to(x.dtype).reshape(1, 1, width).expand(b, 1, width)
    x = torch.cat([cls_tok, x], dim=1)
    x = x + resize_pos_embed(visual.positional_embedding, _pair(visual.grid_size), (h, w)).to(x.dtype)
    if additive_input is not None:
        x = x + _additive_tensor(additive_input, (h, w), x, "the input")
    x = visual.ln_pre(x)
    return x, (h, w)


def run_block(
    block: nn.Module,
    x: torch.Tensor,
    ctx: BlockContext,
    attention: AttentionHook | None = None,
    *,
    batch_first: bool = True,
) -> torch.Tensor:
    """One residual attention block on batch-first tokens ``x [B, L, width]``.

    Without ``attention`` the block module itself runs (``block(x)``, transposed to sequence-first
    when ``batch_first`` is False). With it, the block is run from its parts as in open_clip's
    ``ResidualAttentionBlock.forward``, the attention replaced::

        x = x + ls_1(attention(block, ln_1(x), ctx))
        x = x + ls_2(mlp(ln_2(x)))

    Raises:
        ValueError: a hooked block without ``ln_1/attn/ls_1/ln_2/mlp/ls_2``, or a hook whose output
            is not ``[B, L, width]``.
    """
    if attention is None:
        if batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)
    missing = [p for p in BLOCK_PARTS if not hasattr(block, p)]
    if missing:
        raise ValueError(
            f"block {ctx.layer} ({type(block).__name__}) lacks {missing}: attention hooks need "
            "open_clip's ResidualAttentionBlock"
        )
    a = attention(block, block.ln_1(x), ctx)
    if a.shape != x.shape:
        raise ValueError(f"attention hook of block {ctx.layer} returned {tuple(a.shape)}, expected {tuple(x.shape)}")
    x = x + block.ls_1(a)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def run_blocks(
    visual: nn.Module,
    x: torch.Tensor,
    grid: tuple[int, int],
    *,
    prompts: PromptHook | Mapping[int, torch.Tensor] | None = None,
    attention: Mapping[int, AttentionHook] | None = None,
    additive: Mapping[int, Additive] | None = None,
    return_layers: Sequence[int] = (),
) -> TrunkOutput:
    """The transformer blocks of ``visual`` with per-block hooks.

    Before block ``l`` (in this order): the prompts of the previous block are removed and those of
    block ``l`` inserted after [CLS] (ZegCLIP Eq. 3); ``additive[l]`` is added to the [CLS] and
    patch tokens of the residual stream (DeOP ``POSITION_LAYERS``); then the block runs, with
    ``attention[l]`` replacing its attention if given (:func:`run_block`).

    Args:
        visual: an open_clip ``VisionTransformer``.
        x: ``[B, 1 + h*w, width]`` tokens from :func:`embed`.
        grid: ``(h, w)``.
        prompts: a :data:`PromptHook`, or a mapping block -> ``[M, width]`` / ``[B, M, width]``
            tokens. ``M`` may differ between blocks; a block without prompts runs without any.
        attention: block -> :data:`AttentionHook`.
        additive: block -> :data:`Additive` (use :func:`embed`'s ``additive_input`` for the input).
        return_layers: blocks whose outputs go to ``TrunkOutput.intermediates``.

    Returns:
        :class:`TrunkOutput` (the last block's tokens, prompts removed, before ``ln_post``).

    Raises:
        ValueError: a block index outside ``-n..n-1``; a prompt or additive tensor of the wrong
            shape; see :func:`run_block`.
    """
    blocks = visual.transformer.resblocks
    n = len(blocks)
    batch_first = bool(getattr(visual.transformer, "batch_first", True))
    attention = {_layer_index(k, n, "attention"): v for k, v in (attention or {}).items()}
    additive = {_layer_index(k, n, "additive"): v for k, v in (additive or {}).items()}
    take = {_layer_index(k, n, "return_layers") for k in return_layers}
    if isinstance(prompts, Mapping):
        table = {_layer_index(k, n, "prompts"): v for k, v in prompts.items()}
        prompts = lambda layer, _x: table.get(layer)  # noqa: E731
    grid = _pair(grid)
    batch = x.shape[0]
    in_seq = 0  # prompt tokens currently in the sequence, right after [CLS]
    inter: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(blocks):
        p = prompts(i, x) if prompts is not None else None
        if p is not None:
            if p.ndim == 2:
                p = p.unsqueeze(0).expand(batch, -1, -1)
            if p.ndim != 3 or p.shape[0] != batch or p.shape[2] != x.shape[-1]:
                raise ValueError(
                    f"prompts of block {i} must be [M, width] or [B, M, width] = [{batch}, M, "
                    f"{x.shape[-1]}], got {tuple(p.shape)}"
                )
            # Eq. 3: the previous block's prompt outputs are discarded, this block's inserted
            x = torch.cat([x[:, :1], p.to(x.dtype), x[:, 1 + in_seq :]], dim=1)
            in_seq = p.shape[1]
        elif in_seq:
            x = _drop_prompts(x, in_seq)
            in_seq = 0
        if i in additive:
            a = _additive_tensor(additive[i], grid, x, f"block {i}")
            if in_seq:
                x = torch.cat([x[:, :1] + a[:, :1], x[:, 1 : 1 + in_seq], x[:, 1 + in_seq :] + a[:, 1:]], dim=1)
            else:
                x = x + a
        ctx = BlockContext(i, n, in_seq, grid)
        x = run_block(blk, x, ctx, attention.get(i), batch_first=batch_first)
        if i in take:
            inter[i] = _drop_prompts(x, in_seq)
    return TrunkOutput(_drop_prompts(x, in_seq), grid, inter)


def forward_trunk(
    visual: nn.Module,
    images: torch.Tensor,
    *,
    prompts: PromptHook | Mapping[int, torch.Tensor] | None = None,
    attention: Mapping[int, AttentionHook] | None = None,
    additive: Mapping[int | str, Additive] | None = None,
    return_layers: Sequence[int] = (),
) -> TrunkOutput:
    """:func:`embed` then :func:`run_blocks`; ``additive[INPUT]`` goes to :func:`embed`, the
    integer keys to the blocks. See the module docstring for the hooks.

    Args:
        visual: an open_clip ``VisionTransformer`` (checked with :func:`check_trunk_visual`).
        images: ``[B, 3, H, W]`` normalised pixels.

    Returns:
        :class:`TrunkOutput`; apply :func:`project` to its tokens for CLIP's joint space.

    Raises:
        ValueError: see :func:`check_trunk_visual`, :func:`embed`, :func:`run_blocks`.
    """
    check_trunk_visual(visual)
    additive = dict(additive or {})
    x, grid = embed(visual, images, additive_input=additive.pop(INPUT, None))
    return run_blocks(
        visual, x, grid, prompts=prompts, attention=attention, additive=additive, return_layers=return_layers
    )


def project(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``ln_post`` then ``@ proj`` (when the tower has one) on every token: ``[..., width] ->
    [..., D]``. For the [CLS] token this is what ``CLIP.encode_image`` returns (before
    normalisation); for patch tokens it puts them in the same joint space (MaskCLIP, ZegCLIP)."""
    x = visual.ln_post(tokens)
    if visual.proj is not None:
        x = x @ visual.proj
    return x


# --------------------------------------------------------------------------- attention hooks


def _mha(attn: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """``attn(q, kv, kv)`` on batch-first tensors whatever ``attn.batch_first`` is (no mask)."""
    if getattr(attn, "batch_first", False):
        return attn(q, kv, kv, need_weights=False)[0]
    kv_t = kv.transpose(0, 1)
    q_t = kv_t if q is kv else q.transpose(0, 1)
    return attn(q_t, kv_t, kv_t, need_weights=False)[0].transpose(0, 1)


def value_projection(attn: nn.MultiheadAttention, y: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``out_proj(s * (W_v y + b_v))``: every token's own value, optionally scaled per token, through
    the output projection, with no query-key attention (MaskCLIP's value path; DeOP's GPS).

    Args:
        attn: the block's ``nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate
            ``v_proj_weight``).
        y: ``[B, L, width]`` batch first (the block's ``ln_1`` output).
        scale: ``None`` or per-token weights ``s`` broadcastable to ``[B, L, 1]`` (e.g. ``[B, L, 1]``),
            multiplying the value *including* its bias, as DeOP's released code does.

    Returns:
        ``[B, L, width]``.
    """
    e = attn.embed_dim
    w_v = attn.in_proj_weight[2 * e :] if attn.in_proj_weight is not None else attn.v_proj_weight
    b_v = attn.in_proj_bias[2 * e :] if attn.in_proj_bias is not None else None
    v = F.linear(y, w_v, b_v)
    if scale is not None:
        v = v * scale.to(v.dtype)
    return attn.out_proj(v)


def standard_attention(block: nn.Module, y: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
    """The block's own multi-head self-attention ``attn(y, y, y)`` (GPS with alpha = 0): a hook
    that changes nothing. ``y`` ``[B, L, width]`` -> ``[B, L, width]``."""
    return _mha(block.attn, y, y)


def identity_attention(block: nn.Module, y: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
    """Complete patch severance (DeOP Eq. 2 with alpha = 1; code: the ``maskselfattn=True``
    branch): the attention matrix is the identity, so every token's output is ``out_proj`` of its
    own value and no token sees another. ``[B, L, width]`` -> ``[B, L, width]``."""
    return value_projection(block.attn, y)


def blended_attention(alpha: float | torch.Tensor) -> AttentionHook:
    """Generalized patch severance, DeOP Eq. 2: ``F_out = (alpha * E + (1 - alpha) * Attn) x F_in``.

    With ``E`` the identity and ``Attn`` the block's softmax attention matrix (per head), applied to
    the values before ``out_proj``. Since the two weights sum to 1 and ``out_proj`` is affine this is
    ``alpha * out_proj(V) + (1 - alpha) * attn(y, y, y)``, computed that way (alpha = 0 runs the
    block's own attention only, alpha = 1 the value path only). DeOP's best setting (Table 4) is
    alpha = 1 on the last block and 0 elsewhere.

    Args:
        alpha: a float in ``[0, 1]``, or per-query-token weights ``[L]`` / ``[B, L]`` (e.g. 0 for
            [CLS] and 1 for the patches, which is :func:`maskclip_attention`).

    Returns:
        an :data:`AttentionHook`.

    Raises:
        ValueError: a float alpha outside ``[0, 1]``; (at call time) a tensor alpha whose last
            dimension is not the sequence length ``L``.
    """
    if not isinstance(alpha, torch.Tensor):
        alpha = float(alpha)
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"patch severance alpha must be in [0, 1], got {alpha}")

    def hook(block: nn.Module, y: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
        if isinstance(alpha, float):
            if alpha == 0.0:
                return standard_attention(block, y)
            if alpha == 1.0:
                return identity_attention(block, y)
            a = alpha
        else:
            if alpha.shape[-1] != y.shape[1] or alpha.ndim not in (1, 2):
                raise ValueError(
                    f"per-token alpha must be [L] or [B, L] with L = {y.shape[1]}, got {tuple(alpha.shape)}"
                )
            a = alpha.to(y.dtype).unsqueeze(-1)
        return a * identity_attention(block, y) + (1 - a) * standard_attention(block, y)

    return hook


def value_scaled_attention(weights: torch.Tensor | Callable[[BlockContext], torch.Tensor]) -> AttentionHook:
    """Identity attention with each token's value scaled by a per-token weight: ``out_proj(w_l *
    V_l)`` for token ``l`` (DeOP's released default GPS, ``multi_head_attention_forward_vit_softmax_noattn``:
    the softmax attention is computed there but unused; ``w`` is the sum over the 100 proposals of
    the sigmoid of their mask logits resized to the patch grid, and 100 for [CLS]). Building ``w``
    from proposals is the caller's business.

    Args:
        weights: ``[B, 1 + h*w]`` ([CLS] then the patches; prompt tokens, whose outputs the trunk
            discards anyway, then get weight 1) or ``[B, L]`` for the whole sequence, or a function
            ``ctx -> such a tensor``.

    Returns:
        an :data:`AttentionHook`.

    Raises:
        ValueError: (at call time) weights that are neither ``[B, 1 + h*w]`` nor ``[B, L]``.
    """

    def hook(block: nn.Module, y: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        w = weights(ctx) if callable(weights) else weights
        B, L = y.shape[:2]
        n_img = 1 + ctx.grid[0] * ctx.grid[1]
        if w.ndim == 2 and w.shape == (B, n_img) and L != n_img:
            ones = torch.ones(B, ctx.num_prompts, dtype=w.dtype, device=w.device)
            w = torch.cat([w[:, :1], ones, w[:, 1:]], dim=1)
        if w.ndim != 2 or w.shape != (B, L):
            raise ValueError(
                f"value weights must be [B, 1 + h*w] = [{B}, {n_img}] or [B, L] = [{B}, {L}], got {tuple(w.shape)}"
            )
        return value_projection(block.attn, y, w.unsqueeze(-1))

    return hook


def maskclip_attention(block: nn.Module, y: torch.Tensor, ctx: BlockContext | None = None) -> torch.Tensor:
    """MaskCLIP's last block (Sec. 3.2; released ``mmseg/models/backbones/vit.py``): [CLS] keeps the
    ordinary attention (its query over all tokens), every other token only its value path
    ``out_proj(W_v y + b_v)``. Equals ``blended_attention(alpha)`` with ``alpha = [0, 1, ..., 1]``
    but computes the attention for the [CLS] query only. ``[B, L, width]`` -> ``[B, L, width]``."""
    cls_out = _mha(block.attn, y[:, :1], y)
    return torch.cat([cls_out, value_projection(block.attn, y[:, 1:])], dim=1)


__all__ = [
    "INPUT",
    "AttentionHook",
    "Additive",
    "BlockContext",
    "PromptHook",
    "TrunkOutput",
    "blended_attention",
    "check_trunk_visual",
    "embed",
    "forward_trunk",
    "grid_additive",
    "identity_attention",
    "maskclip_attention",
    "project",
    "resize_pos_embed",
    "run_block",
    "run_blocks",
    "standard_attention",
    "value_projection",
    "value_scaled_attention",
]
