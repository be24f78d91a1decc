"""Every shipped config validates against the stage schemas (no data needed)."""

from pathlib import Path

import pytest

from pipeline.config import load_config, validate_section
from pipeline.dag import registry, topological_order

CONFIGS = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates(path, monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    cfg = load_config(path)
    reg = registry()
    assert set(cfg.sections) <= set(reg), f"unknown sections in {path.name}"
    order = topological_order(cfg.sections)
    assert order[0] == "build_splits" and order[-1] == "evaluate"
    for name in order:
        validate_section(name, reg[name].Config, cfg.sections[name], cfg.clip, path)


def test_real_benchmark_configs_need_the_data_root(monkeypatch):
    from zeroseg.errors import ConfigError

    monkeypatch.delenv("ZEROSEG_DATA", raising=False)
    with pytest.raises(ConfigError, match="ZEROSEG_DATA"):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "coco_stuff.yaml")
