"""Job of stage ``self_train`` (spec: ``stages.self_train``): ZegCLIP+ST as a Ray Train job.

The student (:func:`student_model`: the initial artifact's ZegCLIP with its weights), the
pseudo-label loss module, the per-worker loop (:func:`self_train_loop`) and the driver side
(:func:`self_train_zegclip`: checks, feed, fit, the artifact and ``pseudo_labels.json``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline import tracking
from pipeline.dag import StageContext
from pipeline.training import fit_stage
from pipeline.training.checkpoint import load_train_state
from stages.common import text_embeddings, vocabularies, warm_start
from stages.feeds import training_feed
from stages.jobs._training import fit_metrics, tensor_count
from stages.jobs.methods.zegclip import build_model, zegclip_optimizer
from stages.self_train import PSEUDO_LABELS_JSON, SELF_TRAINED_GAMMA, ZEGCLIP_CLASS, SelfTrainConfig
from zeroseg.config.clip import as_spec, model_embed_dim
from zeroseg.data.classes import label_ignore_index
from zeroseg.data.split_files import read_transductive
from zeroseg.data.transforms import make_lut
from zeroseg.errors import ConfigError, DataError
from zeroseg.metrics import json_safe
from zeroseg.models import read_segmenter_json, save_segmenter
from zeroseg.models.zegclip import ZegCLIP, resolve_zegclip_config
from zeroseg.self_training import PseudoLabelStats, eligible_pixels, pseudo_label_targets


def student_model(cfg: Mapping[str, Any]) -> Any:
    """The ZegCLIP of ``cfg["clip"]`` / ``cfg["model"]`` (the initial artifact's) with the initial
    artifact's trained weights (``stages.common.warm_start`` from ``cfg["init_from"]``, strict)."""
    seg = build_model(cfg["clip"], cfg["model"])
    warm_start(seg, cfg["init_from"])
    return seg


class SelfTrainLoss(torch.nn.Module):
    """``forward(images, target, eligible)`` -> the loss terms on the pseudo-labelled target, plus
    ``pseudo`` (that target) and ``labelled`` (the pixels that got a pseudo-label): one forward.
    ``text``: the class embeddings ``[C, D]`` (a non-persistent buffer); ``cfg``: the loop config
    (``unseen``, ``ignore_index``, ``threshold``)."""

    def __init__(self, seg: ZegCLIP, text: torch.Tensor, cfg: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = seg
        self.cfg = cfg
        self.register_buffer("text", text, persistent=False)

    def forward(self, images: torch.Tensor, target: torch.Tensor, eligible: torch.Tensor) -> dict[str, Any]:
        cfg = self.cfg
        logits = self.model.label_logits(images, self.text, tuple(target.shape[-2:]))
        pseudo, labelled = pseudo_label_targets(
            logits,
            target,
            cfg["unseen"],
            eligible,
            ignore_index=cfg["ignore_index"],
            threshold=cfg["threshold"],
        )
        terms = self.model.loss_terms(logits, pseudo, ignore_index=cfg["ignore_index"])
        return {**terms, "pseudo": pseudo, "labelled": labelled}


def self_train_loop(loop: Any) -> None:
    """Per-worker loop. ``loop.config``: ``clip`` (``ClipSpec``), ``model`` (``ZegCLIPConfig``), ``init_from`` (artifact URI),
    ``text`` (``[C, D]`` all classes), ``unseen``, ``num_classes``, ``ignore_index``,
    ``unlabeled_index``, ``pixels``, ``threshold`` and the solver entries. Batches: ``image``,
    ``label`` (vocabulary ids / unlabelled / ignore), ``heldout`` (diagnostic only), ``valid``."""
    cfg = loop.config
    seg = student_model(cfg)
    text = torch.tensor(np.asarray(cfg["text"], dtype=np.float32))
    model = loop.prepare(SelfTrainLoss(seg, text, cfg), find_unused_parameters=True)
    opt, sched = zegclip_optimizer(loop, seg)
    stats = PseudoLabelStats(cfg["unseen"])
    loop.restore(
        model,
        opt,
        sched,
        model_state=(seg.trainable_state_dict, seg.load_trainable_state_dict),
        pseudo_labels=stats,
    )
    model.train()
    reduce = loop.world_size > 1 and dist.is_available() and dist.is_initialized()
    for batch in loop.batches("train"):
        target = batch["label"].long()
        eligible = eligible_pixels(
            target,
            cfg["pixels"],
            unlabeled_index=cfg["unlabeled_index"],
            ignore_index=cfg["ignore_index"],
            valid=batch["valid"].bool(),
        )
        with loop.autocast():
            out = model(batch["image"], target, eligible)
        with torch.no_grad():  # the diagnostic: counted, never fed back
            counts = stats.counts(out["pseudo"], out["labelled"], batch["heldout"], cfg["num_classes"])
            if reduce:
                dist.all_reduce(counts)
            stats.add(counts)
        done = loop.step(
            out["loss"],
            images=len(target),
            pseudo_fraction=float(out["labelled"].float().mean()),
            **{k: float(out[k].detach()) for k in ("focal", "dice", "ce") if k in out},
        )
        if done and (loop.global_step % loop.train.log_every == 0 or loop.global_step == loop.train.max_steps):
            s = stats.summary()
            loop.log({f"self_train/pseudo_{k}": s[k] for k in ("miou", "accuracy", "coverage")})


def self_train_zegclip(ctx: StageContext, cfg: SelfTrainConfig) -> dict[str, Any]:
    """Self-train the ``init_from`` ZegCLIP on the transductive split and write the artifact.

    Returns:
        metrics: steps, global batch, lr, final loss terms, ``pseudo_miou`` / ``pseudo_accuracy`` /
        ``pseudo_coverage`` (percent, over the whole run) and ``pseudo_<class>_iou``.

    Raises:
        ConfigError: the split is not transductive (its ``classes.json``); ``augment.crop_size``
            differs from the model's input size; embeddings of another size than the CLIP model's.
        DataError: the initial artifact is not a ZegCLIP; the split has no unseen class.
        LeakageError: a training label holds an unseen class id (the feed's guard).
    """
    splits, init = ctx.inputs["splits"], ctx.inputs["init_from"]
    vocabs = vocabularies(splits)
    vocab = vocabs["train"]
    trans = read_transductive(splits.file("classes.json"))
    if trans is None:
        raise ConfigError(
            f"self_train: build_splits artifact {splits.key[:12]} is not transductive (classes.json); set "
            "build_splits.transductive: true"
        )
    if not vocab.unseen:
        raise DataError(f"self_train: the training vocabulary of {vocab.dataset!r} has no unseen class to pseudo-label")
    doc = read_segmenter_json(init.file("segmenter.json").parent)
    if doc["class"] != ZEGCLIP_CLASS:
        raise DataError(
            f"self_train.init_from: artifact {init.key[:12]} is a {doc['class']} ({doc['method']}); self_train "
            "self-trains a ZegCLIP (train_classifier.method: zegclip)"
        )
    size = list(doc["input"]["size"])
    if list(cfg.augment.crop_size) != size:
        raise ConfigError(
            f"self_train.augment.crop_size {list(cfg.augment.crop_size)} differs from the model's input size {size} "
            "(train_classifier.model.input_size): ZegCLIP trains at one resolution; set both to the same [H, W]"
        )
    clip = as_spec(doc["clip"])  # the initial artifact's config, validated back
    model = resolve_zegclip_config(doc["model"])
    emb = text_embeddings(ctx.inputs["text"], vocabs, ["train"], dim=model_embed_dim(clip), clip_model=clip.model)[
        "train"
    ]
    num_classes = len(vocab.names)
    ignore = label_ignore_index(num_classes)
    unlabeled = int(trans["unlabeled_index"])
    # seen classes keep their vocabulary id (all classes are queries), the unlabelled value itself
    lut = make_lut(
        {**{int(c): int(c) for c in vocab.seen}, unlabeled: unlabeled}, ignore_index=ignore, source_classes=num_classes
    )
    feed = training_feed(splits, cfg.augment, cfg.train.seed, block_rows=cfg.block_rows, lut=lut, heldout=True)
    loop_config = {
        "clip": clip,
        "model": model,
        "init_from": init.uri,
        "text": emb.tolist(),
        "unseen": [int(u) for u in vocab.unseen],
        "num_classes": num_classes,
        "ignore_index": ignore,
        "unlabeled_index": unlabeled,
        "pixels": cfg.pixels,
        "threshold": cfg.threshold,
        **cfg.solver(),
    }
    result = fit_stage(ctx, self_train_loop, loop_config, {"train": feed.dataset}, cfg.scaling, cfg.train)
    seg = build_model(clip, model)
    seg.load_trainable_state_dict(result.model_state(), source=result.checkpoint_uri)
    trainable = seg.trainable_state_dict()
    out = Path(ctx.output_dir)
    extra = {
        "default_gamma": SELF_TRAINED_GAMMA,
        "self_training": {
            "pixels": cfg.pixels,
            "threshold": cfg.threshold,
            "init_from": init.key,
            "steps": result.steps,
        },
    }
    save_segmenter(out, seg, clip, doc["method"], trainable, extra=extra)
    stats = PseudoLabelStats(vocab.unseen)
    stats.load_state_dict(load_train_state(result.checkpoint_dir)["objects"]["pseudo_labels"])
    summary = stats.summary([vocab.names[u] for u in vocab.unseen])
    (out / PSEUDO_LABELS_JSON).write_text(
        json.dumps(
            json_safe(
                {
                    **summary,
                    "pixels_mode": cfg.pixels,
                    "threshold": cfg.threshold,
                    "steps": result.steps,
                    "what": "agreement of the online pseudo-labels with the held-out unseen ground truth of the "
                    "training images, summed over every self-training iteration and worker (percent; IoU over the "
                    "pixels whose held-out label is unseen); a diagnostic that never feeds back into training",
                }
            ),
            indent=1,
        )
        + "\n"
    )
    per_class = {f"pseudo_iou/{r['name']}": r["iou"] for r in summary["per_class"] if r["iou"] is not None}
    if ctx.mlflow_run_id and per_class:
        tracking.log_metrics(per_class, run_id=ctx.mlflow_run_id)
    return fit_metrics(
        result,
        {"head": cfg.head_lr_mult},
        precision=result.precision,
        trainable_params=tensor_count(trainable),
        pseudo_miou=summary["miou"],
        pseudo_accuracy=summary["accuracy"],
        pseudo_coverage=summary["coverage"],
    )


__all__ = ["SelfTrainLoss", "self_train_loop", "self_train_zegclip", "student_model"]
