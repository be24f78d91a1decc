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
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from pipeline.dag import Input
from pipeline.training import TrainSection
from stages.common import INIT_FROM, JobStage
from stages.methods.zegclip import ZegCLIPSolver
from zeroseg.errors import ConfigError

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


class SelfTrain(JobStage):
    """ZegCLIP+ST (see module docstring)."""

    job = "stages.jobs.self_train:self_train_zegclip"

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


__all__ = ["PSEUDO_LABELS_JSON", "SELF_TRAINED_GAMMA", "ZEGCLIP_CLASS", "SelfTrain", "SelfTrainConfig"]
