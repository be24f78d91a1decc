"""MLflow tracking: one parent run per invocation, one nested run per stage.

Params are the resolved stage config (flattened to dotted keys), tags carry the artifact key,
the stage status (``ran``/``cached``/``failed``) and, for cached stages, the MLflow run that
produced the artifact. The default tracking URI is a sqlite file in the work directory, so
nothing has to be started; ``mlflow ui --backend-store-uri <uri>`` shows the runs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import flatten

_MAX_PARAM_LEN = 6000


def setup(tracking_uri: str, experiment: str) -> None:
    """Point MLflow at ``tracking_uri`` and select (creating if needed) ``experiment``."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)


@contextlib.contextmanager
def parent_run(name: str, tags: dict[str, str]) -> Iterator[str]:
    """The invocation's parent run; yields its run id. Marked FAILED if the body raises."""
    import mlflow

    with mlflow.start_run(run_name=name, tags=tags) as run:
        yield run.info.run_id


@contextlib.contextmanager
def stage_run(stage: str, key: str, config: Any) -> Iterator[str]:
    """A nested run for one stage under the active parent; yields its run id."""
    import mlflow

    with mlflow.start_run(run_name=stage, nested=True, tags={"stage": stage, "artifact_key": key}) as run:
        log_params(config)
        yield run.info.run_id


def log_params(config: Any) -> None:
    """Log a (nested) config as flattened params, in batches of 100 (MLflow's limit)."""
    import mlflow

    flat = {k: _clip(v) for k, v in flatten(config).items()}
    items = list(flat.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i: i + 100]))


def _clip(v: Any) -> str:
    s = str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


#: MLflow's ``log_batch`` limit on metrics per request.
_MAX_METRICS_PER_BATCH = 1000


def _is_active(run_id: str | None) -> bool:
    """True when ``run_id`` is None or the active (fluent) run: log through the fluent API."""
    import mlflow

    if run_id is None:
        return True
    active = mlflow.active_run()
    return active is not None and active.info.run_id == run_id


def log_metrics(metrics: dict[str, Any], run_id: str | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` (MLflow key rules: '/' kept, others '_').

    To the active run when ``run_id`` is None or is the active run, else to run ``run_id``
    through the client; in batches of 1000 (MLflow's ``log_batch`` limit). Booleans, non-numbers
    and NaN / inf are skipped.
    """
    import math
    import time

    import mlflow

    clean = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        clean[_metric_key(k)] = float(v)
    if not clean:
        return
    items = list(clean.items())
    n = _MAX_METRICS_PER_BATCH
    if _is_active(run_id):
        for i in range(0, len(items), n):
            mlflow.log_metrics(dict(items[i: i + n]))
    else:
        client = mlflow.tracking.MlflowClient()
        now = int(time.time() * 1000)
        entities = [mlflow.entities.Metric(k, v, now, 0) for k, v in items]
        for i in range(0, len(entities), n):
            client.log_batch(run_id, metrics=entities[i: i + n])


def _metric_key(k: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", k)


def set_tags(tags: dict[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path) -> None:
    import mlflow

    mlflow.log_artifact(str(path))


def log_artifacts(directory: str | Path, run_id: str | None = None) -> None:
    """Log every file under ``directory`` to the active run, or to run ``run_id`` (client API)
    when that is not the active run."""
    import mlflow

    if _is_active(run_id):
        mlflow.log_artifacts(str(directory))
    else:
        mlflow.tracking.MlflowClient().log_artifacts(run_id, str(directory))


def ui_command(tracking_uri: str) -> str:
    """The command that shows the runs."""
    return f"mlflow ui --backend-store-uri {tracking_uri}"
