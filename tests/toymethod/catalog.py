"""The toy method's catalogue: the project's stages plus ``toy_fit``, its headline and report."""

from __future__ import annotations

from pipeline.catalogue import Catalogue
from stages import catalog as project
from toymethod.stage import ToyFit

#: Before evaluate, so the natural order keeps the segmenter's producer ahead of its reader.
STAGES = [*project.STAGES[:-1], ToyFit, project.STAGES[-1]]
CODE_PACKAGES = (*project.CODE_PACKAGES, "toymethod")
#: The evaluated model is the toy method's when toy_fit is planned.
HEADLINE = project.HEADLINE.with_method("toy_fit", lambda _method: "toy")
REPORT = project.REPORT

#: The same, as ``pipeline.catalogue.load_catalogue("toymethod.catalog:STAGES")`` reads it.
CATALOG = Catalogue(STAGES, CODE_PACKAGES, headline=HEADLINE, report=REPORT)
