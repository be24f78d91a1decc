"""What several stages read from their inputs, read and checked one way.

* :func:`vocabularies`: the typed ``classes.json`` of a build_splits artifact
  (``zeroseg.data.splits.read_classes_json``);
* :func:`text_embeddings`: embed_text's ``embeddings/<vocab>.npy`` checked against those
  vocabularies and the CLIP model's embedding size (one check for every stage that uses them);
* :data:`INIT_FROM` and :func:`warm_start`: a training stage initialised from another
  segmenter artifact's trained weights, strictly checked;
* :data:`Device`: the one ``device`` setting of the inference stages (validated here, torch-free;
  resolved on the cluster by ``stages.jobs.device``);
* :class:`JobStage`: a stage spec whose computation is its job module (``stages/jobs/<stage>.py``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import AfterValidator, ValidationInfo

from pipeline.config import Runtime
from pipeline.dag import Artifact, Input, Stage, StageContext
from zeroseg.config.clip import ClipSpec
from zeroseg.data.classes import Vocabulary
from zeroseg.data.split_files import read_classes_json
from zeroseg.errors import ConfigError, DataError

TRAIN_VOCAB = "train"

#: The warm-start input role of a training stage (``<stage>.init_from: <stage>``): the segmenter
#: artifact whose trained weights initialise this stage's model (:func:`warm_start`). Bound only
#: when the section names it (a warm start changes what is trained, so it is never inferred);
#: being an input, the artifact's key is part of this stage's key. Self-training (ZegFormer/ZegCLIP
#: ST) and PADing's classifier retraining start from the classifier this way.
INIT_FROM = Input(
    ("train_classifier", "train_generator", "self_train"),
    required=False,
    auto=False,
    doc="the segmenter whose trained weights initialise this model",
)


def _check_device(v: str, info: ValidationInfo) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the error names the field)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"{info.field_name} must be auto, cpu, cuda or cuda:N, got {v!r}")
    return v


#: A stage's inference device: ``auto`` (cuda when the Ray cluster has GPUs), ``cpu``, ``cuda`` or
#: ``cuda:N``. Runtime (not in the key). Resolved on the driver and checked in each actor by
#: ``stages.jobs.device``.
Device = Annotated[str, Runtime(why="device"), AfterValidator(_check_device)]


class JobStage(Stage):
    """A stage spec whose computation is its *job* module :attr:`job` (``stages/jobs/<stage>.py``).

    The spec module (config schema, inputs, plan-time checks, summary) imports neither torch nor
    Ray, so planning does not; the job module imports them at its top and defines the actors.
    :meth:`run` imports the job by name when the stage runs and calls its ``run(ctx)``;
    :meth:`code` names it, so editing the job re-keys the stage (``pipeline.codehash`` does not
    follow an import by name). The job may import the spec; the spec never imports the job.
    """

    #: The job: a module (its ``run(ctx)`` is called) or ``module:function`` (``function(ctx,
    #: ctx.config)``).
    job: ClassVar[str]

    def code(self, config: Any) -> list[str]:
        """The spec module and the job module (each followed through its imports)."""
        return [*super().code(config), self.job.partition(":")[0]]

    def run(self, ctx: StageContext) -> dict[str, float]:
        """The job's ``run(ctx)`` (or ``function(ctx, ctx.config)``)."""
        return run_job(self.job, ctx, ctx.config)


def run_job(job: str, ctx: StageContext, config: Any) -> dict[str, float]:
    """Import ``job`` by name and run it: a module's ``run(ctx)``, or ``module:function``'s
    ``function(ctx, config)`` (a method's build or train function)."""
    module, _, function = job.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, function)(ctx, config) if function else mod.run(ctx)


def random_weights_notice(clip: ClipSpec | None) -> list[str]:
    """The line to print once when a stage uses a CLIP model with random weights."""
    if clip is None or not clip.random_init:
        return []
    return [
        f"this config uses a CLIP model with RANDOM WEIGHTS ({clip.model}): it exercises the real code path, "
        "but its metrics say nothing about the method. Use clip.pretrained: openai or clip.checkpoint: <file> "
        "for real results."
    ]


def vocabularies(splits: Artifact) -> dict[str, Vocabulary]:
    """``{"train": vocabulary, <eval set>: vocabulary, ...}`` of a build_splits artifact.

    Raises:
        DataError: ``classes.json`` is missing or malformed, or an eval set is named ``train``.
    """
    path = splits.file("classes.json")
    train, evals = read_classes_json(path)
    if TRAIN_VOCAB in evals:
        raise DataError(f"{path}: an eval set is named {TRAIN_VOCAB!r}, like the training vocabulary; rename it")
    return {TRAIN_VOCAB: train, **evals}


def text_embeddings(
    text: Artifact,
    vocabs: dict[str, Vocabulary],
    names: Iterable[str] | None = None,
    dim: int | None = None,
    clip_model: str | None = None,
) -> dict[str, np.ndarray]:
    """The text embeddings of the vocabularies ``names`` (default: all), checked.

    Returns:
        ``{vocab: float32 [C, D]}``, row ``i`` = class id ``i`` of that vocabulary.

    Raises:
        DataError: a vocabulary without its ``embeddings/<vocab>.npy``, or a row count other than
            its number of classes (naming both; re-run embed_text).
        ConfigError: ``D`` differs from ``dim``, the CLIP model's embedding size (embed_text and
            this stage use different CLIP models).
    """
    out = {}
    for name in list(names) if names is not None else list(vocabs):
        v = vocabs[name]
        rel = f"embeddings/{name}.npy"
        try:
            emb = np.load(text.file(rel), allow_pickle=False)
        except FileNotFoundError as e:
            raise DataError(f"vocabulary {name!r} has no text embeddings: {e}") from None
        except ValueError as e:
            raise DataError(f"{text.file(rel)} is not a readable .npy array ({e}); re-run embed_text") from None
        if emb.ndim != 2 or emb.shape[0] != len(v.names):
            raise DataError(
                f"{rel} has shape {emb.shape} but vocabulary {name!r} has {len(v.names)} classes "
                "(classes.json); re-run embed_text"
            )
        if dim is not None and emb.shape[1] != dim:
            raise ConfigError(
                f"text embeddings of {name!r} have dimension {emb.shape[1]}, but CLIP model "
                f"{clip_model!r} embeds into {dim}; embed_text and the model must use the same clip spec"
            )
        out[name] = emb.astype(np.float32)
    return out


def seen_rows(vocab: Vocabulary, emb: np.ndarray) -> np.ndarray:
    """The ``[S, D]`` rows of ``emb`` for the seen classes of ``vocab``, in ``seen`` order.

    Raises:
        DataError: no class is seen (a model trained on seen classes has nothing to learn).
    """
    if not vocab.seen:
        raise DataError(
            f"classes.json: the training vocabulary ({vocab.dataset!r}, {len(vocab.names)} classes) has "
            "no seen class, so there is no class to train on; make build_splits.split leave some "
            "classes seen (split.unseen / split.seen) and re-run build_splits"
        )
    return emb[list(vocab.seen)]


def warm_start(seg: Any, artifact_uri: str) -> None:
    """Initialise ``seg``'s trainable weights from another segmenter artifact (a training stage's
    ``init_from``), strictly: the artifact must be of the same model class, and its ``weights.pt``
    must hold exactly ``seg``'s trainable tensors with their shapes.

    Args:
        seg: a built ``zeroseg.models.Segmenter``.
        artifact_uri: the artifact (a local path or a store URI; read where this runs, e.g. a
            training worker).

    Raises:
        DataError: the artifact is not a segmenter, is of another class, or holds no weights.
        WeightsMismatchError: its weights do not fit ``seg`` (keys and shapes listed).
    """

    from pipeline.uri import local_copy
    from zeroseg.models import WEIGHTS_PT, class_path, read_segmenter_json, read_state_dict

    with local_copy(artifact_uri) as d:
        doc = read_segmenter_json(d)
        if doc["class"] != class_path(seg):
            raise DataError(
                f"init_from {artifact_uri}: a {doc['class']} artifact ({doc['method']}) cannot initialise a "
                f"{class_path(seg)} model; bind init_from to an artifact of the same method"
            )
        w = d / WEIGHTS_PT
        if not w.is_file():
            raise DataError(f"init_from {artifact_uri}: the artifact has no {WEIGHTS_PT} (a training-free method)")
        seg.load_trainable_state_dict(
            read_state_dict(w, f"{artifact_uri}/{WEIGHTS_PT}"), source=f"{artifact_uri}/{WEIGHTS_PT}"
        )


__all__ = [
    "INIT_FROM",
    "Device",
    "JobStage",
    "TRAIN_VOCAB",
    "random_weights_notice",
    "seen_rows",
    "text_embeddings",
    "vocabularies",
    "warm_start",
]
