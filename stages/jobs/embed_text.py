"""The embed_text stage's job (``stages.embed_text``: its config, fingerprint and the module
docstring with the two sources): every vocabulary of ``classes.json`` embedded by the CLIP text
tower (``zeroseg.text.encode_class_names``) or looked up in a precomputed file, checked, written
as ``embeddings/<vocab>.npy`` with ``provenance.json``.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.dag import StageContext
from stages.common import vocabularies
from stages.embed_text import EMBEDDINGS_DIR, NORM_TOLERANCE, EmbeddingFile, EmbedTextConfig, data_path
from zeroseg.config.clip import file_sha256, model_embed_dim, weights_id
from zeroseg.data.readers import load_json
from zeroseg.errors import ConfigError, DataError
from zeroseg.models.clip import get_tokenizer, load_clip
from zeroseg.text import encode_class_names, get_templates


def read_embedding_file(f: EmbeddingFile) -> tuple[np.ndarray, list[str], str]:
    """Load a precomputed embedding file and its class-name list.

    Returns:
        ``(rows [N, D] float32 as stored, names [N], key used or "")``.

    Raises:
        ConfigError: a missing file, or an ambiguous / unknown ``key`` (listing the keys).
        DataError: unreadable JSON or .npy, not a 2-D array, names not a list of strings, or
            rows != names.
    """
    emb_path, names_path = data_path(f.embeddings), data_path(f.class_names)
    for p, what in ((emb_path, "embeddings"), (names_path, "class_names")):
        if not p.is_file():
            raise ConfigError(f"embed_text.file.{what}: {p} does not exist")
    doc = load_json(names_path, "embed_text.file.class_names")
    key = f.key or ""
    if isinstance(doc, dict):
        if f.key is None:
            keys = list(doc)
            guess = [k for k in keys if emb_path.name.startswith(k)]
            if len(keys) == 1:
                key = keys[0]
            elif len(guess) == 1:
                key = guess[0]
            else:
                raise ConfigError(f"embed_text.file.key: {names_path} holds several lists {keys}; say which one")
        if key not in doc:
            near = difflib.get_close_matches(key, list(doc), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"embed_text.file.key {key!r} is not in {names_path}{hint} (keys: {list(doc)})")
        names = doc[key]
    elif isinstance(doc, list):
        names = doc
    else:
        raise DataError(f"{names_path}: expected a list of class names or a dict of such lists")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{names_path}{'[' + key + ']' if key else ''}: class names must be strings")
    try:
        rows = np.load(emb_path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"{emb_path} is not a readable .npy array ({e}); re-export it with numpy.save") from None
    if rows.ndim != 2 or not np.issubdtype(rows.dtype, np.floating):
        raise DataError(f"{emb_path}: expected a 2-D float array [N, D], got {rows.dtype} {rows.shape}")
    if rows.shape[0] != len(names):
        raise DataError(
            f"{emb_path} has {rows.shape[0]} rows but {names_path}"
            f"{'[' + key + ']' if key else ''} lists {len(names)} class names"
        )
    return rows.astype(np.float32), list(names), key


def check_file_rows(
    rows: np.ndarray, names: list[str], source: str, expect_dim: int | None, clip_model: str | None = None
) -> None:
    """Dimension and unit-norm checks of precomputed embeddings.

    Raises:
        DataError: ``D != expect_dim`` (naming both), or a row whose norm is off by more than
            :data:`NORM_TOLERANCE` (naming the first such row, its class and its norm), or a
            non-finite value.
    """
    if expect_dim is not None and rows.shape[1] != expect_dim:
        raise DataError(
            f"{source}: embeddings have dimension {rows.shape[1]}, but CLIP model {clip_model!r} "
            f"embeds into {expect_dim} dimensions; use the matching clip model or source: model"
        )
    if not np.isfinite(rows).all():
        i = int(np.argwhere(~np.isfinite(rows))[0, 0])
        raise DataError(f"{source}: row {i} ({names[i]!r}) has a non-finite value")
    norms = np.linalg.norm(rows.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOLERANCE)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{source}: row {i} ({names[i]!r}) has norm {norms[i]:.4f}; rows must be L2-normalised "
            f"(within {NORM_TOLERANCE}); {bad.size} row(s) are off"
        )


def lookup_rows(rows: np.ndarray, file_names: list[str], vocab: str, prompts: list[str], source: str) -> np.ndarray:
    """Rows of ``prompts`` in a file indexed by ``file_names``.

    Raises:
        DataError: naming every prompt name the file lacks (with the nearest file name).
    """
    index = {n: i for i, n in enumerate(file_names)}
    missing = [p for p in prompts if p not in index]
    if missing:
        desc = []
        for m in missing[:20]:
            near = difflib.get_close_matches(m, file_names, n=1)
            desc.append(f"{m!r}" + (f" (nearest in file: {near[0]!r})" if near else ""))
        raise DataError(
            f"{source} has no embedding for {len(missing)} class(es) of vocabulary {vocab!r}: {', '.join(desc)}"
            f"{' ...' if len(missing) > 20 else ''}. Map them to names in the file with class_map in "
            "build_splits.eval, or use source: model"
        )
    return rows[[index[p] for p in prompts]]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run(ctx: StageContext) -> dict[str, float]:
    """The stage's run (``stages.embed_text.EmbedText``): every vocabulary's embeddings and
    ``provenance.json``.

    Returns:
        ``{"vocabularies", "train_classes", "embed_dim"}``.

    Raises:
        ConfigError / DataError: see :func:`read_embedding_file`, :func:`check_file_rows`,
            :func:`lookup_rows`.
    """
    cfg: EmbedTextConfig = ctx.config
    vocabs = {
        n: {"names": list(v.names), "prompt_names": list(v.prompt_names)}
        for n, v in vocabularies(ctx.inputs["splits"]).items()
    }
    out_dir = Path(ctx.output_dir) / EMBEDDINGS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    prov: dict[str, Any] = {"source": cfg.source, "prompt_names": {v: d["prompt_names"] for v, d in vocabs.items()}}
    if cfg.clip is not None:
        prov["clip"] = cfg.clip.model_dump(mode="json")
        prov["model"] = cfg.clip.model
        prov["weights"] = weights_id(cfg.clip)

    if cfg.source == "model":
        result = from_model(cfg, vocabs, prov)
    else:
        result = from_file(cfg, vocabs, prov)

    dim = 0
    for vocab, emb in result.items():
        np.save(out_dir / f"{vocab}.npy", emb)
        dim = int(emb.shape[1])
    prov["embed_dim"] = dim
    prov["files"] = {v: f"{EMBEDDINGS_DIR}/{v}.npy" for v in result}
    (Path(ctx.output_dir) / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
    ctx.log(
        f"{len(result)} vocabularies ({', '.join(f'{v}: {len(e)}' for v, e in result.items())}), "
        f"D={dim}, source={cfg.source}"
    )
    return {
        "vocabularies": float(len(result)),
        "train_classes": float(len(result["train"])),
        "embed_dim": float(dim),
    }


def from_model(cfg: EmbedTextConfig, vocabs: dict[str, dict[str, Any]], prov: dict[str, Any]) -> dict[str, np.ndarray]:
    """Source ``model``: ``{vocab: float32 [C, D]}`` from the CLIP text tower (on cuda when this
    process has it), rows normalised; the templates recorded into ``prov``."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_clip(cfg.clip, device=device)
    tokenizer = get_tokenizer(cfg.clip)
    unique = list(dict.fromkeys(p for v in vocabs.values() for p in v["prompt_names"]))
    emb = encode_class_names(
        model, tokenizer, unique, cfg.templates, batch_size=cfg.batch_size, split_names=cfg.split_names
    )
    row = {p: i for i, p in enumerate(unique)}
    prov["templates"] = {"set": cfg.templates, "strings": list(get_templates(cfg.templates))}
    prov["split_names"] = cfg.split_names
    prov["random_init"] = bool(cfg.clip.random_init)
    return {v: _normalise(emb[[row[p] for p in d["prompt_names"]]]) for v, d in vocabs.items()}


def from_file(cfg: EmbedTextConfig, vocabs: dict[str, dict[str, Any]], prov: dict[str, Any]) -> dict[str, np.ndarray]:
    """Source ``file``: ``{vocab: float32 [C, D]}`` looked up by prompt name in the checked file,
    rows normalised; the file's identity recorded into ``prov``."""
    f = cfg.file
    rows, names, key = read_embedding_file(f)
    source = f"{data_path(f.embeddings)}" + (f" [{key}]" if key else "")
    expect = model_embed_dim(cfg.clip) if cfg.clip is not None else None
    check_file_rows(rows, names, source, expect, cfg.clip.model if cfg.clip is not None else None)
    prov["file"] = {
        "embeddings": str(data_path(f.embeddings)),
        "class_names": str(data_path(f.class_names)),
        "key": key or None,
        "embeddings_sha256": file_sha256(data_path(f.embeddings)),
        "class_names_sha256": file_sha256(data_path(f.class_names)),
    }
    prov["templates"] = "as computed by the file's producer"
    return {v: _normalise(lookup_rows(rows, names, v, d["prompt_names"], source)) for v, d in vocabs.items()}


__all__ = ["check_file_rows", "from_file", "from_model", "lookup_rows", "read_embedding_file", "run"]
