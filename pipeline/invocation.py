"""One invocation of a command: what ``zeroseg run`` and ``zeroseg sweep`` (its shared upstream and
each of its trials too) do around executing plans.

An invocation has

* its config: :func:`config_of` (``--config`` and ``--set``, then ``--work-dir`` and ``--store``);
* its log: :func:`invocation_log` (``<work_dir>/logs/<command>-<time>-<pid>.log``), where library
  output (Ray, MLflow) goes instead of the terminal unless ``--verbose``;
* for as long as it runs, the MLflow tracking store and the Ray cluster: :func:`session`
  (:func:`tracking_store`, :class:`pipeline.cluster.Cluster`, started when the first stage runs
  and shut down at the end when the invocation started it);
* the executions of plans it tracks, each an MLflow invocation run: :func:`tracked` and
  :func:`execute_tracked` (the run is finished, with the stages' statuses, also on an error).

:func:`run_dag` is ``zeroseg run`` from plan to summary; :mod:`pipeline.sweep` composes the same
pieces (its driver's session, its shared upstream and its trials' tracked executions).
Nothing here imports torch, Ray or MLflow at module level: a dry run and a fully cached run
import none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from pipeline.catalogue import Catalogue
from pipeline.cluster import Cluster, job_copy_notes
from pipeline.config import LoadedConfig, load_config
from pipeline.console import Console, library_output_to, setup_logging
from pipeline.plan import Plan, Selection, plan
from pipeline.report import mlflow_runs, print_notes, print_plan, print_summary, print_wall_time


# =============================================================================================
# the invocation's config, store and log
# =============================================================================================
def start_time() -> float:
    """Epoch seconds this process started (the wall time printed covers imports too)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return time.time()


def config_of(args: argparse.Namespace) -> LoadedConfig:
    """The config of ``args.config`` with ``args.overrides`` (``--set``), then ``--work-dir``
    and ``--store`` (``args.work_dir``, ``args.store``) over ``run.work_dir`` and ``run.store``.

    Raises:
        ConfigError: see :func:`pipeline.config.load_config`.
    """
    cfg = load_config(args.config, args.overrides)
    if args.work_dir:
        cfg.run.work_dir = args.work_dir
    if args.store:
        cfg.run.store = args.store
    return cfg


def open_store(cfg: LoadedConfig, dry_run: bool) -> Any:
    """The config's :class:`pipeline.store.ArtifactStore` (cache under ``<work_dir>/cache``);
    None for a dry run whose local store does not exist yet (a dry run creates nothing)."""
    from pipeline.store import ArtifactStore

    uri = cfg.run.store_uri()
    if dry_run and "://" not in uri and not Path(uri).exists():
        return None
    return ArtifactStore(uri, Path(cfg.run.work_dir) / "cache", cfg.run.verify)


@contextlib.contextmanager
def invocation_log(cfg: LoadedConfig, command: str, verbose: bool) -> Iterator[Path]:
    """``<work_dir>/logs/<command>-<time>-<pid>.log`` while the context lasts: logging goes
    there (:func:`pipeline.console.setup_logging`) and so does the process's stderr, where Ray
    and MLflow write (:func:`pipeline.console.library_output_to`), unless ``verbose``."""
    log_file = Path(cfg.run.work_dir) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    setup_logging(log_file, verbose)
    with library_output_to(log_file, not verbose):
        yield log_file


# =============================================================================================
# the tracking store and the cluster
# =============================================================================================
@contextlib.contextmanager
def tracking_store(cfg: LoadedConfig, console: Console, log_dir: Path, needed: bool = True) -> Iterator[str]:
    """The MLflow tracking URI an invocation logs to while the context lasts.

    ``run.mlflow_uri()``, except with ``run.tracking_server`` (:meth:`RunSection.local_tracking_server`)
    when ``needed`` (something is logged before the invocation ends): then the URL of a real
    ``mlflow server`` over that sqlite store (:func:`pipeline.tracking.local_server`), started
    here (its URL and log printed) and stopped when the context ends, also on an error or a
    Ctrl-C. Its output goes to ``<log_dir>/mlflow-server-<time>-<pid>.log``.

    Raises:
        PipelineError: the server did not start (names its command and log).
    """
    from pipeline.config import TRACKING_URI_ENV

    store = cfg.run.mlflow_uri()
    if cfg.run.tracking_server and not cfg.run.local_tracking_server():
        console.line(
            f"NOTE: run.tracking_server not started: {TRACKING_URI_ENV} names the tracking server {store}", "note"
        )
    if not cfg.run.local_tracking_server():
        yield store
        return
    if not needed:
        console.line(f"mlflow: every stage is cached: no tracking server started; runs go to {store}", "dim")
        yield store
        return
    from pipeline import tracking

    log = log_dir / f"mlflow-server-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    with tracking.local_server(store, log) as url:
        console.line(f"mlflow: tracking server {url} (store {store}; server log {log})")
        yield url


@contextlib.contextmanager
def session(
    cfg: LoadedConfig, console: Console, log_dir: Path, verbose: bool, needed: bool = True
) -> Iterator[Cluster]:
    """The invocation's tracking store (:func:`tracking_store`, ``needed`` as there) and its
    cluster, a :class:`pipeline.cluster.Cluster` (``.tracking_uri``, ``.start``) that nothing has
    started yet. When the context ends, also on an error or a Ctrl-C, a cluster it started is shut
    down, then a tracking server it started is stopped."""
    with tracking_store(cfg, console, log_dir, needed) as tracking_uri:
        cluster = Cluster(cfg, console, verbose, tracking_uri)
        try:
            yield cluster
        finally:
            cluster.stop()


# =============================================================================================
# tracked executions
# =============================================================================================
def tracked(
    p: Plan,
    tracking_uri: str,
    experiment: str,
    name: str,
    tags: dict[str, str],
    work_dir: Path,
    t_start: float,
    nodes: Collection[str] | None = None,
    headline: Any = None,
) -> Any:
    """The MLflow records of executing plan ``p``: a :class:`pipeline.tracking.Invocation` (an
    invocation run ``name`` in ``experiment`` with ``tags``, started at ``t_start``) whose params
    are the stages' hashed configs (``<stage>.<key>``) and the headline params (``headline``: the
    catalogue's, :attr:`pipeline.catalogue.Catalogue.headline`; None: the project's), of every
    node or only of ``nodes``. Records wait in ``<work_dir>/tracking-journal`` while MLflow is
    not opened."""
    from pipeline import tracking

    configs = {n.name: n.components.get("config", {}) for n in p if nodes is None or n.name in nodes}
    return tracking.Invocation(
        tracking_uri,
        experiment,
        name,
        tags,
        {f"{stage}.": c for stage, c in configs.items()},
        work_dir / "tracking-journal",
        t_start,
        tracking.headline_params(configs, headline),
    )


def plan_metrics(p: Plan) -> dict[str, Any]:
    """Every node's metrics as ``<stage>/<metric>``."""
    return {f"{n.name}/{k}": v for n in p for k, v in n.metrics.items()}


def execute_tracked(
    p: Plan,
    store: Any,
    console: Console,
    tracker: Any,
    *,
    work_dir: Path,
    nodes: Collection[str] | None = None,
    open_run: bool = True,
    start_cluster: Callable[[], None] = lambda: None,
    metrics: Callable[[], dict[str, Any]] = dict,
    stopped: Callable[[], bool] = lambda: False,
) -> Any:
    """Execute plan ``p`` (:func:`pipeline.execute.execute`) inside ``tracker`` (:func:`tracked`)
    and finish its run, also when execution raises: tags ``stages.<stage>: <status> <key[:12]>``
    for every node (or ``nodes``), ``metrics()``, and failed unless every node succeeded.

    Args:
        open_run: open the MLflow run before the first stage starts (False: opened lazily, or
            only journalled, when nothing runs).
        start_cluster: called before the first node that runs.
        stopped: whether the execution was stopped on purpose (a sweep trial ASHA stopped):
            then the run is tagged ``status: stopped``, not failed.

    Returns:
        The :class:`pipeline.execute.Outcome`.
    """
    from pipeline.execute import execute

    if open_run:
        tracker.open()  # MLflow now: not after a stage has already started
    out = None
    try:
        out = execute([p], store, console, work_dir=work_dir, tracker=tracker, start_cluster=start_cluster)
    finally:
        tags = {"stages." + n.name: f"{n.status} {n.key[:12]}" for n in p if nodes is None or n.name in nodes}
        # (if the process is killed before this, the next invocation marks the run KILLED)
        halted = stopped()
        tracker.finish(
            tags | ({"status": "stopped"} if halted else {}),
            metrics(),
            failed=(out is None or not out.ok) and not halted,
        )
    return out


# =============================================================================================
# zeroseg run
# =============================================================================================
def run_dag(
    cfg: LoadedConfig,
    console: Console,
    catalog: Catalogue,
    selection: Selection,
    *,
    dry_run: bool,
    verbose: bool,
    t_start: float,
    log_file: Path,
) -> tuple[int, Plan]:
    """``zeroseg run`` once its config is loaded and its log open: plan, print the plan (and stop
    there for a dry run), execute the stages that are not cached as one tracked invocation,
    print the summary.

    Returns:
        ``(status, plan)``: 0 every stage is done, 1 a stage failed (the summary says which).

    Raises:
        ConfigError, PipelineError, StoreError: a bad config or selection, an unreachable store or
            cluster (exit status 2 in :func:`pipeline.cli.main`).
    """
    work_dir = Path(cfg.run.work_dir)
    store = open_store(cfg, dry_run)
    p = plan(cfg, catalog.stages, selection, store, code_packages=catalog.code_packages)
    print_notes(console, [*job_copy_notes(cfg), *p.notices])
    print_plan(console, p, cfg.run.store_uri())
    if dry_run:
        return 0, p
    if store is None:
        store = open_store(cfg, False)
    runs_any = any(n.action == "run" for n in p)
    with session(cfg, console, log_file.parent, verbose, needed=runs_any) as cluster:
        tracker = tracked(
            p,
            cluster.tracking_uri,
            cfg.run.experiment or cfg.run.name,
            cfg.run.name,
            {"config": str(cfg.path), "argv": " ".join(sys.argv[1:])},
            work_dir,
            t_start,
            headline=catalog.headline,
        )
        out = execute_tracked(
            p,
            store,
            console,
            tracker,
            work_dir=work_dir.resolve(),
            open_run=runs_any,
            start_cluster=cluster.start,
            metrics=lambda: {**plan_metrics(p), "wall_seconds": time.time() - t_start},
        )
    if tracker.reaped:
        console.line(f"mlflow: marked {tracker.reaped} run(s) of killed invocations KILLED", "dim")
    print_summary(console, p)
    console.line(f"MLflow runs: {mlflow_runs(cfg, served=runs_any)}")
    if not out.ok:
        console.line(f"library logs of this run: {log_file}")
    print_wall_time(console, t_start)
    return (0 if out.ok else 1), p


__all__ = [
    "config_of",
    "execute_tracked",
    "invocation_log",
    "open_store",
    "plan_metrics",
    "run_dag",
    "session",
    "start_time",
    "tracked",
    "tracking_store",
]
