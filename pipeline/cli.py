"""The command line: ``zeroseg run`` (the DAG of a config), ``zeroseg gc`` (store housekeeping),
``zeroseg sweep`` (Ray Tune, :mod:`pipeline.sweep`) and ``zeroseg compare`` (MLflow runs,
:mod:`pipeline.compare`).

``python pipeline/run.py --config ...`` is ``zeroseg run --config ...`` (what ``ray job submit``
runs). The stages come from the project's stage catalogue, named by :data:`STAGES_ENTRY`
(``module:attribute``), so ``pipeline`` imports no stage and knows no science.

Exit status: 0 done, 1 a stage failed (the table says which and why), 2 bad config, selection or
store, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from pipeline.catalogue import STAGES_ENTRY, Catalogue, load_catalogue
from pipeline.config import LoadedConfig, config_yaml, load_config
from pipeline.console import Console, library_output_to, setup_logging
from pipeline.errors import PipelineError, find_user_error, is_user_error
from pipeline.plan import Plan, Selection, plan


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


def build_parser() -> argparse.ArgumentParser:
    """The ``zeroseg`` argument parser (subcommands ``run`` and ``gc``)."""
    ap = argparse.ArgumentParser(prog="zeroseg", description="zero-shot semantic segmentation pipeline")
    sub = ap.add_subparsers(dest="command", required=True)
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
    s = sub.add_parser(
        "sweep",
        help="a Ray Tune sweep over config keys (configs/sweeps/*.yaml)",
        description="Run (or continue) a Ray Tune sweep: the shared upstream once, one trial per "
        "sampled configuration (and seed), nested MLflow runs, mean +- std over seeds.",
    )
    _common(s)
    s.add_argument("--sweep", required=True, help="sweep file, e.g. configs/sweeps/zegformer_gamma_lambda.yaml")
    c = sub.add_parser(
        "compare",
        help="a table and an HTML report of MLflow runs",
        description="Compare invocations (parent runs) of an MLflow experiment: method, key params, "
        "mIoU seen/unseen, hIoU, pAcc, FPS, mean +- std over seeds; writes an HTML report with PNG "
        "plots and logs it as an artifact.",
    )
    c.add_argument("--config", help="a config whose run section names the tracking store and experiment")
    c.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, else sqlite in ./work)")
    c.add_argument("--experiment", help="experiment name (default: the config's)")
    c.add_argument("--runs", nargs="+", metavar="RUN_ID", help="only these runs (parent or sweep runs)")
    c.add_argument("--metric", default="hIoU", help="the metric to rank by (default hIoU)")
    c.add_argument("--eval-set", help="the evaluate set (default: val, else the first set the runs report)")
    c.add_argument("--out", help="report directory (default <work_dir>/reports/compare-<time>)")
    c.add_argument("--top", type=int, default=3, help="runs whose per-class unseen IoU is plotted (default 3)")
    c.add_argument("--verbose", action="store_true", help="also show MLflow's own logs")
    g.add_argument(
        "--grace",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="keep anything younger than this (an invocation may still be writing it; default 600)",
    )
    return ap


# =============================================================================================
# run
# =============================================================================================
def init_ray(cfg: LoadedConfig, console: Console, verbose: bool) -> bool:
    """Connect to ``run.ray.address`` / ``RAY_ADDRESS`` (set by ``ray job submit``), or start an
    embedded local cluster; a no-op when Ray is already initialised (returns False then, True
    when this call initialised it). Ray's own logs go to its session log files (and the
    invocation's log), not the terminal, unless ``verbose``."""
    import logging

    import ray

    from pipeline.errors import PipelineError

    if ray.is_initialized():
        return False
    rs = cfg.run.ray
    address = rs.address or os.environ.get("RAY_ADDRESS")
    quiet = dict(logging_level=logging.INFO if verbose else logging.WARNING, log_to_driver=verbose)
    if address:
        console.line(f"ray: connecting to {address}")
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise PipelineError(
                f"cannot join the Ray cluster at {address} ({type(e).__name__}: {e}); start it with "
                "`ray start --head`, or unset RAY_ADDRESS / run.ray.address for a local cluster"
            ) from None
    else:
        console.line("ray: starting an embedded local cluster")
        ray.init(
            address="local", num_cpus=rs.num_cpus, num_gpus=rs.num_gpus, include_dashboard=rs.include_dashboard, **quiet
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # one progress display per stage is ours
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = verbose
    res = ray.cluster_resources()
    console.line(f"ray: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs")
    return True


def check_store_reachable(store_uri: str) -> None:
    """Refuse a plain local-path store on a cluster of more than one node.

    A plain path (``work/store``) names a folder of *this* machine: a stage that runs on another
    node would write its artifact (and Ray Train its checkpoints) on that node's disk, where no
    other node finds it. ``file://<path>`` says the path is shared storage that every node
    mounts; ``s3://`` / ``gs://`` are reachable from everywhere.

    Raises:
        PipelineError: the store is a plain local path and Ray has more than one alive node.
    """
    import ray

    if "://" in store_uri or not ray.is_initialized():
        return
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        raise PipelineError(
            f"the artifact store {store_uri!r} is a local path, but this Ray cluster has {len(alive)} nodes: "
            "stages and trials placed on other nodes would write to their own disks and never see each "
            "other's artifacts or checkpoints. Use shared storage every node reaches: --store file:///<path "
            "mounted on every node (NFS)> or --store s3://<bucket>/<prefix> (see docs/cluster.md)"
        )


#: Set by Ray's job supervisor for a ``ray job submit`` driver: the job's runtime env (JSON).
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_copy_notes(cfg: LoadedConfig) -> list[str]:
    """Lines for people when this is a ``ray job submit --working-dir`` driver (it runs in Ray's
    copy of that directory) and the work dir, or a plain-path store, resolves inside the copy:
    a relative ``run.work_dir`` (configs default to ``${ZEROSEG_WORK:-work}``) puts results,
    the sqlite tracking store and logs in a temporary folder that Ray manages (and deletes when it
    needs the room), where nobody looks for them. Empty outside such a job."""
    import json

    try:
        runtime_env = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}").get("runtime_env") or {}
    except (ValueError, AttributeError):
        return []
    if not runtime_env.get("working_dir"):
        return []
    copy = Path.cwd().resolve()
    paths = [("work dir", cfg.run.work_dir, "ZEROSEG_WORK (configs read ${ZEROSEG_WORK}) or --work-dir")]
    if cfg.run.store and "://" not in cfg.run.store:
        paths.append(("artifact store", cfg.run.store, "--store"))
    return [
        f"the {what} {Path(path).resolve()} is inside this job's copy of the working directory ({copy}), "
        f"a temporary folder that Ray manages: set {fix} to a lasting (shared) path"
        for what, path, fix in paths
        if Path(path).resolve().is_relative_to(copy)
    ]


def machine_local_tracking(tracking_uri: str) -> bool:
    """Whether only processes on this machine reach ``tracking_uri``: a sqlite file, a local path
    (``file:``, a plain path), or a server on a loopback address (``127.0.0.1``, ``localhost``)."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(tracking_uri)
    if tracking_uri == "databricks":  # MLflow's name for the Databricks workspace, not a path
        return False
    if parts.scheme in ("", "file", "sqlite"):
        return True
    if parts.scheme not in ("http", "https"):
        return False  # a database server (postgresql://...) names its own host
    host = parts.hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_tracking_reachable(tracking_uri: str) -> None:
    """Refuse a tracking store that only this machine reaches (:func:`machine_local_tracking`)
    when Ray has alive nodes on other machines (another node IP than this one's): stages, Ray
    Train workers and sweep trials placed there log to MLflow too, and would fail (a server on
    127.0.0.1 there is not this one) or write a sqlite file of their own. Nodes started on this
    machine (``ray start`` twice here) share its address and reach it.

    Raises:
        PipelineError: naming the store, the other machines and the fix.
    """
    import ray

    if not ray.is_initialized() or not machine_local_tracking(tracking_uri):
        return
    here = ray.util.get_node_ip_address()
    others = sorted({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")} - {here})
    if others:
        raise PipelineError(
            f"the MLflow tracking store {tracking_uri} is reachable from this machine ({here}) only, but this "
            f"Ray cluster has nodes on {', '.join(others)}: stages and trials placed there could not log their "
            "runs. Use a tracking server every node reaches: ZEROSEG_TRACKING_URI=http://<address of the "
            "server's host as the nodes see it>:5000 (not 127.0.0.1; see docs/cluster.md), without "
            "run.tracking_server"
        )


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


def print_plan(console: Console, p: Plan, store_uri: str) -> None:
    """The plan table (stage, what it reads, key, action), then one line per stage that runs
    saying why it is not cached."""
    t = Table(title=Text(f"plan (store: {store_uri})"), title_justify="left")
    for col in ("stage", "reads", "key", "action"):
        t.add_column(col)
    for n in p:
        t.add_row(Text(n.name), Text(", ".join(n.upstream) or "-"), Text(n.key[:12]), Text(n.action))
    console.print(t)
    reasons: dict[str, list[str]] = {}
    for n in p:
        if n.action == "run":
            reasons.setdefault(n.reason, []).append(n.name)
    for reason, names in reasons.items():
        console.line(f"  {', '.join(names)} {'runs' if len(names) == 1 else 'run'}: {reason}")


def print_summary(console: Console, p: Plan) -> None:
    t = Table(title="stages", title_justify="left")
    for col in ("stage", "key", "status", "wall s", "notes"):
        t.add_column(col)
    for n in p:
        note = n.error or (n.stage.note(n.metrics) if n.metrics else "")
        t.add_row(
            Text(n.name),
            Text(n.key[:12]),
            Text(n.status),
            f"{n.seconds:.1f}" if n.status in ("ran", "failed") else "-",
            Text(note),
        )
    console.print(t)
    for n in p:
        if n.metrics:
            for r in n.stage.summary(n.metrics):
                console.print(r)


def _open_store(cfg: LoadedConfig, dry_run: bool) -> Any:
    from pipeline.store import ArtifactStore

    uri = cfg.run.store_uri()
    if dry_run and "://" not in uri and not Path(uri).exists():
        return None  # a dry run creates nothing
    return ArtifactStore(uri, Path(cfg.run.work_dir) / "cache", cfg.run.verify)


def _start_time() -> float:
    """Epoch seconds this process started (the wall time printed covers imports too)."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001
        return time.time()


def cmd_run(args: argparse.Namespace, console: Console, catalog: Catalogue | None = None) -> tuple[int, Plan | None]:
    """``zeroseg run``: plan, print the plan, execute, print results. Returns (status, plan).

    Library output (Ray, MLflow) goes to ``<work_dir>/logs/run-<time>-<pid>.log``, not the
    terminal (``--verbose`` shows it)."""
    t_start = _start_time()
    cfg = _load(args)
    if args.print_config:  # before anything is created
        sys.stdout.write(config_yaml(cfg, (catalog or load_catalogue()).stages))
        return 0, None
    log_file = Path(cfg.run.work_dir) / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    setup_logging(log_file, args.verbose)
    with library_output_to(log_file, not args.verbose):
        return _run(args, cfg, console, catalog or load_catalogue(), t_start, log_file)


def _run(
    args: argparse.Namespace, cfg: LoadedConfig, console: Console, catalog: Catalogue, t_start: float, log_file: Path
) -> tuple[int, Plan | None]:
    from pipeline import tracking
    from pipeline.execute import execute

    work_dir = Path(cfg.run.work_dir)
    store = _open_store(cfg, args.dry_run)
    sel = Selection(stages=args.stages, from_stage=args.from_stage, force=args.force)
    p = plan(cfg, catalog.stages, sel, store, code_packages=catalog.code_packages)
    for line in [*job_copy_notes(cfg), *p.notices]:
        console.line(f"NOTE: {line}", "note")
    print_plan(console, p, cfg.run.store_uri())
    if args.dry_run:
        return 0, p
    if store is None:
        store = _open_store(cfg, False)

    runs_any = any(n.action == "run" for n in p)
    started: list[bool] = []
    out = None
    with tracking_store(cfg, console, log_file.parent, needed=runs_any) as tracking_uri:
        tracker = tracking.Invocation(
            tracking_uri,
            cfg.run.experiment or cfg.run.name,
            cfg.run.name,
            {"config": str(cfg.path), "argv": " ".join(sys.argv[1:])},
            {f"{n.name}.": n.components.get("config", {}) for n in p},
            work_dir / "tracking-journal",
            t_start,
            tracking.headline_params({n.name: n.components.get("config", {}) for n in p}, catalog.headline),
        )
        if runs_any:
            tracker.open()  # MLflow now: not after a stage has already started
        try:
            out = execute(
                [p],
                store,
                console,
                work_dir=work_dir.resolve(),
                tracker=tracker,
                start_cluster=lambda: (
                    started.append(init_ray(cfg, console, args.verbose)),
                    check_store_reachable(cfg.run.store_uri()),
                    check_tracking_reachable(tracking_uri),
                ),
            )
        finally:
            tracker.finish(
                {"stages." + n.name: f"{n.status} {n.key[:12]}" for n in p},
                {
                    **{f"{n.name}/{k}": v for n in p for k, v in n.metrics.items()},
                    "wall_seconds": time.time() - t_start,
                },
                failed=out is None or not out.ok,
            )
    if tracker.reaped:
        console.line(f"mlflow: marked {tracker.reaped} run(s) of killed invocations KILLED", "dim")
    if any(started):  # a cluster this invocation started: stop it here, so the wall time printed includes it
        sys.modules["ray"].shutdown()
    print_summary(console, p)
    served = " (the store the stopped tracking server served)" if runs_any and cfg.run.local_tracking_server() else ""
    console.line(f"MLflow runs: {tracking.ui_command(cfg.run.mlflow_uri())}{served}")
    if not out.ok:
        console.line(f"library logs of this run: {log_file}")
    console.line(f"total wall time {time.time() - t_start:.1f} s")
    return (0 if out.ok else 1), p


def _load(args: argparse.Namespace) -> LoadedConfig:
    cfg = load_config(args.config, args.overrides)
    if args.work_dir:
        cfg.run.work_dir = args.work_dir
    if args.store:
        cfg.run.store = args.store
    return cfg


# =============================================================================================
# sweep
# =============================================================================================
def cmd_sweep(args: argparse.Namespace, console: Console, catalog: Catalogue | None = None) -> int:
    """``zeroseg sweep`` (see :mod:`pipeline.sweep`): 0 every trial finished, 1 some failed."""
    from pipeline.sweep import format_results, load_sweep, run_sweep

    t_start = time.time()
    cfg = _load(args)
    sw = load_sweep(args.sweep)
    log_file = Path(cfg.run.work_dir) / "logs" / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    setup_logging(log_file, args.verbose)
    for line in job_copy_notes(cfg):
        console.line(f"NOTE: {line}", "note")
    started: list[bool] = []

    with library_output_to(log_file, not args.verbose), tracking_store(cfg, console, log_file.parent) as tracking_uri:

        def init_cluster(store_uri: str) -> None:
            started.append(init_ray(cfg, console, args.verbose))
            check_store_reachable(store_uri)
            check_tracking_reachable(tracking_uri)

        try:
            out = run_sweep(
                cfg,
                sw,
                console,
                catalog=catalog or load_catalogue(),
                init_cluster=init_cluster,
                sweep_path=str(args.sweep),
                tracking_uri=tracking_uri,
            )
        finally:
            if any(started):
                sys.modules["ray"].shutdown()
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
    from pipeline import tracking

    served = " (the store the stopped tracking server served)" if cfg.run.local_tracking_server() else ""
    console.line(f"MLflow: sweep run {out.sweep_run_id}; {tracking.ui_command(cfg.run.mlflow_uri())}{served}")
    console.line(f"total wall time {time.time() - t_start:.1f} s")
    return 0 if out.ok else 130 if unfinished else 1


# =============================================================================================
# gc
# =============================================================================================
def cmd_gc(args: argparse.Namespace, console: Console, catalog: Catalogue | None = None) -> int:
    """``zeroseg gc`` (see :mod:`pipeline.gc`)."""
    cfg = _load(args)
    log_file = Path(cfg.run.work_dir) / "logs" / f"gc-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    setup_logging(log_file, args.verbose)
    with library_output_to(log_file, not args.verbose):
        return _gc(args, cfg, console, catalog or load_catalogue())


def _gc(args: argparse.Namespace, cfg: LoadedConfig, console: Console, catalog: Catalogue) -> int:
    from pipeline.gc import collect, referenced_keys

    store = _open_store(cfg, False)
    keep_cfgs = [cfg] + [load_config(k) for k in args.keep]
    plans = [plan(c, catalog.stages, None, None, code_packages=catalog.code_packages, checks=False) for c in keep_cfgs]
    from pipeline.tracking import flush_journal

    flush_journal(Path(cfg.run.work_dir) / "tracking-journal", cfg.run.mlflow_uri())  # runs not yet logged count
    refs, sources = referenced_keys(plans, cfg.run.mlflow_uri())
    report = collect(store, refs, delete=args.delete, grace=args.grace)
    t = Table(title=Text(f"unreferenced in {cfg.run.store_uri()} (kept: {sources})"), title_justify="left")
    for col in ("kind", "stage", "key", "MiB", "what"):
        t.add_column(col)
    for item in report.items:
        t.add_row(item.kind, Text(item.stage), Text(item.key[:12]), f"{item.bytes / 2**20:.1f}", Text(item.note))
    console.print(t)
    verb = "removed" if args.delete else "would remove (pass --delete)"
    console.line(f"{len(report.items)} item(s), {report.bytes / 2**20:.1f} MiB: {verb}; {report.kept} artifact(s) kept")
    return 0


# =============================================================================================
# entry points
# =============================================================================================
def main(argv: Sequence[str] | None = None, catalog: Catalogue | None = None) -> int:
    """``zeroseg ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    console = Console(verbose=getattr(args, "verbose", False))
    try:
        if args.command == "run":
            return cmd_run(args, console, catalog)[0]
        if args.command == "sweep":
            return cmd_sweep(args, console, catalog)
        if args.command == "compare":
            from pipeline.compare import cmd_compare

            return cmd_compare(args, console, catalog)
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


__all__ = [
    "STAGES_ENTRY",
    "build_parser",
    "cmd_gc",
    "cmd_run",
    "cmd_sweep",
    "check_store_reachable",
    "check_tracking_reachable",
    "machine_local_tracking",
    "init_ray",
    "job_copy_notes",
    "main",
    "run_main",
    "tracking_store",
]
