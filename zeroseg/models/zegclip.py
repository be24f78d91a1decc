"""ZegCLIP (Zhou et al., CVPR 2023): one-stage text-to-patch matching on a prompt-tuned CLIP ViT.

Pipeline of :class:`ZegCLIP` (ZegCLIP Sec. 3, Fig. 2):

1. image encoder (:class:`~zeroseg.models.prompt.PromptedVisionTransformer`): CLIP ViT with deep
   prompt tuning (Eq. 3, ``backbone="dpt"``), or fine-tuned (``"ft"``) / fixed (``"fix"``) for the
   baselines -> image [CLS] embedding ``g`` ``[B, D]`` and last-layer patch tokens ``H``
   ``[B, N, D]`` in CLIP's joint space, both L2-normalised (as CLIP compares them with text);
2. relationship descriptor (Eq. 8, :class:`RelationshipDescriptor`): class queries
   ``t_hat = concat[t * g, t]`` from the (L2-normalised) class text embeddings ``t`` ``[C, D]``,
   then a learnable linear projection to the decoder width; the other query forms of Table 4 are
   selectable;
3. decoder (:class:`MaskDecoder`): 3 transformer layers from the class queries to the
   (linearly projected) patch tokens; each layer's scaled query-key dot products (Eq. 2) are
   that layer's per-class mask logits ``[B, C, h, w]``; the model's output is the **last**
   layer's.
4. scores: ``sigmoid(mask logits)``, one independent probability per class (non-mutually
   exclusive, Sec. 3.4). Training uses :meth:`ZegCLIP.loss` / :meth:`ZegCLIP.mask_logits`
   (logits, focal + dice of :mod:`zeroseg.losses`), never the sigmoid scores.

Each class query is tied to its class (no Hungarian matching): the model is run on seen-class
embeddings in training and on all classes at inference, unchanged.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.zegclip import ZegCLIPConfig
from zeroseg.losses import segmentation_loss_terms
from zeroseg.models import Segmenter
from zeroseg.models.clip import check_input_size, image_norm
from zeroseg.models.prompt import PromptedVisionTransformer
from zeroseg.optim import zegclip_lr_factor, zegclip_param_groups

# --------------------------------------------------------------------------- paper settings


# --------------------------------------------------------------------------- relationship descriptor


def _absdiff(t, g):
    return (t - g).abs()


#: Query forms of ZegCLIP Table 4 -> (width multiple of D, function of (t [B,C,D], g [B,1,D])).
#: Names spell the concatenated parts: "tg" = t*g (Hadamard), "t_plus_g" = t+g,
#: "abs_t_minus_g" = |t-g|, "t_minus_g" = t-g, "_" between parts = concatenation.
RD_FORMS: dict[str, tuple[int, Any]] = {
    # dim D
    "t": (1, lambda t, g: t),
    "tg": (1, lambda t, g: t * g),
    "abs_t_minus_g": (1, _absdiff),
    "t_plus_g": (1, lambda t, g: t + g),
    # dim 2D
    "t_g": (2, lambda t, g: torch.cat([t, g.expand_as(t)], -1)),
    "tg_t": (2, lambda t, g: torch.cat([t * g, t], -1)),  # Eq. 8, ZegCLIP's choice
    "t_minus_g_t": (2, lambda t, g: torch.cat([t - g, t], -1)),
    "tg_t_plus_g": (2, lambda t, g: torch.cat([t * g, t + g], -1)),
    "t_plus_g_t": (2, lambda t, g: torch.cat([t + g, t], -1)),
    "tg_t_minus_g": (2, lambda t, g: torch.cat([t * g, t - g], -1)),
    # dim 3D
    "tg_abs_t_minus_g_t": (3, lambda t, g: torch.cat([t * g, _absdiff(t, g), t], -1)),
}


class RelationshipDescriptor(nn.Module):
    """Image-specific class queries (ZegCLIP Sec. 3.5, Eq. 8; Table 4 for the other forms).

    ``forward(t [C, D], g [B, D]) -> queries [B, C, width]``: builds ``t_hat`` of the chosen form
    (``describe`` gives it, ``[B, C, k*D]`` with ``k = RD_FORMS[form][0]``: 1, 2 or 3) then applies
    the learnable linear projection ``k*D -> width`` ("we apply learnable linear projection layers
    on both T_hat and H", Sec. 3.5). ``form="t"`` ignores ``g`` (the Baseline's plain text query).

    Raises:
        ValueError: unknown form, or ``t`` / ``g`` of another dimension than ``embed_dim``.
    """

    def __init__(self, embed_dim: int, width: int, form: str = "tg_t") -> None:
        super().__init__()
        if form not in RD_FORMS:
            raise ValueError(f"rd form must be one of {sorted(RD_FORMS)}, got {form!r}")
        self.form = form
        self.embed_dim = int(embed_dim)
        self.in_dim = RD_FORMS[form][0] * self.embed_dim
        self.proj = nn.Linear(self.in_dim, width)

    def describe(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """t ``[C, D]``, g ``[B, D]`` -> t_hat ``[B, C, k*D]`` (before the projection)."""
        if t.ndim != 2 or t.shape[-1] != self.embed_dim:
            raise ValueError(f"text embeddings must be [C, {self.embed_dim}], got {tuple(t.shape)}")
        if g.ndim != 2 or g.shape[-1] != self.embed_dim:
            raise ValueError(f"image embeddings must be [B, {self.embed_dim}], got {tuple(g.shape)}")
        tb = t.unsqueeze(0).expand(g.shape[0], -1, -1)
        return RD_FORMS[self.form][1](tb, g.unsqueeze(1))

    def forward(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return self.proj(self.describe(t, g))


# --------------------------------------------------------------------------- decoder


class MaskDecoderLayer(nn.Module):
    """One decoder layer: [self-attention among the class queries,] cross-attention from the queries
    to the patch tokens, FFN; post-norm residuals (``nn.TransformerDecoderLayer`` style).

    ``forward(q [B, C, W], mem [B, N, W]) -> (q' [B, C, W], mask_logits [B, C, N])`` where
    ``mask_logits`` are the cross-attention's scaled dot products ``Q K^T / sqrt(d_k)`` before the
    softmax (ZegCLIP Eqs. 1-2), per head with ``d_k = W / heads`` and averaged over heads (as in
    ZegCLIP's released head; with ``heads=1`` it is Eq. 2 exactly). ``Q = phi_q(q)`` uses the
    layer's *input* queries. ``W`` = ``width``, ``N = h*w`` patch tokens.

    Raises:
        ValueError: ``width`` not divisible by ``heads``.
    """

    def __init__(self, width: int, heads: int, ffn_ratio: float = 4.0, dropout: float = 0.1, self_attn: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder_width {width} is not divisible by decoder_heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        if self_attn:
            self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
            self.norm_self = nn.LayerNorm(width)
        else:
            self.self_attn = None
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        self.attn_drop = nn.Dropout(dropout)
        self.norm_cross = nn.LayerNorm(width)
        hidden = int(width * ffn_ratio)
        self.ffn = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.norm_ffn = nn.LayerNorm(width)
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, mem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.self_attn is not None:
            q = self.norm_self(q + self.drop(self.self_attn(q, q, q, need_weights=False)[0]))
        B, C, W = q.shape
        N = mem.shape[1]
        Q = self.q_proj(q).reshape(B, C, self.heads, self.head_dim).transpose(1, 2)  # [B, h, C, dh]
        K = self.k_proj(mem).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)  # [B, h, N, dh]
        V = self.v_proj(mem).reshape(B, N, self.heads, self.head_dim).transpose(1, 2)
        logits = (Q @ K.transpose(-1, -2)) * (self.head_dim**-0.5)  # [B, h, C, N]
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = (attn @ V).transpose(1, 2).reshape(B, C, W)
        q = self.norm_cross(q + self.drop(self.out_proj(out)))
        q = self.norm_ffn(q + self.drop(self.ffn(q)))
        return q, logits.mean(dim=1)


class MaskDecoder(nn.Module):
    """ZegCLIP's light decoder head: query projection (RD), patch projection, L decoder layers
    (L = 3 in ZegCLIP Sec. 3.2 / Fig. 8, the default).

    ``forward(t [C, D], g [B, D], patches [B, N, D], hw) -> list of L mask logits [B, C, h, w]``
    with ``N = h*w`` (one per layer, bottom to top; ZegCLIP supervises and predicts with the last
    one; the earlier ones are there for optional auxiliary losses, which neither the paper nor the
    released code uses).

    Raises:
        ValueError: ``layers < 1``, ``width`` not divisible by ``heads``, an unknown ``rd`` form;
            at call time, ``N != h*w`` or ``t`` / ``g`` not ``[C, D]`` / ``[B, D]``.
    """

    def __init__(
        self,
        embed_dim: int,
        *,
        width: int = 512,
        layers: int = 3,
        heads: int = 8,
        rd: str = "tg_t",
        ffn_ratio: float = 4.0,
        dropout: float = 0.1,
        self_attn: bool = False,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"decoder_layers must be >= 1, got {layers}")
        self.rd = RelationshipDescriptor(embed_dim, width, rd)
        self.patch_proj = nn.Linear(embed_dim, width)
        self.layers = nn.ModuleList(
            [
                MaskDecoderLayer(width, heads, ffn_ratio=ffn_ratio, dropout=dropout, self_attn=self_attn)
                for _ in range(layers)
            ]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) linear weights, zero biases, unit LayerNorms (released head init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, t, g, patches, hw: tuple[int, int]) -> list[torch.Tensor]:
        B, N, _ = patches.shape
        if N != hw[0] * hw[1]:
            raise ValueError(f"{N} patch tokens do not form a {hw} grid")
        q = self.rd(t, g)  # [B, C, W]
        mem = self.patch_proj(patches)  # [B, N, W]
        out = []
        for layer in self.layers:
            q, logits = layer(q, mem)
            out.append(logits.reshape(B, -1, hw[0], hw[1]))
        return out


# --------------------------------------------------------------------------- the segmenter

#: Configuration keys of :class:`ZegCLIP` and their defaults (ZegCLIP's VOC setting).
#: Configuration keys of :class:`ZegCLIP` and their defaults (ZegCLIP's released VOC setting):
#: the dump of :class:`zeroseg.config.zegclip.ZegCLIPConfig`, whose docstring says what each is.
ZEGCLIP_DEFAULT_CONFIG: dict[str, Any] = ZegCLIPConfig().model_dump(mode="json")


def resolve_zegclip_config(cfg: Mapping[str, Any] | ZegCLIPConfig | None = None, **overrides: Any) -> ZegCLIPConfig:
    """Defaults <- ``cfg`` <- ``overrides``, validated by :class:`zeroseg.config.zegclip.ZegCLIPConfig`
    (the one schema of ZegCLIP's hyperparameters): a validated config comes back as it is (no
    overrides), a mapping (``segmenter.json``'s ``"model"``, a notebook) is validated.

    Whether ``prompt_layers``' layers exist and ``input_size`` fits the patch size is checked when
    the model is built (it needs the CLIP model).

    Raises:
        ConfigError: unknown key (naming the nearest valid key) or a bad value.
    """
    if isinstance(cfg, ZegCLIPConfig) and not overrides:
        return cfg
    base = cfg.model_dump(mode="json") if isinstance(cfg, ZegCLIPConfig) else dict(cfg or {})
    return validated(ZegCLIPConfig, {**base, **overrides}, "model")


class ZegCLIP(Segmenter):
    """ZegCLIP segmenter (ZegCLIP, CVPR 2023): DPT image encoder + RD queries + mask decoder.

    Args:
        clip_model: an open_clip ``CLIP`` with a ViT image tower (or its ``.visual``). Only the
            image tower is kept (text embeddings come precomputed); it is modified in place
            (positional embedding resized to ``input_size``; ``requires_grad`` per backbone).
        cfg: the validated :class:`zeroseg.config.zegclip.ZegCLIPConfig` (or a mapping of its keys,
            validated here: ``segmenter.json``'s ``"model"``); ``overrides`` win.

    Attributes (``Segmenter`` contract): ``input_size`` ``(H, W)``; ``mean`` / ``std``: the CLIP
    model's pixel normalisation (images in [0, 1]); ``cfg``: the resolved
    :class:`ZegCLIPConfig` (``segmenter.json`` stores its JSON dump under ``"model"``).

    ``forward(images [B, 3, H, W], text_embeddings [C, D]) -> scores [B, C, H/p, W/p]`` in (0, 1):
    ``sigmoid`` of the last decoder layer's mask logits, one independent probability per class
    (ZegCLIP Sec. 3.4), at patch-grid resolution (``p`` = patch size, 16 for ViT-B/16).
    ``evaluate`` upsamples them bilinearly and takes the argmax over classes, i.e. it sees the
    class with the highest independent sigmoid probability (the same class as the highest logit
    since sigmoid is monotonic, up to the interpolation). The released code's inductive
    inference subtracts 0.1 from the seen classes' probabilities: that is evaluate's seen-class
    calibration (``evaluate.gamma: 0.1`` in the ZegCLIP benchmark configs; this model returns
    probabilities, ``scores_are_probabilities``, so gamma is subtracted directly).

    Evaluate protocols (``zeroseg.protocols``): ``activation = "sigmoid"`` and :meth:`logits` (the
    mask logits): evaluate upsamples the logits bilinearly to the network input (the 512 x 512
    window of the released slide inference, or the resized image) and applies the sigmoid there,
    as the released head does (``ATMSingleHeadSeg.forward`` upsamples ``pred_masks`` to
    ``img_size`` before ``semantic_inference``'s sigmoid); ``forward`` keeps the sigmoid at the
    patch grid. ``size_divisibility`` = the patch size.

    Training: ``loss(images, target, seen_text_embeddings)`` (or ``mask_logits`` + a loss from
    :mod:`zeroseg.losses`). Trainable parameters (:meth:`trainable_parameters`,
    :meth:`trainable_state_dict`): prompts + decoder/projections for ``dpt``; decoder/projections
    for ``fix``; everything (image tower included) for ``ft``.

    Raises:
        ConfigError: bad config (see :func:`resolve_zegclip_config`).
        ValueError: a non-ViT CLIP model, or wrongly shaped inputs at call time.
    """

    scores_are_probabilities = True  # forward returns sigmoid(mask logits)
    activation = "sigmoid"  # evaluate: sigmoid(upsampled logits()), see the class docstring

    def __init__(
        self, clip_model: nn.Module, cfg: ZegCLIPConfig | Mapping[str, Any] | None = None, **overrides: Any
    ) -> None:
        super().__init__()
        self.cfg = resolve_zegclip_config(cfg, **overrides)
        c = self.cfg
        visual = getattr(clip_model, "visual", clip_model)
        check_input_size(visual, c.input_size, "model.input_size")
        self.encoder = PromptedVisionTransformer(
            visual,
            backbone=c.backbone,
            prompt_tokens=c.prompt_tokens,
            prompt_layers=c.prompt_layers,
            input_size=c.input_size,
            prompt_dropout=c.prompt_dropout,
        )
        self.embed_dim = self.encoder.output_dim
        self.head = MaskDecoder(
            self.embed_dim,
            width=c.decoder_width,
            layers=c.decoder_layers,
            heads=c.decoder_heads,
            rd=c.rd,
            ffn_ratio=c.decoder_ffn_ratio,
            dropout=c.decoder_dropout,
            self_attn=c.decoder_self_attn,
        )
        self.input_size = tuple(c.input_size)
        self.mean, self.std = image_norm(visual)
        self.size_divisibility = math.lcm(*self.encoder.patch_size)

    # ------------------------------------------------------------------ forward
    def mask_logits(
        self, images: torch.Tensor, text_embeddings: torch.Tensor, all_layers: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """images ``[B, 3, H, W]`` (normalised), text_embeddings ``[C, D]`` -> mask logits
        ``[B, C, H/p, W/p]`` of the last decoder layer (Eq. 2), or the list of every layer's
        (bottom to top) with ``all_layers=True``. Float32.

        Raises:
            ValueError: text_embeddings not ``[C >= 1, D]``; images not ``[B, 3, H, W]`` with
                ``H, W`` multiples of the patch size ``p``.
        """
        if text_embeddings.ndim != 2 or text_embeddings.shape[-1] != self.embed_dim or text_embeddings.shape[0] < 1:
            raise ValueError(f"text_embeddings must be [C >= 1, {self.embed_dim}], got {tuple(text_embeddings.shape)}")
        g, patches, hw = self.encoder(images)
        dtype = self.head.patch_proj.weight.dtype
        g = F.normalize(g.to(dtype), dim=-1)
        patches = F.normalize(patches.to(dtype), dim=-1)
        t = F.normalize(text_embeddings.to(device=patches.device, dtype=dtype), dim=-1)
        layers = self.head(t, g, patches, hw)
        return layers if all_layers else layers[-1]

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> class scores ``sigmoid(mask_logits)`` ``[B, C, H/p, W/p]`` (see the class docstring)."""
        return torch.sigmoid(self.mask_logits(images, text_embeddings))

    def logits(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """-> the scores before :attr:`activation` (sigmoid): the last decoder layer's mask logits
        ``[B, C, H/p, W/p]`` (:meth:`mask_logits`); ``forward = sigmoid(logits)``."""
        return self.mask_logits(images, text_embeddings)

    def loss(
        self,
        images: torch.Tensor,
        target: torch.Tensor,
        text_embeddings: torch.Tensor,
        ignore_index: int = 255,
    ) -> dict[str, torch.Tensor]:
        """Training loss on one batch: mask logits upsampled (bilinear) to the label size, then the
        config's loss (``focal_dice``: Eq. 6 with ``loss_alpha``, ``loss_beta``, ``focal_gamma``;
        or ``ce``).

        images ``[B, 3, H, W]``; target ``[B, H', W']`` long training ids in ``0..C-1`` (255 =
        ignore); text_embeddings ``[C, D]`` of the same training (seen) classes.
        -> ``{"loss": scalar, "focal": ..., "dice": ...}`` (or ``{"loss", "ce"}``).

        Raises:
            ValueError: see :meth:`mask_logits`; a target that is not ``[B, H', W']`` (or
                ``[B, 1, H', W']``) integer ids in ``0..C-1`` or ``ignore_index``.
        """
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        logits = self.label_logits(images, text_embeddings, tuple(target.shape[-2:]))
        return self.loss_terms(logits, target, ignore_index=ignore_index)

    def label_logits(self, images: torch.Tensor, text_embeddings: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The last decoder layer's mask logits upsampled (bilinear) to the label ``size``:
        ``[B, C, *size]`` (what the loss and the released self-training pseudo-labels read)."""
        logits = self.mask_logits(images, text_embeddings)
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def loss_terms(
        self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255
    ) -> dict[str, torch.Tensor]:
        """The config's loss of mask logits already at the label size (:meth:`label_logits`) against
        ``target`` ``[B, H, W]`` (ids ``0..C-1`` or ``ignore_index``); see :meth:`loss`."""
        c = self.cfg
        return segmentation_loss_terms(
            logits,
            target.long(),
            kind=c.loss,
            alpha=c.loss_alpha,
            beta=c.loss_beta,
            gamma=c.focal_gamma,
            ignore_index=ignore_index,
        )

    # ------------------------------------------------------------------ trainable state
    def trainable_names(self) -> list[str]:
        """State-dict keys that train (fixed by the backbone variant, not by ``requires_grad``)."""
        if self.cfg.backbone == "ft":
            return list(self.state_dict().keys())
        return [k for k in self.state_dict().keys() if not k.startswith("encoder.visual.")]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should get: prompts + head (dpt), head (fix), all (ft)."""
        names = set(self.trainable_names())
        return [p for n, p in self.named_parameters() if n in names]

    def optimizer_param_groups(self, weight_decay: float = 0.01) -> list[dict[str, Any]]:
        """Two AdamW groups over :meth:`trainable_parameters`: norm layers (names with ``norm`` or
        ``ln``) without weight decay, the rest with ``weight_decay`` (released config's
        ``decay_mult=0`` for ``norm`` / ``ln``; ``zeroseg.optim.zegclip_param_groups``). Learning rates
        are left to the caller."""
        return zegclip_param_groups(self, weight_decay)

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; a frozen image tower (dpt/fix) stays in eval mode."""
        super().train(mode)
        if self.cfg.backbone != "ft":
            self.encoder.visual.eval()
        return self


__all__ = [
    "zegclip_lr_factor",
    "ZEGCLIP_DEFAULT_CONFIG",
    "RD_FORMS",
    "MaskDecoder",
    "MaskDecoderLayer",
    "RelationshipDescriptor",
    "ZegCLIP",
    "resolve_zegclip_config",
]
