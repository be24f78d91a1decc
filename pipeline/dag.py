"""The stage contract, and the graph of stages a config describes.

A *stage* is a resumable unit whose output is an artifact addressed by a key. It declares

* ``name``: the section name in configs, the CLI and the artifact store;
* ``Config``: the schema of its section (a pydantic model, or a discriminated union of models
  such as train_classifier's methods); fields marked ``Runtime`` stay out of the key;
* ``inputs(config)``: its input *roles*, each bound to one upstream stage (:class:`Input`: named
  stages, or any stage that ``produces`` the role's ``kind``);
* ``shared``: the shared top-level sections it takes (``("clip",)``: injected into its section
  unless the section sets its own);
* ``code(config)``: the modules whose source (and what they import within the project) enters
  the key; default: the stage's own module;
* ``fingerprint(config)``: content the config does not show (a dataset's files, a checkpoint's
  bytes), or None;
* ``check(config)``: checks that need no cluster (missing files, unknown class names), run at plan
  time for the stages that will run, before Ray starts;
* ``facts(config)`` / ``check_inputs(config, facts)``: what a node tells the stages bound to it at
  plan time (build_splits: whether its split is transductive), and a stage's checks of its bound
  inputs' facts (self_train refuses an inductive split), run for every node at plan time;
* ``run(ctx)``: reads ``ctx.inputs[role]`` and writes files into ``ctx.output_dir``; returns a
  flat ``{metric: number}`` dict.

It may also say what the runner prints for it: ``notices(config)`` (said once, e.g. random CLIP
weights), ``summary(metrics)`` (tables after the run); and what its downstream gets at run time
besides the artifact: ``runtime_outputs(config)`` (e.g. where the dataset's images are mounted in
this invocation, which never enters a key).

A stage never reads another stage's config and never writes outside its output directory. The
graph comes from the config: a node per stage section, an edge per bound input role
(:func:`bind`). This module knows nothing about segmentation and imports no stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import graphlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from pipeline.errors import ConfigError, MissingFileError


class StageConfig(BaseModel):
    """Base class of a stage's config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclasses.dataclass(frozen=True)
class Input:
    """An input role of a stage.

    Attributes:
        stages: the stages that can fill the role (e.g. evaluate's ``model``: train_classifier,
            train_generator or self_train).
        required: a config without any of them is an error (else the role stays unbound).
        doc: what the role is, for messages.
        auto: an unset role takes its only candidate present in the config; False for a role
            that changes what a stage computes and so is bound only when the section names it
            (a warm start's ``init_from``).
        kind: any other stage of the catalogue whose :attr:`Stage.produces` is this kind can
            fill the role too (after ``stages``, in the catalogue's order; :func:`resolve_kinds`):
            a method that brings its own stage names no consumer.
    """

    stages: tuple[str, ...] = ()
    required: bool = True
    doc: str = ""
    auto: bool = True
    kind: str | None = None


@dataclasses.dataclass
class Artifact:
    """A finished, verified stage output.

    Attributes:
        stage: producing stage name.
        key: the artifact key (64 hex chars, sha256).
        path: a local directory holding the artifact's files (for a remote store, the local
            cache: files arrive there on first use, see :meth:`file`).
        uri: where the artifact lives in the store (local path or ``s3://``/``gs://`` URI).
        manifest: the parsed ``manifest.json``.
        runtime: what the producing stage's ``runtime_outputs`` says for this invocation (never
            part of the artifact; e.g. where a dataset's images are mounted here).
        fetch: for a remote store, downloads one file into ``path`` and verifies it.
    """

    stage: str
    key: str
    path: Path
    uri: str
    manifest: dict[str, Any]
    runtime: dict[str, Any] = dataclasses.field(default_factory=dict)
    fetch: Callable[[str], Path] | None = dataclasses.field(default=None, repr=False)

    def file(self, name: str) -> Path:
        """Local path of one file of the artifact (downloaded on first use from a remote store,
        and verified against the manifest).

        Raises:
            MissingFileError (a FileNotFoundError and a user error): naming the artifact and the
                files it does have.
            CorruptArtifact: a downloaded file differs from the manifest (remote stores).
            OSError: the store cannot be read.
        """
        p = self.path / name
        if not p.exists() and self.fetch is not None and any(f["path"] == name for f in self.manifest.get("files", [])):
            p = self.fetch(name)
        if not p.exists():
            have = sorted(f["path"] for f in self.manifest.get("files", []))
            raise MissingFileError(
                f"artifact {self.stage}/{self.key[:12]} has no file {name!r}; it has: {have[:20]} (re-run {self.stage} "
                "with --force)"
            )
        return p

    def file_uri(self, name: str) -> str:
        """Where one file lives in the store (a local path or a store URI, ``?query`` kept last)."""
        from pipeline.uri import join

        return join(self.uri, name)


class Progress:
    """A progress display a running stage updates (one per running stage).

    ``update(completed=None, advance=0, total=None, **fields)``; ``fields`` are shown after the
    bar (e.g. ``loss``). The runner's console implements it; the default does nothing.
    """

    def update(
        self, completed: float | None = None, advance: float = 0, total: float | None = None, **fields: Any
    ) -> None:
        return None


@dataclasses.dataclass
class StageContext:
    """Everything a stage's ``run`` may touch.

    Attributes:
        stage: the stage name.
        key: this run's artifact key.
        config: the stage's validated config.
        inputs: upstream artifacts by input role.
        output_dir: local directory to write the artifact's files into (empty at start).
        work_dir: the invocation's work directory (scratch space, caches).
        train_storage: ``RunConfig.storage_path`` for Ray Train, derived from the store.
        train_name: ``RunConfig.name`` for Ray Train, derived from the artifact key so that an
            interrupted stage resumes from its last checkpoint.
        tracking: ``{"tracking_uri": ..., "run_id": ...}`` of the stage's MLflow run (the run
            continues across invocations until the stage finishes), or None.
        log: one line of output for the user (plain text; markup is not interpreted).
        progress: ``progress(total, unit) -> Progress``: the stage's progress display.
    """

    stage: str
    key: str
    config: Any
    inputs: dict[str, Artifact]
    output_dir: Path
    work_dir: Path
    train_storage: str
    train_name: str
    tracking: dict[str, str] | None = None
    log: Callable[[str], None] = print
    progress: Callable[..., Progress] = lambda total=None, unit="items": Progress()

    @property
    def mlflow_run_id(self) -> str | None:
        return (self.tracking or {}).get("run_id")

    @property
    def tracking_uri(self) -> str | None:
        return (self.tracking or {}).get("tracking_uri")


class Stage:
    """Base class of a pipeline stage (see module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[Any] = StageConfig
    INPUTS: ClassVar[dict[str, Input]] = {}
    shared: ClassVar[tuple[str, ...]] = ()
    #: The kind of artifact it produces, for input roles that take a kind (:attr:`Input.kind`).
    produces: ClassVar[str | None] = None

    def inputs(self, config: Any) -> dict[str, Input]:
        """Input roles for this config (default: the class's ``INPUTS``)."""
        return dict(self.INPUTS)

    def all_roles(self) -> set[str]:
        """Every role any config of this stage can have (their names are reserved section keys)."""
        return set(self.INPUTS)

    def code(self, config: Any) -> list[str]:
        """Modules whose source determines the outputs (followed through their imports)."""
        return [type(self).__module__]

    def fingerprint(self, config: Any) -> str | None:
        """Content that enters the key besides the config (e.g. the dataset's files)."""
        return None

    def check(self, config: Any) -> None:
        """Plan-time checks for a stage that will run (raise a user error naming the problem)."""
        return None

    def runtime_outputs(self, config: Any) -> dict[str, Any]:
        """Values downstream stages read from this node in this invocation (not in the key)."""
        return {}

    def facts(self, config: Any) -> dict[str, Any]:
        """What the stages bound to this node may know about its artifact at plan time (a
        function of this config, so of the key): e.g. build_splits' ``{"transductive": bool}``."""
        return {}

    def check_inputs(self, config: Any, facts: Mapping[str, Mapping[str, Any]]) -> None:
        """Plan-time checks of the bound inputs (``{role: the bound node's facts}``), run for every
        node of a plan; raise a user error naming the key to change."""
        return None

    def notices(self, config: Any) -> list[str]:
        """Lines the plan prints once per invocation (deduplicated across stages)."""
        return []

    def terminal(self, config: Any) -> bool:
        """Whether this node's artifact is an end in itself (e.g. evaluation metrics), so that no
        other node of the plan reading it is fine. A non-terminal node nothing reads is wasted
        work: the plan prints a notice naming it (``pipeline.plan.unread_notices``)."""
        return False

    def summary(self, metrics: Mapping[str, Any]) -> list[Any]:
        """Renderables (rich tables or strings) printed after the run from this stage's metrics."""
        return []

    def note(self, metrics: Mapping[str, Any]) -> str:
        """A short note for the stage table (default: the first scalar metrics)."""
        items = [
            f"{k}={_note(v)}" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        return ", ".join(items[:6])

    def run(self, ctx: StageContext) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


def _note(v: Any) -> str:
    """A stage note value: counts print as integers (MLflow hands them back as floats)."""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4g}"
    return str(v)


# =============================================================================================
# the graph of one config
# =============================================================================================
def stage_index(stages: Sequence[type[Stage]]) -> dict[str, type[Stage]]:
    """``{name: stage class}``.

    Raises:
        ValueError: two stages share a name.
    """
    out: dict[str, type[Stage]] = {}
    for s in stages:
        if s.name in out:
            raise ValueError(f"stage {s.name!r} is listed twice")
        out[s.name] = s
    return out


def nearest(name: str, choices: Sequence[str]) -> str:
    """``"; did you mean 'x'?"`` or ``""``."""
    near = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def resolve_kinds(roles: Mapping[str, Input], stages: Sequence[type[Stage]]) -> dict[str, Input]:
    """``roles`` with each role's :attr:`Input.kind` resolved: its ``stages`` followed by every
    other stage of ``stages`` (the catalogue, in its order) that produces that kind."""
    out: dict[str, Input] = {}
    for role, spec in roles.items():
        if spec.kind is not None:
            more = tuple(s.name for s in stages if s.produces == spec.kind and s.name not in spec.stages)
            spec = dataclasses.replace(spec, stages=(*spec.stages, *more))
        out[role] = spec
    return out


def bind(name: str, roles: Mapping[str, Input], section: Mapping[str, Any], present: Sequence[str]) -> dict[str, str]:
    """Bind each input role of stage ``name`` to a stage of this config.

    A role is bound by the section key of the same name (``evaluate.model: self_train``); an
    unset role takes its only candidate present in the config (unless the role says
    ``auto=False``: then it stays unbound).

    Returns:
        ``{role: stage name}`` for every bound role.

    Raises:
        ConfigError: a binding to a stage that cannot fill the role or has no section; a required
            role with no candidate present, or several (naming the key to set).
    """
    out: dict[str, str] = {}
    for role, spec in roles.items():
        given = section.get(role)
        if given is not None:
            if not isinstance(given, str) or given not in spec.stages:
                raise ConfigError(
                    f"{name}.{role}: {given!r} cannot be bound to input {role!r}; use one of: "
                    f"{', '.join(spec.stages)}{nearest(str(given), spec.stages)}"
                )
            if given not in present:
                raise ConfigError(f"{name}.{role} is {given!r}, but the config has no {given!r} section")
            out[role] = given
            continue
        if not spec.auto:
            if spec.required:
                raise ConfigError(f"{name}.{role} is not set; name the stage ({', '.join(spec.stages)})")
            continue
        have = [s for s in spec.stages if s in present]
        if len(have) == 1:
            out[role] = have[0]
        elif len(have) > 1:
            raise ConfigError(
                f"{name} can read its {role!r} input ({spec.doc or role}) from {', '.join(have)}; "
                f"say which with {name}.{role}: <stage>"
            )
        elif spec.required:
            raise ConfigError(
                f"{name} needs its {role!r} input ({spec.doc or role}) from one of "
                f"{', '.join(spec.stages)}, but the config has none of these sections; add one"
                + (f" and set {name}.{role}" if len(spec.stages) > 1 else "")
            )
    return out


def order(edges: Mapping[str, Sequence[str]], rank: Mapping[str, int]) -> list[str]:
    """Topological order of ``{node: upstream nodes}`` (``graphlib``), ties broken by ``rank``
    (the order the stages are listed in).

    Raises:
        ConfigError: a dependency cycle (naming it).
    """
    ts = graphlib.TopologicalSorter({n: set(ups) for n, ups in edges.items()})
    try:
        ts.prepare()
    except graphlib.CycleError as e:
        raise ConfigError(f"the stage bindings form a cycle: {' -> '.join(e.args[1])}") from None
    out: list[str] = []
    while ts.is_active():
        ready = sorted(ts.get_ready(), key=lambda n: rank.get(n, 1 << 30))
        for n in ready:
            out.append(n)
            ts.done(n)
    return out


def descendants(edges: Mapping[str, Sequence[str]], name: str) -> set[str]:
    """Nodes that (transitively) read ``name``, excluding it."""
    out: set[str] = set()
    frontier = {name}
    while frontier:
        nxt = {n for n, ups in edges.items() if set(ups) & frontier} - out
        out |= nxt
        frontier = nxt
    return out


__all__ = [
    "Artifact",
    "Input",
    "Progress",
    "Stage",
    "StageConfig",
    "StageContext",
    "bind",
    "descendants",
    "nearest",
    "order",
    "resolve_kinds",
    "stage_index",
]
