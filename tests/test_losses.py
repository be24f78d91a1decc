"""ZegCLIP losses (zeroseg/losses.py) against hand computations (ZegCLIP Eqs. 4-6)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroseg.data.classes import IGNORE_INDEX
from zeroseg.losses import (
    LOSS_KINDS,
    ZEGCLIP_LOSS_WEIGHTS,
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


# ----------------------------------------------------------------------------- batch example
# Pins each normalisation of zeroseg/losses.py with two images, an absent class per image and a
# different number of valid pixels per image, so that every wrong axis / count gives another number.


def batch_example():
    """B = 2 images, C = 2 classes, 1 x 2 pixels each ([2, 2, 1, 2] logits).

    image 0: target [0, 0]    -> class 0 present (2 px), class 1 absent
    image 1: target [1, 255]  -> class 1 present (1 px), class 0 absent, pixel 2 ignored

    logits (sigmoid in brackets)        binary targets y (valid pixels only)
    img0 cls0: [ ln3, 0]   (.75, .5)    [1, 1]
    img0 cls1: [-ln3, 0]   (.25, .5)    [0, 0]
    img1 cls0: [ 0,   5]   (.5, ign.)   [0, -]
    img1 cls1: [ ln3, 5]   (.75, ign.)  [1, -]

    The ignored pixel has logit 5 (sigmoid .9933) in both classes: counted as a negative it would
    add ~0.9866 * 5.0067 ~ 4.94 to a focal term and ~0.99 to a dice denominator.
    Present (image, class) masks: (0, 0) and (1, 1) -> num_masks = 2 (B * C would be 4).
    """
    logits = torch.tensor([[[[L3, 0.0]], [[-L3, 0.0]]], [[[0.0, 5.0]], [[L3, 5.0]]]])
    target = torch.tensor([[[0, 0]], [[1, 255]]])
    return logits, target


# Per-pixel focal terms (gamma = 2): p_t = p if y = 1 else 1 - p; term = -(1 - p_t)^2 ln p_t
#   p_t = .75 -> A = (1/4)^2 ln(4/3) = 0.0625 * 0.2876821 = 0.0179801
#   p_t = .5  -> Bv = (1/2)^2 ln 2   = 0.25 * 0.6931472   = 0.1732868
A_ = 0.0625 * math.log(4 / 3)
B_ = 0.25 * math.log(2)
# Mean over each image's *valid* pixels, per (image, class):
#   img0 cls0: (A + Bv) / 2   (y=1 p=.75; y=1 p=.5)
#   img0 cls1: (A + Bv) / 2   (y=0 p=.25; y=0 p=.5)
#   img1 cls0: Bv / 1         (y=0 p=.5; the ignored pixel is left out)
#   img1 cls1: A / 1          (y=1 p=.75)
# Summed over all (image, class) = 2A + 2Bv, divided by num_masks = 2  ->  A + Bv = 0.1912669
FOCAL_B = A_ + B_
# focal_alpha = a = 0.25 weighs positives by a and negatives by 1 - a:
#   .25 (A + Bv)/2 + .75 (A + Bv)/2 + .75 Bv + .25 A = .75 A + 1.25 Bv; / 2 -> .375 A + .625 Bv = 0.1150468
FOCAL_B_A025 = 0.375 * A_ + 0.625 * B_
# Dice over the present masks only, s = 1, squared denominators (Eq. 5 + smoothing):
#   (0,0): sum p y = .75 + .5 = 1.25, sum p^2 = .5625 + .25 = .8125, sum y^2 = 2 -> 1 - (2.5 + 1)/(2.8125 + 1) = 0.0819672
#   (1,1): sum p y = .75, sum p^2 = .5625, sum y^2 = 1                        -> 1 - (1.5 + 1)/(1.5625 + 1) = 0.0243902
#   mean over num_masks = 2: 0.0531787
DICE_B = ((1 - 3.5 / 3.8125) + (1 - 2.5 / 2.5625)) / 2
#   plain sums (squared=False, the released code): (0,0) 1 - 3.5/(1.25 + 2 + 1) = 0.1764706,
#   (1,1) 1 - 2.5/(.75 + 1 + 1) = 0.0909091 -> 0.1336898
DICE_B_PLAIN = ((1 - 3.5 / 4.25) + (1 - 2.5 / 2.75)) / 2
#   no smoothing: (0,0) 1 - 2.5/2.8125 = 0.1111111, (1,1) 1 - 1.5/1.5625 = 0.04 -> 0.0755556
DICE_B_S0 = ((1 - 2.5 / 2.8125) + (1 - 1.5 / 1.5625)) / 2
# CE over the 3 valid pixels (softmax over the two classes):
#   img0 px0 (ln3, -ln3) -> 0: p = 3 / (3 + 1/3) = .9 ; img0 px1 (0, 0) -> 0: p = .5 ;
#   img1 px0 (0, ln3) -> 1: p = 3 / (1 + 3) = .75   -> (-ln .9 + ln 2 - ln .75) / 3 = 0.3620633
CE_B = (-math.log(0.9) + math.log(2) - math.log(0.75)) / 3


def test_batch_focal_normalisation_by_hand():
    logits, target = batch_example()
    assert FOCAL_B == pytest.approx(0.1912669, abs=1e-7)
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(FOCAL_B, rel=1e-6)
    assert sigmoid_focal_loss(logits, target, focal_alpha=0.25).item() == pytest.approx(FOCAL_B_A025, rel=1e-6)
    # the wrong normalisations this pins, for the record:
    assert FOCAL_B != pytest.approx((2 * A_ + 2 * B_) / 4, rel=1e-3)  # divided by B * C
    assert FOCAL_B != pytest.approx((3 * A_ + 3 * B_) / 6, rel=1e-3)  # mean over all valid (image, class, pixel)
    assert FOCAL_B != pytest.approx(((A_ + B_) / 2 + A_) / 2, rel=1e-3)  # absent classes left out


def test_batch_focal_gamma_is_the_exponent():
    """gamma = 1: terms (1 - p_t) ln(1/p_t): p_t=.75 -> .25 ln(4/3), p_t=.5 -> .5 ln 2; same
    normalisation as above -> .25 ln(4/3) + .5 ln 2."""
    logits, target = batch_example()
    expect = 0.25 * math.log(4 / 3) + 0.5 * math.log(2)
    assert sigmoid_focal_loss(logits, target, gamma=1.0).item() == pytest.approx(expect, rel=1e-6)


def test_batch_dice_by_hand():
    logits, target = batch_example()
    assert DICE_B == pytest.approx(0.0531787, abs=1e-7)
    assert dice_loss(logits, target).item() == pytest.approx(DICE_B, rel=1e-6)
    assert dice_loss(logits, target, squared=False).item() == pytest.approx(DICE_B_PLAIN, rel=1e-6)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(DICE_B_S0, rel=1e-6)


def test_batch_ce_by_hand():
    logits, target = batch_example()
    assert cross_entropy_loss(logits, target).item() == pytest.approx(CE_B, rel=1e-6)


def test_batch_one_hot_targets_by_hand():
    _, target = batch_example()
    masks, valid = one_hot_targets(target, 2)
    assert masks.tolist() == [[[[1.0, 1.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[1.0, 0.0]]]]
    assert valid.tolist() == [[[True, True]], [[True, False]]]


def test_default_total_is_eq6_with_the_released_weights():
    """Eq. 6 with ZEGCLIP_LOSS_WEIGHTS (alpha = 100 focal, beta = 1 dice, gamma = 2) and the
    documented defaults (no focal alpha, squared dice, smoothing 1):
    100 * 0.1912669 + 0.0531787 = 19.1798712."""
    logits, target = batch_example()
    terms = segmentation_loss_terms(logits, target)
    assert terms["focal"].item() == pytest.approx(FOCAL_B, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(DICE_B, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(100 * FOCAL_B + DICE_B, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(19.1798712, abs=1e-5)
    # the released code's focal alpha and plain dice are options, not defaults (module docstring)
    rel = segmentation_loss_terms(logits, target, focal_alpha=0.25, dice_squared=False)
    assert rel["loss"].item() == pytest.approx(100 * FOCAL_B_A025 + DICE_B_PLAIN, rel=1e-6)


def test_released_loss_weights_and_defaults_are_pinned():
    """Copied from /work/shared/papers/released-code.md section 4 (SegLossPlus: mask_weight 100.0,
    dice_weight 1.0; focal gamma 2) and ZegCLIP Sec. 3.4 (gamma = 2)."""
    assert ZEGCLIP_LOSS_WEIGHTS == {"alpha": 100.0, "beta": 1.0, "gamma": 2.0}
    assert LOSS_KINDS == ("focal_dice", "ce")
    assert IGNORE_INDEX == 255


# ----------------------------------------------------------------------------- boundaries
def test_focal_alpha_at_its_bounds_weighs_one_side_only():
    """focal_alpha = 1: positives only; 0: negatives only (batch_example, terms A and Bv above):
    positives: img0 cls0 (A + Bv)/2, img1 cls1 A -> ((A + Bv)/2 + A) / 2 = (3A + Bv) / 4
    negatives: img0 cls1 (A + Bv)/2, img1 cls0 Bv -> ((A + Bv)/2 + Bv) / 2 = (A + 3Bv) / 4
    (0.25 * the first + 0.75 * the second = .375 A + .625 Bv = FOCAL_B_A025, as above)."""
    logits, target = batch_example()
    assert sigmoid_focal_loss(logits, target, focal_alpha=1.0).item() == pytest.approx((3 * A_ + B_) / 4, rel=1e-6)
    assert sigmoid_focal_loss(logits, target, focal_alpha=0.0).item() == pytest.approx((A_ + 3 * B_) / 4, rel=1e-6)
    for bad in (-0.01, 1.01):
        with pytest.raises(ValueError, match="focal_alpha"):
            sigmoid_focal_loss(logits, target, focal_alpha=bad)
        with pytest.raises(ValueError, match="focal_alpha"):
            segmentation_loss_terms(logits, target, focal_alpha=bad)


def test_an_image_with_every_pixel_ignored_adds_nothing():
    """Image 1 of batch_example fully ignored: its per-image mean has no valid pixel (0, not 0/0),
    and it has no present mask. Left: image 0 only, num_masks 1 (class 0):
    focal = ((A + Bv)/2 [cls0] + (A + Bv)/2 [cls1, absent but its negatives count]) / 1 = A + Bv;
    dice, no smoothing: (0,0) 1 - 2.5 / 2.8125 = 1/9 (absent masks and the empty image give no
    term, and 0/0 must not turn into NaN)."""
    logits, _ = batch_example()
    target = torch.tensor([[[0, 0]], [[255, 255]]])
    assert sigmoid_focal_loss(logits, target).item() == pytest.approx(A_ + B_, rel=1e-6)
    d = dice_loss(logits, target, smooth=0.0)
    assert torch.isfinite(d) and d.item() == pytest.approx(1 / 9, rel=1e-6)
    assert dice_loss(logits, target, smooth=0.0, squared=False).item() == pytest.approx(1 - 2.5 / 3.25, rel=1e-6)
    terms = segmentation_loss_terms(logits, target, dice_smooth=0.0)
    assert terms["dice"].item() == pytest.approx(1 / 9, rel=1e-6)


def test_class_id_checks_at_the_edges_and_the_message():
    logits = torch.zeros(1, 3, 2, 7)
    # ids 0 and C - 1 = 2 and the ignore value are fine; C = 3 and -1 are not
    ok = torch.tensor([[[0, 2, 255, 1, 0, 2, 1], [2, 2, 0, 0, 255, 1, 1]]])
    assert torch.isfinite(sigmoid_focal_loss(logits, ok))
    for v in (3, -1):
        bad = ok.clone()
        bad[0, 1, 3] = v
        with pytest.raises(ValueError, match=rf"class ids \[{v}\] outside 0..2 that are not ignore_index=255"):
            sigmoid_focal_loss(logits, bad)
    # the message lists the distinct bad ids, sorted, at most 10
    many = torch.tensor([[[15, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, -2]]])
    with pytest.raises(ValueError, match=r"class ids \[-2, 3, 4, 5, 6, 7, 8, 9, 10, 11\] outside"):
        dice_loss(logits, many)
    with pytest.raises(
        ValueError, match=r"\[3, 7\] outside 0..2.*the logits must have one channel per training \(seen\) class"
    ):
        cross_entropy_loss(logits, torch.tensor([[[7, 3, 7, 0, 0, 0, 0], [0] * 7]]))
    from zeroseg.losses import check_class_ids

    with pytest.raises(ValueError, match=r"ignore_index=-1: the logits must have K"):
        check_class_ids(torch.tensor([255, -1, 0]), 3, ignore_index=-1, expects="K")
    check_class_ids(torch.tensor([2, -1, 0]), 3, ignore_index=-1)
    with pytest.raises(ValueError, match="integer class ids"):
        check_class_ids(torch.tensor([0.0, 1.0]), 3)


def test_shape_checks():
    logits = torch.zeros(2, 3, 4, 5)
    t = torch.zeros(2, 4, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must be \[B, C, H, W\]"):
        sigmoid_focal_loss(logits[0], t[0])
    for bad in (t[0], t[:1], t[:, :3], t[:, :, :4], t[None]):
        with pytest.raises(ValueError, match=r"target must be \[B, H, W\]"):
            segmentation_loss(logits, bad)
        with pytest.raises(ValueError, match=r"target must be \[B, H, W\]"):
            segmentation_loss(logits, bad, kind="ce")


def test_every_option_of_the_terms_reaches_its_loss():
    """segmentation_loss_terms threads gamma, dice_smooth, dice_squared and ignore_index through
    (the hand values of batch_example above); ignore 9 instead of 255 gives the same numbers."""
    logits, target = batch_example()
    t9 = torch.where(target == 255, torch.tensor(9), target)
    g1 = 0.25 * math.log(4 / 3) + 0.5 * math.log(2)  # test_batch_focal_gamma_is_the_exponent
    terms = segmentation_loss_terms(logits, t9, alpha=2.0, beta=3.0, gamma=1.0, dice_squared=False, ignore_index=9)
    assert terms["focal"].item() == pytest.approx(g1, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(DICE_B_PLAIN, rel=1e-6)
    assert terms["loss"].item() == pytest.approx(2 * g1 + 3 * DICE_B_PLAIN, rel=1e-6)
    terms = segmentation_loss_terms(logits, t9, dice_smooth=0.0, ignore_index=9)
    assert terms["dice"].item() == pytest.approx(DICE_B_S0, rel=1e-6)
    assert terms["focal"].item() == pytest.approx(FOCAL_B, rel=1e-6)
    ce = segmentation_loss_terms(logits, t9, kind="ce", ignore_index=9)
    assert ce["ce"].item() == pytest.approx(CE_B, rel=1e-6)
    assert cross_entropy_loss(logits, t9, ignore_index=9).item() == pytest.approx(CE_B, rel=1e-6)
    assert sigmoid_focal_loss(logits, t9, ignore_index=9).item() == pytest.approx(FOCAL_B, rel=1e-6)
    assert dice_loss(logits, t9, ignore_index=9).item() == pytest.approx(DICE_B, rel=1e-6)
    masks, valid = one_hot_targets(t9, 2, ignore_index=9)
    assert masks.dtype == torch.float32 and valid.tolist() == [[[True, True]], [[True, False]]]
    assert masks.tolist() == [[[[1.0, 1.0]], [[0.0, 0.0]]], [[[0.0, 0.0]], [[1.0, 0.0]]]]
    # all ignored under ignore 9: CE is 0 with a graph
    x = logits.clone().requires_grad_(True)
    z = cross_entropy_loss(x, torch.full_like(target, 9), ignore_index=9)
    assert z.item() == 0.0 and z.requires_grad


def test_losses_of_half_precision_logits_are_float32():
    logits, target = batch_example()
    for fn, expect in ((sigmoid_focal_loss, FOCAL_B), (dice_loss, DICE_B), (cross_entropy_loss, CE_B)):
        out = fn(logits.to(torch.bfloat16), target)
        assert out.dtype == torch.float32 and out.item() == pytest.approx(expect, rel=3e-2)


def test_mask_focal_alpha_zero_is_a_weight_not_no_balance():
    """mask_focal_loss with alpha = 0 keeps only the negatives (alpha < 0 is 'no balance').
    Logits [0, ln3], targets [1, 0]: (p .5, y 1) weight 0; (p .75, y 0): p_t .25,
    (.75)^2 ln 4 = 0.7797905; mean over the 2 pixels, num_masks 1 -> 0.3898953. Without the
    weight: (.25 ln 2 + .5625 ln 4) / 2 = 0.4765387. alpha = 1: .25 ln2 / 2 = 0.0866434."""
    from zeroseg.losses import mask_dice_loss, mask_focal_loss

    x, y = torch.tensor([[0.0, L3]]), torch.tensor([[1.0, 0.0]])
    assert mask_focal_loss(x, y, 1.0, alpha=0.0).item() == pytest.approx(0.5625 * math.log(4) / 2, rel=1e-6)
    assert mask_focal_loss(x, y, 1.0, alpha=-1.0).item() == pytest.approx(
        (0.25 * math.log(2) + 0.5625 * math.log(4)) / 2, rel=1e-6
    )
    assert mask_focal_loss(x, y, 1.0, alpha=1.0).item() == pytest.approx(0.25 * math.log(2) / 2, rel=1e-6)
    # default alpha 0.25 gamma 2: (.25 * .25 ln2 + .75 * .5625 ln4) / 2
    assert mask_focal_loss(x, y, 2.0).item() == pytest.approx(
        (0.0625 * math.log(2) + 0.421875 * math.log(4)) / 4, rel=1e-6
    )
    # dice: 1 - (2 * .5 + 1) / (1.25 + 1 + 1) = 1 - 2 / 3.25, over num_masks 2
    assert mask_dice_loss(x, y, 2.0).item() == pytest.approx((1 - 2 / 3.25) / 2, rel=1e-6)


def test_semantic_to_targets_edges():
    """Ascending ids, a custom ignore value, int64 labels out of uint8 and int32 input, and the
    refused inputs (bool, float, not 2-D)."""
    from zeroseg.losses import semantic_to_targets

    lab = torch.tensor([[4, 0, 9], [9, 4, 2]], dtype=torch.int32)
    t = semantic_to_targets(lab, ignore_index=9)
    assert t["labels"].tolist() == [0, 2, 4] and t["labels"].dtype == torch.int64
    assert t["masks"].tolist() == [
        [[False, True, False], [False, False, False]],
        [[False, False, False], [False, False, True]],
        [[True, False, False], [False, True, False]],
    ]
    t255 = semantic_to_targets(lab)  # 9 is a class under the default ignore 255
    assert t255["labels"].tolist() == [0, 2, 4, 9]
    for bad in (
        torch.zeros(2, 2, dtype=torch.bool),
        torch.zeros(2, 2),
        torch.zeros(1, 2, 2, dtype=torch.long),
        np.zeros(3, np.uint8),
    ):
        with pytest.raises(ValueError, match=r"integer \[H, W\] label map"):
            semantic_to_targets(bad)


def test_mask_focal_odd_gamma_pins_p_t():
    """gamma = 1 (odd, so a sign error in p_t shows; with gamma 2 (1 - p_t)^2 hides it): logits
    [0, ln3], targets [1, 0], no balance: (p .5, y 1): p_t .5 -> .5 ln 2; (p .75, y 0): p_t .25
    -> .75 ln 4 = 1.5 ln 2; mean over the 2 pixels = ln 2."""
    from zeroseg.losses import mask_focal_loss

    x, y = torch.tensor([[0.0, L3]]), torch.tensor([[1.0, 0.0]])
    assert mask_focal_loss(x, y, 1.0, alpha=-1.0, gamma=1.0).item() == pytest.approx(math.log(2), rel=1e-6)
