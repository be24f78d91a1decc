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

Wiring only; the science is in ``zeroseg.text`` and ``zeroseg.models.clip``. This module is the
stage's spec (config, fingerprint; torch-free); the run is its job, ``stages.jobs.embed_text``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Runtime
from pipeline.dag import Input, StageConfig
from stages.common import JobStage, random_weights_notice
from zeroseg.config.clip import ClipSpec, clip_fingerprint, file_sha256
from zeroseg.errors import ConfigError
from zeroseg.text import TEMPLATES

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


def data_path(p: str) -> Path:
    """A configured path, absolute (``~`` expanded, links resolved)."""
    return Path(p).expanduser().resolve()


class EmbedText(JobStage):
    """CLIP text embeddings of every vocabulary of build_splits (the run: ``stages.jobs.embed_text``)."""

    name = "embed_text"
    job = "stages.jobs.embed_text"
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
            if not data_path(p).is_file():
                raise ConfigError(f"embed_text.file.{what}: {data_path(p)} does not exist")
        return f"embeddings=sha256:{file_sha256(data_path(f.embeddings))};class_names=sha256:{file_sha256(data_path(f.class_names))}"
