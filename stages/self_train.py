"""Stage ``self_train``: transductive ZegCLIP (ZegCLIP+ST, ZegCLIP Sec. 4.3, Table 2) as a Ray
Train job, warm-started from the inductive train_classifier artifact.

The transductive schedule (paper: "we train our ZegCLIP model on seen classes in the first half
of training iterations and then apply self-training via generating pseudo labels in the rest";
released: ``--load-from`` the inductive run's ``iter_10000.pth`` (VOC) / ``iter_40000.pth`` (COCO)
then 10k / 40k self-training iterations; released-code.md section 4): a transductive config sets
``train_classifier`` to the first half and this stage to the second.

* Inputs: ``splits`` (a *transductive* build_splits artifact: refused at plan time otherwise,
  ``check_inputs``, and at run time from its ``classes.json``), ``text`` (embed_text: the text
  embeddings of **all** training classes are the decoder's queries, as released), ``init_from``
  (required, named in the section: the inductive ``train_classifier`` artifact, ``method:
  zegclip``). The model (CLIP spec and ZegCLIP config) is the artifact's ``segmenter.json``; its
  trained weights are loaded strictly by ``stages.common.warm_start`` in every worker of a fresh
  run (a resumed run has its checkpoint).
* Optimiser: the released self-training run keeps the inductive settings (AdamW lr 2e-5, lr_mult
  10, weight decay 0.01, poly 0.9 to min_lr 1e-6, 1500 warm-up steps restarting in the ST run):
  the same section fields and defaults as ``train_classifier`` (``stages.methods.zegclip.ZegCLIPSolver``),
  a fresh optimiser and schedule over ``train.max_steps``.
* Targets: labels in vocabulary ids (seen classes keep their id), the unlabelled-unseen value
  (``zeroseg.data.splits.unlabeled_index``), ignore. Every iteration the pseudo-labels come from the
  same forward, detached (``zeroseg.self_training``): ``pixels: unseen_only`` (released, the
  paper's dagger variant: pixels whose hidden label is an unseen class; this uses where the unseen
  pixels are, never their class) or ``all_unlabeled`` (the paper's plain ZegCLIP+ST: every pixel
  without a seen label, ignore included, padding excluded); ``threshold`` (default none, as
  released). The loss on them is the ground-truth loss.
* Diagnostic: the pseudo-labels' agreement with the held-out unseen ground truth of the training
  images (``heldout/train/*.png`` of the transductive split, its own feed column, read by nothing
  but ``zeroseg.self_training.PseudoLabelStats``; counts summed over workers every iteration,
  checkpointed with the run): curves ``self_train/pseudo_miou``, ``pseudo_accuracy``,
  ``pseudo_coverage`` in MLflow, and ``pseudo_labels.json`` in the artifact. It never feeds back.
* Leakage guard: the training feed checks every decoded label against the unseen class ids
  (``stages.feeds.leakage_guard``); the lookup table maps no unseen id to a target.

Artifact: a ZegCLIP segmenter (``segmenter.json`` with ``default_gamma`` 0.0, the released
self-trained inference ``semantic_inference(..., weight=0.0)``, and ``self_training``: pixels,
threshold, the initial artifact's key; ``weights.pt``) plus ``pseudo_labels.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipeline.dag import Input, Stage, StageContext
from pipeline.training import TrainSection
from stages.common import INIT_FROM, text_embeddings, vocabularies
from stages.methods.zegclip import ZegCLIPSolver
from zeroseg.errors import ConfigError, DataError

ZEGCLIP_CLASS = "zeroseg.models.zegclip:ZegCLIP"
PSEUDO_LABELS_JSON = "pseudo_labels.json"
#: The self-trained artifact's ``default_gamma``: the released self-trained inference applies no
#: seen-class calibration (``semantic_inference(..., weight=0.0)``; released-code.md section 4).
#: A constant, not a training field: ``evaluate.gamma`` overrides it without re-training.
SELF_TRAINED_GAMMA = 0.0


class SelfTrainConfig(ZegCLIPSolver):
    """``self_train`` section: ``init_from: train_classifier`` (required), ``pixels``
    (``unseen_only`` | ``all_unlabeled``), ``threshold`` (None or a sigmoid score in (0, 1)), and
    :class:`ZegCLIPSolver`'s training sections (``train.max_steps`` default 10000: VOC's second
    half). The artifact's ``default_gamma`` is :data:`SELF_TRAINED_GAMMA` (set ``evaluate.gamma``
    for another calibration)."""

    pixels: Literal["unseen_only", "all_unlabeled"] = "unseen_only"
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    train: TrainSection = TrainSection(max_steps=10000, batch_size=4, lr=2e-5, reference_batch_size=16)


class SelfTrain(Stage):
    """ZegCLIP+ST (see module docstring)."""

    name = "self_train"
    Config = SelfTrainConfig
    INPUTS = {
        "splits": Input(("build_splits",), doc="a transductive split: manifests, held-out labels, classes.json"),
        "text": Input(("embed_text",), doc="class text embeddings (all classes are queries)"),
        "init_from": dataclasses.replace(
            INIT_FROM, stages=("train_classifier",), required=True, doc="the inductive ZegCLIP to self-train"
        ),
    }

    def check_inputs(self, config: SelfTrainConfig, facts: Mapping[str, Mapping[str, Any]]) -> None:
        """The leakage guard's plan-time half: self-training reads the unseen class names and where
        the unseen pixels are, so it needs a transductive split; and it self-trains ZegCLIP.

        Raises:
            ConfigError: ``build_splits.transductive`` is false; ``train_classifier.method`` is not zegclip.
        """
        if not facts.get("splits", {}).get("transductive"):
            raise ConfigError(
                "self_train needs a transductive split, but build_splits.transductive is false (the inductive "
                "setting never shows an unseen class name or pixel to training): set build_splits.transductive: "
                "true, or remove the self_train section"
            )
        method = facts.get("init_from", {}).get("method")
        if method is not None and method != "zegclip":
            raise ConfigError(
                f"self_train.init_from: train_classifier.method is {method!r}; self_train is ZegCLIP+ST and "
                "self-trains a zegclip model (set train_classifier.method: zegclip)"
            )

    def note(self, metrics: Mapping[str, Any]) -> str:
        """Steps and the pseudo-label diagnostic (percent)."""
        keys = ("steps", "global_batch_size", "pseudo_miou", "pseudo_accuracy", "pseudo_coverage")
        return super().note({k: metrics[k] for k in keys if k in metrics})

    def run(self, ctx: StageContext) -> dict[str, float]:
        return self_train_zegclip(ctx, ctx.config)


def student_model(cfg: Mapping[str, Any]) -> Any:
    """The ZegCLIP of ``cfg["clip"]`` / ``cfg["model"]`` (the initial artifact's) with the initial
    artifact's trained weights (``stages.common.warm_start`` from ``cfg["init_from"]``, strict)."""
    from stages.common import warm_start
    from stages.methods.zegclip import build_model

    seg = build_model(cfg["clip"], cfg["model"])
    warm_start(seg, cfg["init_from"])
    return seg


def _loss_module(seg: Any, text: Any, cfg: Mapping[str, Any]) -> Any:
    """``forward(images, target, eligible)`` -> the loss terms on the pseudo-labelled target, plus
    ``pseudo`` (that target) and ``labelled`` (the pixels that got a pseudo-label): one forward."""
    import torch

    from zeroseg.self_training import pseudo_label_targets

    class SelfTrainLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = seg
            self.register_buffer("text", text, persistent=False)

        def forward(self, images: torch.Tensor, target: torch.Tensor, eligible: torch.Tensor) -> dict[str, Any]:
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

    return SelfTrainLoss()


def self_train_loop(loop: Any) -> None:
    """Per-worker loop. ``loop.config``: ``clip``, ``model``, ``init_from`` (artifact URI),
    ``text`` (``[C, D]`` all classes), ``unseen``, ``num_classes``, ``ignore_index``,
    ``unlabeled_index``, ``pixels``, ``threshold`` and the solver entries. Batches: ``image``,
    ``label`` (vocabulary ids / unlabelled / ignore), ``heldout`` (diagnostic only), ``valid``."""
    import torch
    import torch.distributed as dist

    from stages.methods.zegclip import zegclip_optimizer
    from zeroseg.self_training import PseudoLabelStats, eligible_pixels

    cfg = loop.config
    seg = student_model(cfg)
    text = torch.tensor(np.asarray(cfg["text"], dtype=np.float32))
    model = loop.prepare(_loss_module(seg, text, cfg), find_unused_parameters=True)
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
    import torch

    from pipeline.training import fit_stage
    from pipeline.training.checkpoint import load_train_state
    from stages.feeds import leakage_guard, train_dataset
    from stages.methods.zegclip import build_model
    from zeroseg.config.clip import model_embed_dim
    from zeroseg.data.classes import label_ignore_index
    from zeroseg.data.split_files import read_transductive
    from zeroseg.data.transforms import make_lut
    from zeroseg.metrics import json_safe
    from zeroseg.models import read_segmenter_json, save_segmenter
    from zeroseg.self_training import PseudoLabelStats

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
    clip = doc["clip"]
    emb = text_embeddings(
        ctx.inputs["text"], vocabs, ["train"], dim=model_embed_dim(clip), clip_model=clip.get("model")
    )["train"]
    num_classes = len(vocab.names)
    ignore = label_ignore_index(num_classes)
    unlabeled = int(trans["unlabeled_index"])
    # seen classes keep their vocabulary id (all classes are queries), the unlabelled value itself
    lut = make_lut(
        {**{int(c): int(c) for c in vocab.seen}, unlabeled: unlabeled}, ignore_index=ignore, source_classes=num_classes
    )
    guard = leakage_guard(splits, lut)
    ds = train_dataset(splits, lut, cfg.augment, cfg.train.seed, block_rows=cfg.block_rows, guard=guard, heldout=True)
    loop_config = {
        "clip": clip,
        "model": doc["model"],
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
    result = fit_stage(ctx, self_train_loop, loop_config, {"train": ds}, cfg.scaling, cfg.train)
    seg = build_model(clip, doc["model"])
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
        from pipeline import tracking

        tracking.log_metrics(per_class, run_id=ctx.mlflow_run_id)
    return {
        "steps": result.steps,
        "global_batch_size": result.global_batch_size,
        "base_lr": result.effective_lr,
        "effective_lr": result.effective_lr * cfg.head_lr_mult,
        "resumed_from_step": result.resumed_from_step,
        "precision": result.precision,
        "trainable_params": int(sum(v.numel() for v in trainable.values() if torch.is_tensor(v))),
        "pseudo_miou": summary["miou"],
        "pseudo_accuracy": summary["accuracy"],
        "pseudo_coverage": summary["coverage"],
        **{f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }


__all__ = ["SelfTrain", "SelfTrainConfig", "self_train_loop", "self_train_zegclip", "student_model"]
