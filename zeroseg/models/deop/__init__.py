"""DeOP (Han et al., ICCV 2023): a decoupled one-pass network for zero-shot segmentation.

Two streams (DeOP Sec. 3.1, Fig. 2):

1. **proposals**: a frozen MaskFormer (the ``pretrain_proposals`` artifact,
   :mod:`zeroseg.models.maskformer`) gives ``Q`` mask logits ``m_n`` ``[B, Q, H/4, W/4]``; its own
   class logits are ignored (released code; the paper's proposal network has no class branch).
   Never trained here, always run under ``no_grad`` in eval mode.
2. **classification**: **one** pass of the image through the frozen CLIP ViT (the shared trunk,
   :mod:`zeroseg.models.trunk`) with

   - *patch severance* (Sec. 4.1) on ``severance_layers``: generalized (GPS, Eq. 2: ``identity`` =
     alpha 1, ``alpha``; or the released default ``mask_weighted``: identity attention with each
     token's value scaled by ``sum_n sigmoid(m_n)`` on the patch grid, [CLS] by ``Q``) or
     mask-guided (MPS, Eq. 1, ``mask_guided``);
   - *visual prompts* (Sec. 3.2, Appendix B "adding"): learned position embeddings added at the
     input and at the inputs of blocks 1-5 (released ``learned_position``);

   dense output ``ln_post`` + ``proj`` on the patch tokens, L2-normalised: ``F_V`` ``[B, N, D]``;
3. **classification anchor learning** (Sec. 4.2): the query-based heatmap decoder
   (:class:`HeatmapDecoder`: K standard decoder layers, then the heatmap output layer of Eq. 3
   whose per-head ``softmax(q k^T / sqrt(d)) * sigmoid(m_n)`` pools each head's own channel slice of
   ``F_V``, no value / output projection, released ``MultiHeadAttentionMy(outDecoderLayer=True)``)
   or the conv-based decoder of Eq. 4 (:class:`ConvHeatmapDecoder`); the segment embeddings
   ``F_I`` ``[B, Q, D]`` are L2-normalised;
4. **segment classification**: ``logit_scale x cos`` of ``F_I`` with the class text embeddings and
   a learnable (normalised) no-object embedding -> ``[B, Q, C + 1]`` (released
   ``get_sim_logits``); text embeddings from *learnable text prompts* (16 prefix context
   vectors through the frozen open_clip text tower, :meth:`DeOP.encode_text`);
5. **semantic scores** (released 2.6, MaskFormer's semantic inference; :func:`deop_semantic_scores`):
   the mask logits ``m`` are upsampled bilinearly to the (padded) input size ``H x W`` *before* the
   sigmoid, then ``einsum("bqc,bqhw->bchw", softmax(logits)[..., :-1], sigmoid(up(m)))``
   ``[B, C, H, W]`` (released ``semantic_inference`` after ``sem_seg_postprocess``; training's loss
   instead upsamples to the label's size, :func:`deop_pixel_loss`).

Training (:meth:`DeOP.loss`, :func:`deop_pixel_loss`) is the released per-pixel loss on the
summed mask x class probabilities, no Hungarian matching (released 2.4).

Modules (as the released ``mask_former/`` of DeOP): :mod:`.severance` (patch severance, step 2),
:mod:`.decoder` (the heatmap decoders, step 3), :mod:`.text_prompt` (the learnable text prompts,
step 4), :mod:`.loss` (the training loss), :mod:`.model` (:class:`DeOP`, the proposals it builds
on, :func:`deop_semantic_scores`). The decoder layer is MaskFormer's
(:class:`zeroseg.models.maskformer.DecoderLayer`), the sine position encoding
:mod:`zeroseg.models.position`'s.

Imports neither Ray nor the pipeline.
"""

from zeroseg.models.deop.decoder import ConvHeatmapDecoder, DecoderLayer, HeatmapDecoder, heatmap_pool
from zeroseg.models.deop.loss import deop_pixel_loss
from zeroseg.models.deop.model import (
    DeOP,
    build_proposal_network,
    check_proposals_fit,
    deop_semantic_scores,
    resolve_deop_config,
)
from zeroseg.models.deop.severance import (
    mask_guided_attention,
    proposal_patch_weights,
    proposal_token_masks,
    severance_hook,
)
from zeroseg.models.deop.text_prompt import TextPrompt

__all__ = [
    "ConvHeatmapDecoder",
    "DeOP",
    "DecoderLayer",
    "HeatmapDecoder",
    "TextPrompt",
    "build_proposal_network",
    "check_proposals_fit",
    "deop_pixel_loss",
    "deop_semantic_scores",
    "heatmap_pool",
    "mask_guided_attention",
    "proposal_patch_weights",
    "proposal_token_masks",
    "resolve_deop_config",
    "severance_hook",
]
