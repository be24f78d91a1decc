"""Deep prompt tuning (VPT-deep) over a frozen open_clip ``VisionTransformer`` (ZegCLIP Sec. 3.3).

ZegCLIP Eq. 3: the l-th transformer layer of the CLIP image encoder processes

    [g^l, _, H^l] = Layer^l([g^{l-1}, P^{l-1}, H^{l-1}])

where ``P`` are M learnable prompt tokens of that layer. The outputs at the prompt positions
(``_``) are discarded: the next layer gets *its own* learnable prompts instead, so the prompts
only act as extra keys/values that adapt each attention block while every CLIP weight stays
intact.

:class:`PromptedVisionTransformer` wraps an open_clip ``VisionTransformer`` and implements the
three backbone variants of ZegCLIP's ablation (Table 5, Fig. 1):

- ``"dpt"``: frozen encoder + deep prompts (ZegCLIP's Design 1, the default);
- ``"ft"``: Baseline-FT, the whole image encoder is fine-tuned, no prompts;
- ``"fix"``: Baseline-Fix, frozen encoder, no prompts (the encoder runs under ``no_grad``).

The ViT forward itself is the shared trunk (:mod:`zeroseg.models.trunk`); this module owns the
prompt parameters and gives them to the trunk through its prompt hook
(:meth:`PromptedVisionTransformer.layer_prompts`). ZegCLIP's ``prompt_layers`` are 1-based
(Table 8), the trunk's block indices 0-based.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from zeroseg.models.trunk import TrunkOutput, forward_trunk, project, resize_pos_embed

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
                raise ValueError(
                    f"prompt_layers {bad} outside 1..{self.num_layers} (1 = bottom layer, ZegCLIP Table 8)"
                )
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
        self._prompt_row = (
            {layer - 1: row for row, layer in enumerate(self.prompt_layers)} if self.prompts is not None else {}
        )
        self.prompt_dropout = nn.Dropout(prompt_dropout) if prompt_dropout > 0 else nn.Identity()

    # ------------------------------------------------------------------ helpers
    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"image size {(H, W)} is not a multiple of the patch size {self.patch_size}")

    def layer_prompts(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The trunk's prompt hook (ZegCLIP Eq. 3): ``[B, M, width]`` tokens for 0-based block
        ``layer`` (``x`` its input ``[B, L, width]``), or None for a block without prompts.

        The prompts are expanded to the batch first and then dropped out, so every image gets its
        own dropout mask (ZegCLIP's released code)."""
        row = self._prompt_row.get(layer)
        if row is None:
            return None
        p = self.prompts[row].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return self.prompt_dropout(p)

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
        out = self.trunk(images)
        x = project(self.visual, out.tokens)  # ln_post is per token: same as on the pooled token
        return x[:, 0], x[:, 1:], out.grid

    def trunk(self, images: torch.Tensor, **hooks) -> TrunkOutput:
        """The encoder's transformer tokens with this module's deep prompts, plus any other trunk
        hooks (``attention``, ``additive``, ``return_layers`` of
        :func:`zeroseg.models.trunk.forward_trunk`; e.g. DeOP's patch severance on a prompted tower).

        images ``[B, 3, H, W]`` -> :class:`~zeroseg.models.trunk.TrunkOutput` (tokens ``[B, 1 + h*w,
        width]`` before ``ln_post``, prompts removed). Runs with gradients as the caller's context
        says (:meth:`forward` adds ``no_grad`` for ``"fix"``).

        Raises:
            ValueError: images not ``[B, 3, H, W]`` with ``H, W`` multiples of the patch size; see
                :func:`~zeroseg.models.trunk.forward_trunk`.
        """
        self._check_images(images)
        prompts = self.layer_prompts if self.prompts is not None else None
        return forward_trunk(self.visual, images, prompts=prompts, **hooks)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone!r}, prompt_tokens={self.num_prompts}, prompt_layers={list(self.prompt_layers)}, "
            f"grid={self.grid_size}, width={self.width}, output_dim={self.output_dim}"
        )


def _pair(x) -> tuple:
    if isinstance(x, (tuple, list)):
        return tuple(x)
    return (x, x)
