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
