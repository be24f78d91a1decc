"""MLflow runs: the tracking store and experiment, the parent and nested stage runs, params,
metrics, tags and artifacts, and the reaping of runs whose process was killed.

See :mod:`pipeline.tracking` for what is logged where. MLflow is imported on first use
(:func:`_mlflow`), never at import time.
"""

from __future__ import annotations

import contextlib
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
        headline: the invocation's :func:`~pipeline.tracking.headline_params`, logged as params too (where the
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


__all__ = [
    "HOST_TAG",
    "PID_START_TAG",
    "PID_TAG",
    "artifact_root_for",
    "log_artifact",
    "log_artifacts",
    "log_metrics",
    "log_params",
    "parent_run",
    "reap_dead_runs",
    "set_tags",
    "setup",
    "stage_run",
    "ui_command",
]
