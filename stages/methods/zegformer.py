"""``train_classifier.method: zegformer``: ZegFormer (Ding et al., CVPR 2022, Sec. 3.2).

Nothing trains here. ZegFormer's trained part, MaskFormer with the segment-level semantic
embedding head of Eq. 1, is the proposal model of stage ``pretrain_proposals`` with
``class_head: text`` (bound as this method's ``proposals`` input); this method adds the
inference-time CLIP image branch and the fusion of Eq. 3 (``zeroseg.models.zegformer``). The
stage checks that the proposals fit (class head ``text``, text embedding size = the CLIP model's,
trained on this config's seen classes), builds the segmenter, copies the proposal model's weights
into it under ``proposals.`` with the seen classes' text embeddings (``seen_text``), checks that
every evaluation set's seen classes are recognised from their text embeddings, and writes the
segmenter artifact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.dag import Input, StageConfig
from stages.methods import Method
from zeroseg.config.clip import ClipSpec
from zeroseg.config.zegformer import ZegFormerConfig

#: ZegFormer Eq. 2's seen-class calibration in the released configs for COCO-Stuff and VOC
#: (``GZERO_CALIBRATE 0.1``; 0.0 for ADE-847): the default of ``train_classifier.gamma``.
RELEASED_GAMMA = 0.1


class ZegFormerMethod(StageConfig):
    """``train_classifier`` with ``method: zegformer`` (``model``: :class:`ZegFormerConfig`;
    ``clip`` comes from the top-level ``clip:`` section: the image branch's encoder and the text
    embeddings' model). ``gamma``: Eq. 2's seen-class calibration, in probability units, written
    into ``segmenter.json`` as the segmenter's ``default_gamma`` (evaluate applies it when
    ``evaluate.gamma`` is unset; :data:`RELEASED_GAMMA` by default, 0.0 for ADE-847)."""

    method: Literal["zegformer"]
    clip: ClipSpec
    model: ZegFormerConfig = ZegFormerConfig()
    gamma: float = Field(RELEASED_GAMMA, ge=0.0)


METHOD = Method(
    "zegformer",
    ZegFormerMethod,
    "stages.jobs.methods.zegformer:build_zegformer",
    inputs={
        "proposals": Input(
            ("pretrain_proposals",),
            doc="the MaskFormer proposal model with the text class head (ZegFormer's segment classifier)",
        )
    },
)
