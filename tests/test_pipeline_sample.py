"""Integration: the sample DAG on a few real images with the tiny random-weight model."""

import json

import mlflow
import pytest

from pipeline.run import parse_args, run_pipeline

SMALL = ["build_splits.train.max_images=16", "build_splits.eval.0.max_images=3", "evaluate.batch_size=2"]


def _run(work, *extra, overrides=()):
    argv = ["--config", "configs/sample.yaml", "--work-dir", str(work)]
    for o in [*SMALL, *overrides]:
        argv += ["--set", o]
    return run_pipeline(parse_args(argv + list(extra)))


def _status(plan):
    return {p.name: p.status for p in plan}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local, shared_data):
    work = tmp_path_factory.mktemp("sample")
    code, plan = _run(work)
    return work, code, plan


def test_first_run_runs_every_stage_and_evaluates(first_run):
    work, code, plan = first_run
    assert code == 0, [p.error for p in plan]
    assert _status(plan) == {s: "ran" for s in ("build_splits", "embed_text", "train_classifier", "evaluate")}
    ev = next(p for p in plan if p.name == "evaluate")
    for s in ("val", "camvid"):
        for m in ("hIoU", "mIoU_seen", "mIoU_unseen", "pAcc"):
            assert 0.0 <= ev.metrics[f"{s}/{m}"] <= 100.0
    art = work / "store" / "evaluate" / ev.key
    metrics = json.loads((art / "metrics.json").read_text())
    assert set(metrics) == {"val", "camvid"}
    assert metrics["camvid"]["images"] == 3 and metrics["val"]["gamma"] == 0.0  # evaluate.gamma in sample.yaml
    # the plan's metrics are exactly the file's summary numbers (NaN there is null, and left out of the plan)
    want = {}
    for s, doc in metrics.items():
        for m in ("pAcc", "mAcc", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU"):
            want[f"{s}/{m}"] = doc["gzs3"][m]
        want[f"{s}/zs3_mIoU"], want[f"{s}/zs3_pAcc"] = doc["zs3"]["mIoU"], doc["zs3"]["pAcc"]
    want = {k: v for k, v in want.items() if v is not None}
    assert {k: v for k, v in ev.metrics.items() if k != "fps"} == want
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["key"] == ev.key and manifest["files"] and manifest["metrics"] == ev.metrics


def test_second_run_is_fully_cached(first_run, monkeypatch):
    import pipeline.run as run_mod

    def no_ray(cfg):
        raise AssertionError("a fully cached run must not start or join a Ray cluster")

    monkeypatch.setattr(run_mod, "init_ray", no_ray)
    work, _, plan1 = first_run
    code, plan = _run(work)
    assert code == 0
    assert set(_status(plan).values()) == {"cached"}
    assert [p.key for p in plan] == [p.key for p in plan1]
    ev = next(p for p in plan if p.name == "evaluate")
    assert ev.metrics == next(p for p in plan1 if p.name == "evaluate").metrics


def test_changing_an_evaluate_setting_reruns_evaluate_only(first_run):
    work, _, plan1 = first_run
    code, plan = _run(work, overrides=["evaluate.gamma=0.5"])
    assert code == 0
    assert _status(plan) == {"build_splits": "cached", "embed_text": "cached",
                             "train_classifier": "cached", "evaluate": "ran"}
    old = {p.name: p.key for p in plan1}
    assert next(p for p in plan if p.name == "evaluate").key != old["evaluate"]


def test_force_and_from_select_stages(first_run):
    work, _, _ = first_run
    code, plan = _run(work, "--stages", "evaluate", "--force")
    assert code == 0 and _status(plan)["evaluate"] == "ran"
    assert {s for s, v in _status(plan).items() if v == "ran"} == {"evaluate"}
    code, plan = _run(work, "--from", "train_classifier", "--force", "train_classifier")
    assert code == 0
    assert _status(plan) == {"build_splits": "cached", "embed_text": "cached",
                             "train_classifier": "ran", "evaluate": "cached"}


def _tree(root):
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_dry_run_prints_plan_and_runs_nothing(first_run, capsys):
    work, _, _ = first_run
    before = _tree(work / "store")
    code, plan = _run(work, "--dry-run", overrides=["evaluate.gamma=0.75"])
    assert code == 0
    assert {p.name: p.action for p in plan}["evaluate"] == "run"
    assert all(p.status == "pending" for p in plan)
    ev = next(p for p in plan if p.name == "evaluate")
    assert not (work / "store" / "evaluate" / ev.key).exists()
    assert _tree(work / "store") == before  # no artifact, staging or cache entry appeared
    out = capsys.readouterr().out
    assert "plan" in out and "evaluate" in out and "RANDOM WEIGHTS" in out


def test_mlflow_parent_and_nested_runs(first_run):
    """A fully cached invocation (run here, so the test stands alone) logs one parent run with one
    nested ``cached`` run per stage, each pointing at the MLflow run that produced its artifact."""
    work, _, _ = first_run
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    exp = mlflow.get_experiment_by_name("zeroseg-sample")
    before = {r.info.run_id for r in mlflow.search_runs([exp.experiment_id], output_format="list")}
    code, plan = _run(work)
    assert code == 0 and set(_status(plan).values()) == {"cached"}
    runs = {r.info.run_id: r for r in mlflow.search_runs([exp.experiment_id], output_format="list")}
    new = [r for i, r in runs.items() if i not in before]
    parents = [r for r in new if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(new) == 1 + len(plan)
    parent = parents[0]
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("stages.")} == {
        f"stages.{p.name}": f"cached {p.key[:12]}" for p in plan}
    nested = {r.data.tags["stage"]: r for r in new if r is not parent}
    assert set(nested) == {p.name for p in plan}
    for p in plan:
        r = nested[p.name]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["status"] == "cached" and r.data.tags["artifact_key"] == p.key
        # produced_by_run: the run recorded in the artifact's manifest, a "ran" run of the same stage and key
        manifest = json.loads((work / "store" / p.name / p.key / "manifest.json").read_text())
        producer = runs[r.data.tags["produced_by_run"]]
        assert r.data.tags["produced_by_run"] == manifest["mlflow_run_id"]
        assert producer.data.tags["status"] == "ran" and producer.data.tags["stage"] == p.name
        assert producer.data.tags["artifact_key"] == p.key
        assert r.data.metrics == p.metrics == manifest["metrics"]
    ev = next(p for p in plan if p.name == "evaluate")
    producer = runs[nested["evaluate"].data.tags["produced_by_run"]]
    assert producer.data.params["gamma"] == "0.0" and len(producer.data.tags["artifact_key"]) == 64
    assert producer.data.metrics["val/hIoU"] == ev.metrics["val/hIoU"]
    assert all(producer.data.metrics[k] == v for k, v in ev.metrics.items())


def test_bad_config_and_selection_errors(tmp_path, capsys):
    code, _ = run_pipeline(parse_args(["--config", "configs/sample.yaml", "--work-dir", str(tmp_path),
                                       "--set", "evaluate.gama=1", "--dry-run"]))
    assert code == 2 and "did you mean evaluate.gamma" in capsys.readouterr().out
    code, _ = run_pipeline(parse_args(["--config", "configs/sample.yaml", "--work-dir", str(tmp_path),
                                       "--stages", "evaluate", "--dry-run"]))
    assert code == 2 and "not cached" in capsys.readouterr().out
    code, _ = run_pipeline(parse_args(["--config", "configs/sample.yaml", "--work-dir", str(tmp_path),
                                       "--from", "evaluat", "--dry-run"]))
    assert code == 2 and "did you mean 'evaluate'" in capsys.readouterr().out


def test_metrics_table_fits_an_80_column_job_log():
    """`ray job` logs are 80 columns: every metric name and value must print whole."""
    from rich.console import Console

    from pipeline.run import metrics_table

    names = ("hIoU", "mIoU_seen", "mIoU_unseen", "mIoU", "pAcc", "mAcc", "zs3_mIoU", "zs3_pAcc")
    metrics = {f"{s}/{m}": 12.3456 + i for s in ("val", "camvid", "context") for i, m in enumerate(names)}
    con = Console(width=80, record=True, file=open("/dev/null", "w"))
    con.print(metrics_table(metrics))
    text = con.export_text()
    for i, m in enumerate(names):
        row = next(line for line in text.splitlines() if f" {m} " in line)
        assert row.count(f"{12.3456 + i:.2f}") == 3, row
    assert "…" not in text


def test_stage_notes_print_counts_as_integers():
    from pipeline.run import PlannedStage, _short_metrics

    p = PlannedStage(name="embed_text", key="k", config=None, stage=None, selected=True, cached=False,
                     metrics={"vocabularies": 3.0, "embed_dim": 64.0, "loss": 0.123456})
    assert _short_metrics(p) == "vocabularies=3, embed_dim=64, loss=0.1235"
