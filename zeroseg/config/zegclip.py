"""ZegCLIP's model hyperparameters (Zhou et al., CVPR 2023), torch-free.

Defaults are ZegCLIP's VOC setting as released (ZiqinZhou66/ZegCLIP, see
``../shared/papers/released-code.md`` section 4 and ``zeroseg.models.zegclip``); the COCO-Stuff
and Context settings change ``prompt_tokens`` (100 / 35, Appendix A). See
``zeroseg.models.zegclip`` for the model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zeroseg.config import Size, square

#: Relationship-descriptor query forms of ZegCLIP Table 4 (``zeroseg.models.zegclip.RD_FORMS``
#: holds their definitions; tests/test_zegclip.py keeps the two lists equal).
RD_FORM_NAMES = (
    "t",
    "tg",
    "abs_t_minus_g",
    "t_plus_g",
    "t_g",
    "tg_t",
    "t_minus_g_t",
    "tg_t_plus_g",
    "t_plus_g_t",
    "tg_t_minus_g",
    "tg_abs_t_minus_g_t",
)
#: ZegCLIP's loss weights. The paper gives gamma = 2 (Sec. 3.4) but no numbers for alpha / beta;
#: these are from the released zero-shot configs (ZiqinZhou66/ZegCLIP,
#: configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py and
#: configs/coco/vpt_seg_zero_vit-b_512x512_80k_12_100_multi.py: ``SegLossPlus(mask_weight=100.0
#: #20.0, dice_weight=1.0)``; the loss class' own default mask_weight is 20; released-code.md section 4).
ZEGCLIP_LOSS_WEIGHTS = {"alpha": 100.0, "beta": 1.0, "gamma": 2.0}

PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class ZegCLIPConfig(BaseModel):
    """``train_classifier.model`` of ``method: zegclip`` (ZegCLIP Sec. 3; released code).

    Fields:
        backbone: ``dpt`` (frozen CLIP + deep prompts, Eq. 3), ``ft`` (fine-tuned, no prompts) or
            ``fix`` (frozen, no prompts): Table 5.
        prompt_tokens: deep prompt tokens per layer (Appendix A: 10 VOC, 35 Context, 100 COCO).
        prompt_layers: 1-based ViT layers with prompts; None = all (Table 8).
        prompt_dropout: dropout on the prompts in training (VPT / released code: 0.1; paper silent).
        rd: query form of the relationship descriptor (Eq. 8: ``tg_t`` = [t*g, t]; Table 4 names).
        decoder_layers / decoder_width / decoder_heads / decoder_ffn_ratio / decoder_dropout /
        decoder_self_attn: the 3-layer mask decoder (Sec. 3.2; width 512, 8 heads in the code).
        input_size: ``[H, W]`` training and inference resolution (512x512, Sec. 4.3).
        loss: ``focal_dice`` (Eqs. 4-6) or ``ce`` (Table 5's "EL" baseline); ``loss_alpha`` /
            ``loss_beta`` / ``focal_gamma``: Eq. 6's weights and the focal exponent.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Literal["dpt", "ft", "fix"] = "dpt"
    prompt_tokens: PositiveInt = 10
    prompt_layers: list[PositiveInt] | None = Field(None, min_length=1)
    prompt_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    rd: Literal[RD_FORM_NAMES] = "tg_t"  # type: ignore[valid-type]
    decoder_layers: PositiveInt = 3
    decoder_width: PositiveInt = 512
    decoder_heads: PositiveInt = 8
    decoder_ffn_ratio: float = Field(4.0, gt=0)
    decoder_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    decoder_self_attn: bool = False
    input_size: Size = (512, 512)
    loss: Literal["focal_dice", "ce"] = "focal_dice"
    loss_alpha: float = Field(ZEGCLIP_LOSS_WEIGHTS["alpha"], ge=0)
    loss_beta: float = Field(ZEGCLIP_LOSS_WEIGHTS["beta"], ge=0)
    focal_gamma: float = Field(ZEGCLIP_LOSS_WEIGHTS["gamma"], ge=0)

    _square = field_validator("input_size", mode="before")(square)

    @field_validator("prompt_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(
                f"model.prompt_tokens must be a positive int (e.g. 10 as for VOC; backbone fix/ft "
                f"ignores it), got {v!r}"
            )
        return v

    @field_validator("prompt_layers", mode="before")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        if v is not None and (
            not isinstance(v, (list, tuple))
            or not v
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in v)
        ):
            raise ValueError(
                "model.prompt_layers must be a non-empty list of 1-based layer numbers (ints, e.g. "
                f"[1, 2, 3]) or null for every layer, got {v!r}"
            )
        return v

    @model_validator(mode="after")
    def _width_heads(self) -> ZegCLIPConfig:
        if self.decoder_width % self.decoder_heads:
            raise ValueError(
                f"model.decoder_width {self.decoder_width} must be divisible by model.decoder_heads "
                f"{self.decoder_heads}"
            )
        return self


__all__ = ["RD_FORM_NAMES", "ZEGCLIP_LOSS_WEIGHTS", "ZegCLIPConfig"]
