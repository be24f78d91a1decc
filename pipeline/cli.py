"""The command line: ``zeroseg run`` (the DAG of a config), ``zeroseg gc`` (store housekeeping),
``zeroseg sweep`` (Ray Tune, :mod:`pipeline.sweep`) and ``zeroseg compare`` (MLflow runs,
:mod:`pipeline.compare`).

``python pipeline/run.py --config ...`` is ``zeroseg run --config ...`` (what ``ray job submit``
runs). The stages come from the project's stage catalogue, named by :data:`STAGES_ENTRY`
(``module:attribute``, :mod:`pipeline.catalogue`), so ``pipeline`` imports no stage and knows no
science. Each command is short: the invocation itself (config, log, tracking store, cluster,
tracked execution) is :mod:`pipeline.invocation`, the cluster :mod:`pipeline.cluster`, what is
printed :mod:`pipeline.report`.

Exit status: 0 done, 1 a stage failed (the table says which and why), 2 bad config, selection or
store, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pipeline import compare
from pipeline.catalogue import STAGES_ENTRY, Catalogue, load_catalogue
from pipeline.cluster import job_copy_notes
from pipeline.config import config_yaml, load_config
from pipeline.console import Console
from pipeline.errors import find_user_error, is_user_error
from pipeline.invocation import config_of, invocation_log, open_store, run_dag, session, start_time
from pipeline.plan import Plan, Selection, plan
from pipeline.report import mlflow_runs, print_gc, print_notes, print_wall_time


# =============================================================================================
# arguments
# =============================================================================================
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/sample.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set evaluate.gamma=0.1",
    )
    p.add_argument("--store", help="artifact store: local path or s3://, gs:// URI (overrides run.store)")
    p.add_argument("--work-dir", help="work directory (overrides run.work_dir)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's and MLflow's own logs")


def build_parser(catalog: Catalogue | None = None) -> argparse.ArgumentParser:
    """The ``zeroseg`` argument parser (subcommands ``run``, ``gc``, ``sweep`` and ``compare``;
    ``compare``'s help and default metric are the ``catalog``'s report's, None: the project's)."""
    ap = argparse.ArgumentParser(prog="zeroseg", description="zero-shot semantic segmentation pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
    _run_arguments(sub)
    _gc_arguments(sub)
    _sweep_arguments(sub)
    compare.add_parser(sub, catalog)
    return ap


def _run_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    r = sub.add_parser(
        "run",
        help="run the stage DAG of a config",
        description="Run the stage DAG of a config: cached stages are reported, the others run.",
    )
    _common(r)
    r.add_argument("--stages", nargs="+", metavar="STAGE", help="run only these stages (their upstream must be cached)")
    r.add_argument("--from", dest="from_stage", metavar="STAGE", help="run this stage and everything downstream of it")
    r.add_argument(
        "--force",
        nargs="*",
        metavar="STAGE",
        default=None,
        help="re-run even if cached: the named stages, or every selected stage when none is named",
    )
    r.add_argument("--dry-run", action="store_true", help="print the plan (stages, keys, what would run, why) and exit")
    r.add_argument(
        "--print-config", action="store_true", help="print the merged, validated config (YAML) and exit; plans nothing"
    )
    return r


def _gc_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "gc",
        help="list (and with --delete remove) artifacts no kept run references",
        description="List the store's artifacts and checkpoints that no MLflow run of the tracking "
        "store and no --keep config references; --delete removes them.",
    )
    _common(g)
    g.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="CONFIG",
        help="also keep every artifact this config's plan references (repeatable)",
    )
    g.add_argument("--delete", action="store_true", help="remove what is listed (default: only list)")
    g.add_argument(
        "--grace",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="keep anything younger than this (an invocation may still be writing it; default 600)",
    )
    return g


def _sweep_arguments(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    s = sub.add_parser(
        "sweep",
        help="a Ray Tune sweep over config keys (configs/sweeps/*.yaml)",
        description="Run (or continue) a Ray Tune sweep: the shared upstream once, one trial per "
        "sampled configuration (and seed), nested MLflow runs, mean +- std over seeds.",
    )
    _common(s)
    s.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/zegformer_gamma_lambda.yaml")
    return s


# =============================================================================================
# commands
# =============================================================================================
def cmd_run(args: argparse.Namespace, console: Console, catalog: Catalogue | None = None) -> tuple[int, Plan | None]:
    """``zeroseg run``: plan, print the plan, execute, print results
    (:func:`pipeline.invocation.run_dag`). Returns (status, plan).

    Library output (Ray, MLflow) goes to ``<work_dir>/logs/run-<time>-<pid>.log``, not the
    terminal (``--verbose`` shows it)."""
    t_start = start_time()
    cfg = config_of(args)
    catalog = catalog or load_catalogue()
    if args.print_config:  # before anything is created
        sys.stdout.write(config_yaml(cfg, catalog.stages))
        return 0, None
    with invocation_log(cfg, "run", args.verbose) as log_file:
        selection = Selection(stages=args.stages, from_stage=args.from_stage, force=args.force)
        return run_dag(
            cfg,
            console,
            catalog,
            selection,
            dry_run=args.dry_run,
            verbose=args.verbose,
            t_start=t_start,
            log_file=log_file,
        )


def cmd_sweep(args: argparse.Namespace, console: Console, catalog: Catalogue | None = None) -> int:
    """``zeroseg sweep`` (see :mod:`pipeline.sweep`): 0 every trial finished, 1 some failed, 130
    some were interrupted (the same command continues them)."""
    from pipeline.sweep import load_sweep, print_outcome, run_sweep

    t_start = time.time()
    cfg = config_of(args)
    catalog = catalog or load_catalogue()
    sw = load_sweep(args.sweep, catalog.sweep_defaults)
    with invocation_log(cfg, "sweep", args.verbose) as log_file:
        print_notes(console, job_copy_notes(cfg))
        with session(cfg, console, log_file.parent, args.verbose) as cluster:
            out = run_sweep(
                cfg,
                sw,
                console,
                catalog=catalog,
                init_cluster=cluster.start,
                sweep_path=str(args.sweep),
                tracking_uri=cluster.tracking_uri,
            )
    status = print_outcome(console, sw, out)
    console.line(f"MLflow: sweep run {out.sweep_run_id}; {mlflow_runs(cfg, served=True)}")
    print_wall_time(console, t_start)
    return status


def cmd_gc(args: argparse.Namespace, console: Console, catalog: Catalogue | None = None) -> int:
    """``zeroseg gc`` (see :mod:`pipeline.gc`): list (``--delete``: remove) what no MLflow run of
    the tracking store and no kept config (``--keep``) references."""
    from pipeline.gc import collect, referenced_keys
    from pipeline.tracking import flush_journal

    cfg = config_of(args)
    with invocation_log(cfg, "gc", args.verbose):
        catalog = catalog or load_catalogue()
        store = open_store(cfg, False)
        kept = [cfg] + [load_config(k) for k in args.keep]
        plans = [plan(c, catalog.stages, None, None, code_packages=catalog.code_packages, checks=False) for c in kept]
        flush_journal(Path(cfg.run.work_dir) / "tracking-journal", cfg.run.mlflow_uri())  # runs not yet logged count
        refs, sources = referenced_keys(plans, cfg.run.mlflow_uri())
        report = collect(store, refs, delete=args.delete, grace=args.grace)
        print_gc(console, cfg.run.store_uri(), sources, report, args.delete)
    return 0


# =============================================================================================
# entry points
# =============================================================================================
def main(argv: Sequence[str] | None = None, catalog: Catalogue | None = None) -> int:
    """``zeroseg ...``; returns the exit status."""
    args = build_parser(catalog).parse_args(argv)
    console = Console(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "run":
            return cmd_run(args, console, catalog)[0]
        if args.command == "sweep":
            return cmd_sweep(args, console, catalog)
        if args.command == "compare":
            return compare.cmd_compare(args, console, catalog)
        return cmd_gc(args, console, catalog)
    except KeyboardInterrupt:
        console.line("interrupted", "error")
        return 130
    except Exception as e:
        user = find_user_error(e)
        if user is None and not is_user_error(e):
            raise
        console.error(str(user or e))
        return 2


def run_main(argv: Sequence[str] | None = None) -> int:
    """``python pipeline/run.py ARGS`` = ``zeroseg run ARGS`` (the ``ray job submit`` entry)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("run", "gc", "sweep", "compare", "-h", "--help"):
        argv = ["run", *argv]
    return main(argv)


__all__ = ["STAGES_ENTRY", "build_parser", "cmd_gc", "cmd_run", "cmd_sweep", "main", "run_main"]
