"""Stage ``pretrain_proposals``: the mask proposal model of the decoupled methods (ZegFormer,
DeOP), a MaskFormer trained on the seen classes as a Ray Train job, written as the *proposals
artifact* (``proposals.json``, ``weights.pt``, ``metrics.json``; ``zeroseg.models.maskformer``).

Reads build_splits (``splits``: manifests, ``classes.json``) and, for the ``text`` class head,
embed_text (``text``: the seen-class rows of ``embeddings/train.npy``)::

    manifests/train.parquet -> stages.feeds.train_dataset (Ray Data: decode, remap to seen
      training ids with every other id -> 255, augment, normalise with the backbone's mean/std)
      -> Ray Train workers (pipeline.training.fit): MaskFormer forward (deep supervision) ->
         per image semantic_to_targets (one binary mask per seen class present) -> Hungarian
         matching + SetCriterion (CE with no-object weight, focal, dice; zeroseg.losses)
      -> proposals artifact (zeroseg.models.maskformer.save_proposals)
    manifests/<recall set>.parquet -> pipeline.inference.reduce(ProposalPredictor,
      ProposalRecallEvaluator) -> recall at IoU 0.3 / 0.5 of seen, unseen and all segments

Training follows the released ZegFormer solver (dingjiansw101/ZegFormer ``train_net.py`` and
``configs/coco-stuff/Base-COCOStuff-171.yaml``; ``../shared/papers/released-code.md`` 1.1):
AdamW, lr 1e-4 at batch 32, weight decay 1e-4 (none on normalisation layers and embeddings:
``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` 0), lr x 0.1 for every parameter of a module whose
name contains ``backbone``, detectron2's ``WarmupPolyLR`` (power 0.9, no warm-up), the gradients'
total norm over the whole model clipped to 0.01 (``CLIP_TYPE: full_model``; here
``train.clip_grad_norm``, over every trained parameter), 60k iterations for COCO-Stuff (10k VOC).
Unseen pixels are 255 (ignored: no target mask covers them) and images are kept, as the
released ``prepare_coco_stuff_sem_seg_seen.py``. With ``class_head: objectness`` every seen
segment has class 0 (one "object" class plus no-object: the papers' class-agnostic grouping).

Wiring only; the network is ``zeroseg.models.maskformer``, the losses ``zeroseg.losses``, the
recall ``zeroseg.evaluation.ProposalRecallEvaluator``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator, model_validator
from rich.table import Table

from pipeline.config import Runtime
from pipeline.dag import Input, StageConfig, nearest
from pipeline.training import ScalingSection, TrainSection
from stages.common import Device, JobStage, random_weights_notice
from zeroseg.config.clip import ClipSpec
from zeroseg.config.proposals import ProposalConfig
from zeroseg.data.transforms import CLIP_MEAN, CLIP_STD, AugmentConfig
from zeroseg.errors import ConfigError

#: ImageNet pixel statistics for images in [0, 1] (torchvision; MaskFormer's PIXEL_MEAN/STD
#: 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 divided by 255): the ResNet backbones' input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: The held-out set of the training dataset (build_splits ``val_fraction``): the default recall set.
HELD_OUT = "val"


def backbone_normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` in ``[0, 1]`` pixel units that the backbone expects: ImageNet's for the
    ResNets, OpenAI CLIP's for ``clip`` (a CLIP model with other statistics: set
    ``augment.mean`` / ``std`` to them; the stage checks them against the built model)."""
    return (CLIP_MEAN, CLIP_STD) if backbone == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def _recall_cells(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {group: {threshold percent: value}}}`` of the recall metrics in ``metrics``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k, v in metrics.items():
        m = re.fullmatch(r"(.+)/recall(\d+)_(seen|unseen|all)", k)
        if m:
            out.setdefault(m.group(1), {}).setdefault(m.group(3), {})[m.group(2)] = v
    return out


def recall_key(threshold: float, group: str) -> str:
    """The metric name of one recall value: ``recall30_seen`` for IoU 0.3 (MLflow names allow no ``@``)."""
    return f"recall{round(threshold * 100):d}_{group}"


class PretrainProposalsConfig(StageConfig):
    """``pretrain_proposals`` config section.

    ``clip``: the shared CLIP spec (injected from the top-level ``clip:``): the text embeddings'
    dimension for ``model.class_head: text`` and the image tower for ``model.backbone: clip``;
    otherwise unused and dropped (None), so that it stays out of the key. A missing backbone
    weights file fails at plan time (``ProposalConfig.key_payload``). ``model``: :class:`zeroseg.config.proposals.ProposalConfig`. ``train`` /
    ``scaling``: the training package's sections (defaults: the released COCO-Stuff schedule,
    60k steps at batch 32, lr 1e-4, clip 0.01). ``augment``: the training crops; its ``mean`` /
    ``std`` default to the backbone's (ImageNet for ResNets, CLIP's for ``clip``) and may not
    differ from them (the model normalises with them at inference). ``backbone_lr_mult``: lr
    multiplier of the backbone's parameters (released 0.1). ``weight_decay`` (released 1e-4) and
    ``weight_decay_norm`` (normalisation layers and embeddings; released 0). ``poly_power``,
    ``warmup_steps``, ``warmup_factor``: detectron2's ``WarmupPolyLR`` (released 0.9, 0, 1.0).

    Recall pass (after training): ``recall_sets`` (eval sets of ``classes.json``; default the
    held-out set ``val`` when build_splits made one, else every eval set; ``[]`` skips the pass),
    ``recall_max_images`` (first N images per set), ``recall_ious`` (IoU thresholds, DeOP's 0.3 and
    0.5). Runtime (not in the key): ``block_rows`` (images per Ray Data decode task),
    ``recall_batch_size``, ``recall_device`` (``auto``: cuda when the cluster has GPUs),
    ``recall_concurrency`` (inference actors).
    """

    clip: ClipSpec | None = None
    model: ProposalConfig = ProposalConfig()
    train: TrainSection = TrainSection(
        max_steps=60000, batch_size=32, lr=1e-4, reference_batch_size=32, clip_grad_norm=0.01
    )
    scaling: ScalingSection = ScalingSection()
    # released COCO-Stuff: short side drawn from 0.5..1.5 x 640 (max 2560), 640 x 640 crops, flip
    augment: AugmentConfig = AugmentConfig(crop_size=(640, 640), scale=(2560, 640), ratio_range=(0.5, 1.5))
    backbone_lr_mult: float = Field(0.1, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_norm: float = Field(0.0, ge=0)
    poly_power: float = Field(0.9, ge=0)
    warmup_steps: int = Field(0, ge=0)
    warmup_factor: float = Field(1.0, gt=0, le=1)
    recall_sets: list[str] | None = None
    recall_max_images: int | None = Field(None, ge=1)
    recall_ious: list[float] = [0.3, 0.5]
    block_rows: Annotated[int, Runtime(why="decode task size")] = Field(32, gt=0)
    recall_batch_size: Annotated[int, Runtime(why="inference batch size")] = Field(4, ge=1)
    recall_device: Device = "auto"
    recall_concurrency: Annotated[int, Runtime(why="concurrency")] = Field(1, ge=1)

    @field_validator("recall_ious")
    @classmethod
    def _ious(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < t <= 1.0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"recall_ious must be distinct IoU thresholds in (0, 1], got {v}")
        if len({round(t * 100) for t in v}) != len(v):
            raise ValueError(f"recall_ious {v}: two thresholds share a percent (metric names use whole percents)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PretrainProposalsConfig:
        m = self.model
        if not uses_clip(m):
            self.clip = None  # injected from the shared section but unused: it stays out of the key
        elif self.clip is None:
            need = (
                "model.class_head text (the text embeddings' size)" if m.class_head == "text" else "model.backbone clip"
            )
            raise ValueError(
                f"pretrain_proposals: {need} needs a CLIP spec: add the top-level clip: section "
                "(or pretrain_proposals.clip)"
            )
        bad = [s for s in self.augment.crop_size if s % m.size_divisibility]
        if bad:
            raise ValueError(
                f"pretrain_proposals: augment.crop_size {list(self.augment.crop_size)} must be a multiple of "
                f"model.size_divisibility {m.size_divisibility} (the crop is the model's input size)"
            )
        mean, std = backbone_normalisation(m.backbone)
        given = {k for k in ("mean", "std") if k in self.augment.model_fields_set}
        if not given:
            self.augment = self.augment.model_copy(update={"mean": mean, "std": std})
        elif m.backbone != "clip" and not (np.allclose(self.augment.mean, mean) and np.allclose(self.augment.std, std)):
            raise ValueError(
                f"pretrain_proposals: augment.mean/std {list(self.augment.mean)} / {list(self.augment.std)} differ "
                f"from the {m.backbone} backbone's normalisation {list(mean)} / {list(std)} (ImageNet), which the "
                "model uses at inference; remove augment.mean and augment.std"
            )
        return self


def uses_clip(model: ProposalConfig) -> bool:
    """Whether the proposal model needs the CLIP spec: the text head (its embedding size) or the
    CLIP backbone."""
    return model.class_head == "text" or model.backbone == "clip"


class PretrainProposals(JobStage):
    """The MaskFormer proposal model of the decoupled methods (see module docstring)."""

    job = "stages.jobs.pretrain_proposals:pretrain_proposals"

    name = "pretrain_proposals"
    Config = PretrainProposalsConfig
    TEXT = Input(
        ("embed_text",),
        doc="seen-class text embeddings for model.class_head text (the linear and objectness heads need none)",
    )
    INPUTS = {
        "splits": Input(("build_splits",), doc="manifests and classes.json"),
        "text": TEXT,
    }
    shared = ("clip",)

    def inputs(self, config: PretrainProposalsConfig) -> dict[str, Input]:
        """``splits``, plus ``text`` (required) for the text head only: a head that reads no
        embeddings does not depend on them (their key stays out of this stage's)."""
        out = {"splits": self.INPUTS["splits"]}
        if config.model.class_head == "text":
            out["text"] = self.TEXT
        return out

    def terminal(self, config: PretrainProposalsConfig) -> bool:
        """With a recall pass (``recall_sets`` not ``[]``) the proposal model's recall is a result
        of its own (``configs/sample_proposals.yaml``); without one only a reader makes it useful."""
        return config.recall_sets != []

    def notices(self, config: PretrainProposalsConfig) -> list[str]:
        m = config.model
        out = random_weights_notice(config.clip) if uses_clip(m) else []
        if m.backbone != "clip" and m.backbone_weights is None:
            out.append(
                f"pretrain_proposals: the {m.backbone} backbone starts from random weights; set "
                "pretrain_proposals.model.backbone_weights (IMAGENET1K_V1, as the papers, or a .pth file) for real results"
            )
        return out

    @staticmethod
    def _recall_sets(cfg: PretrainProposalsConfig, evals: list[str]) -> list[str]:
        """The eval sets the recall pass reads (see the config docstring).

        Raises:
            ConfigError: a recall set that ``classes.json`` does not have.
        """
        if cfg.recall_sets is None:
            return [HELD_OUT] if HELD_OUT in evals else evals
        for n in cfg.recall_sets:
            if n not in evals:
                raise ConfigError(
                    f"pretrain_proposals.recall_sets: unknown eval set {n!r}{nearest(n, evals)} "
                    f"(eval sets of classes.json: {', '.join(evals) or 'none'})"
                )
        return list(cfg.recall_sets)

    def note(self, metrics: Mapping[str, Any]) -> str:
        """``steps=N, <set> R30/50 seen a/b unseen c/d`` (recall at each threshold)."""
        parts = [f"steps={int(metrics['steps'])}"] if "steps" in metrics else []
        cells = _recall_cells(metrics)
        for name, by in cells.items():
            ts = sorted({t for g in by.values() for t in g}, key=int)
            vals = {g: "/".join(f"{by[g][t]:.2f}" if t in by[g] else "-" for t in ts) for g in ("seen", "unseen")}
            parts.append(f"{name} R{'/'.join(ts)} seen {vals['seen']} unseen {vals['unseen']}")
        return ", ".join(parts)

    def summary(self, metrics: Mapping[str, Any]) -> list[Any]:
        """The recall table: rows ``recall<IoU%>``, columns ``<set> seen / unseen / all``."""
        rc = _recall_cells(metrics)
        if not rc:
            return []
        cols = [(name, g) for name, by in rc.items() for g in by]
        ts = sorted({t for by in rc.values() for d in by.values() for t in d}, key=int)
        table = Table(title="proposal recall (GT segments matched at IoU >= t)", title_justify="left")
        table.add_column("metric", no_wrap=True)
        for name, g in cols:
            table.add_column(f"{name} {g}", justify="right", no_wrap=True)
        for t in ts:
            table.add_row(f"recall{t}", *[f"{rc[n][g][t]:.3f}" if t in rc[n][g] else "-" for n, g in cols])
        return [table]


__all__ = [
    "HELD_OUT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PretrainProposals",
    "PretrainProposalsConfig",
    "backbone_normalisation",
    "recall_key",
    "uses_clip",
]
