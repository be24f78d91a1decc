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

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipeline.config import Runtime
from pipeline.dag import StageConfig, StageContext
from pipeline.training import ScalingSection, TrainSection
from stages.common import seen_rows, text_embeddings, vocabularies
from stages.methods import Method
from zeroseg.config.clip import ClipSpec, model_embed_dim
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
        """The loop config entries of :func:`zegclip_optimizer`."""
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


def _loss_module(segmenter: Any, text: Any, ignore_index: int = 255) -> Any:
    """A module whose ``forward(images, target)`` returns ZegCLIP's training loss terms (DDP
    synchronises gradients only through ``forward``); ``text``: the seen-class embeddings;
    ``ignore_index``: the training labels' ignore (255, or 65535 above 255 seen classes)."""
    import torch

    class ZegCLIPLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = segmenter
            self.register_buffer("text", text, persistent=False)

        def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.model.loss(images, target, self.text, ignore_index=ignore_index)

    return ZegCLIPLoss()


def build_model(clip_spec: dict[str, Any], model_cfg: dict[str, Any]) -> Any:
    """ZegCLIP on a freshly loaded CLIP (``zeroseg.models.clip.load_clip``).

    Raises:
        ConfigError: a bad CLIP spec or model config (``load_clip``, ``ZegCLIP``).
    """
    from zeroseg.models.clip import as_spec, load_clip
    from zeroseg.models.zegclip import ZegCLIP

    return ZegCLIP(load_clip(as_spec(clip_spec)), model_cfg)


def zegclip_train_loop(loop: Any) -> None:
    """Per-worker loop (``pipeline.training``): AdamW, poly LR with linear warm-up.

    ``loop.config``: ``clip`` (ClipSpec dict), ``model`` (ZegCLIP cfg), ``seen_text``
    (``[S, D]`` seen-class text embeddings, L2-normalised), ``weight_decay``, ``head_lr_mult``,
    ``warmup_steps``, ``poly_power``. Batches: ``image`` float32 ``[B, 3, H, W]``, ``label``
    uint8 ``[B, H, W]`` in seen training ids with 255 ignore (int32 with ``ignore_index`` 65535
    above 255 seen classes; ``loop.config["ignore_index"]``, default 255). Checkpoints hold the trainable
    weights only (prompts + head), loaded back strictly.
    """
    import torch

    cfg = loop.config
    seg = build_model(cfg["clip"], cfg["model"])
    text = torch.tensor(np.asarray(cfg["seen_text"], dtype=np.float32))
    # the last decoder layer's FFN feeds no mask (masks are its attention logits, Eq. 2)
    model = loop.prepare(_loss_module(seg, text, cfg.get("ignore_index", 255)), find_unused_parameters=True)
    opt, sched = zegclip_optimizer(loop, seg)
    loop.restore(model, opt, sched, model_state=(seg.trainable_state_dict, seg.load_trainable_state_dict))
    model.train()
    for batch in loop.batches("train"):  # micro-batches, tensors already on loop.device
        images = batch["image"]
        target = batch["label"].long()
        with loop.autocast():
            out = model(images, target)
        loop.step(out["loss"], images=len(images), **{k: float(v.detach()) for k, v in out.items() if k != "loss"})


def zegclip_optimizer(loop: Any, seg: Any) -> tuple[Any, Any]:
    """ZegCLIP's released optimiser and schedule for ``seg`` in a worker: AdamW over
    ``seg.optimizer_param_groups`` at ``loop.lr x head_lr_mult`` and the poly schedule with linear
    warm-up (``zegclip_lr_factor``) over ``schedule_steps`` (default ``loop.train.max_steps``), from ``loop.config``'s
    :meth:`ZegCLIPSolver.solver` entries. Returns ``(optimizer, scheduler)``."""
    import torch

    from zeroseg.models.zegclip import zegclip_lr_factor

    cfg = loop.config
    groups = seg.optimizer_param_groups(cfg["weight_decay"])
    for g in groups:  # ZegCLIP's released config: lr_mult 10 for the prompts and the head
        g["lr"] = loop.lr * cfg["head_lr_mult"]
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])  # every group sets its lr
    base = loop.lr * cfg["head_lr_mult"]
    sched = torch.optim.lr_scheduler.LambdaLR(  # stepped once per optimizer step by loop.step
        opt,
        functools.partial(
            zegclip_lr_factor,
            max_steps=int(cfg.get("schedule_steps") or loop.train.max_steps),
            base_lr=base,
            min_lr=cfg["min_lr"],
            power=cfg["poly_power"],
            warmup_steps=cfg["warmup_steps"],
            warmup_ratio=cfg["warmup_ratio"],
        ),
    )
    return opt, sched


def train_zegclip(ctx: StageContext, cfg: ZegCLIPMethod) -> dict[str, Any]:
    """Train ZegCLIP for ``ctx`` and save the segmenter artifact into ``ctx.output_dir``.

    Returns:
        metrics: steps, global batch, base and effective (x ``head_lr_mult``) learning rate, final
        loss terms, trainable parameter count.

    Raises:
        DataError: no seen class (``stages.common.seen_rows``) or a vocabulary without embeddings.
        TrainingDataError: the training feed gives a worker no full batch.
        ConfigError: text embeddings of another dimension than the CLIP model's; a scaling
            section that leaves no CPU for the data feed.
        NonFiniteLossError: the loss became NaN/inf (step and last good checkpoint named).
        CheckpointMismatchError: the checkpoint being resumed does not fit the model.
    """
    import torch

    from pipeline.training import fit_stage
    from stages.feeds import leakage_guard, train_dataset
    from zeroseg.data.transforms import lut_ignore_index, make_lut
    from zeroseg.models import save_segmenter

    splits = ctx.inputs["splits"]
    vocabs = vocabularies(splits)
    train_vocab = vocabs["train"]
    emb = text_embeddings(
        ctx.inputs["text"], vocabs, ["train"], dim=model_embed_dim(cfg.clip), clip_model=cfg.clip.model
    )["train"]
    seen_text = seen_rows(train_vocab, emb)  # before fit: a worker would retry the error
    model_cfg = cfg.model.model_dump(mode="json")
    # every other id (unseen included) -> ignore: 255, or 65535 above 255 seen classes
    lut = make_lut({int(c): i for i, c in enumerate(train_vocab.seen)}, source_classes=len(train_vocab.names))
    ds = train_dataset(
        splits, lut, cfg.augment, cfg.train.seed, block_rows=cfg.block_rows, guard=leakage_guard(splits, lut)
    )
    spec = cfg.clip.model_dump(mode="json")
    loop_config = {
        "ignore_index": lut_ignore_index(lut),
        "clip": spec,
        "model": model_cfg,
        "seen_text": seen_text.tolist(),
        **cfg.solver(),
    }
    result = fit_stage(ctx, zegclip_train_loop, loop_config, {"train": ds}, cfg.scaling, cfg.train)
    seg = build_model(spec, model_cfg)
    seg.load_trainable_state_dict(result.model_state(), source=result.checkpoint_uri)
    trainable = seg.trainable_state_dict()
    save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "zegclip", trainable, extra={"default_gamma": INDUCTIVE_GAMMA})
    return {
        "steps": result.steps,
        "global_batch_size": result.global_batch_size,
        "base_lr": result.effective_lr,
        "effective_lr": result.effective_lr * cfg.head_lr_mult,
        "resumed_from_step": result.resumed_from_step,
        "precision": result.precision,
        "trainable_params": int(sum(v.numel() for v in trainable.values() if torch.is_tensor(v))),
        **{f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }


METHOD = Method("zegclip", ZegCLIPMethod, train_zegclip)
