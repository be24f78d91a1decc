"""Which CLIP model, with which weights: :class:`ClipSpec`, resolved without importing torch.

A spec names a model (an open_clip architecture name, a config shipped in
``zeroseg/models/configs``, or a JSON model config file) and exactly one weight source (an
open_clip ``pretrained`` tag, a local ``checkpoint`` file, or ``random_init: true``).

:func:`model_config` reads the architecture's JSON (open_clip's ``model_configs`` folder, found
with ``importlib.util.find_spec`` without importing open_clip), so config validation and artifact
keys cost no deep-learning import. :func:`weights_id` / :func:`clip_fingerprint` are the strings
that enter artifact keys and provenance: the weights by tag or content (sha256 of a checkpoint
file), never by the path's spelling.

Loading the model itself is ``zeroseg.models.clip.load_clip`` (torch, open_clip).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from zeroseg.errors import ConfigError

#: Directory of the model configs shipped with zeroseg (registered with open_clip on load).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"
#: Name of the tiny test model: 2-layer ViT, width 64, patch 16, 224x224, embed dim 64.
TINY_MODEL = "zeroseg-tiny-vit"
#: Path of its JSON config (``clip.model`` accepts either the name or this path).
TINY_MODEL_CONFIG = CONFIG_DIR / f"{TINY_MODEL}.json"
#: ``weights_id`` of a random-init spec.
RANDOM_WEIGHTS_ID = "random-init"


class ClipSpec(BaseModel):
    """Which CLIP model to load and with which weights (the ``clip:`` config section).

    Fields:
        model: an open_clip model name (``open_clip.list_models()``, e.g. ``"ViT-B-16"``; ``/`` is
            read as ``-``), the name of a config shipped in ``zeroseg/models/configs``
            (``"zeroseg-tiny-vit"``), or a path to a JSON model config file
            (``{"embed_dim", "vision_cfg", "text_cfg"}``; registered with
            ``open_clip.add_model_config`` under its file stem when loaded).
        pretrained: an open_clip pretrained tag for that model (e.g. ``"openai"``; downloaded to
            or read from the open_clip / Hugging Face cache).
        checkpoint: path of a local checkpoint: an open_clip / OpenAI-layout state dict
            (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, optionally under ``"state_dict"``),
            loaded strictly. OpenAI weights need QuickGELU: use e.g. ``ViT-B-16-quickgelu``.
        random_init: ``true`` to run with random weights (tests, the sample job). Results are not
            meaningful; it must be an explicit choice.

    Exactly one of ``pretrained`` / ``checkpoint`` / ``random_init: true``.

    In artifact keys a spec counts by :meth:`key_payload` (the architecture and the weights'
    identity), so a checkpoint or model-config file enters by its content, not its path.

    Raises:
        ConfigError: on direct construction (``ClipSpec(...)``) with a bad combination or an
            unknown key. Inside a stage config the same check surfaces as a pydantic
            ``ValidationError`` that the pipeline turns into a config error naming the key.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True)

    model: str = "ViT-B-16"
    pretrained: str | None = None
    checkpoint: str | None = None
    random_init: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            msgs = "; ".join(f"clip.{'.'.join(map(str, err['loc'])) or '(spec)'}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"invalid CLIP spec: {msgs}") from None

    @model_validator(mode="after")
    def _one_weight_source(self) -> ClipSpec:
        if not self.model or not self.model.strip():
            raise ValueError("clip.model must be a non-empty open_clip model name or JSON config path")
        given = [k for k in ("pretrained", "checkpoint") if getattr(self, k)]
        if self.random_init:
            given.append("random_init")
        if len(given) != 1:
            what = "none of them" if not given else " and ".join(given)
            raise ValueError(
                f"clip needs exactly one weight source, got {what}. Choose one of: "
                "`pretrained: <open_clip tag>` (e.g. openai), "
                "`checkpoint: <local checkpoint file>`, or "
                "`random_init: true` (random weights: results are not meaningful)"
            )
        return self

    def key_payload(self) -> dict[str, str]:
        """What of this spec determines outputs: ``{"model": "<name>;config-sha256:<hex>" (the
        architecture's JSON by content, a file's or a bundled one's; the bare name for ``hf-hub:``),
        "weights": weights_id}``.

        Raises:
            ConfigError: a checkpoint or model config file that does not exist.
        """
        name, _ = resolve_model(self)
        if looks_like_path(self.model.strip()):
            model = f"{name};config-sha256:{file_sha256(self.model.strip())}"
        elif name in builtin_model_configs():  # a config shipped with open_clip or zeroseg: by content too
            model = f"{name};config-sha256:{file_sha256(builtin_model_configs()[name])}"
        else:
            model = name
        return {"model": model, "weights": weights_id(self)}


def as_spec(spec: ClipSpec | Mapping[str, Any]) -> ClipSpec:
    """A :class:`ClipSpec` from a spec or its dict form (as stored in ``segmenter.json``).

    Raises:
        ConfigError: not a spec or a mapping, or an invalid one.
    """
    if isinstance(spec, ClipSpec):
        return spec
    if isinstance(spec, Mapping):
        return ClipSpec(**dict(spec))
    raise ConfigError(f"expected a CLIP spec (mapping with model/pretrained/checkpoint/random_init), got {spec!r}")


# --------------------------------------------------------------------------- architectures


def looks_like_path(model: str) -> bool:
    """A JSON config path (``*.json``, ``./x``, ``/abs/x``, ``~/x`` or an existing file), not a
    model name such as ``ViT-B/16``."""
    return model.endswith(".json") or model.startswith(("./", "../", "/", "~")) or Path(model).is_file()


@functools.lru_cache(maxsize=1)
def builtin_model_configs() -> dict[str, Path]:
    """``{name: JSON file}`` of open_clip's bundled architectures and zeroseg's own configs.

    open_clip's folder is located with ``importlib.util.find_spec`` (open_clip is not imported).
    """
    out: dict[str, Path] = {}
    spec = importlib.util.find_spec("open_clip")
    dirs = [Path(p) / "model_configs" for p in (spec.submodule_search_locations or [])] if spec else []
    for d in [*dirs, CONFIG_DIR]:
        for f in sorted(d.glob("*.json")):
            out[f.stem] = f
    return out


@functools.lru_cache(maxsize=64)
def _read_config(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"clip.model config {p} is not readable JSON: {e}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg] if isinstance(cfg, dict) else ["all"]
    if missing:
        raise ConfigError(
            f"clip.model config {p} lacks {missing}: an open_clip model config needs embed_dim, vision_cfg and text_cfg"
        )
    return cfg


def resolve_model(spec: ClipSpec | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(open_clip model name, its config dict)`` of ``spec.model``.

    A JSON file is named by its stem; ``hf-hub:`` names are passed through with an empty config
    (they cannot be checked offline).

    Raises:
        ConfigError: a config file that does not exist or is not an open_clip model config; a
            model name unknown to open_clip (listing close matches).
    """
    spec = as_spec(spec)
    model = spec.model.strip()
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"clip.model {model!r} looks like a JSON model config path but no such file exists "
                f"(relative paths are resolved against {Path.cwd()})"
            )
        return path.stem, _read_config(str(path.resolve()))
    if model.startswith("hf-hub:"):
        return model, {}
    name = model.replace("/", "-")
    known = builtin_model_configs()
    if name not in known:
        near = difflib.get_close_matches(name, list(known), n=5, cutoff=0.4)
        hint = f"; close matches: {', '.join(near)}" if near else ""
        raise ConfigError(
            f"clip.model {model!r} is not an open_clip model{hint}. Use a name from "
            "open_clip.list_models(), or a path to a JSON model config file"
        )
    return name, _read_config(str(known[name]))


def model_config(spec: ClipSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The open_clip model config dict of ``spec.model`` (no weights are touched).

    Raises:
        ConfigError: see :func:`resolve_model`.
    """
    return resolve_model(spec)[1]


def model_embed_dim(spec: ClipSpec | Mapping[str, Any]) -> int:
    """Dimension ``D`` of the joint image-text embedding space of ``spec.model`` (from its config;
    no weights are loaded).

    Raises:
        ConfigError: unknown model or bad model config file (see :func:`resolve_model`), or an
            ``hf-hub:`` model (its config is not available offline).
    """
    cfg = model_config(spec)
    if "embed_dim" not in cfg:
        raise ConfigError(f"clip.model {as_spec(spec).model!r}: its embedding size is unknown offline")
    return int(cfg["embed_dim"])


# --------------------------------------------------------------------------- weights identity


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (cached per process by path, size and mtime).

    Raises:
        FileNotFoundError: no such file.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def checkpoint_path(spec: ClipSpec) -> Path:
    """The checkpoint file of ``spec``.

    Raises:
        ConfigError: it does not exist or is not a file.
    """
    p = Path(spec.checkpoint).expanduser()
    if not p.is_file():
        raise ConfigError(
            f"clip.checkpoint {spec.checkpoint!r} does not exist or is not a file "
            f"(relative paths are resolved against {Path.cwd()})"
        )
    return p


def weights_id(spec: ClipSpec | Mapping[str, Any]) -> str:
    """Identity of the weights of ``spec``, for artifact keys and provenance.

    Returns:
        the pretrained tag (e.g. ``"openai"``), ``"sha256:<hex>"`` of the checkpoint file's bytes,
        or ``"random-init"``.

    Raises:
        ConfigError: the checkpoint file does not exist.
    """
    spec = as_spec(spec)
    if spec.pretrained:
        return spec.pretrained
    if spec.checkpoint:
        return "sha256:" + file_sha256(checkpoint_path(spec))
    return RANDOM_WEIGHTS_ID


def clip_fingerprint(spec: ClipSpec | Mapping[str, Any]) -> str:
    """What a key needs beyond the spec's own fields: :func:`weights_id`, plus the sha256 of the
    model config file's content when ``spec.model`` is a path (editing the file changes keys).

    Raises:
        ConfigError: see :func:`weights_id` and :func:`resolve_model`.
    """
    spec = as_spec(spec)
    out = f"weights={weights_id(spec)}"
    if looks_like_path(spec.model.strip()):
        resolve_model(spec)  # validates the file
        out += f";model_config=sha256:{file_sha256(spec.model.strip())}"
    return out


__all__ = [
    "CONFIG_DIR",
    "RANDOM_WEIGHTS_ID",
    "TINY_MODEL",
    "TINY_MODEL_CONFIG",
    "ClipSpec",
    "as_spec",
    "builtin_model_configs",
    "checkpoint_path",
    "clip_fingerprint",
    "file_sha256",
    "looks_like_path",
    "model_config",
    "model_embed_dim",
    "resolve_model",
    "weights_id",
]
