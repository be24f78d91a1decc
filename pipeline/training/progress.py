"""How rank 0's progress reaches the driver.

Workers print nothing per step. Rank 0 hands each :class:`~.metrics.Progress` record and each
note (resumed from ..., world size changed ...) to a channel:

* in-process (``num_workers=0``): :class:`DirectChannel` calls the driver's callbacks directly;
* with workers, which may run on other nodes: :class:`ActorChannel` puts them into a small Ray
  actor (:class:`_Mailbox`, no CPU) that :func:`relay`'s thread on the driver drains every
  ``poll_s`` seconds while ``TorchTrainer.fit()`` blocks the main thread (which keeps Ray's
  Ctrl-C handler there), calling the callbacks from that thread, never two at a time; the rest
  is drained on exit.

A callback that raises is reported once (stderr) and then skipped: progress display never stops
training. A callback that raises a ``BaseException`` that is not an ``Exception`` (``SystemExit``:
Ray Tune stopping the sweep trial this fit runs in, from ``tune.report``) ends the fit instead:
the relay aborts the Train run and removes its workers' placement group (rank 0 sends the
handles at start, :meth:`ActorChannel.attach`), so a stopped trial's workers free their
CPUs/GPUs for the next trial (see :func:`pipeline.raycompat.train_run_handles` for why Ray does
not do it itself here).

:func:`forward_progress` adds process-wide listeners that every :func:`~.fit.fit` started while
it is active calls too, with its Ray Train run name and each record (a sweep's trial forwards
them to Ray Tune: ``pipeline.sweep``).
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .metrics import Progress

#: listeners of :func:`forward_progress`, called by every fit started while they are active
_listeners: list[Callable[[str, Progress], None]] = []


@contextlib.contextmanager
def forward_progress(listener: Callable[[str, Progress], None]) -> Iterator[None]:
    """While active, every :func:`~.fit.fit` started in this process also calls
    ``listener(name, record)`` with its Ray Train run name (``RunConfig.name``) and each
    :class:`Progress` record, on the same thread as its ``progress`` callback (the relay's thread
    with workers; the training loop's in-process). An exception other than ``Exception``
    subclasses (e.g. ``SystemExit`` from Ray Tune stopping a trial) propagates."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


def with_listeners(show: Callable[[Progress], None], name: str) -> Callable[[Progress], None]:
    """``show`` followed by each active :func:`forward_progress` listener (fixed at call time),
    each guarded on its own: a failing listener does not silence the display."""
    listeners = [_guarded(functools.partial(fn, name)) for fn in _listeners]
    if not listeners:
        return show
    show = _guarded(show)

    def both(record: Progress) -> None:
        show(record)
        for fn in listeners:
            fn(record)

    return both


class DirectChannel:
    """In-process channel: calls ``progress(record)`` / ``note(text)`` directly."""

    def __init__(self, progress: Callable[[Progress], None], note: Callable[[str], None]):
        self._progress, self._note = _guarded(progress), _guarded(note)

    def attach(self, handles: dict[str, Any]) -> None:
        """Nothing to end from elsewhere in process (see :meth:`ActorChannel.attach`)."""

    def progress(self, record: Progress) -> None:
        self._progress(record)

    def note(self, text: str) -> None:
        self._note(text)


class ActorChannel:
    """Worker-side channel: a handle to the driver's mailbox actor (picklable)."""

    def __init__(self, mailbox: Any):
        self._mailbox = mailbox
        self._broken = False

    def _put(self, item: tuple[str, Any]) -> None:
        if self._broken:
            return
        import ray

        try:  # waited for: a record sent just before the worker exits is not lost
            ray.get(self._mailbox.put.remote(item), timeout=30)
        except Exception as e:  # noqa: BLE001 - progress must not stop training
            self._broken = True
            print(
                f"warning: progress reports to the driver stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True
            )

    def progress(self, record: Progress) -> None:
        self._put(("progress", record))

    def note(self, text: str) -> None:
        self._put(("note", text))

    def attach(self, handles: dict[str, Any]) -> None:
        """Rank 0, at the start of every worker group (again after a restart): the run's
        controller and placement group (:func:`pipeline.raycompat.train_run_handles`), with
        which the driver's relay ends the fit if a callback stops it."""
        self._put(("run", handles))


class _Mailbox:
    """A list the workers append to and the driver empties."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Any]] = []

    def put(self, item: tuple[str, Any]) -> None:
        self._items.append(item)

    def drain(self) -> list[tuple[str, Any]]:
        items, self._items = self._items, []
        return items


@contextlib.contextmanager
def relay(
    with_workers: bool, progress: Callable[[Progress], None], note: Callable[[str], None], poll_s: float = 0.5
) -> Iterator[DirectChannel | ActorChannel]:
    """The channel for a fit, and on the driver the thread that delivers what workers send.

    Args:
        with_workers: True for Ray Train workers (an actor and a polling thread), False for an
            in-process fit (direct calls).
        progress: called with each :class:`Progress` record.
        note: called with each note (one line of text).
        poll_s: seconds between drains of the mailbox.

    Yields:
        The channel to give the train loop (picklable with workers).
    """
    if not with_workers:
        yield DirectChannel(progress, note)
        return
    import ray

    mailbox = ray.remote(num_cpus=0)(_Mailbox).remote()
    deliver_progress, deliver_note = _guarded(progress), _guarded(note)
    stop = threading.Event()
    run: dict[str, Any] = {}

    def deliver(items: list[tuple[str, Any]]) -> None:
        for kind, payload in items:
            if kind == "run":
                run.update(payload)
            else:
                (deliver_progress if kind == "progress" else deliver_note)(payload)

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                deliver(ray.get(mailbox.drain.remote(), timeout=30))
            except Exception:  # noqa: BLE001 - a slow or restarting cluster: try again
                continue
            except BaseException:  # a callback stopped the fit (Tune stopped this trial)
                end_run(run, deliver_note)
                raise

    thread = threading.Thread(target=poll, name="train-progress", daemon=True)
    thread.start()
    try:
        yield ActorChannel(mailbox)
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            deliver(ray.get(mailbox.drain.remote(), timeout=30))
        with contextlib.suppress(Exception):
            ray.kill(mailbox)


def end_run(run: dict[str, Any], note: Callable[[str], None] = lambda _: None, wait_s: float = 10.0) -> bool:
    """End a running Ray Train fit from its driver's process, as Ray Train's own Ctrl-C path
    does, and make sure its workers' resources are free when this returns.

    1. Ask the controller to abort (not waited for yet): it stops its placement-group cleaner,
       shuts the worker group down and exits; an aborted run is never restarted.
    2. Remove the workers' placement group (synchronous in the GCS: its CPUs/GPUs are free when
       the call returns and the workers in it are killed). Done before any wait: the caller (a
       stopped Tune trial) may be killed at any moment once Tune frees the trial's resources,
       and the controller it owns with it.
    3. Wait up to ``wait_s`` seconds for the abort.

    Args:
        run: what rank 0 attached (:func:`pipeline.raycompat.train_run_handles`); may be empty
            when the stop came before the workers started.
        note: called with one line saying what was done.
        wait_s: how long to wait for the controller's abort.

    Returns:
        True if a placement group was removed.
    """
    import ray
    import ray.util

    controller, pg = run.get("controller"), run.get("placement_group")
    aborted = None
    if controller is not None:
        with contextlib.suppress(Exception):
            aborted = controller.abort.remote()
    removed = False
    if pg is not None:
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(pg)
            removed = True
    if aborted is not None:
        with contextlib.suppress(Exception):
            ray.wait([aborted], timeout=wait_s)
    note(
        "the fit was stopped (its trial was stopped): aborted the Train run"
        + (f" and removed its workers' placement group {pg.id.hex()}" if removed else "")
    )
    return removed


def _guarded(fn: Callable[[Any], None]) -> Callable[[Any], None]:
    failed = False

    def call(x: Any) -> None:
        nonlocal failed
        if failed:
            return
        try:
            fn(x)
        except Exception as e:  # noqa: BLE001 - a display error must not stop training
            failed = True
            print(
                f"warning: training progress callback {getattr(fn, '__name__', getattr(fn, 'func', fn))!r} failed and is no longer "
                f"called: {type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )

    return call
