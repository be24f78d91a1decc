"""Job of ``train_classifier.method: zegclip`` (spec: ``stages.methods.zegclip``): ZegCLIP trained
as a Ray Train job.

The training loss module, the per-worker loop (:func:`zegclip_train_loop`), the released
optimiser and schedule (:func:`zegclip_optimizer`, shared with ``self_train``) and the driver
side (:func:`train_zegclip`: feed, fit, segmenter artifact).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dag import StageContext
from pipeline.training import fit_stage
from stages.common import seen_rows, text_embeddings, vocabularies
from stages.feeds import training_feed
from stages.jobs._training import fit_metrics, supervised_steps, tensor_count
from stages.methods.zegclip import INDUCTIVE_GAMMA, ZegCLIPMethod
from zeroseg import optim
from zeroseg.config.clip import ClipSpec, model_embed_dim
from zeroseg.config.zegclip import ZegCLIPConfig
from zeroseg.models import save_segmenter
from zeroseg.models.clip import as_spec, load_clip
from zeroseg.models.zegclip import ZegCLIP


class ZegCLIPLoss(torch.nn.Module):
    """A module whose ``forward(images, target)`` returns ZegCLIP's training loss terms (DDP
    synchronises gradients only through ``forward``); ``text``: the seen-class embeddings
    ``[S, D]`` (a non-persistent buffer); ``ignore_index``: the training labels' ignore (255, or
    65535 above 255 seen classes)."""

    def __init__(self, segmenter: ZegCLIP, text: torch.Tensor, ignore_index: int = 255) -> None:
        super().__init__()
        self.model = segmenter
        self.ignore_index = ignore_index
        self.register_buffer("text", text, persistent=False)

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(images, target, self.text, ignore_index=self.ignore_index)


def build_model(clip: ClipSpec | Mapping[str, Any], model: ZegCLIPConfig | Mapping[str, Any]) -> ZegCLIP:
    """ZegCLIP of the validated ``model`` config on a freshly loaded CLIP ``clip``
    (``zeroseg.models.clip.load_clip``); a mapping (a ``segmenter.json`` entry) is validated.

    Raises:
        ConfigError: a bad CLIP spec or model config (``load_clip``, ``ZegCLIP``).
    """
    return ZegCLIP(load_clip(as_spec(clip)), model)


def zegclip_train_loop(loop: Any) -> None:
    """Per-worker loop (``pipeline.training``): AdamW, poly LR with linear warm-up.

    ``loop.config``: ``clip`` (:class:`ClipSpec`), ``model`` (:class:`ZegCLIPConfig`), ``seen_text``
    (``[S, D]`` seen-class text embeddings, L2-normalised), ``weight_decay``, ``head_lr_mult``,
    ``warmup_steps``, ``poly_power``. Batches: ``image`` float32 ``[B, 3, H, W]``, ``label``
    uint8 ``[B, H, W]`` in seen training ids with 255 ignore (int32 with ``ignore_index`` 65535
    above 255 seen classes; ``loop.config["ignore_index"]``, default 255). Checkpoints hold the trainable
    weights only (prompts + head), loaded back strictly.
    """
    cfg = loop.config
    seg = build_model(cfg["clip"], cfg["model"])
    text = torch.tensor(np.asarray(cfg["seen_text"], dtype=np.float32))
    # the last decoder layer's FFN feeds no mask (masks are its attention logits, Eq. 2)
    model = loop.prepare(ZegCLIPLoss(seg, text, cfg.get("ignore_index", 255)), find_unused_parameters=True)
    opt, sched = zegclip_optimizer(loop, seg)
    loop.restore(model, opt, sched, model_state=(seg.trainable_state_dict, seg.load_trainable_state_dict))
    supervised_steps(loop, model)


def zegclip_optimizer(loop: Any, seg: Any) -> tuple[Any, Any]:
    """ZegCLIP's released optimiser and schedule for ``seg`` in a worker (``zeroseg.optim.zegclip_optimizer``:
    AdamW at ``loop.lr x head_lr_mult``, poly with linear warm-up) over ``schedule_steps`` (default
    ``loop.train.max_steps``), from ``loop.config``'s :meth:`ZegCLIPSolver.solver` entries.
    Returns ``(optimizer, scheduler)``."""
    cfg = loop.config
    return optim.zegclip_optimizer(  # the scheduler is stepped once per optimizer step by loop.step
        seg,
        loop.lr,
        head_lr_mult=cfg["head_lr_mult"],
        weight_decay=cfg["weight_decay"],
        max_steps=int(cfg.get("schedule_steps") or loop.train.max_steps),
        min_lr=cfg["min_lr"],
        power=cfg["poly_power"],
        warmup_steps=cfg["warmup_steps"],
        warmup_ratio=cfg["warmup_ratio"],
    )


def train_zegclip(ctx: StageContext, cfg: ZegCLIPMethod) -> dict[str, Any]:
    """Train ZegCLIP for ``ctx`` and save the segmenter artifact into ``ctx.output_dir``.

    Returns:
        metrics (``stages.jobs._training.fit_metrics``): steps, global batch, ``base_lr`` and
        ``head_lr`` (x ``head_lr_mult``: every trained parameter's), precision, trainable
        parameter count, final loss terms.

    Raises:
        DataError: no seen class (``stages.common.seen_rows``) or a vocabulary without embeddings.
        TrainingDataError: the training feed gives a worker no full batch.
        ConfigError: text embeddings of another dimension than the CLIP model's; a scaling
            section that leaves no CPU for the data feed.
        NonFiniteLossError: the loss became NaN/inf (step and last good checkpoint named).
        CheckpointMismatchError: the checkpoint being resumed does not fit the model.
    """
    splits = ctx.inputs["splits"]
    vocabs = vocabularies(splits)
    train_vocab = vocabs["train"]
    emb = text_embeddings(
        ctx.inputs["text"], vocabs, ["train"], dim=model_embed_dim(cfg.clip), clip_model=cfg.clip.model
    )["train"]
    seen_text = seen_rows(train_vocab, emb)  # before fit: a worker would retry the error
    feed = training_feed(splits, cfg.augment, cfg.train.seed, block_rows=cfg.block_rows)  # seen classes only
    loop_config = {
        "ignore_index": feed.ignore_index,
        "clip": cfg.clip,
        "model": cfg.model,
        "seen_text": seen_text.tolist(),
        **cfg.solver(),
    }
    result = fit_stage(ctx, zegclip_train_loop, loop_config, {"train": feed.dataset}, cfg.scaling, cfg.train)
    seg = build_model(cfg.clip, cfg.model)
    seg.load_trainable_state_dict(result.model_state(), source=result.checkpoint_uri)
    trainable = seg.trainable_state_dict()
    save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "zegclip", trainable, extra={"default_gamma": INDUCTIVE_GAMMA})
    return fit_metrics(
        result, {"head": cfg.head_lr_mult}, precision=result.precision, trainable_params=tensor_count(trainable)
    )


__all__ = ["ZegCLIPLoss", "build_model", "train_zegclip", "zegclip_optimizer", "zegclip_train_loop"]
