"""The Ray cluster of an invocation: starting or joining it, and checking that every node reaches
what the invocation writes to.

* :func:`init_ray`: join ``run.ray.address`` / ``RAY_ADDRESS`` or start an embedded local cluster;
* :func:`check_store_reachable`, :func:`check_tracking_reachable`: refuse an artifact store or an
  MLflow tracking store that only this machine reaches when Ray has nodes on other machines;
* :func:`job_copy_notes`: notes for a ``ray job submit --working-dir`` driver whose work dir lies
  inside Ray's temporary copy of that directory;
* :class:`Cluster`: all of it for one invocation: started when the first stage runs, checked,
  and shut down at the end when the invocation started it.

Ray is imported only inside these functions: a fully cached invocation never imports it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import LoadedConfig
from pipeline.console import Console
from pipeline.errors import PipelineError


def init_ray(cfg: LoadedConfig, console: Console, verbose: bool) -> bool:
    """Connect to ``run.ray.address`` / ``RAY_ADDRESS`` (set by ``ray job submit``), or start an
    embedded local cluster; a no-op when Ray is already initialised (returns False then, True
    when this call initialised it). Ray's own logs go to its session log files (and the
    invocation's log), not the terminal, unless ``verbose``."""
    import ray

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


class Cluster:
    """Ray for one invocation (``zeroseg run``, ``zeroseg sweep``).

    :meth:`start` (what :func:`pipeline.execute.execute` calls before the first node that runs,
    and a sweep before its trials) starts or joins Ray (:func:`init_ray`) and checks that every
    node reaches the artifact store and the tracking store; :meth:`stop` shuts down a cluster that
    :meth:`start` started (one joined, or already initialised, is left alone).

    Args:
        cfg: the invocation's config (``run.ray``, ``run.store``).
        console: where the cluster's lines go.
        verbose: show Ray's own logs.
        tracking_uri: the MLflow tracking URI the invocation logs to (checked for reachability).
    """

    def __init__(self, cfg: LoadedConfig, console: Console, verbose: bool, tracking_uri: str):
        self.cfg, self.console, self.verbose, self.tracking_uri = cfg, console, verbose, tracking_uri
        self.started = False  # this invocation initialised Ray

    def start(self, store_uri: str | None = None) -> None:
        """Start or join Ray and check reachability of ``store_uri`` (default ``run.store_uri()``)
        and of the tracking store.

        Raises:
            PipelineError: Ray cannot be joined, or a store only this machine reaches on a
                cluster of several machines.
        """
        self.started = init_ray(self.cfg, self.console, self.verbose) or self.started
        check_store_reachable(store_uri or self.cfg.run.store_uri())
        check_tracking_reachable(self.tracking_uri)

    def stop(self) -> None:
        """Shut Ray down if :meth:`start` started it (so the wall time printed includes it)."""
        if self.started:
            self.started = False
            sys.modules["ray"].shutdown()


__all__ = [
    "RAY_JOB_CONFIG_ENV",
    "Cluster",
    "check_store_reachable",
    "check_tracking_reachable",
    "init_ray",
    "job_copy_notes",
    "machine_local_tracking",
]
