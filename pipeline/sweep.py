"""Ray Tune sweeps: ``zeroseg sweep --config configs/X.yaml --sweep configs/sweeps/Y.yaml``.

A sweep file (:class:`SweepFile`) names a search space over any config keys (``grid``,
``choice``, ``uniform``, ``loguniform``), the metric and mode (default: evaluate's hIoU on the
eval set ``val``: ``evaluate/val/hIoU``, max), the scheduler (ASHA, or none), samples, seeds,
the resources of a trial and ``max_concurrent_trials``.

How a sweep runs (:func:`run_sweep`):

1. *The shared upstream, once.* The base config is planned with every searched key set to each
   of its values (grid/choice) or bounds (uniform/loguniform), and every seed; a node whose key
   is the same in all these plans does not depend on what is searched. Those nodes are the shared
   prefix of every trial: they run (or are read) once, on the driver, before any trial starts.
   Only the suffix is tuned: a trial finds the prefix cached and runs its own nodes. (A sampled
   value between the bounds cannot re-key a node that neither bound re-keys: keys depend on the
   value only through the stage's config.) The store's per-key lease still guards the rest:
   two trials that happen to share a suffix node compute it once.
2. *Trials.* A Tune function trainable (:func:`trial`) plans and executes the trial's config
   (the base config + ``--set key=value`` per sampled value) inside the trial's actor, on
   whichever node Tune placed it, against the same store, and reports the evaluate metrics with
   ``ray.tune.report``. A training stage inside a trial is a TorchTrainer whose Ray Train run
   name is derived from its artifact key (``ArtifactStore.checkpoint_dir``): deterministic per
   trial, so a retried or resumed trial continues from its checkpoints. While a training stage
   runs, each of its progress reports (every ``log_every`` steps) is forwarded to Tune as an
   intermediate result ``{<stage>/step, <stage>/loss, <stage>/lr}`` (:func:`training_reports`),
   so ASHA can stop a trial mid-training: with ``asha_metric: train_classifier/loss`` ASHA's
   rungs are in that stage's steps (``time_attr`` ``train_classifier/step``). The final result
   (the evaluate metrics) is what the sweep ranks trials on (``metric``), by our own code.
3. *Resume.* The Tune experiment lives in the store (``<store>/_sweeps/<name>-<id>``; the id
   digests the resolved base config and the sweep file): re-running the same command restores it
   (``Tuner.restore``); finished trials are not re-run, unfinished and errored ones are.
4. *Tracking.* One MLflow run for the sweep; the shared-upstream invocation and every trial's
   invocation are nested runs under it (their stage runs nested under them), each carrying the
   headline params (method, CLIP, split, seed: ``pipeline.tracking.headline_params``) and tags
   ``zeroseg.sweep_id``, ``zeroseg.trial_id``, ``zeroseg.trial_params``, ``zeroseg.seed``.
   With seeds, configurations are aggregated into mean and standard deviation over seeds
   (:func:`aggregate`), printed and logged to the sweep run (``sweep_summary.json``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import LoadedConfig, config_from_raw, digest, explain, read_yaml
from pipeline.errors import ConfigError, PipelineError

#: Tune's experiment directories live under this folder of the store.
SWEEPS = "_sweeps"


# =============================================================================================
# the sweep file
# =============================================================================================
class Dist(BaseModel):
    """One searched key: exactly one of ``grid`` (every value, crossed with the other grids),
    ``choice`` (one value drawn per sample), ``uniform: [low, high]`` or ``loguniform: [low,
    high]`` (low > 0)."""

    model_config = ConfigDict(extra="forbid")
    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _one(self) -> Dist:
        given = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind}: an empty list")
        if kind in ("uniform", "loguniform"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: [low, high] with low < high, got [{lo}, {hi}]")
            if kind == "loguniform" and lo <= 0:
                raise ValueError(f"loguniform: low must be > 0, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """Values that show which nodes the key re-keys: every listed value, or both bounds."""
        v = getattr(self, self.kind)
        return list(v)

    def tune(self) -> Any:
        """The Tune search-space object."""
        from ray import tune

        v = getattr(self, self.kind)
        return {
            "grid": tune.grid_search,
            "choice": tune.choice,
            "uniform": lambda b: tune.uniform(*b),
            "loguniform": lambda b: tune.loguniform(*b),
        }[self.kind](list(v))


class AshaSection(BaseModel):
    """ASHA (``ray.tune.schedulers.ASHAScheduler``). ``time_attr``: with the sweep's
    ``asha_metric`` (``<stage>/loss``) the stage's training steps (``<stage>/step``), ``max_t``
    defaulting to the stage's ``train.max_steps``; without it, Tune's ``training_iteration`` (the
    count of a trial's results) and ``max_t`` 100. A trial that reaches ``max_t`` is not stopped
    by ASHA (``stop_last_trials=False``): it ends itself, after its evaluation."""

    model_config = ConfigDict(extra="forbid")
    max_t: int | None = Field(None, gt=0)
    grace_period: int = Field(1, gt=0)
    reduction_factor: float = Field(4, gt=1)


class SweepFile(BaseModel):
    """A sweep (``configs/sweeps/*.yaml``).

    Attributes:
        name: the sweep's name (Tune experiment and MLflow run name).
        description: a line for people.
        set: ``key=value`` overrides applied to the base config for every trial (e.g. tune on a
            held-out split of the seen classes).
        space: ``{dotted.config.key: Dist}``: what is searched.
        metric: a trial's reported metric to optimise (``<stage>/<metric>``); default
            ``evaluate/<eval_set>/hIoU``.
        eval_set: the evaluate set of the default metric.
        mode: ``max`` or ``min``.
        asha_metric: the intermediate result ASHA compares trials on, ``<training stage>/loss``
            (or ``/lr``), reported every ``log_every`` steps while that stage trains; None: ASHA
            uses ``metric``, which only a trial's final result carries (so it stops no trial
            mid-training).
        asha_mode: ``min`` or ``max`` for ``asha_metric`` (default ``min``).
        scheduler: ``asha`` (default) or ``none`` (FIFO: every trial runs to its end).
        asha: ASHA's settings.
        num_samples: Tune's ``num_samples`` (each grid point is sampled that often).
        seeds: values of ``seed_key`` each configuration runs with (a grid axis); results are
            aggregated into mean and standard deviation per configuration.
        seed_key: the config key the seeds set (default: the classifier's training seed).
        resources: a trial's resources (``{"CPU": 1, "GPU": 0.5, "<custom>": 1}``): the trial's
            driver; a training stage's workers ask for their own (``scaling``).
        max_concurrent_trials: at most this many trials at once (default: as many as leave CPUs
            for one trial's largest stage besides the trials themselves: :func:`trial_concurrency`).
        max_failures: times Tune retries a failed trial.
    """

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    set: list[str] = []
    space: dict[str, Dist]
    metric: str | None = None
    eval_set: str = "val"
    mode: Literal["max", "min"] = "max"
    asha_metric: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+/(loss|lr)$")
    asha_mode: Literal["max", "min"] = "min"
    scheduler: Literal["asha", "none"] = "asha"
    asha: AshaSection = AshaSection()
    num_samples: int = Field(1, gt=0)
    seeds: list[int] = []
    seed_key: str = "train_classifier.train.seed"
    resources: dict[str, float] = {"CPU": 1.0}
    max_concurrent_trials: int | None = Field(None, gt=0)
    max_failures: int = Field(0, ge=0)

    @property
    def target(self) -> str:
        return self.metric or f"evaluate/{self.eval_set}/hIoU"


def load_sweep(path: str | os.PathLike) -> SweepFile:
    """Read and validate a sweep file.

    Raises:
        ConfigError: missing file, not YAML, or an invalid field (named, with the nearest valid
            key for a typo), or a seed key that is also searched.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep file {str(p)!r} does not exist (sweeps live in configs/sweeps/*.yaml)")
    raw = read_yaml(p, "(a sweep file: name, space, metric, ...)")
    try:
        sw = SweepFile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(explain(e, SweepFile, "sweep", p)) from None
    if sw.seeds and sw.seed_key in sw.space:
        raise ConfigError(f"{p}: {sw.seed_key} is both searched (space) and the seed key; drop one")
    return sw


# =============================================================================================
# planning: the shared prefix
# =============================================================================================
def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(_plain(value))}"


def _plain(v: Any) -> Any:
    """numpy scalars -> Python (Tune samples numpy floats)."""
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def probe_overrides(sw: SweepFile) -> list[list[str]]:
    """One override list per probe: each searched key at each of its probe values, each seed."""
    out = [[_override(k, v)] for k, d in sw.space.items() for v in d.probes()]
    out += [[_override(sw.seed_key, s)] for s in sw.seeds]
    return out


def shared_nodes(plans: Sequence[Any]) -> list[str]:
    """Names of the nodes whose key is the same in every plan (the prefix no searched value
    re-keys), in execution order of the first plan."""
    first = plans[0]
    return [n.name for n in first if all(n.name in p.nodes and p.nodes[n.name].key == n.key for p in plans[1:])]


def experiment_id(cfg: LoadedConfig, sw: SweepFile) -> str:
    """12 hex digits naming the Tune experiment: the resolved base config (without ``run``) and
    the sweep file. The same command finds (and continues) the same experiment."""
    return digest({"config": cfg.sections, "sweep": sw.model_dump(mode="json")})[:12]


# =============================================================================================
# the trial
# =============================================================================================
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

    from pipeline import tracking
    from pipeline.catalogue import load_catalogue
    from pipeline.console import Console
    from pipeline.execute import execute
    from pipeline.plan import plan
    from pipeline.store import ArtifactStore

    if spec.get("cwd") and Path(spec["cwd"]).is_dir():
        os.chdir(spec["cwd"])  # relative data paths of the config, as on the driver
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    params = {k: _plain(v) for k, v in (config.get("params") or {}).items()}
    seed = config.get("seed")
    overrides = [*spec["set"], *(_override(k, v) for k, v in params.items())]
    if seed is not None:
        overrides.append(_override(spec["seed_key"], seed))
    cfg = config_from_raw(spec["path"], copy.deepcopy(spec["raw"]), overrides)
    cfg.run.work_dir, cfg.run.store = spec["work_dir"], spec["store"]
    work_dir = Path(spec["work_dir"])
    log = work_dir / "logs" / f"trial-{trial_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    catalog = load_catalogue()
    store = ArtifactStore(spec["store"], work_dir / "cache", cfg.run.verify)
    p = plan(cfg, catalog.stages, None, store, code_packages=catalog.code_packages)
    tracker = tracking.Invocation(
        spec["tracking_uri"],
        spec["experiment"],
        f"{spec['name']} {_describe(params, seed)}",
        {
            "mlflow.parentRunId": spec["sweep_run_id"],
            "zeroseg.sweep_id": spec["sweep_id"],
            "zeroseg.trial_id": trial_id,
            "zeroseg.trial_params": json.dumps(params, sort_keys=True),
            "zeroseg.seed": "" if seed is None else str(seed),
            "config": spec["config_path"],
        },
        {f"{n.name}.": n.components.get("config", {}) for n in p},
        work_dir / "tracking-journal",
        t0,
        tracking.headline_params({n.name: n.components.get("config", {}) for n in p}, catalog.headline),
    )
    tracker.open()
    out = None
    stages = {store.checkpoint_dir(n.name, n.key): n.name for n in p}
    state = {"stopped": False}
    with open(log, "a") as f, training_reports(stages, state):
        console = Console(file=f)
        try:
            out = execute([p], store, console, work_dir=work_dir.resolve(), tracker=tracker)
        finally:
            # a trial Tune stopped (ASHA) ended its fit on purpose: "stopped", not failed (if Tune
            # kills the actor before this, the next invocation marks the run KILLED)
            tracker.finish(
                {"stages." + n.name: f"{n.status} {n.key[:12]}" for n in p}
                | ({"status": "stopped"} if state["stopped"] else {}),
                {**_metrics(p), "wall_seconds": time.time() - t0},
                failed=(out is None or not out.ok) and not state["stopped"],
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


def _describe(params: dict[str, Any], seed: Any) -> str:
    parts = [f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in params.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# =============================================================================================
# aggregation
# =============================================================================================
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


# =============================================================================================
# the sweep
# =============================================================================================
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


def sweep_storage(store: Any) -> str:
    """Where Tune keeps sweep experiments: ``<store>/_sweeps`` (a local path for local and
    ``file://`` stores; the store's URI otherwise), so every node reads and writes it."""
    from pipeline import uri as uri_

    return f"{store.base}/{SWEEPS}" if store.local else uri_.join(store.root_uri, SWEEPS)


def _sweep_run(tracking_uri: str, experiment: str, name: str, sweep_id: str, tags: dict[str, str]) -> tuple[str, bool]:
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


def run_sweep(
    cfg: LoadedConfig,
    sw: SweepFile,
    console: Any,
    *,
    catalog: Any,
    init_cluster: Any,
    sweep_path: str = "",
    callbacks: Sequence[Any] = (),
    tracking_uri: str | None = None,
) -> SweepOutcome:
    """Run (or continue) a sweep (see the module docstring).

    Args:
        cfg: the base config (``--config`` with ``--set``); its ``run`` section says where
            things go.
        sw: the sweep file.
        console: output for people.
        catalog: the stage catalogue (``pipeline.catalogue.Catalogue``).
        init_cluster: ``(store_uri) -> None``: starts or joins Ray and checks that every node
            reaches the store (``pipeline.cli``).
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
    import ray
    from ray import tune

    from pipeline import tracking
    from pipeline.execute import execute
    from pipeline.plan import Selection, plan
    from pipeline.store import ArtifactStore

    work_dir = Path(cfg.run.work_dir).resolve()
    base_raw = copy.deepcopy(cfg.raw)
    for ov in sw.set:
        from pipeline.config import apply_override

        apply_override(base_raw, ov)
    base = config_from_raw(cfg.path, copy.deepcopy(base_raw))
    base.run.work_dir, base.run.store = str(work_dir), cfg.run.store
    store_uri = cfg.run.store_uri() if cfg.run.store else str(work_dir / "store")
    store = ArtifactStore(store_uri, work_dir / "cache", cfg.run.verify)
    stage_of = sw.target.split("/", 1)[0]
    if stage_of not in base.sections:
        raise ConfigError(
            f"sweep {sw.name}: the metric {sw.target!r} names stage {stage_of!r}, which the config has not"
        )

    # 1. the shared prefix: plans of the probes
    base_plan = plan(base, catalog.stages, None, store, code_packages=catalog.code_packages)
    probes = []
    for ovs in probe_overrides(sw):
        c = config_from_raw(cfg.path, copy.deepcopy(base_raw), ovs)
        probes.append(plan(c, catalog.stages, None, store, code_packages=catalog.code_packages, checks=False))
    for k in sw.space:
        section = k.split(".", 1)[0]
        if section not in base.sections:
            raise ConfigError(f"sweep {sw.name}: space key {k!r}: the config has no section {section!r}")
    shared = shared_nodes([base_plan, *probes])
    tuned = [n.name for n in base_plan if n.name not in shared]
    if not tuned:
        raise ConfigError(
            f"sweep {sw.name}: no searched value changes any stage's key ({', '.join(sw.space)}): "
            "runtime settings (resources, batch sizes of inference, ...) cannot be swept"
        )
    for n in base_plan:
        scaling = getattr(n.config, "scaling", None)
        if n.name in tuned and scaling is not None and getattr(scaling, "num_workers", 1) == 0:
            raise ConfigError(
                f"sweep {sw.name}: {n.name}.scaling.num_workers is 0 (training in process), which Ray Train "
                f"cannot do inside a Tune trial; set {n.name}.scaling.num_workers to 1 or more for the sweep "
                f"(e.g. a `set:` entry in the sweep file: {n.name}.scaling.num_workers=1)"
            )
    sweep_id = experiment_id(base, sw)
    console.line(
        f"sweep {sw.name} ({sweep_id}): shared upstream {', '.join(shared) or 'none'}; tuned {', '.join(tuned)}"
    )

    tracking_uri, experiment = tracking_uri or base.run.mlflow_uri(), base.run.experiment or base.run.name
    sweep_run_id, reopened = _sweep_run(
        tracking_uri,
        experiment,
        sw.name,
        sweep_id,
        {"config": str(cfg.path), "sweep": sweep_path, "metric": sw.target, "mode": sw.mode},
    )
    started: list[bool] = []

    def start() -> None:
        if not started:
            started.append(True)
            init_cluster(store_uri)

    shared_nodes_out: list[Any] = []
    if shared:
        sel = Selection(stages=shared)
        sp = plan(base, catalog.stages, sel, store, code_packages=catalog.code_packages)
        for n in sp:
            if n.name not in shared:  # the base config's own suffix is a trial's business
                n.action = "skip"
        shared_nodes_out = [n for n in sp if n.name in shared]
        tracker = tracking.Invocation(
            tracking_uri,
            experiment,
            f"{sw.name} shared upstream",
            {"mlflow.parentRunId": sweep_run_id, "zeroseg.sweep_id": sweep_id, "config": str(cfg.path)},
            {f"{n.name}.": n.components.get("config", {}) for n in sp if n.name in shared},
            work_dir / "tracking-journal",
            time.time(),
            tracking.headline_params(
                {n.name: n.components.get("config", {}) for n in sp if n.name in shared}, catalog.headline
            ),
        )
        tracker.open()
        out = None
        try:
            out = execute([sp], store, console, work_dir=work_dir, start_cluster=start, tracker=tracker)
        finally:
            tracker.finish(
                {"stages." + n.name: f"{n.status} {n.key[:12]}" for n in shared_nodes_out},
                {},
                failed=out is None or not out.ok,
            )
        if not out.ok:
            raise PipelineError(
                f"sweep {sw.name}: the shared upstream failed ("
                + "; ".join(f"{n.name}: {n.error}" for n in shared_nodes_out if n.error)
                + ")"
            )
    start()
    _start_ray_data_services()

    # 2. the trials
    spec = {
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
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials resolve relative paths as the driver does
    # a trial's training reports carry one stage's metrics, its final result the evaluate ones:
    # ASHA skips a result without its metric; Tune's strict check would fail the trial instead
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no Tune tables (ours: one line per trial)
    trainable = tune.with_resources(tune.with_parameters(trial, spec=spec), _resources(sw.resources))
    storage = sweep_storage(store)
    exp_name = f"{sw.name}-{sweep_id}"
    exp_path = f"{storage}/{exp_name}"
    restored = tune.Tuner.can_restore(exp_path)
    if restored:
        console.line(f"sweep {sw.name}: continuing the experiment in {exp_path} (finished trials are kept)")
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, restart_errored=True)
    else:  # (a restored experiment keeps its first invocation's limit)
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
    # Tune's run config comes back from the experiment on restore: the progress callback and the
    # stopper are this invocation's, set on the restored tuner too
    # (tuner.pkl was written when the tuner was made: neither is pickled with the experiment)
    run_config = tuner._local_tuner.get_run_config()
    run_config.callbacks = [_Progress(console, sw.target), *callbacks]
    console.line(f"sweep {sw.name}: trials running (logs: {work_dir / 'logs'}/trial-<id>.log)")
    grid = tuner.fit()

    rows = []
    for r in grid:
        c = r.config or {}
        rows.append(
            {
                "trial_id": (r.metrics or {}).get("trial_id") or Path(r.path).name,
                "params": {k: _plain(v) for k, v in (c.get("params") or {}).items()},
                "seed": c.get("seed"),
                "metrics": {k: v for k, v in (r.metrics or {}).items() if isinstance(v, (int, float, str))},
                "status": _status(r, sw.target),
                "error": str(r.error).splitlines()[0] if r.error else None,
            }
        )
    results = aggregate(rows, sw.target, sw.mode)
    ok = all(r["status"] in ("finished", "stopped") for r in rows)
    _log_summary(sweep_run_id, tracking_uri, sw, rows, results, ok, work_dir)
    return SweepOutcome(ok, restored, shared_nodes_out, rows, results, sweep_run_id, exp_path)


def _status(r: Any, target: str) -> str:
    """``error``; ``finished`` (its final result has the target); ``stopped`` (ASHA stopped it
    mid-training: its last result is marked done, without the target); ``unfinished``
    (interrupted: re-run the sweep to continue it)."""
    m = r.metrics or {}
    if r.error:
        return "error"
    if target in m:
        return "finished"
    return "stopped" if m.get("done") else "unfinished"


def asha_scheduler(sw: SweepFile, sections: dict[str, Any]) -> Any:
    """The sweep's ``ASHAScheduler`` (metric and mode set on it; see :class:`AshaSection`).

    Raises:
        ConfigError: ``asha_metric`` names a stage the config has not, or one without
            ``train.max_steps`` while ``asha.max_t`` is not given.
    """
    from ray.tune.schedulers import ASHAScheduler

    if sw.asha_metric:
        stage = sw.asha_metric.split("/", 1)[0]
        if stage not in sections:
            raise ConfigError(
                f"sweep {sw.name}: asha_metric {sw.asha_metric!r} names stage {stage!r}, which the config has not"
            )
        max_t = sw.asha.max_t or ((sections[stage] or {}).get("train") or {}).get("max_steps")
        if not max_t:
            raise ConfigError(
                f"sweep {sw.name}: asha_metric {sw.asha_metric!r}: {stage}.train.max_steps is not set; give asha.max_t"
            )
        time_attr, metric, mode = f"{stage}/step", sw.asha_metric, sw.asha_mode
    else:
        time_attr, metric, mode, max_t = "training_iteration", sw.target, sw.mode, sw.asha.max_t or 100
    if sw.asha.grace_period > max_t:
        raise ConfigError(f"sweep {sw.name}: asha.grace_period {sw.asha.grace_period} exceeds max_t {max_t}")
    return ASHAScheduler(
        time_attr=time_attr,
        metric=metric,
        mode=mode,
        max_t=int(max_t),
        grace_period=sw.asha.grace_period,
        reduction_factor=sw.asha.reduction_factor,
        stop_last_trials=False,
    )


class _Progress:
    """A Tune callback: one line per trial that ends (its metric or its error)."""

    def __new__(cls, console: Any, metric: str):
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
                    f"  trial {trial.trial_id} {_describe(trial.config.get('params') or {}, trial.config.get('seed'))}: {shown}",
                    "ok",
                )

            def on_trial_error(self, iteration, trials, trial, **info):
                console.line(f"  trial {trial.trial_id} failed (see its log)", "error")

        return Progress()


class _Noop:
    def __call__(self, batch: Any) -> Any:
        return batch


def _start_ray_data_services() -> None:
    """Let the driver create Ray Data's cluster-wide helper actors (the actor-location tracker,
    stats, autoscaling coordinator: detached, created by whoever needs them first) with one
    tiny actor-pool pass, before any trial starts.

    Tune schedules a trial's children into the trial's placement group
    (``placement_group_capture_child_tasks``): created from a trial, those helpers would live in
    its placement group and die with it when the trial ends, and the next trial's evaluate
    fails (``ActorUnschedulableError: ... NodeAffinitySchedulingStrategy ... infeasible``).
    """
    import ray

    ds = ray.data.range(1).map_batches(_Noop, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0)
    ds.materialize()


def stage_cpus(nodes: Sequence[Any], tuned: Sequence[str]) -> float:
    """The most CPUs one of a trial's tuned stages asks for beyond the trial's own resources:
    a training stage's Ray Train workers (``scaling.num_workers`` x ``resources_per_worker``
    CPU; without a CPU entry Ray Train's default: 1 per CPU worker, none per GPU worker), any
    other stage's Ray Data / actor work 1 CPU.

    Args:
        nodes: the base plan's nodes (``.name``, ``.config``).
        tuned: the names of the stages a trial runs.
    """
    need = 1.0
    for n in nodes:
        scaling = getattr(n.config, "scaling", None)
        if n.name in tuned and scaling is not None and getattr(scaling, "num_workers", 0) > 0:
            default = 0.0 if getattr(scaling, "use_gpu", False) else 1.0
            per = (getattr(scaling, "resources_per_worker", None) or {}).get("CPU", default)
            need = max(need, scaling.num_workers * float(per))
    return need


def trial_concurrency(trial_cpus: float, need: float, cluster_cpus: float, requested: int | None) -> tuple[int, str]:
    """How many trials may run at once without starving their own stages, and a line to print.

    A trial holds ``trial_cpus`` for its driver while its stages start actors and workers of
    their own (``need`` CPUs for the largest, :func:`stage_cpus`). If the trials take every CPU,
    none of their stages can start and the sweep waits forever (Tune alone packs
    ``cluster_cpus / trial_cpus`` trials). So, unless ``requested``, at most
    ``floor((cluster_cpus - need) / trial_cpus)`` trials (at least 1) run at once. A requested
    number (the sweep file's ``max_concurrent_trials``) is kept, with a warning when it cannot fit
    the cluster as it is now (an autoscaling cluster may grow).

    Returns:
        ``(n, message)``: ``n`` is ``requested`` or the computed limit, 0 for none (no CPUs in
        the trial's resources, or the cluster cannot yet run even one trial: an autoscaling
        cluster before it grows, where a limit fixed now would stay after it grew); ``message``
        is empty when nothing needs saying.
    """
    fits = max(1, math.floor((cluster_cpus - need) / trial_cpus + 1e-9)) if trial_cpus > 0 else None
    alone = trial_cpus + need <= cluster_cpus + 1e-9
    if requested is not None:
        if fits is not None and (requested > fits or not alone):
            return requested, (
                f"warning: max_concurrent_trials {requested} x {trial_cpus:g} CPU per trial, plus {need:g} CPU for a "
                f"trial's stage, exceeds the cluster's {cluster_cpus:g} CPUs: trials may wait for CPUs forever "
                "unless the cluster grows"
            )
        return requested, ""
    if fits is None:
        return 0, ""
    if not alone:  # an autoscaling cluster that has not grown yet: no limit (Tune's packing)
        return 0, (
            f"warning: one trial needs {trial_cpus:g} CPU plus {need:g} CPU for its stage, more than the cluster's "
            f"{cluster_cpus:g} CPUs now: no limit on concurrent trials is set (the cluster must grow; set "
            "max_concurrent_trials in the sweep file to bound it)"
        )
    return fits, (
        f"at most {fits} trial(s) at once: each holds {trial_cpus:g} CPU and its stage needs up to {need:g} more "
        f"({cluster_cpus:g} CPUs; set max_concurrent_trials in the sweep file to change it)"
    )


def _resources(res: dict[str, float]) -> dict[str, float]:
    """Tune's resource names: ``CPU``/``GPU`` as ``cpu``/``gpu``, custom resources as given."""
    out = {}
    for k, v in res.items():
        out[k.lower() if k in ("CPU", "GPU") else k] = v
    return out


def _log_summary(
    run_id: str,
    tracking_uri: str,
    sw: SweepFile,
    rows: list[dict[str, Any]],
    results: list[ConfigResult],
    ok: bool,
    work_dir: Path,
) -> None:
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
            *(Text(_fmt(g.params.get(k))) for k in keys),
            Text(",".join(str(s) for s in g.seeds if s is not None) or "-"),
            f"{g.mean:.3f}",
            "-" if math.isnan(g.std) else f"{g.std:.3f}",
            Text(", ".join(f"{v:.3f}" for v in g.values)),
        )
    return t


__all__ = [
    "SWEEPS",
    "AshaSection",
    "ConfigResult",
    "Dist",
    "SweepFile",
    "SweepOutcome",
    "aggregate",
    "asha_scheduler",
    "experiment_id",
    "format_results",
    "load_sweep",
    "probe_overrides",
    "run_sweep",
    "shared_nodes",
    "sweep_storage",
    "training_reports",
    "trial",
]
