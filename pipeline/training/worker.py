"""What every Ray Train worker (or the in-process fit) runs: :func:`worker_main`, the method's
loop on a :class:`~.loop.Loop`, then the final checkpoint; its status goes back to the driver
(:func:`pipeline.training.fit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.errors import NonFiniteLossError, RemoteUserError, is_user_error
from pipeline.raycompat import train_run_handles

from .loop import Loop


def worker_main(
    config: dict[str, Any], train_loop: Callable[[Loop], Any], meta: dict[str, Any], channel: Any
) -> dict[str, Any]:
    """What every worker (or the in-process fit) runs: the loop, then the final checkpoint.

    Returns:
        ``{"status": "ok", "steps", "resumed_from", "world_size", "precision", "metrics"}``, or
        ``{"status": "nonfinite", "step", "loss", "last_checkpoint"}``: every rank sees the same
        all-reduced loss and returns together; returning (instead of raising) keeps Ray Train
        from restarting a run that would diverge again; or ``{"status": "error", "error"}``: a user
        error (bad data or config, ``pipeline.errors.is_user_error``), which would recur on every
        restart, carried to the driver instead of being retried.
    """
    try:
        loop = Loop(config, meta, channel)
        if loop.rank == 0 and not loop._local:
            channel.attach(train_run_handles())  # lets the driver end this run if it is stopped
        train_loop(loop)
        loop._finish()
    except NonFiniteLossError as e:
        return {"status": "nonfinite", "step": e.step, "loss": e.loss, "last_checkpoint": e.last_checkpoint}
    except Exception as e:
        if is_user_error(e):  # bad input recurs on every attempt: returned, not retried by Ray Train
            return {"status": "error", "error": str(RemoteUserError.wrap(e, meta["error_key"]))}
        raise
    return {
        "status": "ok",
        "steps": loop.global_step,
        "resumed_from": loop.resumed_from_step,
        "world_size": loop.world_size,
        "precision": loop.precision,
        "metrics": dict(loop._last_metrics),
    }


__all__ = ["worker_main"]
