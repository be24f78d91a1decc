"""ZegCLIP losses (zeroseg/losses.py) against hand computations (ZegCLIP Eqs. 4-6)."""

import math

import pytest
import torch
import torch.nn.functional as F

from zeroseg.losses import (
    cross_entropy_loss,
    dice_loss,
    one_hot_targets,
    segmentation_loss,
    segmentation_loss_terms,
    sigmoid_focal_loss,
)

L3 = math.log(3.0)


def example():
    """2 classes, one 2x2 image; the bottom-right pixel is ignored (255).

    target          class-0 logits        class-1 logits
    [[0,   1],      [[ ln3, 0 ],          [[-ln3, ln3],
     [1, 255]]       [-ln3, 7 ]]           [  0,  -7 ]]

    sigmoid(ln3) = 0.75, sigmoid(0) = 0.5, sigmoid(-ln3) = 0.25, so on the 3 valid pixels
    p0 = [0.75, 0.5, 0.25] with y0 = [1, 0, 0] and p1 = [0.25, 0.75, 0.5] with y1 = [0, 1, 1].
    The ignored pixel's logits (7 / -7) are wrong on purpose: counted as a negative of class 0 it
    would add (sigmoid 7 ~ 1)^2 * 7 ~ 7 to the focal sum.
    """
    logits = torch.tensor([[[[L3, 0.0], [-L3, 7.0]], [[-L3, L3], [0.0, -7.0]]]])
    target = torch.tensor([[[0, 1], [1, 255]]])
    return logits, target


# Focal, gamma = 2, per pixel -[y (1-p)^2 log p + (1-y) p^2 log(1-p)]:
#   class 0: y=1,p=.75: .0625*ln(4/3) = 0.0179801 | y=0,p=.5: .25*ln2 = 0.1732868 | y=0,p=.25: .0625*ln(4/3) = 0.0179801
#            mean over the 3 valid pixels = 0.2092470 / 3 = 0.0697490
#   class 1: y=0,p=.25: 0.0179801 | y=1,p=.75: 0.0179801 | y=1,p=.5: 0.1732868 -> mean 0.0697490
#   both classes are present (num_masks = 2): focal = (0.0697490 + 0.0697490) / 2 = 0.0697490
FOCAL = (2 * 0.0625 * math.log(4 / 3) + 0.25 * math.log(2)) / 3
# Dice (Eq. 5, squared denominators) per class, s = smoothing:
#   class 0: sum p*y = .75, sum p^2 = .5625+.25+.0625 = .875, sum y^2 = 1 -> 1 - (1.5 + s) / (1.875 + s)
#   class 1: sum p*y = .75+.5 = 1.25, sum p^2 = .0625+.5625+.25 = .875, sum y^2 = 2 -> 1 - (2.5 + s) / (2.875 + s)
#   s = 0: (0.2 + 0.1304348) / 2 = 0.1652174;  s = 1: (0.1304348 + 0.0967742) / 2 = 0.1136045
DICE_S0 = ((1 - 1.5 / 1.875) + (1 - 2.5 / 2.875)) / 2
DICE_S1 = ((1 - 2.5 / 2.875) + (1 - 3.5 / 3.875)) / 2
# CE (softmax over the 2 classes), valid pixels: (ln3,-ln3)->0: p=3/(3+1/3)=.9 ; (0,ln3)->1: p=.75 ;
#   (-ln3,0)->1: p=1/(1/3+1)=.75  ->  (-ln .9 - 2 ln .75) / 3 = (0.1053605 + 2*0.2876821) / 3 = 0.2269082
CE = (-math.log(0.9) - 2 * math.log(0.75)) / 3


def test_hand_values():
    logits, target = example()
    assert FOCAL == pytest.approx(0.0697490, abs=1e-6)
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(FOCAL, rel=1e-5)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(DICE_S0, rel=1e-5)
    assert dice_loss(logits, target).item() == pytest.approx(DICE_S1, rel=1e-5)
    assert cross_entropy_loss(logits, target).item() == pytest.approx(CE, rel=1e-5)


def test_total_and_components():
    logits, target = example()
    terms = segmentation_loss_terms(logits, target, kind="focal_dice", alpha=20.0, beta=1.0, gamma=2.0)
    assert terms["focal"].item() == pytest.approx(FOCAL, rel=1e-5)
    assert terms["dice"].item() == pytest.approx(DICE_S1, rel=1e-5)
    assert terms["loss"].item() == pytest.approx(20 * FOCAL + DICE_S1, rel=1e-5)
    assert segmentation_loss(logits, target, kind="focal_dice", alpha=3.0, beta=0.5).item() == pytest.approx(
        3 * FOCAL + 0.5 * DICE_S1, rel=1e-5
    )
    ce = segmentation_loss_terms(logits, target, kind="ce")
    assert set(ce) == {"loss", "ce"} and ce["loss"].item() == pytest.approx(CE, rel=1e-5)
    with pytest.raises(ValueError, match="loss kind"):
        segmentation_loss(logits, target, kind="bce")


def test_ignored_pixel_has_no_effect_and_no_gradient():
    logits, target = example()
    for kind in ("focal_dice", "ce"):
        x = logits.clone().requires_grad_(True)
        loss = segmentation_loss(x, target, kind=kind)
        loss.backward()
        assert torch.all(x.grad[0, :, 1, 1] == 0), kind
        assert torch.all(x.grad[0, :, 0, 0] != 0), kind
        x2 = logits.clone()
        x2[0, :, 1, 1] = torch.tensor([-3.0, 9.0])  # change only the ignored pixel
        assert segmentation_loss(x2, target, kind=kind).item() == pytest.approx(loss.item(), rel=1e-6)


def test_focal_gamma0_is_bce_and_alpha_option():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 4)
    target = torch.randint(0, 3, (2, 5, 4))
    masks, valid = one_hot_targets(target, 3)
    assert valid.all() and torch.equal(masks.argmax(1), target)
    # gamma = 0: per-class mean BCE, summed over (image, class), divided by the present masks
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none").mean((2, 3))
    n_masks = (masks.sum((2, 3)) > 0).sum()
    expect = bce.sum() / n_masks
    assert sigmoid_focal_loss(logits, target, gamma=0.0).item() == pytest.approx(expect.item(), rel=1e-5)
    a = sigmoid_focal_loss(logits, target, focal_alpha=0.25)
    b = sigmoid_focal_loss(logits, target)
    assert a.item() < b.item()


def test_errors_and_degenerate_targets():
    logits, target = example()
    with pytest.raises(ValueError, match="outside 0..1"):
        sigmoid_focal_loss(logits, torch.tensor([[[0, 2], [1, 255]]]))
    with pytest.raises(ValueError, match="B, H, W"):
        dice_loss(logits, torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="focal_alpha"):
        sigmoid_focal_loss(logits, target, focal_alpha=-1.0)
    with pytest.raises(ValueError, match="focal_alpha"):
        segmentation_loss(logits, target, focal_alpha=1.5)
    all_ignored = torch.full_like(target, 255)
    for kind in ("focal_dice", "ce"):
        x = logits.clone().requires_grad_(True)
        loss = segmentation_loss(x, all_ignored, kind=kind)
        assert torch.isfinite(loss) and loss.item() == 0.0
        loss.backward()
        assert x.grad is not None and torch.all(torch.isfinite(x.grad)) and torch.all(x.grad == 0), kind


def test_terms_share_targets_and_match_the_component_losses():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 6, 5)
    target = torch.randint(0, 4, (2, 6, 5))
    target[0, :2] = 255
    for fa in (None, 0.25):
        terms = segmentation_loss_terms(logits, target, alpha=2.0, beta=0.5, focal_alpha=fa, dice_smooth=0.5)
        focal = sigmoid_focal_loss(logits, target, focal_alpha=fa)
        dice = dice_loss(logits, target, smooth=0.5)
        assert torch.equal(terms["focal"], focal) and torch.equal(terms["dice"], dice)
        assert torch.equal(terms["loss"], 2.0 * focal + 0.5 * dice)
