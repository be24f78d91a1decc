"""The test protocol's parameters (torch-free): how ``zeroseg.inference.infer`` turns images of
any size into class scores of a segmenter. Geometry in ``zeroseg.protocols``; the stage's keys
(``evaluate.protocol``, ``evaluate.crop``, ...) in ``stages.evaluate.EvaluateConfig``, which
builds one of these (``EvaluateConfig.eval_protocol``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from zeroseg.config import Size, square


class EvalProtocol(BaseModel):
    """One test protocol (``zeroseg.protocols`` for each one's geometry and source).

    Attributes:
        name: ``resize`` (the whole image resized to ``resolution``), ``slide`` (ZegCLIP's released
            test: sliding windows of ``crop`` every ``stride`` pixels over the image resized to
            ``short_side``) or ``short_side`` (detectron2: short side ``short_side``, long side at
            most ``max_long_side``, padded to the segmenter's ``size_divisibility``).
        resolution: ``resize``: ``(H, W)`` to resize to; None: the segmenter's ``input_size``.
        crop: ``slide``: the window ``(h, w)``; None: the segmenter's ``input_size``.
        stride: ``slide``: ``(h, w)`` between windows (required there).
        short_side: ``slide``: the resized short side (None: the crop's short side);
            ``short_side``: required.
        max_long_side: ``short_side``: the long-side cap (detectron2 ``MAX_SIZE_TEST``), or None.
        activation_at: where a segmenter's ``activation`` is applied: ``input`` (the network input's
            resolution, ZegCLIP's released code) or ``label`` (the caller applies it after
            upsampling to the label size; :func:`zeroseg.inference.infer` then returns logits).
        windows_per_forward: ``slide``: windows batched into one forward (memory only).

    ``zeroseg.inference.resolve_protocol`` fills the defaults that depend on the segmenter.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["resize", "slide", "short_side"] = "resize"
    resolution: Size | None = None
    crop: Size | None = None
    stride: Size | None = None
    short_side: int | None = Field(None, gt=0)
    max_long_side: int | None = Field(None, gt=0)
    activation_at: Literal["input", "label"] = "input"
    windows_per_forward: int = Field(4, ge=1)

    _square = field_validator("resolution", "crop", "stride", mode="before")(square)


__all__ = ["EvalProtocol"]
