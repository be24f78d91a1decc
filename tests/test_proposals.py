"""The mask proposal model (MaskFormer): matching against brute force, the mask losses and the set
criterion by hand, model shapes per head and backbone, gradients, the artifact, proposal recall
on handcrafted masks, and the config's errors."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroseg.config import validated
from zeroseg.config.proposals import ProposalConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.losses import mask_dice_loss, mask_focal_loss, semantic_to_targets
from zeroseg.models import WeightsMismatchError
from zeroseg.models.clip import TINY_MODEL, ClipSpec, load_clip
from zeroseg.models.maskformer import (
    IMAGENET_MEAN,
    HungarianMatcher,
    MaskFormer,
    SetCriterion,
    batch_dice_cost,
    batch_sigmoid_focal_cost,
    hungarian_match,
    load_proposal_model,
    num_masks_across_workers,
    read_proposals_json,
    save_proposals,
    semantic_scores,
    vit_pyramid_layers,
)
from zeroseg.models.position import sine_position_encoding
from zeroseg.proposal_recall import RecallCounts, proposal_recall, segment_max_iou

TINY = ClipSpec(model=TINY_MODEL, random_init=True)
#: a small model: 5 queries, hidden 32, 2 decoder layers
SMALL = dict(
    backbone="resnet18",
    num_queries=5,
    hidden_dim=32,
    dec_layers=2,
    nheads=4,
    dim_feedforward=64,
    conv_dim=16,
    mask_dim=16,
)
LN2, LN3, LN43 = math.log(2), math.log(3), math.log(4 / 3)


@pytest.fixture(scope="module")
def clip_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(TINY)


def _text(k: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(k, d, generator=g), dim=-1)


# --------------------------------------------------------------------------- matching


def _brute_force(cost: np.ndarray) -> float:
    q, n = cost.shape
    if q >= n:
        return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(q), n))
    return min(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(n), q))


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (5, 5), (5, 3), (6, 2), (2, 4), (4, 1)])
def test_hungarian_match_equals_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.normal(size=shape)
        rows, cols = hungarian_match(torch.tensor(cost))
        assert len(rows) == len(cols) == min(shape)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        assert rows.tolist() == sorted(rows.tolist())
        assert cost[rows, cols].sum() == pytest.approx(_brute_force(cost), abs=1e-9)


def test_hungarian_match_edge_cases():
    rows, cols = hungarian_match(np.zeros((3, 0)))
    assert rows.size == cols.size == 0
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match=r"\[Q, N\]"):
        hungarian_match(np.zeros(3))


# --------------------------------------------------------------------------- losses by hand

# 2 x 2 mask logits with sigmoids 0.5, 0.75, 0.25, 0.5 and a target [[1, 0], [1, 0]]
X = torch.tensor([[[0.0, LN3], [-LN3, 0.0]]])
Y = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
# focal, alpha 0.25, gamma 2, per pixel alpha_t (1 - p_t)^2 (-log p_t):
#   (p .5, y 1): .25 * .25 * ln2;  (p .75, y 0): .75 * .5625 * ln4
#   (p .25, y 1): .25 * .5625 * ln4;  (p .5, y 0): .75 * .25 * ln2   -> sum 1.375 ln2, mean / 4
FOCAL_XY = 1.375 * LN2 / 4
# dice: 1 - (2 * .75 + 1) / (2 + 2 + 1) = 0.5
DICE_XY = 0.5
# against an empty target: (.5, 0): .75*.25*ln2 twice; (.75, 0): .75*.5625*ln4; (.25, 0): .75*.0625*ln(4/3)
FOCAL_X0 = (2 * 0.1875 * LN2 + 0.421875 * 2 * LN2 + 0.046875 * LN43) / 4
DICE_X0 = 1 - 1 / (2 + 0 + 1)


def test_mask_focal_and_dice_losses_by_hand():
    x, y = X.flatten(1), Y.flatten(1)
    assert float(mask_focal_loss(x, y, 1.0)) == pytest.approx(FOCAL_XY, rel=1e-6)
    assert float(mask_dice_loss(x, y, 1.0)) == pytest.approx(DICE_XY, rel=1e-6)
    # summed over masks, divided by num_masks
    x2, y2 = torch.cat([x, x]), torch.cat([y, torch.zeros_like(y)])
    assert float(mask_focal_loss(x2, y2, 2.0)) == pytest.approx((FOCAL_XY + FOCAL_X0) / 2, rel=1e-6)
    assert float(mask_dice_loss(x2, y2, 4.0)) == pytest.approx((DICE_XY + DICE_X0) / 4, rel=1e-6)
    # alpha < 0: no balance; gamma 0: plain BCE = mean(-log p_t) = (ln2 + ln4 + ln4 + ln2) / 4
    assert float(mask_focal_loss(x, y, 1.0, alpha=-1, gamma=0)) == pytest.approx(6 * LN2 / 4, rel=1e-6)


def test_pairwise_costs_by_hand():
    targets = torch.cat([Y.flatten(1), torch.zeros(1, 4)])  # [2, 4]
    focal = batch_sigmoid_focal_cost(X.flatten(1), targets)
    dice = batch_dice_cost(X.flatten(1), targets)
    assert focal.shape == dice.shape == (1, 2)
    assert focal[0].tolist() == pytest.approx([FOCAL_XY, FOCAL_X0], rel=1e-6)
    assert dice[0].tolist() == pytest.approx([DICE_XY, DICE_X0], rel=1e-6)


def _obvious_case():
    """One image, 2 queries, K = 2, one target of class 1 with mask [[1, 0], [1, 0]].

    Query 0: class probabilities (.1, .6, .3) (exp-logits 1, 6, 3), mask logits (ln3, -ln3) per
    row (sigmoid .75 / .25); query 1: (.2, .1, .7), mask logits 0. Costs for the target:
    q0 = -.6 + 20 * (.03125 ln(4/3)) + .2 = -0.22; q1 = -.1 + 20 * (.125 ln2) + .4 = 2.03:
    query 0 is matched.
    """
    logits = torch.log(torch.tensor([[[1.0, 6.0, 3.0], [2.0, 1.0, 7.0]]]))
    masks = torch.zeros(1, 2, 2, 2)
    masks[0, 0] = torch.tensor([[LN3, -LN3], [LN3, -LN3]])
    target = {"labels": torch.tensor([1]), "masks": torch.tensor([[[True, False], [True, False]]])}
    return {"pred_logits": logits, "pred_masks": masks}, [target]


FOCAL_Q0 = 0.125 * LN43 / 4  # every pixel p_t = .75: alpha_t * .0625 * ln(4/3), alpha_t .25/.75/.25/.75
DICE_Q0 = 1 - (2 * 1.5 + 1) / (2 + 2 + 1)  # 0.2
CE = (-math.log(0.6) + 0.1 * -math.log(0.7)) / 1.1  # query 0 -> class 1 (weight 1), query 1 -> no-object (0.1)


def test_matcher_and_set_criterion_by_hand():
    outputs, targets = _obvious_case()
    ((rows, cols),) = HungarianMatcher()(outputs, targets)
    assert rows.tolist() == [0] and cols.tolist() == [0]
    crit = SetCriterion(2)
    out = crit(outputs, targets)
    assert float(out["loss_ce"]) == pytest.approx(CE, rel=1e-6)
    assert float(out["loss_mask"]) == pytest.approx(FOCAL_Q0, rel=1e-6)
    assert float(out["loss_dice"]) == pytest.approx(DICE_Q0, rel=1e-6)
    total = CE + 20 * FOCAL_Q0 + DICE_Q0
    assert float(out["loss"]) == pytest.approx(total, rel=1e-6)
    # deep supervision: each aux layer adds its own weighted terms (same outputs: the same amount)
    aux = crit({**outputs, "aux_outputs": [dict(outputs), dict(outputs)]}, targets)
    assert float(aux["loss"]) == pytest.approx(3 * total, rel=1e-6)
    assert float(aux["loss_ce"]) == pytest.approx(CE, rel=1e-6)
    # each aux layer is matched on its own: an aux layer with the two queries swapped is matched to
    # query 1 and costs exactly the final layer's total; reusing the final layer's indices (query 0)
    # would instead cost CE' + 20 * focal + dice of query 1's original prediction (probabilities
    # (.2, .1, .7), mask logits 0): CE' = (-ln .1 + .1 * -ln .3) / 1.1, focal .125 ln2 (p = .5
    # everywhere, alpha_t .25 / .75), dice 1 - (2 * 1 + 1) / (2 + 2 + 1) = .4
    swapped = {"pred_logits": outputs["pred_logits"][:, [1, 0]], "pred_masks": outputs["pred_masks"][:, [1, 0]]}
    ((rows, cols),) = HungarianMatcher()(swapped, targets)
    assert rows.tolist() == [1] and cols.tolist() == [0]
    aux = crit({**outputs, "aux_outputs": [swapped]}, targets)
    assert float(aux["loss"]) == pytest.approx(2 * total, rel=1e-6)
    reused = (-math.log(0.1) - 0.1 * math.log(0.3)) / 1.1 + 20 * 0.125 * LN2 + 0.4
    assert float(aux["loss"]) != pytest.approx(total + reused, rel=1e-3)
    # predictions at half the target's size are upsampled bilinearly: a constant map stays constant
    small = {"pred_logits": outputs["pred_logits"], "pred_masks": torch.zeros(1, 2, 1, 1)}
    big = [{"labels": torch.tensor([1]), "masks": torch.ones(1, 2, 2, dtype=torch.bool)}]
    # every pixel p = .5, y = 1: .25 * .25 * ln2; dice 1 - (2*2 + 1) / (2 + 4 + 1)
    out = SetCriterion(2)(small, big)
    assert float(out["loss_mask"]) == pytest.approx(0.0625 * LN2, rel=1e-6)
    assert float(out["loss_dice"]) == pytest.approx(1 - 5 / 7, rel=1e-6)


def test_set_criterion_normalisation_and_class_agnostic():
    outputs, targets = _obvious_case()
    # a second image without targets: its queries are all no-object, the mask count stays 1
    two = {k: torch.cat([v, v]) for k, v in outputs.items()}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 2, 2, dtype=torch.bool)}
    out = SetCriterion(2)(two, [targets[0], empty])
    ce = (-math.log(0.6) + 0.1 * (-math.log(0.7) - math.log(0.3) - math.log(0.7))) / (1 + 3 * 0.1)
    assert float(out["loss_ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(out["loss_mask"]) == pytest.approx(FOCAL_Q0, rel=1e-6)
    assert num_masks_across_workers([targets[0], targets[0], empty]) == 2.0
    assert num_masks_across_workers([empty]) == 1.0  # at least 1
    # objectness: K = 1, every label becomes "object" (class 0); logits (ln 6, ln 3) -> p(object) 2/3
    obj = {"pred_logits": torch.log(torch.tensor([[[6.0, 3.0], [1.0, 7.0]]])), "pred_masks": outputs["pred_masks"]}
    out = SetCriterion(1, class_agnostic=True)(obj, targets)  # label 1 mapped to 0
    assert float(out["loss_ce"]) == pytest.approx((-math.log(2 / 3) + 0.1 * -math.log(7 / 8)) / 1.1, rel=1e-6)
    with pytest.raises(ValueError, match=r"pred_logits \[B, Q, 3\]"):
        SetCriterion(2)(obj, targets)
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        SetCriterion(2)(outputs, [{"labels": torch.tensor([2]), "masks": targets[0]["masks"]}])


def test_semantic_to_targets_ignores_pixels_and_keeps_images():
    label = np.array([[3, 3, 255], [0, 255, 255]], np.uint8)
    t = semantic_to_targets(label)
    assert t["labels"].tolist() == [0, 3] and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.bool
    assert t["masks"].tolist() == [[[False, False, False], [True, False, False]], [[True, True, False], [False] * 3]]
    empty = semantic_to_targets(torch.full((2, 2), 255))
    assert empty["labels"].numel() == 0 and tuple(empty["masks"].shape) == (0, 2, 2)
    with pytest.raises(ValueError, match="integer"):
        semantic_to_targets(np.zeros((2, 2), np.float32))


# --------------------------------------------------------------------------- the model


@pytest.mark.parametrize("head", ["text", "linear", "objectness"])
def test_forward_shapes_per_head_resnet18(head):
    torch.manual_seed(0)
    m = MaskFormer({**SMALL, "class_head": head}, num_classes=3, text_dim=8)
    assert m.mean == IMAGENET_MEAN and m.num_queries == 5 and m.hidden_dim == 32 and m.class_head == head
    k = {"text": 4, "linear": 3, "objectness": 1}[head]  # text: the rows given at forward time
    x = torch.randn(2, 3, 64, 96)
    m.train()
    out = m(x, _text(4, 8))
    assert out["pred_logits"].shape == (2, 5, k + 1)
    assert out["pred_masks"].shape == (2, 5, 16, 24)
    assert out["query_embed"].shape == (2, 5, 32)
    assert len(out["aux_outputs"]) == 1  # dec_layers - 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (2, 5, k + 1)
    assert out["aux_outputs"][0]["pred_masks"].shape == (2, 5, 16, 24)
    m.eval()
    with torch.no_grad():
        ev = m(x, _text(4, 8))
    assert sorted(ev) == ["pred_logits", "pred_masks", "query_embed"]
    assert semantic_scores(ev["pred_logits"], ev["pred_masks"]).shape == (2, k, 16, 24)
    with pytest.raises(ValueError, match="size_divisibility 32"):
        m(torch.randn(1, 3, 48, 64), _text(4, 8))


def test_text_head_and_errors():
    m = MaskFormer({**SMALL, "class_head": "text", "logit_scale": 10.0}, num_classes=2, text_dim=8).eval()
    hs = torch.randn(3, 32)
    t = _text(2, 8)
    x = F.normalize(m.class_embed(hs), dim=-1)
    want = torch.cat([10 * x @ t.T, 10 * x @ m.bg_feature.T], dim=-1)  # released: raw no-object embedding
    assert torch.allclose(m.classify(hs, t), want, atol=1e-5)
    n = MaskFormer({**SMALL, "logit_scale": 10.0, "no_object_normalized": True}, num_classes=2, text_dim=8)
    n.load_state_dict(m.state_dict())
    assert torch.allclose(n.classify(hs, t)[:, -1], (10 * x @ F.normalize(m.bg_feature, dim=-1).T)[:, 0], atol=1e-5)
    with pytest.raises(ValueError, match=r"text_embeddings \[K, 8\]"):
        m(torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="text_dim"):
        MaskFormer(SMALL, num_classes=2)
    with pytest.raises(ConfigError, match="clip_visual"):
        MaskFormer({**SMALL, "backbone": "clip"}, num_classes=2, text_dim=8)
    with pytest.raises(ConfigError, match="unknown model key 'num_queris'"):
        MaskFormer({**SMALL, "num_queris": 3}, num_classes=2, text_dim=8)


def test_forward_shapes_clip_backbone(clip_model):
    m = MaskFormer({**SMALL, "backbone": "clip"}, num_classes=3, text_dim=64, clip_visual=clip_model.visual)
    assert m.backbone.layers == (0, 0, 0, 1) and vit_pyramid_layers(12) == (2, 5, 8, 11)
    assert m.mean == tuple(clip_model.visual.preprocess_cfg["mean"])
    assert m.backbone.visual is not clip_model.visual  # deep copy: the caller's tower is untouched
    feats = m.backbone(torch.randn(1, 3, 64, 96))
    assert [tuple(f.shape[-2:]) for f in feats.values()] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    m.train()
    out = m(torch.randn(2, 3, 64, 96), _text(3, 64))
    assert out["pred_logits"].shape == (2, 5, 4) and out["pred_masks"].shape == (2, 5, 16, 24)
    assert len(out["aux_outputs"]) == 1


def test_resnet_strides():
    m = MaskFormer(SMALL, num_classes=2, text_dim=8)
    feats = m.backbone(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in feats.items()} == {
        "res2": (64, 16, 16),
        "res3": (128, 8, 8),
        "res4": (256, 4, 4),
        "res5": (512, 2, 2),
    }
    assert isinstance(m.backbone.bn1, torch.nn.BatchNorm2d)  # random init: trainable BN


def test_gradients_reach_the_queries(clip_model):
    for cfg, text_dim, visual in [
        ({**SMALL, "class_head": "text"}, 8, None),
        ({**SMALL, "backbone": "clip", "class_head": "objectness"}, None, clip_model.visual),
    ]:
        torch.manual_seed(0)
        m = MaskFormer(cfg, num_classes=2, text_dim=text_dim, clip_visual=visual).train()
        label = np.full((64, 64), 255, np.uint8)
        label[:32] = 0
        label[40:, 8:] = 1
        out = m(torch.randn(1, 3, 64, 64), _text(2, 8))
        loss = m.criterion()(out, [semantic_to_targets(label)])["loss"]
        loss.backward()
        assert m.query_embed.weight.grad is not None and m.query_embed.weight.grad.abs().sum() > 0
        missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == []
        if visual is not None:
            assert m.backbone.visual.conv1.weight.grad.abs().sum() > 0


def test_semantic_scores_by_hand():
    # class probabilities (.125, .375 | no-object .5) and (.5, .25 | .25); mask sigmoids (.5, .75), (.25, .5)
    logits = torch.log(torch.tensor([[[1.0, 3.0, 4.0], [2.0, 1.0, 1.0]]]))
    masks = torch.tensor([[[[0.0, LN3]], [[-LN3, 0.0]]]])
    s = semantic_scores(logits, masks)
    assert s.shape == (1, 2, 1, 2)
    assert s[0, 0, 0].tolist() == pytest.approx([0.125 * 0.5 + 0.5 * 0.25, 0.125 * 0.75 + 0.5 * 0.5], rel=1e-5)
    assert s[0, 1, 0].tolist() == pytest.approx([0.375 * 0.5 + 0.25 * 0.25, 0.375 * 0.75 + 0.25 * 0.5], rel=1e-5)
    with pytest.raises(ValueError, match="pred_logits"):
        semantic_scores(logits, masks[:, :1])


def test_sine_position_encoding_values():
    pos = sine_position_encoding(2, 3, 8, torch.device("cpu"), torch.float64)
    assert pos.shape == (6, 8) and pos.dtype == torch.float64
    # y half (channels 0-3), frequency i: y_n / 10000^(2 floor(i/2) / 4); y_n = n / (h + 1e-6) * 2 pi
    y1 = 1 / (2 + 1e-6) * 2 * math.pi  # row 0
    x2 = 3 / (3 + 1e-6) * 2 * math.pi  # column 2
    assert float(pos[2, 0]) == pytest.approx(math.sin(y1), abs=1e-5)  # token 2: row 0, column 2
    assert float(pos[2, 1]) == pytest.approx(math.cos(y1), abs=1e-5)
    assert float(pos[2, 2]) == pytest.approx(math.sin(y1 / 100), abs=1e-5)
    assert float(pos[2, 7]) == pytest.approx(math.cos(x2 / 100), abs=1e-5)
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(2, 3, 6)


@pytest.mark.parametrize("h, w", [(1, 1), (2, 3), (7, 5), (32, 40), (40, 40)])
def test_sine_position_encoding_is_the_former_deop_one_bit_for_bit(h, w):
    """DeOP's heatmap decoder had its own copy, normalising by the Python number ``n + 1e-6``
    instead of the tensor ``y[-1] + 1e-6``: the same float32 divisor, so on the CPU the shared
    encoding equals it bit for bit (the copy below is that code)."""
    npf, eps, scale = 8, 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32) / (h + eps) * scale
    x = torch.arange(1, w + 1, dtype=torch.float32) / (w + eps) * scale
    k = torch.arange(npf, dtype=torch.float32)
    dim_t = 10000.0 ** (2 * torch.div(k, 2, rounding_mode="floor") / npf)

    def enc(p):
        a = p[:, None] / dim_t
        return torch.stack([a[:, 0::2].sin(), a[:, 1::2].cos()], dim=2).flatten(1)

    ey, ex = enc(y), enc(x)
    want = torch.cat([ey[:, None].expand(h, w, npf), ex[None].expand(h, w, npf)], dim=2).reshape(h * w, 16)
    assert torch.equal(sine_position_encoding(h, w, 16), want)


# --------------------------------------------------------------------------- artifact and weights


def test_save_and_load_roundtrip(tmp_path, clip_model):
    for cfg, visual, spec in [
        ({**SMALL, "class_head": "linear"}, None, None),
        ({**SMALL, "backbone": "clip"}, clip_model.visual, TINY),
    ]:
        torch.manual_seed(1)
        m = MaskFormer(cfg, num_classes=3, text_dim=64, clip_visual=visual).eval()
        d = tmp_path / cfg["backbone"]
        save_proposals(d, m, cfg, seen=[0, 4, 7], input_size=[64, 64], clip_spec=spec, metrics={"recall": 0.5})
        doc = read_proposals_json(d)
        assert doc["class"] == "zeroseg.models.maskformer:MaskFormer" and doc["seen"] == [0, 4, 7]
        assert doc["num_queries"] == 5 and doc["hidden_dim"] == 32 and doc["input"]["size"] == [64, 64]
        assert doc["model"] == validated(ProposalConfig, cfg, "model").model_dump(mode="json")
        assert json.loads((d / "metrics.json").read_text()) == {"recall": 0.5}
        m2 = load_proposal_model(d)  # the clip tower rebuilt from the stored spec
        x, t = torch.randn(1, 3, 64, 64), _text(3, 64)
        with torch.no_grad():
            assert torch.equal(m(x, t)["pred_masks"], m2(x, t)["pred_masks"])
            assert torch.equal(m(x, t)["pred_logits"], m2(x, t)["pred_logits"])
    sd = torch.load(tmp_path / "resnet18" / "weights.pt", weights_only=True)
    sd.pop("query_embed.weight")
    torch.save(sd, tmp_path / "resnet18" / "weights.pt")
    with pytest.raises(WeightsMismatchError, match="query_embed.weight"):
        load_proposal_model(tmp_path / "resnet18")
    with pytest.raises(DataError, match="not a proposals artifact"):
        read_proposals_json(tmp_path)
    (tmp_path / "proposals.json").write_text("{}")
    with pytest.raises(DataError, match="malformed"):
        read_proposals_json(tmp_path)


def test_backbone_weights_file_loaded_strictly(tmp_path):
    import torchvision

    torch.manual_seed(3)
    ref = torchvision.models.resnet18(weights=None)
    f = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), f)  # torchvision layout: fc.* and num_batches_tracked are dropped
    m = MaskFormer({**SMALL, "backbone_weights": str(f)}, num_classes=2, text_dim=8)
    assert torch.equal(m.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert torch.equal(m.backbone.bn1.running_var, ref.bn1.running_var)
    assert type(m.backbone.bn1).__name__ == "FrozenBatchNorm2d"  # detectron2's FrozenBN
    sd = ref.state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, f)
    with pytest.raises(WeightsMismatchError, match=r"layer1\.0\.conv1\.weight.*extra\.weight"):
        MaskFormer({**SMALL, "backbone_weights": str(f)}, num_classes=2, text_dim=8)
    # in keys a file counts by content, not by path
    g = tmp_path / "copy.pth"
    g.write_bytes(f.read_bytes())
    a = ProposalConfig(backbone_weights=str(f)).key_payload()
    b = ProposalConfig(backbone_weights=str(g)).key_payload()
    assert a == b and a["backbone_weights"].startswith("sha256:")
    with pytest.raises(ConfigError, match="does not exist"):
        ProposalConfig(backbone_weights=str(tmp_path / "nope.pth")).key_payload()


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"backbone": "clip", "backbone_weights": "IMAGENET1K_V1"}, "starts from the clip section"),
        ({"backbone": "resnet18", "backbone_weights": "IMAGENET1K_V2"}, "not a torchvision tag of resnet18"),
        ({"hidden_dim": 100}, "divisible by model.nheads"),
        ({"size_divisibility": 48}, "multiple of 32"),
        ({"class_head": "softmax"}, "model.class_head"),
        ({"num_queries": 0}, "model.num_queries"),
        ({"dropout": 1.0}, "model.dropout"),
    ],
)
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        validated(ProposalConfig, bad, "model")


# --------------------------------------------------------------------------- proposal recall


def test_proposal_recall_by_hand():
    # 4 x 4 image: class 0 (seen) top-left 2 x 2, class 1 (seen) top-right 2 x 2, class 5 (unseen)
    # the bottom half (8 pixels)
    label = np.full((4, 4), 5, np.uint8)
    label[:2, :2], label[:2, 2:] = 0, 1
    seg = semantic_to_targets(label)
    p = np.zeros((3, 4, 4), bool)
    p[0, :2, :3] = True  # class 0: 4 / 6; class 1: 2 / (4 + 6 - 2) = 1/4
    p[1, 2:, :1] = True  # class 5: 2 / 8 = 1/4
    p[2, 3, :] = True  # class 5: 4 / 8 = 1/2 (best); class 1: 0
    best = segment_max_iou(p, seg["masks"])
    assert best.tolist() == pytest.approx([4 / 6, 1 / 4, 1 / 2])
    c = proposal_recall(p, seg["masks"], seg["labels"], seen_ids=[0, 1, 2], unseen_ids=[5])
    assert c.segments == {"seen": 2, "unseen": 1}
    assert c.hits["seen"].tolist() == [1, 1] and c.hits["unseen"].tolist() == [1, 1]  # 1/2 >= 0.5 counts
    r = c.recall()
    assert r["seen"] == {0.3: 0.5, 0.5: 0.5} and r["unseen"] == {0.3: 1.0, 0.5: 1.0}
    assert r["all"] == {0.3: 2 / 3, 0.5: 2 / 3}
    # at 0.7 only nothing; at 0.6 class 0 (4/6)
    assert proposal_recall(p, seg["masks"], seg["labels"], [0, 1], [5], thresholds=(0.6, 0.7)).recall()["all"] == {
        0.6: 1 / 3,
        0.7: 0.0,
    }
    # a second image: one seen segment exactly covered; merged counts
    lab2 = np.full((4, 4), 255, np.uint8)
    lab2[1:3, 1:3] = 2
    seg2 = semantic_to_targets(lab2)
    c2 = proposal_recall(seg2["masks"].numpy(), seg2["masks"], seg2["labels"], [0, 1, 2], [5])
    c.merge(c2)
    assert c.segments == {"seen": 3, "unseen": 1}
    assert c.recall()["seen"] == {0.3: 2 / 3, 0.5: 2 / 3} and c.recall()["all"] == {0.3: 3 / 4, 0.5: 3 / 4}
    # ignored pixels left out of both sides when valid is given: proposal = the whole image
    whole = np.ones((1, 4, 4), bool)
    assert segment_max_iou(whole, seg2["masks"]).tolist() == [4 / 16]
    assert segment_max_iou(whole, seg2["masks"], valid=lab2 != 255).tolist() == [1.0]
    # no proposals, no segments
    assert segment_max_iou(np.zeros((0, 4, 4), bool), seg["masks"]).tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(RecallCounts.empty().recall()["unseen"][0.3])


def test_recall_at_an_iou_of_exactly_the_threshold_and_under_ignored_pixels():
    """Through zeroseg.evaluation (segment_best_iou, ProposalRecallEvaluator): a proposal whose IoU
    is exactly 7 / 10 is recalled at t = 0.7 (IoU >= t); ignored (255) pixels under a proposal
    count for neither side of the IoU."""
    from zeroseg.evaluation import ProposalRecallEvaluator, segment_best_iou

    # 4 x 4: class 0 (seen) the top two rows (8 pixels), class 1 (unseen) the bottom two
    label = np.zeros((4, 4), np.uint8)
    label[2:] = 1
    p = np.zeros((4, 4), bool)
    p[:2] = True
    p[0, 0] = False  # 7 pixels of class 0 ...
    p[2, :2] = True  # ... + 2 of class 1: class 0 IoU 7 / (8 + 9 - 7) = 7/10; class 1 2 / (8 + 9 - 2)
    logits = torch.tensor(np.where(p, 5.0, -5.0), dtype=torch.float32)[None]
    ids, best = segment_best_iou(logits, label)
    assert ids.tolist() == [0, 1] and best.tolist() == pytest.approx([7 / 10, 2 / 15])
    # ignored pixels under a proposal: class 0 the top-left 2 x 2, 255 the top-right 2 x 2; the
    # proposal covers the top two rows: IoU 4 / 4 (it would be 4 / 8 if the ignored pixels counted)
    label2 = np.full((4, 4), 1, np.uint8)
    label2[:2, :2], label2[:2, 2:] = 0, 255
    q = np.zeros((4, 4), bool)
    q[:2] = True
    logits2 = torch.tensor(np.where(q, 5.0, -5.0), dtype=torch.float32)[None]
    ids2, best2 = segment_best_iou(logits2, label2)
    assert ids2.tolist() == [0, 1] and best2.tolist() == pytest.approx([1.0, 0.0])
    sets = {"s": {"num_classes": 2, "seen": [0], "unseen": [1], "ignore_index": 255}}
    ev = ProposalRecallEvaluator(sets, thresholds=(0.7, 0.75))
    inputs = {"labels": [label, label2], "sets": ["s", "s"], "label_uris": ["a.png", "b.png"]}
    ev.process(inputs, {"mask_logits": torch.stack([logits, logits2])})
    r = ev.finalize()["s"]
    assert r["segments"] == {"seen": 2, "unseen": 2, "all": 4}
    assert r["recall"]["seen"] == {0.7: 1.0, 0.75: 0.5}  # 7/10 counts at 0.7, not at 0.75; 4/4 at both
    assert r["recall"]["unseen"] == {0.7: 0.0, 0.75: 0.0}


def test_recall_just_above_at_and_below_both_thresholds():
    """A 5 x 10 image, one class per row (seen 0, 1; unseen 5, 7, 9), proposals giving best IoUs
    3/10 (exactly 0.3), 5/10 (exactly 0.5), 4/13 (just above 0.3), 5/11 (just below 0.5) and
    3/11 (just below 0.3); a brute-force IoU over the pixels agrees. Recall at IoU >= t: seen
    2/2 at 0.3 and 1/2 at 0.5, unseen 2/3 at 0.3 and 0/3 at 0.5 (IoU > t would give 1/2 and 0/2
    for seen)."""
    label = np.repeat(np.array([0, 1, 5, 7, 9], np.uint8)[:, None], 10, axis=1)
    seg = semantic_to_targets(label)
    assert seg["labels"].tolist() == [0, 1, 5, 7, 9]
    p = np.zeros((5, 5, 10), bool)
    p[0, 0, :3] = True  # row 0: 3 / 10
    p[1, 1, :5] = True  # row 1: 5 / 10
    p[2, 2, :4], p[2, 3, :3] = True, True  # row 2: 4 / (10 + 7 - 4); row 3: 3 / 14
    p[3, 3, 5:], p[3, 2, 9] = True, True  # row 3: 5 / (10 + 6 - 5); row 2: 1 / 15
    p[4, 4, :3], p[4, 0, 9] = True, True  # row 4: 3 / (10 + 4 - 3); row 0: 1 / 13
    want = [3 / 10, 5 / 10, 4 / 13, 5 / 11, 3 / 11]
    brute = [
        max(
            sum(bool(p[q, y, x] and seg["masks"][n, y, x]) for y in range(5) for x in range(10))
            / sum(bool(p[q, y, x] or seg["masks"][n, y, x]) for y in range(5) for x in range(10))
            for q in range(5)
        )
        for n in range(5)
    ]
    assert brute == pytest.approx(want)
    assert segment_max_iou(p, seg["masks"]).tolist() == pytest.approx(want, abs=1e-12)
    c = proposal_recall(p, seg["masks"], seg["labels"], seen_ids=[0, 1], unseen_ids=[5, 7, 9])
    assert c.hits["seen"].tolist() == [2, 1] and c.hits["unseen"].tolist() == [2, 0]
    assert c.segments == {"seen": 2, "unseen": 3}
    r = c.recall()
    assert r["seen"] == {0.3: 1.0, 0.5: 0.5} and r["unseen"] == {0.3: 2 / 3, 0.5: 0.0}
    assert r["all"] == {0.3: 4 / 5, 0.5: 1 / 5}
    # a threshold of exactly 4/13 keeps row 2 (4/13 >= 4/13) and row 3 (5/11), drops rows 0 and 4
    c2 = proposal_recall(p, seg["masks"], seg["labels"], [0, 1], [5, 7, 9], thresholds=(4 / 13, 5 / 11 + 1e-9))
    assert c2.hits["seen"].tolist() == [1, 1] and c2.hits["unseen"].tolist() == [2, 0]


def test_proposal_recall_errors():
    seg = semantic_to_targets(np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="threshold logits"):
        proposal_recall(torch.zeros(1, 2, 2), seg["masks"], seg["labels"], [0], [1])
    with pytest.raises(ValueError, match=r"\[7\] are not in exactly one"):
        proposal_recall(seg["masks"], seg["masks"], [7], [0], [1])
    with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
        RecallCounts.empty((0.0,))
    with pytest.raises(ValueError, match="cannot merge"):
        RecallCounts.empty((0.5,)).merge(RecallCounts.empty((0.3,)))


def _num_masks_worker(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        n = 3 if rank == 0 else 0
        t = [{"labels": torch.zeros(n, dtype=torch.int64), "masks": torch.zeros(n, 2, 2)}]
        with open(f"{out}.{rank}", "w") as f:
            f.write(str(num_masks_across_workers(t)))
    finally:
        torch.distributed.destroy_process_group()


def test_num_masks_averaged_over_workers(tmp_path):
    # released MaskFormer: all-reduce (3 + 0), divide by the world size 2 -> 1.5 on both workers
    # forked workers (no re-import of torch); the parent never joins a process group
    torch.multiprocessing.start_processes(
        _num_masks_worker,
        args=(f"file://{tmp_path / 'store'}", str(tmp_path / "n")),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    assert [float((tmp_path / f"n.{r}").read_text()) for r in (0, 1)] == [1.5, 1.5]
