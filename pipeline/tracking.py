"""MLflow tracking: one parent run per invocation, one nested run per stage.

Params are the hashed part of each stage's config (flattened to dotted keys; what the artifact
key covers), tags carry the artifact key, the stage status (``ran``/``cached``/``failed``), the
runtime settings (``runtime.<key>``: they may differ between attempts, params may not) and, for
cached stages, the MLflow run that produced the artifact. The parent run carries every stage's
params (``<stage>.<key>``) and the evaluation metrics, so MLflow's compare view lines runs up.

Nothing is lost:

* artifacts (manifests, plots, tables) go to the location that belongs to the tracking store
  (``<work_dir>/mlartifacts`` beside a sqlite file, or what an ``mlflow server`` serves), never to
  ``./mlruns`` of whatever directory the command runs in;
* a stage that fails or is killed and then re-run continues in *its* MLflow run (same artifact
  key): training curves go on from the step they reached;
* runs left ``RUNNING`` by a process that was killed (SIGKILL, a lost node) are marked ``KILLED``
  by the next invocation on the same host (:func:`reap_dead_runs`).

MLflow is opened lazily (:class:`Invocation`): importing it and its sqlite store costs about 3 s,
more than everything else a fully cached invocation does. An invocation in which no stage runs
writes its records (the parent run, a ``cached`` run per stage, with their times) to a journal in
the work directory and a detached process logs them (``python -m pipeline.tracking flush``); the
next invocation that opens MLflow logs any journal left first. As soon as a stage has to run, the
invocation opens MLflow and logs what it recorded so far.

The default tracking URI is a sqlite file in the work directory, so nothing has to be started;
``mlflow ui --backend-store-uri <uri>`` shows the runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import flatten

_MAX_PARAM_LEN = 6000
#: MLflow's ``log_batch`` limits per request.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
#: Tags naming the process that owns a RUNNING run (see :func:`reap_dead_runs`).
HOST_TAG, PID_TAG, PID_START_TAG = "zeroseg.host", "zeroseg.pid", "zeroseg.pid_start"


def _mlflow():
    # MLflow prints "View run ... at: <url>" to stdout whenever a run logged through a tracking
    # server ends: library noise in the middle of our output (ours name the runs once)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    import mlflow

    return mlflow


#: The params every run of an invocation carries (:func:`headline_params`), so MLflow's compare
#: view and ``zeroseg compare`` line up a stage's metrics with what produced them.
HEADLINE = ("method", "clip_model", "clip_weights", "split", "seed")


def headline_params(hashed: Mapping[str, Any]) -> dict[str, str]:
    """The resolved config's headline as flat params, from the stages' hashed configs.

    Args:
        hashed: ``{stage: hashed config}`` (a plan's ``components["config"]`` per node).

    Returns:
        ``{"method": .., "clip_model": .., "clip_weights": .., "split": .., "seed": ..}`` with the
        entries the config has: ``method`` from the first stage that names one (``pading`` when
        train_generator is planned, ``<method>+st`` with self_train), the CLIP
        architecture (without its config digest) and weights identity from the first stage
        that takes ``clip``, ``split`` as compact JSON of the set fields of ``build_splits.split``,
        and ``seed``: the one value when every ``seed`` / ``train.seed`` agrees, else
        ``stage.seed=v`` pairs.
    """
    out: dict[str, str] = {}
    seeds: dict[str, Any] = {}
    for stage, cfg in hashed.items():
        if not isinstance(cfg, Mapping):
            continue
        if "method" in cfg and "method" not in out:
            out["method"] = str(cfg["method"])
        clip = cfg.get("clip")
        if isinstance(clip, Mapping) and "clip_model" not in out and "model" in clip:
            out["clip_model"] = str(clip["model"]).split(";", 1)[0]
            out["clip_weights"] = str(clip.get("weights"))
        split = cfg.get("split")
        if isinstance(split, Mapping) and "split" not in out:
            out["split"] = json.dumps({k: v for k, v in split.items() if v is not None}, separators=(",", ":"))
        if "seed" in cfg:
            seeds[f"{stage}.seed"] = cfg["seed"]
        train = cfg.get("train")
        if isinstance(train, Mapping) and "seed" in train:
            seeds[f"{stage}.train.seed"] = train["seed"]
    # the method of the model evaluate scores: a later training stage names it over train_classifier
    if "train_generator" in hashed:
        out["method"] = "pading"
    elif "self_train" in hashed and "method" in out:
        out["method"] += "+st"  # ZegCLIP+ST: the inductive method, self-trained
    if seeds:
        values = set(map(str, seeds.values()))
        out["seed"] = values.pop() if len(values) == 1 else ",".join(f"{k}={v}" for k, v in seeds.items())
    return {k: _clip(v) for k, v in out.items()}


def artifact_root_for(tracking_uri: str) -> str | None:
    """Where runs' artifacts go for a tracking store: ``<dir of the sqlite file>/mlartifacts``
    for ``sqlite:///`` (absolute), None (the server's own default) otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri[len("sqlite:///") :]).resolve().parent.joinpath("mlartifacts").as_uri()
    return None


def setup(tracking_uri: str, experiment: str) -> str:
    """Point MLflow at ``tracking_uri`` and select (creating if needed) ``experiment``, whose
    artifact location lives with the tracking store (:func:`artifact_root_for`).

    Returns:
        the experiment id.
    """
    mlflow = _mlflow()
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    lock = contextlib.nullcontext()
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock = _file_lock(db.with_name(db.name + ".lock"))  # two invocations must not both create the schema
    with lock:
        mlflow.set_tracking_uri(tracking_uri)
        client = mlflow.tracking.MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            try:
                exp_id = client.create_experiment(experiment, artifact_location=artifact_root_for(tracking_uri))
            except mlflow.exceptions.MlflowException:  # created concurrently by another invocation
                exp_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            exp_id = exp.experiment_id
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) while the context lasts."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _process_tags() -> dict[str, str]:
    import psutil

    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PID_START_TAG: f"{psutil.Process().create_time():.3f}",
    }


def _process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that owns a run is alive: True/False on this host, None elsewhere."""
    import psutil

    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return None
    try:
        return abs(psutil.Process(int(tags[PID_TAG])).create_time() - float(tags.get(PID_START_TAG, 0))) < 1.0
    except (psutil.NoSuchProcess, ValueError):
        return False


def reap_dead_runs(experiment_id: str) -> int:
    """Mark ``KILLED`` the RUNNING runs of ``experiment_id`` whose owning process (this host)
    is gone. Returns how many were marked."""
    mlflow = _mlflow()
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    n = 0
    for r in runs:
        if _process_alive(r.data.tags) is False:
            client.set_terminated(r.info.run_id, status="KILLED")
            n += 1
    return n


@contextlib.contextmanager
def parent_run(name: str, tags: dict[str, str], start_time: float | None = None) -> Iterator[str]:
    """The invocation's parent run (started at ``start_time``, epoch seconds, when given); yields
    its run id. Marked FAILED if the body raises."""
    mlflow = _mlflow()
    tags = {**tags, **_process_tags()}
    if start_time is None:
        ctx = mlflow.start_run(run_name=name, tags=tags)
    else:
        run = mlflow.tracking.MlflowClient().create_run(
            _active_experiment(), start_time=int(start_time * 1000), tags=tags, run_name=name
        )
        ctx = mlflow.start_run(run_id=run.info.run_id)
    with ctx as run:
        yield run.info.run_id


def _active_experiment() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id()


def _resumable_run(stage: str, key: str) -> str | None:
    """The stage run of an earlier attempt at the same artifact that did not finish (FAILED,
    KILLED, or RUNNING with its process gone), to continue in; None if there is none."""
    mlflow = _mlflow()
    active = mlflow.active_run()
    if active is None:
        return None
    client = mlflow.tracking.MlflowClient()
    runs = client.search_runs(
        [active.info.experiment_id],
        filter_string=f"tags.artifact_key = '{key}' and tags.stage = '{stage}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for r in runs:
        if r.data.tags.get("status") == "cached":
            continue
        if r.info.status in ("FAILED", "KILLED") or (
            r.info.status == "RUNNING" and _process_alive(r.data.tags) is False
        ):
            return r.info.run_id
    return None


@contextlib.contextmanager
def stage_run(
    stage: str,
    key: str,
    hashed: Any,
    runtime: Mapping[str, Any] | None = None,
    *,
    resume: bool = False,
    headline: Mapping[str, str] | None = None,
) -> Iterator[str]:
    """A nested run for one stage under the active parent; yields its run id.

    Args:
        hashed: the hashed config (logged as params).
        runtime: runtime settings (logged as ``runtime.<key>`` tags).
        resume: continue the unfinished run of an earlier attempt at the same key, if any
            (re-parented under the current invocation).
        headline: the invocation's :func:`headline_params`, logged as params too (where the
            stage's own config has no key of that name), so e.g. evaluate's run names the method.
    """
    mlflow = _mlflow()
    parent = mlflow.active_run()
    old = _resumable_run(stage, key) if resume else None
    tags = {
        "stage": stage,
        "artifact_key": key,
        **_process_tags(),
        **{f"runtime.{k}": _clip(v) for k, v in (runtime or {}).items()},
    }
    if old is not None:
        client = mlflow.tracking.MlflowClient()
        client.update_run(old, status="RUNNING")
        ctx = mlflow.start_run(run_id=old, nested=True)
        tags["mlflow.parentRunId"] = parent.info.run_id if parent else ""
        tags["resumed"] = "true"
    else:
        ctx = mlflow.start_run(run_name=stage, nested=True)
    with ctx as run:
        mlflow.set_tags(tags)
        log_params(_with_headline(hashed, headline), run.info.run_id)
        yield run.info.run_id


def _with_headline(hashed: Any, headline: Mapping[str, str] | None) -> Any:
    """``hashed`` plus the headline params it does not already name."""
    if not headline or not isinstance(hashed, Mapping):
        return hashed
    return {**{k: v for k, v in headline.items() if k not in hashed}, **hashed}


def log_params(config: Any, run_id: str | None = None, prefix: str = "") -> None:
    """Log a (nested) config as flattened params, in batches of 100 (MLflow's limit); params
    already on the run (a resumed run) are skipped, since params cannot change."""
    mlflow = _mlflow()
    flat = {_metric_key(f"{prefix}{k}"): _clip(v) for k, v in flatten(config).items()}  # MLflow's name rules
    if run_id is not None:
        have = mlflow.tracking.MlflowClient().get_run(run_id).data.params
        flat = {k: v for k, v in flat.items() if k not in have}
    items = list(flat.items())
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        mlflow.log_params(dict(items[i : i + _MAX_PARAMS_PER_BATCH]))


def _clip(v: Any) -> str:
    s = str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def _is_active(run_id: str | None) -> bool:
    """True when ``run_id`` is None or the active (fluent) run: log through the fluent API."""
    mlflow = _mlflow()
    if run_id is None:
        return True
    active = mlflow.active_run()
    return active is not None and active.info.run_id == run_id


def log_metrics(
    metrics: dict[str, Any], run_id: str | None = None, *, step: int | None = None, tracking_uri: str | None = None
) -> None:
    """Log the finite numeric entries of ``metrics`` (MLflow key rules: '/' kept, others '_').

    Args:
        metrics: name -> value; booleans, non-numbers and NaN / inf are skipped.
        run_id: the run to log to. None, or the active run with no ``tracking_uri``: the active
            (fluent) run; otherwise run ``run_id`` through an ``MlflowClient``.
        step: the metrics' step (an optimisation step for training curves); None: MLflow's
            default (0).
        tracking_uri: the tracking server / store of ``run_id``, for processes that did not call
            :func:`setup` (e.g. Ray Train workers); None: the current one. Needs ``run_id``.

    Sent in batches of 1000 (MLflow's ``log_batch`` limit).

    Raises:
        ValueError: ``tracking_uri`` without ``run_id``.
        mlflow.exceptions.MlflowException: the tracking store rejects the request (callers that
            must not stop, such as training workers, catch it).
    """
    mlflow = _mlflow()
    if tracking_uri is not None and run_id is None:
        raise ValueError("log_metrics: tracking_uri needs a run_id")
    clean = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        clean[_metric_key(k)] = float(v)
    if not clean:
        return
    items = list(clean.items())
    n = _MAX_METRICS_PER_BATCH
    if tracking_uri is None and _is_active(run_id):
        for i in range(0, len(items), n):
            mlflow.log_metrics(dict(items[i : i + n]), step=step)
    else:
        client = mlflow.tracking.MlflowClient(tracking_uri)
        now = int(time.time() * 1000)
        entities = [mlflow.entities.Metric(k, v, now, int(step or 0)) for k, v in items]
        for i in range(0, len(entities), n):
            client.log_batch(run_id, metrics=entities[i : i + n])


def _metric_key(k: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k)


def set_tags(tags: dict[str, Any]) -> None:
    """Set tags on the active run (values as strings)."""
    _mlflow().set_tags({k: _clip(v) for k, v in tags.items()})


def log_artifact(path: str | Path) -> None:
    """Log one file to the active run."""
    _mlflow().log_artifact(str(path))


def log_artifacts(directory: str | Path, run_id: str | None = None) -> None:
    """Log every file under ``directory`` to the active run, or to run ``run_id`` (client API)
    when that is not the active run."""
    mlflow = _mlflow()
    if _is_active(run_id):
        mlflow.log_artifacts(str(directory))
    else:
        mlflow.tracking.MlflowClient().log_artifacts(run_id, str(directory))


class Invocation:
    """The MLflow records of one invocation, opened lazily (see the module docstring).

    Args:
        tracking_uri, experiment: where runs go.
        name, tags: the parent run's name and tags.
        params: ``{prefix: config}`` logged flattened as the parent's params (``<stage>.<key>``).
        journal_dir: where an invocation that never opens MLflow leaves its records.
        start_time: epoch seconds the invocation started (the parent run's start).
        headline: :func:`headline_params` of the config: params of the parent run and of every
            stage run. ``tags`` may hold ``mlflow.parentRunId`` (a sweep trial's invocation is
            nested under the sweep's run).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        name: str,
        tags: dict[str, str],
        params: dict[str, Any],
        journal_dir: Path,
        start_time: float,
        headline: Mapping[str, str] | None = None,
    ):
        self.tracking_uri, self.experiment, self.name, self.tags = tracking_uri, experiment, name, tags
        self.headline = dict(headline or {})
        self.params, self.journal_dir, self.start_time = params, Path(journal_dir), start_time
        self.cached_runs: list[dict[str, Any]] = []
        self.reaped = 0
        self.run_id: str | None = None  # the parent run, once opened
        self._parent: contextlib.ExitStack | None = None

    @property
    def opened(self) -> bool:
        return self._parent is not None

    def open(self) -> None:
        """Open MLflow: log any journal left, mark killed runs, start the parent run, log what
        was recorded so far (idempotent)."""
        if self._parent is not None:
            return
        flush_journal(self.journal_dir, self.tracking_uri)
        exp = setup(self.tracking_uri, self.experiment)
        self.reaped = reap_dead_runs(exp)
        self._parent = contextlib.ExitStack()
        self.run_id = self._parent.enter_context(parent_run(self.name, self.tags, self.start_time))
        log_params(self.headline)
        for prefix, cfg in self.params.items():
            log_params(cfg, prefix=prefix)
        for rec in self.cached_runs:
            self._log_cached(rec)

    def cached(
        self,
        stage: str,
        key: str,
        hashed: Any,
        runtime: Mapping[str, Any],
        tags: dict[str, Any],
        metrics: dict[str, Any],
    ) -> None:
        """A stage whose artifact was reused: a nested ``cached`` run (now, or when MLflow opens)."""
        rec = {
            "stage": stage,
            "key": key,
            "hashed": hashed,
            "runtime": dict(runtime),
            "tags": tags,
            "metrics": metrics,
            "time": time.time(),
            "headline": self.headline,
        }
        self.cached_runs.append(rec)
        if self.opened:
            self._log_cached(rec)

    @staticmethod
    def _log_cached(rec: dict[str, Any]) -> None:
        with stage_run(rec["stage"], rec["key"], rec["hashed"], rec["runtime"], headline=rec.get("headline")):
            set_tags({"status": "cached", **rec["tags"]})
            log_metrics(rec["metrics"])

    @contextlib.contextmanager
    def stage(self, stage: str, key: str, hashed: Any, runtime: Mapping[str, Any]) -> Iterator[str]:
        """The nested run of a stage that runs (continuing an interrupted attempt's run)."""
        self.open()
        with stage_run(stage, key, hashed, runtime, resume=True, headline=self.headline) as run_id:
            yield run_id

    def finish(self, stage_tags: dict[str, str], metrics: dict[str, Any], failed: bool) -> None:
        """End the parent run, or, if MLflow was never opened, journal the records and start a
        detached process that logs them."""
        if self.opened:
            set_tags(stage_tags)
            log_metrics(metrics)
            if failed:
                set_tags({"status": "failed"})
            self._parent.close()
            return
        rec = {
            "tracking_uri": self.tracking_uri,
            "experiment": self.experiment,
            "name": self.name,
            "tags": {**self.tags, **stage_tags, **({"status": "failed"} if failed else {})},
            "params": self.params,
            "headline": self.headline,
            "metrics": metrics,
            "start_time": self.start_time,
            "end_time": time.time(),
            "cached": self.cached_runs,
        }
        self.journal_dir.mkdir(parents=True, exist_ok=True)
        path = self.journal_dir / f"{time.time():.6f}-{os.getpid()}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, default=str))
        os.replace(tmp, path)
        import subprocess

        log = open(self.journal_dir / "flush.log", "a")  # handed to the child (closed there)
        subprocess.Popen(
            [sys.executable, "-m", "pipeline.tracking", "flush", str(self.journal_dir), self.tracking_uri],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )


def flush_journal(journal_dir: Path, tracking_uri: str) -> int:
    """Log the records of invocations that never opened MLflow (:class:`Invocation`), oldest
    first, and delete them; safe to run from several processes at once. Returns how many."""
    journal_dir = Path(journal_dir)
    files = sorted(journal_dir.glob("*.json")) if journal_dir.is_dir() else []
    if not files:
        return 0
    n = 0
    with _file_lock(journal_dir / ".lock"):
        for f in sorted(journal_dir.glob("*.json")):
            rec = json.loads(f.read_text())
            _log_journal(rec, tracking_uri)
            f.unlink()
            n += 1
    return n


def _log_journal(rec: dict[str, Any], tracking_uri: str) -> None:
    mlflow = _mlflow()
    exp = setup(tracking_uri, rec["experiment"])
    client = mlflow.tracking.MlflowClient()
    parent = client.create_run(
        exp,
        start_time=int(rec["start_time"] * 1000),
        run_name=rec["name"],
        tags={k: _clip(v) for k, v in rec["tags"].items()},
    )
    pid = parent.info.run_id
    params = {
        **rec.get("headline", {}),
        **{
            _metric_key(f"{prefix}{k}"): _clip(v)
            for prefix, cfg in rec["params"].items()
            for k, v in flatten(cfg).items()
        },
    }
    _batch(client, pid, params=params, metrics=rec["metrics"], ts=rec["end_time"])
    for c in rec["cached"]:
        tags = {
            "stage": c["stage"],
            "artifact_key": c["key"],
            "status": "cached",
            "mlflow.parentRunId": pid,
            **{k: _clip(v) for k, v in c["tags"].items()},
            **{f"runtime.{k}": _clip(v) for k, v in c["runtime"].items()},
        }
        run = client.create_run(exp, start_time=int(c["time"] * 1000), run_name=c["stage"], tags=tags)
        _batch(
            client,
            run.info.run_id,
            params={
                _metric_key(k): _clip(v) for k, v in flatten(_with_headline(c["hashed"], c.get("headline"))).items()
            },
            metrics=c["metrics"],
            ts=c["time"],
        )
        client.set_terminated(run.info.run_id, "FINISHED", end_time=int(c["time"] * 1000))
    client.set_terminated(
        pid, "FAILED" if rec["tags"].get("status") == "failed" else "FINISHED", end_time=int(rec["end_time"] * 1000)
    )


def _batch(client: Any, run_id: str, params: dict[str, str], metrics: dict[str, Any], ts: float) -> None:
    from mlflow.entities import Metric, Param

    ms = [
        Metric(_metric_key(k), float(v), int(ts * 1000), 0)
        for k, v in metrics.items()
        if not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    ]
    ps = [Param(k, v) for k, v in params.items()]
    for i in range(0, max(len(ms), len(ps)), _MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, metrics=ms[i : i + _MAX_PARAMS_PER_BATCH], params=ps[i : i + _MAX_PARAMS_PER_BATCH])


# =============================================================================================
# a local tracking server (run.tracking_server)
# =============================================================================================
#: ``python -c`` prefix of the server's command: PR_SET_PDEATHSIG (Linux), so the server also stops
#: when the invocation that started it is killed outright (SIGKILL: no ``finally`` runs), then the
#: real ``mlflow server`` replaces this interpreter (the signal setting survives ``execv``).
_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(0)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'mlflow', 'server', *sys.argv[2:]])\n"
)


class TrackingServer:
    """A real ``mlflow server`` process on this machine, started and stopped by this process.

    ``run.tracking_server: true`` runs one for an invocation (:func:`local_server`); the
    two-node test runs one as a cluster's head would. Its output goes to ``log``, never to the
    terminal; it runs in its own session, so a Ctrl-C in the terminal reaches the invocation,
    which logs the runs' end and then stops the server (:meth:`stop`); killed outright, the
    invocation takes the server with it (``PR_SET_PDEATHSIG``: start it from the main thread).

    Args:
        backend_uri: the server's backend store (``sqlite:///<abs path>``).
        artifacts: artifact location URI (``file:///...``, ``s3://...``).
        log: the server's stdout and stderr (appended).
        serve_artifacts: True: clients send artifacts through the server, which writes them to
            ``artifacts`` (``--artifacts-destination``; new experiments get ``mlflow-artifacts:/``
            locations, which only a tracking server resolves); False: new experiments' artifacts
            go to ``artifacts/<experiment id>``, written by the clients themselves
            (``--default-artifact-root``), so a direct sqlite client of the same store reads
            and writes them too.
        host: interface to bind (default: loopback only).
        port: None: a free port (a new one if it is taken before the server binds it).
    """

    #: seconds to wait for ``/health`` (the server imports MLflow twice: ~5-15 s on 2 busy cores)
    START_TIMEOUT = 180.0

    def __init__(
        self,
        backend_uri: str,
        artifacts: str,
        log: Path,
        *,
        serve_artifacts: bool = False,
        host: str = "127.0.0.1",
        port: int | None = None,
    ):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, Path(log)
        self.serve_artifacts, self.host, self._fixed_port = serve_artifacts, host, port
        self.port: int | None = None
        self._proc: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def args(self) -> list[str]:
        """``mlflow server`` arguments (without the command)."""
        art = (
            ["--artifacts-destination", self.artifacts]
            if self.serve_artifacts
            else ["--default-artifact-root", self.artifacts, "--no-serve-artifacts"]
        )
        return [
            "--backend-store-uri",
            self.backend_uri,
            *art,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def command(self) -> str:
        """The server's command line, for people (errors, docs)."""
        return " ".join([sys.executable, "-m", "mlflow", "server", *self.args()])

    def launch(self) -> TrackingServer:
        """Start the process (returns at once; :meth:`wait_ready` waits for it)."""
        import subprocess

        self.port = self._fixed_port or _free_port(self.host)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner processes
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "a") as out:
            out.write(f"$ {self.command()}\n")
            out.flush()
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _PDEATHSIG, str(os.getpid()), *self.args()],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not it: we stop it after logging
            )
        return self

    def wait_ready(self, timeout: float | None = None) -> str:
        """Wait until the server answers ``GET /health``; returns its URL.

        A port taken between choosing it and the server's bind (by anything else on the machine)
        is retried on another free port (three times).

        Raises:
            PipelineError: the server exited or did not answer within ``timeout`` (default
                :data:`START_TIMEOUT`); names the command and its log, with the log's tail.
        """
        import urllib.request

        from pipeline.errors import PipelineError

        deadline = time.monotonic() + (timeout or self.START_TIMEOUT)
        retries = 0 if self._fixed_port else 3
        while True:
            rc = self._proc.poll()
            if rc is not None:
                tail = _tail(self.log)
                if retries and "address already in use" in tail.lower():
                    retries -= 1
                    self.launch()
                    continue
                self._proc = None
                raise PipelineError(
                    f"the MLflow tracking server did not start: `{self.command()}` exited with status {rc}; "
                    f"its log: {self.log}\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"OK":
                        return self.url
            except Exception:  # noqa: BLE001 - not up yet (refused, reset, another protocol on the port)
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PipelineError(
                    f"the MLflow tracking server did not answer {self.url}/health within "
                    f"{timeout or self.START_TIMEOUT:.0f} s; command: `{self.command()}`; its log: {self.log}\n"
                    f"{_tail(self.log)}"
                )
            time.sleep(0.3)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and its workers (SIGTERM to its process group, SIGKILL after
        ``timeout`` seconds); idempotent."""
        import signal
        import subprocess

        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is the server's processes
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def __enter__(self) -> str:
        self.launch()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def local_server(store_uri: str, log: Path) -> TrackingServer:
    """The invocation's server of ``run.tracking_server``: ``mlflow server`` on 127.0.0.1 (a free
    port) over the invocation's own sqlite store (``store_uri``: ``sqlite:///<work_dir>/mlflow.db``),
    new experiments' artifacts in ``<work_dir>/mlartifacts/<experiment id>`` (written by the
    clients: every process of a one-machine invocation reaches that folder). Runs logged through
    it are runs of that sqlite store: ``mlflow ui``, ``zeroseg compare`` and ``zeroseg gc`` read
    them without a server afterwards, and a fully cached invocation (which starts no server)
    journals into the same store.

    Raises:
        ValueError: ``store_uri`` is not ``sqlite:///``.
    """
    if not store_uri.startswith("sqlite:///"):
        raise ValueError(f"a local tracking server serves a sqlite store, got {store_uri!r}")
    root = Path(store_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"
    return TrackingServer(store_uri, root.as_uri(), log, serve_artifacts=False)


def ui_command(tracking_uri: str) -> str:
    """The command that shows the runs, runnable without an activated virtualenv (it names
    the interpreter this command runs under); for a tracking server (``http(s)://``), its URL,
    whose UI shows them."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri} (the tracking server's UI)"
    exe = sys.executable
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(exe)
        if not rel.startswith(".."):
            exe = rel
    return f"{exe} -m mlflow ui --backend-store-uri {tracking_uri}"


if __name__ == "__main__":  # python -m pipeline.tracking flush <journal dir> <tracking uri>
    if len(sys.argv) == 4 and sys.argv[1] == "flush":
        logging.basicConfig(level=logging.WARNING)
        flush_journal(Path(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: python -m pipeline.tracking flush <journal dir> <tracking uri>")


__all__ = [
    "HEADLINE",
    "Invocation",
    "TrackingServer",
    "headline_params",
    "flush_journal",
    "artifact_root_for",
    "log_artifact",
    "log_artifacts",
    "log_metrics",
    "local_server",
    "log_params",
    "parent_run",
    "reap_dead_runs",
    "set_tags",
    "setup",
    "stage_run",
    "ui_command",
]
