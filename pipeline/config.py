"""YAML config loading, dotted overrides, validation, and the hashed/runtime split of keys.

A config file may extend others (``extends: base.yaml`` or a list, mmseg's ``_base_``: merged
left to right, then the file over them; :func:`load_config`): ``configs/datasets/`` holds the
dataset bases, ``configs/methods/`` the method parts. :func:`validated_config` /
:func:`config_yaml` show the merged config with every section as its stage validates it
(``zeroseg run --print-config``). Validation messages are built by :mod:`pipeline.validation`.

A config file has a ``run`` section (where things go; never part of an artifact key), *shared*
sections that stages take (``clip``: the CLIP model spec, injected into every stage that takes
it and does not set its own), and one section per stage. A stage section is validated by the
stage's ``Config`` (pydantic; unknown keys are errors naming the nearest valid key). Keys named
like one of the stage's input roles bind that role to a stage (``evaluate.model: self_train``).

What enters an artifact key is the *hashed view* of a validated config (:func:`hashed_view`):
every field except those marked :class:`Runtime` (resources, retries, logging cadence,
checkpoints kept, concurrency, device, inference batch size, data paths whose content a stage
fingerprints instead). A nested model that knows better how it should count
(``key_payload()``, e.g. the CLIP spec: architecture + weights identity) counts that way.
Because the hashed view is the *validated* config, restating a default changes no key.

Strings may reference environment variables as ``${NAME}`` or ``${NAME:-default}``, so one
config serves a local run (defaults) and ``ray job submit`` (variables set through
``--runtime-env-json``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator
from pydantic_core import to_jsonable_python

from pipeline.errors import ConfigError
from pipeline.validation import explain, fields_at

RUN_SECTION = "run"
#: Environment variable naming the tracking server when a config sets no ``run.tracking_uri``.
TRACKING_URI_ENV = "ZEROSEG_TRACKING_URI"
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


# =============================================================================================
# the hashed / runtime split
# =============================================================================================
@dataclasses.dataclass(frozen=True)
class Runtime:
    """Field marker (``Annotated[T, Runtime()]``): the field does not determine the stage's
    outputs (resources, retries, logging, concurrency, device, a batch size of inference, a data
    path whose content the stage fingerprints), so it stays out of the artifact key.

    Args:
        when: for a field that is runtime for some values only: a predicate on the value (e.g. a
            class list given as a file path is runtime, since the file is fingerprinted by
            content; given inline as names it is hashed).
        why: a few words for the docs and the plan (``"resources"``, ``"data path"``, ...).
    """

    when: Callable[[Any], bool] | None = None
    why: str = ""

    def applies(self, value: Any) -> bool:
        return self.when is None or bool(self.when(value))


def _runtime_marker(field: Any) -> Runtime | None:
    """The :class:`Runtime` marker of a field: in its metadata (``Annotated[T, Runtime()]``) or
    on a member of its union (``Annotated[str, Runtime()] | None``)."""
    for m in getattr(field, "metadata", ()):
        if isinstance(m, Runtime):
            return m
    for arg in typing.get_args(getattr(field, "annotation", None)):
        for m in getattr(arg, "__metadata__", ()):
            if isinstance(m, Runtime):
                return m
    return None


def is_runtime(field: Any, value: Any) -> bool:
    """Whether a pydantic ``FieldInfo`` holding ``value`` is runtime (see :class:`Runtime`)."""
    m = _runtime_marker(field)
    return m is not None and m.applies(value)


def hashed_view(obj: Any) -> Any:
    """The JSON-able part of a validated config that determines outputs (enters keys).

    BaseModels: ``key_payload()`` when they define it, else their fields minus :class:`Runtime`
    ones, recursively; containers map over their items; leaves as pydantic serialises them.
    """
    if isinstance(obj, BaseModel):
        payload = getattr(obj, "key_payload", None)
        if callable(payload):
            return payload()
        return {
            name: hashed_view(getattr(obj, name))
            for name, field in type(obj).model_fields.items()
            if not is_runtime(field, getattr(obj, name))
        }
    if isinstance(obj, dict):
        return {str(k): hashed_view(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [hashed_view(v) for v in obj]
    return to_jsonable_python(obj)


def runtime_view(obj: Any) -> dict[str, Any]:
    """The runtime fields of a validated config as ``{dotted.key: value}`` (for the plan and the
    MLflow params; never for keys)."""
    out: dict[str, Any] = {}

    def walk(o: Any, prefix: str) -> None:
        if isinstance(o, (list, tuple)):
            for i, x in enumerate(o):
                walk(x, f"{prefix}{i}.")
            return
        if not isinstance(o, BaseModel):
            return
        for name, field in type(o).model_fields.items():
            v = getattr(o, name)
            if is_runtime(field, v):
                out[prefix + name] = to_jsonable_python(v)
            else:
                walk(v, f"{prefix}{name}.")

    walk(obj, "")
    return out


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, non-JSON values via ``str``."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    """sha256 hex of :func:`canonical_json` of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as JSON strings)."""
    out: dict[str, Any] = {}
    if isinstance(d, BaseModel):
        d = d.model_dump(mode="json")
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = json.dumps(d) if isinstance(d, list) else d
    return out


# =============================================================================================
# the run section
# =============================================================================================
class RaySection(BaseModel):
    """How to reach Ray. ``address: null`` starts an embedded local cluster unless
    ``RAY_ADDRESS`` is set (as it is under ``ray job submit``)."""

    model_config = ConfigDict(extra="forbid")
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    include_dashboard: bool = False


class RunSection(BaseModel):
    """Where an invocation puts things. Not hashed into any artifact key."""

    model_config = ConfigDict(extra="forbid")
    name: str = "zeroseg"
    work_dir: str = "work"
    store: str | None = Field(None, description="artifact store: local path or s3:// / gs:// URI")
    tracking_uri: str | None = Field(None, description="MLflow URI; default sqlite in work_dir")
    tracking_server: bool = Field(
        False,
        description="log through a real `mlflow server` that the invocation starts on 127.0.0.1 (a free port) "
        "over the sqlite store in work_dir, and stops at its end (pipeline.tracking.local_server)",
    )
    experiment: str | None = None
    verify: str = Field("sha256", pattern="^(sha256|size)$")
    ray: RaySection = RaySection()

    @model_validator(mode="after")
    def _one_tracking_store(self) -> RunSection:
        if self.tracking_server and self.tracking_uri:
            raise ValueError(
                f"tracking_server starts a local server over sqlite in work_dir, but tracking_uri names "
                f"{self.tracking_uri!r}: set one of run.tracking_server and run.tracking_uri"
            )
        return self

    def store_uri(self) -> str:
        """The artifact store: ``store``, else ``<work_dir>/store``."""
        return self.store or str(Path(self.work_dir, "store"))

    def mlflow_uri(self) -> str:
        """The tracking URI: ``tracking_uri``, else ``ZEROSEG_TRACKING_URI`` (a cluster's tracking
        server, set for every job; docs/cluster.md), else ``sqlite:///<work_dir>/mlflow.db``
        (absolute). Not MLflow's own ``MLFLOW_TRACKING_URI``: ``mlflow.set_tracking_uri`` sets
        it in the process and every child inherits it, so an earlier run's store would leak into
        the next invocation."""
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get(TRACKING_URI_ENV):
            return os.environ[TRACKING_URI_ENV]
        return "sqlite:///" + str(Path(self.work_dir, "mlflow.db").resolve())

    def local_tracking_server(self) -> bool:
        """Whether the invocation serves :meth:`mlflow_uri` (then the sqlite store) through a
        local ``mlflow server``: ``tracking_server`` unless ``ZEROSEG_TRACKING_URI`` names a
        (cluster's) tracking server, which every node reaches and a local one on 127.0.0.1 not."""
        return self.tracking_server and not os.environ.get(TRACKING_URI_ENV)


# =============================================================================================
# loading
# =============================================================================================
@dataclasses.dataclass
class LoadedConfig:
    """A parsed config: the run section plus the raw (not yet validated) other sections.

    Attributes:
        path: the YAML file.
        raw: the full dict after ``extends``, overrides and env interpolation.
        run: the validated ``run`` section.
        sections: every other top-level section name -> its raw mapping (stages and shared).
    """

    path: Path
    raw: dict[str, Any]
    run: RunSection
    sections: dict[str, dict[str, Any]]


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> LoadedConfig:
    """Read a YAML config, apply ``extends`` (a base file or a list of them, merged left to right,
    then the file over them: :func:`_resolve_extends`), ``a.b=c`` overrides and ``${ENV:-default}``.

    Raises:
        ConfigError: the file is missing, not YAML or not a mapping, an override is malformed,
            a section is not a mapping, or the ``run`` section is invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (configs live in configs/*.yaml)")
    raw = read_yaml(p)
    raw = _resolve_extends(p, raw, seen=(p.resolve(),))
    return config_from_raw(p, raw, overrides)


def config_from_raw(path: str | os.PathLike, raw: dict[str, Any], overrides: list[str] | None = None) -> LoadedConfig:
    """A :class:`LoadedConfig` from an already read mapping (``extends`` resolved): applies the
    ``a.b=c`` overrides and ``${ENV:-default}``, validates ``run`` (a sweep trial rebuilds its
    config this way, on whichever node it runs). ``raw`` is modified in place.

    Raises:
        ConfigError: as :func:`load_config`.
    """
    p = Path(path)
    for ov in overrides or []:
        apply_override(raw, ov)
    raw = _interpolate(raw)
    try:
        run = RunSection.model_validate(raw.get(RUN_SECTION) or {})
    except ValidationError as e:
        raise ConfigError(explain(e, RunSection, RUN_SECTION, p)) from None
    sections = {}
    for k, v in raw.items():
        if k == RUN_SECTION:
            continue
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{p}: section {k!r} must be a mapping of keys, got {type(v).__name__} {v!r}")
        sections[k] = dict(v or {})
    return LoadedConfig(p, raw, run, sections)


def read_yaml(p: Path, what: str = "of sections") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (``{}`` if empty).

    Raises:
        ConfigError: not valid YAML, or not a mapping (the message says ``a mapping <what>``).
    """
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping {what}, got {type(raw).__name__}")
    return raw


def _resolve_extends(path: Path, raw: dict[str, Any], seen: tuple[Path, ...]) -> dict[str, Any]:
    """``extends: base.yaml`` or ``extends: [a.yaml, b.yaml, ...]`` (mmseg's ``_base_``; paths
    relative to this file): the bases, each with its own ``extends`` resolved, deep-merged left to
    right, then this file over them.

    Mappings merge key by key; any other value (lists included) replaces the base's. A base
    reached twice through different bases (a diamond) is fine; a file that extends itself,
    directly or through its bases, is a cycle.

    Raises:
        ConfigError: ``extends`` is not a file name or a list of them, a base does not exist or is
            not a YAML mapping, or a cycle (each message names the extending file).
    """
    names = raw.pop("extends", None)
    if names is None:
        return raw
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{path}: 'extends' must be a file name or a list of file names, got {names!r}")
    merged: dict[str, Any] = {}
    for name in names:
        base_path = (path.parent / name).resolve()
        if base_path in seen:
            chain = " -> ".join(str(p) for p in (*seen[seen.index(base_path) :], base_path))
            raise ConfigError(f"{path}: 'extends' cycle: {chain}")
        if not base_path.is_file():
            raise ConfigError(f"{path}: extends {name!r}, but {base_path} does not exist")
        base = _resolve_extends(base_path, read_yaml(base_path), seen + (base_path,))
        merged = _deep_merge(merged, base)
    return _deep_merge(merged, raw)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``--set a.b.c=value`` in place; ``value`` is parsed as a YAML scalar/flow.

    Raises:
        ConfigError: without ``=``, or when a path component is not a mapping.
    """
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE, e.g. --set evaluate.gamma=0.1")
    key, _, value = override.partition("=")
    parts = [k for k in key.strip().split(".") if k]
    if not parts:
        raise ConfigError(f"--set {override!r}: empty key")
    node: Any = raw
    for i, k in enumerate(parts[:-1]):
        here = ".".join(parts[: i + 1])
        if isinstance(node, list):
            node = node[_index(k, node, override, here)]
            continue
        nxt = node.setdefault(k, {})
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"--set {override!r}: {here} is a {type(nxt).__name__}, not a section")
        node = nxt
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({e})") from None
    if isinstance(node, list):
        node[_index(parts[-1], node, override, key)] = parsed
    else:
        node[parts[-1]] = parsed


def _index(k: str, node: list, override: str, here: str) -> int:
    if not k.lstrip("-").isdigit() or not -len(node) <= int(k) < len(node):
        raise ConfigError(f"--set {override!r}: {here} indexes a list of {len(node)} items; use 0..{len(node) - 1}")
    return int(k)


def _interpolate(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _interpolate(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate(v) for v in obj]
    if isinstance(obj, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            val = os.environ.get(name)
            if val is None:
                if default is None:
                    raise ConfigError(
                        f"config references ${{{name}}} but it is not set; set it or write ${{{name}:-default}}"
                    )
                return default
            return val

        return _ENV_RE.sub(sub, obj)
    return obj


def stage_section(
    config: LoadedConfig, name: str, roles: Iterable[str], shared: Iterable[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage ``name``'s section of ``config`` ready to validate, and its bindings.

    Returns:
        ``(section, given)``: a copy of the section without the keys named like one of the
        stage's input ``roles`` (``given``: ``{role: upstream stage}``, e.g. ``evaluate.model:
        self_train``), with each ``shared`` section the config has and the section does not set
        itself injected (``clip``).
    """
    section = copy.deepcopy(config.sections[name])
    given = {r: section.pop(r) for r in list(section) if r in set(roles)}
    for s in shared:
        if s in config.sections and s not in section:
            section[s] = copy.deepcopy(config.sections[s])
    return section, given


def validated_config(config: LoadedConfig, stages: Sequence[type]) -> dict[str, Any]:
    """The merged config (``extends``, overrides, ``${ENV}`` applied) with every section as its
    stage validates it, defaults filled in (JSON values): ``run``, then the shared sections (as the
    first stage that takes one validates it), then the stage sections in ``stages``' order. A
    stage section lists its bindings first (then a ``method`` tag) and leaves out the shared
    sections it takes from the top level. Plans nothing. (Not always loadable as a config again:
    a section that refuses keys not applying to a choice, e.g. a dataset's ``annotations`` for
    format ``mask_folder``, refuses them at their defaults too.)

    Args:
        config: a loaded config.
        stages: the stage classes (``pipeline.catalogue.load_catalogue().stages``).

    Raises:
        ConfigError: an unknown section (the nearest named), or an invalid section (as
            :func:`validate_section`).
    """
    by_name = {cls.name: cls for cls in stages}
    shared_names = list(dict.fromkeys(s for cls in stages for s in cls.shared))
    for name in config.sections:
        if name not in by_name and name not in shared_names:
            near = difflib.get_close_matches(name, [*by_name, *shared_names, RUN_SECTION], n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{config.path}: unknown section {name!r}{hint} (stages: {', '.join(by_name)})")
    body: dict[str, Any] = {}
    injected: dict[str, list[str]] = {}  # shared section -> the stages it was injected into
    for name, cls in by_name.items():
        if name not in config.sections:
            continue
        stage = cls()
        section, given = stage_section(config, name, stage.all_roles(), stage.shared)
        cfg = validate_section(name, stage.Config, section, config.path)
        dumped = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else to_jsonable_python(cfg)
        body[name] = {**given, **({"method": dumped.pop("method")} if "method" in dumped else {}), **dumped}
        for s in stage.shared:
            if s in config.sections and s not in config.sections[name]:
                injected.setdefault(s, []).append(name)
    shared: dict[str, Any] = {}
    for s in shared_names:
        if s not in config.sections:
            continue
        values = [body[n][s] for n in injected.get(s, []) if body[n].get(s) is not None]
        shared[s] = values[0] if values else config.sections[s]
        for n in injected.get(s, []):  # shown once, at the top, where a stage validated it so
            if body[n].get(s) == shared[s]:
                del body[n][s]
    return {RUN_SECTION: config.run.model_dump(mode="json"), **shared, **body}


def config_yaml(config: LoadedConfig, stages: Sequence[type]) -> str:
    """:func:`validated_config` as YAML (``zeroseg run --print-config``), headed by a comment
    naming the file.

    Raises:
        ConfigError: as :func:`validated_config`.
    """
    doc = validated_config(config, stages)
    head = f"# {config.path}: merged (extends, --set, ${{ENV}}) and validated, defaults filled in\n"
    return head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=110)


# =============================================================================================
# validation
# =============================================================================================
def validate_section(name: str, schema: Any, data: dict[str, Any], path: Path | str) -> Any:
    """Validate one section against ``schema`` (a pydantic model or any type, e.g. a
    discriminated union of models).

    Raises:
        ConfigError: naming each offending key (``section.a.b``); an unknown key with the
            nearest valid one; an unknown union tag (e.g. a method) with the nearest valid tag.
    """
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as e:
        raise ConfigError(explain(e, schema, name, path)) from None
    except ConfigError as e:  # raised by a nested model's own constructor
        raise ConfigError(f"{path}: invalid config in section {name!r}: {e}") from None


__all__ = [
    "LoadedConfig",
    "RaySection",
    "RunSection",
    "Runtime",
    "apply_override",
    "config_from_raw",
    "canonical_json",
    "config_yaml",
    "digest",
    "explain",
    "fields_at",
    "flatten",
    "hashed_view",
    "is_runtime",
    "load_config",
    "runtime_view",
    "stage_section",
    "validate_section",
    "validated_config",
]
