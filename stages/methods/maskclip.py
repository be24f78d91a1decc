"""``train_classifier.method: maskclip``: the training-free MaskCLIP baseline (Zhou, Loy and Dai,
ECCV 2022): the frozen CLIP image tower's last-block value embeddings compared with the class
text embeddings (``zeroseg.models.maskclip``). Nothing trains: the stage checks that the text
embeddings fit the CLIP model, builds the segmenter once (so a bad checkpoint or config fails
here, not in evaluate) and writes ``segmenter.json`` only; the weights are the CLIP spec's.
"""

from __future__ import annotations

from typing import Literal

from pipeline.dag import StageConfig
from stages.methods import Method
from zeroseg.config.clip import ClipSpec
from zeroseg.config.maskclip import MaskCLIPConfig


class MaskCLIPMethod(StageConfig):
    """``train_classifier`` with ``method: maskclip`` (``model``: :class:`MaskCLIPConfig`;
    ``clip`` comes from the top-level ``clip:`` section)."""

    method: Literal["maskclip"]
    clip: ClipSpec
    model: MaskCLIPConfig = MaskCLIPConfig()


METHOD = Method("maskclip", MaskCLIPMethod, "stages.jobs.methods.maskclip:build_maskclip")
