"""MaskFormer's backbones: ``res2..res5`` at strides 4, 8, 16, 32 from a torchvision ResNet
(:class:`ResNetBackbone`) or from the open_clip ViT (:class:`ClipPyramidBackbone`, our departure;
the package docstring, :mod:`zeroseg.models.maskformer`).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from zeroseg.errors import ConfigError
from zeroseg.models import load_strict, read_state_dict
from zeroseg.models.maskformer.layers import group_norm

#: ImageNet pixel normalisation of the torchvision ResNets, for images in [0, 1] (detectron2's
#: ``PIXEL_MEAN [123.675, 116.280, 103.530]`` / ``PIXEL_STD [58.395, 57.120, 57.375]`` over 255).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Output strides of res2..res5.
STRIDES = (4, 8, 16, 32)


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
            sd = read_state_dict(path, f"model.backbone_weights {path}", ConfigError)
            if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
                sd = sd["state_dict"]
            source = str(path)
        else:
            sd, source = _torchvision_state_dict(self.name, weights)
        sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
        load_strict(self, sd, source, f"the torchvision {self.name} backbone")

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


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "STRIDES",
    "ClipPyramidBackbone",
    "ResNetBackbone",
    "vit_pyramid_layers",
]
