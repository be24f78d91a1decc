"""The stages of zeroseg, in their natural order, and what the pipeline needs to know of them.

``pipeline.catalogue`` loads ``STAGES`` from here (``pipeline.catalogue.STAGES_ENTRY``); the order breaks
ties of the topological order. ``CODE_PACKAGES``: the packages whose imports count as a stage's
code dependencies (``pipeline.codehash``): the science, the stages, and the pieces of ``pipeline``
that determine outputs (the training loop, the batch-inference reduction, the data pass counter).
``HEADLINE``: the params every MLflow run of an invocation carries (:mod:`stages.headline`).
``REPORT``: what ``zeroseg compare`` compares and plots (:mod:`stages.report`).
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

__all__ = ["CODE_PACKAGES", "HEADLINE", "REPORT", "STAGES"]
