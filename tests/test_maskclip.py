"""MaskCLIP baseline, the segmenter artifact (save/load_segmenter) and train_classifier(maskclip)."""

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroseg.errors import ConfigError, DataError
from zeroseg.models import (
    Segmenter,
    WeightsMismatchError,
    load_segmenter,
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
    assert isinstance(seg, Segmenter)
    assert seg.input_size == (224, 224) and seg.cfg.model_dump(mode="json") == {
        "input_size": [224, 224],
        "logit_scale": 100.0,
    }
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
    with pytest.raises(
        ConfigError, match=r"input_size \[224, 200\] is not a multiple of the CLIP patch size \[16, 16\]"
    ):
        MaskCLIP(clip_model, {"input_size": [224, 200]})
    with pytest.raises(ValueError, match=r"\[C >= 1, 64\]"):
        MaskCLIP(clip_model)(torch.randn(1, 3, 224, 224), torch.randn(3, 32))


def test_unknown_method_names_the_nearest():
    from pipeline.config import validate_section
    from pipeline.errors import ConfigError as PlanError
    from stages.train_classifier import config_schema

    with pytest.raises(PlanError, match=r"train_classifier.method: unknown value 'maskclp'; did you mean 'maskclip'"):
        validate_section(
            "train_classifier", config_schema(), {"method": "maskclp", "clip": TINY.model_dump()}, "c.yaml"
        )


# ------------------------------------------------------------------ segmenter artifact


def test_save_load_round_trip_without_weights(clip_model, tmp_path):
    seg = MaskCLIP(clip_model, {"input_size": [192, 224]})
    inp = {"size": list(seg.input_size), "mean": list(seg.mean), "std": list(seg.std)}
    save_segmenter(tmp_path, seg, TINY, "maskclip")
    doc = json.loads((tmp_path / "segmenter.json").read_text())
    assert doc["method"] == "maskclip" and doc["clip"]["random_init"] is True
    assert doc["class"] == "zeroseg.models.maskclip:MaskCLIP"
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
    # an artifact can only name a class of zeroseg.models
    doc["input"]["size"], doc["class"] = [192, 224], "os:system"
    (tmp_path / "segmenter.json").write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"class 'os:system' must be 'zeroseg.models.<module>:<Class>'"):
        load_segmenter(tmp_path)


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


def test_trained_weights_round_trip_and_strict_load(clip_model, tmp_path, monkeypatch):
    import zeroseg.models.maskclip as mc

    monkeypatch.setattr(mc, "_Head", _Head, raising=False)  # a class of zeroseg.models, as artifacts require
    _Head.__module__, _Head.__qualname__ = "zeroseg.models.maskclip", "_Head"
    seg = _Head(clip_model, {"k": 1})
    torch.nn.init.normal_(seg.head.weight)
    save_segmenter(tmp_path, seg, TINY, "test_head", seg.trainable_state_dict())
    assert set(torch.load(tmp_path / "weights.pt")) == {"head.weight", "head.bias"}
    loaded = load_segmenter(tmp_path)
    torch.testing.assert_close(loaded.head.weight, seg.head.weight)
    # missing and unexpected keys are both named, in the one error type of strict loads
    sd = {"head.weight": seg.head.weight.detach(), "extra.w": torch.zeros(1)}
    torch.save(sd, tmp_path / "weights.pt")
    with pytest.raises(WeightsMismatchError) as e:
        load_segmenter(tmp_path)
    assert "head.bias" in str(e.value) and "extra.w" in str(e.value) and "weights.pt" in str(e.value)
    torch.save({"head.weight": torch.zeros(3, 3), "head.bias": torch.zeros(64)}, tmp_path / "weights.pt")
    with pytest.raises(WeightsMismatchError, match=r"shape mismatches \(1\): head.weight \(3, 3\) vs model \(64, 64\)"):
        load_segmenter(tmp_path)


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
    inputs = {
        "splits": Artifact("build_splits", "a" * 64, bs, str(bs), {"files": []}),
        "text": Artifact("embed_text", "b" * 64, et, str(et), {"files": []}),
    }
    return StageContext(
        "train_classifier",
        "c" * 64,
        config,
        inputs,
        out,
        tmp_path,
        str(tmp_path / "_train"),
        "train_classifier-ccc",
        log=lambda *_: None,
    )


def _vocab(names):
    return {"dataset": "d", "names": names, "prompt_names": names, "seen": [0], "unseen": [1], "ignore_index": 255}


def _method_config(**kw):
    from stages.methods.maskclip import MaskCLIPMethod

    return MaskCLIPMethod(method="maskclip", clip=TINY, **kw)


def test_train_classifier_maskclip_writes_a_loadable_segmenter(tmp_path):
    from stages.train_classifier import TrainClassifier

    classes = {"train": _vocab(["cat", "dog", "sky"]), "eval": {"val": _vocab(["cat", "dog"])}}
    emb = {"train": np.eye(3, 64, dtype=np.float32), "val": np.eye(2, 64, dtype=np.float32)}
    conf = _method_config(model={"input_size": [160, 160]})
    ctx = _ctx(tmp_path, classes, emb, conf)
    assert TrainClassifier().run(ctx) == {"trainable_params": 0}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["segmenter.json"]
    seg = load_segmenter(tmp_path / "out")
    assert isinstance(seg, MaskCLIP) and seg.input_size == (160, 160)
    assert conf.clip.key_payload()["weights"] == "random-init"


def test_train_classifier_checks_embedding_dimension(tmp_path):
    from stages.train_classifier import TrainClassifier

    classes = {"train": _vocab(["cat", "dog"]), "eval": {}}
    ctx = _ctx(tmp_path, classes, {"train": np.eye(2, 512, dtype=np.float32)}, _method_config())
    with pytest.raises(ConfigError, match="dimension 512.*embeds into 64"):
        TrainClassifier().run(ctx)


# ------------------------------------------------------------------ the equation and the default, by hand


def test_scores_are_100_times_the_cosine_by_hand(clip_model, monkeypatch):
    """MaskCLIP scores = logit_scale * cos(patch, text), logit_scale 100 by default (the released
    MaskClipHead's softmax(output * 100)). Patches p0 = 3 e0 + 4 e1 (unit: .6 e0 + .8 e1) and
    p1 = -2 e1 (unit: -e1); texts t0 = e0, t1 = 2 e1 (unit: e1):
    p0 -> (100 * .6, 100 * .8) = (60, 80); p1 -> (0, -100)."""
    import zeroseg.models.maskclip as maskclip_module

    patches = torch.zeros(1, 64, 1, 2)
    patches[0, 0, 0, 0], patches[0, 1, 0, 0] = 3.0, 4.0
    patches[0, 1, 0, 1] = -2.0
    monkeypatch.setattr(maskclip_module, "dense_features", lambda visual, images: (None, patches))
    t = torch.zeros(2, 64)
    t[0, 0], t[1, 1] = 1.0, 2.0
    seg = MaskCLIP(clip_model)
    out = seg(torch.zeros(1, 3, 224, 224), t)
    torch.testing.assert_close(out, torch.tensor([[[[60.0, 0.0]], [[80.0, -100.0]]]]))


def test_maskclip_default_config_is_pinned():
    """logit_scale 100 (MaskCLIP's released head: softmax(output * 100)); input size = the CLIP
    model's native size."""
    from zeroseg.models.maskclip import MASKCLIP_DEFAULT_CONFIG

    assert MASKCLIP_DEFAULT_CONFIG == {"input_size": None, "logit_scale": 100.0}


def test_maskclip_keeps_the_tower_in_eval_and_checks_every_text_shape(clip_model):
    seg = MaskCLIP(clip_model.visual)  # the tower itself is accepted
    seg.train()
    assert seg.training and not seg.visual.training
    assert seg.size_divisibility == 16 and seg.embed_dim == 64
    x = torch.randn(1, 3, 32, 48)
    for bad in (torch.zeros(0, 64), torch.zeros(2, 63), torch.zeros(1, 2, 64), torch.zeros(64)):
        with pytest.raises(ValueError, match=r"text_embeddings must be \[C >= 1, 64\]"):
            seg(x, bad)
    # the scores are logit_scale * cosine: one text embedding equal to a patch's embedding gives
    # exactly logit_scale there (cosine 1), the negated one -logit_scale; 2 x 3 grid, not square
    with torch.no_grad():
        p = seg.patch_embeddings(x)
        assert p.shape == (1, 64, 2, 3) and p.dtype == torch.float32
        torch.testing.assert_close(p.norm(dim=1), torch.ones(1, 2, 3))
        t = torch.stack([p[0, :, 1, 2] * 5.0, -p[0, :, 1, 2]])
        out = seg(x, t.double())
    assert out.dtype == torch.float32 and out.shape == (1, 2, 2, 3)
    assert out[0, 0, 1, 2].item() == pytest.approx(100.0, rel=1e-5)
    assert out[0, 1, 1, 2].item() == pytest.approx(-100.0, rel=1e-5)


# ------------------------------------------------------------------ zeroseg.models helpers


def test_weights_mismatch_message_lists_keys_and_survives_pickling():
    import pickle

    from zeroseg.models import check_state_dict

    missing = [f"m{i:02d}" for i in range(22)]
    err = WeightsMismatchError("w.pt", missing, ["u"], [], model="the X model")
    msg = str(err)
    # at most 20 keys shown, then the count; "none" for an empty list; no shape part when none
    assert msg.startswith("w.pt does not match the X model: missing keys (22): m00, m01,")
    assert "m19, ... (22 in all); unexpected keys (1): u. Was it written for another model config?" in msg
    assert "m20" not in msg and "shape mismatches" not in msg
    twenty = str(WeightsMismatchError("w", missing[:20], [], ["k (1,) vs model (2,)"]))
    assert "missing keys (20): " + ", ".join(missing[:20]) + "; unexpected keys (0): none" in twenty
    assert "(20 in all)" not in twenty and "; shape mismatches (1): k (1,) vs model (2,)." in twenty
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, WeightsMismatchError) and str(back) == msg and back.missing == missing
    # check_state_dict: sorted lists; a shape mismatch names both shapes; non-tensors are not shape-checked
    expected = {"b": torch.zeros(2, 3), "a": torch.zeros(1), "c": torch.zeros(4)}
    with pytest.raises(WeightsMismatchError) as e:
        check_state_dict(expected, {"z": 1, "b": torch.zeros(3, 2), "y": 2, "c": torch.zeros(4)}, "f.pt")
    assert e.value.missing == ["a"] and e.value.unexpected == ["y", "z"]
    assert e.value.mismatched == ["b (3, 2) vs model (2, 3)"]
    check_state_dict(expected, {"a": 0.5, "b": torch.zeros(2, 3), "c": torch.ones(4)}, "f.pt")


def test_load_strict_read_state_dict_and_import_class(tmp_path):
    from zeroseg.models import class_path, import_class, load_strict, load_trainable, read_state_dict

    lin = torch.nn.Linear(2, 3)
    sd = {k: torch.full_like(v, 7.0) for k, v in lin.state_dict().items()}
    load_strict(lin, sd, "s")
    assert torch.all(lin.weight == 7.0)
    with pytest.raises(WeightsMismatchError, match="s does not match the Linear model: missing keys \\(1\\): bias"):
        load_strict(lin, {"weight": sd["weight"]}, "s")
    # names: only that part is expected and loaded, the rest stays
    load_strict(lin, {"bias": torch.zeros(3)}, "s", names=["bias"])
    assert torch.all(lin.bias == 0) and torch.all(lin.weight == 7.0)
    with pytest.raises(
        WeightsMismatchError, match="the part: missing keys \\(0\\): none; unexpected keys \\(1\\): weight"
    ):
        load_strict(lin, {"bias": torch.zeros(3), "weight": sd["weight"]}, "s", model="the part", names=["bias"])
    load_trainable(lin, {k: torch.ones_like(v) for k, v in sd.items()})  # no trainable_names: all keys
    assert torch.all(lin.weight == 1.0)
    # read_state_dict
    torch.save({"a": torch.ones(2)}, tmp_path / "ok.pt")
    assert list(read_state_dict(tmp_path / "ok.pt")) == ["a"]
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="nice must hold a state dict, got list"):
        read_state_dict(tmp_path / "list.pt", name="nice")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read .*junk\.pt: "):
        read_state_dict(tmp_path / "junk.pt", error=ConfigError)
    # class paths: the outermost re-exporting package under zeroseg.models
    from zeroseg.models.deop import DeOP
    from zeroseg.models.zegclip import ZegCLIP

    assert class_path(MaskCLIP) == "zeroseg.models.maskclip:MaskCLIP"
    assert class_path(DeOP) == "zeroseg.models.deop:DeOP" and DeOP.__module__ != "zeroseg.models.deop"
    assert import_class("zeroseg.models.zegclip:ZegCLIP") is ZegCLIP
    for bad, says in (
        ("zeroseg.models.zegclip", "must be 'zeroseg.models.<module>:<Class>'"),
        ("os:path", "must be"),
        ("zeroseg.models.zegclip:Nope", "cannot be imported"),
        ("zeroseg.models.nope:X", "cannot be imported"),
    ):
        with pytest.raises(DataError, match=f"where: class .* {says}" if says == "must be" else says):
            import_class(bad, where="where")
