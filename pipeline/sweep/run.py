"""The sweep driver: :func:`run_sweep` (see :mod:`pipeline.sweep` for how a sweep runs)."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import LoadedConfig, apply_override, config_from_raw
from pipeline.errors import ConfigError

from .prefix import experiment_id, run_shared, split_stages
from .resources import asha_scheduler, stage_cpus, start_ray_data_services, trial_concurrency, tune_resources
from .results import SweepOutcome, aggregate, log_summary, progress_callback, trial_rows
from .spec import SweepFile
from .trainable import trial

#: Tune's experiment directories live under this folder of the store.
SWEEPS = "_sweeps"


def run_sweep(
    cfg: LoadedConfig,
    sw: SweepFile,
    console: Any,
    *,
    catalog: Any,
    init_cluster: Callable[[str], None],
    sweep_path: str = "",
    callbacks: Sequence[Any] = (),
    tracking_uri: str | None = None,
) -> SweepOutcome:
    """Run (or continue) a sweep (see :mod:`pipeline.sweep`).

    Args:
        cfg: the base config (``--config`` with ``--set``); its ``run`` section says where
            things go.
        sw: the sweep file.
        console: output for people.
        catalog: the stage catalogue (``pipeline.catalogue.Catalogue``).
        init_cluster: ``(store_uri) -> None``: starts or joins Ray and checks that every node
            reaches the store (``pipeline.cluster.Cluster.start``).
        sweep_path: the sweep file's path (recorded on the sweep run).
        callbacks: more ``ray.tune.Callback`` objects for this invocation.
        tracking_uri: where the sweep, its shared upstream and its trials log (default
            ``cfg.run.mlflow_uri()``; the CLI passes a local server's URL with
            ``run.tracking_server``).

    Raises:
        ConfigError: a searched key that is not a config key of any stage (from the probes'
            planning), the metric's stage absent from the config.
        PipelineError: the shared upstream failed.
    """
    from ray import tune

    from pipeline.store import ArtifactStore

    base_raw, base = base_config(cfg, sw)
    work_dir = Path(base.run.work_dir)
    store_uri = cfg.run.store_uri() if cfg.run.store else str(work_dir / "store")
    store = ArtifactStore(store_uri, work_dir / "cache", cfg.run.verify)
    # 1. the shared prefix: plans of the probes
    base_plan, shared, tuned = split_stages(cfg, base, base_raw, sw, catalog, store)
    sweep_id = experiment_id(base, sw)
    console.line(
        f"sweep {sw.name} ({sweep_id}): shared upstream {', '.join(shared) or 'none'}; tuned {', '.join(tuned)}"
    )
    tracking_uri, experiment = tracking_uri or base.run.mlflow_uri(), base.run.experiment or base.run.name
    sweep_run_id, _ = open_sweep_run(
        tracking_uri,
        experiment,
        sw.name,
        sweep_id,
        {"config": str(cfg.path), "sweep": sweep_path, "metric": sw.target, "mode": sw.mode},
    )
    start = _once(lambda: init_cluster(store_uri))
    shared_out = run_shared(
        base,
        shared,
        sw,
        catalog=catalog,
        store=store,
        console=console,
        tracking_uri=tracking_uri,
        experiment=experiment,
        tags={"mlflow.parentRunId": sweep_run_id, "zeroseg.sweep_id": sweep_id, "config": str(cfg.path)},
        start=start,
    )
    start()
    start_ray_data_services()
    # 2. the trials
    spec = trial_spec(cfg, sw, work_dir, store_uri, tracking_uri, experiment, sweep_run_id, sweep_id)
    trainable = tune.with_resources(tune.with_parameters(trial, spec=spec), tune_resources(sw.resources))
    callbacks = [progress_callback(console, sw.target), *callbacks]
    tuner, restored, exp_path = make_tuner(sw, trainable, store, sweep_id, console, base, base_plan, tuned, callbacks)
    console.line(f"sweep {sw.name}: trials running (logs: {work_dir / 'logs'}/trial-<id>.log)")
    rows = trial_rows(tuner.fit(), sw.target)
    results = aggregate(rows, sw.target, sw.mode)
    ok = all(r["status"] in ("finished", "stopped") for r in rows)
    log_summary(sweep_run_id, tracking_uri, sw, rows, results, ok, work_dir)
    return SweepOutcome(ok, restored, shared_out, rows, results, sweep_run_id, exp_path)


def base_config(cfg: LoadedConfig, sw: SweepFile) -> tuple[dict[str, Any], LoadedConfig]:
    """The sweep's base config: ``cfg``'s raw config with the sweep file's ``set`` applied, its
    work dir resolved. Returns ``(raw, config)``.

    Raises:
        ConfigError: the sweep's metric names a stage the config has not.
    """
    work_dir = Path(cfg.run.work_dir).resolve()
    base_raw = copy.deepcopy(cfg.raw)
    for ov in sw.set:
        apply_override(base_raw, ov)
    base = config_from_raw(cfg.path, copy.deepcopy(base_raw))
    base.run.work_dir, base.run.store = str(work_dir), cfg.run.store
    stage_of = sw.target.split("/", 1)[0]
    if stage_of not in base.sections:
        raise ConfigError(
            f"sweep {sw.name}: the metric {sw.target!r} names stage {stage_of!r}, which the config has not"
        )
    return base_raw, base


def trial_spec(
    cfg: LoadedConfig,
    sw: SweepFile,
    work_dir: Path,
    store_uri: str,
    tracking_uri: str,
    experiment: str,
    sweep_run_id: str,
    sweep_id: str,
) -> dict[str, Any]:
    """What every trial shares (:func:`pipeline.sweep.trainable.trial`'s ``spec``), and the
    environment Tune's trials need (set here, inherited by the trial actors)."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials resolve relative paths as the driver does
    # a trial's training reports carry one stage's metrics, its final result the evaluate ones:
    # ASHA skips a result without its metric; Tune's strict check would fail the trial instead
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables (ours: one line per trial)
    return {
        "path": str(cfg.path),
        "config_path": str(cfg.path),
        "raw": cfg.raw,
        "set": list(sw.set),
        "seed_key": sw.seed_key,
        "work_dir": str(work_dir),
        "store": store_uri,
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "sweep_run_id": sweep_run_id,
        "sweep_id": sweep_id,
        "name": sw.name,
        "cwd": os.getcwd(),
    }


def make_tuner(
    sw: SweepFile,
    trainable: Any,
    store: Any,
    sweep_id: str,
    console: Any,
    base: LoadedConfig,
    base_plan: Any,
    tuned: list[str],
    callbacks: list[Any],
) -> tuple[Any, bool, str]:
    """The sweep's ``ray.tune.Tuner``: the experiment ``<store>/_sweeps/<name>-<id>`` restored
    when it exists (finished trials kept, unfinished and errored ones run again), else a new one
    (search space, ASHA or FIFO, the concurrency limit: :func:`trial_concurrency`), with this
    invocation's ``callbacks``. Returns ``(tuner, restored, experiment path)``.

    Raises:
        ConfigError: see :func:`asha_scheduler`.
    """
    import ray
    from ray import tune

    storage = sweep_storage(store)
    exp_name = f"{sw.name}-{sweep_id}"
    exp_path = f"{storage}/{exp_name}"
    if tune.Tuner.can_restore(exp_path):
        console.line(f"sweep {sw.name}: continuing the experiment in {exp_path} (finished trials are kept)")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, restart_errored=True)
        return _with_callbacks(tuner, callbacks), True, exp_path
    # (a restored experiment keeps its first invocation's limit)
    concurrent, why = trial_concurrency(
        float(sw.resources.get("CPU", 0.0)),
        stage_cpus(base_plan, tuned),
        float(ray.cluster_resources().get("CPU", 0.0)),
        sw.max_concurrent_trials,
    )
    if why:
        console.line(f"sweep {sw.name}: {why}", "warn" if why.startswith("warning") else "dim")
    scheduler = asha_scheduler(sw, base.sections) if sw.scheduler == "asha" else None
    space: dict[str, Any] = {"params": {k: d.tune() for k, d in sw.space.items()}}
    space["seed"] = tune.grid_search(list(sw.seeds)) if sw.seeds else None
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(  # ASHA's metric and mode are the scheduler's (setting both raises)
            metric=None if scheduler is not None else sw.target,
            mode=None if scheduler is not None else sw.mode,
            scheduler=scheduler,
            num_samples=sw.num_samples,
            max_concurrent_trials=concurrent or None,
        ),
        run_config=tune.RunConfig(
            name=exp_name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=sw.max_failures),
            verbose=0,
        ),
    )
    return _with_callbacks(tuner, callbacks), False, exp_path


def _with_callbacks(tuner: Any, callbacks: list[Any]) -> Any:
    """``tuner`` with this invocation's Tune callbacks. Tune's run config comes back from the
    experiment on restore: the callbacks are set on the restored tuner too (tuner.pkl was
    written when the tuner was made: they are not pickled with the experiment)."""
    tuner._local_tuner.get_run_config().callbacks = callbacks
    return tuner


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn``, called at most once however often the result is called."""
    done: list[bool] = []

    def call() -> None:
        if not done:
            done.append(True)
            fn()

    return call


def sweep_storage(store: Any) -> str:
    """Where Tune keeps sweep experiments: ``<store>/_sweeps`` (a local path for local and
    ``file://`` stores; the store's URI otherwise), so every node reads and writes it."""
    from pipeline import uri as uri_

    return f"{store.base}/{SWEEPS}" if store.local else uri_.join(store.root_uri, SWEEPS)


def open_sweep_run(
    tracking_uri: str, experiment: str, name: str, sweep_id: str, tags: dict[str, str]
) -> tuple[str, bool]:
    """The sweep's MLflow run: the one an earlier invocation of this sweep started (reopened),
    or a new one. Returns (run id, reopened)."""
    from pipeline import tracking

    mlflow = tracking._mlflow()
    exp = tracking.setup(tracking_uri, experiment)
    client = mlflow.tracking.MlflowClient()
    old = client.search_runs(
        [exp], filter_string=f"tags.`zeroseg.sweep_id` = '{sweep_id}' and tags.`zeroseg.kind` = 'sweep'", max_results=1
    )
    if old:
        client.update_run(old[0].info.run_id, status="RUNNING")
        return old[0].info.run_id, True
    run = client.create_run(exp, run_name=name, tags={**tags, "zeroseg.sweep_id": sweep_id, "zeroseg.kind": "sweep"})
    return run.info.run_id, False


__all__ = ["SWEEPS", "base_config", "make_tuner", "open_sweep_run", "run_sweep", "sweep_storage", "trial_spec"]
