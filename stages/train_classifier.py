"""Stage ``train_classifier``: the segmentation model, written as a *segmenter artifact*.

Dispatches on ``method`` (:data:`METHODS`, one function per method). Every method writes
``segmenter.json`` (method, CLIP spec, resolved model config, input size and normalisation) and,
when it trains something, ``weights.pt`` (the trained parameters only), with
``zeroseg.models.save_segmenter``; evaluate rebuilds it with ``zeroseg.models.load_segmenter``.

- ``zegclip``: ZegCLIP (Zhou et al., CVPR 2023), inductive: deep prompt tuning + relationship
  descriptor + mask decoder trained on seen classes with Ray Train (``stages/train_zegclip.py``);
  its keys live under ``train_classifier.zegclip`` (model, train, scaling, augment).
- ``maskclip``: training-free (MaskCLIP, Zhou et al. 2022): checks that the text embeddings fit
  the CLIP model, builds the segmenter once (so a bad checkpoint or config fails here, not in
  evaluate) and writes ``segmenter.json`` only; the weights are the CLIP spec's.

Wiring only; models live in ``zeroseg.models``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.dag import Stage, StageConfig, StageContext, register
from stages.train_zegclip import ZegCLIPTrainConfig, train_zegclip
from zeroseg.data.transforms import Size
from zeroseg.errors import ConfigError, DataError
from zeroseg.models.clip import ClipSpec, clip_fingerprint


class MaskCLIPOptions(BaseModel):
    """``train_classifier.maskclip``: MaskCLIP's model options (``zeroseg.models.maskclip``).

    ``logit_scale``: factor on the patch-text cosine similarities: a positive number (default 100,
    the temperature of MaskCLIP's head) or ``"model"`` (the CLIP model's learned scale).
    """

    model_config = ConfigDict(extra="forbid")
    logit_scale: float | Literal["model"] = Field(100.0, description="cosine -> score factor, or 'model'")


class TrainClassifierConfig(StageConfig):
    """``train_classifier`` config section.

    ``clip`` is injected from the top-level ``clip:`` section. ``input_size``: ``[H, W]`` the
    segmenter runs at (default: the method's; for maskclip the CLIP model's ``image_size``).
    """

    method: str = "maskclip"
    clip: ClipSpec
    input_size: Size | None = None
    maskclip: MaskCLIPOptions = MaskCLIPOptions()
    zegclip: ZegCLIPTrainConfig | None = None

    @model_validator(mode="after")
    def _method_section(self) -> "TrainClassifierConfig":
        if self.zegclip is not None and self.method != "zegclip":
            raise ValueError(f"train_classifier.zegclip is set but method is {self.method!r}; "
                             "set method: zegclip or remove the zegclip section")
        return self

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHODS:
            near = difflib.get_close_matches(v, list(METHODS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown method {v!r}{hint} (methods: {', '.join(METHODS)})")
        return v


def check_text_embeddings(ctx: StageContext, dim: int, model_name: str) -> dict[str, int]:
    """Check every ``embeddings/<vocab>.npy`` of embed_text against ``classes.json`` and ``dim``.

    Returns:
        ``{vocab: number of classes}``.

    Raises:
        ConfigError: an embedding dimension other than the CLIP model's (naming both: embed_text
            and train_classifier used different CLIP models).
        DataError: a vocabulary without its embedding file, or a row count other than its
            number of classes.
    """
    classes = json.loads(ctx.inputs["build_splits"].file("classes.json").read_text())
    vocabs = {"train": classes["train"], **(classes.get("eval") or {})}
    counts = {}
    for vocab, v in vocabs.items():
        emb = np.load(ctx.inputs["embed_text"].file(f"embeddings/{vocab}.npy"), mmap_mode="r")
        if emb.ndim != 2 or emb.shape[0] != len(v["names"]):
            raise DataError(f"embeddings/{vocab}.npy has shape {emb.shape}; vocabulary {vocab!r} has "
                            f"{len(v['names'])} classes")
        if emb.shape[1] != dim:
            raise ConfigError(f"text embeddings of {vocab!r} have dimension {emb.shape[1]}, but CLIP model "
                              f"{model_name!r} embeds into {dim}; embed_text and train_classifier must use the "
                              "same clip spec")
        counts[vocab] = int(emb.shape[0])
    return counts


def _build_maskclip(ctx: StageContext, cfg: TrainClassifierConfig) -> dict[str, float]:
    """MaskCLIP: nothing to train; writes ``segmenter.json`` (no ``weights.pt``)."""
    from zeroseg.models import build_segmenter, save_segmenter
    from zeroseg.models.clip import embed_dim, load_clip

    model = load_clip(cfg.clip)
    counts = check_text_embeddings(ctx, embed_dim(model), cfg.clip.model)
    model_cfg: dict[str, Any] = {"logit_scale": cfg.maskclip.logit_scale}
    if cfg.input_size is not None:
        model_cfg["input_size"] = list(cfg.input_size)
    seg = build_segmenter("maskclip", model, model_cfg)
    save_segmenter(Path(ctx.output_dir), "maskclip", cfg.clip, seg.cfg,
                   {"size": list(seg.input_size), "mean": list(seg.mean), "std": list(seg.std)}, None)
    ctx.log(f"train_classifier: maskclip is training-free; segmenter at {list(seg.input_size)} "
            f"for {counts['train']} training classes")
    return {"trainable_params": 0.0}


def _train_zegclip(ctx: StageContext, cfg: TrainClassifierConfig) -> dict[str, float]:
    """ZegCLIP: a Ray Train job on the seen classes (``stages/train_zegclip.py``)."""
    from zeroseg.models.clip import model_embed_dim

    check_text_embeddings(ctx, model_embed_dim(cfg.clip), cfg.clip.model)
    return train_zegclip(ctx, cfg.clip, cfg.zegclip or ZegCLIPTrainConfig(), cfg.input_size)


#: method -> ``run(ctx, config) -> metrics``. A method added here is accepted by the config.
METHODS: dict[str, Callable[[StageContext, TrainClassifierConfig], dict[str, float]]] = {
    "maskclip": _build_maskclip,
    "zegclip": _train_zegclip,
}


@register
class TrainClassifier(Stage):
    """The segmenter of ``method`` (see module docstring)."""

    name = "train_classifier"
    version = "1"
    needs = ("build_splits", "embed_text")
    Config = TrainClassifierConfig

    def fingerprint(self, config: TrainClassifierConfig) -> str | None:
        """The CLIP weights' identity (``zeroseg.models.clip.clip_fingerprint``)."""
        return clip_fingerprint(config.clip)

    def run(self, ctx: StageContext) -> dict[str, float]:
        cfg: TrainClassifierConfig = ctx.config
        if cfg.method not in METHODS:  # a config built without validation
            raise ConfigError(f"unknown train_classifier.method {cfg.method!r} (methods: {', '.join(METHODS)})")
        return METHODS[cfg.method](ctx, cfg)
