"""The method registry: one module per segmentation method, found by listing this package.

A method module defines ``METHOD = Method(...)``: its name, its config (a pydantic model with
``method: Literal[<name>]``: train_classifier's section is the discriminated union of all
methods' configs, so an unknown method or key fails at plan time naming the nearest), the
job that builds or trains it (``"stages.jobs.methods.<m>:<function>"``, called as
``function(ctx, config) -> metrics``, writing a segmenter artifact), the input roles it adds (a decoupled method's proposals) and the modules whose code
determines its outputs. Adding a method adds a module here (plus its model in ``zeroseg.models``
and its hyperparameters in ``zeroseg.config``); nothing is edited.

Method modules are torch-free specs: they import neither torch nor Ray, nor their job (imported by
name when the method runs; the job may import its spec).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Any

from pipeline.dag import Input
from stages.common import run_job


@dataclasses.dataclass(frozen=True)
class Method:
    """A segmentation method.

    Attributes:
        name: the ``train_classifier.method`` value.
        Config: the section's schema (with ``method: Literal[name]``).
        job: ``"module:function"`` of the job that builds or trains it: ``function(ctx, config)
            -> metrics`` writes a segmenter artifact into ``ctx.output_dir``
            (``zeroseg.models.save_segmenter``); imported by name when it runs.
        inputs: input roles beyond build_splits and embed_text (e.g. ``proposals``).
        code: modules whose code determines the outputs besides the method's own module (e.g.
            modules it imports by name).
        drops: train_classifier's base roles (``splits``, ``text``) this method never reads: left
            out of its inputs, so they neither enter its artifact key nor bind (DeOP embeds class
            names itself with its learnable prompts: ``("text",)``, an embed_text change does not
            re-train it).
    """

    name: str
    Config: type[Any]
    job: str
    inputs: dict[str, Input] = dataclasses.field(default_factory=dict)
    code: tuple[str, ...] = ()
    drops: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The method's spec module (where its config is defined)."""
        return self.Config.__module__

    @property
    def job_module(self) -> str:
        """The module of :attr:`job` (a code dependency of train_classifier for this method)."""
        return self.job.partition(":")[0]

    def build(self, ctx: Any, config: Any) -> dict[str, float]:
        """Run the job: ``function(ctx, config) -> metrics`` (``stages.common.run_job``)."""
        return run_job(self.job, ctx, config)


@functools.lru_cache(maxsize=1)
def methods() -> dict[str, Method]:
    """``{name: Method}`` of every module in this package that defines ``METHOD``.

    Raises:
        ValueError: two modules register the same name.
    """
    out: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        m = getattr(mod, "METHOD", None)
        if m is None:
            continue
        if m.name in out:
            raise ValueError(f"method {m.name!r} is defined twice ({out[m.name].module} and {mod.__name__})")
        out[m.name] = m
    return out


__all__ = ["Method", "methods"]
