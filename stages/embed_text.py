"""Stage ``embed_text``: class names -> CLIP text embeddings, one file per vocabulary.

Reads ``classes.json`` of build_splits and writes, for the training vocabulary and every eval
vocabulary, ``embeddings/<vocab>.npy``: float32 ``[C, D]``, rows L2-normalised, row ``i`` = the
class with label id ``i`` (``names[i]``), embedded from its ``prompt_names[i]``. Plus
``provenance.json`` (source, model, weights id, templates, prompt names, file digests).

Two sources:

- ``model``: the CLIP text tower of ``clip`` with the ``templates`` set
  (``zeroseg.text.encode_class_names``: prompt ensembling, ZegCLIP Appendix C);
- ``file``: precomputed rows (e.g. ``../shared/data/clip-text-embeddings``: ``.npy`` rows in the
  order of a ``class_names.json`` list), looked up by prompt name; checked for count (every prompt
  name present), dimension (= the CLIP model's embed dim when ``clip`` is given) and unit norm
  (within :data:`NORM_TOLERANCE`), then re-normalised in float32.

Wiring only; the science is in ``zeroseg.text`` and ``zeroseg.models.clip``.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Runtime
from pipeline.dag import Input, Stage, StageConfig, StageContext
from stages.common import random_weights_notice, vocabularies
from zeroseg.config.clip import ClipSpec, clip_fingerprint, file_sha256, model_embed_dim, weights_id
from zeroseg.data.readers import load_json
from zeroseg.errors import ConfigError, DataError
from zeroseg.text import TEMPLATES, get_templates

#: Largest allowed | ||row|| - 1 | of a precomputed embedding (float16 files are ~1e-3 off).
NORM_TOLERANCE = 1e-2
EMBEDDINGS_DIR = "embeddings"


class EmbeddingFile(BaseModel):
    """Precomputed text embeddings (``source: file``). Paths are relative to the working directory.

    ``embeddings``: ``.npy`` ``[N, D]`` (any float dtype), rows L2-normalised.
    ``class_names``: JSON: a list of ``N`` names, or a dict of such lists (``key`` picks one; may be
    omitted when the dict has one list, or when exactly one dict key prefixes the embeddings file
    name, e.g. ``voc20`` for ``voc20_vit-b-16_single.npy``).
    """

    model_config = ConfigDict(extra="forbid")

    embeddings: Annotated[str, Runtime(why="data path (content fingerprinted)")]
    class_names: Annotated[str, Runtime(why="data path (content fingerprinted)")]
    key: str | None = None


class EmbedTextConfig(StageConfig):
    """``embed_text`` config section.

    ``clip`` is injected from the top-level ``clip:`` section by the driver; required for
    ``source: model``; for ``source: file`` it is only used to check the dimension.
    ``templates`` and ``split_names`` apply to ``source: model``; ``split_names``: a separator
    that splits a class name into synonyms whose prompts are averaged together (ZegFormer's
    released code: ``", "``; ``zeroseg.text.encode_class_names``), or null.
    """

    clip: ClipSpec | None = None
    source: Literal["model", "file"] = "model"
    templates: Literal[tuple(TEMPLATES)] = "single"  # type: ignore[valid-type]
    split_names: str | None = Field(None, min_length=1)
    file: EmbeddingFile | None = None
    batch_size: Annotated[int, Runtime(why="inference batch size")] = Field(
        256, ge=1, description="prompts per text-encoder call"
    )

    @model_validator(mode="after")
    def _by_source(self) -> EmbedTextConfig:
        if self.source == "model":
            if self.clip is None:
                raise ValueError("source: model needs a clip spec (the top-level clip: section)")
            if self.file is not None:
                raise ValueError("'file' applies to source: file only; remove it or set source: file")
        elif self.file is None:
            raise ValueError("source: file needs file: {embeddings: <.npy>, class_names: <.json>, key: <list name>}")
        elif self.split_names is not None:
            raise ValueError("'split_names' applies to source: model only (a file holds finished rows); remove it")
        return self


def _path(p: str) -> Path:
    return Path(p).expanduser().resolve()


def read_embedding_file(f: EmbeddingFile) -> tuple[np.ndarray, list[str], str]:
    """Load a precomputed embedding file and its class-name list.

    Returns:
        ``(rows [N, D] float32 as stored, names [N], key used or "")``.

    Raises:
        ConfigError: a missing file, or an ambiguous / unknown ``key`` (listing the keys).
        DataError: unreadable JSON or .npy, not a 2-D array, names not a list of strings, or
            rows != names.
    """
    emb_path, names_path = _path(f.embeddings), _path(f.class_names)
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


class EmbedText(Stage):
    """CLIP text embeddings of every vocabulary of build_splits."""

    name = "embed_text"
    Config = EmbedTextConfig
    INPUTS = {"splits": Input(("build_splits",), doc="classes.json of the vocabularies")}
    shared = ("clip",)

    def notices(self, config: EmbedTextConfig) -> list[str]:
        return random_weights_notice(config.clip)

    def fingerprint(self, config: EmbedTextConfig) -> str | None:
        """Content the config does not show: the CLIP weights' identity (tag, checkpoint sha256,
        random-init; plus the model config file's sha256 when ``clip.model`` is a path) for source
        model; the embedding and class-name files' sha256 for source file.

        Raises:
            ConfigError: a checkpoint / model config / embedding file that does not exist.
        """
        if config.source == "model":
            return clip_fingerprint(config.clip)
        f = config.file
        for p, what in ((f.embeddings, "embeddings"), (f.class_names, "class_names")):
            if not _path(p).is_file():
                raise ConfigError(f"embed_text.file.{what}: {_path(p)} does not exist")
        return f"embeddings=sha256:{file_sha256(_path(f.embeddings))};class_names=sha256:{file_sha256(_path(f.class_names))}"

    def run(self, ctx: StageContext) -> dict[str, float]:
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
            result = self._from_model(cfg, vocabs, prov)
        else:
            result = self._from_file(cfg, vocabs, prov)

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

    @staticmethod
    def _from_model(
        cfg: EmbedTextConfig, vocabs: dict[str, dict[str, Any]], prov: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        import torch

        from zeroseg.models.clip import get_tokenizer, load_clip
        from zeroseg.text import encode_class_names

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

    @staticmethod
    def _from_file(
        cfg: EmbedTextConfig, vocabs: dict[str, dict[str, Any]], prov: dict[str, Any]
    ) -> dict[str, np.ndarray]:
        f = cfg.file
        rows, names, key = read_embedding_file(f)
        source = f"{_path(f.embeddings)}" + (f" [{key}]" if key else "")
        expect = model_embed_dim(cfg.clip) if cfg.clip is not None else None
        check_file_rows(rows, names, source, expect, cfg.clip.model if cfg.clip is not None else None)
        prov["file"] = {
            "embeddings": str(_path(f.embeddings)),
            "class_names": str(_path(f.class_names)),
            "key": key or None,
            "embeddings_sha256": file_sha256(_path(f.embeddings)),
            "class_names_sha256": file_sha256(_path(f.class_names)),
        }
        prov["templates"] = "as computed by the file's producer"
        return {v: _normalise(lookup_rows(rows, names, v, d["prompt_names"], source)) for v, d in vocabs.items()}
