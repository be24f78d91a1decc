"""Job of ``train_classifier.method: deop`` (spec: ``stages.methods.deop``): DeOP trained as a Ray
Train job on top of a frozen proposal model.

The checks of the bound proposals against the config (:func:`check_proposals`), the training
loss module, the per-worker loop (:func:`deop_train_loop`) and the driver side
(:func:`train_deop`: feed, fit, segmenter artifact).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dag import StageContext
from pipeline.training import fit_stage
from pipeline.uri import join, local_copy
from stages.common import seen_rows, vocabularies
from stages.feeds import training_feed
from stages.jobs._training import fit_metrics, supervised_steps, tensor_count
from stages.jobs.methods._proposals import bound_proposals, check_seen
from stages.methods.deop import DeOPMethod
from zeroseg.config.clip import ClipSpec, model_embed_dim
from zeroseg.config.deop import DeOPConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.models import save_segmenter
from zeroseg.models.clip import as_spec, load_clip
from zeroseg.models.deop import DeOP, check_proposals_fit
from zeroseg.models.maskformer import WEIGHTS_PT, read_proposal_weights
from zeroseg.optim import deop_optimizer


def check_proposals(doc: dict[str, Any], cfg: DeOPMethod, where: str = "proposals") -> None:
    """Refuse, before any training, a proposal model this DeOP config cannot use: another query
    count than ``model.num_queries`` or another embedding size than the CLIP model's (both named);
    the heatmap decoder's ``model.width`` other than the CLIP embedding size; ``augment.mean`` /
    ``std`` set to something else than the proposals' normalisation; crops that are not
    ``model.input_size``.

    Raises:
        DataError: the proposals do not fit (``zeroseg.models.deop.check_proposals_fit``).
        ConfigError: the config does not fit the proposals or the CLIP model.
    """
    dim = model_embed_dim(cfg.clip)
    check_proposals_fit(doc, cfg.model, dim, where=where)
    if cfg.model.decoder == "heatmap" and cfg.model.width != dim:
        raise ConfigError(
            f"train_classifier.model.width {cfg.model.width} must equal the CLIP embedding size {dim} of "
            f"{cfg.clip.model!r}: the heatmap output layer pools CLIP features channel-wise (released: 512 for ViT-B/16)"
        )
    try:
        mean, std = tuple(doc["input"]["mean"]), tuple(doc["input"]["std"])
    except (KeyError, TypeError) as e:
        raise DataError(f"{where}: proposals.json has no input.mean / input.std ({e})") from None
    for k, want in (("mean", mean), ("std", std)):
        if k in cfg.augment.model_fields_set and tuple(getattr(cfg.augment, k)) != tuple(float(v) for v in want):
            raise ConfigError(
                f"train_classifier.augment.{k} {list(getattr(cfg.augment, k))} differs from the proposal model's "
                f"{list(want)}: DeOP normalises images as its proposal network does; remove augment.{k}"
            )
    if tuple(cfg.augment.crop_size) != tuple(cfg.model.input_size):
        raise ConfigError(
            f"train_classifier.augment.crop_size {list(cfg.augment.crop_size)} differs from model.input_size "
            f"{list(cfg.model.input_size)}; set both to the same [H, W]"
        )


def build_model(
    clip_spec: ClipSpec | Mapping[str, Any], model_cfg: DeOPConfig | Mapping[str, Any], proposals: Mapping[str, Any]
) -> DeOP:
    """DeOP on a freshly loaded CLIP, for the proposals document ``proposals`` (``proposals.json``).

    Raises:
        ConfigError / DataError: see ``zeroseg.models.deop.DeOP``.
    """
    return DeOP(load_clip(as_spec(clip_spec)), model_cfg, proposals)


def load_proposals(seg: Any, proposals_uri: str) -> None:
    """Strictly load the proposal model's ``weights.pt`` (read where this runs) into ``seg``.

    Raises:
        DataError: the file is missing or unreadable; WeightsMismatchError: it does not fit.
    """
    name = join(proposals_uri, WEIGHTS_PT)
    with local_copy(proposals_uri) as d:
        seg.load_proposal_weights(read_proposal_weights(Path(d) / WEIGHTS_PT, name=name), source=name)


class DeOPLoss(torch.nn.Module):
    """A module whose ``forward(images, target)`` returns DeOP's loss terms (DDP synchronises
    gradients only through ``forward``); the seen-class names are encoded inside, every step, so
    the text context trains."""

    def __init__(self, segmenter: DeOP, names: list[str], ignore_index: int = 255) -> None:
        super().__init__()
        self.model = segmenter
        self.names = list(names)
        self.ignore_index = ignore_index

    def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(images, target, self.names, ignore_index=self.ignore_index)


def deop_train_loop(loop: Any) -> None:
    """Per-worker loop (``pipeline.training``): AdamW, poly LR (no warm-up).

    ``loop.config``: ``clip`` (:class:`ClipSpec`), ``model`` (:class:`DeOPConfig`), ``proposals``
    (the proposals artifact's ``proposals.json`` content), ``proposals_uri``, ``seen_names`` (the
    seen classes' prompt names in seen order), ``weight_decay``, ``poly_power``. Batches: ``image`` float32 ``[B, 3, H, W]``, ``label`` uint8
    ``[B, H, W]`` in seen training ids with 255 ignore (int32 with ``ignore_index`` 65535 above 255
    seen classes; ``loop.config["ignore_index"]``, default 255). Checkpoints hold the learned tensors only.
    """
    cfg = loop.config
    seg = build_model(cfg["clip"], cfg["model"], cfg["proposals"])
    load_proposals(seg, cfg["proposals_uri"])
    model = loop.prepare(DeOPLoss(seg, cfg["seen_names"], cfg.get("ignore_index", 255)))
    opt, sched = deop_optimizer(  # the scheduler is stepped once per optimizer step by loop.step
        seg, loop.lr, weight_decay=cfg["weight_decay"], max_steps=loop.train.max_steps, power=cfg["poly_power"]
    )
    loop.restore(model, opt, sched, model_state=(seg.learned_state_dict, seg.load_learned_state_dict))
    supervised_steps(loop, model)


def train_deop(ctx: StageContext, cfg: DeOPMethod) -> dict[str, Any]:
    """Train DeOP for ``ctx`` and save the segmenter artifact into ``ctx.output_dir``.

    Returns:
        metrics (``stages.jobs._training.fit_metrics``): steps, global batch, ``base_lr`` (every
        learned parameter's lr), precision, learned parameter count, the proposals' query count,
        final loss terms.

    Raises:
        DataError: no seen class; a proposals artifact that does not fit (query count or
            embedding size, both named), trained on other seen classes than this config's
            (``classes.json``), or whose weights do not load.
        ConfigError: see :func:`check_proposals`; a scaling section that leaves no CPU for the feed.
        TrainingDataError / NonFiniteLossError / CheckpointMismatchError: from the training package.
    """
    splits = ctx.inputs["splits"]
    proposals = ctx.inputs["proposals"]
    train_vocab = vocabularies(splits)["train"]
    seen_rows(train_vocab, np.zeros((len(train_vocab.names), 1)))  # the one "no seen class" error
    doc, where = bound_proposals(proposals)
    check_proposals(doc, cfg, where=where)  # before fit: workers would retry
    check_seen(doc, train_vocab.seen, where)
    seen_names = [train_vocab.prompt_names[i] for i in train_vocab.seen]
    augment = cfg.augment.model_copy(
        update={
            "mean": tuple(float(v) for v in doc["input"]["mean"]),
            "std": tuple(float(v) for v in doc["input"]["std"]),
        }
    )
    feed = training_feed(splits, augment, cfg.train.seed, block_rows=cfg.block_rows)  # seen classes only
    loop_config = {
        "ignore_index": feed.ignore_index,
        "clip": cfg.clip,
        "model": cfg.model,
        "proposals": doc,
        "proposals_uri": proposals.uri,
        "seen_names": seen_names,
        "weight_decay": cfg.weight_decay,
        "poly_power": cfg.poly_power,
    }
    result = fit_stage(ctx, deop_train_loop, loop_config, {"train": feed.dataset}, cfg.scaling, cfg.train)
    seg = build_model(cfg.clip, cfg.model, doc)
    load_proposals(seg, proposals.uri)
    seg.load_learned_state_dict(result.model_state(), source=result.checkpoint_uri)
    save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "deop", seg.trainable_state_dict())
    learned = seg.learned_state_dict()
    return fit_metrics(
        result,
        precision=result.precision,
        learned_params=tensor_count(learned),
        proposal_queries=int(doc["num_queries"]),
    )


__all__ = ["DeOPLoss", "build_model", "check_proposals", "deop_train_loop", "load_proposals", "train_deop"]
