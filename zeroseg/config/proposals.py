"""Hyperparameters of the mask proposal model (MaskFormer, Cheng et al., NeurIPS 2021), torch-free.

The decoupled methods (ZegFormer, DeOP) take their class-agnostic mask proposals from a
MaskFormer trained on the seen classes (stage ``pretrain_proposals``). Defaults are the
released ZegFormer setting (dingjiansw101/ZegFormer, ``configs/coco-stuff/*.yaml`` and
``mask_former/config.py``; ``../shared/papers/released-code.md`` section 1.1): 100 queries, hidden
256, 6 decoder layers, 8 heads, FFN 2048, dropout 0.1, FPN pixel decoder with 256 channels and
256-d mask embeddings, deep supervision; matcher and loss weights class 1 / focal 20 / dice 1,
no-object weight 0.1. See ``zeroseg.models.maskformer`` for the network, the matcher and the
criterion (``zeroseg.models.maskformer.criterion``).

Imports neither torch nor Ray.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zeroseg.config.clip import file_sha256
from zeroseg.errors import ConfigError

#: torchvision weight tags per ResNet (``torchvision.models.get_model_weights(name)``, torchvision
#: 0.28). MaskFormer/ZegFormer's ``detectron2://ImageNetPretrained/torchvision/R-50.pkl`` is the
#: converted ``IMAGENET1K_V1``. ``DEFAULT`` is torchvision's alias of the best tag.
TORCHVISION_TAGS = {
    "resnet18": ("IMAGENET1K_V1", "DEFAULT"),
    "resnet50": ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"),
    "resnet101": ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"),
}
#: Loss and matcher weights of the released ZegFormer / MaskFormer (``mask_former_model.py:
#: from_config``: ``{loss_ce: 1, loss_mask: MASK_WEIGHT 20.0, loss_dice: DICE_WEIGHT 1.0}``,
#: ``NO_OBJECT_WEIGHT 0.1``; the matcher uses the same class / mask / dice weights).
PROPOSAL_LOSS_WEIGHTS = {"class": 1.0, "mask": 20.0, "dice": 1.0, "no_object": 0.1}

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegative = Annotated[float, Field(ge=0)]
_TAG = re.compile(r"^[A-Z0-9_]+$")


def is_weights_file(value: str) -> bool:
    """Whether a ``backbone_weights`` string names a file (``.pt``/``.pth``/``.bin``, a path with
    ``/``, ``~``, or an existing file) rather than a torchvision tag such as ``IMAGENET1K_V1``."""
    v = value.strip()
    return (
        v.endswith((".pt", ".pth", ".bin", ".ckpt"))
        or "/" in v
        or v.startswith("~")
        or (not _TAG.match(v) and Path(v).is_file())
    )


class ProposalConfig(BaseModel):
    """``pretrain_proposals.model``: the MaskFormer proposal model (MaskFormer Sec. 3; ZegFormer
    Sec. 3.1 and released code; DeOP Sec. 3.1).

    Fields:
        backbone: ``resnet18`` / ``resnet50`` / ``resnet101`` (torchvision ResNet, res2..res5 at
            strides 4..32) or ``clip`` (the open_clip ViT of the ``clip`` section, four evenly
            spaced blocks resampled to strides 4..32, ViTDet's simple pyramid).
        backbone_weights: ResNets only. A torchvision tag of that ResNet (``IMAGENET1K_V1``, the
            weights MaskFormer/ZegFormer start from; ``IMAGENET1K_V2``; ``DEFAULT``), fetched
            through torch.hub's cache, or a local ``.pt``/``.pth`` torchvision-layout state dict,
            loaded strictly (``fc.*`` and ``num_batches_tracked`` dropped). None = random init.
            A file counts in artifact keys by its sha256, not its path (:meth:`key_payload`).
        num_queries / hidden_dim / dec_layers / nheads / dim_feedforward / dropout: the DETR
            transformer decoder (released: 100 / 256 / 6 / 8 / 2048 / 0.1, post-norm, no encoder).
        conv_dim / mask_dim: FPN channels and per-pixel mask embedding size (256 / 256).
        class_head: ``text`` (ZegFormer's and DeOP's released head: cosine with the seen-class text
            embeddings times ``logit_scale`` plus a learnable no-object embedding), ``linear``
            (PADing: ``Linear(hidden, K + 1)``) or ``objectness`` (one class "object" plus
            no-object: the class-agnostic grouping the ZegFormer and DeOP papers describe).
        logit_scale: text head: 1 / temperature (ZegFormer ``TEMPERATURE: 0.01``, frozen).
        no_object_normalized: text head: L2-normalise the no-object embedding as the other class
            embeddings (ZegFormer paper Eq. 1: cosine for every T_i). False = released code (the
            raw ``bg_feature``).
        deep_supervision: losses on every decoder layer (released: on).
        size_divisibility: images are padded to a multiple of it (32 as released for ResNets; a
            multiple of 32; for ``clip`` also of the patch size, checked when the model is built).
        class_weight / mask_weight / dice_weight / no_object_weight: loss and matcher weights
            (:data:`PROPOSAL_LOSS_WEIGHTS`, released 1 / 20 / 1 / 0.1).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # torchvision ResNets (the papers' family: ZegFormer R50/R101, DeOP R101c) or the open_clip
    # image tower of the ``clip`` section (our departure; see ``zeroseg.models.maskformer``)
    backbone: Literal["resnet18", "resnet50", "resnet101", "clip"] = "resnet50"
    backbone_weights: str | None = None
    num_queries: PositiveInt = 100
    hidden_dim: PositiveInt = 256
    dec_layers: PositiveInt = 6
    nheads: PositiveInt = 8
    dim_feedforward: PositiveInt = 2048
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    conv_dim: PositiveInt = 256
    mask_dim: PositiveInt = 256
    class_head: Literal["text", "linear", "objectness"] = "text"
    logit_scale: float = Field(100.0, gt=0)
    no_object_normalized: bool = False
    deep_supervision: bool = True
    size_divisibility: PositiveInt = 32
    class_weight: NonNegative = PROPOSAL_LOSS_WEIGHTS["class"]
    mask_weight: NonNegative = PROPOSAL_LOSS_WEIGHTS["mask"]
    dice_weight: NonNegative = PROPOSAL_LOSS_WEIGHTS["dice"]
    no_object_weight: float = Field(PROPOSAL_LOSS_WEIGHTS["no_object"], gt=0, le=1)

    @field_validator("backbone_weights", mode="before")
    @classmethod
    def _weights(cls, v: Any) -> Any:
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(
                "model.backbone_weights must be a torchvision tag (e.g. IMAGENET1K_V1), a .pt/.pth "
                f"file, or null for random init, got {v!r}"
            )
        return v.strip() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _consistent(self) -> ProposalConfig:
        if self.backbone_weights is not None:
            if self.backbone == "clip":
                raise ValueError(
                    "model.backbone_weights is for the ResNet backbones; backbone 'clip' starts from the "
                    "clip section's weights (clip.pretrained / clip.checkpoint): remove backbone_weights"
                )
            if not is_weights_file(self.backbone_weights):
                tags = TORCHVISION_TAGS[self.backbone]
                if self.backbone_weights not in tags:
                    raise ValueError(
                        f"model.backbone_weights {self.backbone_weights!r} is not a torchvision tag of "
                        f"{self.backbone} (tags: {', '.join(tags)}) nor a .pt/.pth file path"
                    )
        if self.hidden_dim % self.nheads:
            raise ValueError(f"model.hidden_dim {self.hidden_dim} must be divisible by model.nheads {self.nheads}")
        if self.hidden_dim % 2:
            raise ValueError(
                f"model.hidden_dim {self.hidden_dim} must be even (the sine positional encoding "
                "gives half of it to each axis)"
            )
        if self.size_divisibility % 32:
            raise ValueError(
                f"model.size_divisibility {self.size_divisibility} must be a multiple of 32 (the "
                "coarsest feature map, res5, has stride 32)"
            )
        return self

    def weights_file(self) -> Path | None:
        """The local backbone weights file, or None (a tag or random init)."""
        w = self.backbone_weights
        return Path(w).expanduser() if w is not None and is_weights_file(w) else None

    def key_payload(self) -> dict[str, Any]:
        """What determines outputs (artifact keys): every field, with a weights *file* replaced by
        ``"sha256:<hex>"`` of its bytes (so the same file at another path gives the same key).

        Raises:
            ConfigError: the weights file does not exist.
        """
        out = self.model_dump(mode="json")
        f = self.weights_file()
        if f is not None:
            if not f.is_file():
                raise ConfigError(
                    f"model.backbone_weights file {self.backbone_weights!r} does not exist "
                    f"(relative paths are resolved against {Path.cwd()})"
                )
            out["backbone_weights"] = "sha256:" + file_sha256(f)
        return out


__all__ = ["PROPOSAL_LOSS_WEIGHTS", "TORCHVISION_TAGS", "ProposalConfig", "is_weights_file"]
