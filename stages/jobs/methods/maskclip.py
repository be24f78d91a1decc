"""Job of ``train_classifier.method: maskclip`` (spec: ``stages.methods.maskclip``): the
training-free segmenter artifact.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.dag import StageContext
from stages.common import text_embeddings, vocabularies
from stages.methods.maskclip import MaskCLIPMethod
from zeroseg.models import save_segmenter
from zeroseg.models.clip import embed_dim, load_clip
from zeroseg.models.maskclip import MaskCLIP


def build_maskclip(ctx: StageContext, cfg: MaskCLIPMethod) -> dict[str, float]:
    """Build MaskCLIP on ``cfg.clip`` and write its segmenter artifact (no ``weights.pt``).

    Raises:
        ConfigError: text embeddings of another dimension than the CLIP model's; an input size
            that is not a multiple of the patch size.
        DataError: a vocabulary without its embeddings (see ``stages.common.text_embeddings``).
    """
    model = load_clip(cfg.clip)
    vocabs = vocabularies(ctx.inputs["splits"])
    emb = text_embeddings(ctx.inputs["text"], vocabs, dim=embed_dim(model), clip_model=cfg.clip.model)
    seg = MaskCLIP(model, cfg.model)
    save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "maskclip")
    ctx.log(f"maskclip is training-free; segmenter at {list(seg.input_size)} for {len(emb['train'])} training classes")
    return {"trainable_params": 0}


__all__ = ["build_maskclip"]
