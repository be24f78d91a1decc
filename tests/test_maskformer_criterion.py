"""MaskFormer's Hungarian matcher and set criterion against a brute-force reference written here
(plain numpy loops over queries, targets and pixels; the assignment by trying every permutation).

The inputs are chosen so that the plausible bugs change the answer: two images with 3 and 2
targets (so a per-mask normaliser of 5 differs from the batch size 2 and from the pixel count),
4 queries, non-square predictions at half the targets' size (so the nearest resize of the targets
for matching and the bilinear upsampling of the predictions for the loss both matter), random
costs where flipping the class-cost sign, dropping a cost term or transposing the cost matrix
each gives another assignment (asserted below, so the inputs stay discriminating).

Reference formulas: MaskFormer / ZegFormer released ``matcher.py`` / ``criterion.py``
(``/work/shared/papers/released-code.md`` 1.1): cost ``w_cls * -p_q(c_n) + w_mask * focal + w_dice
* dice``; CE over K + 1 classes with the no-object class weighted ``eos_coef`` (torch's weighted
mean); focal (alpha .25, gamma 2, mean over pixels) and dice (+1 smoothing) of the matched masks,
summed and divided by the number of target masks.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from zeroseg.models.maskformer import HungarianMatcher, SetCriterion, batch_sigmoid_focal_cost

K, Q = 3, 4
H, W = 6, 4  # target size; predictions are [3, 2] (half), non-square
N_PER_IMAGE = (3, 2)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _nearest_down(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch 'nearest': source index floor(i * in / out)."""
    hi, wi = m.shape
    return np.array([[m[int(math.floor(i * hi / h)), int(math.floor(j * wi / w))] for j in range(w)] for i in range(h)])


def _bilinear_up(m: np.ndarray, h: int, w: int) -> np.ndarray:
    """torch 'bilinear', align_corners=False: source (i + .5) * in / out - .5, clamped at 0."""
    hi, wi = m.shape

    def coords(i, n_in, n_out):
        s = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(s))
        i1 = min(i0 + 1, n_in - 1)
        return i0, i1, s - i0

    out = np.zeros((h, w))
    for i in range(h):
        y0, y1, ly = coords(i, hi, h)
        for j in range(w):
            x0, x1, lx = coords(j, wi, w)
            out[i, j] = (1 - ly) * ((1 - lx) * m[y0, x0] + lx * m[y0, x1]) + ly * (
                (1 - lx) * m[y1, x0] + lx * m[y1, x1]
            )
    return out


def _focal(x: np.ndarray, y: np.ndarray, alpha=0.25, gamma=2.0) -> float:
    """Mean over pixels of a_t (1 - p_t)^g (-log p_t); a_t = alpha for positives, 1 - alpha for
    negatives, 1 when alpha < 0."""
    total = 0.0
    for xv, yv in zip(x.ravel(), y.ravel()):
        p = _sig(xv)
        pt = p if yv else 1 - p
        at = 1.0 if alpha < 0 else (alpha if yv else 1 - alpha)  # alpha < 0: no balance
        total += at * (1 - pt) ** gamma * -math.log(pt)
    return total / x.size


def _dice(x: np.ndarray, y: np.ndarray) -> float:
    p = _sig(x.ravel())
    return 1 - (2 * float((p * y.ravel()).sum()) + 1) / (float(p.sum()) + float(y.sum()) + 1)


def _cost(logits, masks, labels, tmasks, wc=1.0, wm=20.0, wd=1.0, sign=1.0, alpha=0.25, gamma=2.0):
    """[Q, N] matching cost, targets resized (nearest) to the prediction size."""
    prob = _softmax(logits)
    h, w = masks.shape[-2:]
    c = np.zeros((logits.shape[0], len(labels)))
    for q in range(logits.shape[0]):
        for n, lab in enumerate(labels):
            t = _nearest_down(tmasks[n], h, w)
            c[q, n] = -sign * wc * prob[q, lab] + wm * _focal(masks[q], t, alpha, gamma) + wd * _dice(masks[q], t)
    return c


def _brute_assign(c: np.ndarray) -> dict[int, int]:
    """target -> query, minimum total cost over every injective map (Q >= N)."""
    q, n = c.shape
    best = min(itertools.permutations(range(q), n), key=lambda rows: sum(c[r, j] for j, r in enumerate(rows)))
    return {j: r for j, r in enumerate(best)}


def _case(seed: int):
    g = np.random.default_rng(seed)
    logits = g.normal(0, 3.0, size=(2, Q, K + 1))
    masks = g.normal(0, 0.5, size=(2, Q, H // 2, W // 2))
    targets = []
    for n in N_PER_IMAGE:
        labels = g.choice(K, size=n, replace=False)
        # disjoint random masks at the full size (each pixel to one of the n classes or background)
        owner = g.integers(-1, n, size=(H, W))
        tm = np.stack([owner == i for i in range(n)])
        targets.append((labels, tm))
    return logits, masks, targets


def _torch(logits, masks, targets):
    out = {
        "pred_logits": torch.tensor(logits, dtype=torch.float32),
        "pred_masks": torch.tensor(masks, dtype=torch.float32),
    }
    tt = [{"labels": torch.tensor(lab, dtype=torch.int64), "masks": torch.tensor(tm)} for lab, tm in targets]
    return out, tt


SEED = 11  # a seed whose inputs discriminate (test_case_discriminates_the_plausible_cost_bugs)


def test_case_discriminates_the_plausible_cost_bugs():
    """The brute-force assignment of the inputs below changes under each plausible bug: a flipped
    class-cost sign or a missing focal term (both images), a missing dice or class term (image 1).
    Guards the inputs of the tests that follow."""
    logits, masks, targets = _case(SEED)
    for b, bugs in (
        (0, (dict(sign=-1.0), dict(wm=0.0))),
        (1, (dict(sign=-1.0), dict(wm=0.0), dict(wd=0.0), dict(wc=0.0))),
    ):
        lab, tm = targets[b]
        right = _brute_assign(_cost(logits[b], masks[b], lab, tm))
        for kw in bugs:
            assert right != _brute_assign(_cost(logits[b], masks[b], lab, tm, **kw)), (b, kw)


@pytest.mark.parametrize("weights", [(1.0, 20.0, 1.0), (2.0, 5.0, 3.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)])
def test_matcher_equals_brute_force_on_several_targets(weights):
    logits, masks, targets = _case(SEED)
    out, tt = _torch(logits, masks, targets)
    got = HungarianMatcher(*weights)(out, tt)
    for b, (rows, cols) in enumerate(got):
        lab, tm = targets[b]
        want = _brute_assign(_cost(logits[b], masks[b], lab, tm, *weights))
        assert rows.dtype == cols.dtype == torch.int64
        assert rows.tolist() == sorted(rows.tolist())
        assert dict(zip(cols.tolist(), rows.tolist())) == want, (b, weights)


def _reference_losses(logits, masks, targets, wc=1.0, wm=20.0, wd=1.0, eos=0.1, agnostic=False, alpha=0.25, gamma=2.0):
    """(ce, focal, dice) of one decoder layer with the brute-force matching."""
    if agnostic:
        targets = [(np.zeros_like(lab), tm) for lab, tm in targets]
    k = logits.shape[-1] - 1
    num_masks = sum(len(lab) for lab, _ in targets)
    ce_num = ce_den = focal = dice = 0.0
    for b, (lab, tm) in enumerate(targets):
        assign = _brute_assign(_cost(logits[b], masks[b], lab, tm, wc, wm, wd, alpha=alpha, gamma=gamma))
        cls = {q: k for q in range(logits.shape[1])}
        for n, q in assign.items():
            cls[q] = int(lab[n])
            up = _bilinear_up(masks[b, q], H, W)
            focal += _focal(up, tm[n], alpha, gamma)
            dice += _dice(up, tm[n])
        logp = np.log(_softmax(logits[b]))
        for q, c in cls.items():
            wgt = eos if c == k else 1.0
            ce_num += wgt * -logp[q, c]
            ce_den += wgt
    return ce_num / ce_den, focal / num_masks, dice / num_masks


def test_set_criterion_equals_the_reference_on_two_images_and_five_masks():
    logits, masks, targets = _case(SEED)
    out, tt = _torch(logits, masks, targets)
    got = SetCriterion(K)(out, tt)
    ce, focal, dice = _reference_losses(logits, masks, targets)
    assert float(got["loss_ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(got["loss_mask"]) == pytest.approx(focal, rel=1e-5)
    assert float(got["loss_dice"]) == pytest.approx(dice, rel=1e-5)
    assert float(got["loss"]) == pytest.approx(ce + 20 * focal + dice, rel=1e-5)
    # the normaliser is the 5 target masks, not the batch (2) nor 1: guard the inputs
    assert abs(focal * 5 / 2 - focal) > 1e-3


def test_set_criterion_weights_eos_and_fresh_matching_per_aux_layer():
    """Other weights (matcher costs = loss weights), another no-object weight, and an aux layer
    with its own predictions, matched anew: the total is the sum of both layers' weighted terms;
    the returned terms are the final layer's."""
    logits, masks, targets = _case(SEED)
    l2, m2, _ = _case(SEED + 10)
    out, tt = _torch(logits, masks, targets)
    aux, _ = _torch(l2, m2, targets)
    wc, wm, wd, eos = 2.0, 5.0, 3.0, 0.3
    crit = SetCriterion(K, class_weight=wc, mask_weight=wm, dice_weight=wd, no_object_weight=eos)
    got = crit({**out, "aux_outputs": [aux]}, tt)
    final = _reference_losses(logits, masks, targets, wc, wm, wd, eos)
    layer2 = _reference_losses(l2, m2, targets, wc, wm, wd, eos)
    total = sum(w * v for w, v in zip((wc, wm, wd), final)) + sum(w * v for w, v in zip((wc, wm, wd), layer2))
    assert float(got["loss"]) == pytest.approx(total, rel=1e-5)
    assert [float(got[k]) for k in ("loss_ce", "loss_mask", "loss_dice")] == pytest.approx(list(final), rel=1e-5)


def test_set_criterion_class_agnostic_on_several_targets():
    logits, masks, targets = _case(SEED)
    obj = logits[..., [0, K]]  # K = 1: object, no-object
    out, tt = _torch(obj, masks, targets)
    got = SetCriterion(1, class_agnostic=True)(out, tt)
    ce, focal, dice = _reference_losses(obj, masks, targets, agnostic=True)
    assert [float(got[k]) for k in ("loss_ce", "loss_mask", "loss_dice")] == pytest.approx([ce, focal, dice], rel=1e-5)


@pytest.mark.parametrize("alpha,gamma", [(0.0, 2.0), (-1.0, 0.0), (0.6, 1.0)])
def test_focal_alpha_and_gamma_reach_the_matcher_and_the_loss(alpha, gamma):
    """Non-default focal alpha / gamma (alpha 0: positives weigh 0; alpha < 0: no balance) are used
    by the default matcher and by the mask loss alike."""
    logits, masks, targets = _case(SEED)
    out, tt = _torch(logits, masks, targets)
    got = SetCriterion(K, focal_alpha=alpha, focal_gamma=gamma)(out, tt)
    ce, focal, dice = _reference_losses(logits, masks, targets, alpha=alpha, gamma=gamma)
    assert [float(got[k]) for k in ("loss_ce", "loss_mask", "loss_dice")] == pytest.approx([ce, focal, dice], rel=1e-5)
    m = HungarianMatcher(focal_alpha=alpha, focal_gamma=gamma)(out, tt)
    for b, (rows, cols) in enumerate(m):
        lab, tm = targets[b]
        want = _brute_assign(_cost(logits[b], masks[b], lab, tm, alpha=alpha, gamma=gamma))
        assert dict(zip(cols.tolist(), rows.tolist())) == want


def test_pairwise_focal_cost_of_one_pixel_masks():
    """P = 1 pixel (the per-pixel mean divides by 1): logits (0, ln 3) vs targets (1, 0)."""
    x = torch.tensor([[0.0], [math.log(3.0)]])
    y = torch.tensor([[1.0], [0.0]])
    got = batch_sigmoid_focal_cost(x, y)
    want = [[_focal(np.array([xv]), np.array([yv])) for yv in (1.0, 0.0)] for xv in (0.0, math.log(3.0))]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # alpha 0 keeps only the negatives' term; alpha < 0 no balance at all
    got0 = batch_sigmoid_focal_cost(x, y, alpha=0.0)
    assert got0[:, 0].tolist() == [0.0, 0.0]
    want_nb = [[_focal(np.array([xv]), np.array([yv]), alpha=-1.0) for yv in (1.0, 0.0)] for xv in (0.0, math.log(3.0))]
    np.testing.assert_allclose(batch_sigmoid_focal_cost(x, y, alpha=-1.0).numpy(), want_nb, rtol=1e-6)


def test_an_all_empty_batch_and_the_refusals():
    """No targets at all: every query is no-object, the mask losses are 0 (and still in the graph),
    CE = the mean of -log p(no-object) (every weight 0.1: the weights cancel)."""
    logits, masks, _ = _case(SEED)
    out, _ = _torch(logits, masks, [])
    out["pred_masks"].requires_grad_(True)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W, dtype=torch.bool)}] * 2
    got = SetCriterion(K)(out, empty)
    logp = np.log(_softmax(logits))[..., K]
    assert got["loss_ce"].item() == pytest.approx(float(-logp.mean()), rel=1e-5)
    assert got["loss_mask"].item() == 0.0 and got["loss_dice"].item() == 0.0
    got["loss"].backward()
    assert out["pred_masks"].grad is not None and float(out["pred_masks"].grad.abs().sum()) == 0.0
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0)
    HungarianMatcher(0, 0, 1), HungarianMatcher(0, 1, 0), HungarianMatcher(1, 0, 0)  # one cost is enough
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        SetCriterion(0)
    _, tt = _torch(logits, masks, _case(SEED)[2])
    bad = [{"labels": torch.tensor([-1, 0, 1]), "masks": tt[0]["masks"]}, tt[1]]
    with pytest.raises(ValueError, match="outside 0..2"):
        HungarianMatcher()(out, bad)


def test_num_masks_sums_over_workers_then_divides_by_the_world_size(monkeypatch):
    """In-process stand-in for a process group of 2 workers (the forked two-worker test in
    test_proposals.py runs in child processes): all_reduce adds the other worker's 4 masks in
    place; released MaskFormer: (3 + 4) / 2 = 3.5; an empty batch on both: max(0 / 2, 1) = 1."""
    from zeroseg.models.maskformer import num_masks_across_workers

    def all_reduce(t):
        t += 4.0

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    three = [{"labels": torch.zeros(3, dtype=torch.int64), "masks": torch.zeros(3, 2, 2)}]
    assert num_masks_across_workers(three) == 3.5
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: None)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 2, 2)}]
    assert num_masks_across_workers(empty) == 1.0
    assert num_masks_across_workers(three + three) == 3.0  # (6 + 0) / 2


def test_an_image_without_targets_before_one_with_targets():
    """The first image has no segments (all its queries no-object), the second 2: its mask losses
    still count (normaliser 2), CE over all 8 queries."""
    logits, masks, targets = _case(SEED)
    none = (np.zeros(0, np.int64), np.zeros((0, H, W), bool))
    batch = [none, targets[1]]
    out, tt = _torch(logits, masks, batch)
    got = SetCriterion(K)(out, tt)
    ce, focal, dice = _reference_losses(logits, masks, batch)
    assert focal > 0 and dice > 0
    assert [float(got[k]) for k in ("loss_ce", "loss_mask", "loss_dice")] == pytest.approx([ce, focal, dice], rel=1e-5)


def test_bf16_predictions_give_float32_losses_with_and_without_targets():
    logits, masks, targets = _case(SEED)
    out, tt = _torch(logits, masks, targets)
    out = {k: v.to(torch.bfloat16) for k, v in out.items()}
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, H, W, dtype=torch.bool)}] * 2
    for batch in (tt, empty):
        got = SetCriterion(K)(out, batch)
        assert all(got[k].dtype == torch.float32 for k in ("loss", "loss_ce", "loss_mask", "loss_dice"))


def test_matcher_defaults_are_the_released_costs_and_malformed_targets_are_refused():
    """Released MaskFormer / ZegFormer: HungarianMatcher(cost_class=1, cost_mask=20, cost_dice=1),
    focal alpha 0.25, gamma 2; the matcher with no arguments equals the brute force with them."""
    m = HungarianMatcher()
    assert (m.cost_class, m.cost_mask, m.cost_dice, m.focal_alpha, m.focal_gamma) == (1.0, 20.0, 1.0, 0.25, 2.0)
    logits, masks, targets = _case(SEED)
    out, tt = _torch(logits, masks, targets)
    (rows, cols), _ = m(out, tt)
    assert dict(zip(cols.tolist(), rows.tolist())) == _brute_assign(_cost(logits[0], masks[0], *targets[0]))
    good = tt[1]
    for bad, match in (
        ({"labels": good["labels"]}, "must be"),
        ({"masks": good["masks"]}, "must be"),
        ({"labels": good["labels"], "masks": good["masks"][0]}, r"must be \[N, H, W\]"),
        ({"labels": good["labels"], "masks": good["masks"][:1]}, r"must be \[N, H, W\]"),
    ):
        with pytest.raises(ValueError, match=match):
            m(out, [tt[0], bad])
    # a cost tensor that requires grad is read without its graph
    from zeroseg.models.maskformer import hungarian_match

    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    rows, cols = hungarian_match(c)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
