"""``zeroseg compare``: a table and an HTML report of the invocations in an MLflow experiment.

Rows are *invocations* (parent runs: ``zeroseg run``, a sweep's trials and its shared upstream
are nested under the sweep's run), read with ``mlflow.search_runs``. Columns: the headline
params every parent run carries (the catalogue's headline declaration,
``pipeline.tracking.headline_params``), the params that differ between the compared runs (a sweep
trial's ``zeroseg.trial_params``), and the report's metrics on one set. Runs that differ only in
their seed are one configuration: its metrics are shown as mean +- sample std over the seeds.

What is compared is declared by the stage catalogue (:attr:`pipeline.catalogue.Catalogue.report`,
a :class:`Report`): the stage whose metrics the parent runs carry, the metric columns and their
MLflow names, the sets, the default rank metric and the plots. This module finds the runs,
groups them, writes the table and the HTML page (``report.html``: the table, the configurations,
the report's plots) and logs the page as the artifacts of a ``compare`` run in the same
experiment.

Imports neither Ray nor the stages (the catalogue is loaded by name).
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pipeline.errors import ConfigError

#: params that name a seed: runs differing only in these are one configuration.
SEED_PARAMS = ("seed",)


@dataclasses.dataclass(frozen=True)
class Column:
    """A metric column of the table.

    Attributes:
        name: the metric (a row's key, what ``--metric`` names; ``Report.metric_key`` maps it to
            the parent runs' MLflow metric).
        header: the column's title in the table and the HTML page.
        digits: decimals shown.
    """

    name: str
    header: str
    digits: int = 2


class Report(Protocol):
    """What a stage catalogue declares for ``zeroseg compare`` (its ``REPORT``).

    Attributes:
        stage: the stage whose metrics the parent runs carry (``<stage>/...``); runs without any
            are not compared.
        columns: the metric columns, in table order.
        default_metric: the column ranked by when ``--metric`` is not given.
        help: the command's description for ``zeroseg compare --help`` (:func:`add_parser`).
        eval_set_help, top_help: the help of ``--eval-set`` and ``--top``.
    """

    stage: str
    columns: Sequence[Column]
    default_metric: str
    help: str
    eval_set_help: str
    top_help: str

    def metric_key(self, eval_set: str, name: str) -> str:
        """The parent runs' MLflow metric of column ``name`` on ``eval_set``."""
        ...

    def eval_sets(self, runs: Any) -> list[str]:
        """The sets the runs (a ``search_runs`` DataFrame) report, in column order."""
        ...

    def default_eval_set(self, sets: Sequence[str]) -> str:
        """The set compared when ``--eval-set`` is not given."""
        ...

    def plots(
        self, rows: list[dict[str, Any]], all_runs: Any, eval_set: str, out: Path, top: int
    ) -> list[tuple[str, str]]:
        """Write the report's plots into ``out``; returns ``[(file name, caption)]``."""
        ...


def add_parser(sub: Any, catalog: Any = None) -> Any:
    """Add the ``compare`` command to ``sub`` (an ``argparse`` subparsers action), its help
    texts from the catalogue's report (``help``, ``eval_set_help``, ``top_help``, the default
    metric); ``catalog``: None: the project's. Returns the parser."""
    rep = _catalog(catalog).report
    c = sub.add_parser(
        "compare", help="a table and an HTML report of MLflow runs", description=getattr(rep, "help", None)
    )
    c.add_argument("--config", help="a config whose run section names the tracking store and experiment")
    c.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else sqlite in ./work)")
    c.add_argument("--experiment", help="experiment name (default: the config's)")
    c.add_argument("--runs", nargs="+", metavar="RUN_ID", help="only these runs (parent or sweep runs)")
    metric = getattr(rep, "default_metric", None)
    c.add_argument("--metric", default=metric, help=f"the metric to rank by (default {metric})")
    c.add_argument("--eval-set", help=getattr(rep, "eval_set_help", "the set compared"))
    c.add_argument("--out", help="report directory (default <work_dir>/reports/compare-<time>)")
    c.add_argument("--top", type=int, default=3, help=getattr(rep, "top_help", "runs plotted (default 3)"))
    c.add_argument("--verbose", action="store_true", help="also show MLflow's own logs")
    return c


def _catalog(catalog: Any) -> Any:
    if catalog is not None:
        return catalog
    from pipeline.catalogue import load_catalogue

    return load_catalogue()


def _report(catalog: Any) -> Report:
    rep = _catalog(catalog).report
    if rep is None:
        raise ConfigError("the stage catalogue declares no comparison report (REPORT): nothing to compare")
    return rep


# =============================================================================================
# runs
# =============================================================================================
def find_runs(
    tracking_uri: str, experiment: str | None, run_ids: Sequence[str] | None = None, catalog: Any = None
) -> Any:
    """The invocations (parent runs with the report stage's metrics) of ``experiment``, or
    ``run_ids`` (a sweep's run id stands for its trials), from ``mlflow.search_runs``:
    ``(invocations, every run of their experiments)`` as pandas DataFrames. A sweep trial that
    ran twice (its sweep was interrupted after the trial's MLflow run ended but before Tune took
    its result, so the resumed sweep ran it again) counts once: its newest run (same
    ``zeroseg.sweep_id`` and ``zeroseg.trial_id``).

    Args:
        catalog: the stage catalogue (its ``report.stage``); None: the project's.

    Raises:
        ConfigError: no such experiment, or no run with the report stage's metrics.
    """
    import mlflow

    stage = _report(catalog).stage
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.tracking.MlflowClient()
    if run_ids:
        exps = sorted({client.get_run(r).info.experiment_id for r in run_ids})
    else:
        exp = client.get_experiment_by_name(experiment or "")
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise ConfigError(
                f"no MLflow experiment {experiment!r} at {tracking_uri} (experiments: {', '.join(names) or 'none'})"
            )
        exps = [exp.experiment_id]
    df = mlflow.search_runs(exps, max_results=50000)
    if df.empty:
        raise ConfigError(f"no runs in experiment {experiment!r} at {tracking_uri}")
    for col in ("tags.stage", "tags.mlflow.parentRunId", "tags.zeroseg.kind", "tags.zeroseg.trial_params"):
        if col not in df:
            df[col] = None
    parents = df[df["tags.stage"].isna() & (df["tags.zeroseg.kind"] != "sweep")]
    if run_ids:
        wanted = set(run_ids)
        parents = parents[parents["run_id"].isin(wanted) | parents["tags.mlflow.parentRunId"].isin(wanted)]
    metric_cols = [c for c in parents.columns if c.startswith(f"metrics.{stage}/")]
    if metric_cols:
        parents = parents[parents[metric_cols].notna().any(axis=1)]
    if parents.empty or not metric_cols:
        raise ConfigError(f"no run with {stage} metrics among {'the given runs' if run_ids else repr(experiment)}")
    return _newest_trials(parents).reset_index(drop=True), df


def _newest_trials(parents: Any) -> Any:
    """``parents`` with one run per sweep trial (its newest)."""
    if "tags.zeroseg.trial_id" in parents and "tags.zeroseg.sweep_id" in parents:
        trial = parents["tags.zeroseg.trial_id"].notna() & parents["tags.zeroseg.sweep_id"].notna()
        newest = (
            parents[trial]
            .sort_values("start_time")
            .drop_duplicates(["tags.zeroseg.sweep_id", "tags.zeroseg.trial_id"], keep="last")
        )
        parents = parents[~trial | parents.index.isin(newest.index)]
    return parents


def varying_params(runs: Any, headline: Sequence[str] = ()) -> list[str]:
    """Param columns (without ``params.``) whose value differs between runs, plus the
    ``headline`` params (always shown, in the runs' column order)."""
    cols = [c for c in runs.columns if c.startswith("params.")]
    out = [c[7:] for c in cols if c[7:] in headline]
    for c in cols:
        name = c[7:]
        if name in out:
            continue
        vals = runs[c].fillna("<unset>").astype(str)
        if vals.nunique() > 1:
            out.append(name)
    return out


def table(runs: Any, eval_set: str, metric: str | None = None, catalog: Any = None) -> list[dict[str, Any]]:
    """One row per configuration (runs that differ only in a seed param grouped), best first by
    ``metric`` (default: the report's ``default_metric``): ``{"runs", "label", "params", "n",
    <column name>: (mean, std) for every report column}``.

    ``std`` is the sample standard deviation (n - 1) over the configuration's runs; NaN for one.
    ``catalog``: the stage catalogue (its report and headline); None: the project's.
    """
    from pipeline.tracking.headline import headline_names

    cat = _catalog(catalog)
    rep = _report(cat)
    metric = metric or rep.default_metric
    names = [c.name for c in rep.columns]
    params = varying_params(runs, headline_names(cat.headline))
    key_params = [p for p in params if p not in SEED_PARAMS and not p.endswith(".seed")]
    groups: dict[str, dict[str, Any]] = {}
    for _, r in runs.iterrows():
        ps = {p: _s(r.get(f"params.{p}")) for p in key_params}
        trial = r.get("tags.zeroseg.trial_params")
        if isinstance(trial, str) and trial:
            ps["trial"] = trial
        k = json.dumps(ps, sort_keys=True)
        g = groups.setdefault(k, {"params": ps, "runs": [], "values": {}})
        g["runs"].append(r["run_id"])
        for m in names:
            v = r.get(f"metrics.{rep.metric_key(eval_set, m)}")
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                g["values"].setdefault(m, []).append(float(v))
    rows = []
    for g in groups.values():
        row = {"runs": g["runs"], "params": g["params"], "n": len(g["runs"])}
        for m in names:
            vals = g["values"].get(m, [])
            row[m] = (
                statistics.fmean(vals) if vals else math.nan,
                statistics.stdev(vals) if len(vals) > 1 else math.nan,
            )
        row["label"] = _label(g["params"], g["runs"][0])
        rows.append(row)
    rows.sort(key=lambda r: -r[metric][0] if math.isfinite(r[metric][0]) else math.inf)
    return rows


def _s(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _label(params: dict[str, str], run_id: str) -> str:
    method = params.get("method") or "?"
    extra = params.get("trial")
    if extra:
        try:
            extra = " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in json.loads(extra).items())
        except ValueError:
            pass
    return f"{method} {extra}" if extra else f"{method} {run_id[:8]}"


def fmt(mean_std: tuple[float, float], digits: int = 2) -> str:
    """``mean +- std`` (``mean`` alone for one run, ``-`` for none)."""
    m, s = mean_std
    if not math.isfinite(m):
        return "-"
    return f"{m:.{digits}f}" if not math.isfinite(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def cells(row: dict[str, Any], columns: Sequence[Column]) -> list[str]:
    """A row's metric cells, formatted (:func:`fmt`) with each column's digits."""
    return [fmt(row[c.name], c.digits) for c in columns]


# =============================================================================================
# the report and the command
# =============================================================================================
def report(
    runs: Any,
    all_runs: Any,
    rows: list[dict[str, Any]],
    eval_set: str,
    metric: str,
    out: Path,
    top: int = 3,
    catalog: Any = None,
) -> Path:
    """Write ``out/report.html`` with the report's plots (PNGs beside it)."""
    rep = _report(catalog)
    out.mkdir(parents=True, exist_ok=True)
    plots = rep.plots(rows, all_runs, eval_set, out, top)
    head = ["configuration", "runs", *(c.header for c in rep.columns)]
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(str(c))}</td>" for c in [r["label"], r["n"], *cells(r, rep.columns)])
        + "</tr>"
        for r in rows
    )
    params = "".join(
        f"<tr><td>{html.escape(r['label'])}</td><td><code>{html.escape(json.dumps(r['params']))}</code></td>"
        f"<td>{html.escape(', '.join(x[:8] for x in r['runs']))}</td></tr>"
        for r in rows
    )
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>zeroseg compare</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style>
</head><body><h1>zeroseg compare: {html.escape(eval_set)}, ranked by {html.escape(metric)}</h1>
<p>{len(runs)} run(s) in {len(rows)} configuration(s); mean ± sample std over seeds where a configuration has several runs.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr>{body}</table>
<h2>Configurations</h2><table><tr><th>configuration</th><th>params</th><th>runs</th></tr>{params}</table>
{"".join(f'<h2>{html.escape(t)}</h2><img src="{f}">' for f, t in plots)}
</body></html>"""
    (out / "report.html").write_text(doc)
    return out / "report.html"


def cmd_compare(args: Any, console: Any, catalog: Any = None) -> int:
    """``zeroseg compare`` (see the module docstring); ``catalog``: the stage catalogue whose
    report and headline are compared (None: the project's, :func:`pipeline.catalogue.load_catalogue`)."""
    from pipeline.config import RunSection, load_config

    cat = _catalog(catalog)
    rep = _report(cat)
    run = load_config(args.config).run if args.config else RunSection(work_dir="work")
    tracking_uri = args.tracking_uri or run.mlflow_uri()
    experiment = args.experiment or run.experiment or run.name
    with _quiet(args.verbose):
        runs, all_runs = find_runs(tracking_uri, experiment, args.runs, cat)
    sets = rep.eval_sets(runs)
    eval_set = args.eval_set or rep.default_eval_set(sets)
    if eval_set not in sets:
        raise ConfigError(f"--eval-set {eval_set}: the runs report {rep.stage} sets {', '.join(sets)}")
    metric = args.metric or rep.default_metric
    names = [c.name for c in rep.columns]
    if metric not in names:
        raise ConfigError(f"--metric {metric}: one of {', '.join(names)}")
    rows = table(runs, eval_set, metric, cat)
    _print_table(console, f"{experiment}: {rep.stage} on {eval_set}, by {metric}", rows, rep.columns)
    out = Path(args.out) if args.out else Path(run.work_dir) / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path = report(runs, all_runs, rows, eval_set, metric, out, args.top, cat)
    with _quiet(args.verbose):
        run_id = _log_report(tracking_uri, experiment if not args.runs else _experiment_of(runs), runs, out)
    console.line(f"report: {path} (logged to MLflow run {run_id}, artifacts report/)")
    return 0


def _print_table(console: Any, title: str, rows: list[dict[str, Any]], columns: Sequence[Column]) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title), title_justify="left")
    for col in ("configuration", "runs", *(c.header for c in columns)):
        t.add_column(col)
    for r in rows:
        t.add_row(Text(r["label"]), str(r["n"]), *cells(r, columns))
    console.print(t)


def _log_report(tracking_uri: str, experiment: str, runs: Any, out: Path) -> str:
    """Log ``out`` as the artifacts (``report/``) of a new ``compare`` run; returns its id."""
    import mlflow

    from pipeline import tracking

    exp_id = tracking.setup(tracking_uri, experiment)
    client = mlflow.tracking.MlflowClient()
    r = client.create_run(
        exp_id, run_name="compare", tags={"zeroseg.kind": "compare", "compared_runs": ",".join(runs["run_id"])}
    )
    client.log_artifacts(r.info.run_id, str(out), "report")
    client.set_terminated(r.info.run_id)
    return r.info.run_id


def _experiment_of(runs: Any) -> str:
    import mlflow

    return mlflow.get_experiment(runs["experiment_id"].iloc[0]).name


def _quiet(verbose: bool) -> Any:
    import contextlib
    import logging

    if verbose:
        return contextlib.nullcontext()
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return contextlib.nullcontext()


__all__ = [
    "Column",
    "add_parser",
    "Report",
    "cells",
    "cmd_compare",
    "find_runs",
    "fmt",
    "report",
    "table",
    "varying_params",
]
