"""The entry point: ``python pipeline/run.py --config configs/<benchmark>.yaml``.

Runs the stage DAG described by a config on an embedded local Ray cluster (default) or on
the cluster a ``ray job submit`` points it at, with one MLflow parent run per invocation and a
nested run per stage. Every stage's output is content-addressed: a stage whose key already
has a verified artifact is reported ``cached`` and not run.

Examples::

    python pipeline/run.py --config configs/sample.yaml
    python pipeline/run.py --config configs/sample.yaml --dry-run
    python pipeline/run.py --config configs/sample.yaml --set evaluate.gamma=0.1
    python pipeline/run.py --config configs/sample.yaml --stages evaluate --force
    python pipeline/run.py --config configs/sample.yaml --from train_classifier
    python pipeline/run.py --config configs/sample.yaml --store s3://bucket/zeroseg
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import glob
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # executed as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from pipeline import tracking
from pipeline.config import LoadedConfig, artifact_key, load_config, validate_section
from pipeline.dag import Stage, StageContext, registry, select, topological_order
from pipeline.store import ArtifactStore, CorruptArtifact
from zeroseg import __version__
from zeroseg.errors import ConfigError, ZerosegError

console = Console(highlight=False, soft_wrap=True)


@dataclasses.dataclass
class PlannedStage:
    """One row of the plan and, after execution, of the final table."""

    name: str
    key: str
    config: Any
    stage: Stage
    selected: bool
    cached: bool
    action: str = ""  # run | cached | skip
    status: str = "pending"  # ran | cached | failed | skipped | not run
    seconds: float = 0.0
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pipeline/run.py",
        description="Run the zeroseg stage DAG (build_splits -> embed_text -> train_classifier -> evaluate).",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/sample.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set evaluate.gamma=0.1")
    p.add_argument("--stages", nargs="+", metavar="STAGE",
                   help="run only these stages (their upstream must be cached)")
    p.add_argument("--from", dest="from_stage", metavar="STAGE",
                   help="run this stage and everything downstream of it")
    p.add_argument("--force", nargs="*", metavar="STAGE", default=None,
                   help="re-run even if cached: the named stages, or every selected stage when none is named")
    p.add_argument("--dry-run", action="store_true", help="print the plan (stages, keys, what would run) and exit")
    p.add_argument("--store", help="artifact store: local path or s3://, gs:// URI (overrides run.store)")
    p.add_argument("--work-dir", help="work directory (overrides run.work_dir)")
    return p.parse_args(argv)


def build_plan(cfg: LoadedConfig, store: ArtifactStore | None, args: argparse.Namespace) -> list[PlannedStage]:
    """Validate every stage section, compute keys in topological order and decide actions.

    Raises:
        ConfigError: unknown stage section (nearest named), a stage whose upstream stage has no
            section, an unknown --stages/--from/--force name, or a selected stage whose upstream
            is neither selected nor cached.
    """
    reg = registry()
    for name in cfg.sections:
        if name not in reg:
            near = difflib.get_close_matches(name, list(reg) + ["run", "clip"], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{cfg.path}: unknown section {name!r}{hint} (stages: {', '.join(reg)})")
    enabled = list(cfg.sections)
    for name in enabled:
        for dep in reg[name].needs:
            if dep not in cfg.sections:
                raise ConfigError(f"{cfg.path}: stage {name!r} needs {dep!r}, which has no section in the config")
    try:
        order = topological_order(enabled)
        selected = set(select(enabled, args.stages, args.from_stage))
        force = set(args.force or []) if args.force else set()
        for s in force:
            select(enabled, [s])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    force_all = args.force is not None and len(args.force) == 0

    plan: list[PlannedStage] = []
    keys: dict[str, str] = {}
    for name in order:
        stage = reg[name]()
        conf = validate_section(name, stage.Config, cfg.sections[name], cfg.clip, cfg.path)
        key = artifact_key(name, stage.version, conf.model_dump(mode="json"),
                           {d: keys[d] for d in stage.needs}, stage.fingerprint(conf))
        keys[name] = key
        cached = store.exists(name, key) if store is not None else False
        ps = PlannedStage(name, key, conf, stage, name in selected, cached)
        forced = ps.selected and (force_all or name in force)
        ps.action = "run" if ps.selected and (forced or not cached) else ("cached" if cached else "skip")
        plan.append(ps)

    by_name = {p.name: p for p in plan}
    for p in plan:
        if p.action != "run":
            continue
        for dep in p.stage.needs:
            d = by_name[dep]
            if d.action == "skip":
                raise ConfigError(
                    f"stage {p.name!r} needs {dep!r}, which is not cached (key {d.key[:12]}) and not selected; "
                    f"drop --stages or add {dep!r} to it"
                )
    return plan


def print_plan(plan: list[PlannedStage], store_uri: str) -> None:
    t = Table(title=f"plan (store: {store_uri})", title_justify="left")
    for col in ("stage", "needs", "key", "action"):
        t.add_column(col)
    for p in plan:
        t.add_row(p.name, ", ".join(p.stage.needs) or "-", p.key[:12], p.action)
    console.print(t)


def init_ray(cfg: LoadedConfig) -> None:
    """Connect to ``run.ray.address`` / ``RAY_ADDRESS`` (set by ``ray job submit``), or start
    an embedded local cluster. Called before the first stage that runs, so a fully cached
    invocation costs no cluster start-up; a no-op when Ray is already initialised."""
    import ray

    if ray.is_initialized():
        return
    rs = cfg.run.ray
    address = rs.address or os.environ.get("RAY_ADDRESS")
    if address:
        console.print(f"ray: connecting to {address}")
        ray.init(address=address, logging_level="WARNING")
    else:
        console.print("ray: starting an embedded local cluster")
        ray.init(address="local", num_cpus=rs.num_cpus, num_gpus=rs.num_gpus,
                 include_dashboard=rs.include_dashboard, logging_level="WARNING")
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    res = ray.cluster_resources()
    console.print(f"ray: {int(res.get('CPU', 0))} CPUs, {int(res.get('GPU', 0))} GPUs")


def random_weight_notice(plan: list[PlannedStage]) -> None:
    for p in plan:
        clip = getattr(p.config, "clip", None)
        if clip is not None and getattr(clip, "random_init", False):
            console.print(
                "[bold yellow]NOTE: this config uses a CLIP model with RANDOM WEIGHTS "
                f"({clip.model}); it exercises the real code path, but its metrics say nothing about "
                "the method. Use pretrained: openai or checkpoint: <path> for real results.[/]"
            )
            return


def execute(plan: list[PlannedStage], cfg: LoadedConfig, store: ArtifactStore, parent_run_id: str) -> bool:
    """Run or report-cached each stage in order. Returns False if a stage failed."""
    artifacts = {}
    ok = True
    work_dir = Path(cfg.run.work_dir).resolve()
    for p in plan:
        if not ok:
            p.status = "not run"
            continue
        if p.action == "skip":
            p.status = "skipped"
            continue
        if p.action == "cached":
            try:
                art = store.get(p.name, p.key)
            except CorruptArtifact as e:
                console.print(f"[yellow]{p.name}: cached artifact failed verification ({e}); re-running[/]")
                art = None
            if art is not None:
                artifacts[p.name] = art
                p.status, p.metrics = "cached", dict(art.manifest.get("metrics", {}))
                with tracking.stage_run(p.name, p.key, p.config):
                    tracking.set_tags({"status": "cached", "produced_by_run": art.manifest.get("mlflow_run_id"),
                                       "artifact_uri": art.uri})
                    tracking.log_metrics(p.metrics)
                console.print(f"[green]✓[/] {p.name} cached ({p.key[:12]})")
                continue
        inputs = {d: artifacts[d] for d in p.stage.needs}
        for old in glob.glob(str(Path(store.base) / ".staging" / f"{p.name}-{p.key[:16]}-*")) if store.local else []:
            shutil.rmtree(old, ignore_errors=True)
        init_ray(cfg)  # first stage that runs; a fully cached invocation never starts Ray
        staging = store.staging_dir(p.name, p.key)
        console.print(f"[cyan]▶[/] {p.name} running ({p.key[:12]})")
        t0 = time.perf_counter()
        try:
            with tracking.stage_run(p.name, p.key, p.config) as run_id:
                ctx = StageContext(
                    stage=p.name, key=p.key, config=p.config, inputs=inputs, output_dir=staging,
                    work_dir=work_dir, train_storage=store.train_storage(), train_name=f"{p.name}-{p.key[:16]}",
                    mlflow_run_id=run_id, tracking_uri=cfg.run.mlflow_uri(),
                    log=lambda msg, _n=p.name: console.print(f"  [{_n}] {msg}"),
                    artifact_uri=store.uri(p.name, p.key),
                )
                try:
                    metrics = p.stage.run(ctx) or {}
                    p.seconds = time.perf_counter() - t0
                    art = store.publish(p.name, p.key, staging, {
                        "inputs": {d: a.key for d, a in inputs.items()},
                        "config": p.config.model_dump(mode="json"),
                        "metrics": metrics,
                        "timings": {"seconds": p.seconds},
                        "mlflow_run_id": run_id,
                        "parent_run_id": parent_run_id,
                        "stage_version": p.stage.version,
                        "package_version": __version__,
                    })
                except BaseException as e:
                    tracking.set_tags({"status": "failed", "error": f"{type(e).__name__}: {e}"[:5000]})
                    raise  # the nested run ends FAILED
                tracking.set_tags({"status": "ran", "artifact_uri": art.uri})
                tracking.log_metrics({**metrics, "wall_seconds": p.seconds})
                tracking.log_artifact(art.path / "manifest.json")
        except BaseException as e:  # noqa: BLE001 - reported; KeyboardInterrupt re-raised
            p.seconds = time.perf_counter() - t0
            p.status, ok = "failed", False
            p.error = f"{type(e).__name__}: {e}"
            store.discard(staging)
            if isinstance(e, ZerosegError):
                console.print(f"[red]✗ {p.name} failed:[/] {e}")
            else:
                console.print(f"[red]✗ {p.name} failed:[/]\n{traceback.format_exc()}")
            if isinstance(e, KeyboardInterrupt):
                raise
            continue
        artifacts[p.name] = art
        p.status, p.metrics = "ran", metrics
        console.print(f"[green]✓[/] {p.name} ran in {p.seconds:.1f} s")
    return ok


def print_summary(plan: list[PlannedStage], tracking_uri: str) -> None:
    t = Table(title="stages", title_justify="left")
    for col in ("stage", "key", "status", "wall s", "notes"):
        t.add_column(col)
    for p in plan:
        notes = p.error or _short_metrics(p)
        t.add_row(p.name, p.key[:12], p.status, f"{p.seconds:.1f}" if p.status in ("ran", "failed") else "-", notes)
    console.print(t)
    ev = next((p for p in plan if p.name == "evaluate" and p.metrics), None)
    if ev is not None:
        console.print(metrics_table(ev.metrics))
        line = fps_line(ev.metrics)
        if line:
            console.print(line, markup=False)
    console.print(f"MLflow runs: {tracking.ui_command(tracking_uri)}")


def _short_metrics(p: PlannedStage) -> str:
    if p.name == "evaluate":
        return "see metrics below" if p.metrics else ""
    items = [f"{k}={_note(v)}" for k, v in p.metrics.items() if not isinstance(v, (dict, list))]
    return ", ".join(items[:6])


def _note(v: Any) -> str:
    """A stage note value: counts print as integers (MLflow hands them back as floats)."""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4g}"
    return str(v)


def _fmt(v: Any) -> str:
    """A metric value in percent, two decimals."""
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Evaluate's flat ``{"<set>/<metric>": value}`` as a metric x set table.

    Metrics are rows so the table stays narrow (a `ray job` log is 80 columns wide) however many
    metrics there are; values are percent with two decimals.
    """
    sets: dict[str, dict[str, Any]] = {}
    for k, v in metrics.items():
        if "/" in k:
            s, m = k.split("/", 1)
            sets.setdefault(s, {})[m] = v
    rows = [m for m in ("hIoU", "mIoU_seen", "mIoU_unseen", "mIoU", "pAcc", "mAcc", "zs3_mIoU")
            if any(m in d for d in sets.values())]
    rows += sorted({m for d in sets.values() for m in d} - set(rows))
    t = Table(title="evaluation (percent; GZS3 unless marked zs3)", title_justify="left")
    t.add_column("metric", no_wrap=True)
    for s in sets:
        t.add_column(s, justify="right", no_wrap=True)
    for m in rows:
        t.add_row(m, *[_fmt(d[m]) if m in d else "-" for d in sets.values()])
    return t


def fps_line(metrics: dict[str, Any]) -> str | None:
    """Evaluate's ``fps`` metric (no ``<set>/`` prefix, so not in :func:`metrics_table`) with its
    timing protocol (stages/evaluate.py, ``fps.json``); None when absent or not finite."""
    v = metrics.get("fps")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return (f"FPS: {v:.2f} images/s per inference worker (timed: host arrays -> confusion matrices, i.e. "
            "resize + normalise, forward, upsampling, argmax, counting; warm-up batches and image decoding "
            "excluded; details in evaluate's fps.json)")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 a stage failed, 2 bad config)."""
    return run_pipeline(parse_args(argv))[0]


def run_pipeline(args: argparse.Namespace) -> tuple[int, list[PlannedStage]]:
    """Plan and execute one invocation; returns (exit code, plan with final statuses)."""
    plan: list[PlannedStage] = []
    try:
        cfg = load_config(args.config, args.overrides)
        if args.work_dir:
            cfg.run.work_dir = args.work_dir
        if args.store:
            cfg.run.store = args.store
        work_dir = Path(cfg.run.work_dir)
        store = None if args.dry_run and not Path(cfg.run.store_uri()).exists() and "://" not in cfg.run.store_uri() \
            else ArtifactStore(cfg.run.store_uri(), work_dir / "cache", cfg.run.verify)
        plan = build_plan(cfg, store, args)
    except ZerosegError as e:
        console.print(f"[red]error:[/] {e}")
        return 2, plan
    random_weight_notice(plan)
    print_plan(plan, cfg.run.store_uri())
    if args.dry_run:
        return 0, plan

    tracking_uri = cfg.run.mlflow_uri()
    tracking.setup(tracking_uri, cfg.run.experiment or cfg.run.name)
    t0 = time.perf_counter()
    with tracking.parent_run(cfg.run.name, {"config": str(cfg.path), "argv": " ".join(sys.argv[1:])}) as parent:
        ok = execute(plan, cfg, store, parent)
        tracking.log_metrics({"wall_seconds": time.perf_counter() - t0})
        tracking.set_tags({"stages." + p.name: f"{p.status} {p.key[:12]}" for p in plan})
        if not ok:
            import mlflow

            mlflow.set_tag("status", "failed")
    print_summary(plan, tracking_uri)
    console.print(f"total wall time {time.perf_counter() - t0:.1f} s")
    return (0 if ok else 1), plan


if __name__ == "__main__":
    sys.exit(main())
