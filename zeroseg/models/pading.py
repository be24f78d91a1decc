"""PADing (He et al., CVPR 2023): synthetic unseen query embeddings from class text, and the mask
model whose linear class head is retrained on real seen plus synthetic unseen embeddings.

Algorithm 1 of the paper, as this project splits it:

1. the mask classification model is ``pretrain_proposals`` with ``class_head: linear``
   (``zeroseg.models.maskformer.MaskFormer``: ``Linear(hidden, K + 1)`` over its query embeddings);
2. its query embeddings on the training images, matched to the seen ground-truth segments, are an
   artifact (stage ``extract_features``; :func:`query_labels`);
3. a generator maps class text embeddings to query embeddings (:class:`PrimitiveGenerator`, Eq. 1;
   or :class:`GMMNGenerator`, the ZS3Net baseline), trained with MMD (:func:`mmd_loss`, Eq. 2) and
   the disentanglement (:class:`Disentangler`, Eqs. 3-5) and relationship alignment
   (:func:`alignment_loss`, Eq. 6) losses (:meth:`FeatureGenerator.generator_losses`, Eq. 7);
4. the class head, extended to every training class (:func:`extend_head`), is retrained on real
   seen and synthetic unseen embeddings (:meth:`FeatureGenerator.classifier_loss`).

The segmenter (:class:`PADing`) is the frozen mask model with that head.

Released code (heshuting555/PADing ``PADing/PADing_model.py``, ``PADing/utils/network_utils.py``;
``../shared/papers/released-code.md`` section 3) is the default; each departure from the paper is
noted where it is made. Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zeroseg.config import validated
from zeroseg.config.pading import GeneratorConfig, RetrainConfig
from zeroseg.errors import ConfigError
from zeroseg.models import Segmenter
from zeroseg.models.maskformer import DecoderLayer, MaskFormer

# =============================================================================================
# losses
# =============================================================================================


def mmd_loss(fake: torch.Tensor, real: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """Maximum mean discrepancy between synthetic and real features (PADing Eq. 2; ZS3Net / GMMN).

    Biased estimator per kernel ``k_v(x, y) = exp(-||x - y||^2 / (2 v))``:
    ``MMD^2_v = mean k_v(f, f) + mean k_v(r, r) - 2 mean k_v(f, r)``; the loss is
    ``sqrt(sum_v MMD^2_v)`` (released ``GMMNLoss.moment_loss``, whose sigma list {2, 5, 10, 20, 40,
    80} enters as ``v``, i.e. as variances; the paper writes ``exp(-||f - f'||^2 / (2 sigma^2))``
    with sigma in {2, 5, 10, 20, 40, 60}, i.e. ``v = sigma^2``:
    ``zeroseg.config.pading.PAPER_BANDWIDTHS``). The square root is taken of ``max(sum, 1e-12)``
    (0 for identical samples, finite gradient).

    Args:
        fake: ``[M, d]`` synthetic features; real: ``[N, d]`` real features.
        bandwidths: the kernel variances ``v = sigma^2`` (not the bandwidths sigma).

    Returns:
        0-d float32 tensor >= 0 (unitless).

    Raises:
        ValueError: not 2-D, other feature sizes, or an empty side.
    """
    if fake.ndim != 2 or real.ndim != 2 or fake.shape[1] != real.shape[1]:
        raise ValueError(f"mmd_loss needs [M, d] and [N, d] features, got {tuple(fake.shape)} and {tuple(real.shape)}")
    if not len(fake) or not len(real):
        raise ValueError("mmd_loss needs at least one synthetic and one real feature")
    x = torch.cat([fake.float(), real.float()])
    sq = x.pow(2).sum(1, keepdim=True)
    d2 = (sq + sq.T - 2 * x @ x.T).clamp(min=0)  # [M+N, M+N] squared distances
    m, n = len(fake), len(real)
    s = torch.cat([x.new_full((m,), 1.0 / m), x.new_full((n,), -1.0 / n)])
    total = x.new_zeros(())
    for v in bandwidths:
        total = total + s @ torch.exp(-d2 / (2.0 * float(v))) @ s
    return total.clamp(min=1e-12).sqrt()


def softmax_kl(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """``sum_rows KL(softmax(target / tau) || softmax(pred / tau)) / pred.numel()`` (released
    ``kl_loss``, T = 0.1: ``F.kl_div(log_softmax(pred/T), log_softmax(target/T), reduction="sum",
    log_target=True) / numel``). Rows are distributions over the last dimension.

    Args:
        pred, target: ``[N, K]`` scores (similarities, or features).

    Returns:
        0-d tensor >= 0.
    """
    if pred.shape != target.shape:
        raise ValueError(f"softmax_kl needs equal shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if pred.numel() == 0:
        return pred.sum() * 0.0
    lp, lt = F.log_softmax(pred.float() / tau, -1), F.log_softmax(target.float() / tau, -1)
    return (lt.exp() * (lt - lp)).sum() / pred.numel()


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, M]`` cosine similarities of the rows of ``a [N, k]`` and ``b [M, k]``."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def alignment_loss(
    feat_seen: torch.Tensor,
    feat_unseen: torch.Tensor,
    sem_seen: torch.Tensor,
    sem_unseen: torch.Tensor,
    tau: float = 0.1,
) -> torch.Tensor:
    """Relationship alignment (PADing Eq. 6): the row-wise softmax (temperature ``tau``) of the
    cosine similarities between features is pulled to that of their classes' semantic vectors,
    :func:`softmax_kl`, averaged over the three released terms: seen-seen, unseen-unseen and
    seen-unseen (intra- and inter-group alignment). Released: the features are the synthetic
    ones (the seen features generated for the batch's matched classes), the semantic vectors the
    projected class embeddings; the paper allows real seen features too.

    Args:
        feat_seen ``[M, k]``, feat_unseen ``[U, k]``: (semantic-related) features;
        sem_seen ``[M, k']``, sem_unseen ``[U, k']``: the semantic vectors of their classes.

    Returns:
        0-d tensor >= 0.
    """
    terms = [
        softmax_kl(cosine_matrix(feat_seen, feat_seen), cosine_matrix(sem_seen, sem_seen), tau),
        softmax_kl(cosine_matrix(feat_unseen, feat_unseen), cosine_matrix(sem_unseen, sem_unseen), tau),
        softmax_kl(cosine_matrix(feat_seen, feat_unseen), cosine_matrix(sem_seen, sem_unseen), tau),
    ]
    return sum(terms) / 3.0


def gaussian_kl(x: torch.Tensor) -> torch.Tensor:
    """PADing Eq. 4 read as a closed form: each feature row's channels as samples of a Gaussian
    ``N(mu, s^2)``, ``KL(N(mu, s^2) || N(0, 1)) = (s^2 + mu^2 - 1 - log s^2) / 2``, mean over
    rows (the paper's variant; released: :func:`softmax_kl` against a N(0, 1) sample)."""
    mu = x.float().mean(-1)
    var = x.float().var(-1, unbiased=False).clamp(min=1e-6)
    return (0.5 * (var + mu.pow(2) - 1.0 - var.log())).mean()


# =============================================================================================
# generators and the disentanglement heads
# =============================================================================================


class NoisyDecoderLayer(DecoderLayer):
    """DETR's post-norm decoder layer with PADing's noise (released ``TransformerDecoderLayer(...,
    noise=True)``), for one query token per sample::

        t = norm1(t + drop(self_attn(t, t, t)))
        t = t + drop(cross_attn(t, P, P));  t = t + z, z ~ N(0, 1)     (Eq. 1's Z)
        t = norm2(t)
        t = norm3(t + drop(linear2(drop(relu(linear1(t))))))

    ``forward(t [N, 1, d], memory [N, P, d]) -> [N, 1, d]``. The layers (and their names) are
    MaskFormer's :class:`~zeroseg.models.maskformer.DecoderLayer`'s; no query / key positions.
    """

    def __init__(self, d: int, heads: int, ffn: int, dropout: float, noise: bool) -> None:
        super().__init__(d, heads, ffn, dropout)
        self.noise = noise

    def forward(self, t: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        t = self.norm1(t + self.drop1(self.self_attn(t, t, t, need_weights=False)[0]))
        t = t + self.drop2(self.cross_attn(t, memory, memory, need_weights=False)[0])
        if self.noise:
            t = t + torch.randn_like(t)
        t = self.norm2(t)
        return self.norm3(t + self.drop3(self.linear2(self.drop(F.relu(self.linear1(t))))))


class PrimitiveGenerator(nn.Module):
    """Primitive cross-modal generator (PADing Eq. 1, Fig. 3; released ``dict_feature`` +
    ``TransformerDecoder``): ``P`` learnable primitives ``[P, d]`` (``nn.Embedding``) are the
    memory; the query is the projected class embedding; ``layers`` :class:`NoisyDecoderLayer` and
    a final LayerNorm; the output is a synthetic query embedding.

    Released vs paper: the paper runs self-attention on the primitives and a linear layer
    ``omega_1`` after ``softmax(QK^T/sqrt d) V + A + Z``; the released code runs self-attention on
    the single query token, uses the primitives as raw memory and the FFN + LayerNorm play
    ``omega_1``'s part. This follows the code.

    ``forward(query [N, d]) -> [N, d]`` (``query``: ``fc_projection`` of the class text embeddings).
    """

    def __init__(self, d: int, primitives: int, layers: int, heads: int, ffn: int, dropout: float, noise: bool):
        super().__init__()
        self.primitives = nn.Embedding(primitives, d)
        self.layers = nn.ModuleList([NoisyDecoderLayer(d, heads, ffn, dropout, noise) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        for p in self.layers.parameters():  # DETR's Transformer._reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if query.ndim != 2:
            raise ValueError(f"PrimitiveGenerator needs queries [N, d], got {tuple(query.shape)}")
        t = query[:, None]
        mem = self.primitives.weight[None].expand(len(query), -1, -1)
        for layer in self.layers:
            t = layer(t, mem)
        return self.norm(t)[:, 0]


class GMMNGenerator(nn.Module):
    """ZS3Net's GMMN generator (the paper's baseline "G", Tables 1-2; released ``GMMNnetwork``):
    ``[a, z] -> Linear -> LeakyReLU(0.2) -> Dropout(0.4) -> Linear -> d``, ``z ~ N(0, 1)`` of
    ``noise_dim``, Xavier-uniform weights and biases 0.01.

    ``forward(text [N, D]) -> [N, d]``.
    """

    def __init__(self, text_dim: int, noise_dim: int, hidden: int, d: int, dropout: float) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(
            nn.Linear(text_dim + noise_dim, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout), nn.Linear(hidden, d)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0.01)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        z = torch.randn(len(text), self.noise_dim, device=text.device, dtype=text.dtype)
        return self.net(torch.cat([text, z], 1))


def _encoder(d: int, dropout: float) -> nn.Sequential:
    """Released ``Encoder``: ``Linear(d, d) -> Linear(d, d) -> LeakyReLU(0.2) -> Dropout`` (E_R, E_U)."""
    return nn.Sequential(nn.Linear(d, d), nn.Linear(d, d), nn.LeakyReLU(0.2), nn.Dropout(dropout))


class RelationNet(nn.Module):
    """Released ``RelationNet``: ``score(x, a) = sigmoid(fc2(relu(fc1([x, a]))))`` for every (feature,
    class vector) pair. ``forward(x [N, d], a [C, d]) -> [N, C]`` in (0, 1)."""

    def __init__(self, d: int, a_dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d + a_dim, d), nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        n, c = len(x), len(a)
        pairs = torch.cat([x[:, None].expand(n, c, -1), a[None].expand(n, c, -1)], -1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pairs))))[..., 0]


class Disentangler(nn.Module):
    """Feature disentanglement (PADing Eqs. 3-5): ``related`` = E_R (semantic-related part),
    ``unrelated`` = E_U, ``decoder`` = D (released ``Decoder``: ``Linear(2d, d) -> LeakyReLU ->
    Dropout -> Linear(d, d) -> LeakyReLU -> Dropout``), ``relation`` = :class:`RelationNet`."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.related = _encoder(d, dropout)
        self.unrelated = _encoder(d, dropout)
        self.decoder = nn.Sequential(
            nn.Linear(2 * d, d),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
            nn.Linear(d, d),
            nn.LeakyReLU(0.2),
            nn.Dropout(dropout),
        )
        self.relation = RelationNet(d, d)


# =============================================================================================
# the generator + head being trained (train_generator)
# =============================================================================================


class FeatureGenerator(nn.Module):
    """What train_generator trains: ``projection`` (released ``fc_projection``: ``Linear(D, d)``),
    the generator, the disentanglement heads (when ``disentangle``) and ``head``, the class head
    ``Linear(d, C + 1)`` over all ``C`` training classes (last column no-object).

    Args:
        cfg: :class:`GeneratorConfig` (or its dict).
        num_classes: ``C``, the training vocabulary's classes (seen + unseen).
        seen / unseen: their class ids (``classes.json`` ``train``).
        class_text: ``[C, D]`` the classes' L2-normalised text embeddings (a buffer).

    Raises:
        ConfigError: text embeddings whose size differs from ``cfg.text_dim``; an empty seen or
            unseen set.
    """

    def __init__(
        self,
        cfg: GeneratorConfig | Mapping[str, Any],
        num_classes: int,
        seen: Sequence[int],
        unseen: Sequence[int],
        class_text: torch.Tensor,
    ) -> None:
        super().__init__()
        c = validated(GeneratorConfig, cfg, "model")
        self.config = c
        if class_text.ndim != 2 or class_text.shape != (num_classes, c.text_dim):
            raise ConfigError(
                f"the class text embeddings are {tuple(class_text.shape)}, the generator reads "
                f"[{num_classes}, model.text_dim {c.text_dim}]: set train_generator.model.text_dim to the CLIP "
                "model's embedding size"
            )
        if not seen or not unseen:
            raise ConfigError(f"PADing needs seen and unseen classes, got {len(seen)} seen and {len(unseen)} unseen")
        self.num_classes = int(num_classes)
        self.register_buffer("class_text", class_text.detach().float().clone())
        self.register_buffer("seen", torch.tensor([int(s) for s in seen], dtype=torch.long))
        self.register_buffer("unseen", torch.tensor([int(u) for u in unseen], dtype=torch.long))
        seen_index = torch.full((num_classes,), -1, dtype=torch.long)
        seen_index[self.seen] = torch.arange(len(seen))
        self.register_buffer("seen_index", seen_index)
        d = c.feature_dim
        self.projection = nn.Linear(c.text_dim, d)
        if c.generator == "primitive":
            self.generator: nn.Module = PrimitiveGenerator(
                d, c.primitives, c.layers, c.heads, c.ffn, c.dropout, c.noise
            )
        else:
            self.generator = GMMNGenerator(c.text_dim, c.gmmn_noise_dim or c.text_dim, c.gmmn_hidden, d, c.gmmn_dropout)
        self.disentangler = Disentangler(d, c.ed_dropout) if c.disentangle else None
        self.head = nn.Linear(d, num_classes + 1)

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything the generator's optimiser updates (released: generator, ``fc_projection``,
        primitives, E_R, E_U, relation net, decoder); not the head."""
        return [p for n, p in self.named_parameters() if not n.startswith("head.")]

    def generate(self, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Synthetic query embeddings of ``class_ids [N]`` -> ``(features [N, d], projected class
        vectors [N, d])``."""
        vec = self.projection(self.class_text[class_ids])
        if self.config.generator == "primitive":
            return self.generator(vec), vec
        return self.generator(self.class_text[class_ids]), vec

    def generator_losses(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The generator's loss (PADing Eq. 7 as released ``forward_train_generator``).

        Args:
            real: ``[M, d]`` real query embeddings matched to seen segments; labels: ``[M]`` their
                class ids (seen).

        Returns:
            ``{"loss", "mmd", "cls", "align", "relation", "unrelated", "recon"}`` (0-d tensors):
            ``loss = mmd + cls_weight * CE(head(fake)[:, seen], seen index) + structure_weight *
            (weight_align * (align + unrelated) + weight_relation * relation + weight_recon *
            recon)`` with ``unrelated`` already halved and ``relation`` already x 0.2 (released).
            Parts switched off (``align``, ``disentangle``) are 0.

        Raises:
            ValueError: no real feature, or a label that is not a seen class.
        """
        c = self.config
        if not len(real):
            raise ValueError("generator_losses needs at least one real seen feature")
        if bool((self.seen_index[labels] < 0).any()):
            raise ValueError(f"generator_losses: labels {sorted(set(labels.tolist()))} include non-seen classes")
        fake_s, vec_s = self.generate(labels)
        zero = real.new_zeros((), dtype=torch.float32)
        out = {"mmd": mmd_loss(fake_s, real, c.bandwidths)}
        out["cls"] = (
            F.cross_entropy(self.head(fake_s)[:, self.seen].float(), self.seen_index[labels])
            if c.cls_weight > 0
            else zero
        )
        out.update(align=zero, relation=zero, unrelated=zero, recon=zero)
        if c.align or c.disentangle:
            fake_u, vec_u = self.generate(self.unseen)
            dis = self.disentangler
            rel_s, rel_u = (dis.related(fake_s), dis.related(fake_u)) if dis is not None else (fake_s, fake_u)
            if c.align:
                out["align"] = alignment_loss(rel_s, rel_u, vec_s, vec_u, c.tau)
            if dis is not None:
                unrel_s, unrel_u = dis.unrelated(fake_s), dis.unrelated(fake_u)
                rec_s = dis.decoder(torch.cat([rel_s, unrel_s], -1))
                rec_u = dis.decoder(torch.cat([rel_u, unrel_u], -1))
                out["recon"] = (F.l1_loss(rec_s.float(), fake_s.float()) + F.l1_loss(rec_u.float(), fake_u.float())) / 2
                if c.unrelated_prior == "released":
                    kl_s = softmax_kl(unrel_s, torch.randn_like(unrel_s), c.tau)
                    kl_u = softmax_kl(unrel_u, torch.randn_like(unrel_u), c.tau)
                else:
                    kl_s, kl_u = gaussian_kl(unrel_s), gaussian_kl(unrel_u)
                out["unrelated"] = 0.5 * (kl_s + kl_u) / 2
                vec_all = self.projection(self.class_text)
                u_targets = torch.arange(len(self.unseen), device=real.device)
                if c.relation == "released":  # CE over sigmoid relation scores (released)
                    ce_s = F.cross_entropy(dis.relation(rel_s, vec_all).float(), labels)
                    ce_u = F.cross_entropy(dis.relation(rel_u, vec_u).float(), u_targets)
                else:  # Eq. 3: softmax(x_hat . a_k / tau)
                    ce_s = F.cross_entropy((rel_s @ vec_all.T).float() / c.tau, labels)
                    ce_u = F.cross_entropy((rel_u @ vec_u.T).float() / c.tau, u_targets)
                out["relation"] = 0.2 * (ce_s + ce_u) / 2
        structure = (
            c.weight_align * (out["align"] + out["unrelated"])
            + c.weight_relation * out["relation"]
            + c.weight_recon * out["recon"]
        )
        out["loss"] = out["mmd"] + c.cls_weight * out["cls"] + c.structure_weight * structure
        return out

    def classifier_loss(
        self,
        real: torch.Tensor,
        labels: torch.Tensor,
        retrain: RetrainConfig | Mapping[str, Any],
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The head's retraining loss (PADing Algorithm 1 step 4; released
        ``forward_train_classifier``): cross-entropy of ``head`` over the real query embeddings
        (``labels``: class id, or ``C`` = no-object) and ``min(unseen_per_step, U)`` synthetic
        unseen embeddings (one per class drawn without replacement, no gradient to the generator),
        class weights unseen ``unseen_weight``, no-object ``no_object_weight``, others 1.

        Returns:
            0-d tensor.
        """
        r = validated(RetrainConfig, retrain, "classifier")
        pick = torch.randperm(len(self.unseen), generator=generator)[: r.unseen_per_step].to(self.unseen.device)
        ids = self.unseen[pick]
        with torch.no_grad():
            fake_u, _ = self.generate(ids)
        x = torch.cat([real.float(), fake_u.float()])
        y = torch.cat([labels.long(), ids])
        w = torch.ones(self.num_classes + 1, device=x.device)
        w[self.unseen] = r.unseen_weight
        w[-1] = r.no_object_weight
        return F.cross_entropy(self.head(x).float(), y, w)


def extend_head(
    weight: torch.Tensor, bias: torch.Tensor, seen: Sequence[int], unseen: Sequence[int], num_classes: int, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained ``linear`` head ``[K + 1, d]`` (rows in ``seen`` order, last no-object)
    extended to ``[C + 1, d]`` over all training classes (last no-object).

    ``mode="released"`` (``tools/preprocess_pretrained_weight.py``, whose class order is seen first,
    then unseen): rows ``0..K`` copied in that order, so row ``seen[i]`` <- row ``i``, the first
    unseen class <- the old no-object row, the new no-object row and the other unseen rows zero.
    ``mode="mapped"``: row ``seen[i]`` <- row ``i``, no-object <- no-object, unseen rows zero.

    Raises:
        ValueError: a head without ``len(seen) + 1`` rows; an unknown mode.
    """
    if weight.shape[0] != len(seen) + 1 or bias.shape != (weight.shape[0],):
        raise ValueError(
            f"the pretrained head has {weight.shape[0]} rows; {len(seen)} seen classes + no-object expected"
        )
    w = weight.new_zeros(num_classes + 1, weight.shape[1])
    b = bias.new_zeros(num_classes + 1)
    idx = torch.tensor([int(s) for s in seen], dtype=torch.long)
    w[idx], b[idx] = weight[:-1], bias[:-1]
    if mode == "released":
        if len(unseen):
            w[int(unseen[0])], b[int(unseen[0])] = weight[-1], bias[-1]
    elif mode == "mapped":
        w[-1], b[-1] = weight[-1], bias[-1]
    else:
        raise ValueError(f"head_init must be 'released' or 'mapped', got {mode!r}")
    return w, b


# =============================================================================================
# real features: matched query labels
# =============================================================================================


def query_labels(
    pred_logits: torch.Tensor, pred_masks: torch.Tensor, targets: list[dict[str, torch.Tensor]], matcher: Any
) -> torch.Tensor:
    """The label of every query (released PADing feature collection: Hungarian matching of the
    frozen model's predictions to the ground-truth segments; matched queries take their segment's
    class, the others no-object).

    Args:
        pred_logits: ``[B, Q, K + 1]``; pred_masks: ``[B, Q, h, w]``.
        targets: per image ``{"labels": int64 [N] (head indices 0..K-1), "masks": [N, H, W]}``.
        matcher: ``zeroseg.models.maskformer.HungarianMatcher``.

    Returns:
        ``int64 [B, Q]``: the matched target's label, ``-1`` for unmatched queries.
    """
    out = torch.full(pred_logits.shape[:2], -1, dtype=torch.long)
    for b, (rows, cols) in enumerate(matcher({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)):
        out[b, rows] = targets[b]["labels"].cpu().long()[cols]
    return out


# =============================================================================================
# the segmenter
# =============================================================================================


class PADing(Segmenter):
    """The PADing segmenter: the pretrained mask model (``MaskFormer`` with the ``linear`` head, frozen)
    whose query embeddings are classified by the retrained head over all training classes.

    Args:
        clip_model: unused (the segmenter contract; the CLIP spec records the text embeddings' model).
        cfg: ``{"proposals": proposals.json content, "classes": C, "text_dim": D}``.

    Attributes: ``proposals`` (MaskFormer), ``head`` (``Linear(hidden, C + 1)``), ``class_text``
    (buffer ``[C, D]``, the training classes' text embeddings); ``input_size``, ``mean``, ``std``,
    ``size_divisibility`` of the mask model; ``scores_are_probabilities``.

    ``forward(images [B, 3, H, W], text_embeddings [C', D]) -> [B, C', H, W]``: released
    ``semantic_inference`` with the new head: ``einsum(softmax(head(query_embed))[..., :C],
    sigmoid(mask logits upsampled bilinearly to the input))``. The head is closed-vocabulary: an
    evaluation class is scored as the training class whose text embedding equals its own (cosine
    > 1 - 1e-4; embed_text embeds each prompt name once), and 0 when there is none (never predicted).

    Raises:
        ConfigError: a proposals description without the ``linear`` head.
    """

    scores_are_probabilities = True

    def __init__(self, clip_model: nn.Module | None, cfg: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = dict(cfg or {})
        for k in ("proposals", "classes", "text_dim"):
            if k not in cfg:
                raise ConfigError(f"PADing needs {k!r} in its model config (written by train_generator)")
        doc = cfg["proposals"]
        pcfg = dict(doc["model"])
        if doc.get("class_head", pcfg.get("class_head")) != "linear":
            raise ConfigError(f"PADing needs a proposal model with class_head 'linear', got {doc.get('class_head')!r}")
        self.cfg = {"proposals": doc, "classes": int(cfg["classes"]), "text_dim": int(cfg["text_dim"])}
        self.proposals = MaskFormer(pcfg, int(doc["num_classes"]), load_backbone_weights=False)
        self.proposals.requires_grad_(False)
        self.head = nn.Linear(int(doc["hidden_dim"]), self.cfg["classes"] + 1)
        self.register_buffer("class_text", torch.zeros(self.cfg["classes"], self.cfg["text_dim"]))
        inp = doc["input"]
        self.input_size = tuple(int(s) for s in inp["size"])
        self.mean = tuple(float(m) for m in inp["mean"])
        self.std = tuple(float(s) for s in inp["std"])
        self.size_divisibility = int(pcfg.get("size_divisibility", 1))

    def class_map(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """``int64 [C']``: the training class of each evaluation class (equal text embedding), -1 if none."""
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.class_text.shape[1]:
            raise ValueError(
                f"PADing needs text embeddings [C, {self.class_text.shape[1]}], got {tuple(text_embeddings.shape)}"
            )
        sim = cosine_matrix(text_embeddings.to(self.class_text.device), self.class_text)  # [C', C]
        best, idx = sim.max(1)
        return torch.where(best > 1 - 1e-4, idx, torch.full_like(idx, -1))

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        out = self.proposals(images)
        masks = F.interpolate(out["pred_masks"].float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        cls = self.head(out["query_embed"].float()).softmax(-1)[..., :-1]  # [B, Q, C]
        scores = torch.einsum("bqc,bqhw->bchw", cls, masks.sigmoid())
        m = self.class_map(text_embeddings)
        picked = scores[:, m.clamp(min=0)]
        return torch.where((m >= 0).view(1, -1, 1, 1), picked, torch.zeros_like(picked))


def primitives_of(model: nn.Module) -> torch.Tensor | None:
    """The primitives ``[P, d]`` of a :class:`FeatureGenerator` (None for GMMN)."""
    g = getattr(model, "generator", None)
    return g.primitives.weight if isinstance(g, PrimitiveGenerator) else None


__all__ = [
    "Disentangler",
    "FeatureGenerator",
    "GMMNGenerator",
    "NoisyDecoderLayer",
    "PADing",
    "PrimitiveGenerator",
    "RelationNet",
    "alignment_loss",
    "cosine_matrix",
    "extend_head",
    "gaussian_kl",
    "mmd_loss",
    "primitives_of",
    "query_labels",
    "softmax_kl",
]
