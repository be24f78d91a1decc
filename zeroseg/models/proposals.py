"""The mask proposal model: MaskFormer (Cheng, Schwing and Kirillov, NeurIPS 2021) as the
decoupled zero-shot methods train it on the seen classes.

ZegFormer (Ding et al., CVPR 2022, Sec. 3.1 "class-agnostic grouping") and DeOP (Han et al.,
ICCV 2023, Sec. 3.1) both take their segments from a MaskFormer. What is built here follows the
released ZegFormer code (dingjiansw101/ZegFormer, ``mask_former/``; ``../shared/papers/
released-code.md`` section 1.1), which is MaskFormer's:

1. backbone -> ``res2..res5`` at strides 4, 8, 16, 32 (:class:`ResNetBackbone`: torchvision
   ResNet-18/50/101; or :class:`ClipPyramidBackbone`: the open_clip ViT, our departure);
2. pixel decoder (:class:`PixelDecoder`, MaskFormer's ``BasePixelDecoder``): an FPN, top-down
   from res5 with lateral 1x1 and output 3x3 convs (GroupNorm), then a 3x3 ``mask_features`` conv
   -> per-pixel embeddings ``[B, mask_dim, H/4, W/4]``;
3. transformer decoder (:class:`TransformerDecoder`, DETR's with ``ENC_LAYERS: 0``): ``num_queries``
   learnable query embeddings (as query positions; the targets start at zero) cross-attend to res5
   projected to ``hidden_dim`` plus a sine positional encoding; post-norm layers (self-attention,
   cross-attention, FFN), the shared final LayerNorm applied to every layer's output;
4. heads on each query: mask embedding ``MLP(hidden, hidden, mask_dim, 3 layers)``, masks =
   ``einsum("bqc,bchw->bqhw", mask_embed, mask_features)`` (logits at stride 4); class logits
   ``[B, Q, K + 1]`` (last column = no-object) from one of three heads (``class_head``):

   - ``text`` (ZegFormer's SSE head, Eq. 1, ``transformer_zeroshot_predictor.py``; DeOP's
     SimBaseline uses the same idea): ``Linear(hidden, D)``, L2-normalised, times
     ``logit_scale`` (100 = 1/0.01, frozen) against the ``K`` text embeddings given at forward
     time, plus a learnable no-object embedding ``bg_feature`` ``[1, D]`` (``kaiming_uniform_(a=
     sqrt(5))``): **code**: ``100 * x @ bg_feature.T`` with ``bg_feature`` not normalised (the
     default); **paper** Eq. 1: cosine with it as with every class (``no_object_normalized``);
   - ``linear`` (PADing): ``Linear(hidden, K + 1)``;
   - ``objectness``: ``Linear(hidden, 2)``, one class "object" plus no-object: the class-agnostic
     grouping the ZegFormer and DeOP papers describe (their code trains a classifier instead).

Semantic inference (:func:`semantic_scores`, MaskFormer Sec. 3.4): ``einsum("bqc,bqhw->bchw",
softmax(logits)[..., :-1], sigmoid(masks))``.

Departures (docs/architecture.md, "Proposals (MaskFormer)"):

- backbone ``clip``: the papers use ResNets. Here the tokens of four evenly spaced blocks of the
  CLIP ViT (:mod:`zeroseg.models.trunk`) are resampled to strides 4/8/16/32 (ViTDet's simple
  feature pyramid, Li et al. 2022: transposed convs up, max-pool down) and fed to the same FPN;
  the tower is deep-copied and trained with the rest.
- BatchNorm: detectron2's ResNets use frozen BN (``FrozenBN``, the ImageNet statistics). We do so
  when ``backbone_weights`` is given; a randomly initialised ResNet has no statistics to freeze,
  so it gets ordinary trainable ``BatchNorm2d`` (per worker, not synchronised).
- Ignored / padded pixels: MaskFormer pads images in a batch and the target masks with zeros;
  here the pipeline feeds equal-size crops, so there is no batch padding inside the model.

Artifact (stage ``pretrain_proposals``; docs/architecture.md): ``proposals.json`` (this model's
class, config, sizes, the CLIP spec for ``clip``, input size and normalisation, the seen class ids),
``weights.pt`` (the full state dict), ``metrics.json``: :func:`save_proposals`,
:func:`read_proposals_json`, :func:`load_proposal_model`.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.proposals import ProposalConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.models import check_state_dict, class_path, import_class

PROPOSALS_JSON = "proposals.json"
WEIGHTS_PT = "weights.pt"
METRICS_JSON = "metrics.json"
#: ImageNet pixel normalisation of the torchvision ResNets, for images in [0, 1] (detectron2's
#: ``PIXEL_MEAN [123.675, 116.280, 103.530]`` / ``PIXEL_STD [58.395, 57.120, 57.375]`` over 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Output strides of res2..res5.
STRIDES = (4, 8, 16, 32)


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's ``c2_xavier_fill``: ``kaiming_uniform_(a=1)`` weights, zero bias (Caffe2's
    XavierFill), used by MaskFormer for every conv of the pixel decoder and the input projection."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if getattr(module, "bias", None) is not None:
        nn.init.constant_(module.bias, 0)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups (MaskFormer's ``GN``), or the largest divisor of 32 that divides
    ``channels`` when it is small or not a multiple of 32."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


# --------------------------------------------------------------------------- backbones


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without ``avgpool``/``fc``: ``forward(x [B, 3, H, W]) -> {"res2": [B,
    C2, H/4, W/4], "res3": .. H/8, "res4": .. H/16, "res5": [B, C5, H/32, W/32]}`` (C = 64..512 for
    ResNet-18, 256..2048 for ResNet-50/101).

    Submodule names are torchvision's (``conv1``, ``bn1``, ``layer1`` .. ``layer4``), so a
    torchvision state dict without ``fc.*`` loads as is.

    Args:
        name: ``resnet18`` / ``resnet50`` / ``resnet101``.
        weights: None (random init, trainable ``BatchNorm2d``), a torchvision tag of that ResNet
            (``IMAGENET1K_V1``...; fetched with torch.hub into its cache) or a local state-dict
            file; with weights the BN layers are ``FrozenBatchNorm2d`` (detectron2's ``FrozenBN``).
        load: False to build the frozen-BN structure without reading the weights (a full state
            dict is loaded afterwards: :func:`load_proposal_model`).

    Raises:
        ConfigError: an unknown name; weights that cannot be obtained (no network and not cached:
            names the cache file to provide) or that do not fit (a ``WeightsMismatchError``,
            also a ``DataError``, listing the keys).
    """

    def __init__(self, name: str, weights: str | None = None, load: bool = True) -> None:
        super().__init__()
        import torchvision
        from torchvision.ops import FrozenBatchNorm2d

        if name not in ("resnet18", "resnet50", "resnet101"):
            raise ConfigError(f"model.backbone {name!r} is not a torchvision ResNet (resnet18, resnet50, resnet101)")
        norm = FrozenBatchNorm2d if weights is not None else nn.BatchNorm2d
        net = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
        self.name = name
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = tuple(_last_channels(getattr(self, f"layer{i}")) for i in range(1, 5))
        self.strides = STRIDES
        if weights is not None and load:
            self.load_weights(weights)

    def load_weights(self, weights: str) -> None:
        """Load a torchvision tag or a local file strictly (``fc.*`` and ``*.num_batches_tracked``
        dropped: the classifier is not part of the backbone and frozen BN keeps no batch count).

        Raises:
            ConfigError: a tag that cannot be fetched, an unreadable file.
            WeightsMismatchError: missing / unexpected / mis-shaped keys (all listed).
        """
        from zeroseg.config.proposals import is_weights_file

        if is_weights_file(weights):
            path = Path(weights).expanduser()
            if not path.is_file():
                raise ConfigError(f"model.backbone_weights file {weights!r} does not exist")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds for an unreadable file
                raise ConfigError(f"cannot read model.backbone_weights {path}: {type(e).__name__}: {e}") from None
            if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
                sd = sd["state_dict"]
            if not isinstance(sd, Mapping):
                raise ConfigError(f"model.backbone_weights {path} must hold a state dict, got {type(sd).__name__}")
            source = str(path)
        else:
            sd, source = _torchvision_state_dict(self.name, weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        check_state_dict(self.state_dict(), sd, source, f"the torchvision {self.name} backbone")
        self.load_state_dict(sd)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = {}
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            out[f"res{i + 1}"] = x
        return out


def _last_channels(layer: nn.Sequential) -> int:
    blk = layer[-1]
    conv = getattr(blk, "conv3", None) or blk.conv2
    return int(conv.out_channels)


def _torchvision_state_dict(name: str, tag: str) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of torchvision's ``<Name>_Weights.<tag>`` (torch.hub cache, else download).

    Raises:
        ConfigError: an unknown tag, or the file cannot be obtained (names the cache path).
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    try:
        w = enum[tag] if tag != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ConfigError(
            f"model.backbone_weights {tag!r} is not a torchvision tag of {name} (tags: {[m.name for m in enum]})"
        ) from None
    label = f"{enum.__name__}.{w.name}"
    try:
        sd = w.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # noqa: BLE001 - urllib / OSError / hash errors when offline
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
        raise ConfigError(
            f"could not obtain torchvision weights {label} ({w.url}): {type(e).__name__}: {e}. Without network, "
            f"put that file at {cache} (torch.hub's cache), or set model.backbone_weights to a local .pth file"
        ) from None
    return dict(sd), label


def vit_pyramid_layers(num_blocks: int, levels: int = 4) -> tuple[int, ...]:
    """0-based blocks whose outputs feed the pyramid: the last block of each quarter of the ViT
    (``(i + 1) * n // 4 - 1``: blocks 2, 5, 8, 11 of 12; ViTDet's / ViT-Adapter's evenly spaced
    taps). Repeats when the ViT has fewer than 4 blocks (e.g. ``(0, 0, 0, 1)`` for 2)."""
    return tuple(max(0, (i + 1) * num_blocks // levels - 1) for i in range(levels))


class _Resample(nn.Sequential):
    """One pyramid level from the ViT grid (stride ``p``) to stride ``s``: ``log2(p / s)``
    transposed 2x2 convs (channels halved each time, GroupNorm + GELU between) for ``s < p``,
    identity for ``s == p``, a ``s / p`` max-pool for ``s > p`` (ViTDet Fig. 2(c))."""

    def __init__(self, width: int, factor: float) -> None:
        layers: list[nn.Module] = []
        ch = width
        if factor > 1:
            steps = int(round(math.log2(factor)))
            for i in range(steps):
                out = max(ch // 2, 1)
                layers.append(nn.ConvTranspose2d(ch, out, 2, stride=2))
                if i < steps - 1:
                    layers += [group_norm(out), nn.GELU()]
                ch = out
        elif factor < 1:
            k = int(round(1 / factor))
            layers.append(nn.MaxPool2d(k, stride=k))
        super().__init__(*layers)
        self.out_channels = ch


class ClipPyramidBackbone(nn.Module):
    """A CLIP ViT image tower as a 4-level backbone (our departure: the papers use ResNets).

    ``forward(x [B, 3, H, W]) -> {"res2".."res5"}`` at strides 4, 8, 16, 32: the token outputs
    (before ``ln_post``, [CLS] dropped) of four evenly spaced blocks (:func:`vit_pyramid_layers`),
    taken in one pass of the shared trunk (:func:`zeroseg.models.trunk.forward_trunk` with
    ``return_layers``), each reshaped to the patch grid ``[B, width, H/p, W/p]``, normalised by a
    per-level LayerNorm over channels (the residual stream is unnormalised) and resampled from
    stride ``p`` (patch size) to the level's stride (:class:`_Resample`; ViTDet's simple feature
    pyramid, Li et al., ECCV 2022, but fed from four depths as ViT-Adapter / SETR-MLA do, since the
    FPN expects features from increasing depths). Channels: ``width / 4, width / 2, width,
    width`` for ``p = 16``.

    Args:
        visual: an open_clip ``VisionTransformer``; deep-copied (the caller's model is untouched)
            and trained with the rest, except ``ln_post`` and ``proj`` (unused: kept frozen).

    ``RANDOM_INIT``: the submodules that are new here (randomly initialised, not CLIP's): the
    solver gives them the full lr, not the backbone's multiplier
    (``stages.pretrain_proposals.param_groups``).

    Raises:
        ValueError: not a ViT the trunk supports; a patch size that is not a power of 2 dividing 32.
    """

    RANDOM_INIT = ("norms", "resample")

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        from zeroseg.models.trunk import check_trunk_visual

        check_trunk_visual(visual)
        self.visual = copy.deepcopy(visual)
        for name, p in self.visual.named_parameters():
            # ln_post / proj map [CLS] into the joint space; the pyramid never uses them: frozen,
            # so that DDP sees no trainable parameter without a gradient
            p.requires_grad_(not name.startswith(("ln_post.", "proj")))
        ps = self.visual.patch_size
        ph, pw = (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))
        if ph != pw or ph & (ph - 1):
            raise ValueError(f"backbone clip needs a square power-of-2 patch size, got {(ph, pw)}")
        self.patch = ph
        width = int(self.visual.conv1.out_channels)
        self.layers = vit_pyramid_layers(len(self.visual.transformer.resblocks))
        self.norms = nn.ModuleList([nn.LayerNorm(width) for _ in STRIDES])
        self.resample = nn.ModuleList([_Resample(width, ph / s) for s in STRIDES])
        self.channels = tuple(r.out_channels if len(r) else width for r in self.resample)
        self.strides = STRIDES

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from zeroseg.models.trunk import forward_trunk

        out = forward_trunk(self.visual, x, return_layers=sorted(set(self.layers)))
        h, w = out.grid
        feats = {}
        for i, (layer, norm, res) in enumerate(zip(self.layers, self.norms, self.resample)):
            t = norm(out.intermediates[layer][:, 1:])  # [B, h*w, width]
            t = t.transpose(1, 2).reshape(t.shape[0], t.shape[-1], h, w)
            feats[f"res{i + 2}"] = res(t)
        return feats


# --------------------------------------------------------------------------- pixel decoder


class _ConvNorm(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int, relu: bool) -> None:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)  # no bias under a norm (detectron2)
        c2_xavier_fill(conv)
        super().__init__(conv, group_norm(cout), *([nn.ReLU(inplace=True)] if relu else []))


class PixelDecoder(nn.Module):
    """MaskFormer's ``BasePixelDecoder``: a top-down FPN over res2..res5.

    ``y5 = relu(GN(conv3x3(res5)))``; for ``l = 4, 3, 2``: ``y_l = relu(GN(conv3x3(GN(conv1x1(res_l))
    + nearest_up(y_{l+1}))))``; ``mask_features = conv3x3(y2)`` (with bias, no norm).

    ``forward(feats) -> mask_features [B, mask_dim, H/4, W/4]``.
    """

    def __init__(self, in_channels: Sequence[int], conv_dim: int, mask_dim: int) -> None:
        super().__init__()
        *low, top = in_channels
        self.top = _ConvNorm(top, conv_dim, 3, relu=True)
        self.lateral = nn.ModuleList([_ConvNorm(c, conv_dim, 1, relu=False) for c in low])
        self.output = nn.ModuleList([_ConvNorm(conv_dim, conv_dim, 3, relu=True) for _ in low])
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        y = self.top(feats["res5"])
        for i in reversed(range(len(self.lateral))):  # res4, res3, res2
            lat = self.lateral[i](feats[f"res{i + 2}"])
            y = self.output[i](lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest"))
        return self.mask_features(y)


# --------------------------------------------------------------------------- transformer decoder


def sine_position_encoding(
    b: int, h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype, temperature: float = 10000.0
) -> torch.Tensor:
    """DETR's ``PositionEmbeddingSine(dim // 2, normalize=True)`` without a padding mask.

    Row / column indices ``1..h`` / ``1..w`` normalised to ``(0, 2*pi]``, each encoded with
    ``dim / 2`` interleaved sines and cosines of frequencies ``temperature^(2*floor(i/2) / (dim/2))``;
    y first, then x.

    Returns:
        ``[b, dim, h, w]``.
    """
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, device=device, dtype=torch.float32)
    x = torch.arange(1, w + 1, device=device, dtype=torch.float32)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    dim_t = torch.arange(npf, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / npf)
    py, px = y[:, None] / dim_t, x[:, None] / dim_t  # [h, npf], [w, npf]
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], dim=2).flatten(1)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], dim=2).flatten(1)
    pos = torch.cat([py[:, None, :].expand(h, w, npf), px[None, :, :].expand(h, w, npf)], dim=-1)
    return pos.permute(2, 0, 1).unsqueeze(0).expand(b, -1, -1, -1).to(dtype)


class DecoderLayer(nn.Module):
    """DETR's post-norm ``TransformerDecoderLayer`` (``normalize_before=False``, ReLU)::

        t = norm1(t + drop(self_attn(q=t+qpos, k=t+qpos, v=t)))
        t = norm2(t + drop(cross_attn(q=t+qpos, k=mem+pos, v=mem)))
        t = norm3(t + drop(linear2(drop(relu(linear1(t))))))

    Shapes batch first: ``t, qpos [B, Q, d]``, ``mem, pos [B, HW, d]``.
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


# --------------------------------------------------------------------------- the model


class MaskFormer(nn.Module):
    """MaskFormer proposal model (module docstring; ``zeroseg.config.proposals.ProposalConfig``).

    Args:
        cfg: a :class:`ProposalConfig` or its dict form.
        num_classes: ``K``, the classes the head scores (the seen classes). Sizes the ``linear``
            head; recorded for ``text`` (whose ``K`` is the number of text rows at forward time);
            ignored for ``objectness`` (always 1).
        text_dim: CLIP embedding size ``D`` (required for ``text``: ``Linear(hidden, D)`` and the
            no-object embedding ``[1, D]``; ignored otherwise).
        clip_visual: an open_clip ``VisionTransformer`` (required for backbone ``clip``;
            deep-copied and trained).
        load_backbone_weights: False to skip reading ``cfg.backbone_weights`` (when a full state
            dict is loaded right after, :func:`load_proposal_model`).

    Attributes:
        cfg: the validated config as a dict (``ProposalConfig.model_dump()``).
        num_queries, hidden_dim, class_head, text_dim, num_classes, size_divisibility.
        mean, std: pixel normalisation for images in [0, 1] (ImageNet for ResNets, the CLIP
            model's own for ``clip``: ``zeroseg.models.clip.image_norm``).

    Raises:
        ConfigError: a bad config; ``text`` without ``text_dim``; ``clip`` without
            ``clip_visual`` or with a patch size that does not divide ``size_divisibility``;
            ``num_classes < 1``; backbone weights that cannot be obtained or do not fit.
    """

    def __init__(
        self,
        cfg: ProposalConfig | Mapping[str, Any],
        num_classes: int,
        text_dim: int | None = None,
        clip_visual: nn.Module | None = None,
        *,
        load_backbone_weights: bool = True,
    ) -> None:
        super().__init__()
        c = validated(ProposalConfig, cfg, "model")
        self.config = c
        self.cfg = c.model_dump(mode="json")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"MaskFormer num_classes must be a positive int (the seen classes), got {num_classes!r}")
        self.num_queries, self.hidden_dim, self.class_head = c.num_queries, c.hidden_dim, c.class_head
        self.size_divisibility = c.size_divisibility
        self.num_classes = 1 if c.class_head == "objectness" else int(num_classes)
        self.text_dim = None
        if c.class_head == "text":
            if text_dim is None or isinstance(text_dim, bool) or int(text_dim) < 1:
                raise ConfigError(
                    "MaskFormer class_head 'text' needs text_dim (the CLIP embedding size D), got "
                    f"{text_dim!r}; use class_head linear/objectness for a head without text"
                )
            self.text_dim = int(text_dim)

        if c.backbone == "clip":
            if clip_visual is None:
                raise ConfigError(
                    "MaskFormer backbone 'clip' needs clip_visual (the open_clip image tower, model.visual)"
                )
            try:
                self.backbone: nn.Module = ClipPyramidBackbone(clip_visual)
            except ValueError as e:
                raise ConfigError(f"model.backbone clip: {e}") from None
            if c.size_divisibility % self.backbone.patch:
                raise ConfigError(
                    f"model.size_divisibility {c.size_divisibility} is not a multiple of the CLIP patch size "
                    f"{self.backbone.patch}"
                )
            from zeroseg.models.clip import image_norm

            self.mean, self.std = image_norm(clip_visual)
        else:
            self.backbone = ResNetBackbone(c.backbone, c.backbone_weights, load=load_backbone_weights)
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

        ch = self.backbone.channels
        self.pixel_decoder = PixelDecoder(ch, c.conv_dim, c.mask_dim)
        if ch[-1] != c.hidden_dim:  # released: a 1x1 projection only when the widths differ
            self.input_proj: nn.Module = nn.Conv2d(ch[-1], c.hidden_dim, 1)
            c2_xavier_fill(self.input_proj)
        else:
            self.input_proj = nn.Identity()
        self.query_embed = nn.Embedding(c.num_queries, c.hidden_dim)
        self.decoder = TransformerDecoder(c.hidden_dim, c.nheads, c.dim_feedforward, c.dropout, c.dec_layers)
        self.mask_embed = MLP(c.hidden_dim, c.hidden_dim, c.mask_dim, 3)
        if c.class_head == "text":
            self.class_embed = nn.Linear(c.hidden_dim, self.text_dim)
            self.bg_feature = nn.Parameter(torch.empty(1, self.text_dim))
            nn.init.kaiming_uniform_(self.bg_feature, a=math.sqrt(5))
        elif c.class_head == "linear":
            self.class_embed = nn.Linear(c.hidden_dim, self.num_classes + 1)
        else:
            self.class_embed = nn.Linear(c.hidden_dim, 2)

    def criterion(self):
        """The training loss of this model: ``zeroseg.losses.SetCriterion`` with the config's
        weights (its matcher uses them as costs, as released), ``class_agnostic`` for the
        ``objectness`` head (every target is "object")."""
        from zeroseg.losses import SetCriterion

        c = self.config
        return SetCriterion(
            self.num_classes,
            class_weight=c.class_weight,
            mask_weight=c.mask_weight,
            dice_weight=c.dice_weight,
            no_object_weight=c.no_object_weight,
            class_agnostic=c.class_head == "objectness",
        )

    # ---------------------------------------------------------------- heads

    def classify(self, hs: torch.Tensor, text_embeddings: torch.Tensor | None) -> torch.Tensor:
        """Class logits of decoder outputs ``hs [..., Q, hidden]`` -> ``[..., Q, K + 1]``.

        ``text``: ``s * [cos(x, t_1) .. cos(x, t_K), x_hat . b]`` with ``x_hat`` the L2-normalised
        projection, ``s = logit_scale`` and ``b`` the no-object embedding (normalised only with
        ``no_object_normalized``: ZegFormer Eq. 1; code: raw).

        Raises:
            ValueError: ``text`` without ``[K, D]`` text embeddings.
        """
        if self.class_head != "text":
            return self.class_embed(hs)
        self._check_text(text_embeddings)
        x = F.normalize(self.class_embed(hs), dim=-1)
        t = text_embeddings.to(x.dtype)
        bg = self.bg_feature.to(x.dtype)
        if self.config.no_object_normalized:
            bg = F.normalize(bg, dim=-1)
        scale = self.config.logit_scale
        return torch.cat([scale * x @ t.T, scale * x @ bg.T], dim=-1)

    def _check_text(self, text_embeddings: torch.Tensor | None) -> None:
        if text_embeddings is None or text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.text_dim:
            got = None if text_embeddings is None else tuple(text_embeddings.shape)
            raise ValueError(
                f"MaskFormer class_head 'text' needs text_embeddings [K, {self.text_dim}] (the seen classes' "
                f"L2-normalised CLIP text embeddings), got {got}"
            )

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor | None = None) -> dict[str, Any]:
        """Mask proposals and their class logits.

        Args:
            images: float ``[B, 3, H, W]`` normalised with :attr:`mean` / :attr:`std`; ``H, W``
                multiples of ``size_divisibility``.
            text_embeddings: ``[K, D]`` L2-normalised (required for ``text``, ignored otherwise).

        Returns:
            ``{"pred_logits": [B, Q, K + 1]`` (last column no-object; objectness ``K = 1``),
            ``"pred_masks": [B, Q, H/4, W/4]`` mask logits, ``"query_embed": [B, Q, hidden]``
            (last decoder layer after the final norm), and in training with ``deep_supervision``
            ``"aux_outputs": [{"pred_logits", "pred_masks"}]`` of the ``dec_layers - 1`` earlier
            layers (first layer first)``}``.

        Raises:
            ValueError: images not ``[B, 3, H, W]`` with ``H, W`` multiples of
                ``size_divisibility``; missing / mis-shaped text embeddings for ``text``.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"MaskFormer images must be [B, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        if H % self.size_divisibility or W % self.size_divisibility:
            raise ValueError(
                f"MaskFormer images {H}x{W} are not multiples of size_divisibility {self.size_divisibility}: "
                "pad (or crop) them first"
            )
        if self.class_head == "text":
            self._check_text(text_embeddings)  # fail before the backbone runs
        feats = self.backbone(images)
        mask_features = self.pixel_decoder(feats)  # [B, mask_dim, H/4, W/4]
        src = self.input_proj(feats["res5"])  # [B, d, H/32, W/32]
        b, d, h, w = src.shape
        pos = sine_position_encoding(b, h, w, d, src.device, src.dtype).flatten(2).transpose(1, 2)
        mem = src.flatten(2).transpose(1, 2)  # [B, HW, d]
        qpos = self.query_embed.weight.unsqueeze(0).expand(b, -1, -1)
        aux = self.training and self.config.deep_supervision
        hs = self.decoder(mem, pos, qpos)  # [L, B, Q, d]
        hs_used = hs if aux else hs[-1:]
        logits = self.classify(hs_used, text_embeddings)
        masks = torch.einsum("lbqc,bchw->lbqhw", self.mask_embed(hs_used), mask_features)
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_masks": masks[-1], "query_embed": hs[-1]}
        if aux:
            out["aux_outputs"] = [{"pred_logits": a, "pred_masks": m} for a, m in zip(logits[:-1], masks[:-1])]
        return out


def semantic_scores(pred_logits: torch.Tensor, pred_masks: torch.Tensor) -> torch.Tensor:
    """MaskFormer's semantic inference (Sec. 3.4; ZegFormer's ``semantic_inference``):
    ``einsum("bqc,bqhw->bchw", softmax(pred_logits)[..., :-1], sigmoid(pred_masks))``.

    Args:
        pred_logits: ``[B, Q, K + 1]`` (last column no-object).
        pred_masks: ``[B, Q, h, w]`` mask logits.

    Returns:
        ``[B, K, h, w]`` per-class scores in ``[0, Q]`` (sums of probabilities).

    Raises:
        ValueError: mismatched batch or query dimensions.
    """
    if pred_logits.ndim != 3 or pred_masks.ndim != 4 or pred_logits.shape[:2] != pred_masks.shape[:2]:
        raise ValueError(
            f"semantic_scores needs pred_logits [B, Q, K+1] and pred_masks [B, Q, h, w], got "
            f"{tuple(pred_logits.shape)} and {tuple(pred_masks.shape)}"
        )
    cls = pred_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", cls, pred_masks.float().sigmoid())


# --------------------------------------------------------------------------- artifact


def save_proposals(
    artifact_dir: str | Path,
    model: MaskFormer,
    cfg: ProposalConfig | Mapping[str, Any] | None = None,
    *,
    seen: Sequence[int],
    input_size: Sequence[int],
    clip_spec: Any = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a proposals artifact: ``proposals.json``, ``weights.pt`` (the full state dict) and,
    when given, ``metrics.json``.

    Args:
        artifact_dir: directory (created).
        model: the trained :class:`MaskFormer` (unwrapped from DDP).
        cfg: its config (default ``model.cfg``); must equal the model's.
        seen: training class ids the head was trained on (``classes.json`` ``train.seen``, in the
            order of the head's classes / text rows).
        input_size: ``[H, W]`` training crop size (pixels).
        clip_spec: the ``ClipSpec`` (or dict) of the CLIP model: required for backbone ``clip``
            (rebuilds the tower's structure on load), recorded otherwise when given.
        metrics: JSON-able proposal recall etc., written to ``metrics.json``.

    Returns:
        path of ``proposals.json`` (written last).

    Raises:
        ValueError: ``cfg`` differs from the model's; ``clip`` without ``clip_spec``; ``seen`` not
            ``num_classes`` long for a ``linear`` head.
    """
    from zeroseg.config.clip import as_spec

    if cfg is not None and validated(ProposalConfig, cfg, "model").model_dump(mode="json") != model.cfg:
        raise ValueError("save_proposals: cfg differs from the model's own config (model.cfg)")
    if model.cfg["backbone"] == "clip" and clip_spec is None:
        raise ValueError("save_proposals: backbone 'clip' needs clip_spec (to rebuild the tower on load)")
    seen = [int(s) for s in seen]
    if model.class_head != "objectness" and len(seen) != model.num_classes:
        raise ValueError(f"save_proposals: {len(seen)} seen ids for a head of {model.num_classes} classes")
    out = Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "class": class_path(model),
        "model": dict(model.cfg),
        "num_classes": model.num_classes,
        "text_dim": model.text_dim,
        "class_head": model.class_head,
        "num_queries": model.num_queries,
        "hidden_dim": model.hidden_dim,
        "clip": as_spec(clip_spec).model_dump(mode="json") if clip_spec is not None else None,
        "input": {
            "size": [int(s) for s in input_size],
            "mean": [float(m) for m in model.mean],
            "std": [float(s) for s in model.std],
        },
        "seen": seen,
    }
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / WEIGHTS_PT)
    if metrics is not None:
        (out / METRICS_JSON).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    path = out / PROPOSALS_JSON
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


_JSON_KEYS = (
    "class",
    "model",
    "num_classes",
    "text_dim",
    "class_head",
    "num_queries",
    "hidden_dim",
    "clip",
    "input",
    "seen",
)


def read_proposals_json(artifact_dir: str | Path) -> dict[str, Any]:
    """The parsed ``proposals.json`` of a proposals artifact.

    Raises:
        DataError: missing, not JSON, or lacking a key (naming the file and the keys it needs).
    """
    d = Path(artifact_dir)
    jpath = d / PROPOSALS_JSON
    if not jpath.is_file():
        have = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        raise DataError(f"{jpath} not found: not a proposals artifact (directory has {have[:20]})")
    try:
        doc = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{jpath} is not readable JSON: {e}") from None
    missing = [k for k in _JSON_KEYS if k not in doc] if isinstance(doc, dict) else list(_JSON_KEYS)
    if missing or not isinstance(doc.get("input"), dict) or not isinstance(doc.get("model"), dict):
        raise DataError(
            f"{jpath} is malformed: missing {missing or ['input/model as objects']}; expected keys {list(_JSON_KEYS)}"
        )
    return doc


def check_proposals_doc(
    doc: Mapping[str, Any], embed_dim: int, *, who: str, where: str = "proposals", clip_model: str | None = None
) -> int:
    """The refusals every classifier built on a proposals artifact shares (ZegFormer, DeOP); returns
    the query count ``Q``.

    Args:
        doc: the artifact's ``proposals.json`` content.
        embed_dim: the CLIP model's embedding size ``D``.
        who: the method, for messages (``"ZegFormer"``).
        where: the artifact, for messages.
        clip_model: the CLIP model's name, for messages.

    Raises:
        DataError: no usable ``num_queries``, or one that disagrees with ``model.num_queries``; a
            text class head (or any recorded ``text_dim``) whose embedding size is not ``D``. Each
            message names both values and what to change.
    """
    model = doc.get("model") if isinstance(doc.get("model"), Mapping) else {}
    q, q_model = doc.get("num_queries"), model.get("num_queries")
    if isinstance(q, bool) or not isinstance(q, int) or q < 1 or q != q_model:
        raise DataError(
            f"{where}: proposals.json records {q!r} queries but its model has num_queries {q_model!r}; "
            "not a usable pretrain_proposals artifact: re-run pretrain_proposals"
        )
    head = doc.get("class_head", model.get("class_head"))
    td = doc.get("text_dim")
    if (td is not None or head == "text") and td != int(embed_dim):
        name = f" {clip_model!r}" if clip_model else ""
        raise DataError(
            f"{where}: the proposal model embeds segments into {td} dimensions, but {who}'s CLIP model{name} embeds "
            f"into {int(embed_dim)}; pretrain_proposals and train_classifier must use the same clip section"
        )
    return q


def read_proposal_weights(path: str | Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """A proposals artifact's ``weights.pt`` (the full MaskFormer state dict), on the CPU
    (``torch.load(weights_only=True)``).

    Args:
        path: the ``weights.pt`` file, or the artifact directory holding it.
        name: how messages name the file (default: its path; e.g. the store URI of a local copy).

    Raises:
        DataError: the file is missing, unreadable, or not a state dict (naming it).
    """
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_PT
    name = name or str(p)
    if not p.is_file():
        raise DataError(f"{name} not found: the proposals artifact has no {WEIGHTS_PT} (it holds the model's weights)")
    try:
        sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for an unreadable file
        raise DataError(f"cannot read {name}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, Mapping):
        raise DataError(f"{name} must hold a state dict, got {type(sd).__name__}")
    return dict(sd)


def poly_lr_factor(
    step: int, max_steps: int, power: float = 0.9, warmup_steps: int = 0, warmup_factor: float = 1.0
) -> float:
    """detectron2's ``WarmupPolyLR`` (``projects/deeplab/lr_scheduler.py``: linear warm-up,
    constant ending 0) as a unitless multiplier of the base lr at optimisation step ``step``:
    ``w(step) * max(0, 1 - step / max_steps) ** power`` with ``w = warmup_factor * (1 - a) + a``,
    ``a = step / warmup_steps`` during the warm-up and 1 after it (0 at and after ``max_steps``).
    The proposal model's solver (ZegFormer / MaskFormer released) and DeOP's (``WARMUP_ITERS 0``,
    power 0.9) both use it."""
    warm = 1.0
    if step < warmup_steps:
        a = step / warmup_steps
        warm = warmup_factor * (1.0 - a) + a
    return warm * max(0.0, 1.0 - step / max_steps) ** power


def load_proposal_model(
    artifact_dir: str | Path, device: str | torch.device = "cpu", clip_model: nn.Module | None = None
) -> MaskFormer:
    """Rebuild the proposal model of an artifact, in eval mode on ``device``.

    Builds :class:`MaskFormer` from ``proposals.json`` (for backbone ``clip`` on ``clip_model``'s
    image tower, or on ``load_clip`` of the stored spec when None; the tower's weights are then
    replaced by the artifact's), without fetching ``backbone_weights``, and loads ``weights.pt``
    strictly.

    Raises:
        DataError: missing / malformed ``proposals.json`` or ``weights.pt``; weights that do not
            fit (``WeightsMismatchError`` listing keys); the rebuilt model's sizes or
            normalisation disagree with the JSON.
        ConfigError: a bad stored config or CLIP spec.
    """
    d = Path(artifact_dir)
    jpath = d / PROPOSALS_JSON
    doc = read_proposals_json(d)
    cls = import_class(doc["class"], where=str(jpath))
    if not (isinstance(cls, type) and issubclass(cls, MaskFormer)):
        raise DataError(f"{jpath}: class {doc['class']!r} is not a MaskFormer proposal model")
    visual = None
    if doc["model"].get("backbone") == "clip":
        if clip_model is None:
            if not doc["clip"]:
                raise DataError(f"{jpath}: backbone clip but no clip spec")
            from zeroseg.models.clip import as_spec, load_clip

            clip_model = load_clip(as_spec(doc["clip"]), device="cpu")
        visual = getattr(clip_model, "visual", clip_model)
    model = cls(doc["model"], int(doc["num_classes"]), doc["text_dim"], visual, load_backbone_weights=False)
    wpath = d / WEIGHTS_PT
    sd = read_proposal_weights(wpath)
    check_state_dict(model.state_dict(), sd, str(wpath), "the MaskFormer proposal model")
    model.load_state_dict(dict(sd))
    for k, got in (
        ("num_queries", model.num_queries),
        ("hidden_dim", model.hidden_dim),
        ("class_head", model.class_head),
        ("text_dim", model.text_dim),
        ("num_classes", model.num_classes),
    ):
        if doc[k] != got:
            raise DataError(f"{jpath}: {k} {doc[k]!r} disagrees with the rebuilt model's {got!r}")
    for k, got in (("mean", model.mean), ("std", model.std)):
        want = [float(x) for x in doc["input"].get(k, [])]
        if len(want) != len(got) or any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
            raise DataError(f"{jpath}: input.{k} {want} disagrees with the rebuilt model's {list(got)}")
    return model.to(device).eval()


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METRICS_JSON",
    "PROPOSALS_JSON",
    "WEIGHTS_PT",
    "ClipPyramidBackbone",
    "MaskFormer",
    "PixelDecoder",
    "ResNetBackbone",
    "TransformerDecoder",
    "check_proposals_doc",
    "load_proposal_model",
    "poly_lr_factor",
    "read_proposal_weights",
    "read_proposals_json",
    "save_proposals",
    "semantic_scores",
    "sine_position_encoding",
    "vit_pyramid_layers",
]
