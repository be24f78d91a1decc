"""One invocation's MLflow records, opened lazily (:class:`Invocation`).

Importing MLflow and its sqlite store costs about 3 s, more than everything else a fully cached
invocation does: an invocation records its parent run and its cached stage runs in memory, opens
MLflow only when a stage has to run (then logs what it recorded so far), and otherwise leaves its
records to the journal (:mod:`pipeline.tracking.journal`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking.journal import flush_journal, write_journal
from pipeline.tracking.runs import log_metrics, log_params, parent_run, reap_dead_runs, set_tags, setup, stage_run


class Invocation:
    """The MLflow records of one invocation, opened lazily (see the module docstring).

    Args:
        tracking_uri, experiment: where runs go.
        name, tags: the parent run's name and tags.
        params: ``{prefix: config}`` logged flattened as the parent's params (``<stage>.<key>``).
        journal_dir: where an invocation that never opens MLflow leaves its records.
        start_time: epoch seconds the invocation started (the parent run's start).
        headline: :func:`~pipeline.tracking.headline_params` of the config: params of the parent run and of every
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

    def cached(self, stage: str, key: str, hashed: Any, runtime: Mapping, tags: dict, metrics: dict) -> None:
        """A stage whose artifact was reused: a nested ``cached`` run (now, or when MLflow opens).

        ``hashed``: its hashed config (params); ``runtime``: its runtime settings
        (``runtime.<key>`` tags); ``tags``, ``metrics``: logged on the run as they are."""
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
        write_journal(rec, self.journal_dir, self.tracking_uri)


__all__ = ["Invocation"]
