"""Batch inference as one component: map a model over rows with a Ray Data actor pool, then
reduce (metrics) or write (predictions, features) the outputs.

Evaluation, pseudo-labelling, feature collection and proposal recall all have this shape. The
model side is a *predictor*, a class built once per actor::

    class Predictor:
        def __init__(self, **kwargs): ...              # load the model (small kwargs: URIs, not arrays)
        def load(self, batch) -> inputs: ...           # I/O (decoding), timed apart
        def __call__(self, inputs) -> outputs: ...     # compute on the actor's device
        device_name: str                               # for the timing record
        info: dict                                     # optional: what else the record should say

The reduce side is any number of *evaluators* (detectron2's ``DatasetEvaluator``, with partial
states merged on the driver), objects with

    reset()                      start an empty partial state
    process(inputs, outputs)     add one batch (in the actor, next to the model's outputs)
    merge(other)                 add another partial state (on the driver)
    finalize() -> dict           the result

For each batch the actor resets its evaluators, processes the batch and sends their partial state
back (pickled: it must be small, e.g. the confusion matrices of the sets in the batch); the driver
merges them into its own instances. Nothing of image size travels to the driver. New metrics plug in as new
evaluators; this module does not change.

Timing (``Timing``, always collected): per batch, the seconds of ``load`` and of ``__call__`` +
every ``process`` (the model's compute and the metric counting), flagged untimed for each
actor's first ``warmup_batches`` batches.

User errors raised in an actor (a bad label file, a bad model artifact) reach the driver as
themselves (``pipeline.errors.carry_user_errors``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from ray import cloudpickle  # evaluators defined anywhere (a test, a notebook) travel by value

from pipeline.errors import carry_user_errors, find_user_error


@dataclasses.dataclass
class Timing:
    """Seconds and rows of an inference pass (per actor: after its warm-up batches).

    Attributes:
        rows: rows processed; ``rows_timed``: of them, in timed batches.
        load_seconds: seconds in ``predictor.load`` (all batches).
        compute_seconds: seconds in ``predictor.__call__`` + evaluators (timed batches).
        devices: the actors' device names.
        info: the predictors' ``info`` (e.g. the input size), as the last batch reported it.
    """

    rows: int = 0
    rows_timed: int = 0
    load_seconds: float = 0.0
    compute_seconds: float = 0.0
    devices: set[str] = dataclasses.field(default_factory=set)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rows_per_second(self) -> float | None:
        """Timed rows per compute second of one actor (None before any timed batch)."""
        return self.rows_timed / self.compute_seconds if self.rows_timed and self.compute_seconds > 0 else None


class _Actor:
    """The ``map_batches`` callable class: predictor + evaluator copies (see module docstring)."""

    def __init__(self, predictor: type, predictor_kwargs: Mapping[str, Any], evaluators: bytes, warmup_batches: int):
        self.predictor = predictor(**dict(predictor_kwargs))
        self.evaluators: dict[str, Any] = cloudpickle.loads(evaluators)  # one per actor, reset every batch
        self.warmup = int(warmup_batches)
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timed = self.calls >= self.warmup
        self.calls += 1
        t0 = time.perf_counter()
        inputs = self.predictor.load(batch)
        t1 = time.perf_counter()
        outputs = self.predictor(inputs)
        for ev in self.evaluators.values():
            ev.reset()
            ev.process(inputs, outputs)
        states = self.evaluators  # pickled below, before the next batch resets them
        t2 = time.perf_counter()
        rows = len(next(iter(batch.values()))) if batch else 0
        return {
            "states": np.array([cloudpickle.dumps(states)], dtype=object),
            "rows": np.array([rows]),
            "load_s": np.array([t1 - t0]),
            "compute_s": np.array([t2 - t1]),
            "timed": np.array([timed]),
            "device": np.array([str(getattr(self.predictor, "device_name", "?"))], dtype=object),
            "info": np.array([json.dumps(getattr(self.predictor, "info", {}), default=str)], dtype=object),
        }


def reduce(
    ds: Any,
    predictor: type,
    predictor_kwargs: Mapping[str, Any],
    evaluators: Mapping[str, Any],
    *,
    batch_size: int,
    concurrency: int = 1,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    warmup_batches: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, Any], Timing]:
    """Run ``predictor`` over ``ds`` with an actor pool and merge the evaluators' partial states.

    Args:
        ds: a Ray Data dataset of input rows (e.g. a resolved manifest).
        predictor: the predictor class (module docstring); ``predictor_kwargs`` its arguments
            (keep them small: they travel with each actor's constructor).
        evaluators: ``{name: evaluator}`` (fresh, empty instances; copied into every actor).
        batch_size: rows per predictor call; concurrency: actors; num_cpus / num_gpus: per actor.
        warmup_batches: each actor's first batches left out of ``Timing.compute_seconds``.
        progress: called with the number of rows of each finished batch (on the driver).

    Returns:
        ``({name: merged evaluator}, Timing)``; call ``finalize()`` on each evaluator.

    Raises:
        the user error an actor raised (itself), or Ray's error for anything else.
    """
    import ray

    merged = {name: copy.deepcopy(ev) for name, ev in evaluators.items()}
    for ev in merged.values():
        ev.reset()
    timing = Timing()
    out = ds.map_batches(
        carry_user_errors(_Actor),
        fn_constructor_kwargs={
            "predictor": predictor,
            "predictor_kwargs": dict(predictor_kwargs),
            "evaluators": cloudpickle.dumps(dict(evaluators)),
            "warmup_batches": warmup_batches,
        },
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=num_gpus or None,
        num_cpus=num_cpus,
    )
    try:
        for b in out.iter_batches(batch_size=None, batch_format="numpy"):
            for j in range(len(b["rows"])):
                for name, ev in cloudpickle.loads(b["states"][j]).items():
                    merged[name].merge(ev)
                rows = int(b["rows"][j])
                timing.rows += rows
                timing.load_seconds += float(b["load_s"][j])
                if bool(b["timed"][j]):
                    timing.rows_timed += rows
                    timing.compute_seconds += float(b["compute_s"][j])
                timing.devices.add(str(b["device"][j]))
                timing.info = json.loads(b["info"][j])
                if progress is not None:
                    progress(rows)
    except Exception as e:
        user = find_user_error(e)
        if user is not None:
            raise user from None
        raise
    return merged, timing


__all__ = ["Timing", "reduce"]
