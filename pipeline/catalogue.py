"""The project's stage catalogue, loaded by name: what ``pipeline`` knows of the stages.

``pipeline`` imports no stage and knows no science: the catalogue module named by
:data:`STAGES_ENTRY` (``module:attribute``, default ``stages.catalog:STAGES``) lists the stage
classes, and may declare ``CODE_PACKAGES`` (the packages followed for code dependencies,
:mod:`pipeline.codehash`), ``HEADLINE`` (the params every MLflow run of an invocation carries,
:mod:`pipeline.tracking.headline`), ``REPORT`` (what ``zeroseg compare`` compares,
:class:`pipeline.compare.Report`) and ``SWEEP_DEFAULTS`` (:class:`SweepDefaults`). Everything else
the orchestration needs to know about what the stages compute is declared there too and read
through :class:`Catalogue`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

#: Where the stage list lives: ``module:attribute`` (a list of ``pipeline.dag.Stage`` classes).
STAGES_ENTRY = "stages.catalog:STAGES"

#: Packages followed for code dependencies when a catalogue declares none: the science, the
#: stages and the parts of ``pipeline`` that determine outputs.
DEFAULT_CODE_PACKAGES = ("zeroseg", "stages", "pipeline.training", "pipeline.inference", "pipeline.raycompat")


def no_headline(hashed: Mapping[str, Any]) -> dict[str, str]:
    """The headline of a catalogue that declares none: no params."""
    return {}


@dataclasses.dataclass(frozen=True)
class SweepDefaults:
    """What a sweep file (:mod:`pipeline.sweep`) that does not say uses; a catalogue declares
    them as ``SWEEP_DEFAULTS`` (a mapping of these fields). Neutral by default: a sweep file then
    names its metric, and its seed key when it has seeds.

    Attributes:
        metric: the metric trials are ranked on, a template with ``{eval_set}`` filled in from
            the sweep file's ``eval_set`` (e.g. ``"evaluate/{eval_set}/score"``); None: none.
        mode: ``"max"`` or ``"min"``: whether a larger metric is better.
        eval_set: the ``eval_set`` of a sweep file that names none; None: none.
        seed_key: the config key a sweep's ``seeds`` set; None: none.
    """

    metric: str | None = None
    mode: str = "max"
    eval_set: str | None = None
    seed_key: str | None = None


@dataclasses.dataclass
class Catalogue:
    """The project's stages and the packages followed for their code dependencies.

    Attributes:
        stages: the stage classes, in their natural order (ties of the topological order).
        code_packages: packages whose imports count as a stage's code dependencies.
        headline: ``{stage: hashed config} -> {param: value}``: the params every MLflow run of
            an invocation carries (``pipeline.tracking.headline_params``); its ``names``, if
            any, are the params ``zeroseg compare`` always shows. Default: none.
        report: what ``zeroseg compare`` compares (a :class:`pipeline.compare.Report`), or None
            (nothing to compare).
        sweep_defaults: what a sweep file that does not say uses (``SWEEP_DEFAULTS``).
    """

    stages: list[Any]
    code_packages: tuple[str, ...] = DEFAULT_CODE_PACKAGES
    headline: Any = no_headline
    report: Any = None
    sweep_defaults: SweepDefaults = SweepDefaults()


def load_catalogue(entry: str = STAGES_ENTRY) -> Catalogue:
    """Import the stage catalogue named by ``entry`` (``module:attribute``).

    Raises:
        ModuleNotFoundError / AttributeError: the entry names no module or attribute.
    """
    mod_name, _, attr = entry.partition(":")
    mod = importlib.import_module(mod_name)
    return Catalogue(
        list(getattr(mod, attr)),
        tuple(getattr(mod, "CODE_PACKAGES", DEFAULT_CODE_PACKAGES)),
        headline=getattr(mod, "HEADLINE", no_headline),
        report=getattr(mod, "REPORT", None),
        sweep_defaults=SweepDefaults(**getattr(mod, "SWEEP_DEFAULTS", {})),
    )


__all__ = ["DEFAULT_CODE_PACKAGES", "STAGES_ENTRY", "Catalogue", "SweepDefaults", "load_catalogue", "no_headline"]
