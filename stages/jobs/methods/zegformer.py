"""Job of ``train_classifier.method: zegformer`` (spec: ``stages.methods.zegformer``): the checks of
the bound proposals and the segmenter artifact built from them (nothing trains).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.dag import StageContext
from stages.common import seen_rows, text_embeddings, vocabularies
from stages.jobs.methods._proposals import bound_proposals, check_seen
from stages.methods.zegformer import ZegFormerMethod
from zeroseg.config.clip import model_embed_dim
from zeroseg.errors import DataError
from zeroseg.models import WEIGHTS_PT, load_strict, save_segmenter
from zeroseg.models.clip import load_clip
from zeroseg.models.maskformer import check_proposals_doc, read_proposal_weights
from zeroseg.models.zegformer import ZegFormer, seen_from_text


def check_proposals(doc: dict[str, Any], clip_dim: int, clip_model: str, where: str) -> None:
    """Refuse a proposals artifact ZegFormer cannot use.

    Args:
        doc: the artifact's ``proposals.json``.
        clip_dim: the CLIP model's embedding size ``D``.
        clip_model: the CLIP model's name (for messages).
        where: the artifact, for messages.

    Raises:
        DataError: a class head other than ``text`` (ZegFormer classifies segments against text,
            Eq. 1); the refusals shared with DeOP
            (:func:`zeroseg.models.maskformer.check_proposals_doc`: a text embedding size other than
            ``D``, a query count that disagrees with the model it describes); each message names
            both values.
    """
    head = doc.get("class_head", (doc.get("model") or {}).get("class_head"))
    if head != "text":
        raise DataError(
            f"{where}: the proposal model has class head {head!r}, ZegFormer needs 'text' (segment embeddings "
            "scored against class text, ZegFormer Eq. 1); train pretrain_proposals with model.class_head: text"
        )
    check_proposals_doc(doc, clip_dim, who="ZegFormer", where=where, clip_model=clip_model)


def build_zegformer(ctx: StageContext, cfg: ZegFormerMethod) -> dict[str, float]:
    """Write ZegFormer's segmenter artifact from the proposals artifact (see module docstring).

    Returns:
        metrics: ``num_queries``, ``proposal_params`` (parameters of the proposal model),
        ``trainable_params`` (0: nothing trains here), ``seen_classes``, ``image_branch``.

    Raises:
        DataError: a proposals artifact that does not fit (:func:`check_proposals`), trained on other
            seen classes than this config's, or whose weights do not match its description
            (``WeightsMismatchError``); an evaluation set whose seen classes cannot be told from
            their text embeddings; no seen class.
        ConfigError: text embeddings of another size than the CLIP model's.
    """
    prop = ctx.inputs["proposals"]
    doc, where = bound_proposals(prop)
    dim = model_embed_dim(cfg.clip)
    check_proposals(doc, dim, cfg.clip.model, where)
    if doc["model"].get("backbone") == "clip" and (doc.get("clip") or {}).get("model") != cfg.clip.model:
        raise DataError(
            f"{where}: its backbone is CLIP model {(doc.get('clip') or {}).get('model')!r}, this section's clip "
            f"is {cfg.clip.model!r}; the segmenter rebuilds that backbone on its own CLIP model: use one clip section"
        )
    vocabs = vocabularies(ctx.inputs["splits"])
    emb = text_embeddings(ctx.inputs["text"], vocabs, dim=dim, clip_model=cfg.clip.model)
    train = vocabs["train"]
    seen_text = seen_rows(train, emb["train"])
    check_seen(doc, train.seen, where)
    seg = ZegFormer(load_clip(cfg.clip), cfg.model, proposals=doc)
    sd = read_proposal_weights(prop.file(WEIGHTS_PT))
    load_strict(seg.proposals, sd, f"{where} {WEIGHTS_PT}", "the proposal model")
    seg.seen_text.copy_(torch.from_numpy(seen_text))
    for name, v in vocabs.items():
        if name == "train":
            continue
        found = torch.nonzero(seen_from_text(torch.from_numpy(emb[name]), seg.seen_text)).flatten().tolist()
        if found != list(v.seen):
            extra = [v.names[i] for i in sorted(set(found) - set(v.seen))]
            missing = [v.names[i] for i in sorted(set(v.seen) - set(found))]
            raise DataError(
                f"eval set {name!r}: ZegFormer tells seen classes by their text embeddings (equal to a seen "
                f"training class's) and finds {len(found)}, classes.json says {len(v.seen)}: taken for seen but "
                f"unseen {extra[:10]}, seen but not recognised {missing[:10]} (two class names with equal "
                "embeddings, or embeddings of another embed_text?); the fusion of Eq. 3 needs the seen set"
            )
    state = seg.trainable_state_dict()
    save_segmenter(Path(ctx.output_dir), seg, cfg.clip, "zegformer", state, extra={"default_gamma": cfg.gamma})
    n_prop = sum(p.numel() for p in seg.proposals.parameters())
    ctx.log(
        f"zegformer: {doc['num_queries']} proposals per image from {where} ({n_prop} parameters, "
        f"backbone {doc['model'].get('backbone')}); image branch {'on' if seg.image_branch else 'off'}; "
        f"variants {', '.join(seg.variants)}; nothing trains here ({WEIGHTS_PT}: the proposal model + seen_text)"
    )
    return {
        "num_queries": float(doc["num_queries"]),
        "proposal_params": float(n_prop),
        "trainable_params": 0.0,
        "seen_classes": float(len(train.seen)),
        "image_branch": float(seg.image_branch),
    }


__all__ = ["build_zegformer", "check_proposals"]
