"""``train_classifier.method: zegclip``: inductive ZegCLIP (Zhou et al., CVPR 2023) trained as a
Ray Train job.

Wires the build_splits manifest (the Ray Data feed, ``stages.feeds``), the seen-class text
embeddings (embed_text) and the ZegCLIP model (``zeroseg.models.zegclip``) into the training
package (``pipeline.training``). Training sees seen classes only: labels are remapped to seen
training ids (every other id, unseen included, becomes 255) and the decoder's class queries are
the seen-class text embeddings (ZegCLIP Sec. 3.1); evaluate scores seen + unseen classes with the
same weights.

Optimiser and schedule as released (ZiqinZhou66/ZegCLIP ``configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py``;
released-code.md section 4): AdamW lr 2e-5 with ``lr_mult`` 10 for the prompts and the head (so
every trained parameter gets 2e-4), weight decay 0.01 (none on norm layers), poly decay (power
0.9) after a linear warm-up of 1500 iterations; 20k (VOC) / 80k (COCO-Stuff) iterations at a
global batch of 16.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipeline.config import Runtime
from pipeline.dag import StageConfig
from pipeline.training import ScalingSection, TrainSection
from stages.methods import Method
from zeroseg.config.clip import ClipSpec
from zeroseg.config.zegclip import ZegCLIPConfig
from zeroseg.data.transforms import AugmentConfig

#: The seen-class calibration ZegCLIP's released inductive inference applies (``semantic_inference(...,
#: 0.1)``): the artifact's ``default_gamma``, which evaluate uses when ``evaluate.gamma`` is unset.
INDUCTIVE_GAMMA = 0.1


class ZegCLIPSolver(StageConfig):
    """ZegCLIP's training sections, shared by ``train_classifier`` (``method: zegclip``) and
    ``self_train`` (the released self-training run keeps the inductive run's optimiser settings).

    ``train`` / ``scaling``: the training package's sections (steps, per-worker batch, lr and its
    reference global batch, checkpoints, precision, accumulation, clipping / workers and
    resources); ``augment``: the training crops. Schedule (``zeroseg.models.zegclip.zegclip_lr_factor``,
    the released mmcv one): ``warmup_steps`` of linear warm-up from ``warmup_ratio`` (0: none), then
    poly decay to the absolute ``min_lr`` (0: to zero). ``poly_power``: exponent ``p`` of the
    poly decay ``(1 - s / T) ** p``. ``schedule_steps``: the schedule's horizon ``T`` (None:
    ``train.max_steps``); a larger value trains the first ``train.max_steps`` steps of a longer
    run, as the released transductive runs' inductive half (``iter_10000`` of the 20k VOC run,
    ``iter_40000`` of the 80k COCO run; released-code.md section 4). ``head_lr_mult``: lr multiplier of every trained
    parameter (the released ``lr_mult`` 10). ``block_rows``: images per Ray Data decode task
    (32 keeps the feed level with a PyTorch DataLoader on 2 CPUs: ``benchmarks/bench_train_feed.py``).
    """

    train: TrainSection = TrainSection(max_steps=20000, batch_size=4, lr=2e-5, reference_batch_size=16)
    scaling: ScalingSection = ScalingSection()
    augment: AugmentConfig = AugmentConfig()
    weight_decay: float = Field(0.01, ge=0)
    head_lr_mult: float = Field(10.0, gt=0)
    warmup_steps: int = Field(1500, ge=0)
    warmup_ratio: float = Field(1e-6, ge=0, le=1)
    poly_power: float = Field(0.9, ge=0)
    min_lr: float = Field(1e-6, ge=0)
    schedule_steps: int | None = Field(None, ge=1)
    block_rows: Annotated[int, Runtime(why="decode task size")] = Field(32, gt=0)

    @model_validator(mode="after")
    def _horizon(self) -> ZegCLIPSolver:
        if self.schedule_steps is not None and self.schedule_steps < self.train.max_steps:
            raise ValueError(
                f"schedule_steps {self.schedule_steps} is shorter than train.max_steps {self.train.max_steps}: the "
                "schedule's horizon must cover the steps trained (unset it to use train.max_steps)"
            )
        return self

    def solver(self) -> dict[str, Any]:
        """The loop config entries of ``stages.jobs.methods.zegclip.zegclip_optimizer``."""
        return {
            "schedule_steps": self.schedule_steps or self.train.max_steps,
            "weight_decay": self.weight_decay,
            "head_lr_mult": self.head_lr_mult,
            "warmup_steps": self.warmup_steps,
            "warmup_ratio": self.warmup_ratio,
            "poly_power": self.poly_power,
            "min_lr": self.min_lr,
        }


class ZegCLIPMethod(ZegCLIPSolver):
    """``train_classifier`` with ``method: zegclip``: ``model``: ZegCLIP's hyperparameters
    (:class:`zeroseg.config.zegclip.ZegCLIPConfig`); the training sections of :class:`ZegCLIPSolver`.
    """

    method: Literal["zegclip"]
    clip: ClipSpec
    model: ZegCLIPConfig = ZegCLIPConfig()

    @model_validator(mode="after")
    def _one_resolution(self) -> ZegCLIPMethod:
        if tuple(self.augment.crop_size) != tuple(self.model.input_size):
            raise ValueError(
                f"augment.crop_size {list(self.augment.crop_size)} differs from model.input_size "
                f"{list(self.model.input_size)}: ZegCLIP trains and is evaluated at one resolution (its positional "
                "embedding is resized once, Sec. 4.3: 512x512); set both to the same [H, W]"
            )
        return self


METHOD = Method("zegclip", ZegCLIPMethod, "stages.jobs.methods.zegclip:train_zegclip")
