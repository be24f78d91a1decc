"""Prompt templates and class-name text embeddings (CLIP prompt ensembling).

Template sets (:data:`TEMPLATES`):

- ``single``: ``"a photo of a {}."`` (CLIP's basic prompt; ZegCLIP Appendix C uses "A photo of a
  { }" on VOC).
- ``ensemble15``: the 15 templates of ZegCLIP Appendix C (used on COCO-Stuff and PASCAL Context),
  spelled as in the authors' released code, ZiqinZhou66/ZegCLIP
  ``configs/_base_/datasets/text_embedding/get_embedding.ipynb`` (``templates = [...]``; the paper
  capitalises the first letter, the code does not).
- ``zegclip_single``: ``"a photo of a {}"`` without the period: the prompt the same notebook
  actually used for ZegCLIP's released single-template embeddings (``single_templete``), i.e.
  the one behind ``../shared/data/clip-text-embeddings/*_single.npy``.
- ``imagenet_select``: ZegFormer's 8 templates for COCO-Stuff and ADE20k-Full (released code,
  dingjiansw101/ZegFormer ``mask_former/third_party/imagenet_templates.py``
  ``IMAGENET_TEMPLATES_SELECT``, chosen by ``PROMPT_ENSEMBLE_TYPE: "imagenet_select"``;
  released-code.md section 1.2), spelled as released (``"a origami {}."``, no final period on
  the last one).
- ``zegformer_single``: ``"A photo of a {} in the scene"``: ZegFormer's VOC prompt
  (``PROMPT_ENSEMBLE_TYPE: "single"``; the paper's example template, Sec. 3.2).

:func:`encode_class_names` follows CLIP's / ZegCLIP's prompt ensembling: per class, the mean of
the L2-normalised embeddings of all its prompts, L2-normalised again.

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from zeroseg.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where text is encoded: the template sets are plan-time data
    import torch

TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("a photo of a {}.",),
    "ensemble15": (
        "a photo of a {}.",
        "a photo of a small {}.",
        "a photo of a medium {}.",
        "a photo of a large {}.",
        "This is a photo of a {}.",
        "This is a photo of a small {}.",
        "This is a photo of a medium {}.",
        "This is a photo of a large {}.",
        "a {} in the scene.",
        "a photo of a {} in the scene.",
        "There is a {} in the scene.",
        "There is the {} in the scene.",
        "This is a {} in the scene.",
        "This is the {} in the scene.",
        "This is one {} in the scene.",
    ),
    "zegclip_single": ("a photo of a {}",),
    "imagenet_select": (
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
        "A photo of a {} in the scene",
    ),
    "zegformer_single": ("A photo of a {} in the scene",),
}


def get_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """The template strings of a set name (:data:`TEMPLATES`) or an explicit list.

    Raises:
        ConfigError: unknown set name (naming the nearest), an empty list, or a template without
            exactly one ``{}`` placeholder.
    """
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            near = difflib.get_close_matches(templates, list(TEMPLATES), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"unknown template set {templates!r}{hint} (sets: {', '.join(TEMPLATES)})")
        return TEMPLATES[templates]
    out = tuple(templates)
    if not out:
        raise ConfigError("the template list is empty")
    for t in out:
        if not isinstance(t, str) or t.count("{}") != 1:
            raise ConfigError(f"template {t!r} must contain exactly one '{{}}' placeholder")
    return out


def encode_class_names(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Any],
    names: Sequence[str],
    templates: str | Sequence[str] = "single",
    batch_size: int = 256,
    split_names: str | None = None,
) -> np.ndarray:
    """Text embeddings of class names with prompt ensembling.

    For class ``c`` with prompts ``p_1..p_T`` (``template.format(name)``):
    ``e_c = normalize(mean_t normalize(encode_text(p_t)))``. With one template this is just the
    normalised embedding of that prompt. With ``split_names`` (ZegFormer's released
    ``zeroshot_classifier`` uses ``", "``), a name containing the separator is split into its
    parts and the mean runs over every template x part prompt (``"building, edifice"`` -> the
    prompts of ``"building"`` and of ``"edifice"``); names without it are unchanged.

    Args:
        model: an open_clip CLIP (``encode_text``); used in eval mode on its own device.
        tokenizer: ``tokenizer(list[str]) -> LongTensor [N, L]`` (``zeroseg.models.clip.get_tokenizer``).
        names: ``C`` class names (the ``prompt_names`` of a vocabulary).
        templates: a set name of :data:`TEMPLATES` or an explicit list of ``"...{}..."`` strings.
        batch_size: prompts per ``encode_text`` call.
        split_names: a separator (``", "``) that splits a name into synonyms, or None.

    Returns:
        ``[C, D]`` float32, rows L2-normalised, in the order of ``names``.

    Raises:
        ConfigError: bad templates (see :func:`get_templates`).
        ValueError: no names, a non-string / empty name, or ``batch_size < 1``.
    """
    temps = get_templates(templates)
    names = list(names)
    if not names:
        raise ValueError("encode_class_names needs at least one class name")
    bad = [n for n in names if not isinstance(n, str) or not n.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings, got {bad[:5]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if split_names is not None and not split_names:
        raise ValueError("split_names must be a non-empty separator or None")
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            if not split_names:
                prompts = [t.format(n) for n in names for t in temps]  # class-major: [C * T]
            else:  # every template x part of each name, class-major
                parts = [[p for p in n.split(split_names) if p.strip()] or [n] for n in names]
                prompts = [t.format(p) for ps in parts for t in temps for p in ps]
            chunks = []
            for i in range(0, len(prompts), batch_size):
                tokens = tokenizer(prompts[i : i + batch_size]).to(device)
                chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
            flat = torch.cat(chunks)
            if not split_names:
                emb = F.normalize(flat.reshape(len(names), len(temps), -1).mean(dim=1), dim=-1)
            else:
                sizes = [len(temps) * len(ps) for ps in parts]
                emb = F.normalize(torch.stack([g.mean(dim=0) for g in flat.split(sizes)]), dim=-1)
    finally:
        model.train(was_training)
    return emb.cpu().numpy().astype(np.float32)
