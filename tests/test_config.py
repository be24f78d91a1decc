"""Config loading, overrides, validation errors (plain and discriminated-union sections), the
hashed / runtime split, shared-section injection and artifact keys (pipeline/config.py,
pipeline/plan.py with toy stages: no data, no Ray)."""

import hashlib
import json
from typing import Annotated

import pytest
from pydantic import BaseModel

from pipeline.config import (
    Runtime,
    apply_override,
    canonical_json,
    digest,
    flatten,
    hashed_view,
    load_config,
    runtime_view,
    validate_section,
)
from pipeline.dag import Input, Stage, StageConfig
from pipeline.errors import ConfigError
from pipeline.plan import plan


class Inner(BaseModel, extra="forbid"):
    model: str = "m"
    random_init: bool = False


class Cfg(StageConfig):
    gamma: float = 0.0
    batch_size: int = 4
    clip: Inner | None = None


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# =============================================================================================
# loading and overrides
# =============================================================================================
def test_overrides_parse_yaml_values(tmp_path):
    p = _write(tmp_path, "run: {work_dir: w}\nevaluate: {gamma: 0.0}\n")
    cfg = load_config(p, ["evaluate.gamma=0.25", "evaluate.sets=[val, camvid]", "new.a.b=x"])
    assert cfg.sections["evaluate"] == {"gamma": 0.25, "sets": ["val", "camvid"]}
    assert cfg.sections["new"] == {"a": {"b": "x"}}
    assert cfg.path == p and cfg.raw["evaluate"]["gamma"] == 0.25 and "run" not in cfg.sections
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "evaluate.gamma")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"a": 3}, "a.b=1")


def test_shared_sections_are_plain_entries_of_sections(tmp_path):
    p = _write(tmp_path, "clip: {model: zeroseg-tiny-vit, random_init: true}\nembed_text: {}\nevaluate:\n")
    cfg = load_config(p)
    assert cfg.sections == {
        "clip": {"model": "zeroseg-tiny-vit", "random_init": True},
        "embed_text": {},
        "evaluate": {},
    }
    with pytest.raises(ConfigError, match=r"section 'evaluate' must be a mapping"):
        load_config(_write(tmp_path, "evaluate: [1, 2]\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_env_interpolation(tmp_path, monkeypatch):
    p = _write(tmp_path, "run: {work_dir: '${ZS_TEST_W:-dflt}/x'}\ns: {p: '${ZS_TEST_D}'}\n")
    monkeypatch.setenv("ZS_TEST_D", "/data")
    cfg = load_config(p)
    assert cfg.run.work_dir == "dflt/x" and cfg.sections["s"]["p"] == "/data"
    monkeypatch.setenv("ZS_TEST_W", "/w")
    assert load_config(p).run.work_dir == "/w/x"
    monkeypatch.delenv("ZS_TEST_D")
    with pytest.raises(ConfigError, match="ZS_TEST_D"):
        load_config(p)


def test_override_list_index():
    raw = {"build_splits": {"eval": [{"name": "camvid", "max_images": None}]}}
    apply_override(raw, "build_splits.eval.0.max_images=4")
    assert raw["build_splits"]["eval"][0]["max_images"] == 4
    with pytest.raises(ConfigError, match="list of 1 items"):
        apply_override(raw, "build_splits.eval.3.max_images=4")


def test_extends_deep_merges_over_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "run: {name: base, work_dir: w}\nevaluate: {gamma: 0.1, batch_size: 2}\n"
        "build_splits: {eval: [{name: a}, {name: b}]}\n"
    )
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nrun: {name: child}\nevaluate: {gamma: 0.5}\nbuild_splits: {eval: [{name: c}]}\n"
    )
    cfg = load_config(tmp_path / "child.yaml", ["evaluate.batch_size=8"])
    assert cfg.run.name == "child" and cfg.run.work_dir == "w"
    assert cfg.sections["evaluate"] == {"gamma": 0.5, "batch_size": 8}
    assert cfg.sections["build_splits"]["eval"] == [{"name": "c"}]  # lists replace
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


def test_extends_a_list_merges_left_to_right_then_the_file(tmp_path):
    """mmseg's ``_base_``: ``extends: [a, b]`` is a, then b over it, then the file over both;
    paths are relative to the extending file; a base reached twice (a diamond) is no cycle."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "methods").mkdir()
    (tmp_path / "datasets" / "d.yaml").write_text(
        "run: {name: d, work_dir: w}\nembed_text: {templates: single}\nevaluate: {batch_size: 2}\n"
    )
    (tmp_path / "methods" / "common.yaml").write_text("train_classifier: {train: {lr: 1.0, steps: 3}}\n")
    (tmp_path / "methods" / "m.yaml").write_text(  # relative to methods/: common.yaml is methods/common.yaml
        "extends: common.yaml\ntrain_classifier: {method: m, train: {steps: 5}}\nevaluate: {batch_size: 4, gamma: 0.1}\n"
    )
    (tmp_path / "c.yaml").write_text(
        "extends: [datasets/d.yaml, methods/m.yaml, datasets/d.yaml]\nrun: {name: c}\nevaluate: {gamma: 0.2}\n"
    )
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.run.name == "c" and cfg.run.work_dir == "w"
    assert cfg.sections["train_classifier"] == {"method": "m", "train": {"lr": 1.0, "steps": 5}}
    assert cfg.sections["embed_text"] == {"templates": "single"}
    # left to right: d's batch_size 2 over m's 4 (d is listed again last), the file's gamma over m's
    assert cfg.sections["evaluate"] == {"batch_size": 2, "gamma": 0.2}
    assert "extends" not in cfg.raw


def test_extends_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("extends: [ok.yaml, a.yaml]\n")
    (tmp_path / "ok.yaml").write_text("run: {name: ok}\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: 'extends' cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "m.yaml").write_text("extends: [ok.yaml, nowhere/missing.yaml]\n")
    with pytest.raises(
        ConfigError, match=r"m\.yaml: extends 'nowhere/missing\.yaml', but .*missing\.yaml does not exist"
    ):
        load_config(tmp_path / "m.yaml")
    (tmp_path / "bad.yaml").write_text("extends: {a: 1}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: 'extends' must be a file name or a list"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "notmap.yaml").write_text("- 1\n")
    (tmp_path / "c.yaml").write_text("extends: [notmap.yaml]\n")
    with pytest.raises(ConfigError, match=r"notmap\.yaml: top level must be a mapping"):
        load_config(tmp_path / "c.yaml")


def test_print_config_prints_the_validated_config_and_creates_nothing(tmp_path, capsys):
    """``zeroseg run --print-config``: the merged config (extends, --set) with every section as
    validated, defaults filled in (YAML), exit 0; no work dir, store or log is created."""
    import yaml

    from pipeline.cli import main

    work = tmp_path / "work"
    argv = ["run", "--config", "configs/sample_zegclip_st.yaml", "--work-dir", str(work), "--print-config"]
    assert main([*argv, "--set", "evaluate.batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# configs/sample_zegclip_st.yaml: merged")
    doc = yaml.safe_load(out)
    assert doc["run"]["name"] == "sample_zegclip_st" and doc["run"]["work_dir"] == str(work)
    assert doc["clip"]["model"] == "zeroseg-tiny-vit"
    assert "clip" not in doc["train_classifier"]  # injected from the top level: printed there once
    assert doc["train_classifier"]["method"] == "zegclip"
    assert doc["train_classifier"]["train"]["max_steps"] == 6  # the file over its base
    assert doc["train_classifier"]["weight_decay"] == 0.01  # a default, filled in
    assert doc["self_train"]["init_from"] == "train_classifier"  # a binding, as written
    assert doc["evaluate"]["model"] == "self_train" and doc["evaluate"]["batch_size"] == 2  # --set
    assert list(doc) == ["run", "clip", "build_splits", "embed_text", "train_classifier", "self_train", "evaluate"]
    assert not work.exists()
    assert main([*argv, "--set", "evaluate.gama=0.1"]) == 2  # an invalid section: the usual error
    assert "did you mean evaluate.gamma" in capsys.readouterr().out


# =============================================================================================
# validation errors
# =============================================================================================
def test_unknown_key_names_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate.gama'.*did you mean evaluate.gamma"):
        validate_section("evaluate", Cfg, {"gama": 0.1}, path)
    with pytest.raises(ConfigError, match=r"evaluate.inner.random_int.*did you mean evaluate.inner.random_init"):
        validate_section("evaluate", Split, {"inner": {"random_int": True}}, path)
    with pytest.raises(ConfigError, match=r"run.work_dri.*did you mean run.work_dir"):
        load_config(_write(tmp_path, "run: {work_dri: x}\n"))
    # the message names the file
    with pytest.raises(ConfigError, match=r"c\.yaml: invalid config"):
        validate_section("evaluate", Cfg, {"gama": 0.1}, path)
    assert validate_section("evaluate", Cfg, {"gamma": 0.5}, path) == Cfg(gamma=0.5)


def test_bad_values_and_optional_nested_models_name_the_key(tmp_path):
    """A value of the wrong type, and an unknown key inside an optional nested model (``clip:
    Inner | None``), name ``section.key`` (old behaviour, kept)."""
    path = tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match=r"evaluate.clip.random_int.*did you mean evaluate.clip.random_init"):
        validate_section("evaluate", Cfg, {"clip": {"random_int": True}}, path)
    # an injected shared section is validated as part of the stage's section (errors name it there)
    with pytest.raises(ConfigError, match=r"down.clip.random_int.*did you mean down.clip.random_init"):
        _plan(tmp_path, "clip: {random_int: true}\nup: {}\ndown: {}\n")
    with pytest.raises(ConfigError, match=r"evaluate.batch_size"):
        validate_section("evaluate", Cfg, {"batch_size": "many"}, path)
    with pytest.raises(ConfigError, match=r"evaluate.clip.random_init"):
        validate_section("evaluate", Cfg, {"clip": {"random_init": "perhaps"}}, path)


_TINY_CLIP = {"model": "zeroseg-tiny-vit", "random_init": True}


def test_discriminated_union_errors_name_the_method_and_nested_keys(tmp_path):
    from stages.train_classifier import config_schema

    schema, path = config_schema(), tmp_path / "c.yaml"
    with pytest.raises(ConfigError, match=r"train_classifier.method: unknown value 'zegclp'; did you mean 'zegclip'"):
        validate_section("train_classifier", schema, {"method": "zegclp", "clip": _TINY_CLIP}, path)
    # a key of the selected method's nested model (the union tag pydantic inserts is not shown)
    with pytest.raises(
        ConfigError,
        match=r"unknown key 'train_classifier.model.prompt_tokns'; "
        r"did you mean train_classifier.model.prompt_tokens\?",
    ):
        validate_section(
            "train_classifier", schema, {"method": "zegclip", "clip": _TINY_CLIP, "model": {"prompt_tokns": 4}}, path
        )
    with pytest.raises(
        ConfigError, match=r"unknown key 'train_classifier.trian'.*valid keys here: method, clip, model"
    ):
        validate_section("train_classifier", schema, {"method": "maskclip", "clip": _TINY_CLIP, "trian": {}}, path)
    ok = validate_section("train_classifier", schema, {"method": "maskclip", "clip": _TINY_CLIP}, path)
    assert ok.method == "maskclip" and ok.clip.random_init is True


def test_discriminated_union_missing_method_lists_the_methods(tmp_path):
    from stages.train_classifier import config_schema

    with pytest.raises(
        ConfigError, match=r"train_classifier.method is required \(one of: deop, maskclip, zegclip, zegformer\)"
    ):
        validate_section("train_classifier", config_schema(), {"clip": _TINY_CLIP}, tmp_path / "c.yaml")


def test_discriminated_union_bad_value_names_the_nested_key(tmp_path):
    from stages.train_classifier import config_schema

    with pytest.raises(ConfigError, match=r"train_classifier.model.prompt_tokens"):
        validate_section(
            "train_classifier",
            config_schema(),
            {"method": "zegclip", "clip": _TINY_CLIP, "model": {"prompt_tokens": 0}},
            tmp_path / "c.yaml",
        )


# =============================================================================================
# the hashed / runtime split
# =============================================================================================
class Split(StageConfig):
    gamma: float = 0.0
    sets: list[str] = ["a", "b"]
    workers: Annotated[int, Runtime(why="resources")] = 1
    classes: Annotated[str | list[str], Runtime(when=lambda v: isinstance(v, str), why="data path")] = "c.json"
    inner: Inner = Inner()


def test_hashed_view_leaves_out_runtime_fields():
    c = Split()
    assert hashed_view(c) == {"gamma": 0.0, "sets": ["a", "b"], "inner": {"model": "m", "random_init": False}}
    assert runtime_view(c) == {"workers": 1, "classes": "c.json"}
    # a value-dependent marker: a file path is runtime, inline names are hashed
    inline = Split(classes=["x", "y"])
    assert hashed_view(inline)["classes"] == ["x", "y"] and "classes" not in runtime_view(inline)
    # runtime fields change no hashed view; hashed fields do
    assert hashed_view(Split(workers=8, classes="elsewhere/c.json")) == hashed_view(c)
    assert hashed_view(Split(gamma=0.1)) != hashed_view(c)
    # restating a default is the same validated config
    assert hashed_view(Split.model_validate({"gamma": 0.0, "sets": ["a", "b"]})) == hashed_view(c)


def test_hashed_view_of_a_clip_spec_is_its_key_payload(tmp_path, monkeypatch):
    from zeroseg.config.clip import ClipSpec

    class WithClip(StageConfig):
        clip: ClipSpec

    import hashlib

    from zeroseg.config.clip import TINY_MODEL_CONFIG, builtin_model_configs

    def bundled(name):  # a bundled architecture counts by its JSON's content
        return f"{name};config-sha256:{hashlib.sha256(builtin_model_configs()[name].read_bytes()).hexdigest()}"

    tiny = WithClip(clip=ClipSpec(model="zeroseg-tiny-vit", random_init=True))
    assert builtin_model_configs()["zeroseg-tiny-vit"] == TINY_MODEL_CONFIG
    assert hashed_view(tiny) == {"clip": {"model": bundled("zeroseg-tiny-vit"), "weights": "random-init"}}
    # an open_clip name spelled with '/' is the same model
    a = hashed_view(WithClip(clip=ClipSpec(model="ViT-B/16", pretrained="openai")))
    assert a == hashed_view(WithClip(clip=ClipSpec(model="ViT-B-16", pretrained="openai")))
    assert a == {"clip": {"model": bundled("ViT-B-16"), "weights": "openai"}}
    # a checkpoint counts by its content, not by how its path is spelled
    ckpt = tmp_path / "w" / "ckpt.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights v1")
    (tmp_path / "link").symlink_to(ckpt.parent)
    monkeypatch.chdir(tmp_path)
    want = {
        "clip": {"model": bundled("zeroseg-tiny-vit"), "weights": "sha256:" + hashlib.sha256(b"weights v1").hexdigest()}
    }
    for spelling in (str(ckpt), "w/ckpt.pt", "./w/../w/ckpt.pt", "link/ckpt.pt"):
        assert hashed_view(WithClip(clip=ClipSpec(model="zeroseg-tiny-vit", checkpoint=spelling))) == want, spelling
    ckpt.write_bytes(b"weights v2")
    assert hashed_view(WithClip(clip=ClipSpec(model="zeroseg-tiny-vit", checkpoint="w/ckpt.pt"))) != want


def test_digest_and_canonical_json_and_flatten():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert digest({"b": 1, "a": [1, 2]}) == hashlib.sha256(b'{"a":[1,2],"b":1}').hexdigest()
    assert digest({"a": [1, 2], "b": 1}) == digest({"b": 1, "a": [1, 2]})  # key order
    assert digest({"a": [2, 1], "b": 1}) != digest({"a": [1, 2], "b": 1})  # list order counts
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


# =============================================================================================
# planning with toy stages: shared-section injection and keys
# =============================================================================================
FINGERPRINT = {"up": None}


class UpCfg(StageConfig):
    gamma: float = 0.0
    sets: list[str] = ["a", "b"]
    workers: Annotated[int, Runtime(why="resources")] = 1


class Up(Stage):
    name = "up"
    Config = UpCfg
    CODE: list[str] = []

    def code(self, config):
        return list(self.CODE)

    def fingerprint(self, config):
        return FINGERPRINT["up"]


class Down(Stage):
    name = "down"
    Config = Cfg
    INPUTS = {"src": Input(("up",), doc="the upstream")}
    shared = ("clip",)

    def code(self, config):
        return []


class NoClipCfg(StageConfig):
    gamma: float = 0.0


class Side(Stage):
    """Takes no shared section: a top-level clip must not reach it."""

    name = "side"
    Config = NoClipCfg

    def code(self, config):
        return []


STAGES = [Up, Down, Side]


def _plan(tmp_path, text, overrides=(), stages=STAGES):
    return plan(load_config(_write(tmp_path, text), list(overrides)), stages)


def test_clip_injected_unless_overridden(tmp_path):
    top = "clip: {model: A, random_init: true}\nup: {}\nside: {}\n"
    p = _plan(tmp_path, top + "down: {}\n")
    assert p.nodes["down"].config.clip == Inner(model="A", random_init=True)
    assert not hasattr(p.nodes["side"].config, "clip")  # only stages that take the shared section get it
    assert p.config.sections["clip"] == {"model": "A", "random_init": True}  # the top-level spec is not mutated
    assert p.config.sections["down"] == {}
    # a section's own clip replaces the top-level one whole: nothing of it is merged in
    p = _plan(tmp_path, top + "down: {clip: {model: B}}\n")
    assert p.nodes["down"].config.clip == Inner(model="B", random_init=False)
    p = _plan(tmp_path, top + "down: {clip: {random_init: false}}\n")
    assert p.nodes["down"].config.clip == Inner(model="m", random_init=False)
    # no top-level clip: nothing injected
    assert _plan(tmp_path, "up: {}\ndown: {}\n").nodes["down"].config.clip is None


def test_plan_rejects_unknown_sections_and_missing_inputs(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'dwon'; did you mean 'down'"):
        _plan(tmp_path, "up: {}\ndwon: {}\n")
    # a shared section no listed stage takes is unknown
    with pytest.raises(ConfigError, match=r"unknown section 'clip'"):
        _plan(tmp_path, "clip: {model: A}\nup: {}\nside: {}\n", stages=[Up, Side])
    with pytest.raises(ConfigError, match=r"down needs its 'src' input"):
        _plan(tmp_path, "down: {}\n")
    with pytest.raises(ConfigError, match=r"down.src: 'side' cannot be bound to input 'src'"):
        _plan(tmp_path, "up: {}\nside: {}\ndown: {src: side}\n")
    p = _plan(tmp_path, "down: {src: up}\nup: {}\n")
    assert list(p.nodes) == ["up", "down"] and p.nodes["down"].bindings == {"src": "up"}
    assert p.nodes["down"].config == Cfg()  # the binding key is not part of the stage's config


def test_keys_same_config_same_key_any_change_new_key(tmp_path, monkeypatch):
    base = "up: {gamma: 0.0, sets: [a, b]}\ndown: {gamma: 0.5}\n"
    keys = _plan(tmp_path, base).keys()
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys.values()) and keys["up"] != keys["down"]
    # the same config, written otherwise: same keys (key order, restated defaults, runtime fields)
    for text, ov in (
        (base, ()),
        ("down: {gamma: 0.5}\nup: {sets: [a, b], gamma: 0.0}\n", ()),
        ("up: {}\ndown: {gamma: 0.5, batch_size: 4}\n", ()),
        (base, ["up.workers=16"]),
    ):
        assert _plan(tmp_path, text, ov).keys() == keys, (text, ov)
    # any hashed change: a new key for the stage, and for its descendants through the input keys
    for ov in (["up.gamma=0.1"], ["up.sets=[b, a]"]):
        k = _plan(tmp_path, base, ov).keys()
        assert k["up"] != keys["up"] and k["down"] != keys["down"], ov
    k = _plan(tmp_path, base, ["down.gamma=0.25"]).keys()
    assert k["up"] == keys["up"] and k["down"] != keys["down"]
    k = _plan(tmp_path, base, ["down.batch_size=8"]).keys()  # batch_size is not Runtime in Cfg: hashed
    assert k["down"] != keys["down"]
    # the data fingerprint and the code enter the key
    monkeypatch.setitem(FINGERPRINT, "up", "data-v2")
    k = _plan(tmp_path, base).keys()
    assert k["up"] != keys["up"] and k["down"] != keys["down"]
    monkeypatch.setitem(FINGERPRINT, "up", None)
    monkeypatch.setattr(Up, "CODE", ["zeroseg.errors"])
    p = _plan(tmp_path, base)
    assert p.keys()["up"] != keys["up"] and list(p.nodes["up"].components["code"]) == [
        "zeroseg/__init__.py",
        "zeroseg/errors.py",
    ]
    monkeypatch.setattr(Up, "CODE", [])

    # the stage name enters the key: an identical stage under another name gets another key
    class Up2(Up):
        name = "up2"

    k2 = _plan(tmp_path, "up: {}\nup2: {}\n", stages=[Up, Up2, Down]).keys()
    assert k2["up"] == keys["up"] and k2["up2"] != keys["up"]
    # the key is the digest of its components (as documented in pipeline.plan)
    node = _plan(tmp_path, base).nodes["down"]
    comp = node.components
    assert comp["config"] == {"gamma": 0.5, "batch_size": 4, "clip": None}
    assert comp["inputs"] == {"src": keys["up"]} and comp["data"] is None
    raw = json.dumps(
        {
            "stage": "down",
            "config": comp["config"],
            "inputs": comp["inputs"],
            "code": hashlib.sha256(b"{}").hexdigest(),
            "data": None,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    assert node.key == hashlib.sha256(raw.encode()).hexdigest()
