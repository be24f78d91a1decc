"""Integration: the sample DAG on a few real images with the tiny random-weight model."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import build_parser, cmd_run
from pipeline.console import Console

REPO = Path(__file__).resolve().parent.parent
SMALL = ["build_splits.train.max_images=16", "build_splits.eval.0.max_images=3", "evaluate.batch_size=2"]
STAGES = ("build_splits", "embed_text", "train_classifier", "evaluate")


def _run(work, *extra, overrides=(), config="configs/sample.yaml"):
    argv = ["run", "--config", config, "--work-dir", str(work)]
    for o in [*SMALL, *overrides]:
        argv += ["--set", o]
    return cmd_run(build_parser().parse_args(argv + list(extra)), Console())


def _status(plan):
    return {p.name: p.status for p in plan}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, ray_local, shared_data):
    work = tmp_path_factory.mktemp("sample")
    code, plan = _run(work)
    return work, code, plan


def _iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU in percent, NaN for a class neither in ground truth nor predicted (mmseg)."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, 100 * tp / union, np.nan)


def test_first_run_runs_every_stage_and_evaluates(first_run, shared_data):
    work, code, plan = first_run
    assert code == 0, [p.error for p in plan]
    assert _status(plan) == {s: "ran" for s in STAGES}
    ev = plan.nodes["evaluate"]
    art = work / "store" / "evaluate" / ev.key
    metrics = json.loads((art / "metrics.json").read_text())
    assert list(metrics) == ["val", "camvid"]
    assert (
        metrics["camvid"]["images"] == 3 and metrics["val"]["gamma"] == 0.0
    )  # evaluate.gamma unset: the MaskCLIP artifact states none
    # the confusion matrices count every pixel of the label PNGs build_splits wrote (read here with PIL)
    bs = work / "store" / "build_splits" / plan.nodes["build_splits"].key
    classes = json.loads((bs / "classes.json").read_text())
    for s in ("val", "camvid"):
        pngs = sorted((bs / "labels" / s).glob("*.png"))[: metrics[s]["images"]]
        labels = [np.asarray(Image.open(p)) for p in pngs]
        n_classes = len(classes["eval"][s]["names"])
        gt = np.bincount(np.concatenate([lab[lab != 255] for lab in labels]), minlength=n_classes)
        cm = np.array(metrics[s]["gzs3"]["confusion_matrix"])
        assert np.array_equal(cm.sum(1), gt)  # rows = ground truth, ignore (255) left out
        assert metrics[s]["pixels"] == sum(lab.size for lab in labels)
        # the reported numbers follow from the matrix (computed here, not by zeroseg.metrics)
        iou = _iou_from_confusion(cm)
        seen, unseen = classes["eval"][s]["seen"], classes["eval"][s]["unseen"]
        s_miou, u_miou = np.nanmean(iou[seen]), np.nanmean(iou[unseen])
        assert ev.metrics[f"{s}/mIoU_seen"] == pytest.approx(s_miou)
        assert ev.metrics[f"{s}/mIoU_unseen"] == pytest.approx(u_miou)
        assert ev.metrics[f"{s}/hIoU"] == pytest.approx(2 * s_miou * u_miou / (s_miou + u_miou))
        assert ev.metrics[f"{s}/pAcc"] == pytest.approx(100 * np.trace(cm) / cm.sum())
    # independent value checks (tests/test_glue_reference.py): every metric from its matrix, the
    # pixel counts from the label PNGs, and each matrix equal to a per-image reference forward of
    # the saved MaskCLIP segmenter (gamma 0: the artifact states no default)
    from test_glue_reference import check_sample_evaluate

    check_sample_evaluate(work, plan, shared_data, {"": "train_classifier"}, {"": 0.0})
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["key"] == ev.key and manifest["files"] and manifest["metrics"] == ev.metrics
    assert list(manifest["metrics"]) == list(ev.metrics)  # metric order kept (the table's column order)
    assert manifest["inputs"]["model"] == {"stage": "train_classifier", "key": plan.nodes["train_classifier"].key}


def test_second_run_is_fully_cached(first_run, monkeypatch):
    import pipeline.cluster as cluster

    def no_ray(*a, **k):
        raise AssertionError("a fully cached run must not start or join a Ray cluster")

    monkeypatch.setattr(cluster, "init_ray", no_ray)
    work, _, plan1 = first_run
    code, plan = _run(work)
    assert code == 0
    assert set(_status(plan).values()) == {"cached"}
    assert plan.keys() == plan1.keys()
    assert plan.nodes["evaluate"].metrics == plan1.nodes["evaluate"].metrics
    assert list(plan.nodes["evaluate"].metrics) == list(plan1.nodes["evaluate"].metrics)


def test_cached_run_imports_neither_torch_nor_ray(first_run):
    work, _, _ = first_run
    code = (
        "import sys; from pipeline.cli import main; "
        f"rc = main(['run', '--config', 'configs/sample.yaml', '--work-dir', {str(work)!r}, "
        + ", ".join(f"'--set', {o!r}" for o in SMALL)
        + "]); "
        "heavy = [m for m in ('torch', 'ray', 'open_clip', 'mlflow') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout
    assert out.stdout.count("cached") >= len(STAGES)


def test_changing_an_evaluate_setting_reruns_evaluate_only(first_run, capsys):
    """... and, with run.tracking_server (as `make sample` runs), logs through a real local
    `mlflow server` over the work dir's sqlite store, which is gone when the run ends."""
    import re
    import urllib.request

    work, _, plan1 = first_run
    capsys.readouterr()
    code, plan = _run(work, overrides=["evaluate.gamma=0.5", "run.tracking_server=true"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert _status(plan) == {
        "build_splits": "cached",
        "embed_text": "cached",
        "train_classifier": "cached",
        "evaluate": "ran",
    }
    assert plan.nodes["evaluate"].key != plan1.nodes["evaluate"].key
    assert plan.nodes["evaluate"].reason == "config: gamma None -> 0.5"

    m = re.search(r"mlflow: tracking server (http://127\.0\.0\.1:\d+) \(store (\S+); server log (\S+)\)", out)
    assert m, out[-3000:]
    url, store, log = m.group(1), m.group(2), Path(m.group(3))
    assert store == f"sqlite:///{(work / 'mlflow.db').resolve()}" and log.parent == work / "logs"
    # the evaluate run is in the sqlite store, and the server's own access log shows the requests
    # that logged it (run ids appear in the query strings of its GETs)
    client = mlflow.tracking.MlflowClient(store)
    exp = client.get_experiment_by_name("zeroseg-sample")
    (ev,) = client.search_runs([exp.experiment_id], f"tags.artifact_key = '{plan.nodes['evaluate'].key}'")
    assert ev.info.status == "FINISHED" and ev.data.tags["status"] == "ran" and ev.data.params["gamma"] == "0.5"
    assert ev.data.metrics["val/hIoU"] == pytest.approx(plan.nodes["evaluate"].metrics["val/hIoU"])
    served = log.read_text()
    assert re.search(rf'"GET /api/2\.0/mlflow/runs/get\?\S*run_id={ev.info.run_id}\S* HTTP/1\.1" 200', served)
    assert re.search(r'"POST /api/2\.0/mlflow/runs/log-batch HTTP/1\.1" 200', served)
    # stopped cleanly when the run ended: uvicorn finished, the port no longer answers
    assert "Finished server process" in served.splitlines()[-1]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)


def test_force_and_from_select_stages(first_run):
    work, _, _ = first_run
    code, plan = _run(work, "--stages", "evaluate", "--force")
    assert code == 0 and _status(plan)["evaluate"] == "ran"
    assert {s for s, v in _status(plan).items() if v == "ran"} == {"evaluate"}
    assert plan.nodes["evaluate"].reason == "forced"
    code, plan = _run(work, "--from", "train_classifier", "--force", "train_classifier")
    assert code == 0  # a forced stage's readers run again too: their keys cannot see its new output
    assert _status(plan) == {
        "build_splits": "cached",
        "embed_text": "cached",
        "train_classifier": "ran",
        "evaluate": "ran",
    }
    assert plan.nodes["evaluate"].reason == "forced"
    from pipeline.cli import main

    dry = ["run", "--config", "configs/sample.yaml", "--work-dir", str(work), "--dry-run"]
    assert main([*dry, "--stages", "evaluate", "--force", "embed_text"]) == 2  # forcing an unselected stage


def _tree(root):
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_dry_run_prints_plan_and_runs_nothing(first_run, capsys):
    work, _, _ = first_run
    before = _tree(work / "store")
    code, plan = _run(work, "--dry-run", overrides=["evaluate.gamma=0.75"])
    assert code == 0
    assert {p.name: p.action for p in plan}["evaluate"] == "run"
    assert all(p.status == "pending" for p in plan)
    assert not (work / "store" / "evaluate" / plan.nodes["evaluate"].key).exists()
    assert _tree(work / "store") == before  # no artifact, staging or cache entry appeared
    out = capsys.readouterr().out
    assert "plan" in out and "evaluate" in out and "RANDOM WEIGHTS" in out and "gamma None -> 0.75" in out


def test_mlflow_parent_and_nested_runs(first_run):
    """A fully cached invocation (run here, so the test stands alone) logs one parent run with one
    nested ``cached`` run per stage, each pointing at the MLflow run that produced its artifact;
    the parent carries every stage's hashed config as params and the evaluation metrics."""
    from pipeline.tracking import flush_journal

    work, _, _ = first_run
    uri = f"sqlite:///{work / 'mlflow.db'}"
    flush_journal(work / "tracking-journal", uri)  # earlier fully cached invocations of this module
    mlflow.set_tracking_uri(uri)
    exp = mlflow.get_experiment_by_name("zeroseg-sample")
    assert exp.artifact_location == (work / "mlartifacts").resolve().as_uri()  # beside the tracking store
    before = {r.info.run_id for r in mlflow.search_runs([exp.experiment_id], output_format="list")}
    t0 = __import__("time").time()
    code, plan = _run(work)
    assert code == 0 and set(_status(plan).values()) == {"cached"}
    flush_journal(work / "tracking-journal", uri)  # no stage ran: journaled, logged by the detached flusher or here
    runs = {r.info.run_id: r for r in mlflow.search_runs([exp.experiment_id], output_format="list")}
    new = [r for i, r in runs.items() if i not in before]
    parents = [r for r in new if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(new) == 1 + len(plan.nodes)
    parent = parents[0]
    assert parent.info.start_time / 1000 <= t0 + 1 and parent.info.status == "FINISHED"  # when it ran, not when logged
    assert {k: v for k, v in parent.data.tags.items() if k.startswith("stages.")} == {
        f"stages.{p.name}": f"cached {p.key[:12]}" for p in plan
    }
    assert parent.data.params["train_classifier.method"] == "maskclip"
    assert parent.data.params["evaluate.gamma"] == "None"
    assert parent.data.metrics["evaluate/val/hIoU"] == plan.nodes["evaluate"].metrics["val/hIoU"]
    nested = {r.data.tags["stage"]: r for r in new if r is not parent}
    assert set(nested) == set(plan.nodes)
    for p in plan:
        r = nested[p.name]
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["status"] == "cached" and r.data.tags["artifact_key"] == p.key
        manifest = json.loads((work / "store" / p.name / p.key / "manifest.json").read_text())
        producer = runs[r.data.tags["produced_by_run"]]
        assert r.data.tags["produced_by_run"] == manifest["mlflow_run_id"]
        assert producer.data.tags["status"] == "ran" and producer.data.tags["stage"] == p.name
        assert producer.data.tags["artifact_key"] == p.key
        assert r.data.metrics == p.metrics == manifest["metrics"]
    ev = plan.nodes["evaluate"]
    producer = runs[nested["evaluate"].data.tags["produced_by_run"]]
    assert producer.data.params["gamma"] == "None" and "batch_size" not in producer.data.params  # runtime: a tag
    assert producer.data.tags["runtime.batch_size"] == "2"
    assert all(producer.data.metrics[k] == v for k, v in ev.metrics.items())


def test_bad_config_and_selection_errors(tmp_path, capsys):
    from pipeline.cli import main

    base = ["run", "--config", "configs/sample.yaml", "--work-dir", str(tmp_path), "--dry-run"]
    assert main([*base, "--set", "evaluate.gama=1"]) == 2
    assert "did you mean evaluate.gamma" in capsys.readouterr().out
    assert main([*base, "--stages", "evaluate"]) == 2
    assert "not cached" in capsys.readouterr().out
    assert main([*base, "--from", "evaluat"]) == 2
    assert "did you mean 'evaluate'" in capsys.readouterr().out
    # user strings are printed verbatim, never parsed as Rich markup
    assert main([*base, "--set", "evaluate.[/x]=1"]) == 2
    out = capsys.readouterr().out
    assert "unknown key 'evaluate.[/x]'" in out


def test_stage_notes_print_counts_as_integers():
    from pipeline.dag import Stage

    assert (
        Stage().note({"vocabularies": 3.0, "embed_dim": 64.0, "loss": 0.123456})
        == "vocabularies=3, embed_dim=64, loss=0.1235"
    )


def test_metrics_table_fits_an_80_column_job_log():
    """`ray job` logs are 80 columns: every metric name and value must print whole."""
    from rich.console import Console as RichConsole

    from stages.evaluate import metrics_table

    names = ("hIoU", "mIoU_seen", "mIoU_unseen", "mIoU", "pAcc", "mAcc", "zs3_mIoU", "zs3_pAcc")
    metrics = {f"{s}/{m}": 12.3456 + i for s in ("val", "camvid", "context") for i, m in enumerate(names)}
    con = RichConsole(width=80, record=True, file=open("/dev/null", "w"))
    con.print(metrics_table(metrics))
    text = con.export_text()
    for i, m in enumerate(names):
        row = next(line for line in text.splitlines() if f" {m} " in line)
        assert row.count(f"{12.3456 + i:.2f}") == 3, row
    assert "…" not in text


def test_an_invocation_elsewhere_leaves_no_mlruns_there(first_run, tmp_path):
    """MLflow artifacts live with the tracking store, not in ./mlruns of the working directory
    (under `ray job submit` that is a temporary copy that is thrown away)."""
    work, _, _ = first_run
    cmd = [
        sys.executable,
        str(REPO / "pipeline" / "run.py"),
        "--config",
        str(REPO / "configs" / "sample.yaml"),
        "--work-dir",
        str(work),
    ]
    for o in SMALL:
        cmd += ["--set", o]
    out = subprocess.run(
        cmd,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "ZEROSEG_DATA": str(REPO.parent / "shared" / "data")},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where the command ran
    assert (work / "mlartifacts").is_dir()


def test_gc_removes_only_unreferenced_artifacts(first_run):
    """Delete the MLflow runs of one evaluate artifact: gc lists exactly it, --delete removes it,
    and the sample's own artifacts stay cached."""
    from pipeline.cli import main

    work, _, _ = first_run
    code, plan = _run(work, overrides=["evaluate.gamma=0.25"])
    assert code == 0
    orphan = plan.nodes["evaluate"].key
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("zeroseg-sample")
    for r in client.search_runs([exp.experiment_id], filter_string=f"tags.artifact_key = '{orphan}'"):
        client.delete_run(r.info.run_id)
    args = ["gc", "--config", "configs/sample.yaml", "--work-dir", str(work), *sum((["--set", o] for o in SMALL), [])]
    assert main(args) == 0 and (work / "store" / "evaluate" / orphan).is_dir()  # younger than the grace period
    args += ["--grace", "0"]
    assert main(args) == 0
    assert (work / "store" / "evaluate" / orphan).is_dir()  # listing deletes nothing
    before = {p.parent.name for p in (work / "store").glob("*/*/manifest.json")}
    assert main([*args, "--delete"]) == 0
    after = {p.parent.name for p in (work / "store").glob("*/*/manifest.json")}
    assert before - after == {orphan}
    code, plan = _run(work)
    assert code == 0 and set(_status(plan).values()) == {"cached"}
