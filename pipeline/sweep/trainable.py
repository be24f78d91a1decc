"""A sweep's trial: the Tune function trainable (:func:`trial`) and the training reports it
forwards to Tune while a training stage runs (:func:`training_reports`; step 2 of
:func:`pipeline.sweep.run_sweep`)."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import LoadedConfig, config_from_raw
from pipeline.errors import PipelineError
from pipeline.invocation import execute_tracked, tracked

from .prefix import as_override, plain
from .results import describe


def trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable: plan and execute one trial's config, report its metrics.

    Args:
        config: Tune's sampled config: ``{"params": {key: value}, "seed": int | None}``.
        spec: what every trial shares (the resolved base config, store, work dir, tracking,
            the sweep's run id; see :func:`run_sweep`).

    Raises:
        PipelineError: a stage failed (the trial ends ERROR; its message names the stage).
    """
    from ray import tune

    from pipeline.catalogue import load_catalogue
    from pipeline.console import Console
    from pipeline.plan import plan
    from pipeline.store import ArtifactStore

    if spec.get("cwd") and Path(spec["cwd"]).is_dir():
        os.chdir(spec["cwd"])  # relative data paths of the config, as on the driver
    trial_id = tune.get_context().get_trial_id()
    cfg, params, seed = trial_config(config, spec)
    work_dir = Path(spec["work_dir"])
    log = work_dir / "logs" / f"trial-{trial_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    catalog = load_catalogue()
    store = ArtifactStore(spec["store"], work_dir / "cache", cfg.run.verify)
    p = plan(cfg, catalog.stages, None, store, code_packages=catalog.code_packages)
    tags = {
        "mlflow.parentRunId": spec["sweep_run_id"],
        "zeroseg.sweep_id": spec["sweep_id"],
        "zeroseg.trial_id": trial_id,
        "zeroseg.trial_params": json.dumps(params, sort_keys=True),
        "zeroseg.seed": "" if seed is None else str(seed),
        "config": spec["config_path"],
    }
    name = f"{spec['name']} {describe(params, seed)}"
    tracker = tracked(p, spec["tracking_uri"], spec["experiment"], name, tags, work_dir, t0, headline=catalog.headline)
    stages = {store.checkpoint_dir(n.name, n.key): n.name for n in p}
    state = {"stopped": False}
    with open(log, "a") as f, training_reports(stages, state):
        # a trial Tune stopped (ASHA) ended its fit on purpose: "stopped", not failed
        out = execute_tracked(
            p,
            store,
            Console(file=f),
            tracker,
            work_dir=work_dir.resolve(),
            metrics=lambda: {**_metrics(p), "wall_seconds": time.time() - t0},
            stopped=lambda: state["stopped"],
        )
    if not out.ok:
        failed = [f"{n.name}: {n.error}" for n in p if n.status == "failed"]
        raise PipelineError(f"trial {trial_id}: {'; '.join(failed) or 'a stage did not run'} (log: {log})")
    metrics = _metrics(p)
    metrics.update(
        {
            "stages_ran": ",".join(n.name for n in p if n.status == "ran"),
            "node_id": _node_id(),
            "mlflow_run_id": tracker.run_id or "",
        }
    )
    tune.report(metrics)


def trial_config(config: dict[str, Any], spec: dict[str, Any]) -> tuple[LoadedConfig, dict[str, Any], Any]:
    """A trial's config: the base config with the sweep's ``set``, the sampled params and the
    seed as overrides, in the sweep's work dir and store. Returns ``(config, params, seed)``
    (params as plain Python values)."""
    params = {k: plain(v) for k, v in (config.get("params") or {}).items()}
    seed = config.get("seed")
    overrides = [*spec["set"], *(as_override(k, v) for k, v in params.items())]
    if seed is not None:
        overrides.append(as_override(spec["seed_key"], seed))
    cfg = config_from_raw(spec["path"], copy.deepcopy(spec["raw"]), overrides)
    cfg.run.work_dir, cfg.run.store = spec["work_dir"], spec["store"]
    return cfg, params, seed


def training_reports(stages: dict[str, str], state: dict[str, Any] | None = None) -> Any:
    """A context in which every training stage's progress report (every ``log_every`` steps and
    at the last step; ``pipeline.training.progress.forward_progress``) becomes a Tune result of
    this trial: ``{<stage>/step, <stage>/loss, <stage>/lr}``, what ASHA's ``asha_metric`` reads.

    Args:
        stages: Ray Train run names (``ArtifactStore.checkpoint_dir``) -> stage names; a fit
            whose name is not listed is not forwarded.
        state: if given, ``state["stopped"]`` is set True when Tune stops the trial during a
            report (the fit is then ended by its relay: ``pipeline.training.progress.end_run``).

    ``ray.tune.report`` may come from any thread of the trial's process (Tune's function session
    is process-wide: a queue to the trial actor, then a wait until Tune takes the result), here
    the fit's progress relay thread. (A trial's fit needs workers: Train V2 refuses an in-process
    fit, ``num_workers=0``, in a Tune session.) When Tune stops the trial (ASHA), the actor is
    stopped; a report waiting then ends with ``SystemExit``, which no progress guard swallows.
    """
    from ray import tune

    from pipeline.training.progress import forward_progress

    def report(name: str, record: Any) -> None:
        stage = stages.get(name)
        if stage is not None:
            try:
                tune.report(
                    {
                        f"{stage}/step": int(record.step),
                        f"{stage}/loss": float(record.loss),
                        f"{stage}/lr": float(record.lr),
                    }
                )
            except Exception:
                raise
            except BaseException:  # SystemExit: Tune stopped this trial
                if state is not None:
                    state["stopped"] = True
                raise

    return forward_progress(report)


def _metrics(p: Any) -> dict[str, float]:
    return {
        f"{n.name}/{k}": float(v)
        for n in p
        for k, v in n.metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


__all__ = ["trial", "trial_config", "training_reports"]
