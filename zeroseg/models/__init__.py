"""Segmentation models: the :class:`Segmenter` contract, the method registry and the
*segmenter artifact* (``segmenter.json`` + optional ``weights.pt``, docs/architecture.md).

A method registers a builder ``builder(clip_model, model_cfg) -> Segmenter`` under its name with
:func:`register_segmenter` (a class whose constructor has that signature is a builder). Method
modules are imported on demand (:data:`METHOD_MODULES`), so importing this package stays cheap
and free of import cycles.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import difflib
import importlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroseg.errors import ConfigError, DataError

SEGMENTER_JSON = "segmenter.json"
WEIGHTS_PT = "weights.pt"

#: Where each known method registers itself (imported by :func:`get_builder` on first use).
METHOD_MODULES: dict[str, str] = {
    "maskclip": "zeroseg.models.maskclip",
    "zegclip": "zeroseg.models.zegclip",
}

#: method name -> ``builder(clip_model, model_cfg) -> Segmenter``.
SEGMENTERS: dict[str, Callable[..., "Segmenter"]] = {}


class Segmenter(nn.Module):
    """Base class of every segmentation model evaluate runs.

    Attributes:
        input_size: ``(H, W)`` the model wants; evaluate resizes images to it.
        mean, std: per-channel pixel normalisation for images scaled to [0, 1]
            (``(x - mean) / std``).
        cfg: the resolved model config (what ``segmenter.json`` stores under ``"model"``).
        scores_are_probabilities: ``forward`` returns per-class probabilities in [0, 1]
            (ZegCLIP's sigmoid) rather than logits; seen-class calibration (ZegFormer Eq. 2)
            then subtracts gamma from the scores without a softmax.

    ``forward(images [B, 3, H, W] float normalised, text_embeddings [C, D] L2-normalised)
    -> class scores [B, C, h, w]`` at any resolution (evaluate upsamples bilinearly and takes the
    argmax over classes).
    """

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cfg: dict[str, Any]
    scores_are_probabilities: bool = False

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def trainable_names(self) -> list[str]:
        """State-dict keys that ``weights.pt`` stores (default: all of them). Training-free
        methods and methods that only train a head override this."""
        return list(self.state_dict().keys())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict restricted to :meth:`trainable_names`."""
        names = set(self.trainable_names())
        return {k: v for k, v in self.state_dict().items() if k in names}


def register_segmenter(method: str) -> Callable[[Callable[..., Segmenter]], Callable[..., Segmenter]]:
    """Decorator registering ``builder(clip_model, model_cfg) -> Segmenter`` as ``method``.

    Raises:
        ValueError: ``method`` already registered with a different builder.
    """

    def deco(builder: Callable[..., Segmenter]) -> Callable[..., Segmenter]:
        old = SEGMENTERS.get(method)
        if old is not None and old is not builder and getattr(old, "__qualname__", None) != getattr(
            builder, "__qualname__", None
        ):
            raise ValueError(f"segmenter method {method!r} registered twice ({old} and {builder})")
        SEGMENTERS[method] = builder
        return builder

    return deco


def known_methods() -> list[str]:
    """Every method name that is registered or can be imported."""
    return sorted(set(SEGMENTERS) | set(METHOD_MODULES))


def get_builder(method: str) -> Callable[..., Segmenter]:
    """The builder of ``method``, importing its module if needed.

    Raises:
        ConfigError: unknown method (naming the nearest known one).
    """
    if method not in SEGMENTERS and method in METHOD_MODULES:
        importlib.import_module(METHOD_MODULES[method])
    if method not in SEGMENTERS:
        near = difflib.get_close_matches(str(method), known_methods(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown segmentation method {method!r}{hint} (methods: {', '.join(known_methods())})")
    return SEGMENTERS[method]


def build_segmenter(method: str, clip_model: nn.Module, model_cfg: Mapping[str, Any] | None = None) -> Segmenter:
    """``get_builder(method)(clip_model, dict(model_cfg or {}))``.

    Raises:
        ConfigError: unknown method, or a bad ``model_cfg`` (raised by the method's builder).
        ValueError: a CLIP model the method cannot use (e.g. a non-ViT image tower).
    """
    return get_builder(method)(clip_model, dict(model_cfg or {}))


def save_segmenter(
    segmenter_dir: str | Path,
    method: str,
    clip_spec: Any,
    model_cfg: Mapping[str, Any],
    input: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a segmenter artifact.

    Args:
        segmenter_dir: directory to write into (created).
        method: registered method name.
        clip_spec: a ``ClipSpec`` (or its dict form): the CLIP weights the model starts from.
        model_cfg: the method's resolved model config (JSON-serialisable).
        input: ``{"size": [H, W], "mean": [3 floats], "std": [3 floats]}``.
        state_dict: trained parameters only (``weights.pt``), or None for a training-free method.

    Returns:
        the path of ``segmenter.json``.

    Raises:
        ConfigError: unknown method, a bad ``input`` block, or a spec that does not validate.
        TypeError: ``model_cfg`` is not JSON-serialisable.
    """
    from zeroseg.models.clip import as_spec

    get_builder(method)  # validates the name
    spec = as_spec(clip_spec)
    inp = _check_input(dict(input), where="save_segmenter input")
    out = Path(segmenter_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"method": method, "clip": spec.model_dump(mode="json"), "model": dict(model_cfg), "input": inp}
    text = json.dumps(doc, indent=2, sort_keys=True)
    if state_dict is not None:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, out / WEIGHTS_PT)
    elif (out / WEIGHTS_PT).exists():
        (out / WEIGHTS_PT).unlink()
    path = out / SEGMENTER_JSON
    path.write_text(text + "\n")
    return path


def _check_input(inp: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        size = [int(s) for s in inp["size"]]
        mean = [float(m) for m in inp["mean"]]
        std = [float(s) for s in inp["std"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where} must be {{'size': [H, W], 'mean': [3], 'std': [3]}}, got {inp!r} ({e})") from None
    if len(size) != 2 or min(size) < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"{where} must be {{'size': [H, W] > 0, 'mean': [3], 'std': [3] > 0}}, got {inp!r}")
    return {"size": size, "mean": mean, "std": std}


def load_segmenter(segmenter_dir: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a segmenter from its artifact directory, in eval mode on ``device``.

    Reads ``segmenter.json``, loads the CLIP model of its ``clip`` spec
    (``zeroseg.models.clip.load_clip``), builds the method, and if ``weights.pt`` exists loads it
    strictly against the segmenter's :meth:`Segmenter.trainable_names`.

    Raises:
        DataError: ``segmenter.json`` missing or malformed; ``weights.pt`` with missing or
            unexpected keys (listed) or mis-shaped tensors; the built model's input size / mean /
            std disagree with the ``input`` block.
        ConfigError: unknown method or bad CLIP spec (see ``load_clip``).
    """
    from zeroseg.models.clip import as_spec, load_clip

    d = Path(segmenter_dir)
    jpath = d / SEGMENTER_JSON
    if not jpath.is_file():
        have = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        raise DataError(f"{jpath} not found: not a segmenter artifact (directory has {have[:20]})")
    try:
        doc = json.loads(jpath.read_text())
        method, clip_doc, model_cfg, inp = doc["method"], doc["clip"], doc.get("model", {}), doc["input"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{jpath} is malformed ({type(e).__name__}: {e}); expected keys method, clip, model, input") from None
    inp = _check_input(inp, where=f"{jpath} input")
    builder = get_builder(method)
    seg = builder(load_clip(as_spec(clip_doc), device="cpu"), dict(model_cfg or {}))

    wpath = d / WEIGHTS_PT
    if wpath.exists():
        try:
            sd = torch.load(wpath, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"cannot read {wpath}: {type(e).__name__}: {e}") from None
        if not isinstance(sd, Mapping):
            raise DataError(f"{wpath} must hold a state dict, got {type(sd).__name__}")
        load_trainable(seg, sd, where=str(wpath))

    got = {"size": [int(s) for s in seg.input_size], "mean": [float(m) for m in seg.mean],
           "std": [float(s) for s in seg.std]}
    for k in ("size", "mean", "std"):
        if any(abs(a - b) > 1e-6 for a, b in zip(got[k], inp[k])) or len(got[k]) != len(inp[k]):
            raise DataError(f"{jpath}: input.{k} {inp[k]} disagrees with the rebuilt {method} model's {got[k]}")
    return seg.to(device).eval()


def load_trainable(seg: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Strictly load ``state_dict`` into the trainable part of ``seg``.

    Expected keys: ``seg.trainable_names()`` (all state-dict keys for a module without it).

    Raises:
        DataError: missing or unexpected keys (listed) or a shape mismatch.
    """
    names = getattr(seg, "trainable_names", None)
    expected = set(names()) if callable(names) else set(seg.state_dict().keys())
    got = set(state_dict)
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise DataError(
            f"{where} does not match the {type(seg).__name__} model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''} ({len(missing)}), unexpected keys {unexpected[:20]}"
            f"{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    own = seg.state_dict()
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise DataError(f"{where}: shape mismatch for {bad[:10]}")
    seg.load_state_dict(dict(state_dict), strict=False)


__all__ = [
    "METHOD_MODULES",
    "SEGMENTERS",
    "SEGMENTER_JSON",
    "WEIGHTS_PT",
    "Segmenter",
    "build_segmenter",
    "get_builder",
    "known_methods",
    "load_segmenter",
    "load_trainable",
    "register_segmenter",
    "save_segmenter",
]
