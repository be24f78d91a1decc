"""What an invocation prints about its plan and its result (``zeroseg run``, ``zeroseg sweep``).

* :func:`print_notes`: ``NOTE:`` lines (the plan's notices, a ``ray job submit`` copy's work dir);
* :func:`print_plan`: the plan table and why each stage that runs is not cached;
* :func:`print_summary`: the stages table after execution and each stage's own summary;
* :func:`print_gc`: ``zeroseg gc``'s table of unreferenced artifacts;
* :func:`mlflow_runs`: how to look at the invocation's MLflow runs;
* :func:`print_wall_time`: the closing line.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from rich.table import Table
from rich.text import Text

from pipeline.config import LoadedConfig
from pipeline.console import Console
from pipeline.plan import Plan


def print_notes(console: Console, lines: Iterable[str]) -> None:
    """One ``NOTE: <line>`` per line, in the note style."""
    for line in lines:
        console.line(f"NOTE: {line}", "note")


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
    """The stages table after execution (stage, key, status, wall seconds, the stage's note or
    error), then each stage's own summary renderables (:meth:`pipeline.dag.Stage.summary`)."""
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


def print_gc(console: Console, store_uri: str, kept_by: str, report: Any, deleted: bool) -> None:
    """``zeroseg gc``'s table of what no kept run references (a :class:`pipeline.gc.Report`:
    ``items`` with kind, stage, key, bytes and note; ``bytes``; ``kept``), then the totals."""
    t = Table(title=Text(f"unreferenced in {store_uri} (kept: {kept_by})"), title_justify="left")
    for col in ("kind", "stage", "key", "MiB", "what"):
        t.add_column(col)
    for item in report.items:
        t.add_row(item.kind, Text(item.stage), Text(item.key[:12]), f"{item.bytes / 2**20:.1f}", Text(item.note))
    console.print(t)
    verb = "removed" if deleted else "would remove (pass --delete)"
    console.line(f"{len(report.items)} item(s), {report.bytes / 2**20:.1f} MiB: {verb}; {report.kept} artifact(s) kept")


def mlflow_runs(cfg: LoadedConfig, served: bool) -> str:
    """The command that shows the invocation's MLflow runs (:func:`pipeline.tracking.ui_command`),
    with a remark when ``served`` (a tracking server was started, ``run.tracking_server``): the
    runs are in the store that server served."""
    from pipeline import tracking

    note = " (the store the stopped tracking server served)" if served and cfg.run.local_tracking_server() else ""
    return f"{tracking.ui_command(cfg.run.mlflow_uri())}{note}"


def print_wall_time(console: Console, t_start: float) -> None:
    """``total wall time <s> s`` since ``t_start`` (epoch seconds)."""
    console.line(f"total wall time {time.time() - t_start:.1f} s")


__all__ = ["mlflow_runs", "print_gc", "print_notes", "print_plan", "print_summary", "print_wall_time"]
