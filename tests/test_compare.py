"""zeroseg compare's grouping over seeds and its per-class plot for large vocabularies (no runs
needed: hand-made rows as mlflow.search_runs returns them)."""

import math
import time

import numpy as np
import pandas as pd
import pytest

from pipeline.compare import fmt, table
from zeroseg.plots import plot_class_bars


def _runs():
    base = {"params.method": "zegclip", "params.clip_model": "ViT-B-16", "params.split": "voc"}
    rows = []
    for i, (lr, seed, h, fps) in enumerate(
        [("1e-4", "0", 40.0, 10.0), ("1e-4", "1", 44.0, 12.0), ("1e-5", "0", 30.0, 11.0)]
    ):
        rows.append(
            {
                "run_id": f"r{i}",
                **base,
                "params.train_classifier.train.lr": lr,
                "params.seed": seed,
                "params.train_classifier.train.seed": seed,
                "metrics.evaluate/val/hIoU": h,
                "metrics.evaluate/val/mIoU_seen": 2 * h,
                "metrics.evaluate/val/mIoU_unseen": h / 2,
                "metrics.evaluate/val/pAcc": 90.0,
                "metrics.evaluate/fps": fps,
            }
        )
    return pd.DataFrame(rows)


def test_runs_that_differ_only_in_the_seed_are_one_configuration():
    rows = table(_runs(), "val", "hIoU")
    assert [r["n"] for r in rows] == [2, 1]
    best = rows[0]
    assert best["params"]["train_classifier.train.lr"] == "1e-4" and best["runs"] == ["r0", "r1"]
    # by hand: mean 42, sample std sqrt(((40-42)^2 + (44-42)^2) / 1) = sqrt(8)
    assert best["hIoU"] == pytest.approx((42.0, math.sqrt(8)))
    assert best["fps"] == pytest.approx((11.0, math.sqrt(2)))
    assert fmt(best["hIoU"]) == "42.00 ± 2.83" and fmt(rows[1]["hIoU"]) == "30.00"
    assert "seed" not in best["params"]


def test_per_class_bars_show_the_top_and_bottom_of_171_classes(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"class{i:03d}" for i in range(171)]
    a = dict(zip(names, rng.uniform(0, 100, 171)))
    b = dict(zip(names, rng.uniform(0, 100, 171)))
    path, drawn = plot_class_bars({"best": a, "second": b}, tmp_path / "bars.png", "unseen", max_classes=40)
    order = sorted(names, key=lambda n: -a[n])  # by the first run, best first
    assert drawn == order[:20] + order[-20:]
    assert path.stat().st_size > 10_000


def test_a_sweep_trial_run_twice_counts_once(tmp_path):
    # a resumed sweep may run a trial again whose first MLflow run had already ended: compare
    # keeps the newest run of each (sweep, trial), so the configuration is not counted twice
    import mlflow

    from pipeline import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("e")
    for trial, hiou in (("t1", 0.1), ("t1", 0.3), ("t2", 0.2)):
        with mlflow.start_run(tags={"zeroseg.sweep_id": "s", "zeroseg.trial_id": trial}):
            mlflow.log_metric("evaluate/val/hIoU", hiou)
        time.sleep(0.01)  # distinct start times
    runs, _ = compare.find_runs(uri, "e")
    got = sorted(zip(runs["tags.zeroseg.trial_id"], runs["metrics.evaluate/val/hIoU"]))
    assert got == [("t1", 0.3), ("t2", 0.2)]


def test_the_table_and_page_are_the_catalogues_report(tmp_path):
    """pipeline.compare knows no metric: a catalogue's own report names the columns, their
    MLflow metrics and the plots."""
    from pipeline.catalogue import Catalogue
    from pipeline.compare import Column, report

    class Accuracy:
        stage, default_metric, help = "score", "acc", "compare accuracies"
        columns = (Column("acc", "accuracy", 1),)

        def metric_key(self, eval_set, name):
            return f"score/{eval_set}/{name}"

        def plots(self, rows, all_runs, eval_set, out, top):
            (out / "p.png").write_bytes(b"")
            return [("p.png", f"{len(rows)} rows")]

    runs = pd.DataFrame(
        [
            {"run_id": "a1", "params.method": "m", "params.k": "1", "metrics.score/test/acc": 0.5},
            {"run_id": "b2", "params.method": "m", "params.k": "2", "metrics.score/test/acc": 0.75},
        ]
    )
    cat = Catalogue([], report=Accuracy())
    rows = table(runs, "test", catalog=cat)
    assert [(r["params"], r["acc"][0]) for r in rows] == [({"k": "2"}, 0.75), ({"k": "1"}, 0.5)]
    page = report(runs, runs, rows, "test", "acc", tmp_path, catalog=cat).read_text()
    assert "<th>accuracy</th>" in page and "<td>0.8</td>" in page and '<h2>2 rows</h2><img src="p.png">' in page
