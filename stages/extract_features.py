"""Stage ``extract_features``: the frozen pretrained mask model's query embeddings on the training
images, matched to the seen ground-truth segments, written once as the *feature artifact* that
PADing's generator trains on (PADing Algorithm 1 step 2).

Reads build_splits (``splits``: the training manifest) and pretrain_proposals (``proposals``: the
MaskFormer with the ``linear`` class head, PADing's backbone)::

    manifests/train.parquet -> pipeline.inference.reduce(FeaturePredictor, FeatureWriter):
      decode, resize to the proposals' input size, normalise -> frozen MaskFormer ->
      query embeddings [B, Q, d] (the decoder output after its final norm: what the class head reads)
      per image: one target per seen class present (zeroseg.losses.semantic_to_targets) ->
      Hungarian matching with the released PADing costs (class 5, mask 5, dice 5) ->
      every query's label: its matched segment's class, else no-object (-1)
      -> features/embeddings.npy float32 [N, Q, d], features/labels.npy int32 [N, Q],
         features/images.parquet (row, image_id, matched), features.json

The released code (heshuting555/PADing ``forward_train_generator``; released-code.md 3.4) runs
the frozen backbone on every generator step; here it runs once and generator experiments (the
ablation configs) never touch images again (benchmarks/bench_generator.py measures the
difference). Departures: each image is resized to the proposal model's input size without the
training augmentation (released: the step's augmented crop); the mask cost is MaskFormer's focal
cost on whole masks at the prediction's resolution (released Mask2Former: sigmoid CE on 12544
sampled points).

Memory: the driver writes each batch's rows into memory-mapped ``.npy`` files as it arrives (the
evaluator's merge), so nothing accumulates; the artifact is ``N x Q x d x 4`` bytes (COCO-Stuff
118k images x 100 queries x 256: about 12 GB).

This module is the stage's spec (config, inputs, the artifact's file names and reader;
torch-free); the pass is its job, ``stages.jobs.extract_features``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from pipeline.config import Runtime
from pipeline.dag import Input, StageConfig
from stages.common import Device, JobStage
from zeroseg.errors import DataError

FEATURES_JSON = "features.json"
EMBEDDINGS = "features/embeddings.npy"
LABELS = "features/labels.npy"
IMAGES = "features/images.parquet"
ROW_COLUMN = "row"
NO_OBJECT = -1


class ExtractFeaturesConfig(StageConfig):
    """``extract_features`` config section.

    ``cost_class`` / ``cost_mask`` / ``cost_dice``: the Hungarian matching costs (released PADing
    ``CLASS_WEIGHT`` / ``MASK_WEIGHT`` / ``DICE_WEIGHT`` 5, 5, 5). ``max_images``: the first N
    training images (None: all). Runtime (not in the key): ``batch_size``, ``device`` (``auto``:
    cuda when the cluster has GPUs), ``concurrency`` (inference actors).
    """

    cost_class: float = Field(5.0, ge=0)
    cost_mask: float = Field(5.0, ge=0)
    cost_dice: float = Field(5.0, ge=0)
    max_images: int | None = Field(None, ge=1)
    batch_size: Annotated[int, Runtime(why="inference batch size")] = Field(4, ge=1)
    device: Device = "auto"
    concurrency: Annotated[int, Runtime(why="concurrency")] = Field(1, ge=1)


def read_features_json(artifact: Any) -> tuple[dict[str, Any], str]:
    """The feature artifact's ``features.json`` and its name for messages
    (``"feature artifact <stage>/<key[:12]>"``).

    Raises:
        DataError: missing or malformed.
    """
    where = f"feature artifact {artifact.stage}/{artifact.key[:12]}"
    try:
        doc = json.loads(Path(artifact.file(FEATURES_JSON)).read_text())
        for k in ("proposals_key", "hidden_dim", "num_queries", "seen", "images", "matched"):
            doc[k]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{where}: {FEATURES_JSON} is missing or malformed ({type(e).__name__}: {e}); re-run extract_features"
        ) from None
    return doc, where


class ExtractFeatures(JobStage):
    """The real-feature artifact of PADing's generator (see module docstring; the pass:
    ``stages.jobs.extract_features``)."""

    name = "extract_features"
    job = "stages.jobs.extract_features"
    Config = ExtractFeaturesConfig
    INPUTS = {
        "splits": Input(("build_splits",), doc="the training manifest and classes.json"),
        "proposals": Input(
            ("pretrain_proposals",), doc="the mask model with the linear class head (PADing's backbone)"
        ),
    }

    def note(self, metrics: Mapping[str, Any]) -> str:
        if "matched" not in metrics:
            return ""
        return f"{int(metrics['matched'])} matched queries in {int(metrics['images'])} images"


__all__ = [
    "EMBEDDINGS",
    "FEATURES_JSON",
    "IMAGES",
    "LABELS",
    "NO_OBJECT",
    "ROW_COLUMN",
    "ExtractFeatures",
    "ExtractFeaturesConfig",
    "read_features_json",
]
