"""Stage registry, topological order and stage selection.

A *stage* is a resumable unit of the pipeline. It declares

* ``name``: the stage name used in configs, the CLI and the artifact store;
* ``version``: bumped when the stage's code changes what it writes (part of the key);
* ``needs``: the names of the upstream stages whose artifacts it reads;
* ``Config``: a pydantic model of its config section (unknown keys are errors);
* ``run(ctx)``: reads ``ctx.inputs[name]`` and writes files into ``ctx.output_dir``;
  returns a flat ``{metric: float}`` dict.

A stage never reads another stage's config and never writes outside its output
directory. This module knows nothing about segmentation.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class StageConfig(BaseModel):
    """Base class of every stage's config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=False)


@dataclasses.dataclass
class Artifact:
    """A finished, verified stage output.

    Attributes:
        stage: producing stage name.
        key: the artifact key (64 hex chars, sha256).
        path: a local directory holding the artifact's files (for a remote store, a
            verified local cache copy).
        uri: where the artifact lives in the store (local path or ``s3://``/``gs://`` URI).
        manifest: the parsed ``manifest.json``.
    """

    stage: str
    key: str
    path: Path
    uri: str
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        """Path of one file of the artifact.

        Raises:
            FileNotFoundError: naming the artifact and the files it does have.
        """
        p = self.path / name
        if not p.exists():
            have = sorted(f["path"] for f in self.manifest.get("files", []))
            raise FileNotFoundError(
                f"artifact {self.stage}/{self.key[:12]} has no file {name!r}; it has: {have[:20]}"
            )
        return p


@dataclasses.dataclass
class StageContext:
    """Everything a stage's ``run`` may touch.

    Attributes:
        stage: the stage name.
        key: this run's artifact key.
        config: the stage's validated config (an instance of ``Stage.Config``).
        inputs: upstream artifacts by stage name.
        output_dir: local directory to write the artifact's files into (empty at start).
        work_dir: the invocation's work directory (scratch space, caches).
        train_storage: ``RunConfig.storage_path`` for Ray Train, derived from the store.
        train_name: ``RunConfig.name`` for Ray Train, derived from the artifact key so that
            an interrupted stage resumes from its last checkpoint.
        mlflow_run_id: the stage's nested MLflow run (active while ``run`` executes).
        tracking_uri: the MLflow tracking URI.
        log: print-like progress callable.
        artifact_uri: where the artifact is published once ``run`` returns
            (``<store>/<stage>/<key>``, a local path or a store URI); stages that write URIs of
            their own files into their outputs (build_splits' label URIs) use it. ``None`` for a
            hand-built context whose output_dir is the final location.
        extra: free-form values for stage-specific plumbing.
    """

    stage: str
    key: str
    config: Any
    inputs: dict[str, Artifact]
    output_dir: Path
    work_dir: Path
    train_storage: str
    train_name: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    log: Callable[[str], None] = print
    artifact_uri: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class Stage:
    """Base class of a pipeline stage (see module docstring)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    needs: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[StageConfig]] = StageConfig

    def fingerprint(self, config: StageConfig) -> str | None:
        """Extra content that enters the key (e.g. the dataset fingerprint). Default none."""
        return None

    def run(self, ctx: StageContext) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Stage]] = {}


def register(cls: type[Stage]) -> type[Stage]:
    """Class decorator adding a stage to the registry."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registry() -> dict[str, type[Stage]]:
    """All registered stages by name (imports the ``stages`` package on first use)."""
    import stages  # noqa: F401  (registers on import)

    return dict(_REGISTRY)


def topological_order(names: Iterable[str] | None = None) -> list[str]:
    """Stage names in dependency order (Kahn's algorithm, ties by registration order).

    Raises:
        ValueError: on an unknown stage name or a dependency cycle.
    """
    reg = registry()
    wanted = list(reg) if names is None else list(names)
    for n in wanted:
        _check_name(n, reg)
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, path: tuple[str, ...]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise ValueError(f"dependency cycle: {' -> '.join(path + (n,))}")
        state[n] = 1
        for dep in reg[n].needs:
            _check_name(dep, reg)
            visit(dep, path + (n,))
        state[n] = 2
        order.append(n)

    for n in wanted:
        visit(n, ())
    return order


def descendants(name: str) -> set[str]:
    """Stages that (transitively) need ``name``, excluding it."""
    reg = registry()
    out: set[str] = set()
    frontier = {name}
    while frontier:
        nxt = {s for s, c in reg.items() if set(c.needs) & frontier} - out
        out |= nxt
        frontier = nxt
    return out


def select(
    enabled: Iterable[str],
    stages: Iterable[str] | None = None,
    from_stage: str | None = None,
) -> list[str]:
    """The stages an invocation considers, in order.

    Args:
        enabled: stages present in the config (the DAG of this run).
        stages: ``--stages``: only these (their upstream must already be cached).
        from_stage: ``--from``: this stage and everything downstream of it.

    Raises:
        ValueError: naming an unknown stage, with the nearest valid name.
    """
    reg = registry()
    enabled = topological_order(enabled)
    chosen = set(enabled)
    if stages:
        for s in stages:
            _check_name(s, reg)
        chosen = set(stages)
    if from_stage:
        _check_name(from_stage, reg)
        chosen &= {from_stage} | descendants(from_stage)
    return [s for s in enabled if s in chosen]


def _check_name(n: str, reg: dict[str, Any]) -> None:
    if n not in reg:
        near = difflib.get_close_matches(n, list(reg), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown stage {n!r}{hint} (stages: {', '.join(reg)})")
