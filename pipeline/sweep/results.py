"""A sweep's results: the trials' rows (:func:`trial_rows`), configurations aggregated over seeds
(:func:`aggregate`, :class:`ConfigResult`), what :func:`pipeline.sweep.run_sweep` returns
(:class:`SweepOutcome`), the summary logged to the sweep's MLflow run (:func:`log_summary`), and
what is printed: a line per finished trial (:func:`progress_callback`), the table
(:func:`format_results`) and the closing lines (:func:`print_outcome`)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .prefix import plain
from .spec import SweepFile


@dataclasses.dataclass
class ConfigResult:
    """One configuration of a sweep: its params, and its metric over seeds.

    Attributes:
        params: ``{key: value}`` (without the seed).
        values: the metric per finished trial (one per seed).
        seeds: the seeds of ``values``.
        mean, std: over ``values``; ``std`` is the sample standard deviation (n - 1), NaN for
            one value.
        trials: trial ids.
    """

    params: dict[str, Any]
    values: list[float]
    seeds: list[Any]
    trials: list[str]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan


def aggregate(rows: Sequence[dict[str, Any]], metric: str, mode: str) -> list[ConfigResult]:
    """Group finished trials by their params (seed excluded) into :class:`ConfigResult`, best
    first (by mean, ``mode`` max or min).

    Args:
        rows: ``{"trial_id", "params", "seed", "metrics"}`` per trial; trials without the metric
            (errored, stopped before reporting it) are left out.
    """
    groups: dict[str, ConfigResult] = {}
    for r in rows:
        v = (r.get("metrics") or {}).get(metric)
        if v is None or not math.isfinite(float(v)):
            continue
        k = json.dumps(r["params"], sort_keys=True, default=str)
        g = groups.setdefault(k, ConfigResult(dict(r["params"]), [], [], []))
        g.values.append(float(v))
        g.seeds.append(r.get("seed"))
        g.trials.append(r["trial_id"])
    out = list(groups.values())
    out.sort(key=lambda g: g.mean, reverse=mode == "max")
    return out


@dataclasses.dataclass
class SweepOutcome:
    """What :func:`run_sweep` did.

    Attributes:
        ok: every trial finished or was stopped by ASHA (False after an interruption: re-run
            to continue).
        restored: the experiment was continued (``Tuner.restore``).
        shared: the shared prefix's nodes (from the driver's plan), with their status.
        rows: per trial ``{"trial_id", "params", "seed", "metrics", "status", "error"}``
            (status ``finished``, ``stopped``, ``error`` or ``unfinished``).
        results: :func:`aggregate` of ``rows``.
        sweep_run_id: the sweep's MLflow run.
        experiment_path: the Tune experiment directory (store URI).
    """

    ok: bool
    restored: bool
    shared: list[Any]
    rows: list[dict[str, Any]]
    results: list[ConfigResult]
    sweep_run_id: str
    experiment_path: str


def trial_rows(grid: Any, target: str) -> list[dict[str, Any]]:
    """One row per trial of Tune's ``ResultGrid``: ``{"trial_id", "params", "seed", "metrics",
    "status", "error"}`` (status: :func:`status_of`; metrics: the last result's numbers and
    strings; error: its first line)."""
    rows = []
    for r in grid:
        c = r.config or {}
        rows.append(
            {
                "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
                "params": {k: plain(v) for k, v in (c.get("params") or {}).items()},
                "seed": c.get("seed"),
                "metrics": {k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float, str))},
                "status": status_of(r, target),
                "error": str(r.error).splitlines()[0] if r.error else None,
            }
        )
    return rows


def status_of(r: Any, target: str) -> str:
    """``error``; ``finished`` (its final result has the target); ``stopped`` (ASHA stopped it
    mid-training: its last result is marked done, without the target); ``unfinished``
    (interrupted: re-run the sweep to continue it)."""
    m = r.metrics or {}
    if r.error:
        return "error"
    if target in m:
        return "finished"
    return "stopped" if m.get("done") else "unfinished"


def log_summary(
    run_id: str,
    tracking_uri: str,
    sw: SweepFile,
    rows: list[dict[str, Any]],
    results: list[ConfigResult],
    ok: bool,
    work_dir: Path,
) -> None:
    """Write ``<work_dir>/sweeps/<name>/sweep_summary.json`` (metric, mode, configurations,
    trials), log it to the sweep's MLflow run ``run_id`` with the best configuration's
    ``best/<metric>`` (and ``_std``) and ``best_params``, and end that run: FINISHED when ``ok``,
    KILLED when a trial is unfinished (interrupted), else FAILED."""
    from pipeline import tracking

    mlflow = tracking._mlflow()
    client = mlflow.tracking.MlflowClient(tracking_uri)
    summary = {
        "metric": sw.target,
        "mode": sw.mode,
        "configurations": [
            {
                "params": g.params,
                "seeds": g.seeds,
                "values": g.values,
                "mean": g.mean,
                "std": None if math.isnan(g.std) else g.std,
                "trials": g.trials,
            }
            for g in results
        ],
        "trials": rows,
    }
    out = work_dir / "sweeps" / sw.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    client.log_artifact(run_id, str(out / "sweep_summary.json"))
    if results:
        best = results[0]
        client.log_batch(
            run_id,
            metrics=[
                mlflow.entities.Metric(f"best/{sw.target}", best.mean, int(time.time() * 1000), 0),
                *(
                    [mlflow.entities.Metric(f"best/{sw.target}_std", best.std, int(time.time() * 1000), 0)]
                    if not math.isnan(best.std)
                    else []
                ),
            ],
        )
        client.set_tag(run_id, "best_params", json.dumps(best.params, sort_keys=True, default=str))
    unfinished = any(r["status"] == "unfinished" for r in rows)
    client.set_terminated(run_id, "FINISHED" if ok else "KILLED" if unfinished else "FAILED")


def progress_callback(console: Any, metric: str) -> Any:
    """A Tune callback: one line per trial that ends (its metric or its error)."""
    from ray.tune import Callback

    class Progress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}
            v = last.get(metric)
            step = next((f"{k} {last[k]}" for k in last if k.endswith("/step")), "")
            shown = (
                f"{metric} {v:.3f}"
                if isinstance(v, (int, float))
                else f"stopped by ASHA at {step}"
                if step
                else "no result"
            )
            console.line(
                f"  trial {trial.trial_id} {describe(trial.config.get('params') or {}, trial.config.get('seed'))}: {shown}",
                "ok",
            )

        def on_trial_error(self, iteration, trials, trial, **info):
            console.line(f"  trial {trial.trial_id} failed (see its log)", "error")

    return Progress()


def format_results(sw: SweepFile, results: list[ConfigResult]) -> Any:
    """A rich table of the configurations, best first (mean +- std over seeds)."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(f"sweep {sw.name}: {sw.target} ({sw.mode})"), title_justify="left")
    keys = list(dict.fromkeys(k for g in results for k in g.params))
    for k in keys:
        t.add_column(k)
    for col in ("seeds", "mean", "std", "values"):
        t.add_column(col)
    for g in results:
        t.add_row(
            *(Text(fmt(g.params.get(k))) for k in keys),
            Text(",".join(str(s) for s in g.seeds if s is not None) or "-"),
            f"{g.mean:.3f}",
            "-" if math.isnan(g.std) else f"{g.std:.3f}",
            Text(", ".join(f"{v:.3f}" for v in g.values)),
        )
    return t


def print_outcome(console: Any, sw: SweepFile, out: SweepOutcome) -> int:
    """Print the results table, each failed trial's error, and how many trials ASHA stopped or
    an interruption left unfinished. Returns the exit status: 0 every trial finished (or was
    stopped by ASHA), 130 some are unfinished (the same command continues them), else 1."""
    console.print(format_results(sw, out.results))
    for r in out.rows:
        if r["status"] == "error":
            console.line(f"trial {r['trial_id']} {r['params']} seed {r['seed']}: {r['error']}", "error")
    stopped = sum(r["status"] == "stopped" for r in out.rows)
    if stopped:
        console.line(f"ASHA stopped {stopped} trial(s) during training (not in the table: no {sw.target})")
    unfinished = sum(r["status"] == "unfinished" for r in out.rows)
    if unfinished:
        console.line(f"interrupted: {unfinished} trial(s) unfinished; run the same command again to continue", "warn")
    return 0 if out.ok else 130 if unfinished else 1


def describe(params: dict[str, Any], seed: Any) -> str:
    """``<key leaf>=<value> ... seed=<seed>``: a trial's sampled params, for people."""
    parts = [f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in params.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def fmt(v: Any) -> str:
    """A float with 4 significant digits; anything else as ``str``."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


__all__ = [
    "ConfigResult",
    "SweepOutcome",
    "aggregate",
    "describe",
    "format_results",
    "log_summary",
    "print_outcome",
    "progress_callback",
    "status_of",
    "trial_rows",
]
