"""Prompt templates / ensembling (zeroseg/text.py) and the embed_text stage (stages/embed_text.py),
with the tiny random-weight CLIP (source model) and the real CLIP ViT-B/16 VOC embeddings in
../shared/data/clip-text-embeddings (source file)."""

import hashlib
import json
import warnings
from pathlib import Path

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


#: ZegCLIP Appendix C (../shared/papers/zegclip.txt), "the 15 augmented templates we used on
#: COCO-Stuff 164K and PASCAL Context", verbatim.
ZEGCLIP_APPENDIX_C = [
    "A photo of a { }.",
    "A photo of a small { }.",
    "A photo of a medium { }.",
    "A photo of a large { }.",
    "This is a photo of a { }.",
    "This is a photo of a small { }.",
    "This is a photo of a medium { }.",
    "This is a photo of a large { }.",
    "A { } in the scene.",
    "A photo of a { } in the scene.",
    "There is a { } in the scene.",
    "There is the { } in the scene.",
    "This is a { } in the scene.",
    "This is the { } in the scene.",
    "This is one { } in the scene.",
]
#: The same list in the authors' released notebook (ZiqinZhou66/ZegCLIP
#: configs/_base_/datasets/text_embedding/get_embedding.ipynb, ``templates = [...]``): the paper's
#: "A ..." is spelled "a ..."; "This ..." / "There ..." keep their capital.
ZEGCLIP_NOTEBOOK = [
    "a photo of a {}.",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "a {} in the scene.",
    "a photo of a {} in the scene.",
    "There is a {} in the scene.",
    "There is the {} in the scene.",
    "This is a {} in the scene.",
    "This is the {} in the scene.",
    "This is one {} in the scene.",
]
#: ZegFormer's templates (../shared/papers/released-code.md section 1.2): COCO/ADE
#: ``PROMPT_ENSEMBLE_TYPE: "imagenet_select"`` (8) and VOC ``"single"``.
ZEGFORMER_IMAGENET_SELECT = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "A photo of a {} in the scene",
]
ZEGFORMER_SINGLE = ["A photo of a {} in the scene"]


def test_template_sets_are_the_papers_templates():
    # the two spellings agree up to the first letter of the "A ..." templates
    assert [t.replace("{ }", "{}") for t in ZEGCLIP_APPENDIX_C] == [t[0].upper() + t[1:] for t in ZEGCLIP_NOTEBOOK]
    assert TEMPLATES["ensemble15"] == tuple(ZEGCLIP_NOTEBOOK)
    assert get_templates("ensemble15") == tuple(ZEGCLIP_NOTEBOOK)
    assert TEMPLATES["single"] == ("a photo of a {}.",)  # CLIP's basic prompt
    # the notebook's single_templete: f"a photo of a {c}" (no period): the released *_single.npy
    assert TEMPLATES["zegclip_single"] == ("a photo of a {}",)
    # explicit lists pass through unchanged (ZegFormer's sets, as a list)
    assert get_templates(ZEGFORMER_IMAGENET_SELECT) == tuple(ZEGFORMER_IMAGENET_SELECT)
    with pytest.raises(ConfigError, match="did you mean 'ensemble15'"):
        get_templates("ensemble16")
    with pytest.raises(ConfigError, match="placeholder"):
        get_templates(["a photo"])
    with pytest.raises(ConfigError, match="placeholder"):
        get_templates(["a {} and a {}"])
    with pytest.raises(ConfigError, match="empty"):
        get_templates([])


def test_zegformer_template_sets_if_present():
    sets = {k: v for k, v in TEMPLATES.items() if "zegformer" in k.lower()}
    if not sets:
        pytest.skip("zeroseg.text has no ZegFormer template set (released-code.md section 1.2)")
    for name, strings in sets.items():
        assert list(strings) in (ZEGFORMER_IMAGENET_SELECT, ZEGFORMER_SINGLE), name


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
    inputs = {"splits": Artifact("build_splits", "a" * 64, bs, str(bs), {"files": []})}
    return StageContext(
        "embed_text",
        "e" * 64,
        config,
        inputs,
        out,
        tmp_path,
        str(tmp_path / "_train"),
        "embed_text-eee",
        log=lambda *_: None,
    )


def _vocab(names, prompts=None):
    return {
        "dataset": "d",
        "names": names,
        "prompt_names": prompts or names,
        "seen": [0],
        "unseen": [],
        "ignore_index": 255,
    }


def _conf(**kw):
    from stages.embed_text import EmbedTextConfig

    return EmbedTextConfig(**kw)


def test_stage_source_model(tiny, tmp_path):
    from stages.embed_text import EmbedText

    model, tok = tiny
    classes = {
        "train": _vocab(["person", "bicycle", "giraffe"]),
        "eval": {"camvid": _vocab(["sky", "pedestrian", "bicyclist"], ["sky", "person", "bicycle"])},
    }
    conf = _conf(clip=TINY, templates="ensemble15", batch_size=16)
    metrics = EmbedText().run(_ctx(tmp_path, classes, conf))
    assert metrics == {"vocabularies": 2.0, "train_classes": 3.0, "embed_dim": 64.0}
    train = np.load(tmp_path / "out/embeddings/train.npy")
    cam = np.load(tmp_path / "out/embeddings/camvid.npy")
    assert train.dtype == np.float32 and train.shape == (3, 64) and cam.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(cam, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(
        train, encode_class_names(model, tok, ["person", "bicycle", "giraffe"], "ensemble15"), atol=1e-6
    )
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
    fconf = _conf(
        source="file",
        file={"embeddings": str(d / "voc20_vit-b-16_single.npy"), "class_names": str(d / "class_names.json")},
    )
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
    conf = _conf(
        source="file",
        file={"embeddings": str(d / "voc20_vit-b-16_single.npy"), "class_names": str(d / "class_names.json")},
    )
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
    assert (
        prov["file"]["embeddings_sha256"] == hashlib.sha256((d / "voc20_vit-b-16_single.npy").read_bytes()).hexdigest()
    )


def test_source_file_errors(tmp_path, voc):
    from stages.embed_text import EmbedText

    d, names = voc
    files = {
        "embeddings": str(d / "voc20_vit-b-16_single.npy"),
        "class_names": str(d / "class_names.json"),
        "key": "voc20",
    }
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
        EmbedText().run(
            _ctx(tmp_path / "c", classes, _conf(source="file", file={**files, "embeddings": str(tmp_path / "bad.npy")}))
        )
    # key: unknown -> names the keys
    (tmp_path / "d").mkdir()
    with pytest.raises(ConfigError, match="voc20"):
        EmbedText().run(_ctx(tmp_path / "d", classes, _conf(source="file", file={**files, "key": "voc21"})))


def test_config_by_source(tmp_path):
    from pipeline.config import validate_section
    from pipeline.errors import ConfigError as PipelineConfigError
    from stages.embed_text import EmbedTextConfig

    path = tmp_path / "c.yaml"
    with pytest.raises(PipelineConfigError, match="source: file needs file"):
        validate_section("embed_text", EmbedTextConfig, {"source": "file"}, path)
    with pytest.raises(PipelineConfigError, match="needs a clip spec"):
        validate_section("embed_text", EmbedTextConfig, {"source": "model"}, path)
    # the shared clip section is injected by the planner; here it is given in the section
    with pytest.raises(PipelineConfigError, match="templates"):
        validate_section("embed_text", EmbedTextConfig, {"templates": "ensemble", "clip": TINY.model_dump()}, path)
    with pytest.raises(PipelineConfigError, match=r"'file' applies to source: file only"):
        validate_section(
            "embed_text",
            EmbedTextConfig,
            {"clip": TINY.model_dump(), "file": {"embeddings": "e.npy", "class_names": "n.json"}},
            path,
        )
    ok = validate_section("embed_text", EmbedTextConfig, {"clip": TINY.model_dump(), "templates": "ensemble15"}, path)
    assert ok.clip == TINY and ok.templates == "ensemble15" and ok.batch_size == 256


def test_stage_contract_and_key_split(tmp_path, monkeypatch, voc):
    from pipeline.config import hashed_view, runtime_view
    from stages.embed_text import EmbedText

    assert {r: i.stages for r, i in EmbedText.INPUTS.items()} == {"splits": ("build_splits",)}
    assert EmbedText.shared == ("clip",)
    conf = _conf(clip=TINY, templates="ensemble15", batch_size=16)
    # the bundled architecture JSON enters by content
    bundled = Path(__file__).resolve().parent.parent / "zeroseg" / "models" / "configs" / f"{TINY_MODEL}.json"
    arch = hashlib.sha256(bundled.read_bytes()).hexdigest()
    assert hashed_view(conf) == {
        "clip": {"model": f"{TINY_MODEL};config-sha256:{arch}", "weights": "random-init"},
        "source": "model",
        "templates": "ensemble15",
        "split_names": None,
        "file": None,
    }
    assert runtime_view(conf) == {"batch_size": 16}
    assert any("RANDOM WEIGHTS" in line for line in EmbedText().notices(conf))
    assert EmbedText().notices(_conf(clip=ClipSpec(model=TINY_MODEL, pretrained="x"))) == []
    # file paths are runtime: relative and absolute spellings of the same files, same hashed view and fingerprint
    d, _ = voc
    monkeypatch.chdir(d.parent)
    spelled = [
        _conf(
            source="file",
            file={"embeddings": str(d / "voc20_vit-b-16_single.npy"), "class_names": str(d / "class_names.json")},
        ),
        _conf(
            source="file",
            file={"embeddings": f"{d.name}/voc20_vit-b-16_single.npy", "class_names": f"./{d.name}/class_names.json"},
        ),
    ]
    assert (
        hashed_view(spelled[0])
        == hashed_view(spelled[1])
        == {"clip": None, "source": "file", "templates": "single", "split_names": None, "file": {"key": None}}
    )
    assert EmbedText().fingerprint(spelled[0]) == EmbedText().fingerprint(spelled[1])
    assert set(runtime_view(spelled[1])) == {"batch_size", "file.embeddings", "file.class_names"}


def test_classes_json_errors(tmp_path):
    from stages.embed_text import EmbedText

    conf = _conf(clip=TINY)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="an eval set is named .train., like the training vocabulary"):
        EmbedText().run(_ctx(tmp_path / "a", {"train": _vocab(["x"]), "eval": {"train": _vocab(["y"])}}, conf))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"classes\.json is malformed"):  # prompt_names of another length
        EmbedText().run(_ctx(tmp_path / "b", {"train": _vocab(["x", "y"], ["x"]), "eval": {}}, conf))
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match=r"classes\.json is malformed.*KeyError"):
        EmbedText().run(_ctx(tmp_path / "c", {"eval": {}}, conf))


def test_unreadable_embedding_files_name_the_file(tmp_path):
    from stages.embed_text import EmbeddingFile
    from stages.jobs.embed_text import read_embedding_file

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
