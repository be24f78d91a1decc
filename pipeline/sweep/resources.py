"""What a sweep's trials may use: the CPUs a trial's stages need beside it (:func:`stage_cpus`),
how many trials run at once (:func:`trial_concurrency`), a trial's Tune resources
(:func:`tune_resources`), the ASHA scheduler (:func:`asha_scheduler`) and the cluster-wide Ray
Data helpers the driver creates before any trial (:func:`start_ray_data_services`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pipeline.errors import ConfigError

from .spec import SweepFile


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


def tune_resources(res: dict[str, float]) -> dict[str, float]:
    """Tune's resource names: ``CPU``/``GPU`` as ``cpu``/``gpu``, custom resources as given."""
    out = {}
    for k, v in res.items():
        out[k.lower() if k in ("CPU", "GPU") else k] = v
    return out


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


class _Noop:
    def __call__(self, batch: Any) -> Any:
        return batch


def start_ray_data_services() -> None:
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


__all__ = ["asha_scheduler", "stage_cpus", "start_ray_data_services", "trial_concurrency", "tune_resources"]
