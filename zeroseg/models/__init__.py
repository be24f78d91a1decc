"""Segmentation models: the :class:`Segmenter` contract, the *segmenter artifact* and the one
strict check of weights against a model.

A segmenter artifact (docs/architecture.md) is a directory with ``segmenter.json`` (method name,
the model class as ``module:Class`` under ``zeroseg.models``, the CLIP spec, the model config,
input size and normalisation) and, when something was trained, ``weights.pt`` (the trained
parameters only). :func:`save_segmenter` writes one from a built model; :func:`load_segmenter`
rebuilds it (``Class(load_clip(spec), model_cfg)``, then a strict load of the weights). Which
class a method uses is said by the method (``stages.methods``), so there is no registry here.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroseg.errors import DataError

SEGMENTER_JSON = "segmenter.json"
WEIGHTS_PT = "weights.pt"
#: Modules a ``segmenter.json`` may name its class in (an artifact never imports other code).
CLASS_PREFIX = "zeroseg.models."


class WeightsMismatchError(DataError):
    """A state dict does not fit a model: lists missing, unexpected and mis-shaped keys and
    names the file (the one error type of every strict load: segmenter weights, training
    checkpoints, warm starts, CLIP checkpoints)."""

    def __init__(
        self, source: str, missing: list[str], unexpected: list[str], mismatched: list[str], model: str = "the model"
    ):
        self.source, self.missing, self.unexpected, self.mismatched, self.model = (
            source,
            missing,
            unexpected,
            mismatched,
            model,
        )

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "") if keys else "none"

        super().__init__(
            f"{source} does not match {model}: missing keys ({len(missing)}): {show(missing)}; "
            f"unexpected keys ({len(unexpected)}): {show(unexpected)}"
            + (f"; shape mismatches ({len(mismatched)}): {show(mismatched)}" if mismatched else "")
            + ". Was it written for another model config?"
        )

    def __reduce__(self):
        return (self.__class__, (self.source, self.missing, self.unexpected, self.mismatched, self.model))


def check_state_dict(
    expected: Mapping[str, Any], got: Mapping[str, Any], source: str, model: str = "the model"
) -> None:
    """Compare a state dict with the tensors a model expects (names and shapes).

    Args:
        expected: ``{name: tensor}`` of the model (or of the part being loaded).
        got: the state dict being loaded.
        source: what ``got`` is (a file, a checkpoint URI), for the message.

    Raises:
        WeightsMismatchError: any missing or unexpected key, or a shape mismatch (all listed).
    """
    missing = sorted(k for k in expected if k not in got)
    unexpected = sorted(k for k in got if k not in expected)
    mismatched = sorted(
        f"{k} {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in got and hasattr(got[k], "shape") and tuple(got[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(source, missing, unexpected, mismatched, model)


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, Any],
    source: str,
    model: str | None = None,
    names: Iterable[str] | None = None,
) -> None:
    """The one strict load of a state dict into a module: :func:`check_state_dict` against the
    module's own tensors, then ``module.load_state_dict``.

    Args:
        module: the module loaded into.
        state_dict: its state dict, or exactly the part ``names`` says.
        source: what ``state_dict`` is (a file, a checkpoint URI), for the message.
        model: how the message names the module (default ``the <Class> model``).
        names: the state-dict keys expected (a trainable part: the other tensors are left as
            they are); default all of them (``strict=True``).

    Raises:
        WeightsMismatchError: any missing or unexpected key, or a shape mismatch (all listed).
    """
    own = module.state_dict()
    model = model or f"the {type(module).__name__} model"
    if names is None:
        check_state_dict(own, state_dict, source, model)
        module.load_state_dict(state_dict, strict=True)
    else:
        check_state_dict({k: own[k] for k in names}, state_dict, source, model)
        module.load_state_dict(dict(state_dict), strict=False)


def read_state_dict(path: str | Path, name: str | None = None, error: type[Exception] = DataError) -> dict[str, Any]:
    """A state-dict file, on the CPU (``torch.load(map_location="cpu", weights_only=True)``).

    Args:
        path: the file.
        name: how messages name it (default: its path).
        error: the exception type raised (``DataError`` for an artifact's file, ``ConfigError`` for
            a file a config names).

    Returns:
        the state dict as a ``dict``.

    Raises:
        error: the file cannot be read, or it does not hold a mapping (naming it).
    """
    name = name or str(path)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for an unreadable file
        raise error(f"cannot read {name}: {type(e).__name__}: {e}") from None
    if not isinstance(sd, Mapping):
        raise error(f"{name} must hold a state dict, got {type(sd).__name__}")
    return dict(sd)


class Segmenter(nn.Module):
    """Base class of every segmentation model evaluate runs.

    Attributes:
        input_size: ``(H, W)`` the model wants; evaluate resizes images to it.
        mean, std: per-channel pixel normalisation for images scaled to [0, 1]
            (``(x - mean) / std``).
        cfg: the resolved model config: the validated schema of ``zeroseg.config`` (or a dict);
            ``segmenter.json`` stores :meth:`config_json` under ``"model"``.
        scores_are_probabilities: ``forward`` returns per-class probabilities in [0, 1]
            (ZegCLIP's sigmoid) rather than logits; seen-class calibration (ZegFormer Eq. 2)
            then subtracts gamma from the scores without a softmax.

    ``forward(images [B, 3, H, W] float normalised, text_embeddings [C, D] L2-normalised)
    -> class scores [B, C, h, w]`` at any resolution (evaluate upsamples bilinearly and takes the
    argmax over classes).

    Optional attributes read by evaluate (``stages/evaluate.py``, ``zeroseg.protocols``); the
    defaults describe a plain segmenter:

    - ``variants``: names of several predictions made in one pass (ZegFormer: ``("zegformer",
      "zegformer_seg", "zegformer_img")``). When non-empty, ``forward`` (and ``logits``) return
      ``{variant: scores [B, C, h, w]}`` and evaluate scores every variant: ``variants[0]`` under
      the usual metric keys, the others as ``<variant>/<set>/<metric>``. May be set per instance
      (evaluate learns the variants from its actors' outputs).
    - ``encodes_text``: the model embeds class names itself (DeOP's learnable text prompts):
      evaluate calls :meth:`encode_text` with each set's ``prompt_names`` (``classes.json``) once
      per inference actor and passes the result as ``text_embeddings`` instead of embed_text's
      ``embeddings/<set>.npy``. A class attribute: evaluate reads it from the class
      ``segmenter.json`` names, before any model is built, to pass the prompt names to its actors.
    - ``activation`` (``"none"``, ``"sigmoid"``, ``"softmax"``) and :meth:`logits`: the scores
      before the activation. With an activation, evaluate calls ``logits``, upsamples them
      bilinearly to the resolution of the network input (a window, the padded or resized image)
      and applies the activation there (ZegCLIP's released order), or at the label size
      (``evaluate.activation_at: label``). ``forward`` must equal ``activation(logits)``; set
      ``scores_are_probabilities`` with a sigmoid or softmax activation.
    - ``size_divisibility``: the short-side protocol pads images right/bottom to a multiple of it
      (detectron2's ``SIZE_DIVISIBILITY``; a ViT: its patch size).
    """

    input_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    cfg: Any
    scores_are_probabilities: bool = False
    variants: tuple[str, ...] = ()
    encodes_text: bool = False
    activation: str = "none"  # "none" | "sigmoid" | "softmax" (zeroseg.protocols.ACTIVATIONS)
    size_divisibility: int = 1

    def forward(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def logits(self, images: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Class scores before :attr:`activation` (same shapes as ``forward``); default: ``forward``
        (activation ``"none"``). A segmenter with an activation overrides it (ZegCLIP: its mask
        logits)."""
        return self(images, text_embeddings)

    def encode_text(self, prompt_names: list[str]) -> torch.Tensor:
        """``[C, D]`` L2-normalised class embeddings of ``prompt_names`` (one per class, in class
        order), made by the model itself; only for ``encodes_text = True``.

        Raises:
            NotImplementedError: the segmenter does not embed text itself.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not embed class names itself (encodes_text is False); "
            "evaluate gives it embed_text's embeddings"
        )

    def config_json(self) -> dict[str, Any]:
        """What ``segmenter.json`` stores under ``"model"`` (the class validates it back when the
        artifact is loaded): ``cfg``'s JSON dump (a pydantic config) or ``cfg`` itself (a dict)."""
        return self.cfg.model_dump(mode="json") if hasattr(self.cfg, "model_dump") else dict(self.cfg)

    def trainable_names(self) -> list[str]:
        """State-dict keys that ``weights.pt`` stores (default: all of them). Training-free
        methods and methods that only train a head override this."""
        return list(self.state_dict().keys())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict restricted to :meth:`trainable_names`."""
        names = set(self.trainable_names())
        return {k: v for k, v in self.state_dict().items() if k in names}

    def load_trainable_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load of a :meth:`trainable_state_dict` (:func:`load_trainable`).

        Raises:
            WeightsMismatchError: missing or unexpected keys or a shape mismatch (listed).
        """
        load_trainable(self, state_dict, where=source)


def class_path(obj: Any) -> str:
    """``module:Class`` of a segmenter class or instance (what an artifact records).

    The module is the outermost package under :data:`CLASS_PREFIX` that re-exports the class,
    else the module defining it: ``zeroseg.models.deop:DeOP`` for ``DeOP`` of
    ``zeroseg/models/deop/model.py``, so a model package may move a class between its files
    without changing the artifacts it writes.
    """
    cls = obj if isinstance(obj, type) else type(obj)
    parts = cls.__module__.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg.startswith(CLASS_PREFIX) and getattr(sys.modules.get(pkg), cls.__qualname__, None) is cls:
            return f"{pkg}:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def import_class(path: str, where: str = "segmenter.json") -> type:
    """The class named ``module:Class`` (only under :data:`CLASS_PREFIX`).

    Raises:
        DataError: a malformed name, a module outside ``zeroseg.models``, or no such class.
    """
    mod, _, name = str(path).partition(":")
    if not mod.startswith(CLASS_PREFIX) or not name:
        raise DataError(f"{where}: class {path!r} must be 'zeroseg.models.<module>:<Class>'")
    try:
        cls = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise DataError(
            f"{where}: class {path!r} cannot be imported ({e}); was the artifact written by another version of zeroseg?"
        ) from None
    return cls


def save_segmenter(
    segmenter_dir: str | Path,
    seg: Segmenter,
    clip_spec: Any,
    method: str,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a segmenter artifact for a built model.

    Args:
        segmenter_dir: directory to write into (created).
        seg: the built model (its class, :meth:`Segmenter.config_json`, ``input_size``, ``mean``,
            ``std`` are stored).
        clip_spec: a ``ClipSpec`` (or its dict form): the CLIP weights the model starts from.
        method: the method's name (``train_classifier.method``).
        state_dict: trained parameters only (``weights.pt``), or None for a training-free method.
        extra: more top-level ``segmenter.json`` entries (JSON values), e.g. ``default_gamma``:
            the seen-class calibration evaluate applies when ``evaluate.gamma`` is unset.

    Returns:
        the path of ``segmenter.json``.

    Raises:
        ConfigError: a spec that does not validate.
        TypeError: ``seg.cfg`` is not JSON-serialisable.
    """
    from zeroseg.config.clip import as_spec

    spec = as_spec(clip_spec)
    out = Path(segmenter_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "method": method,
        "class": class_path(seg),
        "clip": spec.model_dump(mode="json"),
        "model": seg.config_json(),
        "input": {
            "size": [int(s) for s in seg.input_size],
            "mean": [float(m) for m in seg.mean],
            "std": [float(s) for s in seg.std],
        },
        **dict(extra or {}),
    }
    text = json.dumps(doc, indent=2, sort_keys=True)
    if state_dict is not None:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, out / WEIGHTS_PT)
    elif (out / WEIGHTS_PT).exists():
        (out / WEIGHTS_PT).unlink()
    path = out / SEGMENTER_JSON
    path.write_text(text + "\n")
    return path


def artifact_file(artifact_dir: str | Path, name: str, kind: str) -> Path:
    """The path of file ``name`` of an artifact directory, which must exist.

    Raises:
        DataError: no such file: "not a ``kind`` artifact", listing what the directory holds.
    """
    d = Path(artifact_dir)
    path = d / name
    if not path.is_file():
        have = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
        raise DataError(f"{path} not found: not a {kind} artifact (directory has {have[:20]})")
    return path


def read_segmenter_json(segmenter_dir: str | Path) -> dict[str, Any]:
    """The parsed ``segmenter.json`` of an artifact directory.

    Raises:
        DataError: missing or malformed (naming the file and the keys it needs).
    """
    jpath = artifact_file(segmenter_dir, SEGMENTER_JSON, "segmenter")
    try:
        doc = json.loads(jpath.read_text())
        for k in ("method", "class", "clip", "input"):
            doc[k]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(
            f"{jpath} is malformed ({type(e).__name__}: {e}); expected keys method, class, clip, model, input"
        ) from None
    return doc


def load_segmenter(segmenter_dir: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """Rebuild a segmenter from its artifact directory, in eval mode on ``device``.

    Reads ``segmenter.json``, loads the CLIP model of its ``clip`` spec
    (``zeroseg.models.clip.load_clip``), builds its class with the stored model config, and if
    ``weights.pt`` exists loads it strictly against :meth:`Segmenter.trainable_names`.

    Raises:
        DataError: ``segmenter.json`` missing or malformed; an unknown class; ``weights.pt``
            unreadable or not matching (:class:`WeightsMismatchError`); the rebuilt model's input
            size / mean / std disagree with the ``input`` block.
        ConfigError: a bad CLIP spec or model config (see ``load_clip`` and the model).
    """
    from zeroseg.models.clip import as_spec, load_clip

    d = Path(segmenter_dir)
    jpath = d / SEGMENTER_JSON
    doc = read_segmenter_json(d)
    cls = import_class(doc["class"], where=str(jpath))
    seg = cls(load_clip(as_spec(doc["clip"]), device="cpu"), dict(doc.get("model") or {}))
    wpath = d / WEIGHTS_PT
    if wpath.exists():
        load_trainable(seg, read_state_dict(wpath), where=str(wpath))
    inp = doc["input"]
    got = {
        "size": [int(s) for s in seg.input_size],
        "mean": [float(m) for m in seg.mean],
        "std": [float(s) for s in seg.std],
    }
    for k in ("size", "mean", "std"):
        want = [float(x) for x in inp.get(k, [])]
        if len(got[k]) != len(want) or any(abs(a - b) > 1e-6 for a, b in zip(got[k], want)):
            raise DataError(
                f"{jpath}: input.{k} {inp.get(k)} disagrees with the rebuilt {doc['method']} model's {got[k]}"
            )
    return seg.to(device).eval()


def load_trainable(seg: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str = "state dict") -> None:
    """Strictly load ``state_dict`` into the trainable part of ``seg``.

    Expected keys: ``seg.trainable_names()`` (all state-dict keys for a module without it).

    Raises:
        WeightsMismatchError: missing or unexpected keys or a shape mismatch (all listed).
    """
    names = getattr(seg, "trainable_names", None)
    load_strict(seg, state_dict, where, names=names() if callable(names) else list(seg.state_dict()))


__all__ = [
    "SEGMENTER_JSON",
    "WEIGHTS_PT",
    "Segmenter",
    "WeightsMismatchError",
    "artifact_file",
    "check_state_dict",
    "class_path",
    "import_class",
    "load_segmenter",
    "load_strict",
    "load_trainable",
    "read_segmenter_json",
    "read_state_dict",
    "save_segmenter",
]
