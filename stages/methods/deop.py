"""``train_classifier.method: deop``: DeOP (Han et al., ICCV 2023) trained as a Ray Train job on
top of a frozen proposal model.

Binds the ``pretrain_proposals`` artifact (role ``proposals``, required: a config without that
stage fails at plan time) and builds ``zeroseg.models.deop.DeOP`` around it: the proposal model
is never trained (its weights travel inside the segmenter, under ``proposals.`` in
``weights.pt``); the heatmap decoder, the no-object embedding, the visual prompts and the
learnable text context are. Training sees seen classes only: labels are remapped to seen
training ids (every other id, unseen included, becomes 255, which DeOP's loss trains as
no-object), and the classifier's text rows are the seen classes' ``prompt_names`` (classes.json)
encoded with the learnable prompt at every step.

Optimiser and schedule as released (CongHan0808/DeOP ``scripts/deop_train.sh`` and the base
config; released-code.md section 2.1): AdamW, lr 2e-4 at a global batch of 16, weight decay 1e-4
(none on norm layers and embeddings), detectron2's ``WarmupPolyLR`` without warm-up (power 0.9),
full-model gradient clipping at L2 norm 0.01 (``train.clip_grad_norm``), 60k iterations on
COCO-Stuff (the paper: 20k on VOC, batch 32 on 8 GPUs).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from pipeline.config import Runtime
from pipeline.dag import Input, StageConfig
from pipeline.training import ScalingSection, TrainSection
from stages.methods import Method
from zeroseg.config.clip import ClipSpec
from zeroseg.config.deop import DeOPConfig
from zeroseg.data.transforms import AugmentConfig

PROPOSALS = Input(("pretrain_proposals",), doc="the frozen mask proposal model (MaskFormer) DeOP classifies")


class DeOPMethod(StageConfig):
    """``train_classifier`` with ``method: deop``.

    ``model``: DeOP's hyperparameters (:class:`zeroseg.config.deop.DeOPConfig`); ``train`` /
    ``scaling``: the training package's sections; ``augment``: the training crops (its ``mean`` /
    ``std`` must be left unset: images are normalised as the bound proposal model expects, which
    DeOP's CLIP stream also sees, as released). ``weight_decay``: AdamW's (released 1e-4; 0 on norm
    layers and embeddings). ``poly_power``: exponent of the poly decay ``(1 - s / max_steps) ** p``
    (released 0.9, no warm-up). ``block_rows``: images per Ray Data decode task.
    """

    method: Literal["deop"]
    clip: ClipSpec
    model: DeOPConfig = DeOPConfig()
    train: TrainSection = TrainSection(
        max_steps=60000, batch_size=4, lr=2e-4, reference_batch_size=16, clip_grad_norm=0.01
    )
    scaling: ScalingSection = ScalingSection()
    augment: AugmentConfig = AugmentConfig(crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 1.5))
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    block_rows: Annotated[int, Runtime(why="decode task size")] = Field(32, gt=0)


# drops text: DeOP embeds the class names itself (learnable prompts through CLIP's text tower,
# at training and at evaluation); train_deop never reads embed_text's artifact
METHOD = Method(
    "deop", DeOPMethod, "stages.jobs.methods.deop:train_deop", inputs={"proposals": PROPOSALS}, drops=("text",)
)
