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

import copy
import difflib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.errors import ConfigError
from zeroseg.losses import LOSS_KINDS, ZEGCLIP_LOSS_WEIGHTS, segmentation_loss_terms
from zeroseg.models import Segmenter
from zeroseg.models.clip import check_input_size, image_norm
from zeroseg.models.prompt import BACKBONE_VARIANTS, PromptedVisionTransformer

# --------------------------------------------------------------------------- paper settings

#: Settings of the paper (ZegCLIP Sec. 4.3 unless noted), for configs to cite. Numbers the paper
#: does not print come from the authors' released configs (ZiqinZhou66/ZegCLIP,
#: configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py, configs/coco/vpt_seg_zero_vit-b_512x512_80k_12_100_multi.py,
#: where "_12_10" / "_12_100" = prompts in 12 layers, 10 / 100 prompt tokens) and are marked "code".
ZEGCLIP_PAPER_SETTINGS: dict[str, Any] = {
    "clip": {"model": "ViT-B-16", "pretrained": "openai"},  # Sec. 4.3
    "input_size": (512, 512),  # Sec. 4.3: 512x512 crops
    "batch_size": 16,  # Sec. 4.3 (code: 4 GPUs x 4 images)
    "iterations": {"voc": 20_000, "context": 40_000, "coco": 80_000},  # Sec. 4.3, inductive
    "optimizer": {  # Sec. 4.3: AdamW + the MMSeg default schedule; the numbers are "code"
        "name": "AdamW",
        "lr": 2e-5,
        "lr_mult": {"prompts": 10.0, "head": 10.0},  # effective 2e-4 for everything that trains
        "weight_decay": 0.01,
        "no_weight_decay": ("norm", "ln"),  # decay_mult 0 for norm layers
        "schedule": {"policy": "poly", "power": 0.9, "min_lr": 1e-6},
        "warmup": {"kind": "linear", "iters": 1500, "ratio": 1e-6},
    },
    # Appendix A / Fig. 6: best number of deep prompt tokens M per dataset
    "prompt_tokens": {"voc": 10, "coco": 100, "context": 35},
    "prompt_layers": None,  # Appendix B / Table 8: every layer (1->12) is best and the default
    "backbone": "dpt",  # Sec. 3.3
    "rd": "tg_t",  # Eq. 8, Table 4 (red line)
    "decoder_layers": 3,  # Sec. 3.2 / Fig. 8
    "decoder_width": 512,  # code (embed_dims = in_channels = 512)
    "decoder_heads": 8,  # code
    "loss": {"kind": "focal_dice", **ZEGCLIP_LOSS_WEIGHTS},  # Eqs. 4-6, gamma Sec. 3.4; alpha/beta code
    # Appendix C: VOC uses the single template "A photo of a { }" (no full stop; template set
    # ``zegclip_single``), COCO and Context the 15 listed there (``ensemble15``)
    "text_templates": {"voc": "single ('A photo of a {}')", "coco": 15, "context": 15},
    "unseen": {  # Appendix E, Table 10
        "voc": ["pottedplant", "sheep", "sofa", "train", "tvmonitor"],
        "coco": [
            "cow",
            "giraffe",
            "suitcase",
            "frisbee",
            "skateboard",
            "carrot",
            "scissors",
            "cardboard",
            "clouds",
            "grass",
            "playingfield",
            "river",
            "road",
            "tree",
            "wall-concrete",
        ],
        "context": ["cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor", "keyboard", "aeroplane"],
    },
    "test": {"mode": "slide", "crop": (512, 512), "stride": (426, 426)},  # code
    "transductive": "train on seen for the first half of the iterations, then self-train with pseudo labels",  # Sec. 4.3
}


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
ZEGCLIP_DEFAULT_CONFIG: dict[str, Any] = {
    "backbone": "dpt",  # dpt | ft | fix   (ZegCLIP Sec. 3.3, Table 5)
    "prompt_tokens": 10,  # M (Appendix A: 10 VOC, 100 COCO, 35 Context); dpt only
    "prompt_layers": None,  # 1-based ViT layers with prompts; None = all (Table 8)
    "prompt_dropout": 0.1,  # VPT / released code; paper silent
    "rd": "tg_t",  # query form, Table 4 names in RD_FORMS
    "decoder_layers": 3,  # Sec. 3.2: a 3-layer transformer decoder
    "decoder_width": 512,
    "decoder_heads": 8,
    "decoder_ffn_ratio": 4.0,
    "decoder_dropout": 0.1,
    "decoder_self_attn": False,  # the released decoder layer has no query self-attention
    "input_size": [512, 512],  # (H, W) training/inference resolution; pos. embedding resized once
    "loss": "focal_dice",  # focal_dice (Eqs. 4-6) | ce (Table 5 "EL" baseline)
    "loss_alpha": ZEGCLIP_LOSS_WEIGHTS["alpha"],
    "loss_beta": ZEGCLIP_LOSS_WEIGHTS["beta"],
    "focal_gamma": ZEGCLIP_LOSS_WEIGHTS["gamma"],
}


def resolve_zegclip_config(cfg: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """Defaults <- ``cfg`` <- ``overrides``, validated; returns a JSON-serialisable dict.

    ``prompt_layers`` comes back as a list of ints or None; whether its layers exist and
    ``input_size`` fits the patch size is checked when the model is built (it needs the CLIP model).

    Raises:
        ConfigError: unknown key (naming the nearest valid key) or a bad value.
    """
    out = copy.deepcopy(ZEGCLIP_DEFAULT_CONFIG)
    for src in (cfg or {}), overrides:
        for k, v in src.items():
            if k not in out:
                near = difflib.get_close_matches(k, list(out), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(out)}"
                raise ConfigError(f"unknown ZegCLIP model config key {k!r}{hint}")
            out[k] = v
    if out["backbone"] not in BACKBONE_VARIANTS:
        raise ConfigError(f"model.backbone must be one of {BACKBONE_VARIANTS}, got {out['backbone']!r}")
    if out["rd"] not in RD_FORMS:
        near = difflib.get_close_matches(str(out["rd"]), list(RD_FORMS), n=1)
        raise ConfigError(
            f"model.rd must be one of {sorted(RD_FORMS)}, got {out['rd']!r}"
            + (f"; did you mean {near[0]!r}?" if near else "")
        )
    if out["loss"] not in LOSS_KINDS:
        raise ConfigError(f"model.loss must be one of {LOSS_KINDS}, got {out['loss']!r}")
    size = out["input_size"]
    if isinstance(size, int):
        size = [size, size]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ConfigError(f"model.input_size must be [H, W] positive ints, got {out['input_size']!r}")
    out["input_size"] = [int(s) for s in size]
    for key in ("prompt_tokens", "decoder_layers", "decoder_width", "decoder_heads"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            fix = " (e.g. 10 as for VOC; backbone fix/ft ignores it)" if key == "prompt_tokens" else ""
            raise ConfigError(f"model.{key} must be a positive int{fix}, got {v!r}")
    if out["decoder_width"] % out["decoder_heads"]:
        raise ConfigError(
            f"model.decoder_width {out['decoder_width']} must be divisible by model.decoder_heads {out['decoder_heads']}"
        )
    layers = out["prompt_layers"]
    if layers is not None:
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in layers)
        ):
            raise ConfigError(
                "model.prompt_layers must be a non-empty list of 1-based layer numbers (ints, e.g. [1, 2, 3]) "
                f"or null for every layer, got {layers!r}"
            )
        out["prompt_layers"] = [int(i) for i in layers]
    return out


class ZegCLIP(Segmenter):
    """ZegCLIP segmenter (ZegCLIP, CVPR 2023): DPT image encoder + RD queries + mask decoder.

    Args:
        clip_model: an open_clip ``CLIP`` with a ViT image tower (or its ``.visual``). Only the
            image tower is kept (text embeddings come precomputed); it is modified in place
            (positional embedding resized to ``input_size``; ``requires_grad`` per backbone).
        cfg: model config, keys and defaults in :data:`ZEGCLIP_DEFAULT_CONFIG`; ``overrides`` win.

    Attributes (``Segmenter`` contract): ``input_size`` ``(H, W)``; ``mean`` / ``std``: the CLIP
    model's pixel normalisation (images in [0, 1]); ``cfg``: the resolved config (what
    ``segmenter.json`` should store under ``"model"``).

    ``forward(images [B, 3, H, W], text_embeddings [C, D]) -> scores [B, C, H/p, W/p]`` in (0, 1):
    ``sigmoid`` of the last decoder layer's mask logits, one independent probability per class
    (ZegCLIP Sec. 3.4), at patch-grid resolution (``p`` = patch size, 16 for ViT-B/16).
    ``evaluate`` upsamples them bilinearly and takes the argmax over classes, i.e. it sees the
    class with the highest independent sigmoid probability (the same class as the highest logit
    since sigmoid is monotonic, up to the interpolation). The released code additionally
    subtracts 0.1 from the seen classes' probabilities at inductive test time; not done here.

    Training: ``loss(images, target, seen_text_embeddings)`` (or ``mask_logits`` + a loss from
    :mod:`zeroseg.losses`). Trainable parameters (:meth:`trainable_parameters`,
    :meth:`trainable_state_dict`): prompts + decoder/projections for ``dpt``; decoder/projections
    for ``fix``; everything (image tower included) for ``ft``.

    Raises:
        ConfigError: bad config (see :func:`resolve_zegclip_config`).
        ValueError: a non-ViT CLIP model, or wrongly shaped inputs at call time.
    """

    scores_are_probabilities = True  # forward returns sigmoid(mask logits)

    def __init__(self, clip_model: nn.Module, cfg: Mapping[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__()
        self.cfg = resolve_zegclip_config(cfg, **overrides)
        c = self.cfg
        visual = getattr(clip_model, "visual", clip_model)
        check_input_size(visual, c["input_size"], "model.input_size")
        self.encoder = PromptedVisionTransformer(
            visual,
            backbone=c["backbone"],
            prompt_tokens=c["prompt_tokens"],
            prompt_layers=c["prompt_layers"],
            input_size=c["input_size"],
            prompt_dropout=c["prompt_dropout"],
        )
        self.embed_dim = self.encoder.output_dim
        self.head = MaskDecoder(
            self.embed_dim,
            width=c["decoder_width"],
            layers=c["decoder_layers"],
            heads=c["decoder_heads"],
            rd=c["rd"],
            ffn_ratio=c["decoder_ffn_ratio"],
            dropout=c["decoder_dropout"],
            self_attn=c["decoder_self_attn"],
        )
        self.input_size = tuple(c["input_size"])
        self.mean, self.std = image_norm(visual)

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
        logits = self.mask_logits(images, text_embeddings)
        if target.ndim == 4 and target.shape[1] == 1:
            target = target[:, 0]
        logits = F.interpolate(logits, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=False)
        c = self.cfg
        return segmentation_loss_terms(
            logits,
            target.long(),
            kind=c["loss"],
            alpha=c["loss_alpha"],
            beta=c["loss_beta"],
            gamma=c["focal_gamma"],
            ignore_index=ignore_index,
        )

    # ------------------------------------------------------------------ trainable state
    def trainable_names(self) -> list[str]:
        """State-dict keys that train (fixed by the backbone variant, not by ``requires_grad``)."""
        if self.cfg["backbone"] == "ft":
            return list(self.state_dict().keys())
        return [k for k in self.state_dict().keys() if not k.startswith("encoder.visual.")]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimiser should get: prompts + head (dpt), head (fix), all (ft)."""
        names = set(self.trainable_names())
        return [p for n, p in self.named_parameters() if n in names]

    def optimizer_param_groups(self, weight_decay: float = 0.01) -> list[dict[str, Any]]:
        """Two AdamW groups over :meth:`trainable_parameters`: norm layers (names with ``norm`` or
        ``ln``) without weight decay, the rest with ``weight_decay`` (released config's
        ``decay_mult=0`` for ``norm`` / ``ln``). Learning rates are left to the caller."""
        names = set(self.trainable_names())
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if n not in names:
                continue
            leaf = n.split(".")
            (no_decay if any(s.startswith("norm") or s.startswith("ln") for s in leaf) else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return groups

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; a frozen image tower (dpt/fix) stays in eval mode."""
        super().train(mode)
        if self.cfg["backbone"] != "ft":
            self.encoder.visual.eval()
        return self


__all__ = [
    "ZEGCLIP_DEFAULT_CONFIG",
    "ZEGCLIP_PAPER_SETTINGS",
    "RD_FORMS",
    "MaskDecoder",
    "MaskDecoderLayer",
    "RelationshipDescriptor",
    "ZegCLIP",
    "resolve_zegclip_config",
]
