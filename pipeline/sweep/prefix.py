"""The shared upstream of a sweep: the nodes no searched value re-keys, run (or read) once on the
driver before any trial starts (step 1 of :func:`pipeline.sweep.run_sweep`).

The base config is planned with every searched key set to each of its values (grid/choice) or
bounds (uniform/loguniform), and every seed (:func:`probe_overrides`); a node whose key is the
same in all these plans (:func:`shared_nodes`) does not depend on what is searched. (A sampled
value between the bounds cannot re-key a node that neither bound re-keys: keys depend on the
value only through the stage's config.)
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import LoadedConfig, config_from_raw, digest
from pipeline.errors import ConfigError, PipelineError
from pipeline.invocation import execute_tracked, tracked
from pipeline.plan import Plan, Selection, plan

from .spec import SweepFile


def as_override(key: str, value: Any) -> str:
    """``key=<value as JSON>``: a ``--set`` override."""
    return f"{key}={json.dumps(plain(value))}"


def plain(v: Any) -> Any:
    """numpy scalars -> Python (Tune samples numpy floats)."""
    if hasattr(v, "item") and callable(v.item):
        return v.item()
    return v


def probe_overrides(sw: SweepFile) -> list[list[str]]:
    """One override list per probe: each searched key at each of its probe values, each seed."""
    out = [[as_override(k, v)] for k, d in sw.space.items() for v in d.probes()]
    out += [[as_override(sw.seed_key, s)] for s in sw.seeds]
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


def split_stages(
    cfg: LoadedConfig, base: LoadedConfig, base_raw: dict[str, Any], sw: SweepFile, catalog: Any, store: Any
) -> tuple[Plan, list[str], list[str]]:
    """Plan the base config and the probes; return ``(base plan, shared node names, tuned node
    names)``, both in execution order.

    Args:
        cfg: the config as given (its path); base, base_raw: with the sweep's ``set`` applied.

    Raises:
        ConfigError: a searched key of a section the config has not, or one that is not a config
            key of its stage (from the probes' planning); nothing searched re-keys a stage; a
            tuned training stage trains in process (``scaling.num_workers: 0``), which Ray Train
            cannot do inside a Tune trial.
    """
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
    return base_plan, shared, tuned


def run_shared(
    base: LoadedConfig,
    shared: list[str],
    sw: SweepFile,
    *,
    catalog: Any,
    store: Any,
    console: Any,
    tracking_uri: str,
    experiment: str,
    tags: dict[str, str],
    start: Callable[[], None],
) -> list[Any]:
    """Run (or read) the shared upstream on the driver, as a tracked invocation nested under the
    sweep's run (named ``<sweep> shared upstream``); the base config's other nodes are skipped
    (they are a trial's business).

    Args:
        shared: the shared nodes' names (:func:`split_stages`); none: nothing is done.
        tracking_uri, experiment, tags: where its run goes and its tags (``mlflow.parentRunId``:
            the sweep's run).
        start: starts or joins the cluster (called before the first node that runs).

    Returns:
        The shared nodes (of the driver's plan), with their status.

    Raises:
        PipelineError: a shared node failed (each failure named).
    """
    if not shared:
        return []
    sp = plan(base, catalog.stages, Selection(stages=shared), store, code_packages=catalog.code_packages)
    for n in sp:
        if n.name not in shared:  # the base config's own suffix is a trial's business
            n.action = "skip"
    nodes = [n for n in sp if n.name in shared]
    work_dir = Path(base.run.work_dir)
    name = f"{sw.name} shared upstream"
    tracker = tracked(sp, tracking_uri, experiment, name, tags, work_dir, time.time(), shared, catalog.headline)
    out = execute_tracked(sp, store, console, tracker, work_dir=work_dir, nodes=shared, start_cluster=start)
    if not out.ok:
        raise PipelineError(
            f"sweep {sw.name}: the shared upstream failed ("
            + "; ".join(f"{n.name}: {n.error}" for n in nodes if n.error)
            + ")"
        )
    return nodes


__all__ = ["experiment_id", "probe_overrides", "run_shared", "shared_nodes", "split_stages"]
