"""Stage ``train_classifier``: the segmentation model of a method, written as a *segmenter
artifact* (``segmenter.json`` + ``weights.pt`` when something trains; ``zeroseg.models``).

The section is the config of one method of ``stages.methods`` (a discriminated union on
``method``: an unknown method or key fails at plan time naming the nearest). The stage reads
build_splits (``splits``) and embed_text (``text``), plus whatever the method adds (a decoupled
method's ``proposals``), less the base roles the method never reads (``Method.drops``: DeOP, which
embeds class names itself, drops ``text``), and hands them to the method's ``build``.

Wiring only; the methods live in ``stages/methods/``, the models in ``zeroseg.models``.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Union

from pydantic import Field

from pipeline.dag import Input, Stage, StageContext
from stages.common import random_weights_notice
from stages.methods import Method, methods


@functools.lru_cache(maxsize=1)
def config_schema() -> Any:
    """The section's schema: the discriminated union (on ``method``) of every method's config."""
    members = tuple(m.Config for m in methods().values())
    return Annotated[Union[members], Field(discriminator="method")] if len(members) > 1 else members[0]


class TrainClassifier(Stage):
    """The segmenter of ``method`` (see module docstring)."""

    name = "train_classifier"
    INPUTS = {
        "splits": Input(("build_splits",), doc="manifests and classes.json"),
        "text": Input(("embed_text",), doc="class text embeddings"),
    }
    shared = ("clip",)

    @property
    def Config(self) -> Any:  # noqa: N802 - the stage contract's attribute
        return config_schema()

    @staticmethod
    def method(config: Any) -> Method:
        return methods()[config.method]

    def inputs(self, config: Any) -> dict[str, Input]:
        """build_splits and embed_text, less the method's ``drops``, plus the method's own roles."""
        m = self.method(config)
        return {r: i for r, i in {**self.INPUTS, **m.inputs}.items() if r not in m.drops}

    def all_roles(self) -> set[str]:
        return set(self.INPUTS).union(*(m.inputs for m in methods().values()))

    def code(self, config: Any) -> list[str]:
        m = self.method(config)
        return [__name__, m.module, m.job_module, *m.code]

    def facts(self, config: Any) -> dict[str, Any]:
        """``{"method": name}``: what a stage warm-started from this artifact may check at plan time."""
        return {"method": config.method}

    def notices(self, config: Any) -> list[str]:
        return random_weights_notice(config.clip)

    def run(self, ctx: StageContext) -> dict[str, float]:
        return self.method(ctx.config).build(ctx, ctx.config)


__all__ = ["TrainClassifier", "config_schema"]
