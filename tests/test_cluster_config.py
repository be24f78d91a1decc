"""cluster.yaml passes Ray's own launcher validation (what `ray up` runs) and installs as the
README does."""

import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(copy.deepcopy(cfg))  # `ray up` fills the provider's defaults, then validates
    validate_config(cfg)
    return cfg


def test_cluster_yaml_passes_rays_validation():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    filled = _validate(cfg)
    types = filled["available_node_types"]
    assert types[filled["head_node_type"]]["resources"]["GPU"] == 0  # a CPU head
    workers = [t for n, t in types.items() if n != filled["head_node_type"]]
    assert len(workers) == 1 and workers[0]["resources"]["GPU"] > 0 and workers[0]["min_workers"] == 0
    assert workers[0]["max_workers"] > workers[0]["min_workers"]  # the autoscaler adds GPU nodes on demand
    bad = copy.deepcopy(cfg)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 4  # a typo: Ray's schema refuses it
    with pytest.raises(Exception, match="max_worker"):
        _validate(bad)


def test_cluster_nodes_install_as_the_readme_does():
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    make = (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    # the README's two commands both go through `make install` (uv sync --frozen of uv.lock)
    assert "make sample" in readme and "make test" in readme
    assert re.search(r"^sample: install$", make, re.M) and re.search(r"^lint: install$", make, re.M)
    assert re.search(r"^test: lint$", make, re.M) and "uv sync -q --frozen" in make
    assert any(re.fullmatch(r"cd \S+/zeroseg && make install", c) for c in cfg["setup_commands"])
    # Ray and the tracking server run from that environment
    for c in [*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]]:
        assert c.split()[0].endswith("zeroseg/.venv/bin/ray"), c
    server = " ".join(cfg["head_setup_commands"])
    assert "zeroseg/.venv/bin/mlflow server" in server and "--artifacts-destination s3://" in server
