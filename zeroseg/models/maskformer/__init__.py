"""The mask proposal model: MaskFormer (Cheng, Schwing and Kirillov, NeurIPS 2021) as the
decoupled zero-shot methods train it on the seen classes.

ZegFormer (Ding et al., CVPR 2022, Sec. 3.1 "class-agnostic grouping") and DeOP (Han et al.,
ICCV 2023, Sec. 3.1) both take their segments from a MaskFormer. What is built here follows the
released ZegFormer code (dingjiansw101/ZegFormer, ``mask_former/``; ``../shared/papers/
released-code.md`` section 1.1), which is MaskFormer's:

1. backbone -> ``res2..res5`` at strides 4, 8, 16, 32 (:class:`ResNetBackbone`: torchvision
   ResNet-18/50/101; or :class:`ClipPyramidBackbone`: the open_clip ViT, our departure);
2. pixel decoder (:class:`PixelDecoder`, MaskFormer's ``BasePixelDecoder``): an FPN, top-down
   from res5 with lateral 1x1 and output 3x3 convs (GroupNorm), then a 3x3 ``mask_features`` conv
   -> per-pixel embeddings ``[B, mask_dim, H/4, W/4]``;
3. transformer decoder (:class:`TransformerDecoder`, DETR's with ``ENC_LAYERS: 0``): ``num_queries``
   learnable query embeddings (as query positions; the targets start at zero) cross-attend to res5
   projected to ``hidden_dim`` plus a sine positional encoding; post-norm layers (self-attention,
   cross-attention, FFN), the shared final LayerNorm applied to every layer's output;
4. heads on each query: mask embedding ``MLP(hidden, hidden, mask_dim, 3 layers)``, masks =
   ``einsum("bqc,bchw->bqhw", mask_embed, mask_features)`` (logits at stride 4); class logits
   ``[B, Q, K + 1]`` (last column = no-object) from one of three heads (``class_head``):

   - ``text`` (ZegFormer's SSE head, Eq. 1, ``transformer_zeroshot_predictor.py``; DeOP's
     SimBaseline uses the same idea): ``Linear(hidden, D)``, L2-normalised, times
     ``logit_scale`` (100 = 1/0.01, frozen) against the ``K`` text embeddings given at forward
     time, plus a learnable no-object embedding ``bg_feature`` ``[1, D]`` (``kaiming_uniform_(a=
     sqrt(5))``): **code**: ``100 * x @ bg_feature.T`` with ``bg_feature`` not normalised (the
     default); **paper** Eq. 1: cosine with it as with every class (``no_object_normalized``);
   - ``linear`` (PADing): ``Linear(hidden, K + 1)``;
   - ``objectness``: ``Linear(hidden, 2)``, one class "object" plus no-object: the class-agnostic
     grouping the ZegFormer and DeOP papers describe (their code trains a classifier instead).

Semantic inference (:func:`semantic_scores`, MaskFormer Sec. 3.4): ``einsum("bqc,bqhw->bchw",
softmax(logits)[..., :-1], sigmoid(masks))``.

Departures (docs/architecture.md, "Proposals (MaskFormer)"):

- backbone ``clip``: the papers use ResNets. Here the tokens of four evenly spaced blocks of the
  CLIP ViT (:mod:`zeroseg.models.trunk`) are resampled to strides 4/8/16/32 (ViTDet's simple
  feature pyramid, Li et al. 2022: transposed convs up, max-pool down) and fed to the same FPN;
  the tower is deep-copied and trained with the rest.
- BatchNorm: detectron2's ResNets use frozen BN (``FrozenBN``, the ImageNet statistics). We do so
  when ``backbone_weights`` is given; a randomly initialised ResNet has no statistics to freeze,
  so it gets ordinary trainable ``BatchNorm2d`` (per worker, not synchronised).
- Ignored / padded pixels: MaskFormer pads images in a batch and the target masks with zeros;
  here the pipeline feeds equal-size crops, so there is no batch padding inside the model.

Artifact (stage ``pretrain_proposals``; docs/architecture.md): ``proposals.json`` (this model's
class, config, sizes, the CLIP spec for ``clip``, input size and normalisation, the seen class ids),
``weights.pt`` (the full state dict), ``metrics.json``: :func:`save_proposals`,
:func:`read_proposals_json`, :func:`load_proposal_model`.

Modules (as MaskFormer's ``mask_former/modeling/``): :mod:`.backbone` (1., the ResNet and CLIP
backbones), :mod:`.pixel_decoder` (2.), :mod:`.transformer_decoder` (3. and the heads' ``MLP``),
:mod:`.model` (4., :class:`MaskFormer` and :func:`semantic_scores`), :mod:`.criterion` (the
Hungarian matcher and the set criterion, training), :mod:`.artifact` (the proposals artifact),
:mod:`.layers` (init and norm helpers). The
per-mask focal and dice losses are in :mod:`zeroseg.losses`; the sine position encoding in
:mod:`zeroseg.models.position`.

Imports neither Ray nor the pipeline.
"""

from zeroseg.models.maskformer.artifact import (
    METRICS_JSON,
    PROPOSALS_JSON,
    WEIGHTS_PT,
    check_proposals_doc,
    load_proposal_model,
    read_proposal_weights,
    read_proposals_json,
    save_proposals,
)
from zeroseg.models.maskformer.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STRIDES,
    ClipPyramidBackbone,
    ResNetBackbone,
    vit_pyramid_layers,
)
from zeroseg.models.maskformer.criterion import (
    HungarianMatcher,
    SetCriterion,
    batch_dice_cost,
    batch_sigmoid_focal_cost,
    hungarian_match,
    num_masks_across_workers,
)
from zeroseg.models.maskformer.model import MaskFormer, semantic_scores
from zeroseg.models.maskformer.pixel_decoder import PixelDecoder
from zeroseg.models.maskformer.transformer_decoder import MLP, DecoderLayer, TransformerDecoder
from zeroseg.optim import poly_lr_factor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METRICS_JSON",
    "MLP",
    "PROPOSALS_JSON",
    "STRIDES",
    "WEIGHTS_PT",
    "ClipPyramidBackbone",
    "DecoderLayer",
    "HungarianMatcher",
    "MaskFormer",
    "PixelDecoder",
    "ResNetBackbone",
    "SetCriterion",
    "TransformerDecoder",
    "batch_dice_cost",
    "batch_sigmoid_focal_cost",
    "check_proposals_doc",
    "hungarian_match",
    "load_proposal_model",
    "num_masks_across_workers",
    "poly_lr_factor",
    "read_proposal_weights",
    "read_proposals_json",
    "save_proposals",
    "semantic_scores",
    "vit_pyramid_layers",
]
