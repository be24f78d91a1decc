"""zeroseg.confusion and zeroseg.metrics against hand-computed confusion matrices, and zeroseg.plots."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroseg.confusion import calibrated_argmax, confusion_matrix, confusion_matrix_torch, gzs3_zs3_confusion
from zeroseg.metrics import (
    harmonic_iou,
    nanmean,
    per_class_accuracy,
    per_class_iou,
    per_class_table,
    pixel_accuracy,
    segmentation_metrics,
    zs3_metrics,
)

# ------------------------------------------------------------------------------------------
# The toy: 5 classes, seen S = {0 sky, 1 road}, unseen U = {2 cat, 3 dog, 4 cow}; one 3x4 image.
#
#   gt                       pred (GZS3)
#   [[  0,   0, 0, 1],       [[0, 0, 1, 1],
#    [  1,   1, 2, 2],        [1, 1, 2, 3],
#    [255, 255, 2, 2]]        [3, 0, 2, 1]]
#
# The two 255 pixels are ignored (their predictions 3 and 0 are not counted): 10 valid pixels,
# (gt, pred) pairs: (0,0) (0,0) (0,1) (1,1) | (1,1) (1,1) (2,2) (2,3) | (2,2) (2,1)
#
#   cm (rows gt, cols pred)      gt px  pred px  TP  union = gt + pred - TP   IoU        Acc
#   0 sky  [2, 1, 0, 0, 0]        3      2        2   3                       200/3      200/3
#   1 road [0, 3, 0, 0, 0]        3      5        3   5                       60         100
#   2 cat  [0, 1, 2, 1, 0]        4      2        2   4                       50         50
#   3 dog  [0, 0, 0, 0, 0]        0      1        0   1   predicted, no GT ->  0 (counts) NaN
#   4 cow  [0, 0, 0, 0, 0]        0      0        0   0   absent from both ->  NaN        NaN
#
#   pAcc = (2 + 3 + 2) / 10 = 70
#   mAcc = nanmean(200/3, 100, 50) = (650/3) / 3 = 650/9
#   mIoU = nanmean(200/3, 60, 50, 0) = (530/3) / 4 = 530/12      (cow excluded)
#   mIoU(S) = (200/3 + 60) / 2 = 190/3
#   mIoU(U) = (50 + 0) / 2 = 25                                 (dog counts, cow excluded)
#   hIoU = 2 S U / (S + U) = 2 * 190/3 * 25 / (190/3 + 25) = 9500 / 265      (ZegCLIP Eq. 9)
# ------------------------------------------------------------------------------------------
GT = np.array([[0, 0, 0, 1], [1, 1, 2, 2], [255, 255, 2, 2]], np.uint8)
PRED = np.array([[0, 0, 1, 1], [1, 1, 2, 3], [3, 0, 2, 1]], np.int64)
CM = np.array([[2, 1, 0, 0, 0], [0, 3, 0, 0, 0], [0, 1, 2, 1, 0], [0] * 5, [0] * 5])
SEEN, UNSEEN = [0, 1], [2, 3, 4]
NAMES = ["sky", "road", "cat", "dog", "cow"]


@pytest.fixture(params=["numpy-on-cpu", "torch.bincount"])
def counting(request, monkeypatch):
    """Run a test through both counting back ends of the torch functions (torch.bincount is
    the path CUDA tensors take)."""
    import zeroseg.confusion

    monkeypatch.setattr(zeroseg.confusion, "NUMPY_ON_CPU", request.param == "numpy-on-cpu")
    return request.param


def test_confusion_matrix_toy_numpy_and_torch(counting):
    cm = confusion_matrix(PRED, GT, 5)
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, CM)
    t = confusion_matrix_torch(torch.from_numpy(PRED), torch.from_numpy(GT), 5)
    assert t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), CM)
    # int64 ground truth takes the non-LUT path; same answer
    np.testing.assert_array_equal(confusion_matrix(PRED, GT.astype(np.int64), 5), CM)
    np.testing.assert_array_equal(
        confusion_matrix_torch(torch.from_numpy(PRED), torch.from_numpy(GT).long(), 5).numpy(), CM
    )


def test_metrics_toy_exact():
    m = segmentation_metrics(CM, SEEN, UNSEEN)
    np.testing.assert_allclose(m.iou[:4], [200 / 3, 60, 50, 0])
    assert math.isnan(m.iou[4])  # cow: no GT, no prediction
    np.testing.assert_allclose(m.acc[:3], [200 / 3, 100, 50])
    assert math.isnan(m.acc[3]) and math.isnan(m.acc[4])
    assert m.pAcc == pytest.approx(70.0)
    assert m.mAcc == pytest.approx(650 / 9)
    assert m.mIoU == pytest.approx(530 / 12)
    assert m.mIoU_seen == pytest.approx(190 / 3)
    assert m.mIoU_unseen == pytest.approx(25.0)
    assert m.hIoU == pytest.approx(9500 / 265)
    np.testing.assert_array_equal(m.gt_pixels, [3, 3, 4, 0, 0])
    np.testing.assert_array_equal(m.pred_pixels, [2, 5, 2, 1, 0])
    rows = m.per_class(NAMES)
    assert rows[3] == {
        "id": 3,
        "name": "dog",
        "split": "unseen",
        "iou": 0.0,
        "acc": None,
        "gt_pixels": 0,
        "pred_pixels": 1,
    }
    assert rows[4]["iou"] is None and rows[0]["split"] == "seen"
    # the same from the free functions
    assert pixel_accuracy(CM) == pytest.approx(70.0)
    np.testing.assert_allclose(per_class_iou(torch.from_numpy(CM)), m.iou)
    np.testing.assert_allclose(per_class_accuracy(CM), m.acc)


def test_harmonic_iou():
    assert harmonic_iou(0.0, 0.0) == 0.0  # both zero: 0, not 0/0
    assert harmonic_iou(50.0, 0.0) == 0.0
    assert harmonic_iou(60.0, 40.0) == pytest.approx(48.0)  # 2*60*40/100
    assert harmonic_iou(30.0, 30.0) == pytest.approx(30.0)
    assert math.isnan(harmonic_iou(float("nan"), 10.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN without numpy's "mean of empty slice" warning
        assert math.isnan(nanmean(np.array([np.nan, np.nan]))) and math.isnan(nanmean(np.array([])))
        assert nanmean(np.array([np.nan, 1.0, 3.0])) == 2.0


def test_ignore_label_and_value_errors(counting):
    # predictions at ignored pixels are never looked at, even out of range
    pred = PRED.copy()
    pred[2, 0] = 255
    np.testing.assert_array_equal(confusion_matrix(pred, GT, 5), CM)
    np.testing.assert_array_equal(confusion_matrix_torch(torch.from_numpy(pred), torch.from_numpy(GT), 5).numpy(), CM)
    # everything ignored: all zeros
    assert confusion_matrix(PRED, np.full_like(GT, 255), 5).sum() == 0
    bad_gt = GT.copy()
    bad_gt[0, 1] = 7
    for fn, a, b in (
        (confusion_matrix, PRED, bad_gt),
        (confusion_matrix_torch, torch.from_numpy(PRED), torch.from_numpy(bad_gt)),
    ):
        with pytest.raises(ValueError, match=r"ground-truth value 7 is outside \[0, 5\)"):
            fn(a, b, 5)
    with pytest.raises(ValueError, match="ground-truth value 300"):
        confusion_matrix(PRED, np.where(GT == 1, 300, GT.astype(np.int64)), 5)
    with pytest.raises(ValueError, match="ground-truth value -1"):
        confusion_matrix_torch(torch.from_numpy(PRED), torch.from_numpy(np.where(GT == 1, -1, GT.astype(np.int64))), 5)
    bad_pred = PRED.copy()
    bad_pred[1, 2] = 9
    with pytest.raises(ValueError, match="prediction value 9"):
        confusion_matrix(bad_pred, GT, 5)
    with pytest.raises(ValueError, match="prediction value 9"):
        confusion_matrix_torch(torch.from_numpy(bad_pred), torch.from_numpy(GT), 5)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(PRED[:2], GT, 5)
    with pytest.raises(ValueError, match="both seen and unseen"):
        segmentation_metrics(CM, [0, 1, 2], UNSEEN)


@pytest.mark.parametrize("c, shape", [(13, (3, 17, 23)), (171, (2, 300, 400))])  # 171: several chunks
def test_confusion_matrices_match_np_add_at_on_random_maps(counting, c, shape):
    rng = np.random.default_rng(c)
    gt = rng.integers(0, c, size=shape).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = 255
    scores = torch.from_numpy(rng.standard_normal((shape[0], c, *shape[1:]), dtype=np.float32))
    pred = scores.argmax(1).numpy()
    valid = gt != 255
    ref = np.zeros((c, c), np.int64)
    np.add.at(ref, (gt[valid].astype(np.int64), pred[valid]), 1)
    np.testing.assert_array_equal(confusion_matrix(pred, gt, c), ref)
    np.testing.assert_array_equal(confusion_matrix(pred, gt.astype(np.int64), c), ref)
    np.testing.assert_array_equal(confusion_matrix_torch(torch.from_numpy(pred), torch.from_numpy(gt), c).numpy(), ref)
    # ZS3 over a third of the classes, uint8 and int64 labels
    unseen = list(range(0, c, 3))
    seen = [i for i in range(c) if i not in unseen]
    pu = scores[:, unseen].argmax(1).numpy()
    pos = {k: i for i, k in enumerate(unseen)}
    m = np.isin(gt, unseen)
    zref = np.zeros((len(unseen),) * 2, np.int64)
    np.add.at(zref, (np.vectorize(pos.get)(gt[m]), pu[m]), 1)
    for lab in (torch.from_numpy(gt), torch.from_numpy(gt.astype(np.int64))):
        gz, zs = gzs3_zs3_confusion(scores, lab, seen, unseen)
        np.testing.assert_array_equal(gz.numpy(), ref)
        np.testing.assert_array_equal(zs.numpy(), zref)


def _toy_scores() -> torch.Tensor:
    """[1, 5, 3, 4] scores whose GZS3 argmax is PRED. The unseen restriction differs at (2, 3):
    GZS3 says road (10), but among the unseen classes cat (5) beats dog and cow (0)."""
    s = F.one_hot(torch.from_numpy(PRED), 5).permute(2, 0, 1).float()[None] * 10.0
    s[0, 2, 2, 3] = 5.0
    return s


def test_gzs3_and_zs3_from_the_same_scores(counting):
    scores = _toy_scores()
    assert torch.equal(calibrated_argmax(scores, SEEN, 0.0)[0], torch.from_numpy(PRED))
    gz, zs = gzs3_zs3_confusion(scores, torch.from_numpy(GT)[None], SEEN, UNSEEN)
    np.testing.assert_array_equal(gz.numpy(), CM)
    # ZS3: only the 4 pixels with unseen GT (all cat), argmax over {cat, dog, cow}:
    # (1,2) cat, (1,3) dog, (2,2) cat, (2,3) cat (GZS3 said road) -> row cat = [3, 1, 0]
    np.testing.assert_array_equal(zs.numpy(), [[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    z = zs3_metrics(zs)
    # cat: TP 3, union 4 -> 75; dog: predicted, no GT -> 0; cow: NaN -> mIoU 37.5; pAcc 3/4
    assert z["iou"] == [75.0, 0.0, None] and z["mIoU"] == pytest.approx(37.5) and z["pAcc"] == pytest.approx(75.0)
    # a batch of two is the sum of its images
    gz2, zs2 = gzs3_zs3_confusion(scores.repeat(2, 1, 1, 1), torch.from_numpy(GT)[None].repeat(2, 1, 1), SEEN, UNSEEN)
    np.testing.assert_array_equal(gz2.numpy(), 2 * CM)
    np.testing.assert_array_equal(zs2.numpy(), 2 * zs.numpy())
    # no unseen class: an empty ZS3 matrix, NaN metrics
    _, none = gzs3_zs3_confusion(scores, torch.from_numpy(GT)[None], [0, 1, 2, 3, 4], [])
    assert none.shape == (0, 0) and math.isnan(zs3_metrics(none)["mIoU"])
    with pytest.raises(ValueError, match="ground-truth value 9"):
        gzs3_zs3_confusion(scores, torch.full((1, 3, 4), 9, dtype=torch.uint8), SEEN, UNSEEN)


def test_gamma_calibration_flips_a_seen_pixel_to_unseen(counting):
    # one pixel, class 0 seen, class 1 unseen, logits (2.0, 1.5): softmax p = (0.6225, 0.3775).
    # ZegFormer Eq. 2 on probabilities: gamma 0.1 -> (0.5225, 0.3775): seen;
    # gamma 0.3 -> (0.3225, 0.3775): unseen. (Subtracting from the raw logits would keep it seen:
    # 1.7 > 1.5, so this also pins the calibration to probabilities.)
    scores = torch.tensor([2.0, 1.5]).view(1, 2, 1, 1)
    label = torch.tensor([[[1]]], dtype=torch.uint8)  # ground truth: the unseen class
    assert calibrated_argmax(scores, [0], 0.0).item() == 0
    assert calibrated_argmax(scores, [0], 0.1).item() == 0
    assert calibrated_argmax(scores, [0], 0.3).item() == 1
    gz0, zs0 = gzs3_zs3_confusion(scores, label, [0], [1], gamma=0.0)
    gz3, zs3 = gzs3_zs3_confusion(scores, label, [0], [1], gamma=0.3)
    np.testing.assert_array_equal(gz0.numpy(), [[0, 0], [1, 0]])  # unseen pixel called seen
    np.testing.assert_array_equal(gz3.numpy(), [[0, 0], [0, 1]])  # calibrated: correct
    assert zs0.tolist() == zs3.tolist() == [[1]]  # ZS3 never sees the seen class
    m0, m3 = segmentation_metrics(gz0, [0], [1]), segmentation_metrics(gz3, [0], [1])
    assert m0.mIoU_unseen == 0.0 and m0.hIoU == 0.0 and math.isnan(m3.mIoU_seen) and m3.mIoU_unseen == 100.0


def test_per_class_table_and_plot(tmp_path):
    from zeroseg.plots import plot_per_class_iou

    m = segmentation_metrics(CM, SEEN, UNSEEN)
    md = per_class_table(m, NAMES)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| id | class | split | IoU (%) | Acc (%) | GT pixels")
    assert len(lines) == 2 + 5
    assert lines[2] == "| 0 | sky | seen | 66.67 | 66.67 | 3 | 2 |"
    assert lines[5] == "| 3 | dog | unseen | 0.00 | n/a | 0 | 1 |"
    assert lines[6] == "| 4 | cow | unseen | n/a | n/a | 0 | 0 |"
    out = plot_per_class_iou(m.iou, NAMES, SEEN, UNSEEN, tmp_path / "sub" / "iou.png", title="toy", summary=m.summary())
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="5 IoU values for 3 class names"):
        plot_per_class_iou(m.iou, NAMES[:3], SEEN, UNSEEN, tmp_path / "x.png")


def test_gamma_on_sigmoid_probabilities_is_subtracted_directly():
    # ZegCLIP-style per-class probabilities over 20 classes: seen class 0 at 0.95, unseen class 1
    # at 0.30, the rest 0.01. Subtracting gamma 0.1 from the probabilities keeps class 0
    # (0.85 > 0.30). A softmax of values in (0, 1) is nearly flat (exp(0.95)/Z ~ 0.118 vs
    # exp(0.30)/Z ~ 0.062), so gamma 0.1 would wrongly flip it to the unseen class.
    scores = torch.full((1, 20, 1, 1), 0.01)
    scores[0, 0], scores[0, 1] = 0.95, 0.30
    seen = [0] + list(range(2, 20))
    assert calibrated_argmax(scores, seen, 0.1, probabilities=True).item() == 0
    assert calibrated_argmax(scores, seen, 0.1).item() == 1  # the logit path softmaxes first
    assert calibrated_argmax(scores, seen, 0.7, probabilities=True).item() == 1  # 0.25 < 0.30
    label = torch.tensor([[[0]]], dtype=torch.uint8)
    gz, _ = gzs3_zs3_confusion(scores, label, seen, [1], gamma=0.1, probabilities=True)
    assert gz[0, 0] == 1


def test_segmenters_declare_their_score_kind():
    from zeroseg.models.maskclip import MaskCLIP
    from zeroseg.models.zegclip import ZegCLIP

    assert ZegCLIP.scores_are_probabilities and not MaskCLIP.scores_are_probabilities


def test_per_class_plot_of_171_classes_is_drawn_horizontally(tmp_path):
    from PIL import Image

    from zeroseg.plots import plot_per_class_iou

    iou = np.linspace(0.0, 85.0, 171)
    iou[5] = np.nan  # absent: drawn last
    names = [f"c{i}" for i in range(171)]
    out = plot_per_class_iou(iou, names, range(156), range(156, 171), tmp_path / "iou.png", title="171")
    w, h = Image.open(out).size
    # 171 rows at 0.16 in + 1.5 in of margins, 100 dpi: about 2886 px tall and 800 wide
    assert (w, h) == (800, int((0.16 * 171 + 1.5) * 100))


# ------------------------------------------------------------------------------------------
# zeroseg.confusion: boundaries of the argument checks, the value an error names, both counting
# back ends and both row schemes (uint8 label-value rows; other dtypes [0, C) / ignore / invalid)
# ------------------------------------------------------------------------------------------
def _np_reference(pred, gt, c, ignore):
    """Brute-force confusion matrix: one loop over the pixels."""
    ref = np.zeros((c, c), np.int64)
    for g, p in zip(np.asarray(gt).reshape(-1).tolist(), np.asarray(pred).reshape(-1).tolist(), strict=True):
        if g != ignore:
            ref[g, p] += 1
    return ref


def _both(pred, gt, c, **kw):
    """The NumPy function's and the torch function's matrix (as arrays)."""
    a = confusion_matrix(np.asarray(pred), np.asarray(gt), c, **kw)
    b = confusion_matrix_torch(torch.as_tensor(np.asarray(pred)), torch.as_tensor(np.asarray(gt)), c, **kw)
    return a, b.numpy()


def test_ignore_index_must_not_be_a_class_id_boundaries(counting):
    # C = 5: ignore_index in [0, 5) is a class id and refused at both ends (0 and 4); 5 (== C) and
    # -1 are legal ignore values for int64 labels.
    pred = np.array([[0, 1, 2], [3, 4, 0]], np.int64)
    for bad in (0, 4):
        for fn in (confusion_matrix, confusion_matrix_torch):
            arg = pred if fn is confusion_matrix else torch.from_numpy(pred)
            with pytest.raises(ValueError, match=f"ignore_index {bad} is a class id"):
                fn(arg, arg, 5, ignore_index=bad)
        with pytest.raises(ValueError, match="is a class id"):
            gzs3_zs3_confusion(
                torch.zeros(1, 5, 2, 3), torch.from_numpy(pred)[None], [0, 1], [2, 3, 4], ignore_index=bad
            )
    # ignore 5 (== C): gt [[0, 5, 2], [3, 5, 1]] -> the two 5s are ignored; pairs (0,0) (2,2) (3,3) (1,0)
    gt = np.array([[0, 5, 2], [3, 5, 1]], np.int64)
    expected = np.zeros((5, 5), np.int64)
    for g, p in ((0, 0), (2, 2), (3, 3), (1, 0)):
        expected[g, p] += 1
    for cm in _both(pred, gt, 5, ignore_index=5):
        np.testing.assert_array_equal(cm, expected)
    # ignore -1 the same way
    for cm in _both(pred, np.where(gt == 5, -1, gt), 5, ignore_index=-1):
        np.testing.assert_array_equal(cm, expected)
    # and with ignore 5, a 255 is an invalid label (not silently ignored)
    with pytest.raises(ValueError, match="ground-truth value 255"):
        confusion_matrix(pred, np.where(gt == 5, 255, gt), 5, ignore_index=5)


def test_one_class_is_legal_and_zero_classes_are_not(counting):
    # C = 1: every valid pixel is (0, 0); gt [[0, 255, 0]] -> cm [[2]]
    gt = np.array([[0, 255, 0]], np.uint8)
    pred = np.zeros((1, 3), np.int64)
    for cm in _both(pred, gt, 1):
        assert cm.tolist() == [[2]]
    for fn, a, b in (
        (confusion_matrix, pred, gt),
        (confusion_matrix_torch, torch.from_numpy(pred), torch.from_numpy(gt)),
    ):
        with pytest.raises(ValueError, match="num_classes must be >= 1"):
            fn(a, b, 0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.int32])
def test_a_label_equal_to_num_classes_is_an_error_not_ignored(counting, dtype):
    # C = 5, label 5 (just above the last class id 4): must raise in every row scheme, and the
    # message names the first bad value in reading order. gt row-major: 0, 4, 255, 5, 6, ...:
    # 0 and 4 are classes (the lowest and highest), 255 the ignore value, 5 the first bad one.
    gt = np.array([[0, 4, 255], [5, 6, 1]], dtype)
    pred = np.zeros((2, 3), np.int64)
    for fn, a, b in (
        (confusion_matrix, pred, gt),
        (confusion_matrix_torch, torch.from_numpy(pred), torch.from_numpy(gt)),
    ):
        with pytest.raises(
            ValueError, match=r"ground-truth value 5 is outside \[0, 5\) and is not the ignore index 255"
        ):
            fn(a, b, 5)
    if dtype is not np.uint8:  # a negative first bad value, after a 0 (0 is valid)
        gt2 = np.array([[0, 255, -3], [-1, 7, 1]], dtype)
        with pytest.raises(ValueError, match="ground-truth value -3 is"):
            confusion_matrix(pred, gt2, 5)
        with pytest.raises(ValueError, match="ground-truth value -3 is"):
            confusion_matrix_torch(torch.from_numpy(pred), torch.from_numpy(gt2), 5)
    # labels 0 and 4 at the edges are counted: pairs (0, p) and (4, p)
    ok = np.array([[0, 4, 255], [4, 0, 0]], dtype)
    pred_ok = np.array([[4, 0, 3], [4, 1, 0]], np.int64)
    for cm in _both(pred_ok, ok, 5):
        np.testing.assert_array_equal(cm, _np_reference(pred_ok, ok, 5, 255))
        assert cm[0, 4] == 1 and cm[4, 0] == 1 and cm[4, 4] == 1 and cm[0, 1] == 1 and cm[0, 0] == 1


def test_a_prediction_just_outside_the_classes_at_a_valid_pixel_is_an_error(counting):
    # C = 5: prediction 5 (== C) or -1 at a valid pixel raises naming the first bad value; the
    # same values at ignored pixels are not looked at (and a 0 or 4 at a valid pixel is fine).
    gt = np.array([[0, 1, 255], [2, 255, 4]], np.uint8)
    for bad_vals, first in (((5, 9), 5), ((-1, 7), -1), ((6, 5), 6)):
        pred = np.array([[0, bad_vals[0], 0], [bad_vals[1], 3, 4]], np.int64)
        for fn, a, b in (
            (confusion_matrix, pred, gt),
            (confusion_matrix_torch, torch.from_numpy(pred), torch.from_numpy(gt)),
        ):
            with pytest.raises(ValueError, match=rf"prediction value {first} is outside \[0, 5\) at a valid pixel"):
                fn(a, b, 5)
    # out-of-range predictions only where gt is 255; 0 and 4 at valid pixels
    pred = np.array([[0, 4, 5], [4, -1, 0]], np.int64)
    for g in (gt, gt.astype(np.int64)):
        for cm in _both(pred, g, 5):
            # pairs (0,0) (1,4) (2,4) (4,0)
            np.testing.assert_array_equal(cm, _np_reference(np.where(g == 255, 0, pred), g, 5, 255))
            assert cm.sum() == 4 and cm[1, 4] == 1 and cm[2, 4] == 1 and cm[4, 0] == 1 and cm[0, 0] == 1


def test_uint8_labels_with_an_ignore_index_outside_the_byte_range(counting):
    # uint8 labels, ignore_index 256 (or -1): no byte value is ignored, so a 255 is an invalid
    # label, and a map without 255 is counted in full.
    gt = np.array([[0, 2], [1, 2]], np.uint8)
    pred = np.array([[2, 2], [1, 0]], np.int64)
    for ignore in (256, -1):
        for cm in _both(pred, gt, 3, ignore_index=ignore):
            np.testing.assert_array_equal(cm, [[0, 0, 1], [0, 1, 0], [1, 0, 1]])
        with pytest.raises(ValueError, match="ground-truth value 255"):
            confusion_matrix(pred, np.array([[0, 255], [1, 2]], np.uint8), 3, ignore_index=ignore)
        with pytest.raises(ValueError, match="ground-truth value 255"):
            confusion_matrix_torch(
                torch.from_numpy(pred), torch.tensor([[0, 255], [1, 2]], dtype=torch.uint8), 3, ignore_index=ignore
            )
    # uint8 labels, ignore 200 (not 255): 200 is dropped, 255 is invalid
    gt2 = np.array([[0, 200], [1, 2]], np.uint8)
    for cm in _both(pred, gt2, 3, ignore_index=200):
        np.testing.assert_array_equal(cm, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


def test_255_classes_with_ignore_255_in_uint8(counting):
    # C = 255 (ids 0..254) and ignore 255: the uint8 ignore row is row C itself.
    gt = np.array([[254, 255, 0], [3, 255, 254]], np.uint8)
    pred = np.array([[254, 7, 1], [3, 254, 0]], np.int64)
    for g in (gt, gt.astype(np.int64)):
        for cm in _both(pred, g, 255):
            np.testing.assert_array_equal(cm, _np_reference(pred, g, 255, 255))
            assert cm.sum() == 4


def test_input_checks(counting):
    p = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix_torch(p, torch.zeros(3, 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="integer tensors"):
        confusion_matrix_torch(p.float(), p, 5)
    with pytest.raises(ValueError, match="integer tensors"):
        confusion_matrix_torch(p, p.float(), 5)
    with pytest.raises(ValueError, match="integer arrays"):
        confusion_matrix(p.numpy().astype(float), p.numpy(), 5)
    with pytest.raises(ValueError, match="integer arrays"):
        confusion_matrix(p.numpy(), p.numpy().astype(float), 5)
    s = torch.zeros(1, 4, 2, 3)
    lab = torch.zeros(1, 2, 3, dtype=torch.uint8)
    for bad_s, bad_l in (
        (s[0], lab),  # scores 3-D
        (s, lab[0]),  # labels 2-D
        (s.repeat(2, 1, 1, 1), lab),  # batch differs
        (s, torch.zeros(1, 3, 3, dtype=torch.uint8)),  # height differs
        (s, torch.zeros(1, 2, 4, dtype=torch.uint8)),  # width differs
    ):
        with pytest.raises(ValueError, match="scores must be"):
            gzs3_zs3_confusion(bad_s, bad_l, [0, 1], [2, 3])
    with pytest.raises(ValueError, match="scores must be"):
        calibrated_argmax(s[0], [0], 0.5)
    for seen, unseen, msg in (
        ([0, 4], [2], r"seen ids \[4\] are outside"),
        ([-1], [2], r"seen ids \[-1\] are outside"),
        ([0], [1, 1], "contain duplicates"),
        ([0, 1], [1, 2], r"class ids \[1\] are both"),
    ):
        with pytest.raises(ValueError, match=msg):
            gzs3_zs3_confusion(s, lab, seen, unseen)
    # ids as a tensor or an array are taken (and id 3 = C - 1 is legal)
    gz, zs = gzs3_zs3_confusion(s, lab, torch.tensor([0, 1]), np.array([2, 3]))
    assert gz[0, 0] == 6 and zs.shape == (2, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ldtype", [torch.uint8, torch.int64])
def test_gzs3_zs3_against_a_loop_reference_with_calibration(counting, seed, ldtype):
    # Random scores over C = 6 classes on a non-square 5x7 batch of 2, unseen {1, 4} (not a prefix
    # or suffix, in a non-sorted order [4, 1]), ignore 255 and gamma 0.2 / logits or probabilities.
    # Reference: per pixel, numpy softmax, subtract gamma on seen, argmax; ZS3 argmax over [4, 1].
    rng = np.random.default_rng(seed)
    c, unseen = 6, [4, 1]
    seen = [0, 2, 3, 5]
    scores = rng.standard_normal((2, c, 5, 7)).astype(np.float32) * 2
    gt = rng.integers(0, c, (2, 5, 7))
    gt[rng.random(gt.shape) < 0.25] = 255
    lab = torch.from_numpy(gt).to(ldtype)
    for probabilities in (False, True):
        s = 1 / (1 + np.exp(-scores)) if probabilities else scores
        p = s if probabilities else np.exp(s) / np.exp(s).sum(1, keepdims=True)
        off = np.array([0.2 if k in seen else 0.0 for k in range(c)])[None, :, None, None]
        pred = (p - off).argmax(1)
        pos = {k: i for i, k in enumerate(unseen)}
        zref = np.zeros((2, 2), np.int64)
        pu = s[:, unseen].argmax(1)
        for b, y, x in np.ndindex(*gt.shape):
            if gt[b, y, x] in pos:
                zref[pos[gt[b, y, x]], pu[b, y, x]] += 1
        gz, zs = gzs3_zs3_confusion(
            torch.from_numpy(s.astype(np.float32)), lab, seen, unseen, gamma=0.2, probabilities=probabilities
        )
        np.testing.assert_array_equal(gz.numpy(), _np_reference(pred, gt, c, 255))
        np.testing.assert_array_equal(zs.numpy(), zref)
        assert gz.dtype == zs.dtype == torch.int64
    # a non-default ignore value for int64 labels (ignore 7 = C + 1): same counts
    if ldtype == torch.int64:
        gt7 = np.where(gt == 255, 7, gt)
        gz, zs = gzs3_zs3_confusion(torch.from_numpy(scores), torch.from_numpy(gt7), seen, unseen, ignore_index=7)
        np.testing.assert_array_equal(gz.numpy(), _np_reference(scores.argmax(1), gt7, c, 7))
        gz255, zs255 = gzs3_zs3_confusion(torch.from_numpy(scores), lab, seen, unseen)
        np.testing.assert_array_equal(zs.numpy(), zs255.numpy())


def test_calibration_margin_just_above_and_below_gamma():
    # two classes, seen 0, unseen 1, probabilities (0.70, 0.45): the margin is 0.25.
    # gamma 0.24 -> 0.46 > 0.45: seen; gamma 0.26 -> 0.44 < 0.45: unseen (probabilities path).
    s = torch.tensor([0.70, 0.45]).view(1, 2, 1, 1)
    assert calibrated_argmax(s, [0], 0.24, probabilities=True).item() == 0
    assert calibrated_argmax(s, [0], 0.26, probabilities=True).item() == 1
    # the seen set given as unseen class 1 instead: gamma lowers class 1, class 0 wins further
    assert calibrated_argmax(s, [1], 0.26, probabilities=True).item() == 0
    # empty seen set with gamma: plain argmax
    assert calibrated_argmax(s, [], 0.9, probabilities=True).item() == 0
    # logits (ln 3, 0): softmax (0.75, 0.25), margin 0.5: gamma 0.49 seen, 0.51 unseen
    lg = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    assert calibrated_argmax(lg, [0], 0.49).item() == 0
    assert calibrated_argmax(lg, [0], 0.51).item() == 1
    # output is int64 [B, H, W] on a non-square map
    out = calibrated_argmax(torch.randn(2, 3, 4, 5), [0], 0.1)
    assert out.shape == (2, 4, 5) and out.dtype == torch.int64


def test_chunked_counting_matches_a_reference_over_chunk_edges(counting, monkeypatch):
    # CHUNK_PIXELS 7: the step is max(7, 2 * bins): int64 labels, C = 3 -> 5 rows x 3 = 15 bins -> 30 px
    # a chunk (67 chunks of 2001 px, a partial last one); uint8 labels -> 256 x 3 bins -> 1536 px (2 chunks)
    import zeroseg.confusion

    monkeypatch.setattr(zeroseg.confusion, "CHUNK_PIXELS", 7)
    rng = np.random.default_rng(5)
    gt = rng.integers(0, 3, (3, 23, 29))
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, 3, gt.shape)
    for g in (gt.astype(np.uint8), gt):
        for cm in _both(pred, g, 3):
            np.testing.assert_array_equal(cm, _np_reference(pred, g, 3, 255))
    gz, zs = gzs3_zs3_confusion(
        torch.from_numpy(rng.standard_normal((3, 3, 23, 29))), torch.from_numpy(gt), [0], [1, 2]
    )
    assert int(gz.sum()) == int((gt != 255).sum()) and int(zs.sum()) == int(np.isin(gt, [1, 2]).sum())


# ------------------------------------------------------------------------------------------
# zeroseg.metrics on an asymmetric matrix (a transposed matrix gives other numbers) with a class
# in neither split:
#   cm = [[5, 1, 0, 2],     rows (gt)  8, 4, 6, 0     diag 5, 3, 4, 0
#         [0, 3, 1, 0],     cols (pred) 7, 4, 5, 2
#         [2, 0, 4, 0],
#         [0, 0, 0, 0]]
#   IoU = 5/10, 3/5, 4/7, 0/2 -> 50, 60, 400/7, 0        acc = 5/8, 3/4, 4/6 -> 62.5, 75, 200/3, NaN
#   pAcc = 12/18; mIoU = (110 + 400/7) / 4; mAcc = (62.5 + 75 + 200/3) / 3
#   seen {0}: S = 50; unseen {2, 3}: U = (400/7 + 0) / 2 = 200/7; class 1 in neither split
#   hIoU = 2 * 50 * 200/7 / (50 + 200/7) = 20000 / 550
# (transposed, acc would be 5/7, 3/4, 4/5.)
# ------------------------------------------------------------------------------------------
CM4 = np.array([[5, 1, 0, 2], [0, 3, 1, 0], [2, 0, 4, 0], [0, 0, 0, 0]])


def test_metrics_of_an_asymmetric_matrix_by_hand():
    for cm in (CM4, torch.from_numpy(CM4), CM4.astype(np.int32)):
        m = segmentation_metrics(cm, [0], [2, 3])
        np.testing.assert_allclose(m.iou, [50, 60, 400 / 7, 0])
        np.testing.assert_allclose(m.acc[:3], [62.5, 75, 200 / 3])
        assert math.isnan(m.acc[3])
        assert m.pAcc == pytest.approx(200 / 3)
        assert m.mIoU == pytest.approx((110 + 400 / 7) / 4)
        assert m.mAcc == pytest.approx((62.5 + 75 + 200 / 3) / 3)
        assert m.mIoU_seen == pytest.approx(50.0)
        assert m.mIoU_unseen == pytest.approx(200 / 7)
        assert m.hIoU == pytest.approx(20000 / 550)
        assert m.gt_pixels.tolist() == [8, 4, 6, 0] and m.pred_pixels.tolist() == [7, 4, 5, 2]
        assert m.gt_pixels.dtype == np.int64 and m.iou.dtype == np.float64
        assert m.seen_ids == [0] and m.unseen_ids == [2, 3]
        assert m.summary() == {
            "pAcc": m.pAcc,
            "mAcc": m.mAcc,
            "mIoU": m.mIoU,
            "mIoU_seen": m.mIoU_seen,
            "mIoU_unseen": m.mIoU_unseen,
            "hIoU": m.hIoU,
        }
    rows = m.per_class()
    assert [r["name"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["split"] for r in rows] == ["seen", "-", "unseen", "unseen"]
    assert rows[1] == {"id": 1, "name": "1", "split": "-", "iou": 60.0, "acc": 75.0, "gt_pixels": 4, "pred_pixels": 4}
    assert rows[3]["acc"] is None and rows[3]["iou"] == 0.0
    table = per_class_table(m, ["a|b", "x", "y", "z"])
    assert table.endswith("\n")
    lines = table.strip().splitlines()
    assert lines[2] == "| 0 | a/b | seen | 50.00 | 62.50 | 8 | 7 |"
    assert lines[3] == "| 1 | x | - | 60.00 | 75.00 | 4 | 4 |"
    assert lines[4] == "| 2 | y | unseen | 57.14 | 66.67 | 6 | 5 |"
    with pytest.raises(ValueError, match="3 class names for 4 classes"):
        per_class_table(m, ["a", "b", "c"])
    # the free functions on the transposed matrix: acc becomes TP / column sum, IoU is unchanged
    np.testing.assert_allclose(per_class_accuracy(CM4.T)[:3], [500 / 7, 75, 80])
    np.testing.assert_allclose(per_class_iou(CM4.T), [50, 60, 400 / 7, 0])
    # no seen class: mIoU(S) NaN, hIoU NaN; no unseen: the same for U
    m = segmentation_metrics(CM4, [], [2, 3])
    assert math.isnan(m.mIoU_seen) and math.isnan(m.hIoU) and m.mIoU_unseen == pytest.approx(200 / 7)
    m = segmentation_metrics(CM4, [0, 1], [])
    assert m.mIoU_seen == pytest.approx(55.0) and math.isnan(m.mIoU_unseen) and math.isnan(m.hIoU)


def test_metric_edge_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings
        z = np.zeros((3, 3), np.int64)
        assert math.isnan(pixel_accuracy(z))
        assert np.isnan(per_class_iou(z)).all() and np.isnan(per_class_accuracy(z)).all()
        m = segmentation_metrics(z, [0], [1, 2])
        assert math.isnan(m.mIoU) and math.isnan(m.mAcc) and math.isnan(m.hIoU)
        # one pixel, correct: 100 everywhere it is defined
        one = np.zeros((2, 2), np.int64)
        one[1, 1] = 1
        assert pixel_accuracy(one) == 100.0 and per_class_iou(one)[1] == 100.0 and np.isnan(per_class_iou(one)[0])
    # nanmean skips inf as well as NaN
    assert nanmean(np.array([np.inf, 1.0, np.nan, 2.0])) == 1.5
    assert nanmean([3, 5]) == 4.0
    for bad in (np.zeros(3), np.zeros((2, 3)), np.zeros((2, 2, 2))):
        for fn in (per_class_iou, per_class_accuracy, pixel_accuracy, zs3_metrics):
            with pytest.raises(ValueError, match="square"):
                fn(bad)
    assert harmonic_iou(-10.0, 10.0) == 0.0  # S + U = 0
    assert harmonic_iou(20.0, float("nan")) != harmonic_iou(20.0, float("nan"))  # NaN
    # ZS3 metrics of an asymmetric [2, 2]: [[3, 1], [2, 0]] -> IoU 3/6, 0/3 = 50, 0; acc 75, 0;
    # pAcc 3/6 = 50
    z = zs3_metrics(torch.tensor([[3, 1], [2, 0]]))
    assert z == {"mIoU": 25.0, "pAcc": 50.0, "mAcc": 37.5, "iou": [50.0, 0.0]}


def test_json_safe():
    from zeroseg.metrics import json_safe

    x = {
        "a": [np.float32(1.5), float("nan"), np.float64(np.inf), (np.int64(3), -np.inf)],
        "b": {"c": np.int32(-2), "d": "s", "e": None, "f": True},
        "g": 2,
    }
    out = json_safe(x)
    assert out == {"a": [1.5, None, None, [3, None]], "b": {"c": -2, "d": "s", "e": None, "f": True}, "g": 2}
    assert type(out["a"][3][0]) is int and type(out["b"]["c"]) is int and type(out["a"][0]) is float
    assert isinstance(out["a"][3], list)


def test_empty_maps_and_out_of_range_predictions_only_at_ignored_pixels(counting):
    # no pixel at all: a zero matrix (no min/max of an empty array)
    for g in (np.zeros((0, 4), np.uint8), np.zeros((2, 0), np.int64)):
        p = np.zeros(g.shape, np.int64)
        for cm in _both(p, g, 3):
            assert cm.shape == (3, 3) and cm.sum() == 0
    gz, zs = gzs3_zs3_confusion(torch.zeros(0, 3, 2, 2), torch.zeros(0, 2, 2, dtype=torch.uint8), [0], [1, 2])
    assert gz.sum() == 0 and zs.shape == (2, 2) and zs.sum() == 0
    # every pixel ignored and every prediction out of range: nothing valid to check, zeros
    g = np.full((2, 3), 255, np.uint8)
    p = np.array([[9, -1, 3], [7, 100, 5]], np.int64)
    for gg in (g, g.astype(np.int64)):
        for cm in _both(p, gg, 3):
            assert cm.sum() == 0
    # one element (size 1), in range and out of range
    for cm in _both(np.array([2]), np.array([1], np.uint8), 3):
        assert cm.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="prediction value 3"):
        confusion_matrix(np.array([3]), np.array([1], np.uint8), 3)


def test_one_class_with_an_out_of_range_prediction_at_an_ignored_pixel(counting):
    # C = 1: the out-of-range prediction at the ignored pixel must not move that pixel into a
    # counted (or an invalid) row: gt [[0, 255, 0]], pred [[0, 5, 0]] -> [[2]]
    p = np.array([[0, 5, 0]], np.int64)
    for g in (np.array([[0, 255, 0]], np.uint8), np.array([[0, 255, 0]], np.int64)):
        for cm in _both(p, g, 1):
            assert cm.tolist() == [[2]]


def test_gamma_defaults_to_zero_and_zero_is_the_plain_argmax_of_the_scores():
    # logits (2.0, 1.5), seen {0}: the default gamma is 0 -> class 0 (gamma 1 would make every
    # seen probability negative -> class 1)
    s = torch.tensor([2.0, 1.5]).view(1, 2, 1, 1)
    assert calibrated_argmax(s, [0]).item() == 0 and calibrated_argmax(s, [0], 1.0).item() == 1
    gz, _ = gzs3_zs3_confusion(s, torch.zeros(1, 1, 1, dtype=torch.uint8), [0], [1])
    assert gz.tolist() == [[1, 0], [0, 0]]
    # gamma 0 is argmax_c scores_c on the scores as given: float64 probabilities 0.5 and
    # 0.5 + 1e-12 (equal in float32) -> class 1, with or without a seen set
    p = torch.tensor([0.5, 0.5 + 1e-12], dtype=torch.float64).view(1, 2, 1, 1)
    assert calibrated_argmax(p, [0], 0.0, probabilities=True).item() == 1
    assert calibrated_argmax(p, [], 0.0, probabilities=True).item() == 1


def test_no_unseen_class_gives_an_empty_int64_zs3_matrix(counting):
    gz, zs = gzs3_zs3_confusion(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.uint8), [0, 1, 2], [])
    assert zs.shape == (0, 0) and zs.dtype == torch.int64 and zs.device == gz.device
    assert gz.dtype == torch.int64 and gz[0, 0] == 4


def test_one_class_uint8_labels_with_an_ignore_index_outside_the_byte_range(counting):
    # C = 1, ignore 256: no byte is ignored, so label 1 (the row right after the only class) is
    # an invalid label and must raise; a map of zeros is counted in full
    for ignore in (256, -1):
        with pytest.raises(ValueError, match="ground-truth value 1 is outside"):
            confusion_matrix(np.zeros((1, 2), np.int64), np.array([[0, 1]], np.uint8), 1, ignore_index=ignore)
        for cm in _both(np.zeros((1, 2), np.int64), np.zeros((1, 2), np.uint8), 1, ignore_index=ignore):
            assert cm.tolist() == [[2]]


# ------------------------------------------------ survivors of `make mutants` (docs/testing.md)
def test_zs3_metrics_of_no_unseen_class_has_every_key_and_nan():
    from zeroseg.metrics import zs3_metrics

    out = zs3_metrics(np.zeros((0, 0), np.int64))
    assert set(out) == {"mIoU", "pAcc", "mAcc", "iou"} and out["iou"] == []
    assert all(math.isnan(out[k]) for k in ("mIoU", "pAcc", "mAcc"))


def test_harmonic_iou_is_nan_when_either_side_is_nan():
    from zeroseg.metrics import harmonic_iou

    nan = float("nan")
    assert math.isnan(harmonic_iou(nan, 30.0)) and math.isnan(harmonic_iou(30.0, nan))
    assert harmonic_iou(20.0, 30.0) == pytest.approx(2 * 20 * 30 / 50)  # 24, by hand


def test_a_class_with_one_ground_truth_pixel_has_its_accuracy():
    from zeroseg.metrics import per_class_accuracy

    # class 0: 1 pixel, predicted right (100 %); class 1: 3 pixels, 2 right (66.67 %); class 2: none
    cm = np.array([[1, 0, 0], [1, 2, 0], [0, 0, 0]])
    acc = per_class_accuracy(cm)
    assert acc[0] == pytest.approx(100.0) and acc[1] == pytest.approx(200 / 3) and math.isnan(acc[2])


def test_per_class_table_is_markdown_with_right_aligned_numbers():
    from zeroseg.metrics import per_class_table, segmentation_metrics

    m = segmentation_metrics(np.array([[3, 1], [0, 2]]), seen_ids=[0], unseen_ids=[1])
    lines = per_class_table(m, ["a", "b|c"]).splitlines()
    assert lines[1] == "|---:|---|---|---:|---:|---:|---:|"
    # a: IoU 3 / (4 + 3 - 3) = 75, acc 3/4; b: IoU 2 / (2 + 3 - 2) = 66.67, acc 100
    assert lines[2] == "| 0 | a | seen | 75.00 | 75.00 | 4 | 3 |"
    assert lines[3] == "| 1 | b/c | unseen | 66.67 | 100.00 | 2 | 3 |"


def test_zs3_metrics_of_one_unseen_class_and_pixel_counts_are_integers():
    from zeroseg.metrics import segmentation_metrics, zs3_metrics

    out = zs3_metrics(np.array([[5]]))  # one unseen class, 5 pixels, all right
    assert out["mIoU"] == 100.0 and out["pAcc"] == 100.0 and out["mAcc"] == 100.0 and out["iou"] == [100.0]
    m = segmentation_metrics(np.array([[3, 1], [0, 2]]), seen_ids=[0], unseen_ids=[1])
    assert m.pred_pixels.dtype == np.int64 and m.pred_pixels.tolist() == [3, 3]
    assert m.gt_pixels.dtype == np.int64 and m.gt_pixels.tolist() == [4, 2]
