"""The proposals artifact (stage ``pretrain_proposals``): ``proposals.json``, ``weights.pt``
(the full MaskFormer state dict) and ``metrics.json``; writing (:func:`save_proposals`),
reading (:func:`read_proposals_json`, :func:`read_proposal_weights`), the checks shared by the
classifiers built on it (:func:`check_proposals_doc`) and rebuilding the model
(:func:`load_proposal_model`).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeroseg.config import validated
from zeroseg.config.proposals import ProposalConfig
from zeroseg.errors import DataError
from zeroseg.models import artifact_file, class_path, import_class, load_strict, read_state_dict
from zeroseg.models.maskformer.model import MaskFormer

PROPOSALS_JSON = "proposals.json"
WEIGHTS_PT = "weights.pt"
METRICS_JSON = "metrics.json"


def save_proposals(
    artifact_dir: str | Path,
    model: MaskFormer,
    cfg: ProposalConfig | Mapping[str, Any] | None = None,
    *,
    seen: Sequence[int],
    input_size: Sequence[int],
    clip_spec: Any = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a proposals artifact: ``proposals.json``, ``weights.pt`` (the full state dict) and,
    when given, ``metrics.json``.

    Args:
        artifact_dir: directory (created).
        model: the trained :class:`MaskFormer` (unwrapped from DDP).
        cfg: its config (default ``model.cfg``); must equal the model's.
        seen: training class ids the head was trained on (``classes.json`` ``train.seen``, in the
            order of the head's classes / text rows).
        input_size: ``[H, W]`` training crop size (pixels).
        clip_spec: the ``ClipSpec`` (or dict) of the CLIP model: required for backbone ``clip``
            (rebuilds the tower's structure on load), recorded otherwise when given.
        metrics: JSON-able proposal recall etc., written to ``metrics.json``.

    Returns:
        path of ``proposals.json`` (written last).

    Raises:
        ValueError: ``cfg`` differs from the model's; ``clip`` without ``clip_spec``; ``seen`` not
            ``num_classes`` long for a ``linear`` head.
    """
    from zeroseg.config.clip import as_spec

    dump = model.cfg.model_dump(mode="json")
    if cfg is not None and validated(ProposalConfig, cfg, "model").model_dump(mode="json") != dump:
        raise ValueError("save_proposals: cfg differs from the model's own config (model.cfg)")
    if model.cfg.backbone == "clip" and clip_spec is None:
        raise ValueError("save_proposals: backbone 'clip' needs clip_spec (to rebuild the tower on load)")
    seen = [int(s) for s in seen]
    if model.class_head != "objectness" and len(seen) != model.num_classes:
        raise ValueError(f"save_proposals: {len(seen)} seen ids for a head of {model.num_classes} classes")
    out = Path(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "class": class_path(model),
        "model": dump,
        "num_classes": model.num_classes,
        "text_dim": model.text_dim,
        "class_head": model.class_head,
        "num_queries": model.num_queries,
        "hidden_dim": model.hidden_dim,
        "clip": as_spec(clip_spec).model_dump(mode="json") if clip_spec is not None else None,
        "input": {
            "size": [int(s) for s in input_size],
            "mean": [float(m) for m in model.mean],
            "std": [float(s) for s in model.std],
        },
        "seen": seen,
    }
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / WEIGHTS_PT)
    if metrics is not None:
        (out / METRICS_JSON).write_text(json.dumps(dict(metrics), indent=2, sort_keys=True) + "\n")
    path = out / PROPOSALS_JSON
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return path


_JSON_KEYS = (
    "class",
    "model",
    "num_classes",
    "text_dim",
    "class_head",
    "num_queries",
    "hidden_dim",
    "clip",
    "input",
    "seen",
)


def read_proposals_json(artifact_dir: str | Path) -> dict[str, Any]:
    """The parsed ``proposals.json`` of a proposals artifact.

    Raises:
        DataError: missing, not JSON, or lacking a key (naming the file and the keys it needs).
    """
    jpath = artifact_file(artifact_dir, PROPOSALS_JSON, "proposals")
    try:
        doc = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{jpath} is not readable JSON: {e}") from None
    missing = [k for k in _JSON_KEYS if k not in doc] if isinstance(doc, dict) else list(_JSON_KEYS)
    if missing or not isinstance(doc.get("input"), dict) or not isinstance(doc.get("model"), dict):
        raise DataError(
            f"{jpath} is malformed: missing {missing or ['input/model as objects']}; expected keys {list(_JSON_KEYS)}"
        )
    return doc


def check_proposals_doc(
    doc: Mapping[str, Any], embed_dim: int, *, who: str, where: str = "proposals", clip_model: str | None = None
) -> int:
    """The refusals every classifier built on a proposals artifact shares (ZegFormer, DeOP); returns
    the query count ``Q``.

    Args:
        doc: the artifact's ``proposals.json`` content.
        embed_dim: the CLIP model's embedding size ``D``.
        who: the method, for messages (``"ZegFormer"``).
        where: the artifact, for messages.
        clip_model: the CLIP model's name, for messages.

    Raises:
        DataError: no usable ``num_queries``, or one that disagrees with ``model.num_queries``; a
            text class head (or any recorded ``text_dim``) whose embedding size is not ``D``. Each
            message names both values and what to change.
    """
    model = doc.get("model") if isinstance(doc.get("model"), Mapping) else {}
    q, q_model = doc.get("num_queries"), model.get("num_queries")
    if isinstance(q, bool) or not isinstance(q, int) or q < 1 or q != q_model:
        raise DataError(
            f"{where}: proposals.json records {q!r} queries but its model has num_queries {q_model!r}; "
            "not a usable pretrain_proposals artifact: re-run pretrain_proposals"
        )
    head = doc.get("class_head", model.get("class_head"))
    td = doc.get("text_dim")
    if (td is not None or head == "text") and td != int(embed_dim):
        name = f" {clip_model!r}" if clip_model else ""
        raise DataError(
            f"{where}: the proposal model embeds segments into {td} dimensions, but {who}'s CLIP model{name} embeds "
            f"into {int(embed_dim)}; pretrain_proposals and train_classifier must use the same clip section"
        )
    return q


def read_proposal_weights(path: str | Path, name: str | None = None) -> dict[str, torch.Tensor]:
    """A proposals artifact's ``weights.pt`` (the full MaskFormer state dict), on the CPU
    (``torch.load(weights_only=True)``).

    Args:
        path: the ``weights.pt`` file, or the artifact directory holding it.
        name: how messages name the file (default: its path; e.g. the store URI of a local copy).

    Raises:
        DataError: the file is missing, unreadable, or not a state dict (naming it).
    """
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_PT
    name = name or str(p)
    if not p.is_file():
        raise DataError(f"{name} not found: the proposals artifact has no {WEIGHTS_PT} (it holds the model's weights)")
    return read_state_dict(p, name)


def load_proposal_model(
    artifact_dir: str | Path, device: str | torch.device = "cpu", clip_model: nn.Module | None = None
) -> MaskFormer:
    """Rebuild the proposal model of an artifact, in eval mode on ``device``.

    Builds :class:`MaskFormer` from ``proposals.json`` (for backbone ``clip`` on ``clip_model``'s
    image tower, or on ``load_clip`` of the stored spec when None; the tower's weights are then
    replaced by the artifact's), without fetching ``backbone_weights``, and loads ``weights.pt``
    strictly.

    Raises:
        DataError: missing / malformed ``proposals.json`` or ``weights.pt``; weights that do not
            fit (``WeightsMismatchError`` listing keys); the rebuilt model's sizes or
            normalisation disagree with the JSON.
        ConfigError: a bad stored config or CLIP spec.
    """
    d = Path(artifact_dir)
    jpath = d / PROPOSALS_JSON
    doc = read_proposals_json(d)
    cls = import_class(doc["class"], where=str(jpath))
    if not (isinstance(cls, type) and issubclass(cls, MaskFormer)):
        raise DataError(f"{jpath}: class {doc['class']!r} is not a MaskFormer proposal model")
    visual = None
    if doc["model"].get("backbone") == "clip":
        if clip_model is None:
            if not doc["clip"]:
                raise DataError(f"{jpath}: backbone clip but no clip spec")
            from zeroseg.models.clip import as_spec, load_clip

            clip_model = load_clip(as_spec(doc["clip"]), device="cpu")
        visual = getattr(clip_model, "visual", clip_model)
    model = cls(doc["model"], int(doc["num_classes"]), doc["text_dim"], visual, load_backbone_weights=False)
    wpath = d / WEIGHTS_PT
    load_strict(model, read_proposal_weights(wpath), str(wpath), "the MaskFormer proposal model")
    for k, got in (
        ("num_queries", model.num_queries),
        ("hidden_dim", model.hidden_dim),
        ("class_head", model.class_head),
        ("text_dim", model.text_dim),
        ("num_classes", model.num_classes),
    ):
        if doc[k] != got:
            raise DataError(f"{jpath}: {k} {doc[k]!r} disagrees with the rebuilt model's {got!r}")
    for k, got in (("mean", model.mean), ("std", model.std)):
        want = [float(x) for x in doc["input"].get(k, [])]
        if len(want) != len(got) or any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
            raise DataError(f"{jpath}: input.{k} {want} disagrees with the rebuilt model's {list(got)}")
    return model.to(device).eval()


__all__ = [
    "METRICS_JSON",
    "PROPOSALS_JSON",
    "WEIGHTS_PT",
    "check_proposals_doc",
    "load_proposal_model",
    "read_proposal_weights",
    "read_proposals_json",
    "save_proposals",
]
