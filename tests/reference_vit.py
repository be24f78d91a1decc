"""Pre-refactor ViT forward paths, kept verbatim as a regression oracle (test-only).

These are the implementations of ``zeroseg.models.clip.dense_features`` (with its helpers
``patch_size``, ``resize_pos_embed``, ``check_dense_visual`` and ``_value_path``) and of
``zeroseg.models.prompt.PromptedVisionTransformer`` as they were at commit 194e510, before both
were rewritten on top of the shared ViT trunk (``zeroseg/models/trunk.py``). They were copied
unchanged (only this docstring and the import block are new) so that ``tests/test_trunk.py`` can
check that MaskCLIP's and ZegCLIP's encoder outputs did not move. Do not edit the code below to
follow later changes: it is the frozen "before" picture. Nothing in ``zeroseg`` imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ====================================================================== zeroseg/models/clip.py @ 194e510


def patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """``(ph, pw)`` in pixels of a ViT image tower (``visual.patch_size``).

    Raises:
        ValueError: the image tower has no ``patch_size`` (not a ViT).
    """
    visual = getattr(model, "visual", model)
    p = getattr(visual, "patch_size", None)
    if p is None:
        raise ValueError(f"the CLIP image tower {type(visual).__name__} has no patch size (not a ViT)")
    if isinstance(p, int):
        return (p, p)
    return (int(p[0]), int(p[1]))


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ViT positional embedding to another patch grid.

    Args:
        pos: ``[1 + gh*gw, width]``; row 0 is the [CLS] position and is kept as is.
        old_grid: ``(gh, gw)`` the embedding was trained for.
        new_grid: ``(nh, nw)`` wanted.

    Returns:
        ``[1 + nh*nw, width]``, same dtype (interpolated in float32, ``align_corners=False``, as
        MaskCLIP's and ZegCLIP's released code do). The input itself when the grids agree.

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


def check_dense_visual(visual: torch.nn.Module) -> None:
    """Raise ``ValueError`` (naming what is wrong) unless :func:`dense_features` supports ``visual``."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"dense_features needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(ResNet / timm towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("dense_features supports ViTs pooled by their [CLS] token (pool_type 'tok', "
                         f"no attentional pooler); got pool_type={visual.pool_type!r}")
    if not isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock):
        raise ValueError("dense_features supports the standard ResidualAttentionBlock (nn.MultiheadAttention); "
                         f"the last block is a {type(visual.transformer.resblocks[-1]).__name__}")
    if visual.positional_embedding.ndim != 2:
        raise ValueError("dense_features expects a [1 + gh*gw, width] positional embedding")


def _value_path(attn: torch.nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
    """``out_proj(W_v y + b_v)`` for tokens ``y`` ``[B, N, E]`` (no query/key attention)."""
    e = attn.embed_dim
    if attn.in_proj_weight is not None:
        w_v = attn.in_proj_weight[2 * e:]
    else:
        w_v = attn.v_proj_weight
    b_v = attn.in_proj_bias[2 * e:] if attn.in_proj_bias is not None else None
    v = F.linear(y, w_v, b_v)
    return attn.out_proj(v)


def dense_features(visual: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embedding and per-patch embeddings of an open_clip ViT (MaskCLIP Sec. 3.2).

    Steps: patchify (``conv1``), prepend [CLS], add the positional embedding (bicubic-resized when
    the patch grid differs from the model's, :func:`resize_pos_embed`), ``ln_pre``, all blocks
    but the last; then in the last block

    - [CLS]: the ordinary block (attention with the [CLS] query over all tokens, residual, MLP);
    - patches: ``v = x + ls_1(out_proj(W_v ln_1(x) + b_v))``, ``v = v + ls_2(mlp(ln_2(v)))``
      (query-key attention skipped, MaskCLIP's released ViT code);

    finally ``ln_post`` and ``@ proj`` on both. Patch dropout is never applied. Works in the
    module's current mode (call ``eval()`` for inference) and with gradients if enabled.

    Args:
        visual: an open_clip ``VisionTransformer`` (``model.visual``) with [CLS] pooling and
            standard blocks; either transformer layout (``batch_first`` True or False).
        images: ``[B, 3, H, W]`` normalised pixels. ``H, W`` need not equal the model's
            ``image_size``; the grid is ``(H // p, W // p)`` for patch size ``p`` (a remainder is
            cropped by the strided patch convolution).

    Returns:
        ``(cls, patches)``: ``cls`` ``[B, D]`` (equal to ``model.encode_image(images)`` at the
        native size) and ``patches`` ``[B, D, h, w]`` with ``h = H // p``, ``w = W // p``, in the
        model's dtype, **not** L2-normalised (normalise along ``dim=1`` before comparing with
        text embeddings).

    Raises:
        ValueError: an unsupported image tower, or ``images`` not ``[B, 3, H, W]`` with
            ``H, W >= p``.
    """
    check_dense_visual(visual)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    ph, pw = patch_size(visual)
    if images.shape[-2] < ph or images.shape[-1] < pw:
        raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than one patch {(ph, pw)}")
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype))  # [B, width, h, w]
    b, width, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls_tok = visual.class_embedding.to(x.dtype).reshape(1, 1, width).expand(b, 1, width)
    x = torch.cat([cls_tok, x], dim=1)
    x = x + resize_pos_embed(visual.positional_embedding, tuple(visual.grid_size), (h, w)).to(x.dtype)
    x = visual.ln_pre(x)

    transformer = visual.transformer
    blocks = transformer.resblocks
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)  # [L, B, width]
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)

    last = blocks[-1]
    y = last.ln_1(x)  # [B, L, width]
    # [CLS]: the unmodified block, computed for the [CLS] query only
    q = y[:, :1]
    if last.attn.batch_first:
        a = last.attn(q, y, y, need_weights=False)[0]
    else:
        a = last.attn(q.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    c = x[:, :1] + last.ls_1(a)
    c = c + last.ls_2(last.mlp(last.ln_2(c)))
    # patches: MaskCLIP value path
    v = x[:, 1:] + last.ls_1(_value_path(last.attn, y[:, 1:]))
    v = v + last.ls_2(last.mlp(last.ln_2(v)))

    cls_out = visual.ln_post(c[:, 0])
    patches = visual.ln_post(v)
    if visual.proj is not None:
        cls_out = cls_out @ visual.proj
        patches = patches @ visual.proj
    patches = patches.transpose(1, 2).reshape(b, patches.shape[-1], h, w)
    return cls_out, patches


# ====================================================================== zeroseg/models/prompt.py @ 194e510

BACKBONE_VARIANTS = ("dpt", "ft", "fix")


class PromptedVisionTransformer(nn.Module):
    """An open_clip ViT image encoder with VPT-deep prompts (ZegCLIP Eq. 3) or a plain FT/Fix variant.

    Args:
        visual: an open_clip ``VisionTransformer`` (``clip_model.visual``), token pooling
            (``pool_type="tok"``), no attentional pooler. It is **modified in place**: its
            positional embedding is resized once (bicubic) to ``input_size`` and ``grid_size`` /
            ``image_size`` are updated, and its ``requires_grad`` flags are set per ``backbone``.
        backbone: ``"dpt"`` (frozen + prompts), ``"ft"`` (fine-tune, no prompts) or ``"fix"``
            (frozen, no prompts). Prompts exist only for ``"dpt"``; ``prompt_tokens`` and
            ``prompt_layers`` are ignored otherwise.
        prompt_tokens: M, learnable tokens per prompted layer (ZegCLIP Appendix A: 10 for VOC,
            100 for COCO-Stuff, 35 for Context). ``0`` gives the plain frozen encoder.
        prompt_layers: 1-based indices of the transformer layers that get prompts, numbered as in
            ZegCLIP Table 8 (1 = bottom); ``None`` = every layer (the paper's default, "1->12").
        input_size: ``(H, W)`` in pixels the positional embedding is resized to once; ``None``
            keeps the encoder's native size. Images of another size still work: the (resized)
            embedding is then interpolated bicubically on every call.
        prompt_dropout: dropout on the prompt tokens during training (as in VPT [20]; the paper
            does not say; 0.1 in ZegCLIP's released code). Applied after the prompts are expanded
            to the batch, so every image gets its own dropout mask (as the released code does).

    Prompt initialisation follows VPT: ``U(-v, v)`` with ``v = sqrt(6 / (3 * p * p + width))``
    (xavier-uniform range for a patch-embedding fan-in of ``3 * p * p``, ``p`` = patch size).
    Parameters: ``prompts`` ``[n_prompted_layers, M, width]`` (only when ``backbone == "dpt"`` and
    M > 0).

    Output of :meth:`forward`: ``(g, patches, (h, w))`` with ``g`` ``[B, D]`` the image [CLS]
    embedding (``ln_post`` then ``proj``, exactly what ``CLIP.encode_image`` returns without
    normalisation), ``patches`` ``[B, h*w, D]`` the patch tokens (row-major) of the **last**
    transformer layer (ZegCLIP uses the last layer's tokens, ``out_indices=[11]`` for ViT-B/16) put
    through the same ``ln_post`` and ``proj`` so that they live in CLIP's joint text-image space,
    and ``(h, w) = (H // patch, W // patch)`` the patch grid. Neither embedding is L2-normalised.

    Raises:
        ValueError: unknown ``backbone``, ``prompt_tokens < 0``, a prompt layer outside
            ``1..n_layers``, an encoder with an attentional pooler or non-token pooling, or an
            image whose size is not a multiple of the patch size.
    """

    def __init__(
        self,
        visual: nn.Module,
        *,
        backbone: str = "dpt",
        prompt_tokens: int = 10,
        prompt_layers: Sequence[int] | None = None,
        input_size: Sequence[int] | None = None,
        prompt_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONE_VARIANTS:
            raise ValueError(f"backbone must be one of {BACKBONE_VARIANTS}, got {backbone!r}")
        for attr in ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post", "proj"):
            if not hasattr(visual, attr):
                raise ValueError(
                    f"the image encoder is not an open_clip VisionTransformer (no attribute {attr!r}); "
                    "ZegCLIP needs a ViT CLIP model such as ViT-B-16"
                )
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip VisionTransformer with an attentional pooler is not supported by ZegCLIP")
        if getattr(visual, "pool_type", "tok") != "tok":
            raise ValueError(f"ZegCLIP needs [CLS]-token pooling, the encoder has pool_type={visual.pool_type!r}")
        if visual.proj is None:
            raise ValueError("the image encoder has no output projection (visual.proj is None)")
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be >= 0, got {prompt_tokens}")

        self.visual = visual
        self.backbone = backbone
        self.patch_size = tuple(int(p) for p in _pair(visual.patch_size))
        self.width = int(visual.class_embedding.shape[-1])
        self.output_dim = int(visual.proj.shape[-1])
        self.num_layers = len(visual.transformer.resblocks)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))

        # --- positional embedding: resized once to the training resolution (bicubic)
        native_grid = tuple(int(g) for g in _pair(visual.grid_size))
        if input_size is not None:
            input_size = tuple(int(s) for s in input_size)
            if input_size[0] % self.patch_size[0] or input_size[1] % self.patch_size[1]:
                raise ValueError(f"input_size {input_size} is not a multiple of the patch size {self.patch_size}")
            new_grid = (input_size[0] // self.patch_size[0], input_size[1] // self.patch_size[1])
            if new_grid != native_grid:
                with torch.no_grad():
                    pos = resize_pos_embed(visual.positional_embedding.detach(), native_grid, new_grid)
                visual.positional_embedding = nn.Parameter(pos.clone())
                visual.grid_size = new_grid
                visual.image_size = input_size
        self.grid_size = tuple(int(g) for g in _pair(visual.grid_size))

        # --- which parameters train
        for p in visual.parameters():
            p.requires_grad_(backbone == "ft")

        # --- deep prompts (dpt only)
        if backbone == "dpt":
            layers = list(range(1, self.num_layers + 1)) if prompt_layers is None else [int(i) for i in prompt_layers]
            bad = [i for i in layers if not 1 <= i <= self.num_layers]
            if bad:
                raise ValueError(f"prompt_layers {bad} outside 1..{self.num_layers} (1 = bottom layer, ZegCLIP Table 8)")
            if len(set(layers)) != len(layers):
                raise ValueError(f"prompt_layers has duplicates: {layers}")
            self.prompt_layers = tuple(sorted(layers))
            self.num_prompts = int(prompt_tokens)
        else:
            self.prompt_layers = ()
            self.num_prompts = 0
        if self.num_prompts > 0 and self.prompt_layers:
            self.prompts = nn.Parameter(torch.zeros(len(self.prompt_layers), self.num_prompts, self.width))
            bound = math.sqrt(6.0 / float(3 * self.patch_size[0] * self.patch_size[1] + self.width))
            nn.init.uniform_(self.prompts, -bound, bound)
        else:
            self.prompts = None
        # layer index (0-based) -> row of self.prompts
        self._prompt_row = {layer - 1: row for row, layer in enumerate(self.prompt_layers)} if self.prompts is not None else {}
        self.prompt_dropout = nn.Dropout(prompt_dropout) if prompt_dropout > 0 else nn.Identity()

    # ------------------------------------------------------------------ helpers
    def _embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        v = self.visual
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"image size {(H, W)} is not a multiple of the patch size {self.patch_size}")
        x = v.conv1(images.to(v.conv1.weight.dtype))  # [B, width, h, w]
        B, C, h, w = x.shape
        x = x.reshape(B, C, h * w).permute(0, 2, 1)  # [B, h*w, width]
        cls = v.class_embedding.to(x.dtype).reshape(1, 1, C).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding.to(x.dtype)
        if (h, w) != self.grid_size:
            pos = resize_pos_embed(pos, self.grid_size, (h, w))
        x = x + pos
        x = v.ln_pre(x)
        return x, (h, w)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Run the transformer layers with per-layer prompts; returns ``[B, 1 + N, width]`` (no prompts)."""
        B = x.shape[0]
        in_seq = 0  # prompt tokens currently in the sequence, right after [CLS]
        for i, blk in enumerate(self.visual.transformer.resblocks):
            row = self._prompt_row.get(i)
            if row is not None or in_seq:
                parts = [x[:, :1]]
                if row is not None:
                    # expand first: one dropout mask per image (ZegCLIP's released code)
                    p = self.prompts[row].to(x.dtype).unsqueeze(0).expand(B, -1, -1)
                    parts.append(self.prompt_dropout(p))
                parts.append(x[:, 1 + in_seq:])  # Eq. 3: previous prompt outputs are discarded
                x = torch.cat(parts, dim=1)
                in_seq = self.num_prompts if row is not None else 0
            if self.batch_first:
                x = blk(x)
            else:
                x = blk(x.transpose(0, 1)).transpose(0, 1)
        if in_seq:
            x = torch.cat([x[:, :1], x[:, 1 + in_seq:]], dim=1)
        return x

    # ------------------------------------------------------------------ API
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """images ``[B, 3, H, W]`` (CLIP-normalised) -> ``(g [B, D], patches [B, h*w, D], (h, w))``.

        ``D`` is CLIP's joint embedding size (``visual.proj.shape[1]``, 512 for ViT-B/16);
        ``h = H // patch``, ``w = W // patch``. See the class docstring for which layer's tokens.
        """
        if self.backbone == "fix":
            with torch.no_grad():
                return self._forward(images)
        return self._forward(images)

    def _forward(self, images):
        x, hw = self._embed(images)
        x = self._blocks(x)
        x = self.visual.ln_post(x)  # LayerNorm is per token: same as ln_post on the pooled token
        x = x @ self.visual.proj
        return x[:, 0], x[:, 1:], hw

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone!r}, prompt_tokens={self.num_prompts}, prompt_layers={list(self.prompt_layers)}, "
            f"grid={self.grid_size}, width={self.width}, output_dim={self.output_dim}"
        )


def _pair(x) -> tuple:
    if isinstance(x, (tuple, list)):
        return tuple(x)
    return (x, x)
