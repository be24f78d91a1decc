"""Ray Tune sweeps (pipeline/sweep/): the sweep file, the shared prefix, aggregation over seeds,
and a real 4-trial ASHA sweep of the sample (evaluate-only: gamma) that is interrupted after a
trial and continued."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.sweep import ConfigResult, aggregate, load_sweep, probe_overrides, shared_nodes

REPO = Path(__file__).resolve().parent.parent
#: the sample cut down as the other sample tests do (12 training images, 2 CamVid frames)
SAMPLE_OVERRIDES = ["build_splits.train.max_images=12", "build_splits.eval.0.max_images=2", "evaluate.batch_size=2"]


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "sweep.yaml"
    p.write_text(text)
    return p


def test_sweep_file_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"sweep\.schedular.*did you mean sweep\.scheduler"):
        load_sweep(_write(tmp_path, "name: a\nspace: {evaluate.gamma: {grid: [0.1]}}\nschedular: none\n"))
    with pytest.raises(ConfigError, match="loguniform: low must be > 0"):
        load_sweep(_write(tmp_path, "name: a\nspace: {train_classifier.train.lr: {loguniform: [0, 1]}}\n"))
    with pytest.raises(ConfigError, match="exactly one of grid, choice, uniform, loguniform"):
        load_sweep(_write(tmp_path, "name: a\nspace: {evaluate.gamma: {grid: [0.1], choice: [0.2]}}\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml")


def test_sweep_defaults_come_from_the_catalogue(tmp_path):
    """What a sweep file does not say is the stage catalogue's (SWEEP_DEFAULTS); with a neutral
    catalogue a file names its metric, and its seed key when it has seeds."""
    from pipeline.catalogue import SweepDefaults, load_catalogue
    from pipeline.sweep import experiment_id

    text = "name: a\nspace: {evaluate.gamma: {grid: [0.1]}}\nseeds: [0, 1]\n"
    sw = load_sweep(_write(tmp_path, text))  # the project's catalogue
    assert load_catalogue().sweep_defaults == SweepDefaults(
        "evaluate/{eval_set}/hIoU", "max", "val", "train_classifier.train.seed"
    )
    assert (sw.target, sw.mode, sw.eval_set, sw.seed_key) == (
        "evaluate/val/hIoU",
        "max",
        "val",
        "train_classifier.train.seed",
    )
    # the defaults enter the sweep's dump as if the file had said them (the experiment id is the same)
    said = load_sweep(_write(tmp_path, text + "eval_set: val\nmode: max\nseed_key: train_classifier.train.seed\n"))
    assert said.model_dump() == sw.model_dump()
    from pipeline.config import load_config

    cfg = load_config("configs/sample.yaml")
    assert experiment_id(cfg, said) == experiment_id(cfg, sw)
    neutral = SweepDefaults()
    with pytest.raises(ConfigError, match="no metric to rank trials on"):
        load_sweep(_write(tmp_path, "name: a\nspace: {evaluate.gamma: {grid: [0.1]}}\n"), neutral)
    with pytest.raises(ConfigError, match="seeds without seed_key"):
        load_sweep(_write(tmp_path, text + "metric: evaluate/val/mIoU\n"), neutral)
    own = load_sweep(_write(tmp_path, text + "metric: toy/score\nmode: min\nseed_key: toy.seed\n"), neutral)
    assert (own.target, own.mode, own.eval_set, own.seed_key) == ("toy/score", "min", None, "toy.seed")
    other = SweepDefaults(metric="score/{eval_set}", eval_set="held_out", mode="min")
    assert load_sweep(_write(tmp_path, "name: a\nspace: {x.y: {grid: [1]}}\n"), other).target == "score/held_out"


def test_shipped_sweep_files_load():
    names = sorted(p.name for p in (REPO / "configs" / "sweeps").glob("*.yaml"))
    assert names == [
        "pading_weight_primitives.yaml",
        "sample_gamma.yaml",
        "zegclip_prompt_lr.yaml",
        "zegformer_gamma_lambda.yaml",
    ]
    for n in names:
        sw = load_sweep(REPO / "configs" / "sweeps" / n)
        assert sw.target == f"evaluate/{sw.eval_set}/hIoU"


def test_asha_on_a_training_loss_has_its_rungs_in_that_stages_steps():
    import yaml

    from pipeline.sweep import asha_scheduler

    sw = load_sweep(REPO / "configs" / "sweeps" / "zegclip_prompt_lr.yaml")  # the shipped one: loss, min
    assert (sw.asha_metric, sw.asha.grace_period, sw.asha.reduction_factor) == ("train_classifier/loss", 2000, 3)
    sections = yaml.safe_load((REPO / "configs" / "voc_zegclip.yaml").read_text())  # train_classifier: 20000 steps
    asha = asha_scheduler(sw, sections)
    assert (asha._time_attr, asha._metric, asha._mode, asha._max_t) == (
        "train_classifier/step",
        "train_classifier/loss",
        "min",
        20000,
    )
    # grace 2000, reduction factor 3: rungs at 2000, 6000, 18000 steps (a rung below max_t each)
    assert sorted(m for m, _ in asha._brackets[0]._rungs) == [2000, 6000, 18000]
    with pytest.raises(ConfigError, match="train_generator"):
        asha_scheduler(sw.model_copy(update={"asha_metric": "train_generator/loss"}), sections)


def _plans(config: str, sweep_text: str, tmp_path, extra=()):
    from pipeline.catalogue import load_catalogue
    from pipeline.config import load_config
    from pipeline.plan import plan

    cat = load_catalogue()
    sw = load_sweep(_write(tmp_path, sweep_text))
    base = plan(load_config(REPO / config, [*SAMPLE_OVERRIDES, *extra]), cat.stages, checks=False)
    probes = [
        plan(load_config(REPO / config, [*SAMPLE_OVERRIDES, *extra, *ovs]), cat.stages, checks=False)
        for ovs in probe_overrides(sw)
    ]
    return shared_nodes([base, *probes])


@pytest.mark.parametrize(
    "sweep, config, shared",
    [
        (
            "zegformer_gamma_lambda",
            "configs/sample_zegformer.yaml",
            ["build_splits", "embed_text", "pretrain_proposals"],
        ),
        ("zegclip_prompt_lr", "configs/sample_zegclip.yaml", ["build_splits", "embed_text"]),
        (
            "pading_weight_primitives",
            "configs/sample_pading.yaml",
            ["build_splits", "embed_text", "pretrain_proposals", "extract_features"],  # no train_classifier
        ),
    ],
)
def test_shipped_sweeps_plan_against_their_methods(sweep, config, shared, tmp_path):
    # the sample configs of the same methods: every searched key exists, and what runs once
    text = (REPO / "configs" / "sweeps" / f"{sweep}.yaml").read_text()
    sw = load_sweep(_write(tmp_path, text))
    assert _plans(config, text, tmp_path, extra=sw.set) == shared


def test_the_zegformer_sweep_tunes_on_seen_classes_of_coco_stuff(monkeypatch, tmp_path):
    """ZegFormer Sec. 4.1 (SPNet's cross-validation): planned against the config it is for, the
    sweep's split holds out SPNet's 12 seen validation classes and excludes the 15 unseen ones."""
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.build_splits import named_split, validation_split
    from stages.catalog import STAGES
    from zeroseg.data.builtin_splits import COCO_STUFF_171, COCO_STUFF_SPNET_VAL, COCO_STUFF_UNSEEN

    class EverythingCached:  # no stage's data checks: the benchmark's data is not on this machine
        def exists(self, stage, key):
            return True

        def latest(self, stage):
            return None

    monkeypatch.setenv("ZEROSEG_DATA", str(tmp_path))
    sw = load_sweep(REPO / "configs" / "sweeps" / "zegformer_gamma_lambda.yaml")
    p = plan(
        load_config(REPO / "configs" / "coco_stuff_zegformer.yaml", list(sw.set)), STAGES, store=EverythingCached()
    )
    bs = p.nodes["build_splits"].config
    assert bs.eval == [] and 0 < bs.val_fraction < 1  # the test set "val" gives way to the held-out images
    vocab, excluded = validation_split(bs, named_split(bs, list(COCO_STUFF_171)))
    assert (len(vocab.names), len(vocab.seen), len(vocab.unseen)) == (171 - 15, 156 - 12, 12)
    assert set(vocab.unseen_names) == set(COCO_STUFF_SPNET_VAL)
    assert {COCO_STUFF_171[i] for i in excluded} == set(COCO_STUFF_UNSEEN) and not set(vocab.names) & set(
        COCO_STUFF_UNSEEN
    )


def test_the_shared_prefix_is_what_no_searched_value_rekeys(tmp_path):
    # gamma is read by evaluate only: everything before it is shared by every trial
    assert _plans("configs/sample.yaml", "name: a\nspace: {evaluate.gamma: {uniform: [0, 0.5]}}\n", tmp_path) == [
        "build_splits",
        "embed_text",
        "train_classifier",
    ]
    # the templates re-key embed_text and, through its key, everything after it
    text = "name: a\nspace: {embed_text.templates: {choice: [single, ensemble15]}}\n"
    assert _plans("configs/sample.yaml", text, tmp_path) == ["build_splits"]
    # a seed of the splits: nothing is shared
    text = "name: a\nspace: {evaluate.gamma: {grid: [0.1]}}\nseeds: [0, 1]\nseed_key: build_splits.seed\n"
    assert _plans("configs/sample.yaml", text, tmp_path) == []


def test_seeds_aggregate_into_mean_and_sample_std():
    rows = [
        {"trial_id": "a", "params": {"g": 0.1}, "seed": 0, "metrics": {"m": 10.0}},
        {"trial_id": "b", "params": {"g": 0.1}, "seed": 1, "metrics": {"m": 14.0}},
        {"trial_id": "c", "params": {"g": 0.1}, "seed": 2, "metrics": {"m": 12.0}},
        {"trial_id": "d", "params": {"g": 0.2}, "seed": 0, "metrics": {"m": 20.0}},
        {"trial_id": "e", "params": {"g": 0.2}, "seed": 1, "metrics": {}},  # errored: left out
    ]
    best, other = aggregate(rows, "m", "max")
    assert best.params == {"g": 0.2} and best.values == [20.0] and math.isnan(best.std)
    # by hand: mean 12, sample variance ((-2)^2 + 2^2 + 0) / 2 = 4, std 2
    assert (other.mean, other.std, other.seeds, other.trials) == (12.0, 2.0, [0, 1, 2], ["a", "b", "c"])
    assert [g.params for g in aggregate(rows, "m", "min")] == [{"g": 0.1}, {"g": 0.2}]
    assert isinstance(best, ConfigResult)


def test_a_nan_trial_and_a_failed_trial_are_left_out_of_the_aggregate():
    """Trial rows built from a Tune result grid (stand-ins) with a failed trial, a NaN metric and
    an infinite one, a trial ASHA stopped and one an interruption left unfinished; expected
    values by hand."""
    import numpy as np

    from pipeline.sweep.results import trial_rows

    def result(tid, g, seed, metrics, error=None):
        return types.SimpleNamespace(
            config={"params": {"evaluate.gamma": np.float64(g)}, "seed": seed},
            metrics={"trial_id": tid, **metrics},
            path=f"/exp/trial_{tid}",
            error=error,
        )

    m = "evaluate/val/hIoU"
    grid = [
        result("a0", 0.1, 0, {m: 30.0}),
        result("a1", 0.1, 1, {m: float("nan")}),  # diverged: NaN
        result("a2", 0.1, 2, {m: 50.0}),
        result("a3", 0.1, 3, {}, error=RuntimeError("CUDA out of memory\nTraceback ...")),
        result("b0", 0.2, 0, {m: 35.0}),
        result("b1", 0.2, 1, {m: float("inf")}),
        result("b2", 0.2, 2, {"train_classifier/step": 4, "done": True}),  # ASHA stopped it
        result("c0", 0.3, 0, {m: float("nan")}),
        result("c1", 0.3, 1, {}),  # interrupted
        result("d0", 0.4, 0, {m: 40}),  # an int metric
    ]
    rows = trial_rows(grid, m)
    assert [r["status"] for r in rows] == [
        "finished",
        "finished",
        "finished",
        "error",
        "finished",
        "finished",
        "stopped",
        "finished",
        "unfinished",
        "finished",
    ]
    assert rows[3]["error"] == "CUDA out of memory" and rows[0]["error"] is None
    assert rows[0]["params"] == {"evaluate.gamma": 0.1} and type(rows[0]["params"]["evaluate.gamma"]) is float
    assert rows[2]["trial_id"] == "a2" and rows[2]["seed"] == 2
    res = aggregate(rows, m, "max")
    # by hand: gamma 0.1 keeps seeds 0 and 2 (30, 50): mean 40, sample std sqrt((10^2 + 10^2) / 1)
    # = 14.142...; gamma 0.2 keeps seed 0 only (35, std NaN); 0.3 has no finite value (absent);
    # 0.4: 40. Best first by mean, ties in the order seen: 0.1 (40), 0.4 (40), 0.2 (35)
    assert [g.params["evaluate.gamma"] for g in res] == [0.1, 0.4, 0.2]
    a, d, b = res
    assert (a.values, a.seeds, a.trials, a.mean) == ([30.0, 50.0], [0, 2], ["a0", "a2"], 40.0)
    assert a.std == pytest.approx(200**0.5, rel=1e-12)
    assert (b.values, b.mean) == ([35.0], 35.0) and math.isnan(b.std)
    assert d.values == [40.0] and type(d.values[0]) is float
    assert [g.params["evaluate.gamma"] for g in aggregate(rows, m, "min")] == [0.2, 0.1, 0.4]
    assert aggregate(rows, "no/such/metric", "max") == []
    assert math.isnan(ConfigResult({}, [], [], []).mean)


def _sweep_cli(work: Path, sweep: str, *extra: str, interrupt: bool = False, env=None) -> tuple[int, str]:
    """``python pipeline/run.py sweep`` (the ``ray job submit`` entry) on the cut-down sample, in
    a subprocess with its own embedded Ray cluster; with ``interrupt``, a SIGINT (Ctrl-C) as soon
    as the first trial has completed."""
    cmd = [
        sys.executable,
        str(REPO / "pipeline" / "run.py"),
        "sweep",
        "--config",
        str(REPO / "configs" / "sample.yaml"),
    ]
    cmd += ["--sweep", sweep, "--work-dir", str(work), *extra]
    for o in SAMPLE_OVERRIDES:
        cmd += ["--set", o]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": "", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if interrupt and re.match(r"\s+trial \S+ .*: evaluate/val/hIoU", line):
            proc.send_signal(signal.SIGINT)  # Tune saves the experiment and stops
            interrupt = False
    return proc.wait(timeout=600), "".join(lines)


@pytest.fixture(scope="module")
def sample_sweep(tmp_path_factory, shared_data):
    """The 4-trial ASHA sweep of configs/sweeps/sample_gamma.yaml on the sample, interrupted
    (Ctrl-C) once its first trial has completed, then run again: ``(work, first, second)`` with
    each invocation's (exit status, output, finished trial ids in MLflow)."""
    work = tmp_path_factory.mktemp("sweep")
    sweep = str(REPO / "configs" / "sweeps" / "sample_gamma.yaml")
    outs = []
    for interrupt in (True, False):
        code, out = _sweep_cli(work, sweep, interrupt=interrupt)
        runs = _runs(work)
        trials = runs[runs["tags.zeroseg.trial_id"].notna() & (runs["status"] == "FINISHED")]
        outs.append((code, out, set(trials["tags.zeroseg.trial_id"])))
    return work, outs


def _runs(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True)


def test_sample_sweep_runs_the_shared_upstream_once_and_resumes(sample_sweep):
    work, ((code1, out1, done_first), (code2, out2, done)) = sample_sweep
    assert code1 == 130 and "interrupted" in out1, out1[-3000:]
    # completed before the interruption = Tune had the trial's final result (its progress line);
    # a trial whose MLflow run had just finished but whose result Tune had not taken yet when the
    # Ctrl-C came is unfinished for Tune, and rightly runs again
    completed_first = set(re.findall(r"^\s+trial (\S+) .*: evaluate/val/hIoU", out1, re.M))
    assert 1 <= len(completed_first) < 4 and completed_first <= done_first, (completed_first, done_first)
    assert code2 == 0 and "continuing the experiment" in out2, out2[-3000:]
    summary = json.loads((work / "sweeps" / "sample_gamma" / "sweep_summary.json").read_text())
    rows = summary["trials"]
    assert sorted(r["params"]["evaluate.gamma"] for r in rows) == [0.0, 0.1, 0.2, 0.3]
    assert {r["status"] for r in rows} == {"finished"} and {r["trial_id"] for r in rows} == done

    runs = _runs(work)
    stage_runs = runs[runs["tags.stage"].notna()]
    ran = stage_runs[stage_runs["tags.status"] == "ran"]["tags.stage"].value_counts().to_dict()
    # splits, embeddings and the (training-free) classifier once for the whole sweep; evaluate per trial
    assert ran == {"build_splits": 1, "embed_text": 1, "train_classifier": 1, "evaluate": 4}
    trial_runs = runs[runs["tags.zeroseg.trial_id"].notna()]
    # a trial that completed before the interruption was not run again: one MLflow run each
    counts = trial_runs["tags.zeroseg.trial_id"].value_counts().to_dict()
    assert all(counts[t] == 1 for t in completed_first), counts
    # every trial's run is nested under the sweep's (one) run, and names the method beside its hIoU
    sweep_runs = runs[runs["tags.zeroseg.kind"] == "sweep"]
    assert len(sweep_runs) == 1 and sweep_runs["status"].iloc[0] == "FINISHED"
    assert set(trial_runs["tags.mlflow.parentRunId"]) == {sweep_runs["run_id"].iloc[0]}
    evaluate_runs = stage_runs[stage_runs["tags.stage"] == "evaluate"]
    assert set(evaluate_runs["params.method"]) == {"maskclip"}
    assert set(trial_runs["params.method"]) == {"maskclip"}

    # each trial evaluated its own gamma: the reported hIoU is the one in the evaluate artifact
    # whose manifest holds that gamma
    by_gamma = {}
    for m in (work / "store" / "evaluate").glob("*/manifest.json"):
        man = json.loads(m.read_text())
        by_gamma[man["config"]["gamma"]] = man["metrics"]["val/hIoU"]
    assert len(by_gamma) == 4
    for r in rows:
        assert r["metrics"]["evaluate/val/hIoU"] == pytest.approx(by_gamma[r["params"]["evaluate.gamma"]])
    assert summary["configurations"][0]["mean"] == pytest.approx(max(by_gamma.values()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(pred, what: str, seconds: float = 120):
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if pred():
            return
        time.sleep(1)
    pytest.fail(f"{what} did not happen within {seconds:.0f} s")


@pytest.fixture
def two_nodes(tmp_path):
    """A Ray head with its dashboard (the job server of `ray job submit`) and a second node
    (`ray start`, own ports, token auth as a real cluster runs it), each with one `trial_slot` and
    a resource naming it, plus a real `mlflow server` whose artifacts go to a folder both reach.
    Yields (env for clients, the job server's URL, tracking URI, artifact dir)."""
    import contextlib
    import secrets
    import shutil
    import tempfile
    import time

    from pipeline.tracking import TrackingServer

    bindir = Path(sys.executable).parent
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    gcs, dashboard = _free_port(), _free_port()
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_raylet_start_wait_time_s": "180",  # a loaded 2-core CI machine
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    # own temp dirs: the cluster's address file and sessions stay out of /tmp/ray, where ray.init()
    # of other processes on this machine would find them (short: socket path limits); one per node,
    # as on separate machines: a node's runtime-env agent deletes unused working-dir copies in its
    # temp dir, and in a shared one it deleted the job driver's copy on the head
    ray_tmps = [tempfile.mkdtemp(prefix="zs-ray-", dir="/tmp") for _ in range(2)]
    procs, logs = [], []

    def start(args, name):
        log = tmp_path / f"{name}.log"
        logs.append(log)
        procs.append(
            subprocess.Popen(args, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        )

    # the cluster's tracking server (cluster.yaml's head runs one): runs in sqlite, artifacts
    # served through it into a folder; started first, it boots while Ray does
    artifacts = tmp_path / "mlartifacts"
    server = TrackingServer(
        f"sqlite:///{tmp_path / 'server.db'}", artifacts.as_uri(), tmp_path / "mlflow.log", serve_artifacts=True
    ).launch()
    try:
        common = ["--block", "--num-cpus=2", "--disable-usage-stats"]
        start(
            [
                str(bindir / "ray"),
                "start",
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-agent-listen-port={_free_port()}",
                '--resources={"trial_slot": 1, "node_head": 1}',
                f"--temp-dir={ray_tmps[0]}",
                *common,
            ],
            "head",
        )
        _wait_for(lambda: "Ray runtime started" in logs[0].read_text(), "ray start --head", 240)
        start(
            [
                str(bindir / "ray"),
                "start",
                f"--address=127.0.0.1:{gcs}",
                f"--dashboard-agent-listen-port={_free_port()}",
                '--resources={"trial_slot": 1, "node_second": 1}',
                f"--temp-dir={ray_tmps[1]}",
                *common,
            ],
            "second",
        )
        uri = server.wait_ready()
        _wait_for(lambda: "Ray runtime started" in logs[1].read_text(), "the second node's ray start", 240)
        time.sleep(2)  # the second node registers with the head
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, f"http://127.0.0.1:{dashboard}", uri, artifacts
    finally:
        for p in procs:  # all at once: a Ray node drains for up to 30 s on SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        server.stop()
        deadline = time.time() + 20
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)
        for d in ray_tmps:
            shutil.rmtree(d, ignore_errors=True)


def _job_submit(env: dict, address: str, runtime_env: dict, *entrypoint: str) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir <repo>`` of ``entrypoint``, waiting for the job's end
    (its output is the job's log). A submission refused because the head's job agent is not up yet
    (the job server answers before it) is tried again."""
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address]
    cmd += ["--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
    deadline = time.time() + 120
    while True:
        env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # the CLI's address is --address
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode == 0 or "submitted successfully" in r.stdout + r.stderr or time.time() > deadline:
            return r
        time.sleep(2)


@pytest.mark.slow
def test_two_node_sweep(two_nodes, sample_sweep, tmp_path, shared_data):
    env, job_server, tracking_uri, artifacts = two_nodes
    # a plain local path cannot be the store of a 2-node cluster
    cmd = [sys.executable, str(REPO / "pipeline" / "run.py"), "--config", str(REPO / "configs" / "sample.yaml")]
    cmd += ["--work-dir", str(tmp_path / "plain"), *(x for o in SAMPLE_OVERRIDES for x in ("--set", o))]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 2 and "is a local path, but this Ray cluster has 2 nodes" in r.stdout, r.stdout[-3000:]

    # `ray job submit` of `zeroseg sweep` as docs/cluster.md does it: the driver runs on the head in
    # a copy of the repository (relative config path), data, work dir and tracking server from the
    # job's environment; seeds 0 and 1 of the splits, one trial per node (each has one trial_slot)
    sweep = tmp_path / "two_nodes.yaml"
    sweep.write_text(
        "name: two_nodes\nspace: {evaluate.gamma: {grid: [0.3]}}\nseeds: [0, 1]\nseed_key: build_splits.seed\n"
        "scheduler: none\nresources: {CPU: 0.25, trial_slot: 1}\n"
    )
    store = tmp_path / "shared" / "store"  # file://: storage every node mounts
    job_env = {
        "ZEROSEG_DATA": str(shared_data),
        "ZEROSEG_WORK": str(tmp_path / "work"),
        "ZEROSEG_TRACKING_URI": tracking_uri,
    }
    entry = ["python", "pipeline/run.py", "sweep", "--config", "configs/sample.yaml", "--sweep", str(sweep)]
    entry += ["--store", store.as_uri(), *(x for o in SAMPLE_OVERRIDES for x in ("--set", o))]
    r = _job_submit(env, job_server, {"env_vars": job_env}, *entry)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and re.search(r"Job 'raysubmit_\w+' succeeded", out), out[-4000:]
    assert "ray: connecting to" in out  # the driver joined the cluster it was submitted to
    assert "View run" not in out  # MLflow's own per-run lines stay out of the job's output
    assert re.search(r"sweep two_nodes: evaluate/val/hIoU \(max\)", out), out[-4000:]  # the results table
    summary = json.loads((tmp_path / "work" / "sample" / "sweeps" / "two_nodes" / "sweep_summary.json").read_text())
    rows = summary["trials"]
    assert len(rows) == 2 and len({r["metrics"]["node_id"] for r in rows}) == 2  # both nodes ran a trial
    values = {r["seed"]: r["metrics"]["evaluate/val/hIoU"] for r in rows}
    # the trials' evaluate artifacts are in the file:// store, with the hIoU each trial reported
    stored = sorted(
        json.loads(m.read_text())["metrics"]["val/hIoU"] for m in (store / "evaluate").glob("*/manifest.json")
    )
    assert stored == pytest.approx(sorted(values.values()))
    # seed 0 is the one-node sweep's configuration: the same result
    one_node = json.loads((sample_sweep[0] / "sweeps" / "sample_gamma" / "sweep_summary.json").read_text())
    same = [r for r in one_node["trials"] if r["params"]["evaluate.gamma"] == 0.3]
    assert values[0] == pytest.approx(same[0]["metrics"]["evaluate/val/hIoU"], abs=1e-9)
    # the seeds aggregate: mean and sample std of two values by hand, |a - b| / sqrt(2)
    (conf,) = summary["configurations"]
    assert conf["mean"] == pytest.approx((values[0] + values[1]) / 2)
    if values[0] != values[1]:
        assert conf["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))

    # the runs are on the tracking server, nested under the sweep's run; artifacts in its store
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("zeroseg-sample")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (sweep_run,) = [x for x in runs if x.data.tags.get("zeroseg.kind") == "sweep"]
    assert sweep_run.info.status == "FINISHED"
    trials = [x for x in runs if "zeroseg.trial_id" in x.data.tags]
    assert len(trials) == 2 and {x.data.tags["mlflow.parentRunId"] for x in trials} == {sweep_run.info.run_id}
    assert {x.data.params["seed"] for x in trials} == {"0", "1"}
    assert {x.data.tags["zeroseg.trial_id"] for x in trials} == {r["trial_id"] for r in rows}
    assert list(artifacts.rglob("manifest.json")), "no stage artifact reached the server's artifact store"
    assert list(artifacts.rglob("sweep_summary.json")), "the sweep's summary did not reach the server's artifact store"


def test_compare_ranks_the_sweeps_runs_and_logs_a_report(sample_sweep, tmp_path):
    import io

    import mlflow

    from pipeline.cli import main
    from pipeline.console import Console

    work = sample_sweep[0]
    by_gamma = {}
    for m in (work / "store" / "evaluate").glob("*/manifest.json"):
        man = json.loads(m.read_text())
        by_gamma[man["config"]["gamma"]] = man["metrics"]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    out = tmp_path / "report"
    argv = ["compare", "--tracking-uri", uri, "--experiment", "zeroseg-sample", "--out", str(out), "--top", "2"]
    from pipeline import compare

    runs, _ = compare.find_runs(uri, "zeroseg-sample")
    rows = compare.table(runs, "val", "hIoU")
    assert len(rows) == 4  # the four trials; the shared upstream has no evaluate metrics
    expected = sorted(by_gamma.values(), key=lambda m: -m["val/hIoU"])
    assert [r["hIoU"][0] for r in rows] == pytest.approx([m["val/hIoU"] for m in expected])
    assert [r["mIoU_unseen"][0] for r in rows] == pytest.approx([m["val/mIoU_unseen"] for m in expected])
    assert all(r["n"] == 1 and r["label"].startswith("maskclip gamma=") for r in rows), [
        (r["n"], r["label"]) for r in rows
    ]
    text = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.cli.Console", lambda verbose=False: Console(file=text))
        assert main(argv) == 0
    assert "maskclip gamma=" in text.getvalue() and (out / "report.html").exists()
    assert {p.name for p in out.glob("*.png")} == {"seen_unseen.png", "unseen_per_class.png"}
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`zeroseg.kind` = 'compare'").run_id
    names = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run, "report")}
    assert names == {"report/report.html", "report/seen_unseen.png", "report/unseen_per_class.png"}


# -- intermediate training reports reach Tune; ASHA stops a worse trial mid-training ----------
def _toy_loop(loop) -> None:
    """Least squares y = 2x with an ``offset`` added to every step's loss: a trial with a larger
    offset has the higher loss at every step, by construction."""
    import torch

    if loop.config["wait_for"]:  # start once the other trial's step-2 result reached Tune
        deadline = time.monotonic() + 300
        while not os.path.exists(loop.config["wait_for"]) and time.monotonic() < deadline:
            time.sleep(0.2)
    model = loop.prepare(torch.nn.Linear(1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=loop.lr)
    loop.restore(model, opt)
    for batch in loop.batches("train"):
        x = batch["x"].float().unsqueeze(1)
        loss = torch.nn.functional.mse_loss(model(x), 2 * x) + loop.config["offset"]
        loop.step(loss, images=len(x))


def _toy_trial(config: dict, storage: str, marker: str) -> None:
    """A Tune function trainable as ``pipeline.sweep.trial`` is one: a real fit with one Ray Train
    worker inside ``training_reports``, then one final result of its own. (An in-process fit,
    ``num_workers=0``, cannot run inside a Tune trial: Train V2 refuses ``ray.train.get_context``
    in a Tune session.)"""
    import ray.data
    from ray import tune

    from pipeline.sweep import training_reports
    from pipeline.training import ScalingSection, TrainSection, fit
    from pipeline.training.progress import forward_progress

    def reached_tune(name, record) -> None:  # called after training_reports' tune.report returned
        if config["offset"] == 0 and record.step >= 2:
            Path(marker).touch()

    name = f"toy-{tune.get_context().get_trial_id()}"
    train = TrainSection(max_steps=8, batch_size=2, lr=0.05, log_every=2, checkpoint_every=8, keep_checkpoints=1)
    ds = ray.data.from_items([{"x": float(i) / 8} for i in range(8)])
    loop_config = {"offset": config["offset"], "wait_for": marker if config["offset"] else None}
    scaling = ScalingSection(num_workers=1, resources_per_worker={"CPU": 0.25})
    with training_reports({name: "train_classifier"}), forward_progress(reached_tune):
        res = fit(_toy_loop, loop_config, {"train": ds}, scaling, train, storage, name)
    tune.report({"final/loss": float(res.metrics["loss"]), "final/steps": res.steps})


def _held_placement_groups(before: set[str]) -> set[str]:
    """Ids of the placement groups created since ``before`` that are not REMOVED."""
    import ray.util

    return {k for k, v in ray.util.placement_group_table().items() if k not in before and v.get("state") != "REMOVED"}


def _remove_placement_groups_since(before: set[str]) -> None:
    """Remove what a failed run of the test below left held: its CPUs would starve the later
    2-worker fits of tests/test_training.py (they would wait forever)."""
    import ray.util
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    for pg_id in _held_placement_groups(before):
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(pg_id)))


def test_training_reports_reach_tune_and_asha_stops_the_worse_trial(ray_local, tmp_path, monkeypatch):
    """Two concurrent trials: offset 0, and offset 10 (a higher training loss at every step),
    whose training starts once the first trial's step-2 result has reached Tune.
    The first trial's results are its training reports every log_every=2 steps (step 2, 4, 6, 8
    with their losses), then its final result. ASHA on train_classifier/loss (min, rungs at
    steps 2 and 4) stops the second trial at its first rung (step 2): its loss exceeds the
    first trial's there; it never reaches its final result. The stopped trial's Train worker
    group is released: every placement group the sweep made is REMOVED soon after it ends, and
    the session cluster's CPUs are all free again (the session cluster runs without the
    dashboard, so Ray Train's own state-API cleaner cannot do it: the relay's ``end_run``
    does)."""
    import ray.cloudpickle
    import ray.util
    from ray import tune

    from pipeline.sweep import SweepFile, asha_scheduler, start_ray_data_services

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial actor cannot import tests/
    start_ray_data_services()
    monkeypatch.setenv("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # as run_sweep sets it
    sw = SweepFile.model_validate(
        {
            "name": "toy",
            "space": {"x.offset": {"grid": [0.0]}},
            "metric": "final/loss",
            "mode": "min",
            "asha_metric": "train_classifier/loss",
            "asha": {"grace_period": 2, "reduction_factor": 2},
        }
    )
    scheduler = asha_scheduler(sw, {"train_classifier": {"train": {"max_steps": 8}}})
    assert (scheduler._time_attr, scheduler._max_t) == ("train_classifier/step", 8)
    tuner = tune.Tuner(
        tune.with_resources(
            tune.with_parameters(_toy_trial, storage=str(tmp_path / "train"), marker=str(tmp_path / "good-at-2")),
            {"cpu": 0.25},
        ),
        param_space={"offset": tune.grid_search([0.0, 10.0])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=2),
        run_config=tune.RunConfig(name="toy", storage_path=str(tmp_path / "tune"), verbose=0),
    )
    cpus = ray.cluster_resources()["CPU"]
    before = set(ray.util.placement_group_table())
    try:
        grid = tuner.fit()
        deadline = time.monotonic() + 30  # Tune frees its own trial groups asynchronously
        while (_held_placement_groups(before) or ray.available_resources().get("CPU", 0.0) < cpus) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        assert not _held_placement_groups(before), "a trial's placement group is still held after the sweep"
        assert ray.available_resources().get("CPU", 0.0) == pytest.approx(cpus)
    finally:
        _remove_placement_groups_since(before)
    by_offset = {r.config["offset"]: r for r in grid}
    assert not any(r.error for r in grid)
    good, bad = by_offset[0.0].metrics_dataframe, by_offset[10.0].metrics_dataframe

    training = good[good["train_classifier/step"].notna()]
    assert list(training["train_classifier/step"]) == [2, 4, 6, 8]
    assert (training["train_classifier/loss"] >= 0).all() and (training["train_classifier/loss"] < 10).all()
    final = good.iloc[-1]
    assert final["final/steps"] == 8 and math.isnan(final["train_classifier/step"])
    assert list(good["training_iteration"]) == [1, 2, 3, 4, 5]  # 4 training reports, then the final

    assert list(bad["train_classifier/step"]) == [2]  # stopped at the first rung
    assert bad["train_classifier/loss"].iloc[0] >= 10
    assert "final/loss" not in bad or bad["final/loss"].isna().all()


def test_a_sweep_refuses_in_process_training_in_its_trials(shared_data, monkeypatch, tmp_path):
    # Ray Train V2 cannot train in process (num_workers 0) inside a Tune trial: refused before any
    # cluster starts or MLflow run opens, naming the key and the fix
    from pipeline.catalogue import load_catalogue
    from pipeline.config import load_config
    from pipeline.sweep import run_sweep

    monkeypatch.setenv("ZEROSEG_DATA", str(shared_data))
    cfg = load_config(REPO / "configs" / "sample_pading.yaml", [*SAMPLE_OVERRIDES, f"run.work_dir={tmp_path}"])
    sw = load_sweep(REPO / "configs" / "sweeps" / "pading_weight_primitives.yaml")

    class Console:
        def line(self, text):
            pass

    def no_cluster(uri):
        pytest.fail("the cluster must not start")

    with pytest.raises(ConfigError, match=r"train_generator\.scaling\.num_workers is 0.*num_workers=1"):
        run_sweep(cfg, sw, Console(), catalog=load_catalogue(), init_cluster=no_cluster)
    assert not (tmp_path / "mlflow.db").exists()


def test_trial_concurrency_leaves_cpus_for_a_trials_own_stage():
    from pipeline.sweep import trial_concurrency

    # 2 CPUs, trials of 1 CPU whose evaluate needs 1 more: Tune alone would pack 2 trials and
    # neither evaluate could start; (2 - 1) / 1 = 1 trial at a time
    n, why = trial_concurrency(1.0, 1.0, 2.0, None)
    assert n == 1 and "at most 1 trial(s)" in why
    # the sample sweep: 0.25 CPU trials, evaluate 1 CPU: (2 - 1) / 0.25 = 4
    assert trial_concurrency(0.25, 1.0, 2.0, None)[0] == 4
    # a 2-worker training stage (2 x 1 CPU) on 8 CPUs with 1-CPU trials: (8 - 2) / 1 = 6
    assert trial_concurrency(1.0, 2.0, 8.0, None)[0] == 6
    # a requested number is kept; one that cannot fit is warned about, not changed
    assert trial_concurrency(0.25, 1.0, 2.0, 2) == (2, "")
    n, why = trial_concurrency(1.0, 1.0, 2.0, 2)
    assert n == 2 and why.startswith("warning") and "may wait for CPUs forever" in why
    # a trial that cannot run even alone (an autoscaling cluster before it grows): no limit
    # (0), with a warning: a limit fixed now would stay after the cluster grew
    n, why = trial_concurrency(1.0, 4.0, 2.0, None)
    assert n == 0 and "the cluster must grow" in why


def test_stage_cpus_counts_a_tuned_training_stages_workers():
    from types import SimpleNamespace as Ns

    from pipeline.sweep import stage_cpus
    from pipeline.training import ScalingSection

    nodes = [
        Ns(name="build_splits", config=Ns()),
        Ns(name="train_classifier", config=Ns(scaling=ScalingSection(num_workers=3, resources_per_worker={"CPU": 2}))),
        Ns(name="evaluate", config=Ns()),
    ]
    assert stage_cpus(nodes, ["train_classifier", "evaluate"]) == 6.0  # 3 workers x 2 CPU
    assert stage_cpus(nodes, ["evaluate"]) == 1.0  # training shared upstream: evaluate's 1 CPU
    nodes[1].config.scaling = ScalingSection(num_workers=2)
    assert stage_cpus(nodes, ["train_classifier"]) == 2.0  # Ray Train's default: 1 CPU per worker
    nodes[1].config.scaling = ScalingSection(num_workers=4, use_gpu=True)
    assert stage_cpus(nodes, ["train_classifier"]) == 1.0  # GPU workers ask for no CPU by default


def test_a_trial_stopped_during_a_training_report_is_marked_stopped(monkeypatch):
    # Tune stopping a trial surfaces as SystemExit from tune.report in the fit's relay thread:
    # training_reports records it (the trial's MLflow run then says "stopped", not failed) and
    # lets it through (the relay then ends the fit)
    from ray import tune

    from pipeline.sweep import training_reports
    from pipeline.training.metrics import Progress
    from pipeline.training.progress import with_listeners

    def stopped(metrics):
        raise SystemExit(0)

    monkeypatch.setattr(tune, "report", stopped)
    state = {"stopped": False}
    record = Progress(2, 8, 0, 1.5, 0.1, images_per_s=1.0, step_time_s=0.1, data_wait_s=0.0, eta_s=1.0)
    with training_reports({"run-a": "train_classifier"}, state):
        show = with_listeners(lambda r: None, "run-a")
        with pytest.raises(SystemExit):
            show(record)
    assert state["stopped"] is True
    state = {"stopped": False}
    with training_reports({"run-a": "train_classifier"}, state):
        with_listeners(lambda r: None, "run-b")(record)  # another fit's report is not forwarded
    assert state["stopped"] is False
