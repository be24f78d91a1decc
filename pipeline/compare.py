"""``zeroseg compare``: a table and an HTML report of the invocations in an MLflow experiment.

Rows are *invocations* (parent runs: ``zeroseg run``, a sweep's trials and its shared upstream
are nested under the sweep's run), read with ``mlflow.search_runs``. Columns: the headline
params every parent run carries (``method``, ``clip_model``, ``clip_weights``, ``split``,
``seed``; ``pipeline.tracking.headline_params``), the params that differ between the compared
runs (a sweep trial's ``zeroseg.trial_params``), and evaluate's metrics on one set: mIoU
seen/unseen, hIoU, pAcc, and FPS. Runs that differ only in their seed are one configuration:
its metrics are shown as mean +- sample std over the seeds.

The report (``report.html`` + PNGs) has the table, seen vs unseen mIoU of every configuration,
and the per-class unseen IoU of the best ``--top`` runs (read from their evaluate artifacts:
``metrics.json`` at the evaluate run's ``artifact_uri``), drawn as sorted horizontal bars (the
top and bottom classes for large vocabularies such as COCO-Stuff's 171). It is logged as the
artifacts of a ``compare`` run in the same experiment.

Imports neither Ray nor the stages; plotting uses matplotlib's Agg canvas.
"""

from __future__ import annotations

import html
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

#: evaluate's metrics per set, as the table shows them.
COLUMNS = ("mIoU_seen", "mIoU_unseen", "hIoU", "pAcc")
SEEN_COLOUR = "#4C72B0"
UNSEEN_COLOUR = "#DD8452"
OTHER_COLOUR = "#8C8C8C"
#: params that name a seed: runs differing only in these are one configuration.
SEED_PARAMS = ("seed",)


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_seen_unseen(points: Sequence[tuple[str, float, float]], path: str | Path, title: str = "") -> Path:
    """Scatter of seen vs unseen mIoU (percent), one labelled point per run, with hIoU
    iso-lines (hIoU = 2 s u / (s + u); GZS3's headline).

    Args:
        points: ``(label, mIoU_seen, mIoU_unseen)`` per run; non-finite values are left out.
        path: output ``.png``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    fig = _canvas(6.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    pts = [(lab, s, u) for lab, s, u in points if math.isfinite(s) and math.isfinite(u)]
    top = max([10.0, *(max(s, u) * 1.1 for _, s, u in pts)])
    grid = np.linspace(1e-3, top, 200)
    for h in np.linspace(top / 5, top * 0.8, 4):
        u = h * grid / np.maximum(2 * grid - h, 1e-9)  # from h = 2su/(s+u)
        ok = (2 * grid > h) & (u <= top)
        ax.plot(grid[ok], u[ok], color=OTHER_COLOUR, linewidth=0.6, linestyle=":")
        if ok.any():
            ax.annotate(f"hIoU {h:.1f}", (grid[ok][-1], u[ok][-1]), fontsize=6, color=OTHER_COLOUR)
    for lab, s, u in pts:
        ax.scatter([s], [u], color=UNSEEN_COLOUR, s=25, zorder=3)
        ax.annotate(lab, (s, u), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("mIoU seen (%)")
    ax.set_ylabel("mIoU unseen (%)")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_class_bars(
    runs: dict[str, dict[str, float]], path: str | Path, title: str = "", max_classes: int = 40
) -> tuple[Path, list[str]]:
    """Per-class IoU (percent) of a few runs as horizontal bars, classes sorted by the first
    run's IoU (best on top); readable for any vocabulary: with more than ``max_classes``
    classes only the top and bottom ``max_classes // 2`` are drawn (the title says so).

    Args:
        runs: ``{run label: {class name: IoU}}``; the first run orders the classes; a class a
            run lacks (or NaN) has no bar.
        path: output ``.png``.
        max_classes: most classes drawn.

    Returns:
        ``(path, the class names drawn, top to bottom)``.
    """
    from matplotlib.patches import Patch

    labels = list(runs)
    if not labels:
        raise ValueError("no runs to plot")
    first = runs[labels[0]]
    names = sorted(
        {n for r in runs.values() for n in r},
        key=lambda n: -first.get(n, -1.0) if math.isfinite(first.get(n, -1.0)) else 1.0,
    )
    cut = len(names) > max_classes
    if cut:
        half = max_classes // 2
        names = names[:half] + names[-half:]
    k = len(labels)
    fig = _canvas(8.0, max(3.0, 0.18 * len(names) * max(1, k) ** 0.5 + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    h = 0.8 / k
    colours = [UNSEEN_COLOUR, SEEN_COLOUR, OTHER_COLOUR, "#55A868", "#C44E52", "#8172B2"]
    for j, lab in enumerate(labels):
        vals = [runs[lab].get(n, math.nan) for n in names]
        vals = [v if v is not None and math.isfinite(v) else 0.0 for v in vals]
        ax.barh(y - 0.4 + h * (j + 0.5), vals, height=h, color=colours[j % len(colours)])
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    drawn = [v for r in runs.values() for n in names if (v := r.get(n)) is not None and math.isfinite(v)]
    ax.set_xlim(0, min(100.0, max([1.0, *drawn]) * 1.15))
    ax.set_xlabel("IoU (%)")
    if cut:
        ax.axhline(max_classes // 2 - 0.5, color="black", linewidth=0.8, linestyle="--")
    full = title + (
        f" (top and bottom {max_classes // 2} of {len(set().union(*map(set, runs.values())))})" if cut else ""
    )
    if full:
        ax.set_title(full, fontsize=10)
    ax.legend(
        handles=[Patch(color=colours[j % len(colours)], label=lab) for j, lab in enumerate(labels)],
        loc="lower right",
        fontsize=7,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out, names


# =============================================================================================
# runs
# =============================================================================================
def find_runs(tracking_uri: str, experiment: str | None, run_ids: Sequence[str] | None = None) -> Any:
    """The invocations (parent runs with evaluate metrics) of ``experiment``, or ``run_ids``
    (a sweep's run id stands for its trials), from ``mlflow.search_runs``: ``(invocations,
    every run of their experiments)`` as pandas DataFrames. A sweep trial that ran twice (its
    sweep was interrupted after the trial's MLflow run ended but before Tune took its result, so
    the resumed sweep ran it again) counts once: its newest run (same ``zeroseg.sweep_id`` and
    ``zeroseg.trial_id``).

    Raises:
        ConfigError: no such experiment, or no run with evaluate metrics.
    """
    import mlflow

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
    metric_cols = [c for c in parents.columns if c.startswith("metrics.evaluate/")]
    if metric_cols:
        parents = parents[parents[metric_cols].notna().any(axis=1)]
    if parents.empty or not metric_cols:
        raise ConfigError(f"no run with evaluate metrics among {'the given runs' if run_ids else repr(experiment)}")
    if "tags.zeroseg.trial_id" in parents and "tags.zeroseg.sweep_id" in parents:
        trial = parents["tags.zeroseg.trial_id"].notna() & parents["tags.zeroseg.sweep_id"].notna()
        newest = (
            parents[trial]
            .sort_values("start_time")
            .drop_duplicates(["tags.zeroseg.sweep_id", "tags.zeroseg.trial_id"], keep="last")
        )
        parents = parents[~trial | parents.index.isin(newest.index)]
    return parents.reset_index(drop=True), df


def eval_sets(runs: Any) -> list[str]:
    """The evaluate sets the runs report (``metrics.evaluate/<set>/hIoU``), in column order."""
    out = []
    for c in runs.columns:
        if c.startswith("metrics.evaluate/") and c.endswith("/hIoU") and c.count("/") == 2:
            out.append(c.split("/")[1])
    return out


def varying_params(runs: Any) -> list[str]:
    """Param columns (without ``params.``) whose value differs between runs, plus the headline
    params; stage-qualified duplicates of the headline are left out."""
    from pipeline.tracking import HEADLINE

    cols = [c for c in runs.columns if c.startswith("params.")]
    out = [c[7:] for c in cols if c[7:] in HEADLINE]
    for c in cols:
        name = c[7:]
        if name in out:
            continue
        vals = runs[c].fillna("<unset>").astype(str)
        if vals.nunique() > 1:
            out.append(name)
    return out


def table(runs: Any, eval_set: str, metric: str = "hIoU") -> list[dict[str, Any]]:
    """One row per configuration (runs that differ only in a seed param grouped), best first by
    ``metric``: ``{"runs", "label", "params", "n", <metric>: (mean, std), "fps": (mean, std)}``.

    ``std`` is the sample standard deviation (n - 1) over the configuration's runs; NaN for one.
    """
    params = varying_params(runs)
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
        for m in (*COLUMNS, "fps"):
            col = f"metrics.evaluate/{eval_set}/{m}" if m != "fps" else "metrics.evaluate/fps"
            v = r.get(col)
            if v is not None and isinstance(v, (int, float)) and math.isfinite(v):
                g["values"].setdefault(m, []).append(float(v))
    rows = []
    for g in groups.values():
        row = {"runs": g["runs"], "params": g["params"], "n": len(g["runs"])}
        for m in (*COLUMNS, "fps"):
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


def per_class_unseen(all_runs: Any, parent_id: str, eval_set: str) -> dict[str, float] | None:
    """Per-class IoU of the unseen classes of ``eval_set`` for an invocation: from the
    ``metrics.json`` of its evaluate artifact (the evaluate run's ``artifact_uri`` tag); None
    when it cannot be read."""
    from pipeline import uri as uri_

    ev = all_runs[(all_runs["tags.mlflow.parentRunId"] == parent_id) & (all_runs["tags.stage"] == "evaluate")]
    for _, r in ev.iterrows():
        art = r.get("tags.artifact_uri")
        if not isinstance(art, str) or not art:
            continue
        try:
            if uri_.is_local(art):
                doc = json.loads(Path(uri_.local_path(art), "metrics.json").read_text())
            else:
                fs, base = uri_.filesystem(art)
                with fs.open_input_stream(f"{base}/metrics.json") as f:
                    doc = json.loads(f.read())
        except (OSError, ValueError):
            continue
        entry = doc.get(eval_set) or {}
        rows = (entry.get("gzs3") or {}).get("per_class") or []
        return {x["name"]: x["iou"] for x in rows if x.get("split") == "unseen" and x.get("iou") is not None}
    return None


# =============================================================================================
# the command
# =============================================================================================
def report(
    runs: Any, all_runs: Any, rows: list[dict[str, Any]], eval_set: str, metric: str, out: Path, top: int = 3
) -> Path:
    """Write ``out/report.html`` with ``seen_unseen.png`` and ``unseen_per_class.png``."""
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    pts = [(r["label"], r["mIoU_seen"][0], r["mIoU_unseen"][0]) for r in rows]
    plot_seen_unseen(pts, out / "seen_unseen.png", f"{eval_set}: seen vs unseen mIoU")
    plots.append(("seen_unseen.png", "Seen vs unseen mIoU per configuration (dotted: hIoU iso-lines)"))
    best: dict[str, dict[str, float]] = {}
    for r in rows[:top]:
        pc = per_class_unseen(all_runs, r["runs"][0], eval_set)
        if pc:
            best[r["label"]] = pc
    if best:
        plot_class_bars(best, out / "unseen_per_class.png", f"{eval_set}: unseen IoU per class, best runs")
        plots.append(("unseen_per_class.png", f"Per-class unseen IoU of the best {len(best)} run(s), sorted"))
    head = ["configuration", "runs", *COLUMNS, "FPS"]
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c))}</td>"
            for c in [
                r["label"],
                r["n"],
                *(fmt(r[m]) for m in COLUMNS),
                fmt(r["fps"], 1),
            ]
        )
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


def cmd_compare(args: Any, console: Any) -> int:
    """``zeroseg compare`` (see the module docstring)."""
    from rich.table import Table
    from rich.text import Text

    from pipeline import tracking
    from pipeline.config import RunSection, load_config

    run = load_config(args.config).run if args.config else RunSection(work_dir="work")
    tracking_uri = args.tracking_uri or run.mlflow_uri()
    experiment = args.experiment or run.experiment or run.name
    with _quiet(args.verbose):
        runs, all_runs = find_runs(tracking_uri, experiment, args.runs)
    sets = eval_sets(runs)
    eval_set = args.eval_set or ("val" if "val" in sets else sets[0])
    if eval_set not in sets:
        raise ConfigError(f"--eval-set {eval_set}: the runs report evaluate sets {', '.join(sets)}")
    if args.metric not in (*COLUMNS, "fps"):
        raise ConfigError(f"--metric {args.metric}: one of {', '.join((*COLUMNS, 'fps'))}")
    rows = table(runs, eval_set, args.metric)
    t = Table(title=Text(f"{experiment}: evaluate on {eval_set}, by {args.metric}"), title_justify="left")
    for col in ("configuration", "runs", *COLUMNS, "FPS"):
        t.add_column(col)
    for r in rows:
        t.add_row(Text(r["label"]), str(r["n"]), *(fmt(r[m]) for m in COLUMNS), fmt(r["fps"], 1))
    console.print(t)
    out = Path(args.out) if args.out else Path(run.work_dir) / "reports" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    path = report(runs, all_runs, rows, eval_set, args.metric, out, args.top)
    with _quiet(args.verbose):
        exp_id = tracking.setup(tracking_uri, experiment if not args.runs else _experiment_of(runs))
        import mlflow

        client = mlflow.tracking.MlflowClient()
        r = client.create_run(
            exp_id, run_name="compare", tags={"zeroseg.kind": "compare", "compared_runs": ",".join(runs["run_id"])}
        )
        client.log_artifacts(r.info.run_id, str(out), "report")
        client.set_terminated(r.info.run_id)
    console.line(f"report: {path} (logged to MLflow run {r.info.run_id}, artifacts report/)")
    return 0


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
    "COLUMNS",
    "cmd_compare",
    "eval_sets",
    "find_runs",
    "fmt",
    "per_class_unseen",
    "plot_class_bars",
    "plot_seen_unseen",
    "report",
    "table",
    "varying_params",
]
