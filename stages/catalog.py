"""The stages of zeroseg, in their natural order, and what the pipeline needs to know of them.

``pipeline.catalogue`` loads ``STAGES`` from here (``pipeline.catalogue.STAGES_ENTRY``); the order breaks
ties of the topological order. ``CODE_PACKAGES``: the packages whose imports count as a stage's
code dependencies (``pipeline.codehash``): the science, the stages, and the pieces of ``pipeline``
that determine outputs (the training loop, the batch-inference reduction, the data pass counter).
``HEADLINE``: the params every MLflow run of an invocation carries (:mod:`stages.headline`).
``REPORT``: what ``zeroseg compare`` compares and plots (:mod:`stages.report`).
``SWEEP_DEFAULTS``: what a sweep file that does not say optimises, and what its seeds set.
"""

from stages.build_splits import BuildSplits
from stages.embed_text import EmbedText
from stages.evaluate import Evaluate
from stages.extract_features import ExtractFeatures
from stages.headline import HEADLINE
from stages.pretrain_proposals import PretrainProposals
from stages.report import REPORT
from stages.self_train import SelfTrain
from stages.train_classifier import TrainClassifier
from stages.train_generator import TrainGenerator

STAGES = [
    BuildSplits,
    EmbedText,
    PretrainProposals,
    ExtractFeatures,
    TrainClassifier,
    TrainGenerator,
    SelfTrain,
    Evaluate,
]
CODE_PACKAGES = ("zeroseg", "stages", "pipeline.training", "pipeline.inference", "pipeline.raycompat")

#: A sweep file (``zeroseg sweep``) that does not say ranks trials on evaluate's harmonic mean of
#: seen and unseen mIoU on the held-out set ``val`` (larger is better), and its ``seeds`` set the
#: classifier's training seed (``pipeline.catalogue.SweepDefaults``).
SWEEP_DEFAULTS = {
    "metric": "evaluate/{eval_set}/hIoU",
    "mode": "max",
    "eval_set": "val",
    "seed_key": "train_classifier.train.seed",
}

__all__ = ["CODE_PACKAGES", "HEADLINE", "REPORT", "STAGES", "SWEEP_DEFAULTS"]
