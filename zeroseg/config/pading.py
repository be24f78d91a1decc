"""PADing's generator and classifier-retraining hyperparameters (He et al., "Primitive Generation
and Semantic-related Alignment for Universal Zero-Shot Segmentation", CVPR 2023), torch-free.

Defaults are the released semantic-segmentation code's (heshuting555/PADing ``PADing/PADing_model.py``,
``PADing/utils/network_utils.py``, ``configs/semantic-segmentation/PADing.yaml``;
``../shared/papers/released-code.md`` section 3); where the paper differs the field says so and
offers the paper's value. See ``zeroseg.models.pading`` for the networks and losses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: The released ``GMMNLoss(sigma=[2, 5, 10, 20, 40, 80])``: the kernel is ``exp(-||x-y||^2 / (2 v))``,
#: so these act as variances sigma^2 (``released-code.md`` section 3.3).
RELEASED_BANDWIDTHS = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)
#: The paper's bandwidths sigma (PADing Eq. 2, ``k = exp(-||f - f'||^2 / (2 sigma^2))``; Sec. 4.1).
PAPER_SIGMAS = (2.0, 5.0, 10.0, 20.0, 40.0, 60.0)
#: The paper's kernels as ``bandwidths`` values: the variances sigma^2 of :data:`PAPER_SIGMAS`.
PAPER_BANDWIDTHS = tuple(s * s for s in PAPER_SIGMAS)


class GeneratorConfig(BaseModel):
    """``train_generator.model``: the feature generator and the disentanglement / alignment heads.

    Fields:
        generator: ``primitive`` (PADing Eq. 1, Fig. 3) or ``gmmn`` (ZS3Net's GMMN, the paper's
            baseline "G" of Tables 1-2).
        text_dim: size ``D`` of the class text embeddings the generator reads (released 512: CLIP
            ViT-B/16; checked against the CLIP spec at plan time).
        feature_dim: size ``d`` of the query embeddings generated (released 256; checked against the
            feature artifact's proposal model).
        primitives: number of learnable primitives (released ``TRANS_MEMORY_NUM_QUERY`` 400; Table 3).
        layers / heads / ffn / dropout: the generator's transformer decoder (released 3 layers,
            8 heads, FFN 1024, ``TRANS_DROP_RATE`` 0.3).
        noise: add N(0, 1) noise after the cross-attention residual (released ``NOISE: True``; Eq. 1's Z).
        gmmn_hidden / gmmn_noise_dim / gmmn_dropout: the GMMN generator (ZS3Net: one hidden layer,
            LeakyReLU 0.2, dropout 0.4; noise as long as the text embedding, as ZS3Net).
        disentangle: train E_R / E_U / the decoder and the relation net (Eqs. 3-5; Tables 1-2 "D").
        align: the relationship alignment (Eq. 6; Tables 1-2 "A").
        ed_dropout: dropout of the disentanglement encoders and decoder (released ``DROP_OUT_ED`` 0.2).
        relation: ``released`` (a relation network: ``sigmoid(MLP([x_hat, a]))`` scores, then
            cross-entropy over them) or ``paper`` (Eq. 3: ``softmax(x_hat . a_k / tau)``).
        unrelated_prior: ``released`` (``kl_loss`` between the semantic-unrelated feature and a
            fresh N(0, 1) sample, both softmaxed over channels at temperature tau) or ``paper``
            (Eq. 4: the closed-form KL of a unit Gaussian fitted per feature to N(0, 1)).
        tau: temperature of the alignment (Eq. 6) and of the paper's Eq. 3 (0.1).
        bandwidths: MMD kernel variances ``v`` of ``exp(-||x - y||^2 / (2 v))`` (released {2, 5, 10,
            20, 40, 80}, its sigma list used as variances; the paper's sigma {2, 5, 10, 20, 40, 60}
            of Eq. 2 is ``v = sigma^2`` = {4, 25, 100, 400, 1600, 3600}: ``PAPER_BANDWIDTHS``).
        structure_weight: lambda of Eq. 7 (released ``STRUCTURE_WEIGHT`` 0.001; paper 0.002).
        weight_align / weight_relation / weight_recon: released ``WEIGHT_1`` / ``WEIGHT_2`` /
            ``WEIGHT_3`` (1, 1, 0.5): ``W1 (align + 0.5 unrelated) + W2 0.2 relation + W3 recon``.
        cls_weight: the generator's extra classification term on the synthetic seen features
            (released ``0.001 * CE(new_fc(fake_seen)[:, seen])``; 0 turns it off, the paper has none).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    generator: Literal["primitive", "gmmn"] = "primitive"
    text_dim: int = Field(512, ge=1)
    feature_dim: int = Field(256, ge=1)
    primitives: int = Field(400, ge=1)
    layers: int = Field(3, ge=1)
    heads: int = Field(8, ge=1)
    ffn: int = Field(1024, ge=1)
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    noise: bool = True
    gmmn_hidden: int = Field(256, ge=1)
    gmmn_noise_dim: int | None = Field(None, ge=1)
    gmmn_dropout: float = Field(0.4, ge=0.0, lt=1.0)
    disentangle: bool = True
    align: bool = True
    ed_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    relation: Literal["released", "paper"] = "released"
    unrelated_prior: Literal["released", "paper"] = "released"
    tau: float = Field(0.1, gt=0.0)
    bandwidths: tuple[float, ...] = RELEASED_BANDWIDTHS
    structure_weight: float = Field(0.001, ge=0.0)
    weight_align: float = Field(1.0, ge=0.0)
    weight_relation: float = Field(1.0, ge=0.0)
    weight_recon: float = Field(0.5, ge=0.0)
    cls_weight: float = Field(0.001, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> GeneratorConfig:
        if self.feature_dim % self.heads:
            raise ValueError(f"model.feature_dim {self.feature_dim} must be a multiple of model.heads {self.heads}")
        if not self.bandwidths or any(b <= 0 for b in self.bandwidths):
            raise ValueError(f"model.bandwidths must be positive kernel variances, got {list(self.bandwidths)}")
        return self


class RetrainConfig(BaseModel):
    """``train_generator.classifier``: retraining the linear class head over query embeddings with real
    seen features plus synthetic unseen ones (PADing Sec. 3.2, Algorithm 1 step 4; released
    ``forward_train_classifier``).

    Fields:
        momentum / weight_decay: the head's SGD (released 0.9, 5e-4; no schedule; its lr is
            ``train_generator.train.lr``, released ``BASE_LR`` 1e-3).
        unseen_weight: cross-entropy weight of the unseen classes (released ``CLASS_ECO`` 5).
        no_object_weight: weight of the no-object class (released 0.1).
        unseen_per_step: synthetic unseen features per step (released ``NUM_CHOOSE`` 17, i.e. one for
            each unseen class when there are fewer; ``randperm(N_u)[:n]``).
        head_init: ``released`` (``tools/preprocess_pretrained_weight.py``: the pretrained ``K + 1`` rows
            copied to rows ``0..K`` of the new head in the seen-first order, so the old no-object row
            lands on the first unseen class and the new no-object row is zero) or ``mapped`` (each seen
            class's row to its class, the no-object row to the new no-object, unseen rows zero).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    unseen_weight: float = Field(5.0, ge=0.0)
    no_object_weight: float = Field(0.1, ge=0.0)
    unseen_per_step: int = Field(17, ge=1)
    head_init: Literal["released", "mapped"] = "released"


__all__ = ["PAPER_BANDWIDTHS", "PAPER_SIGMAS", "RELEASED_BANDWIDTHS", "GeneratorConfig", "RetrainConfig"]
