"""The papers' test protocols (``zeroseg.protocols``, ``evaluate.protocol``) and the evaluate side
of the optional Segmenter attributes (``variants``, ``encodes_text``, ``activation`` + ``logits``,
``size_divisibility``).

* sliding windows: the window grid against hand-listed grids (mmseg / ZegCLIP's released test), the
  overlap average of a toy segmenter whose window scores are known, computed by hand;
* the activation after upsampling (ZegCLIP's released head) vs before it (the old evaluate path):
  values by hand where they differ, and a pixel whose prediction flips;
* the short-side protocol: sizes by hand (detectron2's rule), padding right/bottom to the
  divisibility and the crop back (a padded pixel never reaches the scores), one forward per padded
  size;
* the real (tiny, random-weight) ZegCLIP under ``slide`` against a brute-force loop written here;
* through the stage (Ray): a toy segmenter with ``variants`` and ``encodes_text``: every variant
  reported under its keys and files, ``encode_text`` of the prompt names used instead of the
  embeddings file (which holds wrong embeddings on purpose).

Toy segmenters are small ``Segmenter`` subclasses: they are the input of the code under test.
Expected values never come from ``zeroseg.protocols`` itself.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydantic
import pytest
import ray.cloudpickle
import torch
import torch.nn.functional as F
from PIL import Image

import stages.catalog  # noqa: F401 - registers zeroseg's errors as user errors (what the CLI does)
from pipeline.dag import Artifact, StageContext
from stages.evaluate import EvaluateConfig
from stages.jobs.evaluate import SegmenterPredictor
from zeroseg.config.protocol import EvalProtocol
from zeroseg.errors import ConfigError, DataError
from zeroseg.evaluation import GZS3Evaluator, VariantsGZS3Evaluator
from zeroseg.models import Segmenter
from zeroseg.protocols import forward_padded, short_side_size, slide_window_scores, window_grid

# the toy predictor and segmenters below run in Ray actors that cannot import this module
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------------------------------------
# the window grid (mmseg slide_inference; ZegCLIP test_cfg crop 512, stride 426)
# ---------------------------------------------------------------------------------------------
def test_window_grid_matches_hand_listed_grids():
    # 5 x 7, crop 4, stride 3: 2 rows, 2 columns; the last row/column moved back to end at the border
    assert window_grid(5, 7, 4, 3) == [(0, 4, 0, 4), (0, 4, 3, 7), (1, 5, 0, 4), (1, 5, 3, 7)]
    # a VOC image after the short-side resize (375 x 500 -> 512 x 683): two windows, the second at 683 - 512
    assert window_grid(512, 683, (512, 512), (426, 426)) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    # 900 x 1000: rows start 0, 426 -> 388 (900 - 512); columns 0, 426, 852 -> 488 (1000 - 512)
    assert window_grid(900, 1000, 512, 426) == [
        (0, 512, 0, 512),
        (0, 512, 426, 938),
        (0, 512, 488, 1000),
        (388, 900, 0, 512),
        (388, 900, 426, 938),
        (388, 900, 488, 1000),
    ]
    # smaller than the crop in one dimension: windows of the image's height, no padding
    assert window_grid(300, 700, 512, 426) == [(0, 300, 0, 512), (0, 300, 188, 700)]
    assert window_grid(512, 512, 512, 426) == [(0, 512, 0, 512)]
    assert window_grid(8, 6, (4, 6), (4, 2)) == [(0, 4, 0, 6), (4, 8, 0, 6)]
    with pytest.raises(ValueError, match="larger than the crop"):
        window_grid(10, 10, 4, 5)


class Recorder:
    """Calls ``f(x)`` and records the input shapes (the forwards a protocol makes)."""

    def __init__(self, f):
        self.f, self.shapes, self.inputs = f, [], []

    def __call__(self, x):
        self.shapes.append(tuple(x.shape))
        self.inputs.append(x.clone())
        return self.f(x)


def _origin_image():
    """[1, 3, 5, 7] zeros but channel 0 at the four window origins of crop 4 / stride 3:
    (0, 0) = 1, (0, 3) = 2, (1, 0) = 4, (1, 3) = 8."""
    x = torch.zeros(1, 3, 5, 7)
    for (y, xx), v in {(0, 0): 1.0, (0, 3): 2.0, (1, 0): 4.0, (1, 3): 8.0}.items():
        x[0, 0, y, xx] = v
    return x


# windows A (rows 0-3, cols 0-3) = 1, B (rows 0-3, cols 3-6) = 2, C (rows 1-4, cols 0-3) = 4, D (rows 1-4, cols 3-6) = 8;
# the windows covering each pixel region, by hand
COVER = {
    "row 0, cols 0-2": ((0, [0, 1, 2]), [1.0]),
    "row 0, col 3": ((0, [3]), [1.0, 2.0]),
    "row 0, cols 4-6": ((0, [4, 5, 6]), [2.0]),
    "rows 1-3, cols 0-2": (([1, 2, 3], [0, 1, 2]), [1.0, 4.0]),
    "rows 1-3, col 3": (([1, 2, 3], [3]), [1.0, 2.0, 4.0, 8.0]),
    "rows 1-3, cols 4-6": (([1, 2, 3], [4, 5, 6]), [2.0, 8.0]),
    "row 4, cols 0-2": ((4, [0, 1, 2]), [4.0]),
    "row 4, col 3": ((4, [3]), [4.0, 8.0]),
    "row 4, cols 4-6": ((4, [4, 5, 6]), [8.0]),
}


def _expected(per_window):
    """5 x 7 map: per region, ``per_window(values of the covering windows)``."""
    e = np.zeros((5, 7))
    for (rows, cols), vals in COVER.values():
        for r in rows if isinstance(rows, list) else [rows]:
            for c in cols:
                e[r, c] = per_window(vals)
    return e


@pytest.mark.parametrize("windows_per_forward", [1, 3, 4])
def test_slide_averages_window_scores_over_overlaps(windows_per_forward):
    """Each window's score is its origin pixel (a 1 x 1 output upsampled to the window, i.e. constant):
    the average over the covering windows, by hand (e.g. rows 1-3, col 3: (1 + 2 + 4 + 8) / 4)."""
    rec = Recorder(lambda x: x[:, :1, :1, :1])
    got = slide_window_scores(rec, _origin_image(), 4, 3, windows_per_forward=windows_per_forward)
    assert list(got) == [""] and got[""].shape == (1, 1, 5, 7)
    want = np.array(
        [
            [1, 1, 1, 1.5, 2, 2, 2],
            *[[2.5, 2.5, 2.5, 3.75, 5, 5, 5]] * 3,
            [4, 4, 4, 6, 8, 8, 8],
        ]
    )
    np.testing.assert_allclose(got[""][0, 0].numpy(), want)
    np.testing.assert_allclose(want, _expected(lambda v: sum(v) / len(v)))  # the table agrees with COVER
    assert all(s[1:] == (3, 4, 4) for s in rec.shapes)  # every window is a full 4 x 4 crop
    assert sum(s[0] for s in rec.shapes) == 4 and len(rec.shapes) == math.ceil(4 / windows_per_forward)


def test_slide_applies_the_activation_in_each_window_before_averaging():
    """ZegCLIP's released order: sigmoid per window, then the average of probabilities (e.g. rows
    1-3, col 3: (s(1) + s(2) + s(4) + s(8)) / 4 = 0.8984..., whereas the sigmoid of the averaged
    logits, the ``activation_at: label`` order, is s(3.75) = 0.9770...)."""
    fn = lambda x: x[:, :1, :1, :1]  # noqa: E731
    per_window = slide_window_scores(fn, _origin_image(), 4, 3, activation="sigmoid")[""][0, 0].numpy()
    np.testing.assert_allclose(per_window, _expected(lambda v: sum(sig(z) for z in v) / len(v)), rtol=1e-6)
    logits_avg = slide_window_scores(fn, _origin_image(), 4, 3)[""][0, 0]
    np.testing.assert_allclose(torch.sigmoid(logits_avg).numpy(), _expected(lambda v: sig(sum(v) / len(v))), rtol=1e-6)
    assert per_window[2, 3] == pytest.approx((sig(1) + sig(2) + sig(4) + sig(8)) / 4)
    assert per_window[2, 3] == pytest.approx(0.8984, abs=1e-4) and sig(3.75) == pytest.approx(0.9770, abs=1e-4)


# ---------------------------------------------------------------------------------------------
# activation after upsampling (logits) vs before (the old evaluate path)
# ---------------------------------------------------------------------------------------------
# logits [-4, 4] on a 1 x 2 grid, bilinearly upsampled (align_corners=False) to 1 x 4: the source
# x of output i is (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25 (clamped to [0, 1]) -> -4, -2, 2, 4
UP_LOGITS = [-4.0, -2.0, 2.0, 4.0]
SIG_AFTER = [sig(z) for z in UP_LOGITS]  # 0.0180, 0.1192, 0.8808, 0.9820
SIG_BEFORE = [sig(-4), 0.75 * sig(-4) + 0.25 * sig(4), 0.25 * sig(-4) + 0.75 * sig(4), sig(4)]  # .., 0.2590, ..


def test_logits_are_upsampled_before_the_activation():
    fn = lambda x: torch.tensor([[[[-4.0, 4.0]]]]).expand(len(x), 1, 1, 2)  # noqa: E731
    x = torch.zeros(1, 3, 1, 4)
    np.testing.assert_allclose(forward_padded(fn, x)[""][0][0, 0, 0].numpy(), UP_LOGITS, rtol=1e-6)
    np.testing.assert_allclose(
        forward_padded(fn, x, activation="sigmoid")[""][0][0, 0, 0].numpy(), SIG_AFTER, rtol=1e-6
    )
    before = F.interpolate(torch.sigmoid(fn(x)), size=(1, 4), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(before[0, 0, 0].numpy(), SIG_BEFORE, rtol=1e-6)
    assert SIG_AFTER[1] == pytest.approx(0.1192, abs=1e-4) and SIG_BEFORE[1] == pytest.approx(0.2590, abs=1e-4)


class _Sigmoid1x4(Segmenter):
    """Input 1 x 4; logits on a 1 x 2 grid: class 0 constant ln(1/4) (sigmoid 0.2), class 1 [-4, 4]."""

    scores_are_probabilities = True
    activation = "sigmoid"

    def __init__(self):
        super().__init__()
        self.input_size, self.mean, self.std = (1, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def logits(self, images, text):
        out = torch.empty(len(images), 2, 1, 2)
        out[:, 0] = math.log(0.25)
        out[:, 1, 0] = torch.tensor([-4.0, 4.0])
        return out

    def forward(self, images, text):
        return torch.sigmoid(self.logits(images, text))


class _OldZegCLIPOrder(_Sigmoid1x4):
    """The same model as evaluate used ZegCLIP before: sigmoid at the grid, no activation declared."""

    activation = "none"


def _write_pair(tmp_path, name, image, label):
    Image.fromarray(image).save(tmp_path / f"{name}.png")
    Image.fromarray(label, mode="L").save(tmp_path / f"{name}_label.png")
    return {"image_path": tmp_path / f"{name}.png", "label_path": tmp_path / f"{name}_label.png"}


def _batch(rows, name):
    return {
        "eval_set": np.array([name] * len(rows), dtype=object),
        "image_uri": np.array([str(r["image_path"]) for r in rows], dtype=object),
        "label_uri": np.array([str(r["label_path"]) for r in rows], dtype=object),
    }


def _predict(tmp_path, monkeypatch, seg, rows, n_classes, cfg=None, gamma=0.0, prompt_names=None, variant=None):
    """The stage's predictor in-process with ``seg`` as the loaded model and ``cfg`` (default
    ``EvaluateConfig()``); returns (outputs, counts)."""
    import zeroseg.models

    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": seg)
    np.save(tmp_path / "emb.npy", np.eye(n_classes, 8, dtype=np.float32))
    w = SegmenterPredictor(cfg or EvaluateConfig(), "unused", {"s": str(tmp_path / "emb.npy")}, "cpu", prompt_names)
    batch = w.load(_batch(rows, "s"))
    out = w(batch)
    ev = GZS3Evaluator(
        {"s": {"num_classes": n_classes, "seen": [0], "unseen": list(range(1, n_classes))}}, gamma, variant
    )
    ev.process(batch, out)
    return out, ev.finalize()["s"]


def test_evaluate_applies_a_declared_activation_after_upsampling(tmp_path, monkeypatch):
    """Label [0, 0, 1, 1]; at pixel 1 class 1 has sigmoid(-2) = 0.119 < 0.2 (class 0) after the
    upsampling, but 0.259 > 0.2 when the sigmoid comes first: the old order misclassifies it."""
    rows = [_write_pair(tmp_path, "a", np.zeros((1, 4, 3), np.uint8), np.array([[0, 0, 1, 1]], np.uint8))]
    out, res = _predict(tmp_path, monkeypatch, _Sigmoid1x4(), rows, 2)
    assert "activation" not in out and out["probabilities"] is True
    np.testing.assert_allclose(out["groups"][0]["scores"][0][0, 1, 0].numpy(), SIG_AFTER, rtol=1e-6)
    assert res["gzs3"].tolist() == [[2, 0], [0, 2]]
    _, old = _predict(tmp_path, monkeypatch, _OldZegCLIPOrder(), rows, 2)
    assert old["gzs3"].tolist() == [[1, 1], [0, 2]]
    # activation_at: label -> logits travel, the evaluator takes the sigmoid at the label size (here = input size)
    args = EvaluateConfig(activation_at="label")
    out, res = _predict(tmp_path, monkeypatch, _Sigmoid1x4(), rows, 2, cfg=args)
    assert out["activation"] == "sigmoid" and res["gzs3"].tolist() == [[2, 0], [0, 2]]
    # calibration comes after the activation: gamma 0.3 on seen class 0 (0.2 - 0.3 < 0.0180) flips all to class 1
    _, cal = _predict(tmp_path, monkeypatch, _Sigmoid1x4(), rows, 2, gamma=0.3)
    assert cal["gzs3"].tolist() == [[0, 2], [0, 2]]


def test_a_declared_activation_needs_probability_scores(tmp_path, monkeypatch):
    class Bad(_Sigmoid1x4):
        scores_are_probabilities = False

    rows = [_write_pair(tmp_path, "a", np.zeros((1, 4, 3), np.uint8), np.zeros((1, 4), np.uint8))]
    with pytest.raises(DataError, match=r"Bad\.activation is 'sigmoid' but scores_are_probabilities is False"):
        _predict(tmp_path, monkeypatch, Bad(), rows, 2)


# ---------------------------------------------------------------------------------------------
# short side: sizes, padding to the divisibility, the crop back
# ---------------------------------------------------------------------------------------------
def test_short_side_sizes_by_hand():
    assert short_side_size(375, 500, 512) == (512, 683)  # VOC: 500 * 512 / 375 = 682.67
    assert short_side_size(480, 640, 640) == (640, 853)  # COCO: 640 * 640 / 480 = 853.33
    assert short_side_size(640, 480, 640) == (853, 640)
    assert short_side_size(300, 300, 512) == (512, 512)
    assert short_side_size(100, 1000, 640, max_long_side=2560) == (256, 2560)  # 640 x 6400 scaled by 0.4
    assert short_side_size(100, 1000, 640, max_long_side=10000) == (640, 6400)
    assert short_side_size(700, 900, 512) == (512, 658)  # downscaling: 900 * 512 / 700 = 658.29


def test_padding_is_right_bottom_and_cropped_off():
    """Two images padded to 32 x 32 (divisibility 16) in one forward; an identity 'segmenter'
    (scores = input channel 0) returns each image's own pixels, never a padded zero."""
    rec = Recorder(lambda x: x[:, :1] * 1.0)
    a, b = torch.full((3, 20, 30), 2.0), torch.full((3, 18, 31), 3.0)
    out = forward_padded(rec, [a, b], divisor=16)[""]
    assert rec.shapes == [(2, 3, 32, 32)]
    batch = rec.inputs[0]
    assert (batch[0, :, :20, :30] == 2).all() and (batch[0, :, 20:] == 0).all() and (batch[0, :, :, 30:] == 0).all()
    assert (batch[1, :, :18, :31] == 3).all() and (batch[1, :, 18:] == 0).all() and (batch[1, :, :, 31:] == 0).all()
    assert [tuple(s.shape) for s in out] == [(1, 1, 20, 30), (1, 1, 18, 31)]
    assert (out[0] == 2).all() and (out[1] == 3).all()
    # a coarser output (1/4) is upsampled to the padded size before the crop (detectron2's order)
    out = forward_padded(lambda x: F.avg_pool2d(x[:, :1], 4), [a], divisor=16)[""]
    assert tuple(out[0].shape) == (1, 1, 20, 30)
    with pytest.raises(ValueError, match=r"expected \[1, C, h, w\]"):
        forward_padded(lambda x: x[0], [a])


class _WhiteIsClassZero(Segmenter):
    """Per-pixel scores from the input (full resolution): class 0 = channel 0, class 1 = 1 - channel 0.
    Real pixels of a white image are class 0; padded pixels (0) would be class 1."""

    size_divisibility = 16

    def __init__(self):
        super().__init__()
        self.input_size, self.mean, self.std = (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.calls = []

    def forward(self, images, text):
        self.calls.append(tuple(images.shape))
        return torch.cat([images[:, :1], 1 - images[:, :1]], 1)


def test_short_side_protocol_through_the_predictor(tmp_path, monkeypatch):
    """Short side 32, divisibility 16: 30x40 -> 32x43, 24x30 -> 32x40 (both padded to 32x48: one
    forward), 10x20 -> 32x64 (its own forward); scores cropped to each resized size; white images
    with all-0 labels: every labelled pixel class 0 (no padded pixel reaches a score)."""
    rows = [
        _write_pair(tmp_path, f"i{k}", np.full((h, w, 3), 255, np.uint8), np.zeros((h, w), np.uint8))
        for k, (h, w) in enumerate([(30, 40), (24, 30), (10, 20)])
    ]
    seg = _WhiteIsClassZero()
    args = EvaluateConfig(protocol="short_side", short_side=32)
    out, res = _predict(tmp_path, monkeypatch, seg, rows, 2, cfg=args)
    assert sorted(seg.calls) == [(1, 3, 32, 64), (2, 3, 32, 48)]
    assert [tuple(s.shape) for s in out["groups"][0]["scores"]] == [(1, 2, 32, 43), (1, 2, 32, 40), (1, 2, 32, 64)]
    assert res["gzs3"].tolist() == [[30 * 40 + 24 * 30 + 10 * 20, 0], [0, 0]]
    assert res["images"] == 3


def test_slide_crop_defaults_to_the_input_size(tmp_path, monkeypatch):
    """Without evaluate.crop the window is the segmenter's input_size (16 x 16 here): a stride of
    20 then leaves pixels out, refused when the actor starts."""
    rows = [_write_pair(tmp_path, "a", np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16), np.uint8))]
    with pytest.raises(ConfigError, match=r"stride \[20, 20\] is larger than the crop \[16, 16\].*input_size"):
        _predict(
            tmp_path,
            monkeypatch,
            _WhiteIsClassZero(),
            rows,
            2,
            EvaluateConfig(protocol="slide", stride=20),
        )
    seg = _WhiteIsClassZero()
    out, res = _predict(tmp_path, monkeypatch, seg, rows, 2, EvaluateConfig(protocol="slide", stride=8))
    assert seg.calls == [(1, 3, 16, 16)] and res["gzs3"].tolist() == [[256, 0], [0, 0]]


# ---------------------------------------------------------------------------------------------
# the real ZegCLIP (tiny, random weights) under slide, against a brute-force loop written here
# ---------------------------------------------------------------------------------------------
def test_zegclip_logits_and_slide_against_brute_force(tmp_path, monkeypatch):
    import open_clip

    from zeroseg.models.zegclip import ZegCLIP

    open_clip.add_model_config(
        str(Path(__file__).resolve().parent.parent / "zeroseg/models/configs/zeroseg-tiny-vit.json")
    )
    torch.manual_seed(0)
    clip = open_clip.create_model("zeroseg-tiny-vit").eval()
    seg = ZegCLIP(clip, {"input_size": [32, 32], "decoder_width": 32, "decoder_heads": 4, "prompt_tokens": 2}).eval()
    assert seg.activation == "sigmoid" and seg.scores_are_probabilities and seg.size_divisibility == 16
    text = F.normalize(torch.randn(3, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(seg.logits(x, text), seg.mask_logits(x, text))
        torch.testing.assert_close(seg(x, text), torch.sigmoid(seg.logits(x, text)))

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    rows = [_write_pair(tmp_path, "z", image, np.zeros((40, 56), np.uint8))]
    np.save(tmp_path / "emb.npy", text.numpy())
    import zeroseg.models

    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": seg)
    w = SegmenterPredictor(
        EvaluateConfig(protocol="slide", crop=32, stride=24), "unused", {"s": str(tmp_path / "emb.npy")}, "cpu"
    )
    got = w(w.load(_batch(rows, "s")))["groups"][0]["scores"][0]

    # brute force: short side 40 -> 32 (the crop's), 56 -> 44.8 -> 45; windows x 0..32 and 13..45
    t = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    t = F.interpolate(t, size=(32, 45), mode="bilinear", align_corners=False, antialias=False)
    t = (t - torch.tensor(seg.mean).view(1, 3, 1, 1)) / torch.tensor(seg.std).view(1, 3, 1, 1)
    acc, cnt = torch.zeros(1, 3, 32, 45), torch.zeros(1, 1, 32, 45)
    with torch.no_grad():
        for x1 in (0, 13):
            lg = seg.mask_logits(t[..., x1 : x1 + 32], text)
            acc[..., x1 : x1 + 32] += torch.sigmoid(
                F.interpolate(lg, size=(32, 32), mode="bilinear", align_corners=False)
            )
            cnt[..., x1 : x1 + 32] += 1
    assert tuple(got.shape) == (1, 3, 32, 45)
    torch.testing.assert_close(got, acc / cnt, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------
def test_protocol_config():
    from pipeline.config import digest, hashed_view

    c = EvaluateConfig(protocol="slide", crop=512, stride=426)
    assert c.crop == (512, 512) and c.stride == (426, 426) and c.short_side is None
    assert c.eval_protocol() == EvalProtocol(
        name="slide", crop=(512, 512), stride=(426, 426), activation_at="input", windows_per_forward=4
    )
    assert EvaluateConfig().eval_protocol() == EvalProtocol()  # resize at the segmenter's input size
    assert EvaluateConfig(resolution=[8, 12], batch_size=2).eval_protocol() == EvalProtocol(
        resolution=(8, 12), windows_per_forward=2
    )
    base = digest(hashed_view(EvaluateConfig()))
    for kw in (
        {"protocol": "slide", "stride": 426},
        {"protocol": "short_side", "short_side": 640},
        {"activation_at": "label"},
    ):
        assert digest(hashed_view(EvaluateConfig(**kw))) != base, kw
    assert digest(hashed_view(EvaluateConfig(protocol="slide", stride=426, batch_size=16))) == digest(
        hashed_view(EvaluateConfig(protocol="slide", stride=426))
    )
    bad = [
        ({"protocol": "slide"}, r"needs evaluate.stride"),
        ({"protocol": "short_side"}, r"needs evaluate.short_side.*640"),
        ({"protocol": "slide", "crop": 400, "stride": 426}, r"stride \[426, 426\] is larger than evaluate.crop"),
        ({"crop": 512}, r"evaluate.crop applies to protocol slide, not 'resize'"),
        ({"protocol": "slide", "stride": 4, "resolution": [64, 64]}, r"evaluate.resolution applies to protocol resize"),
        ({"protocol": "short_side", "short_side": 512, "stride": 4}, r"evaluate.stride applies to protocol slide"),
        ({"protocol": "sliding"}, r"protocol"),
        ({"activation_at": "output"}, r"activation_at"),
    ]
    for kw, msg in bad:
        with pytest.raises(pydantic.ValidationError, match=msg):
            EvaluateConfig(**kw)


def test_zegclip_benchmark_configs_use_the_released_slide_test():
    from pipeline.config import load_config

    repo = Path(__file__).resolve().parent.parent
    for name in ("voc_zegclip.yaml", "coco_stuff_zegclip.yaml"):
        ev = EvaluateConfig(**load_config(repo / "configs" / name).sections["evaluate"])
        assert (ev.protocol, ev.crop, ev.stride, ev.short_side) == ("slide", (512, 512), (426, 426), 512), name


# ---------------------------------------------------------------------------------------------
# variants and encode_text, in-process and through the stage (Ray)
# ---------------------------------------------------------------------------------------------
NAMES = ["sky", "road", "cat"]
PROMPTS = ["the sky", "a road", "a cat"]  # what classes.json gives the text encoder


class _Twins(Segmenter):
    """Two variants: ``fused`` reads the class from the image (red = 20 * id) through the text
    rows it gets (score_c = text[c, id]: perfect with identity rows, wrong with others), ``seg``
    always predicts class 2. Embeds class names itself: ``encode_text`` maps each prompt name to
    its one-hot row (a KeyError for anything but the prompt names)."""

    encodes_text = True  # a class attribute (the stage reads it before any model is built)

    def __init__(self):
        super().__init__()
        self.input_size, self.mean, self.std = (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.variants = ("fused", "seg")  # per instance, as ZegFormer's (they depend on its config)

    def encode_text(self, prompt_names):
        return torch.eye(len(PROMPTS))[[PROMPTS.index(n) for n in prompt_names]]

    def forward(self, images, text):
        ids = torch.round(images[:, 0] * 255 / 20).long().clamp(0, text.shape[1] - 1)
        fused = text[:, ids].permute(1, 0, 2, 3)  # [B, C, H, W]: text[c, id(pixel)]
        seg = torch.zeros_like(fused)
        seg[:, 2] = 1.0
        return {"fused": fused, "seg": seg}


def test_variants_and_encode_text_in_process(tmp_path, monkeypatch):
    rows = [
        _write_pair(tmp_path, f"v{k}", np.full((8, 12, 3), (20 * k, 0, 0), np.uint8), np.full((8, 12), k, np.uint8))
        for k in range(3)
    ]
    seg = _Twins()
    out, res = _predict(tmp_path, monkeypatch, seg, rows, 3, prompt_names={"s": PROMPTS}, variant="fused")
    scores = out["groups"][0]["scores"]
    assert sorted(scores) == ["fused", "seg"] and out["variants"] == ["fused", "seg"]
    # the stage's evaluator: one GZS3Evaluator per reported variant, in the segmenter's order
    keyed = VariantsGZS3Evaluator({"s": {"num_classes": 3, "seen": [0], "unseen": [1, 2]}})
    keyed.process(SegmenterPredictor.__new__(SegmenterPredictor).load(_batch(rows, "s")), out)
    assert keyed.variants == ["fused", "seg"]
    assert keyed.finalize()["seg"]["s"]["gzs3"].tolist() == [[0, 0, 96], [0, 0, 96], [0, 0, 96]]
    assert res["gzs3"].tolist() == [[96, 0, 0], [0, 96, 0], [0, 0, 96]]  # "fused" (variants[0]): the default evaluator
    # the embeddings file (np.eye(3, 8): identity rows, 8 wide) was not read: text is encode_text's 3 x 3
    import zeroseg.models

    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": seg)
    w = SegmenterPredictor(EvaluateConfig(), "unused", {"s": str(tmp_path / "emb.npy")}, "cpu", {"s": PROMPTS})
    assert tuple(w.text["s"].shape) == (3, 3)
    ev = GZS3Evaluator({"s": {"num_classes": 3, "seen": [0], "unseen": [1, 2]}}, variant="seg")
    batch = w.load(_batch(rows, "s"))
    ev.process(batch, w(batch))
    assert ev.finalize()["s"]["gzs3"].tolist() == [[0, 0, 96], [0, 0, 96], [0, 0, 96]]
    with pytest.raises(DataError, match=r"no scores for variant 'img'.*\['fused', 'seg'\]"):
        GZS3Evaluator({"s": {"num_classes": 3, "seen": [0], "unseen": [1, 2]}}, variant="img").process(batch, w(batch))
    with pytest.raises(DataError, match=r"returned the variants \['fused', 'seg'\].*give it variant=<name>"):
        GZS3Evaluator({"s": {"num_classes": 3, "seen": [0], "unseen": [1, 2]}}).process(batch, w(batch))
    # an instance that encodes text, given no prompt names (the stage passes them when the class says
    # encodes_text): a clear error, not the embeddings file
    with pytest.raises(DataError, match=r"_Twins embeds class names itself.*declare encodes_text = True on the class"):
        SegmenterPredictor(EvaluateConfig(), "unused", {"s": str(tmp_path / "emb.npy")}, "cpu", None)
    # variants returned but none declared
    seg2 = _Twins()
    seg2.variants = ()
    monkeypatch.setattr(zeroseg.models, "load_segmenter", lambda d, device="cpu": seg2)
    w = SegmenterPredictor(EvaluateConfig(), "unused", {"s": str(tmp_path / "emb.npy")}, "cpu", {"s": PROMPTS})
    with pytest.raises(DataError, match=r"returned the variants \['fused', 'seg'\] but declares none"):
        w(w.load(_batch(rows, "s")))
    seg2.variants = ("fused", "seg/x")
    with pytest.raises(DataError, match=r"variants \['seg/x'\]: a variant name must be .* without '/'"):
        w(w.load(_batch(rows, "s")))


class _TwinsPredictor(SegmenterPredictor):
    """The stage's predictor with ``load_segmenter`` answering the toy model (in the actor's process)."""

    def __init__(self, *args, **kwargs):
        import zeroseg.models

        zeroseg.models.load_segmenter = lambda d, device="cpu": _Twins()
        super().__init__(*args, **kwargs)


SIZES = [(20, 30), (24, 28), (18, 40), (26, 26)]  # image k: class k % 3 everywhere, a few label pixels 255


def _stage_inputs(root: Path):
    from zeroseg.config.clip import TINY_MODEL, ClipSpec

    bs, et, tc, images = root / "bs", root / "et", root / "tc", root / "images"
    for d in (bs / "manifests", bs / "labels" / "val", et / "embeddings", tc, images):
        d.mkdir(parents=True)
    vocab = {
        "dataset": "toy",
        "names": NAMES,
        "prompt_names": PROMPTS,
        "seen": [0, 1],
        "unseen": [2],
        "ignore_index": 255,
    }
    train = {**vocab, "names": NAMES[:2], "prompt_names": PROMPTS[:2], "unseen": []}
    (bs / "classes.json").write_text(json.dumps({"train": train, "eval": {"val": vocab}}))
    recs, counts = [], np.zeros(3, np.int64)
    for k, (h, w) in enumerate(SIZES):
        c = k % 3
        lab = np.full((h, w), c, np.uint8)
        lab[0, :3] = 255
        counts[c] += (lab != 255).sum()
        Image.fromarray(np.full((h, w, 3), (20 * c, 0, 0), np.uint8)).save(images / f"{k}.png")
        Image.fromarray(lab, mode="L").save(bs / "labels" / "val" / f"{k}.png")
        recs.append(
            {
                "image_id": f"v{k}",
                "image": f"{k}.png",
                "label": f"labels/val/{k}.png",
                "height": h,
                "width": w,
                "classes": [c],
                "dataset": "toy",
            }
        )
    schema = pa.schema(
        [
            ("image_id", pa.string()),
            ("image", pa.string()),
            ("label", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("classes", pa.list_(pa.int32())),
            ("dataset", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(recs, schema=schema), bs / "manifests" / "val.parquet")
    # embed_text's file holds a permutation: a model using it would mistake every class
    np.save(et / "embeddings" / "val.npy", np.eye(3, 64, dtype=np.float32)[[1, 2, 0]])
    spec = ClipSpec(model=TINY_MODEL, random_init=True).model_dump(mode="json")
    doc = {
        "method": "toy",
        "class": "zeroseg.models.toy:Twins",
        "clip": spec,
        "model": {},
        "input": {"size": [16, 16], "mean": [0, 0, 0], "std": [1, 1, 1]},
    }
    (tc / "segmenter.json").write_text(json.dumps(doc))
    return bs, et, tc, {"image_roots": {"val": str(images)}}, counts


def _art(stage, path, runtime=None):
    return Artifact(stage, stage[0] * 64, Path(path), str(path), {"files": []}, runtime=runtime or {})


def test_stage_reports_every_variant_and_uses_encode_text(tmp_path, ray_local, monkeypatch):
    """One stage run (Ray) under the slide protocol: ``fused`` (variants[0]) is perfect (100) under
    the usual keys; ``seg`` (always class 2) under ``seg/val/...`` with hand values: IoU_2 = its
    pixels / all labelled pixels, pAcc the same share; files and metrics.json entries per variant."""
    import stages.jobs.evaluate
    import zeroseg.models
    from stages.evaluate import Evaluate

    bs, et, tc, runtime, counts = _stage_inputs(tmp_path)
    real_import = zeroseg.models.import_class
    monkeypatch.setattr(
        zeroseg.models,
        "import_class",
        lambda path, where="": _Twins if path == "zeroseg.models.toy:Twins" else real_import(path, where),
    )
    monkeypatch.setattr(stages.jobs.evaluate, "SegmenterPredictor", _TwinsPredictor)
    out = tmp_path / "out"
    out.mkdir()
    cfg = EvaluateConfig(protocol="slide", crop=16, stride=12, batch_size=2, warmup_batches=0)
    ctx = StageContext(
        "evaluate",
        "f" * 64,
        cfg,
        {
            "splits": _art("build_splits", bs, runtime),
            "text": _art("embed_text", et),
            "model": _art("train_classifier", tc),
        },
        out,
        tmp_path,
        str(tmp_path / "_train"),
        "evaluate-fff",
        log=lambda *_: None,
    )
    metrics = Evaluate().run(ctx)

    valid = counts.sum()
    for k in ("pAcc", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU"):
        assert metrics[f"val/{k}"] == 100.0, k  # "fused" with encode_text's rows (the file's would fail)
    share = 100 * counts[2] / valid
    assert metrics["seg/val/pAcc"] == pytest.approx(share)
    assert metrics["seg/val/mIoU_unseen"] == pytest.approx(share)  # IoU_2 = |gt 2| / |valid|
    assert metrics["seg/val/mIoU_seen"] == 0.0 and metrics["seg/val/hIoU"] == 0.0
    assert not any(k.startswith("fused/") for k in metrics)
    doc = json.loads((out / "metrics.json").read_text())
    assert list(doc) == ["val", "seg/val"]
    assert doc["val"]["variant"] == "fused" and doc["seg/val"]["variant"] == "seg"
    assert doc["val"]["text"] == "encode_text" and doc["val"]["protocol"] == "slide"
    assert np.array(doc["seg/val"]["gzs3"]["confusion_matrix"])[:, 2].tolist() == counts.tolist()
    assert (out / "per_class_val.md").exists() and (out / "per_class_iou_val.png").exists()
    assert (
        "[seg]" in (out / "seg" / "per_class_val.md").read_text() and (out / "seg" / "per_class_iou_val.png").exists()
    )
    fps = json.loads((out / "fps.json").read_text())
    p = fps["protocol"]["eval_protocol"]
    assert (p["protocol"], p["crop"], p["stride"], p["short_side"], p["text"]) == (
        "slide",
        [16, 16],
        [12, 12],
        16,
        "encode_text",
    )
    assert fps["overall"]["images_timed"] == len(SIZES) and fps["overall"]["seconds_timed"] > 0
    tables = Evaluate().summary(metrics)
    assert [t.title.split(" (")[0] for t in tables[:2]] == ["evaluation", "evaluation, variant seg"]
    assert [c.header for c in tables[1].columns] == ["metric", "val"]


# =============================================================================================
# zeroseg.protocols' geometry at its boundaries, by hand (glue helper, issue 19)
# =============================================================================================
def test_short_side_size_rounding_and_the_long_side_cap_by_hand():
    from zeroseg.protocols import short_side_size

    # 480 x 640 -> short side 512: scale 16/15, 640 * 16/15 = 682.67 -> 683 (int(x + 0.5))
    assert short_side_size(480, 640, 512) == (512, 683)
    assert short_side_size(640, 480, 512) == (683, 512)  # portrait: the width is the short side
    # 2 x 3 -> short side 3: 4.5 rounds up to 5 (Python's round() would give 4)
    assert short_side_size(2, 3, 3) == (3, 5)
    # the cap: 480 x 1000 -> 512 x 1066.7 > 1000 -> scaled back to 480 x 1000; exactly at the cap: kept
    assert short_side_size(480, 1000, 512, max_long_side=1000) == (480, 1000)
    assert short_side_size(500, 1000, 500, max_long_side=1000) == (500, 1000)
    assert short_side_size(500, 1000, 500, max_long_side=999) == (500, 999)  # 499.5 rounds up
    for bad in ((0, 5, 3, None), (5, 5, 0, None), (5, 5, 3, 0), (-1, 5, 3, None)):
        with pytest.raises(ValueError, match="sizes must be positive"):
            short_side_size(*bad)


def test_window_grid_by_hand():
    from zeroseg.protocols import window_grid

    # 10 x 7, crop 4, stride 3: rows (10 - 4 + 2) // 3 + 1 = 3 (y 0, 3, 6), cols (7 - 4 + 2) // 3 + 1
    # = 2 (x 0, 3): the last window ends at the border
    assert window_grid(10, 7, 4, 3) == [
        (0, 4, 0, 4),
        (0, 4, 3, 7),
        (3, 7, 0, 4),
        (3, 7, 3, 7),
        (6, 10, 0, 4),
        (6, 10, 3, 7),
    ]
    # a border crossing window is moved back: 8 wide, crop 4, stride 3 -> x 0, 3, then 6 -> 4..8
    assert [w[2:] for w in window_grid(4, 8, 4, 3)] == [(0, 4), (3, 7), (4, 8)]
    # smaller than the crop: one window of the image's size; non-square crop and stride ([h, w])
    assert window_grid(3, 2, 4, 4) == [(0, 3, 0, 2)]
    assert window_grid(4, 5, [4, 2], [4, 2]) == [(0, 4, 0, 2), (0, 4, 2, 4), (0, 4, 3, 5)]
    assert window_grid(4, 4, 4, 4) == [(0, 4, 0, 4)]  # exactly the crop: one window
    with pytest.raises(ValueError, match="larger than the crop"):
        window_grid(8, 8, [4, 4], [2, 5])
    with pytest.raises(ValueError, match="sizes must be positive"):
        window_grid(8, 8, 4, 0)


def test_padded_size_activate_and_pair_by_hand():
    from zeroseg.protocols import _pair, activate, padded_size

    assert padded_size(5, 8, 4) == (8, 8) and padded_size(8, 9, 4) == (8, 12)
    assert padded_size(5, 7, 1) == (5, 7) and padded_size(5, 7, 0) == (5, 7)  # divisor < 1 acts as 1
    assert _pair(3) == (3, 3) and _pair([2, 5]) == (2, 5) and _pair((7, 1)) == (7, 1)
    x = torch.tensor([[[[0.0]], [[math.log(3.0)]]], [[[2.0]], [[2.0]]]])  # [2, 2, 1, 1]
    assert activate(x, "none") is x
    assert activate(x, "sigmoid")[0, :, 0, 0].tolist() == pytest.approx([0.5, 0.75])
    # softmax over the classes (dim 1), per image: (1, 3) / 4 and (0.5, 0.5)
    assert activate(x, "softmax")[:, :, 0, 0].flatten().tolist() == pytest.approx([0.25, 0.75, 0.5, 0.5])
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        activate(x, "relu")
