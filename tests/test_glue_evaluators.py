"""``zeroseg.evaluation``'s evaluators on tiny hand-made batches (no Ray, no model): every expected
count is worked by hand in the test's docstring or comments.

GZS3Evaluator: bilinear upsampling (``align_corners=False``) before the argmax, the activation
after it, gamma on probabilities, pixels (ignore included) and images counted, batches and
partial states added, sets never seen finalised as zeros, read-only and 16-bit labels, the
contract errors. VariantsGZS3Evaluator: one evaluator per variant in the segmenter's order, the
gamma passed on, merge. ProposalRecallEvaluator: thresholds, groups, merge, errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zeroseg.errors import DataError
from zeroseg.evaluation import GZS3Evaluator, ProposalRecallEvaluator, VariantsGZS3Evaluator, segment_best_iou

SETS = {"s": {"num_classes": 2, "seen": [0], "unseen": [1]}}  # ignore_index: the default 255


def _inputs(labels, sets=None):
    return {
        "labels": labels,
        "label_uris": [f"lab{i}.png" for i in range(len(labels))],
        "sets": sets or ["s"] * len(labels),
    }


def _out(scores, name="s", index=None, **kw):
    n = len(next(iter(scores.values()))) if isinstance(scores, dict) else len(scores)
    return {"groups": [{"set": name, "index": index or list(range(n)), "scores": scores}], **kw}


def test_upsampling_is_bilinear_without_corner_alignment():
    """Scores on a 1 x 2 grid, label 1 x 4. Class 0 = [1, 0], class 1 = 0.7 everywhere.
    align_corners=False samples x = -0.25, 0.25, 0.75, 1.25 (clamped): class 0 = 1, 0.75, 0.25, 0
    -> predictions 0, 0, 1, 1; align_corners=True (x = 0, 1/3, 2/3, 1) would give 1, 0.67, ...:
    0, 1, 1, 1. Ground truth [0, 0, 1, 255]: the ignore pixel is not counted but is a pixel."""
    s = torch.tensor([[[[1.0, 0.0]], [[0.7, 0.7]]]])  # [1, 2, 1, 2]
    ev = GZS3Evaluator(SETS)
    ev.process(_inputs([np.array([[0, 0, 1, 255]], np.uint8)]), _out(s))
    r = ev.finalize()["s"]
    assert r["gzs3"].tolist() == [[2, 0], [0, 1]]
    assert r["zs3"].tolist() == [[1]]  # the one unseen pixel, among the unseen classes only
    assert (r["images"], r["pixels"]) == (1, 4)


def test_gamma_on_probabilities_and_the_activation_after_upsampling():
    """Logits (2, 0.5) at one pixel, label 1 x 1, seen 0, unseen 1.

    * probabilities=True, activation sigmoid: sigmoid = (0.881, 0.622); gamma 0.2 -> 0.681 >
      0.622: seen; gamma 0.3 -> 0.581 < 0.622: unseen;
    * without the activation the logits themselves would be the "probabilities": 2 - 0.3 = 1.7 >
      0.5: seen (so the activation must be applied);
    * probabilities=False: softmax (0.818, 0.182): gamma 0.3 keeps seen, 0.7 flips it."""
    s = torch.tensor([[[[2.0]], [[0.5]]]])
    lab = [np.zeros((1, 1), np.uint8)]

    def pred(gamma, **kw):
        ev = GZS3Evaluator(SETS, gamma=gamma)
        ev.process(_inputs(lab), _out(s, **kw))
        return int(ev.finalize()["s"]["gzs3"][0].argmax())

    assert pred(0.2, probabilities=True, activation="sigmoid") == 0
    assert pred(0.3, probabilities=True, activation="sigmoid") == 1
    assert pred(0.3, probabilities=True) == 0
    assert pred(0.3) == 0 and pred(0.7) == 1
    assert pred(0.0, probabilities=True, activation="sigmoid") == 0
    assert GZS3Evaluator(SETS, gamma=1).gamma == 1.0 and isinstance(GZS3Evaluator(SETS, gamma=1).gamma, float)


def test_batches_partial_states_and_unseen_sets_add_up():
    """Two sets; batch 1 has two images of ``s`` (list form, two sizes), batch 2 one image of
    ``t`` (3 classes, seen 0, unseen 1 and 2; ignore 9). Merging batch 2's evaluator into batch
    1's gives both; a third set ``u`` never seen finalises as zeros."""
    sets = {
        "s": {"num_classes": 2, "seen": [0], "unseen": [1], "ignore_index": 255},
        "t": {"num_classes": 3, "seen": ["0"], "unseen": [1, 2], "ignore_index": 9},
        "u": {"num_classes": 2, "seen": [1], "unseen": [0]},
    }
    a = GZS3Evaluator(sets)
    one = torch.tensor([[[[0.0, 1.0]], [[1.0, 0.0]]]])  # predicts 1, 0 on a 1 x 2 image
    two = torch.zeros((1, 2, 2, 1))
    two[0, 1] = 1.0  # predicts 1 everywhere on a 2 x 1 image
    a.process(
        _inputs([np.array([[1, 1]], np.uint8), np.array([[0], [255]], np.uint8)]),
        _out([one, two]),
    )
    ra = a.finalize()
    # image 1: gt (1, 1) pred (1, 0) -> cm[1,1] += 1, cm[1,0] += 1; image 2: gt (0, ignore) pred 1
    assert ra["s"]["gzs3"].tolist() == [[0, 1], [1, 1]] and (ra["s"]["images"], ra["s"]["pixels"]) == (2, 4)
    b = GZS3Evaluator(sets)
    st = torch.zeros((1, 3, 1, 3))
    st[0, 2, 0, 0] = st[0, 1, 0, 1] = st[0, 0, 0, 2] = 1.0  # predicts 2, 1, 0
    b.process({"labels": [np.array([[2, 2, 9]], np.uint8)], "label_uris": ["t.png"], "sets": ["t"]}, _out(st, "t"))
    a.merge(b)
    r = a.finalize()
    assert r["t"]["gzs3"].tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 1]] and (r["t"]["images"], r["t"]["pixels"]) == (
        1,
        3,
    )
    # ZS3 among the unseen classes 1, 2 only: pixel 1 (pred 2) right, pixel 2 (pred 1) -> class 1
    assert r["t"]["zs3"].tolist() == [[0, 0], [1, 1]]
    assert r["s"]["gzs3"].tolist() == [[0, 1], [1, 1]]  # unchanged by the merge
    assert r["u"]["gzs3"].tolist() == [[0, 0], [0, 0]] and r["u"]["zs3"].shape == (1, 1)
    assert (r["u"]["images"], r["u"]["pixels"]) == (0, 0)
    assert list(r) == ["s", "t", "u"]
    # the same batch again adds (the state is a sum, not the last batch)
    a.process(_inputs([np.array([[1, 1]], np.uint8)]), _out(one))
    assert a.finalize()["s"]["gzs3"].tolist() == [[0, 1], [2, 2]] and a.finalize()["s"]["images"] == 3
    a.reset()
    assert a.gzs3 == {} and a.finalize()["s"]["images"] == 0


def test_read_only_and_16_bit_labels():
    """A read-only view (np.asarray of a decoded image can be) and a uint16 label with ignore
    65535: counted like the uint8 label."""
    lab = np.array([[0, 1, 1]], np.uint8)
    lab.setflags(write=False)
    s = torch.tensor([[[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]]])
    ev = GZS3Evaluator(SETS)
    ev.process(_inputs([lab]), _out(s))
    assert ev.finalize()["s"]["gzs3"].tolist() == [[1, 0], [1, 1]]
    ev16 = GZS3Evaluator({"s": {**SETS["s"], "ignore_index": 65535}})
    lab16 = np.array([[0, 1, 65535]], np.uint16)
    ev16.process(_inputs([lab16]), _out(s))
    assert ev16.finalize()["s"]["gzs3"].tolist() == [[1, 0], [0, 1]] and ev16.finalize()["s"]["pixels"] == 3
    strided = np.array([[0, 9, 1, 9, 1, 9]], np.uint8)[:, ::2]  # not C-contiguous
    ev2 = GZS3Evaluator(SETS)
    ev2.process(_inputs([strided]), _out(s))
    assert ev2.finalize()["s"]["gzs3"].tolist() == [[1, 0], [1, 1]]


def test_the_batch_contract_errors():
    ev = GZS3Evaluator(SETS)
    lab = [np.zeros((1, 2), np.uint8)]
    good = torch.zeros((1, 2, 1, 2))
    with pytest.raises(DataError, match=r"scores \(1, 3, 1, 2\) for eval set 's' with 2 classes and 1 images"):
        ev.process(_inputs(lab), _out(torch.zeros((1, 3, 1, 2))))
    with pytest.raises(DataError, match=r"with 2 classes and 2 images"):
        ev.process(_inputs(lab * 2), _out(good, index=[0, 1]))
    with pytest.raises(DataError, match=r"scores \[\(2, 1, 2\)\]"):
        ev.process(_inputs(lab), _out([torch.zeros((2, 1, 2))]))
    with pytest.raises(DataError, match=r"returned the variants \['a'\] for eval set 's'"):
        ev.process(_inputs(lab), _out({"a": good}))
    with pytest.raises(DataError, match=r"lab0\.png \(eval set 's', 2 classes\)"):
        ev.process(_inputs([np.array([[0, 7]], np.uint8)]), _out(good))
    v = GZS3Evaluator(SETS, variant="b")
    with pytest.raises(DataError, match=r"no scores for variant 'b' \(eval set 's'; it returned \['a'\]\)"):
        v.process(_inputs(lab), _out({"a": good}))
    with pytest.raises(DataError, match=r"variant 'b' .* returned a single output"):
        v.process(_inputs(lab), _out(good))
    assert ev.finalize()["s"]["images"] == 0  # nothing counted by the failed batches


def test_variants_evaluator_keeps_the_segmenters_order_and_the_gamma():
    """Variants b then a (the segmenter's order, not sorted); b predicts class 0 with margin 0.1
    in probability (softmax of logits ln(0.55/0.45)), a class 1; gamma 0.2 flips b to unseen."""
    gap = float(np.log(0.55 / 0.45))
    b = torch.tensor([[[[gap]], [[0.0]]]])
    a = torch.tensor([[[[0.0]], [[1.0]]]])
    lab = [np.zeros((1, 1), np.uint8)]
    ev = VariantsGZS3Evaluator(SETS, gamma=0.2)
    assert ev.variants == [] and ev.gamma == 0.2
    ev.process(_inputs(lab), {**_out({"b": b, "a": a}), "variants": ["b", "a"]})
    assert ev.variants == ["b", "a"]
    r = ev.finalize()
    assert list(r) == ["b", "a"]
    assert r["b"]["s"]["gzs3"].tolist() == [[0, 1], [0, 0]]  # 0.55 - 0.2 < 0.45
    assert r["a"]["s"]["gzs3"].tolist() == [[0, 1], [0, 0]]
    ev0 = VariantsGZS3Evaluator(SETS)
    ev0.process(_inputs(lab), {**_out({"b": b, "a": a}), "variants": ["b", "a"]})
    assert ev0.finalize()["b"]["s"]["gzs3"].tolist() == [[1, 0], [0, 0]]  # no calibration: seen
    ev.merge(ev0)
    assert ev.finalize()["b"]["s"]["gzs3"].tolist() == [[1, 1], [0, 0]]
    assert ev.finalize()["a"]["s"]["images"] == 2
    plain = VariantsGZS3Evaluator(SETS)
    plain.process(_inputs(lab), _out(a))
    assert plain.variants == [None] and plain.finalize()[None]["s"]["gzs3"].tolist() == [[0, 1], [0, 0]]
    other = VariantsGZS3Evaluator(SETS)
    other.merge(ev0)  # a fresh evaluator takes the variants it is given
    assert other.variants == ["b", "a"] and other.finalize()["b"]["s"]["images"] == 1
    plain.reset()
    assert plain.variants == []


def test_proposal_recall_groups_thresholds_and_merge():
    """Label 2 x 4: class 2 (seen) the left half, class 0 (unseen) the right half. Proposals:
    q0 = the left half + one right pixel (IoU with class 2: 4 / 5 = 0.8), q1 = one right pixel
    (IoU with class 0: 1 / 4 = 0.25). Thresholds (0.25, 0.8, 1.0): seen recalled at 0.25 and 0.8,
    unseen at 0.25 only; nothing at 1.0. The seen / unseen lists arrive unsorted."""
    sets = {"s": {"num_classes": 3, "seen": [2, 1], "unseen": [0]}}
    ev = ProposalRecallEvaluator(sets, thresholds=(0.25, 0.8, 1.0))
    assert ev.sets["s"]["seen"] == [1, 2] and ev.sets["s"]["ignore_index"] == 255
    lab = np.array([[2, 2, 0, 0], [2, 2, 0, 0]], np.uint8)
    q0 = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    q1 = np.array([[0, 0, 0, 0], [0, 0, 0, 1]], bool)
    logits = torch.tensor(np.stack([np.where(q0, 4.0, -4.0), np.where(q1, 4.0, -4.0)]), dtype=torch.float32)
    ids, best = segment_best_iou(logits, lab)
    assert ids.tolist() == [0, 2] and best.tolist() == pytest.approx([0.25, 0.8])
    ev.process({"labels": [lab], "label_uris": ["a.png"], "sets": ["s"]}, {"mask_logits": logits[None]})
    r = ev.finalize()["s"]
    assert r["images"] == 1 and r["segments"] == {"seen": 1, "unseen": 1, "all": 2}
    assert r["recalled"] == {"seen": [1, 1, 0], "unseen": [1, 0, 0], "all": [2, 1, 0]}
    assert r["recall"]["all"] == {0.25: 1.0, 0.8: 0.5, 1.0: 0.0}
    # a second evaluator's state merges by addition; an image with no unseen class adds none
    other = ProposalRecallEvaluator(sets, thresholds=(0.25, 0.8, 1.0))
    lab2 = np.full((2, 4), 1, np.uint8)
    lab2[0, 0] = 255  # the default ignore value: no class, left out (IoU 7 / 7)
    other.process(
        {"labels": [lab2], "label_uris": ["b.png"], "sets": ["s"]}, {"mask_logits": torch.full((1, 1, 2, 4), 4.0)}
    )
    ev.merge(other)
    r = ev.finalize()["s"]
    assert r["images"] == 2 and r["segments"] == {"seen": 2, "unseen": 1, "all": 3}
    assert r["recalled"]["seen"] == [2, 2, 1] and r["recall"]["seen"][1.0] == 0.5
    empty = ProposalRecallEvaluator(sets).finalize()["s"]
    assert (
        empty["images"] == 0 and np.isnan(empty["recall"]["unseen"][0.3]) and list(empty["recall"]["all"]) == [0.3, 0.5]
    )
    with pytest.raises(DataError, match=r"c\.png \(eval set 's'\): class id\(s\) \[7\]"):
        ev.process(
            {"labels": [np.full((2, 4), 7, np.uint8)], "label_uris": ["c.png"], "sets": ["s"]},
            {"mask_logits": logits[None]},
        )
    for bad in ((), (0.0,), (1.01,)):
        with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
            ProposalRecallEvaluator(sets, thresholds=bad)
    assert ProposalRecallEvaluator(sets, thresholds=(1,)).thresholds == (1.0,)
    # a set whose ignore value is 7: the evaluator passes it on (7 is no class, and is left out)
    ev7 = ProposalRecallEvaluator({"t": {"num_classes": 2, "seen": [0], "unseen": [1], "ignore_index": 7}}, (1.0,))
    ev7.process(
        {"labels": [np.array([[0, 7]], np.uint8)], "label_uris": ["d.png"], "sets": ["t"]},
        {"mask_logits": torch.full((1, 1, 1, 2), 4.0)},
    )
    assert ev7.finalize()["t"]["recalled"]["seen"] == [1]  # IoU 1 / 1 (1 / 2 if pixel 7 counted)


def test_segment_best_iou_upsamples_the_logits_and_needs_3d():
    """Logits on a 1 x 2 grid, (+4, -4), label 1 x 4 all class 0: bilinear upsampling
    (align_corners=False) gives +4, +2, -2, -4 -> the proposal covers 2 of 4 pixels: IoU 0.5."""
    ids, best = segment_best_iou(torch.tensor([[[4.0, -4.0]]]), np.zeros((1, 4), np.uint8))
    assert ids.tolist() == [0] and best.tolist() == pytest.approx([0.5])
    with pytest.raises(ValueError, match=r"\[Q, h, w\], got \(1, 1, 1, 2\)"):
        segment_best_iou(torch.zeros((1, 1, 1, 2)), np.zeros((1, 2), np.uint8))
    # logits (1, -4) to width 5: align_corners=False samples x = 0 (clamped), 0.1, 0.5, 0.9, 1 ->
    # 1, 0.5, -1.5, ... : 2 of 5 pixels (align_corners=True: x = 0, 0.25, ...: 1, -0.25: 1 of 5)
    ids, best = segment_best_iou(torch.tensor([[[1.0, -4.0]]]), np.zeros((1, 5), np.uint8))
    assert best.tolist() == pytest.approx([0.4])
    # a logit of exactly 0 (sigmoid 0.5) is not in the proposal (sigmoid > 0.5): IoU 1 / 2, not 1
    ids, best = segment_best_iou(torch.tensor([[[0.0, 4.0]]]), np.zeros((1, 2), np.uint8))
    assert best.tolist() == pytest.approx([0.5])
    # a logit of 0.5 (sigmoid 0.62) is in it; a 16-bit label with ignore 65535 counts the same
    ids, best = segment_best_iou(torch.tensor([[[0.5, -4.0]]]), np.zeros((1, 2), np.uint8))
    assert best.tolist() == pytest.approx([0.5])
    ids, best = segment_best_iou(torch.tensor([[[0.5, 4.0]]]), np.array([[300, 65535]], np.uint16), 65535)
    assert ids.tolist() == [300] and best.tolist() == pytest.approx([1.0])
    assert ids.dtype == np.int64  # the documented id type, whatever the label's
    assert segment_best_iou(torch.zeros((1, 1, 1)), np.zeros((1, 1), np.uint8))[0].dtype == np.int64
    # ignore 7 instead of 255: those pixels belong to neither side
    ids, best = segment_best_iou(torch.tensor([[[4.0, 4.0]]]), np.array([[0, 7]], np.uint8), ignore_index=7)
    assert ids.tolist() == [0] and best.tolist() == pytest.approx([1.0])
