"""ZegFormer (Ding, Xue, Xia and Dai, "Decoupling Zero-Shot Semantic Segmentation", CVPR 2022):
class-agnostic grouping into segments, then zero-shot classification of each segment.

Pipeline of :class:`ZegFormer` at inference (ZegFormer Sec. 3.2, Fig. 2):

1. proposals (``self.proposals``: the MaskFormer of stage ``pretrain_proposals`` with
   ``class_head: text``, :mod:`zeroseg.models.maskformer`): ``Q`` mask logits per image and, per
   segment, the logits of Eq. 1: ``100 * cos(G_q, T_c)`` against the class text embeddings plus the
   learned no-object logit (released: the raw ``bg_feature``, see ``zeroseg.config.proposals``).
   ``p_q(c) = softmax(SSE logits)[c]`` over the C classes and no-object; no-object is dropped.
2. image branch (``image_branch``): each proposal's mask is upsampled to the input size and
   binarised (``sigmoid > mask_threshold``); a sub-image is cut from the image in CLIP's own pixel
   normalisation (:func:`sub_images`: ``crop_and_mask`` / ``crop`` / ``mask``), all ``Q``
   sub-images of an image go through the frozen CLIP image encoder in one call, and their
   embeddings ``A_q`` are scored against the text: ``logit_scale_clip * cos(A_q, T_c)``. The SSE
   no-object logit is appended before the softmax and dropped after it (released code), giving
   ``p'_q(c)`` (:func:`segment_probabilities`).
3. fusion (Eq. 3, :func:`segment_probabilities`): seen classes ``p^lambda * p_avg^(1-lambda)`` with
   ``p_avg`` = mean of ``p'`` over the seen classes, unseen classes ``p^(1-lambda) * p'^lambda``
   (``lambda = 2/3`` as released; ``fusion: all_classes`` = ``ENSEMBLING_ALL_CLS``).
4. semantic inference (Eq. 2 without its gamma term): ``sum_q p_q(c) * sigmoid(m_q)[h, w]``
   (:func:`combine`) at the input resolution, for each variant: ``zegformer_seg`` (``p``),
   ``zegformer_img`` (``p'``), ``zegformer`` (fused). Eq. 2's calibration (``- gamma`` on the seen
   classes' per-pixel scores, released ``GZERO_CALIBRATE`` 0.1 for COCO-Stuff and VOC, 0 for
   ADE-847) is evaluate's ``gamma``: the scores are probabilities
   (``scores_are_probabilities``), so gamma is subtracted from them as they are.

Where this departs from the released code (dingjiansw101/ZegFormer ``mask_former_model.py``;
``../shared/papers/released-code.md`` sections 1.3-1.4):

- one set of text embeddings serves both branches; the released image branch scores against
  separate embeddings of the 32 ``IMAGENET_TEMPLATES_SELECT_CLIP`` templates;
- the image branch runs in the CLIP model's dtype (float32 here); the released one in fp16;
- which classes are seen is not known to a segmenter's ``forward`` (evaluate passes the text
  embeddings only): the model keeps the seen training classes' text embeddings (buffer
  ``seen_text``, written by the ``zegformer`` method) and treats an evaluation class as seen when
  its embedding equals one of them (:func:`seen_from_text`; the stage checks this against
  ``classes.json`` for every evaluation set when it builds the artifact). ``forward(...,
  seen=...)`` takes the seen ids explicitly instead.
- evaluate pads images with zeros in the proposal model's normalisation; in CLIP's that is not
  exactly zero (released: padded after CLIP normalisation). Only padded pixels differ.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.zegformer import ZegFormerConfig
from zeroseg.errors import ConfigError
from zeroseg.models import Segmenter
from zeroseg.models.clip import embed_dim, image_norm, native_input_size

#: The three inference variants of ZegFormer Sec. 3.2, the fused model first (evaluate reports
#: ``variants[0]`` under the usual metric keys).
VARIANTS = ("zegformer", "zegformer_seg", "zegformer_img")
#: Largest L2 distance between an evaluation class's text embedding and a seen training class's
#: for the class to count as seen (the rows come from the same embed_text file: equal in practice).
SEEN_MATCH_TOLERANCE = 1e-4
#: Proposals turned into sub-images at a time (bounds the ``[n, 3, H, W]`` masked copies).
CROP_CHUNK = 25


# --------------------------------------------------------------------------- sub-images
def renormalise(
    images: torch.Tensor,
    mean_from: Sequence[float],
    std_from: Sequence[float],
    mean_to: Sequence[float],
    std_to: Sequence[float],
) -> torch.Tensor:
    """Images normalised with ``(mean_from, std_from)`` -> the same pixels normalised with
    ``(mean_to, std_to)`` (all in [0, 1] pixel units): ``((x * std_from + mean_from) - mean_to) /
    std_to``. ``[B, 3, H, W]`` -> ``[B, 3, H, W]``."""

    def col(v: Sequence[float]) -> torch.Tensor:
        return torch.tensor(list(v), dtype=images.dtype, device=images.device).view(1, -1, 1, 1)

    return (images * col(std_from) + col(mean_from) - col(mean_to)) / col(std_to)


def mask_boxes(binary: torch.Tensor) -> torch.Tensor:
    """The box of each binary mask as the released code computes it.

    Args:
        binary: bool ``[N, H, W]``.

    Returns:
        float ``[N, 4]`` ``(x0, y0, x1, y1)`` in pixel-index units: ``x0``/``y0`` the first
        column/row holding a mask pixel, ``x1``/``y1`` the *last* one (released
        ``argmax(cumsum)``; in ``roi_align(aligned=True)``'s continuous coordinates the box thus
        ends at the left/top edge of the last column/row). A mask whose box has zero area (empty,
        a single row or a single column) gets the whole image ``(0, 0, W, H)`` (released).
    """
    n, h, w = binary.shape
    cols, rows = binary.any(dim=1), binary.any(dim=2)  # [N, W], [N, H]
    xs = torch.arange(w, device=binary.device)
    ys = torch.arange(h, device=binary.device)
    x0 = torch.where(cols, xs, w).amin(dim=1)
    x1 = torch.where(cols, xs, -1).amax(dim=1)
    y0 = torch.where(rows, ys, h).amin(dim=1)
    y1 = torch.where(rows, ys, -1).amax(dim=1)
    degenerate = ~cols.any(dim=1) | (x1 == x0) | (y1 == y0)
    full = torch.tensor([0, 0, w, h], device=binary.device)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(degenerate[:, None], full, boxes).float()


def sub_images(
    image: torch.Tensor, mask_logits: torch.Tensor, style: str, size: int, threshold: float = 0.5
) -> torch.Tensor:
    """ZegFormer's sub-images ``I_q = f(m_q, I)`` of one image (Sec. 3.2; released
    ``CLIP_CLS_STYLE``, released-code.md section 1.3).

    Args:
        image: float ``[3, H, W]``, normalised the way the image encoder wants (CLIP's mean/std).
        mask_logits: ``[Q, H, W]`` proposal mask logits at the image's size.
        style: ``crop_and_mask`` (released ``cropmask``: ``image * binary mask``, background 0 in
            normalised space, i.e. CLIP's mean colour, then ``roi_align`` of the mask's box,
            :func:`mask_boxes`), ``crop`` (``roi_align`` of the unmasked image in that box) or
            ``mask`` (image and mask logits bilinearly resized to ``size``, then the image times
            the resized mask's binarisation).
        size: output side in pixels (square; the aspect ratio is not kept, as released).
        threshold: binary mask = ``sigmoid(logit) > threshold`` (released: 0.5).

    Returns:
        ``[Q, 3, size, size]``; ``roi_align(..., output_size=size, aligned=True)`` (torchvision,
        adaptive sampling ratio) for the box styles.

    Raises:
        ValueError: an unknown style, or shapes that do not fit.
    """
    from torchvision.ops import roi_align

    if image.ndim != 3 or mask_logits.ndim != 3 or image.shape[-2:] != mask_logits.shape[-2:]:
        raise ValueError(
            f"sub_images: image [3, H, W] and mask_logits [Q, H, W] of one size, got {tuple(image.shape)} "
            f"and {tuple(mask_logits.shape)}"
        )
    q = mask_logits.shape[0]
    if style == "mask":
        small = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)
        m = F.interpolate(mask_logits[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
        return small * (m.sigmoid() > threshold).unsqueeze(1).to(small.dtype)
    if style not in ("crop_and_mask", "crop"):
        raise ValueError(f"sub_images: unknown style {style!r} (crop_and_mask, crop, mask)")
    binary = mask_logits.float().sigmoid() > threshold  # [Q, H, W]
    boxes = mask_boxes(binary).to(image.dtype)
    if style == "crop":
        rois = torch.cat([torch.zeros(q, 1, dtype=image.dtype, device=image.device), boxes], dim=1)
        return roi_align(image[None], rois, output_size=size, aligned=True)
    out = []
    for s in range(0, q, CROP_CHUNK):  # one masked copy of the image per proposal
        b = binary[s : s + CROP_CHUNK]
        masked = image[None] * b[:, None].to(image.dtype)  # [n, 3, H, W]
        idx = torch.arange(len(b), dtype=image.dtype, device=image.device)[:, None]
        out.append(roi_align(masked, torch.cat([idx, boxes[s : s + CROP_CHUNK]], dim=1), size, aligned=True))
    return torch.cat(out)


# --------------------------------------------------------------------------- classification
def segment_probabilities(
    sse_logits: torch.Tensor,
    clip_logits: torch.Tensor | None,
    seen: torch.Tensor,
    lambda_balance: float = 2.0 / 3.0,
    fusion: str = "released",
) -> dict[str, torch.Tensor]:
    """Per-segment class probabilities of ZegFormer's three variants (Eqs. 1 and 3, released code).

    Args:
        sse_logits: ``[..., Q, C + 1]`` logits of the segment-level semantic embeddings (Eq. 1;
            last column: no-object).
        clip_logits: ``[..., Q, C]`` logits of the sub-images' CLIP embeddings against the class
            texts, or None (no image branch).
        seen: bool ``[C]``, True for the seen classes.
        lambda_balance: Eq. 3's lambda (released 2/3).
        fusion: ``released`` (Eq. 3) or ``all_classes`` (released ``ENSEMBLING_ALL_CLS``).

    Returns:
        ``{"zegformer_seg": p, "zegformer_img": p', "zegformer": fused}`` (the last two only with
        ``clip_logits``), each ``[..., Q, C]``:
        ``p = softmax(sse_logits)[..., :C]``;
        ``p' = softmax(cat(clip_logits, sse_logits[..., C:]))[..., :C]`` (the SSE no-object logit
        joins the CLIP logits before the softmax, released code);
        fused (``released``): seen ``c``: ``p_c^lambda * mean_{j in S}(p'_j)^(1 - lambda)``, unseen
        ``c``: ``p_c^(1 - lambda) * p'_c^lambda``; (``all_classes``): ``p^(1 - lambda) * p'^lambda``.

    Raises:
        ValueError: shapes that do not fit, or an unknown fusion.
    """
    c = sse_logits.shape[-1] - 1
    if seen.shape != (c,):
        raise ValueError(f"seen must be bool [{c}] (one per class), got {tuple(seen.shape)}")
    p = sse_logits.float().softmax(dim=-1)[..., :c]
    out = {"zegformer_seg": p}
    if clip_logits is None:
        return out
    if clip_logits.shape != sse_logits.shape[:-1] + (c,):
        raise ValueError(
            f"clip_logits must be {tuple(sse_logits.shape[:-1]) + (c,)} like the SSE logits without "
            f"no-object, got {tuple(clip_logits.shape)}"
        )
    p_img = torch.cat([clip_logits.float(), sse_logits[..., c:].float()], dim=-1).softmax(dim=-1)[..., :c]
    out["zegformer_img"] = p_img
    lam = float(lambda_balance)
    if fusion == "all_classes":
        out["zegformer"] = p.pow(1 - lam) * p_img.pow(lam)
    elif fusion == "released":
        seen = seen.to(device=p.device, dtype=torch.bool)
        n_seen = int(seen.sum())
        p_avg = (p_img * seen).sum(dim=-1, keepdim=True) / max(n_seen, 1)
        out["zegformer"] = torch.where(seen, p.pow(lam) * p_avg.pow(1 - lam), p.pow(1 - lam) * p_img.pow(lam))
    else:
        raise ValueError(f"unknown fusion {fusion!r} (released, all_classes)")
    return out


def combine(probs: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Semantic inference (ZegFormer Eq. 2 without gamma; MaskFormer):
    ``einsum("bqc,bqhw->bchw", probs, sigmoid(mask_logits))``. ``[B, Q, C]``, ``[B, Q, H, W]`` ->
    ``[B, C, H, W]`` float32."""
    return torch.einsum("bqc,bqhw->bchw", probs.float(), mask_logits.float().sigmoid())


def seen_from_text(text: torch.Tensor, seen_text: torch.Tensor, tol: float = SEEN_MATCH_TOLERANCE) -> torch.Tensor:
    """bool ``[C]``: which rows of ``text`` ``[C, D]`` equal (L2 distance <= ``tol``, both
    L2-normalised) a row of ``seen_text`` ``[S, D]``. An evaluation class is seen exactly when its
    mapped name is a seen training class (``classes.json``); embed_text embeds each prompt name
    once, so such rows are equal."""
    if seen_text.shape[0] == 0:
        return torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
    t = F.normalize(text.float(), dim=-1)
    s = F.normalize(seen_text.to(device=t.device, dtype=torch.float32), dim=-1)
    return torch.cdist(t, s, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1) <= tol


# --------------------------------------------------------------------------- the segmenter
def resolve_zegformer_config(
    clip_model: nn.Module | None,
    cfg: ZegFormerConfig | Mapping[str, Any] | None,
    proposals: Mapping[str, Any] | None = None,
) -> tuple[ZegFormerConfig, dict[str, Any]]:
    """The model config of :class:`ZegFormer` and its proposals description.

    Args:
        clip_model: the CLIP model (``crop_size`` is made concrete for it; None: left as given).
        cfg: a validated :class:`~zeroseg.config.zegformer.ZegFormerConfig`, or a mapping of its
            keys (validated here) that may hold ``proposals`` (``segmenter.json``'s ``"model"``).
        proposals: the proposals artifact's ``proposals.json`` content (else ``cfg["proposals"]``).

    Returns:
        ``(config, proposals)``.

    Raises:
        ConfigError: an unknown key or bad value; no ``proposals`` description; a ``crop_size``
            other than the CLIP image encoder's native input size.
    """
    if not isinstance(cfg, ZegFormerConfig):
        cfg = dict(cfg or {})
        proposals = cfg.pop("proposals", proposals)
    if not isinstance(proposals, Mapping) or not isinstance(proposals.get("model"), Mapping):
        raise ConfigError(
            "ZegFormer model config needs 'proposals': the proposals artifact's proposals.json content "
            "(the zegformer method writes it; build ZegFormer through train_classifier)"
        )
    c = validated(ZegFormerConfig, cfg, "model")
    if clip_model is not None and c.image_branch:
        native = native_input_size(clip_model)
        if native[0] != native[1]:
            raise ConfigError(f"ZegFormer's sub-images are square; the CLIP image encoder takes {list(native)}")
        if c.crop_size is None:
            c = c.model_copy(update={"crop_size": int(native[0])})
        elif c.crop_size != native[0]:
            raise ConfigError(
                f"model.crop_size {c.crop_size} differs from the CLIP image encoder's input size "
                f"{native[0]}; set it to {native[0]} or leave it out"
            )
    return c, dict(proposals)


class ZegFormer(Segmenter):
    """ZegFormer segmenter (see the module docstring).

    Args:
        clip_model: an open_clip ``CLIP``: its image tower (frozen, eval mode) is the image
            branch's encoder and, for a ``clip``-backbone proposal model, the architecture of that
            backbone (whose trained weights come with ``proposals.*``); ``logit_scale.exp()`` scales
            the image branch's logits (released: CLIP's, 100).
        cfg: the validated ``ZegFormerConfig`` (with ``proposals``), or a mapping of its fields plus
            ``proposals`` (``segmenter.json``'s ``"model"``; :func:`resolve_zegformer_config`).
        proposals: the proposals artifact's ``proposals.json`` content (``cfg["proposals"]`` else).

    Attributes (``Segmenter`` contract): ``input_size``, ``mean``, ``std`` of the proposal model
    (``proposals.json`` ``input``: ImageNet's for ResNets); ``size_divisibility`` of the proposal
    model; ``variants`` = :data:`VARIANTS` (``("zegformer_seg",)`` without the image branch);
    ``scores_are_probabilities`` True. ``cfg``: the resolved ``ZegFormerConfig`` (concrete
    ``crop_size``); ``proposals_doc``: the ``proposals.json`` content (``config_json`` stores both,
    as before: the config's fields plus ``proposals``). ``proposals``: the MaskFormer; ``clip_visual``: the frozen
    CLIP image tower (None without the image branch); ``seen_text``: buffer ``[S, D]``, the seen
    training classes' text embeddings (see :func:`seen_from_text`).

    ``forward(images [B, 3, H, W] normalised with mean/std, H and W multiples of
    size_divisibility, text_embeddings [C, D], seen=None) -> {variant: scores [B, C, H, W]}``:
    per-pixel class probabilities summed over proposals (Eq. 2 without gamma). ``seen``: the seen
    class ids of this vocabulary (default: :func:`seen_from_text`).

    ``trainable_names()``: ``proposals.*`` and ``seen_text`` (``weights.pt``); nothing here trains.

    Raises:
        ConfigError: see :func:`resolve_zegformer_config`; a proposal model whose class head is
            not ``text`` or whose text size differs from the CLIP model's.
        ValueError: at call time, text embeddings not ``[C >= 1, D]``.
    """

    scores_are_probabilities = True

    def __init__(
        self,
        clip_model: nn.Module,
        cfg: ZegFormerConfig | Mapping[str, Any] | None = None,
        proposals: Mapping[str, Any] | None = None,
    ) -> None:
        from zeroseg.models.maskformer import MaskFormer

        super().__init__()
        self.cfg, self.proposals_doc = resolve_zegformer_config(clip_model, cfg, proposals)
        c, doc = self.cfg, self.proposals_doc
        pcfg = dict(doc["model"])
        d = embed_dim(clip_model)
        head, top = pcfg.get("class_head"), doc.get("class_head", pcfg.get("class_head"))
        if head != "text" or top != "text" or doc.get("text_dim") != d:
            raise ConfigError(
                f"ZegFormer needs a proposal model with class_head 'text' and text_dim {d} (the CLIP "
                f"model's embedding size); proposals.json has class_head {top!r}"
                + (f" (model.class_head {head!r})" if head != top else "")
                + f", text_dim {doc.get('text_dim')}"
            )
        visual = getattr(clip_model, "visual", clip_model)
        self.proposals = MaskFormer(
            pcfg,
            num_classes=int(doc["num_classes"]),
            text_dim=d,
            clip_visual=visual if pcfg.get("backbone") == "clip" else None,
            load_backbone_weights=False,  # weights.pt holds the trained backbone
        )
        self.register_buffer("seen_text", torch.zeros(len(doc.get("seen") or []), d))
        self.image_branch = bool(c.image_branch)
        if self.image_branch:
            self.clip_visual = visual
            self.clip_visual.requires_grad_(False)
            self.clip_visual.eval()
            self.clip_mean, self.clip_std = image_norm(visual)
            self.clip_logit_scale = float(clip_model.logit_scale.detach().exp().reshape(-1)[0])
        else:
            self.clip_visual = None
        self.variants = VARIANTS if self.image_branch else ("zegformer_seg",)
        inp = doc["input"]
        self.input_size = tuple(int(s) for s in inp["size"])
        self.mean = tuple(float(m) for m in inp["mean"])
        self.std = tuple(float(s) for s in inp["std"])
        self.size_divisibility = int(pcfg.get("size_divisibility", 1))
        self.embed_dim = d

    def train(self, mode: bool = True) -> ZegFormer:
        """As ``nn.Module.train``; the frozen CLIP image tower stays in eval mode."""
        super().train(mode)
        if self.clip_visual is not None:
            self.clip_visual.eval()
        return self

    def trainable_names(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith("proposals.") or k == "seen_text"]

    def config_json(self) -> dict[str, Any]:
        """``segmenter.json``'s ``"model"``: the config's fields plus ``proposals`` (the proposals
        document), what :func:`resolve_zegformer_config` validates back."""
        return {**self.cfg.model_dump(mode="json"), "proposals": dict(self.proposals_doc)}

    def clip_logits(self, images: torch.Tensor, mask_logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Image branch: ``[B, 3, H, W]`` (proposal-model normalisation), mask logits ``[B, Q, H,
        W]``, L2-normalised text ``[C, D]`` -> ``logit_scale * cos(A_q, T_c)`` ``[B, Q, C]``. One
        ``encode_image`` call per image for its ``Q`` sub-images."""
        c = self.cfg
        x = renormalise(images.float(), self.mean, self.std, self.clip_mean, self.clip_std)
        dtype = next(self.clip_visual.parameters()).dtype
        out = []
        for b in range(x.shape[0]):
            crops = sub_images(x[b], mask_logits[b], c.clip_style, c.crop_size, c.mask_threshold)
            emb = F.normalize(self.clip_visual(crops.to(dtype)).float(), dim=-1)
            out.append(self.clip_logit_scale * emb @ text.t())
        return torch.stack(out)

    def forward(
        self, images: torch.Tensor, text_embeddings: torch.Tensor, seen: Sequence[int] | None = None
    ) -> dict[str, torch.Tensor]:
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] < 1 or text_embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"text_embeddings must be [C >= 1, {self.embed_dim}], got {tuple(text_embeddings.shape)}")
        text = F.normalize(text_embeddings.to(device=images.device, dtype=torch.float32), dim=-1)
        out = self.proposals(images, text)
        masks = F.interpolate(out["pred_masks"].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if seen is None:
            seen_mask = seen_from_text(text, self.seen_text)
        else:
            seen_mask = torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
            seen_mask[torch.as_tensor(list(seen), dtype=torch.long, device=text.device)] = True
        clip = self.clip_logits(images, masks, text) if self.image_branch else None
        c = self.cfg
        probs = segment_probabilities(out["pred_logits"], clip, seen_mask, c.lambda_balance, c.fusion)
        return {v: combine(probs[v], masks) for v in self.variants}


__all__ = [
    "VARIANTS",
    "ZegFormer",
    "combine",
    "mask_boxes",
    "renormalise",
    "resolve_zegformer_config",
    "seen_from_text",
    "segment_probabilities",
    "sub_images",
]
