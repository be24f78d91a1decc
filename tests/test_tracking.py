"""MLflow tracking: runs of killed invocations are marked KILLED, a re-run stage continues its own
run, artifacts live with the tracking store."""

import os
import subprocess
import sys

import mlflow
import pytest

from pipeline import tracking


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.setup(uri, "t")
    yield uri, exp
    while mlflow.active_run():
        mlflow.end_run()


def _dead_pid() -> int:
    return int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )


def test_experiment_artifacts_live_beside_the_tracking_store(store, tmp_path):
    uri, exp = store
    assert mlflow.get_experiment(exp).artifact_location == (tmp_path / "mlartifacts").resolve().as_uri()


def test_runs_of_killed_invocations_are_marked_killed(store):
    uri, exp = store
    client = mlflow.tracking.MlflowClient()
    killed = client.create_run(
        exp,
        tags={
            tracking.HOST_TAG: __import__("socket").gethostname(),
            tracking.PID_TAG: str(_dead_pid()),
            tracking.PID_START_TAG: "1.0",
        },
    )
    alive_tags = tracking._process_tags()  # this process: alive
    alive = client.create_run(exp, tags=alive_tags)
    elsewhere = client.create_run(exp, tags={tracking.HOST_TAG: "another-host", tracking.PID_TAG: "1"})
    assert tracking.reap_dead_runs(exp) == 1
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(elsewhere.info.run_id).info.status == "RUNNING"  # cannot tell: left alone


def test_a_rerun_stage_continues_its_unfinished_run(store):
    key = "k" * 64
    with tracking.parent_run("first", {}):
        with pytest.raises(RuntimeError):
            with tracking.stage_run("train_classifier", key, {"lr": 0.1}, {"train.log_every": 5}, resume=True) as rid:
                tracking.log_metrics({"train/loss": 1.0})
                raise RuntimeError("killed")
    assert mlflow.get_run(rid).info.status == "FAILED"
    with tracking.parent_run("second", {}) as parent2:
        with tracking.stage_run("train_classifier", key, {"lr": 0.1}, {"train.log_every": 1}, resume=True) as rid2:
            tracking.log_metrics({"train/loss": 0.5})
    assert rid2 == rid
    run = mlflow.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == parent2
    assert run.data.tags["runtime.train.log_every"] == "1"  # runtime settings may change: tags, not params
    history = mlflow.tracking.MlflowClient().get_metric_history(rid, "train/loss")
    assert [m.value for m in history] == [1.0, 0.5]
    # a finished run is not reopened: a later attempt at another key gets a new run
    with tracking.parent_run("third", {}):
        with tracking.stage_run("train_classifier", key, {"lr": 0.1}, resume=True) as rid3:
            pass
    assert rid3 != rid


def test_ui_command_names_the_interpreter(store):
    uri, _ = store
    cmd = tracking.ui_command(uri)
    assert cmd.split()[0] in (sys.executable, os.path.relpath(sys.executable))
    assert cmd.endswith(f"-m mlflow ui --backend-store-uri {uri}")


def test_an_invocation_that_runs_nothing_journals_its_records_and_a_flush_logs_them(tmp_path, monkeypatch):
    """A fully cached invocation does not import MLflow: its parent and cached stage runs go to a
    journal, logged later with their own times (by a detached process, or the next invocation)."""
    import subprocess as sp

    spawned = []
    monkeypatch.setattr(sp, "Popen", lambda cmd, **kw: spawned.append(cmd))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    inv = tracking.Invocation(
        uri, "j", "sample", {"config": "c.yaml"}, {"evaluate.": {"gamma": 0.5}}, tmp_path / "journal", start_time=1000.0
    )
    inv.cached("evaluate", "e" * 64, {"gamma": 0.5}, {"batch_size": 2}, {"produced_by_run": "abc"}, {"val/hIoU": 12.5})
    inv.finish({"stages.evaluate": "cached eeeeeeeeeeee"}, {"evaluate/val/hIoU": 12.5}, failed=False)
    assert not inv.opened and len(list((tmp_path / "journal").glob("*.json"))) == 1
    assert spawned and spawned[0][1:4] == ["-m", "pipeline.tracking", "flush"]
    assert tracking.flush_journal(tmp_path / "journal", uri) == 1
    assert not list((tmp_path / "journal").glob("*.json"))
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["j"], output_format="list")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if r is not parent)
    assert parent.info.start_time == 1_000_000 and parent.info.status == "FINISHED"
    assert parent.data.params == {"evaluate.gamma": "0.5"} and parent.data.metrics == {"evaluate/val/hIoU": 12.5}
    assert parent.data.tags["stages.evaluate"] == "cached eeeeeeeeeeee"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.data.tags["status"] == "cached"
    assert child.data.tags["produced_by_run"] == "abc" and child.data.tags["runtime.batch_size"] == "2"
    assert child.data.params == {"gamma": "0.5"} and child.data.metrics == {"val/hIoU": 12.5}
    assert tracking.flush_journal(tmp_path / "journal", uri) == 0  # nothing logged twice


def test_headline_params_name_method_clip_split_and_seed():
    hashed = {
        "build_splits": {"split": {"rule": "names", "builtin": None, "unseen": ["cow", "cat"]}, "seed": 0},
        "embed_text": {"clip": {"model": "ViT-B-16;config-sha256:abc", "weights": "openai"}},
        "train_classifier": {"method": "zegclip", "clip": {"model": "other", "weights": "x"}, "train": {"seed": 3}},
        "evaluate": {"gamma": 0.1},
    }
    assert tracking.headline_params(hashed) == {
        "method": "zegclip",
        "clip_model": "ViT-B-16",  # the first stage that takes clip; the digest dropped
        "clip_weights": "openai",
        "split": '{"rule":"names","unseen":["cow","cat"]}',
        "seed": "build_splits.seed=0,train_classifier.train.seed=3",
    }
    hashed["train_classifier"]["train"]["seed"] = 0
    assert tracking.headline_params(hashed)["seed"] == "0"
    # the evaluated model's method: self-trained ZegCLIP, PADing's retrained head
    assert tracking.headline_params({**hashed, "self_train": {"pixels": "unseen_only"}})["method"] == "zegclip+st"
    pading = {**hashed, "train_classifier": {"method": "maskclip"}, "train_generator": {"generator": "primitive"}}
    assert tracking.headline_params(pading)["method"] == "pading"
    # the headline is the catalogue's declaration; a catalogue that declares none gives no params
    from pipeline.catalogue import Catalogue, no_headline

    assert tracking.headline_params(hashed, no_headline) == {} and Catalogue([]).headline is no_headline


def test_every_run_of_an_invocation_carries_the_headline(store, tmp_path):
    uri, exp = store
    inv = tracking.Invocation(
        uri,
        "t",
        "inv",
        {},
        {"evaluate.": {"gamma": 0.1}},
        tmp_path / "journal",
        0.0,
        {"method": "maskclip", "seed": "0"},
    )
    inv.open()
    with inv.stage("evaluate", "k" * 64, {"gamma": 0.1}, {}):
        pass
    inv.finish({}, {"evaluate/val/hIoU": 12.5}, failed=False)
    client = mlflow.tracking.MlflowClient()
    parent = client.get_run(inv.run_id)
    assert parent.data.params["method"] == "maskclip" and parent.data.params["evaluate.gamma"] == "0.1"
    assert parent.data.metrics["evaluate/val/hIoU"] == 12.5
    (child,) = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{inv.run_id}'")
    assert child.data.params == {"method": "maskclip", "seed": "0", "gamma": "0.1"}


def test_tracking_stores_only_this_machine_reaches():
    from pipeline.cluster import machine_local_tracking

    local = [
        "sqlite:////w/mlflow.db",
        "file:///w/mlruns",
        "work/mlruns",
        "http://127.0.0.1:5000",
        "http://localhost:5000",
    ]
    local += ["http://127.0.0.5:80", "http://[::1]:5000"]  # all of 127/8 and ::1 are loopback (RFC 5735, RFC 4291)
    remote = ["http://10.0.1.23:5000", "https://mlflow.example.org", "postgresql://db.example.org/mlflow", "databricks"]
    assert [u for u in local if not machine_local_tracking(u)] == []
    assert [u for u in remote if machine_local_tracking(u)] == []


def test_run_tracking_server_choices(tmp_path, monkeypatch):
    """run.tracking_server: a config error beside run.tracking_uri; ZEROSEG_TRACKING_URI (a cluster's
    server) wins, with a NOTE; an invocation that logs nothing (every stage cached) starts no server.
    (tests/test_pipeline_sample.py runs one.)"""
    import io

    from pipeline.config import load_config
    from pipeline.console import Console
    from pipeline.errors import ConfigError
    from pipeline.invocation import tracking_store

    sample = "configs/sample.yaml"
    with pytest.raises(ConfigError, match=r"set one of run\.tracking_server and run\.tracking_uri"):
        load_config(sample, ["run.tracking_server=true", "run.tracking_uri=http://10.0.1.23:5000"])
    cfg = load_config(sample, ["run.tracking_server=true", f"run.work_dir={tmp_path}"])
    out = io.StringIO()
    with tracking_store(cfg, Console(file=out), tmp_path / "logs", needed=False) as uri:
        assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert "every stage is cached: no tracking server started" in out.getvalue()
    monkeypatch.setenv("ZEROSEG_TRACKING_URI", "http://10.0.1.23:5000")
    with tracking_store(cfg, Console(file=out), tmp_path / "logs") as uri:
        assert uri == "http://10.0.1.23:5000"
    assert "NOTE: run.tracking_server not started: ZEROSEG_TRACKING_URI names the tracking server" in out.getvalue()
    assert not (tmp_path / "logs").exists()  # no server log: none was started


def test_a_relative_work_dir_under_ray_job_submit_gets_a_note(tmp_path, monkeypatch):
    import json

    from pipeline.cluster import RAY_JOB_CONFIG_ENV, job_copy_notes
    from pipeline.config import load_config

    cfg = load_config("configs/sample.yaml", [f"run.work_dir={tmp_path / 'elsewhere'}"])
    rel = load_config("configs/sample.yaml", ["run.work_dir=work/sample"])
    monkeypatch.delenv(RAY_JOB_CONFIG_ENV, raising=False)
    assert job_copy_notes(rel) == []  # not a job
    copy = tmp_path / "copy"  # the job's working-dir copy: the driver's cwd
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv(RAY_JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    (note,) = job_copy_notes(rel)
    assert f"the work dir {copy / 'work' / 'sample'} is inside this job's copy" in note and "ZEROSEG_WORK" in note
    assert job_copy_notes(cfg) == []
