"""DeOP's model hyperparameters (Han et al., ICCV 2023, "Open-Vocabulary Semantic Segmentation
with Decoupled One-Pass Network"), torch-free.

Defaults are the released setting (CongHan0808/DeOP ``scripts/deop_train.sh`` on
``configs/coco-stuff-164k-156/zero_shot_maskformer_R101c_bs32_60k_proposalmask_featupsample_img512.yaml``;
``../shared/papers/released-code.md`` section 2): generalized patch severance as the released
mask-weighted identity attention on the last ViT block, one standard decoder layer before the
heatmap output layer (``NUM_DECODER_LAYER 1``), width 512 / 8 heads / FFN 1024 / dropout 0.1,
learned-position visual prompts at the input and blocks 1-5 (``POSITION_LAYERS [1,2,3,4,5]``),
16 learnable prefix text tokens, loss 2.0 focal + 0.8 dice through ``sigmoid(3 S - 3)``,
logits ``100 x cosine``. The proposal model is not configured here: it is the frozen
``pretrain_proposals`` artifact the method binds (its query count fixes DeOP's queries).
See ``zeroseg.models.deop`` for the model.

Imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from zeroseg.config import Size, square

#: Loss weights of the released training script (``MODEL.MASK_FORMER.DECODER_CE_WEIGHT 2.0``,
#: ``DECODER_DICE_WEIGHT 0.8``; the config defaults are 1.0 / 0.0) and the focal-loss constants of
#: ``criterion_decoder.bce_loss_ignore`` (alpha 0.25, gamma 2) and ``INPUT.OUTPUT_SIG 3.0``.
DEOP_LOSS = {"focal": 2.0, "dice": 0.8, "focal_alpha": 0.25, "focal_gamma": 2.0, "output_sig": 3.0}

PositiveInt = Annotated[int, Field(strict=True, ge=1)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]


class DeOPConfig(BaseModel):
    """``train_classifier.model`` of ``method: deop`` (DeOP Secs. 3-4; released code).

    Fields:
        severance: generalized patch severance (GPS, Sec. 4.1) on ``severance_layers``:
            ``identity`` (Eq. 2 with alpha = 1: every token sees only itself), ``alpha`` (Eq. 2
            with ``alpha``: ``alpha E + (1 - alpha) Attn``), or ``mask_weighted`` (released default,
            ``multi_head_attention_forward_vit_softmax_noattn``: identity attention with each
            token's value scaled by the sum over the proposals of their sigmoid masks on the patch
            grid, [CLS] by the number of proposals).
        alpha: Eq. 2's alpha in ``[0, 1]`` for ``severance: alpha`` (Table 4: 1 on the last block).
        severance_layers: ViT blocks (0-based; negative from the top, -1 = last, the released
            ``LAYERMASKVIT [11]`` of ViT-B/16) whose attention is replaced; empty = no severance
            (the paper's baseline+, Sec. 3.2).
        mask_guided: use mask-guided patch severance (MPS, Eq. 1) on ``severance_layers`` instead
            of GPS: token ``i`` attends to token ``j`` with weight ``softmax_j(sum_n M_n,i M_n,j)``
            (released ``..._noattn_maskselfattn``; the paper's Eq. 1 has no softmax). Leave
            ``severance`` / ``alpha`` unset with it.
        decoder: classification anchor learning (Sec. 4.2): ``heatmap`` (query-based heatmap
            decoder, Eq. 3, released) or ``conv`` (conv-based decoder, Eq. 4; not in the released
            code).
        decoder_layers: K. ``heatmap``: standard transformer decoder layers before the heatmap
            output layer (released script ``NUM_DECODER_LAYER 1``; Table 5: K = 1 best). ``conv``:
            conv3x3-BN-ReLU layers before the 1-channel conv (Table 5 uses K = 3 for it).
        width / heads / ffn / dropout: the heatmap decoder (released ``d_model 512``, 8 heads,
            ``dim_feedforward 1024``, dropout 0.1); ``width`` must equal the CLIP embedding size
            (the output layer pools CLIP features channel-wise, per head). ``conv``: channels of
            its CBR layers (paper: 512).
        num_queries: anchor queries; ``None`` = the proposal model's query count (one query per
            proposal, query ``i`` paired with proposal ``i``: released). An int must equal it
            (the method refuses a proposals artifact of another count).
        visual_prompt_layers: where the learned-position visual prompts are added (Sec. 3.2,
            Appendix B "adding prompts"; released ``learned_position``): ``0`` = the input (with the
            positional embedding, before ``ln_pre``), ``l >= 1`` = the input of 0-based block ``l``
            (released ``POSITION_LAYERS [1, 2, 3, 4, 5]`` plus the input one). Empty: none.
        visual_prompt_size: pixel size the prompts' grid is trained at (released
            ``INPUT.LEARNPOSITIONRES 384``: a 24 x 24 grid for patch 16), bicubically resized to
            each image's grid.
        text_prompt_tokens: learnable prefix context vectors of the text prompt
            (``[SOS] p_1..p_n name . [EOS]``, released ``PROMPT_SHAPE (16, 0)``); 0 = the bare
            class name sentence, nothing learned on the text side.
        focal_weight / dice_weight / focal_alpha / focal_gamma / output_sig: the released loss
            (``criterion_decoder.loss_labels_bce``): ``focal_weight * focal(sigmoid(output_sig * S
            - output_sig)) + dice_weight * dice(...)`` (:data:`DEOP_LOSS`).
        logit_scale: segment logits = ``logit_scale x cosine`` with the class texts and the
            no-object embedding (released ``get_sim_logits(..., temperature=100)``; fixed).
        input_size: ``[H, W]`` training crops and the default evaluation resolution; multiples of
            the proposal model's size divisibility and of the ViT patch (checked when built).
        size_divisibility: evaluate's short-side protocol pads images to a multiple of it
            (released ``INPUT.SIZE_DIVISIBILITY 512``); a multiple of 32.
        clip_input_norm: the pixel normalisation the CLIP stream sees: ``proposals`` (released:
            CLIP gets the same ImageNet-normalised tensor as the proposal network) or ``clip``
            (re-normalised with CLIP's own mean / std).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    severance: Literal["identity", "alpha", "mask_weighted"] = "mask_weighted"
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    severance_layers: list[int] = Field(default_factory=lambda: [-1])
    mask_guided: bool = False
    decoder: Literal["heatmap", "conv"] = "heatmap"
    decoder_layers: NonNegativeInt = 1
    width: PositiveInt = 512
    heads: PositiveInt = 8
    ffn: PositiveInt = 1024
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_queries: PositiveInt | None = None
    visual_prompt_layers: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    visual_prompt_size: PositiveInt = 384
    text_prompt_tokens: NonNegativeInt = 16
    focal_weight: float = Field(DEOP_LOSS["focal"], ge=0)
    dice_weight: float = Field(DEOP_LOSS["dice"], ge=0)
    focal_alpha: float = Field(DEOP_LOSS["focal_alpha"], ge=0, le=1)
    focal_gamma: float = Field(DEOP_LOSS["focal_gamma"], ge=0)
    output_sig: float = Field(DEOP_LOSS["output_sig"], gt=0)
    logit_scale: float = Field(100.0, gt=0)
    input_size: Size = (512, 512)
    size_divisibility: PositiveInt = 512
    clip_input_norm: Literal["proposals", "clip"] = "proposals"

    _square = field_validator("input_size", mode="before")(square)

    @field_validator("severance_layers", "visual_prompt_layers", mode="before")
    @classmethod
    def _int_list(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in v):
            raise ValueError(f"must be a list of block numbers (ints), got {v!r}")
        if len(set(v)) != len(v):
            raise ValueError(f"has duplicates: {list(v)}")
        return list(v)

    @model_validator(mode="after")
    def _consistent(self) -> DeOPConfig:
        # value checks, not ``model_fields_set``: a dump read back (segmenter.json) sets every field
        if self.mask_guided and (self.severance != "mask_weighted" or self.alpha != 1.0):
            raise ValueError(
                "model.mask_guided: true replaces generalized patch severance by mask-guided severance "
                "(Eq. 1) on model.severance_layers; remove model.severance / model.alpha"
            )
        if self.alpha != 1.0 and self.severance != "alpha":
            raise ValueError(
                f"model.alpha is used by severance: alpha only (model.severance is {self.severance!r}); "
                "set model.severance: alpha or remove model.alpha"
            )
        if self.decoder == "heatmap" and self.width % self.heads:
            raise ValueError(f"model.width {self.width} must be divisible by model.heads {self.heads}")
        if self.decoder == "heatmap" and self.width % 4:
            raise ValueError(
                f"model.width {self.width} must be a multiple of 4 (the sine positional encoding gives "
                "a quarter to each of sin/cos x and y)"
            )
        if self.size_divisibility % 32:
            raise ValueError(
                f"model.size_divisibility {self.size_divisibility} must be a multiple of 32 (the proposal "
                "network's coarsest stride)"
            )
        return self


__all__ = ["DEOP_LOSS", "DeOPConfig"]
