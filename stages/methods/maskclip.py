"""``train_classifier.method: maskclip``: the training-free MaskCLIP baseline (Zhou, Loy and Dai,
ECCV 2022): the frozen CLIP image tower's last-block value embeddings compared with the class
text embeddings (``zeroseg.models.maskclip``). Nothing trains: the stage checks that the text
embeddings fit the CLIP model, builds the segmenter once (so a bad checkpoint or config fails
here, not in evaluate) and writes ``segmenter.json`` only; the weights are the CLIP spec's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.dag import StageConfig, StageContext
from stages.common import text_embeddings, vocabularies
from stages.methods import Method
from zeroseg.config.clip import ClipSpec
from zeroseg.config.maskclip import MaskCLIPConfig


class MaskCLIPMethod(StageConfig):
    """``train_classifier`` with ``method: maskclip`` (``model``: :class:`MaskCLIPConfig`;
    ``clip`` comes from the top-level ``clip:`` section)."""

    method: Literal["maskclip"]
    clip: ClipSpec
    model: MaskCLIPConfig = MaskCLIPConfig()


def build_maskclip(ctx: StageContext, cfg: MaskCLIPMethod) -> dict[str, float]:
    """Build MaskCLIP on ``cfg.clip`` and write its segmenter artifact (no ``weights.pt``).

    Raises:
        ConfigError: text embeddings of another dimension than the CLIP model's; an input size
            that is not a multiple of the patch size.
        DataError: a vocabulary without its embeddings (see ``stages.common.text_embeddings``).
    """
    from zeroseg.models import save_segmenter
    from zeroseg.models.clip import embed_dim, load_clip
    from zeroseg.models.maskclip import MaskCLIP

    model = load_clip(cfg.clip)
    vocabs = vocabularies(ctx.inputs["splits"])
    emb = text_embeddings(ctx.inputs["text"], vocabs, dim=embed_dim(model), clip_model=cfg.clip.model)
    seg = MaskCLIP(model, cfg.model.model_dump(mode="json"))
    save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "maskclip")
    ctx.log(f"maskclip is training-free; segmenter at {list(seg.input_size)} for {len(emb['train'])} training classes")
    return {"trainable_params": 0}


METHOD = Method("maskclip", MaskCLIPMethod, build_maskclip)
