"""The journal of invocations that never opened MLflow, and its flush.

An invocation in which no stage runs (every artifact cached) does not import MLflow
(:class:`pipeline.tracking.Invocation`): its records (the parent run, a ``cached`` run per stage,
with their times) go to a JSON file in the journal directory, and a detached process logs them
(``python -m pipeline.tracking flush <journal dir> <tracking uri>``, :func:`flush_journal`); the
next invocation that opens MLflow flushes any journal left first.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.config import flatten
from pipeline.tracking.runs import (
    _MAX_PARAMS_PER_BATCH,
    _clip,
    _file_lock,
    _metric_key,
    _mlflow,
    _with_headline,
    setup,
)

#: The directory ``python -m pipeline.tracking`` runs in (the project root: ``pipeline`` imports).
_ROOT = Path(__file__).resolve().parent.parent.parent


def write_journal(rec: dict[str, Any], journal_dir: Path, tracking_uri: str) -> Path:
    """Write one invocation's records (``rec``) to ``journal_dir`` (atomically) and start a
    detached process that logs them to ``tracking_uri`` (its output appended to
    ``journal_dir/flush.log``). Returns the journal file."""
    import subprocess

    journal_dir.mkdir(parents=True, exist_ok=True)
    path = journal_dir / f"{time.time():.6f}-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec, default=str))
    os.replace(tmp, path)
    log = open(journal_dir / "flush.log", "a")  # handed to the child (closed there)
    subprocess.Popen(
        [sys.executable, "-m", "pipeline.tracking", "flush", str(journal_dir), tracking_uri],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd=str(_ROOT),
    )
    return path


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


__all__ = ["flush_journal", "write_journal"]
