"""A method that brings its own stage needs no edit of ``pipeline/`` (nor of ``stages/``): the
toy method of ``tests/toymethod`` (its stage ``toy_fit`` writes a segmenter, ``produces =
"segmenter"``; its catalogue declares the headline label ``toy``) plans with the project's
evaluate reading its segmenter, runs, is tracked in MLflow under its own method label and
appears in ``zeroseg compare``."""

from __future__ import annotations

import io
import json

import mlflow
import pytest
from toymethod.catalog import CATALOG

from pipeline.catalogue import load_catalogue
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.console import Console
from pipeline.errors import ConfigError
from pipeline.plan import plan


def _config(tmp_path, data):
    cfg = tmp_path / "toy.yaml"
    coco = data / "coco128-seg"
    cfg.write_text(
        f"""
run: {{name: toy, work_dir: {tmp_path / "work"}, experiment: toy}}
clip: {{model: zeroseg-tiny-vit, random_init: true}}
build_splits:
  train: {{name: coco128, format: coco, annotations: {coco / "annotations.json"},
          images: {coco / "images" / "train2017"}, max_images: 8}}
  split: {{unseen: [cow, giraffe, suitcase, frisbee, skateboard, carrot, scissors]}}
  val_fraction: 0.5
embed_text: {{source: model, templates: single}}
toy_fit: {{}}
evaluate: {{batch_size: 4, gamma: 0.0}}
"""
    )
    return cfg


def test_the_toy_catalogue_loads_by_name():
    cat = load_catalogue("toymethod.catalog:STAGES")
    assert [s.name for s in cat.stages] == [s.name for s in CATALOG.stages]
    assert cat.headline is CATALOG.headline and cat.report is CATALOG.report
    assert "toymethod" in cat.code_packages


def test_evaluate_reads_the_toy_segmenter_and_the_project_catalogue_knows_no_toy(tmp_path, shared_data):
    cfg = load_config(_config(tmp_path, shared_data))
    p = plan(cfg, CATALOG.stages, code_packages=CATALOG.code_packages)
    assert p.nodes["evaluate"].bindings["model"] == "toy_fit"  # the only segmenter of this config
    hashed = {n.name: n.components["config"] for n in p}
    assert CATALOG.headline(hashed)["method"] == "toy"
    with pytest.raises(ConfigError, match="unknown section 'toy_fit'"):
        plan(cfg, load_catalogue().stages)


def test_the_toy_method_runs_is_tracked_and_is_compared(tmp_path, shared_data, ray_local):
    cfg = _config(tmp_path, shared_data)
    assert main(["run", "--config", str(cfg)], catalog=CATALOG) == 0
    uri = f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["toy"], output_format="list")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    by_stage = {r.data.tags["stage"]: r for r in runs if r is not parent}
    assert set(by_stage) == {"build_splits", "embed_text", "toy_fit", "evaluate"}
    assert parent.data.params["method"] == "toy" and by_stage["evaluate"].data.params["method"] == "toy"
    assert "evaluate/val/hIoU" in parent.data.metrics

    out, text = tmp_path / "report", io.StringIO()
    argv = ["compare", "--tracking-uri", uri, "--experiment", "toy", "--out", str(out), "--top", "1"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.cli.Console", lambda verbose=False: Console(file=text))
        assert main(argv, catalog=CATALOG) == 0
    printed = text.getvalue()
    assert "toy: evaluate on val, by hIoU" in printed and f"toy {parent.info.run_id[:8]}" in printed
    page = (out / "report.html").read_text()
    assert f"<td>toy {parent.info.run_id[:8]}</td>" in page
    assert json.dumps({"method": "toy"})[1:-1] in page.replace("&quot;", '"')
    assert (out / "seen_unseen.png").exists()
