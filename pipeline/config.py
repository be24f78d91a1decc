"""YAML config loading, dotted overrides, validation and canonical hashing.

A config file has a ``run`` section (where things go; never part of an artifact key), an
optional ``clip`` section (the CLIP model spec, injected into every stage section whose config
model has a ``clip`` field and does not set one itself) and one section per stage. Each stage
section is validated by that stage's pydantic ``Config``; unknown keys are errors that name the
nearest valid key.

Strings may reference environment variables as ``${NAME}`` or ``${NAME:-default}``, so one
config serves a local run (defaults) and ``ray job submit`` (variables set through
``--runtime-env-json``).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zeroseg.errors import ConfigError

RESERVED_SECTIONS = ("run", "clip")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
    experiment: str | None = None
    verify: str = Field("sha256", pattern="^(sha256|size)$")
    ray: RaySection = RaySection()

    def store_uri(self) -> str:
        return self.store or str(Path(self.work_dir, "store"))

    def mlflow_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        return "sqlite:///" + str(Path(self.work_dir, "mlflow.db").resolve())


class LoadedConfig:
    """A parsed config: the run section plus the raw (not yet validated) stage sections.

    Attributes:
        path: the YAML file.
        run: the validated ``run`` section.
        raw: the full dict after overrides and env interpolation.
        sections: stage name -> raw dict (with ``clip`` injected where applicable later).
    """

    def __init__(self, path: Path, raw: dict[str, Any]):
        self.path = path
        self.raw = raw
        try:
            self.run = RunSection.model_validate(raw.get("run") or {})
        except ValidationError as e:
            raise ConfigError(_explain(e, RunSection, "run", path)) from None
        self.clip = raw.get("clip")
        self.sections = {k: (v or {}) for k, v in raw.items() if k not in RESERVED_SECTIONS}


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> LoadedConfig:
    """Read a YAML config, apply ``a.b=c`` overrides and ``${ENV:-default}`` interpolation.

    Raises:
        ConfigError: the file is missing or not a mapping, an override is malformed, or
            a stage section names an unknown stage (with the nearest stage name).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (configs live in configs/*.yaml)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(raw).__name__}")
    raw = _resolve_extends(p, raw, seen=(p.resolve(),))
    for ov in overrides or []:
        apply_override(raw, ov)
    raw = _interpolate(raw)
    return LoadedConfig(p, raw)


def _resolve_extends(path: Path, raw: dict[str, Any], seen: tuple[Path, ...]) -> dict[str, Any]:
    """``extends: other.yaml`` (relative to this file): deep-merge this file over that one.

    Mappings merge key by key; any other value (lists included) replaces the base's.
    """
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    base_path = (path.parent / str(base_name)).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: 'extends' cycle through {base_path}")
    if not base_path.is_file():
        raise ConfigError(f"{path}: extends {base_name!r}, but {base_path} does not exist")
    base = yaml.safe_load(base_path.read_text()) or {}
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: top level must be a mapping of sections")
    return _deep_merge(_resolve_extends(base_path, base, seen + (base_path,)), raw)


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
    parsed = yaml.safe_load(value) if value != "" else None
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


def validate_section(stage: str, model: type[BaseModel], section: dict[str, Any], clip: Any, path: Path):
    """Validate one stage section, injecting the top-level ``clip`` spec if the model has one.

    Returns:
        an instance of ``model``.

    Raises:
        ConfigError: naming the offending key (``stage.a.b``) and, for an unknown key,
            the nearest valid one.
    """
    data = dict(section)
    if "clip" in model.model_fields and "clip" not in data and clip is not None:
        data["clip"] = clip
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, model, stage, path)) from None


def _explain(err: ValidationError, model: type[BaseModel], section: str, path: Path) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (section, *e["loc"]))
        if e["type"] == "extra_forbidden":
            valid = _fields_at(model, e["loc"][:-1])
            near = difflib.get_close_matches(str(e["loc"][-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {section + '.' + '.'.join(map(str, e['loc'][:-1] + (near[0],))) if near else ''}?" if near else ""
            lines.append(f"unknown key {loc!r}{hint} (valid keys here: {', '.join(valid)})")
        else:
            lines.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return f"{path}: invalid config:\n  " + "\n  ".join(lines)


def _fields_at(model: Any, loc: tuple) -> list[str]:
    """Field names of the (nested) pydantic model reached by ``loc``; [] if unknown."""
    import typing

    cur = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return []
        ann = cur.model_fields[part].annotation
        cur = _first_model(ann, typing)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _first_model(ann: Any, typing: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in typing.get_args(ann):
        m = _first_model(a, typing)
        if m is not None:
            return m
    return None


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, non-JSON values via ``str``."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def artifact_key(
    stage: str,
    version: str,
    config: Any,
    input_keys: dict[str, str],
    fingerprint: str | None = None,
) -> str:
    """The content address of a stage's output (DESIGN.md, "Artifact keys").

    ``sha256(stage, version, canonical JSON of the resolved config, the input keys by stage,
    fingerprint)``, as 64 hex characters.
    """
    payload = canonical_json(
        {
            "stage": stage,
            "version": version,
            "config": config,
            "inputs": dict(sorted(input_keys.items())),
            "fingerprint": fingerprint,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()


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
