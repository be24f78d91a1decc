"""Every shipped config plans against the stage catalogue (sections validate, input roles bind,
the order is build_splits ... evaluate, keys compute); the sample configs also pass the stages'
plan-time checks on the real sample data. No Ray, no stage runs."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.plan import plan
from stages.catalog import STAGES

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(REPO.glob("configs/*.yaml"))
SAMPLES = [p for p in CONFIGS if p.name.startswith("sample")]
ORDER = ["build_splits", "embed_text", "train_classifier", "evaluate"]
BINDINGS = {
    "build_splits": {},
    "embed_text": {"splits": "build_splits"},
    "train_classifier": {"splits": "build_splits", "text": "embed_text"},
    "evaluate": {"splits": "build_splits", "text": "embed_text", "model": "train_classifier"},
}


class EverythingCached:
    """A store that holds every artifact: planning then runs no stage's data checks (the
    benchmark datasets are not on this machine), but still validates, binds and keys."""

    def exists(self, stage, key):
        return True

    def latest(self, stage):
        return None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_plans(path, monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    cfg = load_config(path)
    names = {s.name for s in STAGES}
    assert set(cfg.sections) <= names | {"clip"}, f"unknown sections in {path.name}"
    p = plan(cfg, STAGES, store=EverythingCached())
    assert list(p.nodes) == ORDER
    assert {n.name: n.bindings for n in p} == BINDINGS
    assert all(n.action == "cached" for n in p)
    assert len(set(p.keys().values())) == len(ORDER) and all(len(k) == 64 for k in p.keys().values())
    # the shared clip section reaches the stages that take it
    for name in ("embed_text", "train_classifier"):
        assert p.nodes[name].config.clip.model_dump() == {
            "pretrained": None,
            "checkpoint": None,
            "random_init": False,
            **cfg.sections["clip"],
        }
    assert p.nodes["train_classifier"].config.method == cfg.sections["train_classifier"]["method"]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_sample_configs_pass_the_plan_time_checks(path, shared_data, monkeypatch):
    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    p = plan(load_config(path), STAGES)  # no store: every node runs, so every check runs
    assert [n.action for n in p] == ["run"] * 4 and all(n.reason == "new" for n in p)
    assert p.nodes["build_splits"].components["data"] is not None  # the dataset fingerprint
    assert any("RANDOM WEIGHTS" in line for line in p.notices)


def test_the_zegclip_sample_shares_data_and_text_with_the_maskclip_sample(shared_data, monkeypatch):
    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    store = EverythingCached()
    mask = plan(load_config(REPO / "configs/sample.yaml"), STAGES, store=store).keys()
    zeg = plan(load_config(REPO / "configs/sample_zegclip.yaml"), STAGES, store=store).keys()
    assert mask["build_splits"] == zeg["build_splits"] and mask["embed_text"] == zeg["embed_text"]
    assert mask["train_classifier"] != zeg["train_classifier"] and mask["evaluate"] != zeg["evaluate"]
    # README: "--set evaluate.gamma=0.1 re-runs evaluate only"; a runtime field re-runs nothing
    gamma = plan(load_config(REPO / "configs/sample.yaml", ["evaluate.gamma=0.1"]), STAGES, store=store).keys()
    assert {k for k in mask if mask[k] != gamma[k]} == {"evaluate"}
    batch = plan(
        load_config(REPO / "configs/sample.yaml", ["evaluate.batch_size=16", "embed_text.batch_size=3"]),
        STAGES,
        store=store,
    ).keys()
    assert batch == mask


def test_real_benchmark_configs_need_the_data_root(monkeypatch):
    monkeypatch.delenv("ZEROSEG_DATA", raising=False)
    with pytest.raises(ConfigError, match="ZEROSEG_DATA"):
        load_config(REPO / "configs" / "coco_stuff.yaml")


def test_benchmark_configs_fail_the_plan_time_checks_without_their_data(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=r"dataset 'coco_stuff'.*does not exist"):
        plan(load_config(REPO / "configs" / "coco_stuff.yaml"), STAGES)
