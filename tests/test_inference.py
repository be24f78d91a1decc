"""``zeroseg.inference``: a segmenter applied to images under each test protocol, without Ray.

Tiny segmenters whose scores are known (a constant per class, the window's first pixel, the
normalised image itself) are the input; every expected value is computed here by hand, never by
``zeroseg.protocols``. One test checks that the module imports no Ray.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from zeroseg.config.protocol import EvalProtocol
from zeroseg.errors import ConfigError, DataError
from zeroseg.inference import encode_prompts, infer, prepare_image, resolve_protocol
from zeroseg.models import Segmenter

TEXT = torch.tensor([[1.0], [-1.0], [3.0]])  # three classes; class c scores the image times TEXT[c]


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


class Scaled(Segmenter):
    """Input 2 x 3, mean 0.5, std 0.25; ``forward`` returns channel 0 of the input times each class's
    text row (so a white image, normalised to (1 - 0.5) / 0.25 = 2, scores 2, -2, 6); records the
    input shapes."""

    def __init__(self, input_size=(2, 3)):
        super().__init__()
        self.input_size, self.mean, self.std = input_size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images, text):
        self.calls.append(tuple(images.shape))
        return images[:, :1] * text[:, 0].view(1, -1, 1, 1)


def white(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), 255, np.uint8)


def test_prepare_image_scales_resizes_and_normalises():
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    img = np.zeros((2, 2, 3), np.uint8)
    img[0, 0] = (255, 51, 0)  # 1.0, 0.2, 0.0
    x = prepare_image(img, (2, 2), mean, std)  # same size: no resampling
    assert x.shape == (1, 3, 2, 2) and x.dtype == torch.float32
    assert x[0, :, 0, 0].tolist() == pytest.approx([2.0, -1.2, -2.0])
    assert x[0, :, 1, 1].tolist() == pytest.approx([-2.0, -2.0, -2.0])
    # a constant stays constant (antialiased resampling: to float rounding)
    torch.testing.assert_close(prepare_image(white(5, 7), (3, 4), mean, std), torch.full((1, 3, 3, 4), 2.0))


def test_resize_one_forward_of_the_batch_at_the_input_size():
    seg = Scaled()
    out = infer(seg, [white(4, 6), white(8, 3)], TEXT)  # different sizes, both resized to 2 x 3
    assert seg.calls == [(2, 3, 2, 3)]
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 2, 3)  # the segmenter's grid, one tensor
    want = torch.tensor([2.0, -2.0, 6.0]).view(1, 3, 1, 1).expand(2, 3, 2, 3)
    torch.testing.assert_close(out, want)  # (to float rounding: antialiased resampling of a constant)
    seg = Scaled()
    assert infer(seg, [white(4, 6)], TEXT, EvalProtocol(resolution=(5, 4))).shape == (1, 3, 5, 4)
    assert seg.calls == [(1, 3, 5, 4)]  # resolution overrides input_size


class Sigmoid(Segmenter):
    """Declares a sigmoid: logits constant per class on a 1 x 1 grid (-1, 0, 2)."""

    scores_are_probabilities = True
    activation = "sigmoid"

    def __init__(self):
        super().__init__()
        self.input_size, self.mean, self.std = (2, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def logits(self, images, text):
        return torch.tensor([-1.0, 0.0, 2.0]).view(1, 3, 1, 1).expand(len(images), 3, 1, 1)

    def forward(self, images, text):
        return torch.sigmoid(self.logits(images, text))


def test_resize_activation_at_the_input_or_left_to_the_label():
    out = infer(Sigmoid(), [white(4, 6), white(1, 1)], TEXT)
    assert isinstance(out, list) and [tuple(s.shape) for s in out] == [(1, 3, 2, 3)] * 2  # at the input size
    for s in out:
        for c, z in enumerate([-1.0, 0.0, 2.0]):
            np.testing.assert_allclose(s[0, c].numpy(), np.full((2, 3), sig(z)), rtol=1e-6)
    raw = infer(Sigmoid(), [white(4, 6)], TEXT, EvalProtocol(activation_at="label"))
    assert isinstance(raw, torch.Tensor) and raw[0, :, 0, 0].tolist() == [-1.0, 0.0, 2.0]  # logits, the grid


class FirstPixel(Segmenter):
    """Input 4 x 4, mean 0, std 1: a 1 x 1 output, channel 0 of the input's top-left pixel."""

    def __init__(self):
        super().__init__()
        self.input_size, self.mean, self.std = (4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images, text):
        self.calls.append(tuple(images.shape))
        return images[:, :1, :1, :1]


@pytest.mark.parametrize("per_forward", [1, 2])
def test_slide_averages_the_windows(per_forward):
    """A 4 x 6 image whose red channel is 40 x column: crop 4 (the input size), stride 2 -> windows
    at columns 0-3 (first pixel 0) and 2-5 (first pixel 80/255); columns 2-3 hold their mean."""
    img = np.zeros((4, 6, 3), np.uint8)
    img[..., 0] = np.arange(6, dtype=np.uint8)[None, :] * 40
    seg = FirstPixel()
    p = EvalProtocol(name="slide", stride=2, windows_per_forward=per_forward)
    (out,) = infer(seg, [img], TEXT, p)
    assert out.shape == (1, 1, 4, 6)
    b = 80 / 255
    want = np.array([0, 0, b / 2, b / 2, b, b], np.float32)[None, :].repeat(4, 0)
    np.testing.assert_allclose(out[0, 0].numpy(), want, rtol=1e-6)
    assert seg.calls == ([(1, 3, 4, 4)] * 2 if per_forward == 1 else [(2, 3, 4, 4)])


def test_slide_resizes_the_short_side_and_fills_its_defaults():
    seg = FirstPixel()
    p = resolve_protocol(seg, EvalProtocol(name="slide", stride=3))
    assert (p.crop, p.stride, p.short_side) == ((4, 4), (3, 3), 4)  # crop: input_size; short side: the crop's
    assert resolve_protocol(seg, p) == p  # idempotent
    (out,) = infer(seg, [white(2, 5)], TEXT, p)  # short side 2 -> 4: 4 x 10; columns 0, 3, 6 (6 = 10 - 4)
    assert out.shape == (1, 1, 4, 10)
    torch.testing.assert_close(out, torch.ones(1, 1, 4, 10))
    assert seg.calls == [(3, 3, 4, 4)]  # windows_per_forward 4: the three windows in one forward
    with pytest.raises(ConfigError, match=r"stride \[5, 5\] is larger than the crop \[4, 4\].*input_size"):
        infer(seg, [white(4, 4)], TEXT, EvalProtocol(name="slide", stride=5))
    with pytest.raises(ConfigError, match=r"protocol slide needs a stride"):
        infer(seg, [white(4, 4)], TEXT, EvalProtocol(name="slide"))


class Identity(FirstPixel):
    """Returns channel 0 of its (padded) input at full resolution; pads to multiples of 4."""

    size_divisibility = 4

    def forward(self, images, text):
        self.calls.append(tuple(images.shape))
        return images[:, :1]


def test_short_side_pads_groups_by_padded_size_and_crops_back():
    """Short side 4: 2 x 4 -> 4 x 8 and 3 x 6 -> 4 x 8 (one forward at 4 x 8), 5 x 5 -> 4 x 4 (its
    own forward); white images: every returned pixel is 1 (no zero padding reaches a score)."""
    seg = Identity()
    out = infer(seg, [white(2, 4), white(5, 5), white(3, 6)], TEXT, EvalProtocol(name="short_side", short_side=4))
    assert [tuple(s.shape) for s in out] == [(1, 1, 4, 8), (1, 1, 4, 4), (1, 1, 4, 8)]  # in image order
    for s in out:
        torch.testing.assert_close(s, torch.ones_like(s))
    assert sorted(seg.calls) == [(1, 3, 4, 4), (2, 3, 4, 8)]
    # the long side capped: 2 x 8 -> 4 x 16 -> max 8: 2 x 8, padded to 4 x 8 and cropped back
    seg = Identity()
    (s,) = infer(seg, [white(2, 8)], TEXT, EvalProtocol(name="short_side", short_side=4, max_long_side=8))
    assert s.shape == (1, 1, 2, 8) and seg.calls == [(1, 3, 4, 8)]
    with pytest.raises(ConfigError, match=r"short_side: protocol short_side needs a short side"):
        infer(seg, [white(2, 8)], TEXT, EvalProtocol(name="short_side"))


class Twins(Segmenter):
    """Two variants: ``a`` scores 1 for class 0, ``b`` scores 1 for class 2 (a 1 x 1 grid)."""

    def __init__(self, variants=("a", "b")):
        super().__init__()
        self.input_size, self.mean, self.std = (2, 2), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.variants = variants

    def forward(self, images, text):
        a, b = torch.zeros(len(images), 3, 1, 1), torch.zeros(len(images), 3, 1, 1)
        a[:, 0], b[:, 2] = 1.0, 1.0
        return {"a": a, "b": b}


def test_variants_come_back_per_variant_and_are_checked():
    out = infer(Twins(), [white(3, 3)], TEXT)
    assert sorted(out) == ["a", "b"]
    assert out["a"][0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and out["b"][0, :, 0, 0].tolist() == [0.0, 0.0, 1.0]
    out = infer(Twins(), [white(3, 3), white(5, 2)], TEXT, EvalProtocol(name="short_side", short_side=2))
    assert [tuple(s.shape) for s in out["b"]] == [(1, 3, 2, 2), (1, 3, 5, 2)]
    with pytest.raises(DataError, match=r"returned the variants \['a', 'b'\] but declares none"):
        infer(Twins(()), [white(3, 3)], TEXT)
    with pytest.raises(DataError, match=r"declares the variants \['a', 'c'\] but returned \['a', 'b'\]"):
        infer(Twins(("a", "c")), [white(3, 3)], TEXT)
    with pytest.raises(DataError, match=r"variants \['a/x'\]: a variant name must be"):
        infer(Twins(("a/x", "b")), [white(3, 3)], TEXT)


def test_segmenter_contract_errors():
    class Relu(Sigmoid):
        activation = "relu"

    class NotProbabilities(Sigmoid):
        scores_are_probabilities = False

    with pytest.raises(DataError, match=r"Relu\.activation is 'relu'; expected one of none, sigmoid, softmax"):
        infer(Relu(), [white(2, 3)], TEXT)
    with pytest.raises(DataError, match=r"activation is 'sigmoid' but scores_are_probabilities is False"):
        infer(NotProbabilities(), [white(2, 3)], TEXT)

    class Encoder(Scaled):
        def encode_text(self, prompt_names):
            return torch.ones(len(prompt_names) + 1, 4)

    with pytest.raises(DataError, match=r"Encoder\.encode_text returned \(3, 4\) for the 2 prompt names of set 'x'"):
        encode_prompts(Encoder(), ["a", "b"], "set 'x'")


def test_importing_it_imports_no_ray():
    code = "import sys, zeroseg.inference; print('RAY', 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "RAY False" in out.stdout, out.stdout + out.stderr
