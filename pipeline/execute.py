"""Execution: run or read each node of one or more plans, once per distinct key.

For each node, in order: a ``cached`` node's artifact is read and verified; a ``run`` node takes
the store's lease on its key (waiting while another invocation computes it, then reading that
artifact), runs the stage into a fresh staging directory inside its MLflow run (continuing the
run of an interrupted earlier attempt at the same key), and publishes the artifact with its
manifest last. A node whose upstream failed is ``not run``. The cluster is started (or joined)
just before the first node that runs: a fully cached invocation never starts Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline import codehash, tracking
from pipeline.console import Console
from pipeline.dag import Artifact, StageContext
from pipeline.errors import StoreError, find_user_error
from pipeline.plan import Node, Plan
from pipeline.store import ArtifactStore, CorruptArtifact

#: Library versions recorded in every manifest (code of third parties is not hashed into keys).
RECORDED_PACKAGES = ("torch", "torchvision", "ray", "open_clip_torch", "mlflow", "pyarrow", "numpy", "zeroseg")


def package_versions() -> dict[str, str | None]:
    """``{distribution: version or None}`` of :data:`RECORDED_PACKAGES`."""
    out: dict[str, str | None] = {}
    for name in RECORDED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


@dataclasses.dataclass
class Outcome:
    """What executing a set of plans did: ``ok`` (no node failed) and ``nodes`` (the distinct
    nodes in execution order, with their status, seconds, metrics and error)."""

    ok: bool
    nodes: list[Node]


def execute(
    plans: Sequence[Plan],
    store: ArtifactStore,
    console: Console,
    *,
    work_dir: Path,
    start_cluster: Callable[[], None] = lambda: None,
    tracker: tracking.Invocation | None = None,
) -> Outcome:
    """Run the nodes of ``plans`` (see module docstring).

    Args:
        plans: one plan, or several (a sweep): a key shared by several runs once.
        store: the artifact store.
        console: where progress and results go.
        work_dir: the invocation's work directory (scratch, caches).
        start_cluster: called once, before the first node that runs (starts or joins Ray).
        tracker: the invocation's MLflow records (None: nothing is tracked).

    Returns:
        the :class:`Outcome`. Every node of every plan gets its status (a plan's node that shares
        a key with an earlier one gets that one's status and metrics).

    Raises:
        KeyboardInterrupt: re-raised after the running node is marked failed.
    """
    artifacts: dict[tuple[str, str], Artifact] = {}
    done: dict[tuple[str, str], Node] = {}
    ok, started = True, False
    commit = codehash.git_commit()
    for p in plans:
        for node in p:
            ident = (node.name, node.key)
            if ident in done:
                first = done[ident]
                node.status, node.metrics, node.seconds, node.error = first.status, first.metrics, 0.0, first.error
                continue
            done[ident] = node
            if node.action == "skip":
                node.status = "skipped"
                continue
            ups = [p.nodes[u] for u in node.upstream]
            if any((u.name, u.key) not in artifacts for u in ups):  # an upstream failed (or was not run)
                node.status = "not run"
                continue
            inputs = {role: artifacts[(up, p.nodes[up].key)] for role, up in node.bindings.items()}
            art = _cached(node, store, console, tracker) if node.action == "cached" else None
            if art is None:
                if not started:
                    start_cluster()
                    started = True
                art = _run(node, inputs, store, console, work_dir, commit, tracker)
            if art is None:
                ok = False
                continue
            art.runtime = node.stage.runtime_outputs(node.config)
            artifacts[ident] = art
    return Outcome(ok, list(done.values()))


def _cached(node: Node, store: ArtifactStore, console: Console, tracker: tracking.Invocation | None) -> Artifact | None:
    try:
        art = store.get(node.name, node.key)
    except CorruptArtifact as e:
        console.line(f"{node.name}: cached artifact failed verification ({e}); re-running", "warn")
        node.reason, node.cached = "the cached artifact failed verification", True
        return None
    if art is None:  # removed since planning, or an unreadable manifest: compute it (anew)
        node.reason = "the artifact disappeared from the store or its manifest is unreadable"
        node.cached = store.exists(node.name, node.key)
        return None
    _record_cached(node, art, tracker)
    console.line(f"✓ {node.name} cached ({node.key[:12]})", "ok")
    return art


def _record_cached(node: Node, art: Artifact, tracker: tracking.Invocation | None) -> None:
    node.status, node.metrics = "cached", dict(art.manifest.get("metrics", {}))
    if tracker is not None:
        tracker.cached(
            node.name,
            node.key,
            node.components["config"],
            node.runtime,
            {"produced_by_run": art.manifest.get("mlflow_run_id"), "artifact_uri": art.uri},
            node.metrics,
        )


def _run(
    node: Node,
    inputs: dict[str, Artifact],
    store: ArtifactStore,
    console: Console,
    work_dir: Path,
    commit: str | None,
    tracker: tracking.Invocation | None,
) -> Artifact | None:
    """Run ``node`` under the store's lease on its key (or read what another invocation published
    meanwhile), inside its MLflow stage run, and publish its artifact. Returns the artifact, or
    None when the stage failed (``node.error`` says why; the failure is printed).

    Raises:
        KeyboardInterrupt: after the node is marked failed and its staging directory discarded.
    """
    lease, published = _lease(node, store, console, tracker)
    if lease is None:
        return published
    if node.reason == "forced":  # a forced training stage trains again, not from its old checkpoints
        store.delete_checkpoints(node.name, node.key)
    console.line(f"▶ {node.name} running ({node.key[:12]})", "run")
    t0 = time.perf_counter()
    staging: Path | None = None
    try:
        with (
            lease,
            (
                tracker.stage(node.name, node.key, node.components["config"], node.runtime)
                if tracker is not None
                else contextlib.nullcontext()
            ) as run_id,
            console.stage_progress(node.name) as progress,
        ):
            staging = store.staging_dir(node.name, node.key)
            ctx = _context(node, inputs, store, console, work_dir, staging, tracker, run_id, progress)
            try:
                metrics = node.stage.run(ctx) or {}
                node.seconds = time.perf_counter() - t0
                art = _publish(node, inputs, store, lease, staging, metrics, run_id, commit)
            except BaseException as e:
                if tracker is not None:
                    tracking.set_tags({"status": "failed", "error": f"{type(e).__name__}: {e}"[:5000]})
                raise  # the nested run ends FAILED
            if tracker is not None:
                _record_ran(node, art, metrics, console)
    except BaseException as e:
        node.seconds = time.perf_counter() - t0
        node.status = "failed"
        if staging is not None:
            store.discard(staging)
        if isinstance(e, KeyboardInterrupt):
            node.error = "interrupted"
            raise
        _report_failure(node, e, console)
        return None
    node.status, node.metrics = "ran", dict(metrics)
    console.line(f"✓ {node.name} ran in {node.seconds:.1f} s", "ok")
    return art


def _lease(
    node: Node, store: ArtifactStore, console: Console, tracker: tracking.Invocation | None
) -> tuple[Any, Artifact | None]:
    """The store's lease on the node's key, waiting while another invocation holds it:
    ``(lease, None)``, or ``(None, artifact)`` when that invocation published the artifact."""

    def waiting(holder: Any) -> None:
        console.line(f"  {node.name}: {node.key[:12]} is being computed by {holder.describe()}; waiting for it")

    replace = node.cached  # forced, or the cached artifact failed verification
    while (lease := store.lease(node.name, node.key, replace=replace, on_wait=waiting)) is None:
        try:  # another invocation published it while we waited
            art = store.get(node.name, node.key)
        except CorruptArtifact:
            art = None
        if art is not None:
            _record_cached(node, art, tracker)
            console.line(f"✓ {node.name} computed by another invocation ({node.key[:12]})", "ok")
            return None, art
        replace = True  # a manifest that exists but cannot be used: replace it
    return lease, None


def _context(
    node: Node,
    inputs: dict[str, Artifact],
    store: ArtifactStore,
    console: Console,
    work_dir: Path,
    staging: Path,
    tracker: tracking.Invocation | None,
    run_id: str | None,
    progress: Any,
) -> StageContext:
    """What the stage's ``run`` gets: its config, inputs, staging directory, training storage
    and run name (from the key), MLflow run, log and progress display."""
    return StageContext(
        stage=node.name,
        key=node.key,
        config=node.config,
        inputs=inputs,
        output_dir=staging,
        work_dir=work_dir,
        train_storage=store.train_storage(),
        train_name=store.checkpoint_dir(node.name, node.key),
        tracking={"tracking_uri": tracker.tracking_uri, "run_id": run_id} if tracker is not None else None,
        log=lambda msg, _n=node.name: console.line(f"  [{_n}] {msg}"),
        progress=progress,
    )


def _publish(
    node: Node,
    inputs: dict[str, Artifact],
    store: ArtifactStore,
    lease: Any,
    staging: Path,
    metrics: dict[str, Any],
    run_id: str | None,
    commit: str | None,
) -> Artifact:
    """Publish the staging directory as the node's artifact, its manifest last.

    Raises:
        StoreError: the lease was taken over while the stage ran (nothing is published).
    """
    if lease.lost:
        raise StoreError(
            f"{node.name}: the lease on {node.key[:12]} was taken over while this invocation ran (it "
            f"stalled for longer than {store.lease_ttl:.0f} s); its result is not published, re-run"
        )
    return store.publish(
        node.name,
        node.key,
        staging,
        {
            "inputs": {role: {"stage": a.stage, "key": a.key} for role, a in inputs.items()},
            "components": node.components,
            "config": node.config.model_dump(mode="json") if hasattr(node.config, "model_dump") else node.config,
            "runtime": node.runtime,
            "metrics": metrics,
            "timings": {"seconds": node.seconds},
            "mlflow_run_id": run_id,
            "git_commit": commit,
            "packages": package_versions(),
        },
    )


def _record_ran(node: Node, art: Artifact, metrics: dict[str, Any], console: Console) -> None:
    """Tag the active stage run ``ran`` with its artifact, log its metrics and manifest; the
    artifact is published: a tracking hiccup is printed, it does not fail the stage."""
    try:
        tracking.set_tags({"status": "ran", "artifact_uri": art.uri})
        tracking.log_metrics({**metrics, "wall_seconds": node.seconds})
        tracking.log_artifact(art.path / "manifest.json")
    except Exception as e:  # noqa: BLE001
        console.line(f"  [{node.name}] MLflow: could not record the run ({type(e).__name__}: {e})", "warn")


def _report_failure(node: Node, e: BaseException, console: Console) -> None:
    """Set ``node.error`` and print the failure: a user error's message, else the traceback
    (call it while ``e`` is being handled)."""
    user = find_user_error(e)
    if user is not None:
        node.error = f"{type(user).__name__}: {user}"
        console.line(f"✗ {node.name} failed: {user}", "error")
    else:
        node.error = f"{type(e).__name__}: {e}"
        console.line(f"✗ {node.name} failed:", "error")
        console.line(traceback.format_exc().rstrip())


__all__ = ["Outcome", "execute", "package_versions"]
