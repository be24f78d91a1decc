"""Prompt templates / ensembling (zeroseg/text.py) and the embed_text stage (stages/embed_text.py),
with the tiny random-weight CLIP (source model) and the real CLIP ViT-B/16 VOC embeddings in
../shared/data/clip-text-embeddings (source file)."""

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroseg.errors import ConfigError, DataError
from zeroseg.models.clip import TINY_MODEL, ClipSpec, get_tokenizer, load_clip
from zeroseg.text import TEMPLATES, encode_class_names, get_templates

TINY = ClipSpec(model=TINY_MODEL, random_init=True)


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_clip(TINY), get_tokenizer(TINY)


@pytest.fixture(scope="module")
def voc(shared_data):
    d = shared_data / "clip-text-embeddings"
    names = json.loads((d / "class_names.json").read_text())["voc20"]
    return d, names


# ------------------------------------------------------------------ templates


def test_template_sets():
    assert TEMPLATES["single"] == ("a photo of a {}.",)
    ens = TEMPLATES["ensemble15"]
    assert len(ens) == 15 and len(set(ens)) == 15 and all(t.count("{}") == 1 for t in ens)
    assert ens[0] == "a photo of a {}." and ens[-1] == "This is one {} in the scene."
    with pytest.raises(ConfigError, match="did you mean 'ensemble15'"):
        get_templates("ensemble16")
    with pytest.raises(ConfigError, match="placeholder"):
        get_templates(["a photo"])


def test_single_template_is_the_normalised_prompt_embedding(tiny):
    model, tok = tiny
    out = encode_class_names(model, tok, ["cat", "traffic light"], "single")
    with torch.no_grad():
        ref = F.normalize(model.encode_text(tok(["a photo of a cat.", "a photo of a traffic light."])), dim=-1)
    assert out.dtype == np.float32 and out.shape == (2, 64)
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-6)


def test_ensemble_is_mean_of_normalised_template_embeddings(tiny):
    model, tok = tiny
    names = ["cat", "dog", "potted plant"]
    out = encode_class_names(model, tok, names, "ensemble15", batch_size=7)  # batches cross classes
    with torch.no_grad():
        for i, n in enumerate(names):
            per = [F.normalize(model.encode_text(tok([t.format(n)]))[0], dim=-1) for t in TEMPLATES["ensemble15"]]
            mean = torch.stack(per).mean(0)
            np.testing.assert_allclose(out[i], (mean / mean.norm()).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert not np.allclose(out, encode_class_names(model, tok, names, "single"), atol=1e-3)


# ------------------------------------------------------------------ the stage


def _ctx(tmp_path, classes, config):
    from pipeline.dag import Artifact, StageContext

    bs = tmp_path / "build_splits"
    bs.mkdir(exist_ok=True)
    (bs / "classes.json").write_text(json.dumps(classes))
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    inputs = {"build_splits": Artifact("build_splits", "a" * 64, bs, str(bs), {"files": []})}
    return StageContext("embed_text", "e" * 64, config, inputs, out, tmp_path, str(tmp_path / "_train"),
                        "embed_text-eee", log=lambda *_: None)


def _vocab(names, prompts=None):
    return {"dataset": "d", "names": names, "prompt_names": prompts or names, "seen": [0], "unseen": [],
            "ignore_index": 255}


def _conf(**kw):
    from stages.embed_text import EmbedTextConfig

    return EmbedTextConfig(**kw)


def test_stage_source_model(tiny, tmp_path):
    from stages.embed_text import EmbedText

    model, tok = tiny
    classes = {"train": _vocab(["person", "bicycle", "giraffe"]),
               "eval": {"camvid": _vocab(["sky", "pedestrian", "bicyclist"], ["sky", "person", "bicycle"])}}
    conf = _conf(clip=TINY, templates="ensemble15", batch_size=16)
    metrics = EmbedText().run(_ctx(tmp_path, classes, conf))
    assert metrics == {"vocabularies": 2.0, "train_classes": 3.0, "embed_dim": 64.0}
    train = np.load(tmp_path / "out/embeddings/train.npy")
    cam = np.load(tmp_path / "out/embeddings/camvid.npy")
    assert train.dtype == np.float32 and train.shape == (3, 64) and cam.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cam, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(train, encode_class_names(model, tok, ["person", "bicycle", "giraffe"], "ensemble15"),
                               atol=1e-6)
    np.testing.assert_allclose(cam[1:], train[:2], atol=1e-6)  # embedded from the mapped prompt names
    prov = json.loads((tmp_path / "out/provenance.json").read_text())
    assert prov["source"] == "model" and prov["model"] == TINY_MODEL and prov["weights"] == "random-init"
    assert prov["templates"]["set"] == "ensemble15" and len(prov["templates"]["strings"]) == 15
    assert prov["prompt_names"]["camvid"] == ["sky", "person", "bicycle"] and prov["random_init"] is True


def test_fingerprint_follows_the_checkpoint_file(tiny, tmp_path, voc):
    from stages.embed_text import EmbedText

    model, _ = tiny
    ckpt = tmp_path / "w.pt"
    torch.save(model.state_dict(), ckpt)
    conf = _conf(clip=ClipSpec(model=TINY_MODEL, checkpoint=str(ckpt)))
    first = EmbedText().fingerprint(conf)
    assert first == "weights=sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
    sd = model.state_dict()
    sd["logit_scale"] = sd["logit_scale"] + 1
    torch.save(sd, ckpt)
    assert EmbedText().fingerprint(conf) != first
    d, _ = voc
    fconf = _conf(source="file", file={"embeddings": str(d / "voc20_vit-b-16_single.npy"),
                                       "class_names": str(d / "class_names.json")})
    fp = EmbedText().fingerprint(fconf)
    assert hashlib.sha256((d / "voc20_vit-b-16_single.npy").read_bytes()).hexdigest() in fp


def test_stage_source_file_real_voc_embeddings(tmp_path, voc):
    from stages.embed_text import EmbedText

    d, names = voc
    raw = np.load(d / "voc20_vit-b-16_single.npy").astype(np.float32)
    unseen = ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # ZegCLIP Table 10, VOC
    train = [n for n in names if n not in unseen]
    val = list(reversed(names))
    classes = {"train": _vocab(train), "eval": {"val": _vocab(val)}}
    # key omitted: picked from the file name prefix (voc20_...)
    conf = _conf(source="file", file={"embeddings": str(d / "voc20_vit-b-16_single.npy"),
                                      "class_names": str(d / "class_names.json")})
    EmbedText().run(_ctx(tmp_path, classes, conf))
    got_train = np.load(tmp_path / "out/embeddings/train.npy")
    got_val = np.load(tmp_path / "out/embeddings/val.npy")
    assert got_train.dtype == np.float32 and got_train.shape == (15, 512) and got_val.shape == (20, 512)
    idx = [names.index(n) for n in val]
    np.testing.assert_allclose(got_val, raw[idx] / np.linalg.norm(raw[idx], axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got_train, axis=1), 1.0, atol=1e-6)
    # real CLIP text vectors: cow's nearest VOC class is horse or sheep
    cow = raw[names.index("cow")] / np.linalg.norm(raw[names.index("cow")])
    sims = {n: float(cow @ got_val[i]) for i, n in enumerate(val) if n != "cow"}
    assert max(sims, key=sims.get) in ("horse", "sheep")
    prov = json.loads((tmp_path / "out/provenance.json").read_text())
    assert prov["source"] == "file" and prov["file"]["key"] == "voc20"
    assert prov["file"]["embeddings_sha256"] == hashlib.sha256((d / "voc20_vit-b-16_single.npy").read_bytes()).hexdigest()


def test_source_file_errors(tmp_path, voc):
    from stages.embed_text import EmbedText

    d, names = voc
    files = {"embeddings": str(d / "voc20_vit-b-16_single.npy"), "class_names": str(d / "class_names.json"),
             "key": "voc20"}
    # count: a class the file does not have
    classes = {"train": _vocab(names[:4] + ["zebra"]), "eval": {}}
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError) as e:
        EmbedText().run(_ctx(tmp_path / "a", classes, _conf(source="file", file=files)))
    assert "'zebra'" in str(e.value) and "class_map" in str(e.value) and "source: model" in str(e.value)
    # dimension: the tiny model embeds into 64, the file has 512
    classes = {"train": _vocab(names[:4]), "eval": {}}
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="dimension 512.*into 64"):
        EmbedText().run(_ctx(tmp_path / "b", classes, _conf(source="file", file=files, clip=TINY)))
    # norm: row 3 scaled
    raw = np.load(d / "voc20_vit-b-16_single.npy")
    raw = raw.astype(np.float32)
    raw[3] *= 1.5
    np.save(tmp_path / "bad.npy", raw)
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"row 3 \('boat'\) has norm 1\.(49|50)"):
        EmbedText().run(_ctx(tmp_path / "c", classes, _conf(source="file", file={**files, "embeddings": str(tmp_path / "bad.npy")})))
    # key: unknown -> names the keys
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="voc20"):
        EmbedText().run(_ctx(tmp_path / "d", classes, _conf(source="file", file={**files, "key": "voc21"})))


def test_config_by_source(tmp_path):
    from pipeline.config import validate_section
    from stages.embed_text import EmbedTextConfig

    with pytest.raises(ConfigError, match="source: file needs file"):
        validate_section("embed_text", EmbedTextConfig, {"source": "file"}, None, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="needs a clip spec"):
        validate_section("embed_text", EmbedTextConfig, {"source": "model"}, None, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="templates"):
        validate_section("embed_text", EmbedTextConfig, {"templates": "ensemble"}, TINY.model_dump(), tmp_path / "c.yaml")


def test_unreadable_embedding_files_name_the_file(tmp_path):
    from stages.embed_text import EmbeddingFile, read_embedding_file

    npy, names = tmp_path / "e.npy", tmp_path / "names.json"
    np.save(npy, np.eye(3, dtype=np.float32))
    names.write_text('["a", "b",')
    with pytest.raises(DataError, match=r"names\.json is not valid JSON"):
        read_embedding_file(EmbeddingFile(embeddings=str(npy), class_names=str(names)))
    names.write_text('{"voc": "abc"}')  # a string would otherwise pass as the classes a, b, c
    with pytest.raises(DataError, match=r"names\.json\[voc\]: class names must be strings"):
        read_embedding_file(EmbeddingFile(embeddings=str(npy), class_names=str(names)))
    names.write_text('["a", "b", "c"]')
    npy.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"e\.npy is not a readable \.npy array"):
        read_embedding_file(EmbeddingFile(embeddings=str(npy), class_names=str(names)))
