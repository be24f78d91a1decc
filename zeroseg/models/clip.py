"""CLIP loading (open_clip) and the dense-feature path of a CLIP ViT image encoder.

Loading
    :class:`ClipSpec` names a model (an open_clip architecture name or a JSON model config file)
    and exactly one weight source: an open_clip ``pretrained`` tag, a local ``checkpoint`` file,
    or ``random_init: true``. :func:`load_clip` builds the model, :func:`get_tokenizer` its
    tokenizer, :func:`weights_id` / :func:`clip_fingerprint` the strings that enter artifact keys
    and provenance.

Dense features (MaskCLIP, Zhou et al., ECCV 2022, "Extract Free Dense Labels from CLIP", Sec. 3.2)
    :func:`dense_features` runs the image tower and returns, besides the usual image embedding,
    one embedding per patch in CLIP's joint image-text space. In the **last** transformer block
    the query-key attention is skipped for the patch tokens: each token keeps only its *value*
    embedding, passed through the attention output projection. Following the authors' released
    ViT code (``mmseg/models/backbones/vit.py`` of MaskCLIP: ``v = out_proj(v(ln_1(x)))``,
    ``v += x``, ``v = v + ffn(ln_2(v))``, then the final norm and the ``proj`` 1x1 conv in
    ``MaskClipHead``), the block's residual connection and MLP are kept, then ``ln_post`` and the
    visual projection ``proj`` are applied. The [CLS] token goes through the unmodified block, so
    at the model's native input size the returned ``cls`` equals ``model.encode_image``.

Everything here is independent of Ray and the pipeline. open_clip is imported lazily (it takes
seconds), so importing this module is cheap.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from zeroseg.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import open_clip


#: Directory of the model configs shipped with zeroseg (registered with open_clip on first use).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Name of the tiny test model: 2-layer ViT, width 64, patch 16, 224x224, embed dim 64.
TINY_MODEL = "zeroseg-tiny-vit"
#: Path of its JSON config (``clip.model`` accepts either the name or this path).
TINY_MODEL_CONFIG = CONFIG_DIR / f"{TINY_MODEL}.json"
#: Seed of the torch RNG used to build a ``random_init`` model: every process that loads the same
#: random-init spec gets the same weights (embed_text and evaluate must agree).
RANDOM_INIT_SEED = 0
#: ``weights_id`` of a random-init spec.
RANDOM_WEIGHTS_ID = "random-init"

_REGISTER_LOCK = threading.Lock()


class ClipSpec(BaseModel):
    """Which CLIP model to load and with which weights (the ``clip:`` config section).

    Fields:
        model: an open_clip model name (``open_clip.list_models()``, e.g. ``"ViT-B-16"``; ``/`` is
            read as ``-``), the name of a config shipped in ``zeroseg/models/configs``
            (``"zeroseg-tiny-vit"``), or a path to a JSON model config file
            (``{"embed_dim", "vision_cfg", "text_cfg"}``; registered with
            ``open_clip.add_model_config`` under its file stem).
        pretrained: an open_clip pretrained tag for that model (e.g. ``"openai"``; downloaded to
            or read from the open_clip / Hugging Face cache).
        checkpoint: path of a local checkpoint: an open_clip / OpenAI-layout state dict
            (``.pt``, ``.pth``, ``.bin``, ``.safetensors``, optionally under ``"state_dict"``),
            loaded strictly. OpenAI weights need QuickGELU: use e.g. ``ViT-B-16-quickgelu``.
        random_init: ``true`` to run with random weights (tests, the sample job). Results are not
            meaningful; it must be an explicit choice.

    Exactly one of ``pretrained`` / ``checkpoint`` / ``random_init: true``.

    Raises:
        ConfigError: on direct construction (``ClipSpec(...)``) with a bad combination or an
            unknown key. Inside a stage config the same check surfaces as a pydantic
            ``ValidationError`` that ``pipeline.config.validate_section`` turns into a
            ``ConfigError``.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "ViT-B-16"
    pretrained: str | None = None
    checkpoint: str | None = None
    random_init: bool = False

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            msgs = "; ".join(
                f"clip.{'.'.join(map(str, err['loc'])) or '(spec)'}: {err['msg']}" for err in e.errors()
            )
            raise ConfigError(f"invalid CLIP spec: {msgs}") from None

    @model_validator(mode="after")
    def _one_weight_source(self) -> "ClipSpec":
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


def as_spec(spec: ClipSpec | Mapping[str, Any]) -> ClipSpec:
    """A :class:`ClipSpec` from a spec or its dict form (as stored in ``segmenter.json``)."""
    if isinstance(spec, ClipSpec):
        return spec
    if isinstance(spec, Mapping):
        return ClipSpec(**dict(spec))
    raise ConfigError(f"expected a CLIP spec (mapping with model/pretrained/checkpoint/random_init), got {spec!r}")


# --------------------------------------------------------------------------- model names


def _open_clip():
    import open_clip

    return open_clip


@functools.lru_cache(maxsize=1)
def _register_builtin_configs() -> None:
    """Register ``zeroseg/models/configs/*.json`` with open_clip (once per process)."""
    oc = _open_clip()
    with _REGISTER_LOCK:
        oc.add_model_config(CONFIG_DIR)


def _looks_like_path(model: str) -> bool:
    """A JSON config path (``*.json``, ``./x``, ``/abs/x``, ``~/x`` or an existing file), not a
    model name such as ``ViT-B/16``."""
    return model.endswith(".json") or model.startswith(("./", "../", "/", "~")) or Path(model).is_file()


def resolve_model_name(spec: ClipSpec | Mapping[str, Any]) -> str:
    """The open_clip model name of ``spec.model``, registering a JSON config file if given.

    Returns:
        the name to pass to ``open_clip.create_model`` / ``get_tokenizer``.

    Raises:
        ConfigError: a config file that does not exist, is not valid JSON, lacks
            ``embed_dim``/``vision_cfg``/``text_cfg``, or whose stem collides with a different
            registered config; a model name unknown to open_clip (listing close matches).
    """
    spec = as_spec(spec)
    oc = _open_clip()
    _register_builtin_configs()
    model = spec.model.strip()
    if _looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"clip.model {model!r} looks like a JSON model config path but no such file exists "
                f"(relative paths are resolved against {Path.cwd()})"
            )
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"clip.model config {path} is not readable JSON: {e}") from None
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing:
            raise ConfigError(f"clip.model config {path} lacks {missing}: an open_clip model config "
                              "needs embed_dim, vision_cfg and text_cfg")
        name = path.stem
        existing = oc.get_model_config(name)
        if existing is not None and existing != cfg:
            raise ConfigError(
                f"clip.model config {path} would register as {name!r}, but a different config of that "
                "name is already registered with open_clip; rename the file"
            )
        if existing is None:
            with _REGISTER_LOCK:
                oc.add_model_config(path.resolve())
        return name
    name = model.replace("/", "-")
    if oc.get_model_config(name) is None:
        near = difflib.get_close_matches(name, oc.list_models(), n=5, cutoff=0.4)
        hint = f"; close matches: {', '.join(near)}" if near else ""
        raise ConfigError(
            f"clip.model {model!r} is not an open_clip model{hint}. Use a name from "
            "open_clip.list_models(), or a path to a JSON model config file"
        )
    return name


def model_config(spec: ClipSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The open_clip model config dict of ``spec.model`` (no weights are touched)."""
    return _open_clip().get_model_config(resolve_model_name(spec))


def model_embed_dim(spec: ClipSpec | Mapping[str, Any]) -> int:
    """Dimension ``D`` of the joint image-text embedding space of ``spec.model`` (from its config;
    no weights are loaded).

    Raises:
        ConfigError: unknown model or bad model config file (see :func:`resolve_model_name`).
    """
    return int(model_config(spec)["embed_dim"])


# --------------------------------------------------------------------------- weights identity


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (cached per process by path, size and mtime)."""
    p = Path(path).expanduser().resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def _checkpoint_path(spec: ClipSpec) -> Path:
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
        return "sha256:" + file_sha256(_checkpoint_path(spec))
    return RANDOM_WEIGHTS_ID


def clip_fingerprint(spec: ClipSpec | Mapping[str, Any]) -> str:
    """What a key needs beyond the spec's own fields: :func:`weights_id`, plus the sha256 of the
    model config file's content when ``spec.model`` is a path (editing the file changes keys).

    Raises:
        ConfigError: see :func:`weights_id` and :func:`resolve_model_name`.
    """
    spec = as_spec(spec)
    out = f"weights={weights_id(spec)}"
    if _looks_like_path(spec.model.strip()):
        resolve_model_name(spec)  # validates the file
        out += f";model_config=sha256:{file_sha256(spec.model.strip())}"
    return out


# --------------------------------------------------------------------------- loading


def load_clip(spec: ClipSpec | Mapping[str, Any], device: str | torch.device = "cpu") -> "open_clip.model.CLIP":
    """Build the open_clip CLIP model of ``spec`` with its weights, in eval mode, float32.

    - ``pretrained``: ``open_clip.create_model(name, pretrained=tag)`` (downloads into the
      open_clip cache if not there). If the tag was trained with QuickGELU (the OpenAI weights)
      and the model config does not say so, QuickGELU is forced (open_clip only warns).
    - ``checkpoint``: the architecture is built, then the file's state dict is loaded with
      ``open_clip.load_checkpoint`` (handles ``state_dict``/``module.`` wrappers, safetensors,
      resizing of positional embeddings) and every missing / unexpected key is an error.
    - ``random_init``: deterministic random weights (torch seed :data:`RANDOM_INIT_SEED`, the
      global RNG state is left untouched); warns ``RANDOM WEIGHTS``.

    Args:
        spec: a :class:`ClipSpec` or its dict form.
        device: where the model goes.

    Returns:
        an ``open_clip.model.CLIP`` (``.visual``: image tower, ``.encode_text``, ``.logit_scale``,
        ``.visual.preprocess_cfg`` with the pixel ``mean``/``std``).

    Raises:
        ConfigError: unknown model, unknown tag (listing the model's tags), unreadable or
            mismatching checkpoint (naming missing / unexpected / mis-shaped keys), or weights
            that cannot be obtained (no network and not cached).
    """
    spec = as_spec(spec)
    oc = _open_clip()
    name = resolve_model_name(spec)
    if spec.pretrained:
        from open_clip.pretrained import get_pretrained_cfg

        tag_cfg = get_pretrained_cfg(name, spec.pretrained)
        if not tag_cfg:
            tags = oc.list_pretrained_tags_by_model(name)
            raise ConfigError(
                f"clip.pretrained {spec.pretrained!r} is not an open_clip tag of {name!r} "
                f"(tags: {', '.join(tags) or 'none'}); for a local file use clip.checkpoint"
            )
        quick = bool(tag_cfg.get("quick_gelu")) and not model_config(spec).get("quick_gelu", False)
        try:
            model = oc.create_model(name, pretrained=spec.pretrained, device="cpu", force_quick_gelu=quick)
        except (RuntimeError, OSError) as e:
            raise ConfigError(
                f"could not load open_clip weights {name}/{spec.pretrained}: {e}. Without network "
                "access put the weights in the open_clip/Hugging Face cache, or use clip.checkpoint "
                "with a local file"
            ) from None
    elif spec.checkpoint:
        path = _checkpoint_path(spec)
        model = oc.create_model(name, pretrained=None, device="cpu")
        _load_checkpoint_strict(model, path, name)
    else:
        msg = (f"RANDOM WEIGHTS: CLIP {name!r} is randomly initialised (clip.random_init: true); "
               "results are not meaningful")
        warnings.warn(msg, UserWarning, stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = oc.create_model(name, pretrained=None, device="cpu")
    model = model.float().to(device)
    model.eval()
    return model


def _load_checkpoint_strict(model: torch.nn.Module, path: Path, name: str) -> None:
    oc = _open_clip()
    try:
        incompatible = oc.load_checkpoint(model, str(path), strict=False)
    except RuntimeError as e:  # size mismatches are raised even with strict=False
        raise ConfigError(f"checkpoint {path} does not fit CLIP model {name!r}: {e}") from None
    except Exception as e:  # unreadable / not a state dict
        raise ConfigError(f"cannot read CLIP checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = list(getattr(incompatible, "missing_keys", []) or [])
    unexpected = list(getattr(incompatible, "unexpected_keys", []) or [])
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not match CLIP model {name!r}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} "
            f"({len(missing)}), unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
            f"({len(unexpected)}); is clip.model the checkpoint's architecture?"
        )


def get_tokenizer(spec: ClipSpec | Mapping[str, Any]):
    """The open_clip tokenizer of ``spec.model``: ``tokenizer(list[str]) -> LongTensor [N, L]``.

    Raises:
        ConfigError: unknown model (see :func:`resolve_model_name`).
    """
    return _open_clip().get_tokenizer(resolve_model_name(spec))


def embed_dim(model: torch.nn.Module) -> int:
    """Joint-space dimension ``D`` of a loaded CLIP model (or its ``.visual``)."""
    visual = getattr(model, "visual", model)
    return int(visual.output_dim)


def image_norm(model: torch.nn.Module) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(mean, std)`` pixel normalisation of a loaded CLIP model (images in [0, 1]).

    From ``visual.preprocess_cfg`` (set by ``open_clip.create_model``; the tag's values for a
    pretrained tag), else the legacy ``visual.image_mean`` / ``image_std`` attributes (set alone by
    open_clip's ``load_openai_model``), else ``OPENAI_DATASET_MEAN`` / ``OPENAI_DATASET_STD``.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = getattr(model, "visual", model)
    pp = getattr(visual, "preprocess_cfg", None) or {}
    mean = pp.get("mean") or getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = pp.get("std") or getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)  # type: ignore[return-value]


def native_input_size(model: torch.nn.Module) -> tuple[int, int]:
    """``(H, W)`` the image tower was built for (``visual.image_size``)."""
    visual = getattr(model, "visual", model)
    size = visual.image_size
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def patch_size(model: torch.nn.Module) -> tuple[int, int]:
    """``(ph, pw)`` in pixels of a ViT image tower (``visual.patch_size``).

    Raises:
        ValueError: the image tower has no ``patch_size`` (not a ViT).
    """
    visual = getattr(model, "visual", model)
    p = getattr(visual, "patch_size", None)
    if p is None:
        raise ValueError(f"the CLIP image tower {type(visual).__name__} has no patch size (not a ViT)")
    if isinstance(p, int):
        return (p, p)
    return (int(p[0]), int(p[1]))


def check_input_size(model: torch.nn.Module, size: tuple[int, int] | list[int], key: str) -> None:
    """Check that ``(H, W) = size`` is a multiple of the ViT's patch size (the patch grid must
    tile the image exactly).

    Raises:
        ConfigError: it is not (naming ``key`` and the nearest valid size).
        ValueError: ``model`` is not a ViT (see :func:`patch_size`).
    """
    ph, pw = patch_size(model)
    if int(size[0]) % ph or int(size[1]) % pw:
        near = [max(ph, round(int(size[0]) / ph) * ph), max(pw, round(int(size[1]) / pw) * pw)]
        raise ConfigError(
            f"{key} {list(size)} is not a multiple of the CLIP patch size {[ph, pw]}; use e.g. {near}"
        )


# --------------------------------------------------------------------------- dense features


def resize_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ViT positional embedding to another patch grid.

    Args:
        pos: ``[1 + gh*gw, width]``; row 0 is the [CLS] position and is kept as is.
        old_grid: ``(gh, gw)`` the embedding was trained for.
        new_grid: ``(nh, nw)`` wanted.

    Returns:
        ``[1 + nh*nw, width]``, same dtype (interpolated in float32, ``align_corners=False``, as
        MaskCLIP's and ZegCLIP's released code do). The input itself when the grids agree.

    Raises:
        ValueError: ``pos`` does not have ``1 + gh*gw`` rows.
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if pos.shape[0] != 1 + old_grid[0] * old_grid[1]:
        raise ValueError(f"positional embedding has {pos.shape[0]} rows, expected 1 + {old_grid[0]}*{old_grid[1]}")
    if old_grid == new_grid:
        return pos
    cls_pos, grid = pos[:1], pos[1:]
    width = pos.shape[-1]
    grid = grid.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width).to(pos.dtype)
    return torch.cat([cls_pos, grid], dim=0)


def check_dense_visual(visual: torch.nn.Module) -> None:
    """Raise ``ValueError`` (naming what is wrong) unless :func:`dense_features` supports ``visual``."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"dense_features needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(ResNet / timm towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("dense_features supports ViTs pooled by their [CLS] token (pool_type 'tok', "
                         f"no attentional pooler); got pool_type={visual.pool_type!r}")
    if not isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock):
        raise ValueError("dense_features supports the standard ResidualAttentionBlock (nn.MultiheadAttention); "
                         f"the last block is a {type(visual.transformer.resblocks[-1]).__name__}")
    if visual.positional_embedding.ndim != 2:
        raise ValueError("dense_features expects a [1 + gh*gw, width] positional embedding")


def _value_path(attn: torch.nn.MultiheadAttention, y: torch.Tensor) -> torch.Tensor:
    """``out_proj(W_v y + b_v)`` for tokens ``y`` ``[B, N, E]`` (no query/key attention)."""
    e = attn.embed_dim
    if attn.in_proj_weight is not None:
        w_v = attn.in_proj_weight[2 * e:]
    else:
        w_v = attn.v_proj_weight
    b_v = attn.in_proj_bias[2 * e:] if attn.in_proj_bias is not None else None
    v = F.linear(y, w_v, b_v)
    return attn.out_proj(v)


def dense_features(visual: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image embedding and per-patch embeddings of an open_clip ViT (MaskCLIP Sec. 3.2).

    Steps: patchify (``conv1``), prepend [CLS], add the positional embedding (bicubic-resized when
    the patch grid differs from the model's, :func:`resize_pos_embed`), ``ln_pre``, all blocks
    but the last; then in the last block

    - [CLS]: the ordinary block (attention with the [CLS] query over all tokens, residual, MLP);
    - patches: ``v = x + ls_1(out_proj(W_v ln_1(x) + b_v))``, ``v = v + ls_2(mlp(ln_2(v)))``
      (query-key attention skipped, MaskCLIP's released ViT code);

    finally ``ln_post`` and ``@ proj`` on both. Patch dropout is never applied. Works in the
    module's current mode (call ``eval()`` for inference) and with gradients if enabled.

    Args:
        visual: an open_clip ``VisionTransformer`` (``model.visual``) with [CLS] pooling and
            standard blocks; either transformer layout (``batch_first`` True or False).
        images: ``[B, 3, H, W]`` normalised pixels. ``H, W`` need not equal the model's
            ``image_size``; the grid is ``(H // p, W // p)`` for patch size ``p`` (a remainder is
            cropped by the strided patch convolution).

    Returns:
        ``(cls, patches)``: ``cls`` ``[B, D]`` (equal to ``model.encode_image(images)`` at the
        native size) and ``patches`` ``[B, D, h, w]`` with ``h = H // p``, ``w = W // p``, in the
        model's dtype, **not** L2-normalised (normalise along ``dim=1`` before comparing with
        text embeddings).

    Raises:
        ValueError: an unsupported image tower, or ``images`` not ``[B, 3, H, W]`` with
            ``H, W >= p``.
    """
    check_dense_visual(visual)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    ph, pw = patch_size(visual)
    if images.shape[-2] < ph or images.shape[-1] < pw:
        raise ValueError(f"images {tuple(images.shape[-2:])} are smaller than one patch {(ph, pw)}")
    dtype = visual.conv1.weight.dtype
    x = visual.conv1(images.to(dtype))  # [B, width, h, w]
    b, width, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)  # [B, h*w, width]
    cls_tok = visual.class_embedding.to(x.dtype).reshape(1, 1, width).expand(b, 1, width)
    x = torch.cat([cls_tok, x], dim=1)
    x = x + resize_pos_embed(visual.positional_embedding, tuple(visual.grid_size), (h, w)).to(x.dtype)
    x = visual.ln_pre(x)

    transformer = visual.transformer
    blocks = transformer.resblocks
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)  # [L, B, width]
    for blk in blocks[:-1]:
        x = blk(x)
    if not batch_first:
        x = x.transpose(0, 1)

    last = blocks[-1]
    y = last.ln_1(x)  # [B, L, width]
    # [CLS]: the unmodified block, computed for the [CLS] query only
    q = y[:, :1]
    if last.attn.batch_first:
        a = last.attn(q, y, y, need_weights=False)[0]
    else:
        a = last.attn(q.transpose(0, 1), y.transpose(0, 1), y.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
    c = x[:, :1] + last.ls_1(a)
    c = c + last.ls_2(last.mlp(last.ln_2(c)))
    # patches: MaskCLIP value path
    v = x[:, 1:] + last.ls_1(_value_path(last.attn, y[:, 1:]))
    v = v + last.ls_2(last.mlp(last.ln_2(v)))

    cls_out = visual.ln_post(c[:, 0])
    patches = visual.ln_post(v)
    if visual.proj is not None:
        cls_out = cls_out @ visual.proj
        patches = patches @ visual.proj
    patches = patches.transpose(1, 2).reshape(b, patches.shape[-1], h, w)
    return cls_out, patches
