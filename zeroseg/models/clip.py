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
    at the model's native input size the returned ``cls`` equals ``model.encode_image``. The ViT
    forward itself is :mod:`zeroseg.models.trunk` (shared with ZegCLIP's deep prompts), with the
    last block's attention replaced by :func:`~zeroseg.models.trunk.maskclip_attention`.

Everything here is independent of Ray and the pipeline. open_clip is imported lazily (it takes
seconds), so importing this module is cheap.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zeroseg.config.clip import (  # noqa: F401  (re-exported: the CLIP spec lives in zeroseg.config)
    CONFIG_DIR,
    RANDOM_WEIGHTS_ID,
    TINY_MODEL,
    TINY_MODEL_CONFIG,
    ClipSpec,
    as_spec,
    checkpoint_path,
    clip_fingerprint,
    file_sha256,
    looks_like_path,
    model_config,
    model_embed_dim,
    resolve_model,
    weights_id,
)
from zeroseg.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import open_clip


#: Seed of the torch RNG used to build a ``random_init`` model: every process that loads the same
#: random-init spec gets the same weights (embed_text and evaluate must agree).
RANDOM_INIT_SEED = 0

_REGISTER_LOCK = threading.Lock()


def _open_clip():
    import open_clip

    return open_clip


@functools.lru_cache(maxsize=1)
def _register_builtin_configs() -> None:
    """Register ``zeroseg/models/configs/*.json`` with open_clip (once per process)."""
    oc = _open_clip()
    with _REGISTER_LOCK:
        oc.add_model_config(CONFIG_DIR)


def resolve_model_name(spec: ClipSpec | Mapping[str, Any]) -> str:
    """The open_clip model name of ``spec.model``, registering a JSON config file with open_clip
    if given (:func:`zeroseg.config.clip.resolve_model` does the torch-free checks).

    Raises:
        ConfigError: see :func:`zeroseg.config.clip.resolve_model`; a config file whose stem
            collides with a different registered open_clip config.
    """
    spec = as_spec(spec)
    name, cfg = resolve_model(spec)
    oc = _open_clip()
    _register_builtin_configs()
    if looks_like_path(spec.model.strip()):
        existing = oc.get_model_config(name)
        if existing is not None and existing != cfg:
            raise ConfigError(
                f"clip.model config {spec.model} would register as {name!r}, but a different config of that "
                "name is already registered with open_clip; rename the file"
            )
        if existing is None:
            with _REGISTER_LOCK:
                oc.add_model_config(Path(spec.model.strip()).expanduser().resolve())
    return name


# --------------------------------------------------------------------------- loading


def load_clip(spec: ClipSpec | Mapping[str, Any], device: str | torch.device = "cpu") -> open_clip.model.CLIP:
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
        path = checkpoint_path(spec)
        model = oc.create_model(name, pretrained=None, device="cpu")
        _load_checkpoint_strict(model, path, name)
    else:
        msg = (
            f"RANDOM WEIGHTS: CLIP {name!r} is randomly initialised (clip.random_init: true); "
            "results are not meaningful"
        )
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
    except Exception as e:  # noqa: BLE001 - unreadable / not a state dict: open_clip raises many kinds
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
        raise ConfigError(f"{key} {list(size)} is not a multiple of the CLIP patch size {[ph, pw]}; use e.g. {near}")


# --------------------------------------------------------------------------- dense features


# resize_pos_embed lives in zeroseg.models.trunk (the one ViT forward); re-exported here.
from zeroseg.models.trunk import forward_trunk, maskclip_attention, project, resize_pos_embed  # noqa: E402,F401


def check_dense_visual(visual: torch.nn.Module) -> None:
    """Raise ``ValueError`` (naming what is wrong) unless :func:`dense_features` supports ``visual``."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(
            f"dense_features needs an open_clip VisionTransformer image tower, got {type(visual).__name__} "
            "(ResNet / timm towers are not supported)"
        )
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError(
            "dense_features supports ViTs pooled by their [CLS] token (pool_type 'tok', "
            f"no attentional pooler); got pool_type={visual.pool_type!r}"
        )
    if not isinstance(visual.transformer.resblocks[-1], ResidualAttentionBlock):
        raise ValueError(
            "dense_features supports the standard ResidualAttentionBlock (nn.MultiheadAttention); "
            f"the last block is a {type(visual.transformer.resblocks[-1]).__name__}"
        )
    if visual.positional_embedding.ndim != 2:
        raise ValueError("dense_features expects a [1 + gh*gw, width] positional embedding")


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

    A thin user of the shared ViT trunk: ``forward_trunk(visual, images, attention={-1:
    maskclip_attention})`` then ``project`` (:mod:`zeroseg.models.trunk`, which also says where the
    trunk departs from open_clip's own forward).

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
    out = forward_trunk(visual, images, attention={-1: maskclip_attention})
    tokens = project(visual, out.tokens)  # [B, 1 + h*w, D]
    h, w = out.grid
    patches = tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], h, w)
    return tokens[:, 0], patches
