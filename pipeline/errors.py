"""Errors of the pipeline, and the one way a user error is recognised and recovered.

A *user error* is an exception a person can fix (a bad key, a missing file, bad data): the CLI
prints its message once, without a traceback. The pipeline's own are :class:`PipelineError`
subclasses; a project registers its domain errors with :func:`register_user_errors` (the
``stages`` package registers ``zeroseg.errors.ZerosegError``), so ``pipeline`` never imports the
science.

Raised inside a Ray worker (a Ray Data UDF, a Ray Train worker, a task), an exception reaches
the driver wrapped by Ray (``RayTaskError``, ``UserCodeException``, ``TrainingFailedError``, ...),
and Ray Data keeps only its traceback *text* (Ray 2.60 re-raises a UDF's exception as a
``UserCodeException`` whose cause is not transported). One mechanism carries the typed error
across: code that runs in workers is wrapped with :func:`carry_user_errors`, which re-raises a
user error as :class:`RemoteUserError`, whose message holds the pickled original; on the driver
:func:`find_user_error` finds either the typed exception itself (Ray Train and plain tasks
transport it) or that payload in any message of the chain, and returns the original exception.
So a ``DataError`` raised in an evaluation actor reaches the CLI as that ``DataError``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import pickle
import re
from typing import Any


class PipelineError(Exception):
    """Base class of the pipeline's own user-facing errors."""


#: Classes treated as user errors: the pipeline's own and those registered by the project.
_USER_ERRORS: list[type[BaseException]] = [PipelineError]


class ConfigError(PipelineError, ValueError):
    """A bad configuration or command line: unknown key, missing binding, bad store, ...
    The CLI exits with status 2."""


class MissingFileError(PipelineError, FileNotFoundError):
    """An artifact lacks a file a stage reads (named with the files it has): re-run its producer."""


class StoreError(PipelineError, OSError):
    """The artifact store cannot be reached or used (credentials, permissions, network)."""


class TrainingError(PipelineError):
    """Base class of the errors ``pipeline.training`` raises for a fixable training problem."""


class CheckpointMismatchError(TrainingError, ValueError):
    """A checkpoint does not fit what the train loop registered (model weights, optimiser,
    scheduler, ...): the message names the checkpoint and what the loader reported."""


class TrainingDataError(TrainingError, ValueError):
    """The training feed cannot make a batch (e.g. fewer rows per worker than the batch size)."""


class NonFiniteLossError(TrainingError, RuntimeError):
    """The loss became NaN/inf: training stopped; names the step and the last good checkpoint.

    Attributes:
        step: the optimisation step whose loss was not finite (1-based).
        loss: that loss (mean over workers).
        last_checkpoint: URI of the newest checkpoint written before it, or None.
    """

    def __init__(self, step: int, loss: float, last_checkpoint: str | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
        super().__init__(
            f"non-finite loss ({loss}) at step {step}; training stopped ({where}). Lower the learning "
            "rate or check the inputs; re-running unchanged resumes from that checkpoint."
        )

    def __reduce__(self):
        return (self.__class__, (self.step, self.loss, self.last_checkpoint))


def register_user_errors(*classes: type[BaseException]) -> None:
    """Treat instances of ``classes`` (and subclasses) as user errors (in this process, and in
    the workers that run functions wrapped afterwards with :func:`carry_user_errors`)."""
    for cls in classes:
        if cls not in _USER_ERRORS:
            _USER_ERRORS.append(cls)


def is_user_error(e: BaseException, classes: tuple[type[BaseException], ...] | None = None) -> bool:
    """True for a :class:`PipelineError` or an instance of a registered class (or of ``classes``)."""
    return isinstance(e, classes or tuple(_USER_ERRORS))


_PAYLOAD = re.compile(r"\[user-error-payload:([A-Za-z0-9+/=]+):([0-9a-f]{64})\]")
#: This process's key for signing carried errors: a wrapper made here signs with it in the worker,
#: and only payloads it signed are unpickled here (text from data can never reach ``pickle``).
_KEY = os.urandom(32)


def carrier_key() -> bytes:
    """The key to hand to code that carries user errors to this process (:meth:`RemoteUserError.wrap`)."""
    return _KEY


class RemoteUserError(Exception):
    """A user error raised in a Ray worker, carried to the driver in its message (see the module
    docstring). Never shown to a user: :func:`find_user_error` turns it back into the original."""

    def __init__(self, message: str) -> None:
        super().__init__(message)

    @classmethod
    def wrap(cls, e: BaseException, key: bytes) -> RemoteUserError:
        """The carrier of ``e``: its class and message for a human, its pickle (signed with the
        driver's ``key``, :func:`carrier_key`) for the driver."""
        try:
            raw = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - an unpicklable error still travels as text
            raw = pickle.dumps(PipelineError(f"{type(e).__name__}: {e}"))
        sig = hmac.new(key, raw, hashlib.sha256).hexdigest()
        return cls(f"{type(e).__name__}: {e} [user-error-payload:{base64.b64encode(raw).decode()}:{sig}]")


def carry_user_errors(target: Any) -> Any:
    """Wrap a function, or a callable class's ``__call__``, that runs in Ray workers so that a
    user error it raises reaches the driver as itself (via :class:`RemoteUserError`).

    Returns:
        the wrapped function, or a subclass of the class with a wrapped ``__call__`` (its
        ``__init__`` is wrapped too: a bad model file found while an actor starts is a user error).
    """
    classes = tuple(_USER_ERRORS)  # travels with the wrapper: workers need not register anything
    key = _KEY  # and so does the driver's signing key
    if isinstance(target, type):
        cls = target

        class Carrying(cls):  # type: ignore[valid-type, misc]
            __init__ = _carry(cls.__init__, classes, key)
            __call__ = _carry(cls.__call__, classes, key)

        Carrying.__name__ = Carrying.__qualname__ = cls.__name__
        Carrying.__module__ = cls.__module__
        return Carrying
    return _carry(target, classes, key)


def _carry(fn: Any, classes: tuple[type[BaseException], ...], key: bytes) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as e:
            if is_user_error(e, classes):
                raise RemoteUserError.wrap(e, key) from None
            raise

    return wrapper


def find_user_error(e: BaseException) -> BaseException | None:
    """The first user error inside ``e``: ``e`` itself, one that Ray wrapped, or one carried by a
    :class:`RemoteUserError` (whose payload appears in the message of Ray's wrapper).

    Follows ``__cause__`` / ``__context__``, Ray's ``cause`` (``RayTaskError``), and Ray Train's
    ``worker_failures`` / ``error`` of a failed run. Returns None when there is none (a bug,
    reported with its traceback).
    """
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        x = stack.pop(0)
        if x is None or id(x) in seen or not isinstance(x, BaseException):
            continue
        seen.add(id(x))
        if is_user_error(x):
            return _unwrapped(x)
        for m in _PAYLOAD.finditer(str(x)):
            raw = base64.b64decode(m.group(1))
            if not hmac.compare_digest(hmac.new(_KEY, raw, hashlib.sha256).hexdigest(), m.group(2)):
                continue  # not signed by this process: never unpickled
            try:
                return pickle.loads(raw)
            except Exception:  # noqa: BLE001 - a class that no longer imports: keep looking
                pass
        for attr in ("cause", "_base_exc", "error"):
            stack.append(getattr(x, attr, None))
        stack += [x.__cause__, x.__context__]
        failures = getattr(x, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(failures.values())
    return None


def _unwrapped(x: BaseException) -> BaseException:
    """``x`` itself, or, for Ray's dual-class ``RayTaskError(<Cls>)`` rebuild, the plain
    exception it stands for (same class and message, without Ray's traceback text)."""
    cause = getattr(x, "cause", None)
    if isinstance(cause, BaseException) and is_user_error(cause):
        return cause
    return x


__all__ = [
    "CheckpointMismatchError",
    "ConfigError",
    "NonFiniteLossError",
    "PipelineError",
    "RemoteUserError",
    "StoreError",
    "TrainingDataError",
    "TrainingError",
    "carry_user_errors",
    "find_user_error",
    "is_user_error",
    "register_user_errors",
]
