"""Config loading, overrides, validation errors and artifact keys."""

import pytest
from pydantic import BaseModel

from pipeline.config import (
    apply_override, artifact_key, canonical_json, flatten, load_config, validate_section,
)
from pipeline.dag import StageConfig
from zeroseg.errors import ConfigError


class Inner(BaseModel, extra="forbid"):
    model: str = "m"
    random_init: bool = False


class Cfg(StageConfig):
    gamma: float = 0.0
    batch_size: int = 4
    clip: Inner | None = None


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_overrides_parse_yaml_values(tmp_path):
    p = _write(tmp_path, "run: {work_dir: w}\nevaluate: {gamma: 0.0}\n")
    cfg = load_config(p, ["evaluate.gamma=0.25", "evaluate.sets=[val, camvid]", "new.a.b=x"])
    assert cfg.sections["evaluate"] == {"gamma": 0.25, "sets": ["val", "camvid"]}
    assert cfg.sections["new"] == {"a": {"b": "x"}}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "evaluate.gamma")
    with pytest.raises(ConfigError, match="not a section"):
        apply_override({"a": 3}, "a.b=1")


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


def test_unknown_key_names_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'evaluate.gama'.*did you mean evaluate.gamma"):
        validate_section("evaluate", Cfg, {"gama": 0.1}, None, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"evaluate.clip.random_int.*did you mean evaluate.clip.random_init"):
        validate_section("evaluate", Cfg, {"clip": {"random_int": True}}, None, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"evaluate.batch_size"):
        validate_section("evaluate", Cfg, {"batch_size": "many"}, None, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=r"run.work_dri.*did you mean run.work_dir"):
        load_config(_write(tmp_path, "run: {work_dri: x}\n"))


def test_clip_injected_unless_overridden(tmp_path):
    top = {"model": "A", "random_init": True}
    c = validate_section("s", Cfg, {}, top, tmp_path)
    assert c.clip == Inner(model="A", random_init=True)
    # a section's own clip replaces the top-level one whole: nothing of it is merged in
    c = validate_section("s", Cfg, {"clip": {"model": "B"}}, top, tmp_path)
    assert c.clip == Inner(model="B", random_init=False)
    c = validate_section("s", Cfg, {"clip": {"random_init": False}}, top, tmp_path)
    assert c.clip == Inner(model="m", random_init=False)
    assert top == {"model": "A", "random_init": True}  # the top-level spec is not mutated
    assert validate_section("s", Cfg, {}, None, tmp_path).clip is None  # no top-level clip: nothing injected

    class NoClip(StageConfig):
        gamma: float = 0.0

    # only models with a clip field get one (an injected key would fail NoClip's extra="forbid")
    assert not hasattr(validate_section("s", NoClip, {}, top, tmp_path), "clip")


def test_keys_same_config_same_key_any_change_new_key():
    base = dict(stage="evaluate", version="1", config={"gamma": 0.0, "sets": ["a", "b"]},
                input_keys={"x": "1" * 64}, fingerprint=None)
    k = artifact_key(**base)
    assert k == artifact_key(**{**base, "config": {"sets": ["a", "b"], "gamma": 0.0}})  # key order
    assert len(k) == 64
    changed = [
        {**base, "stage": "other"},
        {**base, "version": "2"},
        {**base, "config": {"gamma": 0.1, "sets": ["a", "b"]}},
        {**base, "config": {"gamma": 0.0, "sets": ["b", "a"]}},
        {**base, "input_keys": {"x": "2" * 64}},
        {**base, "fingerprint": "data-v2"},
    ]
    keys = {artifact_key(**c) for c in changed}
    assert k not in keys and len(keys) == len(changed)


def test_canonical_json_and_flatten():
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}


def test_override_list_index():
    raw = {"build_splits": {"eval": [{"name": "camvid", "max_images": None}]}}
    apply_override(raw, "build_splits.eval.0.max_images=4")
    assert raw["build_splits"]["eval"][0]["max_images"] == 4
    with pytest.raises(ConfigError, match="list of 1 items"):
        apply_override(raw, "build_splits.eval.3.max_images=4")


def test_extends_deep_merges_over_the_base(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, work_dir: w}\nevaluate: {gamma: 0.1, batch_size: 2}\n"
                                        "build_splits: {eval: [{name: a}, {name: b}]}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrun: {name: child}\nevaluate: {gamma: 0.5}\n"
                                         "build_splits: {eval: [{name: c}]}\n")
    cfg = load_config(tmp_path / "child.yaml", ["evaluate.batch_size=8"])
    assert cfg.run.name == "child" and cfg.run.work_dir == "w"
    assert cfg.sections["evaluate"] == {"gamma": 0.5, "batch_size": 8}
    assert cfg.sections["build_splits"]["eval"] == [{"name": "c"}]  # lists replace
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")
