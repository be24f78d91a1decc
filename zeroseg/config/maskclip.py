"""MaskCLIP's model hyperparameters (Zhou, Loy and Dai, ECCV 2022), torch-free.

See ``zeroseg.models.maskclip`` for the model.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from zeroseg.config import Size, square


class MaskCLIPConfig(BaseModel):
    """``train_classifier.model`` of ``method: maskclip``.

    Fields:
        input_size: ``[H, W]`` pixels the images are resized to, or None for the CLIP model's
            ``image_size``; must be a multiple of the patch size (checked when the model is built).
        logit_scale: the factor applied to the patch-text cosine similarities: a positive number
            (default 100, the temperature of MaskCLIP's head before its softmax:
            ``MaskClipHead.refine_output``) or ``"model"`` (the CLIP model's learned scale). It
            does not change the argmax.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: Size | None = None
    logit_scale: Annotated[float, Field(gt=0)] | Literal["model"] = 100.0

    _square = field_validator("input_size", mode="before")(square)

    @field_validator("logit_scale", mode="before")
    @classmethod
    def _scale(cls, v: object) -> object:
        if v != "model" and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
            raise ValueError(f"MaskCLIP model.logit_scale must be a positive number or 'model', got {v!r}")
        return v


__all__ = ["MaskCLIPConfig"]
