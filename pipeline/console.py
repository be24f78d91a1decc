"""What an invocation prints: the plan, one progress display per running stage, results, errors.

Every string that comes from a user or a library (config values, paths, error messages,
tracebacks) is printed as plain text, never parsed as Rich markup: ``--set 'evaluate.[/x]=1'``
prints as typed, and traceback lines keep their ``[...]`` parts. Styling is applied to whole
lines by this module only.

On a terminal a running stage shows a live bar (items or steps, rate, ETA); elsewhere (a
``ray job`` log, CI, a pipe) the bar prints once, in its final state, when the stage ends.
Library noise (Ray, MLflow, alembic, Ray Data's own progress) goes to the invocation's log file;
``--verbose`` shows it on the terminal too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console as RichConsole
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from pipeline.dag import Progress as StageProgress

STYLES = {"ok": "green", "run": "cyan", "warn": "yellow", "error": "red", "note": "bold yellow", "dim": "dim"}


class Console:
    """The invocation's output (a thin layer over ``rich.console.Console``).

    Args:
        verbose: also show library logs on the terminal.
        file: where to print (default stdout).
    """

    def __init__(self, verbose: bool = False, file: Any = None):
        self.rich = RichConsole(highlight=False, soft_wrap=True, file=file or sys.stdout)
        self.verbose = verbose
        self._progress: Progress | None = None

    # -- lines -----------------------------------------------------------------------------
    def line(self, text: str, style: str | None = None) -> None:
        """Print one line of plain text (no markup), styled as a whole (see :data:`STYLES`)."""
        target = self._progress.console if self._progress is not None else self.rich
        target.print(Text(str(text), style=STYLES.get(style or "", style or "")))

    def error(self, text: str) -> None:
        """``error: <text>`` in red; the text is printed verbatim."""
        self.line(f"error: {text}", "error")

    def print(self, renderable: Any) -> None:
        """A rich renderable built by this program (tables); strings are printed as plain text."""
        if isinstance(renderable, str):
            self.line(renderable)
            return
        target = self._progress.console if self._progress is not None else self.rich
        target.print(renderable)

    # -- progress --------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage_progress(self, stage: str) -> Iterator[Any]:
        """A context in which ``factory(total, unit)`` makes the stage's progress display (one per
        stage: a second call re-labels it). On a terminal it is a live bar (done/total, rate,
        the stage's fields, elapsed, ETA); elsewhere (a log, a pipe) one line with the final
        state when the stage ends. A stage that makes none prints nothing."""
        bar = _Bar(stage, self)
        try:
            yield bar.make
        finally:
            bar.close()


class _Bar(StageProgress):
    """One stage's progress display (created on the first ``make``; updates may come from
    another thread, e.g. a training progress relay)."""

    def __init__(self, stage: str, console: Console):
        self.stage, self.console = stage, console
        self.live = console.rich.is_terminal
        self.prog: Progress | None = None
        self.task: TaskID | None = None
        self.total: float | None = None
        self.unit = "items"
        self.fields: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._done = 0.0

    def make(self, total: float | None = None, unit: str = "items") -> _Bar:
        self.total, self.unit = total, unit
        if self.live and self.prog is None:
            self.prog = Progress(
                TextColumn("  {task.description}"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("{task.fields[unit]}"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console.rich,
                transient=False,
            )
            self.task = self.prog.add_task(self.stage, total=total, unit=unit, info="")
            self.prog.start()
            self.console._progress = self.prog
        elif self.prog is not None:
            self.prog.update(self.task, total=total, unit=unit)
        if self.task is None and not self.live:
            self.task = 0  # made: close() prints the final state
        return self

    def _info(self) -> str:
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        extra = " ".join(f"{k} {_fmt(v)}" for k, v in self.fields.items())
        return f"{rate:.2f} {self.unit}/s" + (f"  {extra}" if extra else "")

    def update(
        self, completed: float | None = None, advance: float = 0, total: float | None = None, **fields: Any
    ) -> None:
        if self.task is None:
            self.make(total)
        if completed is not None:
            self._done = float(completed)
        self._done += advance
        if total is not None:
            self.total = total
        self.fields.update(fields)
        if self.prog is not None:
            self.prog.update(self.task, completed=self._done, total=self.total, info=self._info())

    def close(self) -> None:
        if self.prog is not None:
            self.prog.stop()
            self.console._progress = None
        elif self.task is not None:
            secs = int(time.perf_counter() - self._t0)
            total = f"/{_fmt(self.total)}" if self.total is not None else ""
            self.console.line(
                f"  {self.stage}: {_fmt(self._done)}{total} {self.unit}, {self._info()}, {secs // 60}:{secs % 60:02d}"
            )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4g}"
    return str(v)


def setup_logging(log_file: Path, verbose: bool) -> None:
    """Send library logs (Ray, MLflow, alembic, urllib3, py.warnings) to ``log_file``; with
    ``verbose`` to stderr as well. Our own output goes through :class:`Console`, not logging."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fh = logging.FileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(fh)
    root.setLevel(logging.INFO)
    if verbose:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(sh)
    logging.captureWarnings(True)
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic"):
        lg = logging.getLogger(name)
        lg.handlers.clear()  # Ray installs its own stderr handlers
        lg.propagate = True


@contextlib.contextmanager
def library_output_to(log_file: Path, enabled: bool = True) -> Iterator[None]:
    """Send everything written to the process's stderr (file descriptor 2: Ray's C++ core
    worker, Ray and MLflow warnings, tracebacks of library threads) to ``log_file`` while the
    context lasts; our own output goes to stdout. Restores stderr on exit. Disabled (a no-op)
    with ``enabled=False`` (``--verbose``)."""
    if not enabled:
        yield
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


__all__ = ["Console", "library_output_to", "setup_logging"]
