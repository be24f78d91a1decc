"""MaskCLIP baseline, the segmenter artifact (save/load_segmenter) and train_classifier(maskclip)."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroseg.errors import ConfigError, DataError
from zeroseg.models import (
    SEGMENTERS,
    Segmenter,
    build_segmenter,
    get_builder,
    load_segmenter,
    register_segmenter,
    save_segmenter,
)
from zeroseg.models.clip import TINY_MODEL, ClipSpec, dense_features, load_clip
from zeroseg.models.maskclip import MaskCLIP

TINY = ClipSpec(model=TINY_MODEL, random_init=True)


@pytest.fixture(scope="module")
def clip_model():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(TINY)


def test_forward_shapes_and_contract(clip_model):
    seg = MaskCLIP(clip_model)
    assert isinstance(seg, Segmenter) and get_builder("maskclip") is MaskCLIP
    assert seg.input_size == (224, 224) and seg.cfg == {"input_size": [224, 224], "logit_scale": 100.0}
    assert len(seg.mean) == 3 and len(seg.std) == 3
    assert seg.trainable_names() == [] and not any(p.requires_grad for p in seg.parameters())
    with torch.no_grad():
        out = seg(torch.randn(2, 3, 224, 224), torch.randn(5, 64))
    assert out.shape == (2, 5, 14, 14) and out.dtype == torch.float32
    rect = MaskCLIP(clip_model, {"input_size": [160, 256]})
    assert rect.input_size == (160, 256)
    with torch.no_grad():
        assert rect(torch.randn(1, 3, 160, 256), torch.randn(3, 64)).shape == (1, 3, 10, 16)


def test_scores_are_scaled_cosine_similarities(clip_model):
    seg = MaskCLIP(clip_model, {"logit_scale": 50.0})
    x = torch.randn(1, 3, 224, 224)
    t = torch.randn(4, 64) * 3  # not normalised: forward normalises
    with torch.no_grad():
        out = seg(x, t)
        _, patches = dense_features(clip_model.visual, x)
    p = patches[0, :, 2, 7]
    manual = 50.0 * (p / p.norm()) @ (t / t.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(out[0, :, 2, 7], manual, atol=1e-5, rtol=1e-5)
    assert out.abs().max() <= 50.0 + 1e-4


def test_model_logit_scale_and_config_errors(clip_model):
    seg = MaskCLIP(clip_model, {"logit_scale": "model"})
    assert seg.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # open_clip's initial scale
    with pytest.raises(ConfigError, match="logit_scale"):
        MaskCLIP(clip_model, {"logit_scle": 1.0})
    with pytest.raises(ConfigError, match="positive"):
        MaskCLIP(clip_model, {"logit_scale": 0})
    with pytest.raises(ConfigError, match="input_size"):
        MaskCLIP(clip_model, {"input_size": [224]})
    with pytest.raises(ConfigError, match=r"input_size \[224, 200\] is not a multiple of the CLIP patch size \[16, 16\]"):
        MaskCLIP(clip_model, {"input_size": [224, 200]})
    with pytest.raises(ValueError, match=r"\[C >= 1, 64\]"):
        MaskCLIP(clip_model)(torch.randn(1, 3, 224, 224), torch.randn(3, 32))


def test_unknown_method_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'maskclip'"):
        get_builder("maskclp")


# ------------------------------------------------------------------ segmenter artifact


def test_save_load_round_trip_without_weights(clip_model, tmp_path):
    seg = MaskCLIP(clip_model, {"input_size": [192, 224]})
    inp = {"size": list(seg.input_size), "mean": list(seg.mean), "std": list(seg.std)}
    save_segmenter(tmp_path, "maskclip", TINY, seg.cfg, inp, None)
    doc = json.loads((tmp_path / "segmenter.json").read_text())
    assert doc["method"] == "maskclip" and doc["clip"]["random_init"] is True
    assert doc["model"] == {"input_size": [192, 224], "logit_scale": 100.0} and doc["input"] == inp
    assert not (tmp_path / "weights.pt").exists()
    loaded = load_segmenter(tmp_path)
    assert isinstance(loaded, MaskCLIP) and loaded.input_size == (192, 224) and not loaded.training
    x, t = torch.randn(1, 3, 192, 224), torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t), seg(x, t))
    # an input block that disagrees with the rebuilt model is caught
    doc["input"]["size"] = [224, 224]
    (tmp_path / "segmenter.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match="input.size"):
        load_segmenter(tmp_path)
    with pytest.raises(DataError, match="segmenter.json"):
        load_segmenter(tmp_path / "nothing")


class _Head(Segmenter):
    """A test method that trains a linear head on the patch embeddings."""

    def __init__(self, clip_model, cfg):
        super().__init__()
        self.visual = clip_model.visual.requires_grad_(False)
        self.head = torch.nn.Linear(64, 64)
        self.cfg, self.input_size = dict(cfg), (224, 224)
        self.mean, self.std = (0.5,) * 3, (0.25,) * 3

    def trainable_names(self):
        return ["head.weight", "head.bias"]

    def forward(self, images, text_embeddings):
        _, p = dense_features(self.visual, images)
        p = self.head(p.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.einsum("bdhw,cd->bchw", F.normalize(p, dim=1), text_embeddings)


def test_trained_weights_round_trip_and_strict_load(clip_model, tmp_path):
    register_segmenter("_test_head")(_Head)
    try:
        seg = build_segmenter("_test_head", clip_model, {"k": 1})
        torch.nn.init.normal_(seg.head.weight)
        inp = {"size": [224, 224], "mean": [0.5] * 3, "std": [0.25] * 3}
        save_segmenter(tmp_path, "_test_head", TINY, seg.cfg, inp, seg.trainable_state_dict())
        assert set(torch.load(tmp_path / "weights.pt")) == {"head.weight", "head.bias"}
        loaded = load_segmenter(tmp_path)
        torch.testing.assert_close(loaded.head.weight, seg.head.weight)
        # missing and unexpected keys are both named
        sd = {"head.weight": seg.head.weight.detach(), "extra.w": torch.zeros(1)}
        torch.save(sd, tmp_path / "weights.pt")
        with pytest.raises(DataError) as e:
            load_segmenter(tmp_path)
        assert "head.bias" in str(e.value) and "extra.w" in str(e.value)
        torch.save({"head.weight": torch.zeros(3, 3), "head.bias": torch.zeros(64)}, tmp_path / "weights.pt")
        with pytest.raises(DataError, match="shape mismatch"):
            load_segmenter(tmp_path)
    finally:
        SEGMENTERS.pop("_test_head", None)


def test_save_segmenter_validates(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'maskclip'"):
        save_segmenter(tmp_path, "maskclipp", TINY, {}, {"size": [1, 1], "mean": [0] * 3, "std": [1] * 3})
    with pytest.raises(ConfigError, match="size"):
        save_segmenter(tmp_path, "maskclip", TINY, {}, {"size": [224], "mean": [0] * 3, "std": [1] * 3})


# ------------------------------------------------------------------ train_classifier(maskclip)


def _ctx(tmp_path, classes, embeddings, config):
    from pipeline.dag import Artifact, StageContext

    bs = tmp_path / "build_splits"
    bs.mkdir()
    (bs / "classes.json").write_text(json.dumps(classes))
    et = tmp_path / "embed_text"
    (et / "embeddings").mkdir(parents=True)
    for v, e in embeddings.items():
        np.save(et / "embeddings" / f"{v}.npy", e)
    out = tmp_path / "out"
    out.mkdir()
    inputs = {"build_splits": Artifact("build_splits", "a" * 64, bs, str(bs), {"files": []}),
              "embed_text": Artifact("embed_text", "b" * 64, et, str(et), {"files": []})}
    return StageContext("train_classifier", "c" * 64, config, inputs, out, tmp_path, str(tmp_path / "_train"),
                        "train_classifier-ccc", log=lambda *_: None)


def _vocab(names):
    return {"dataset": "d", "names": names, "prompt_names": names, "seen": [0], "unseen": [1], "ignore_index": 255}


def test_train_classifier_maskclip_writes_a_loadable_segmenter(tmp_path):
    from stages.train_classifier import TrainClassifier, TrainClassifierConfig

    classes = {"train": _vocab(["cat", "dog", "sky"]), "eval": {"val": _vocab(["cat", "dog"])}}
    emb = {"train": np.eye(3, 64, dtype=np.float32), "val": np.eye(2, 64, dtype=np.float32)}
    conf = TrainClassifierConfig(clip=TINY, input_size=[160, 160])
    ctx = _ctx(tmp_path, classes, emb, conf)
    assert TrainClassifier().run(ctx) == {"trainable_params": 0.0}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["segmenter.json"]
    seg = load_segmenter(tmp_path / "out")
    assert isinstance(seg, MaskCLIP) and seg.input_size == (160, 160)
    assert TrainClassifier().fingerprint(conf) == "weights=random-init"


def test_train_classifier_checks_embedding_dimension_and_method(tmp_path):
    from pydantic import ValidationError

    from stages.train_classifier import TrainClassifier, TrainClassifierConfig

    classes = {"train": _vocab(["cat", "dog"]), "eval": {}}
    ctx = _ctx(tmp_path, classes, {"train": np.eye(2, 512, dtype=np.float32)}, TrainClassifierConfig(clip=TINY))
    with pytest.raises(ConfigError, match="512.*64"):
        TrainClassifier().run(ctx)
    with pytest.raises(ValidationError, match="did you mean 'maskclip'"):
        TrainClassifierConfig(clip=TINY, method="maskclp")
