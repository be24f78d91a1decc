"""The toy method's stage: ``toy_fit`` (a segmenter, ``produces = "segmenter"``)."""

from __future__ import annotations

from pathlib import Path

from pipeline.dag import Input, Stage, StageConfig, StageContext
from stages.common import vocabularies
from zeroseg.config.clip import ClipSpec
from zeroseg.config.maskclip import MaskCLIPConfig


class ToyFitConfig(StageConfig):
    """``toy_fit``: the CLIP model (the shared ``clip:`` section) and MaskCLIP's settings."""

    clip: ClipSpec
    model: MaskCLIPConfig = MaskCLIPConfig()


class ToyFit(Stage):
    """Fits nothing: writes the training-free MaskCLIP segmenter of its CLIP model under the
    method name ``toy``; any stage whose role takes a segmenter (evaluate's ``model``) reads it."""

    name = "toy_fit"
    Config = ToyFitConfig
    INPUTS = {"splits": Input(("build_splits",), doc="the training vocabulary")}
    shared = ("clip",)
    produces = "segmenter"

    def run(self, ctx: StageContext) -> dict[str, float]:
        from zeroseg.models import save_segmenter
        from zeroseg.models.clip import load_clip
        from zeroseg.models.maskclip import MaskCLIP

        cfg: ToyFitConfig = ctx.config
        seg = MaskCLIP(load_clip(cfg.clip), cfg.model.model_dump(mode="json"))
        save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "toy")
        return {"train_classes": float(len(vocabularies(ctx.inputs["splits"])["train"].names))}
