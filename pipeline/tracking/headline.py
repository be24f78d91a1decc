"""The headline params every run of an invocation carries, as the stage catalogue declares them.

``pipeline`` does not know what a run's headline is (which method, which backbone, which data):
the catalogue declares it (``HEADLINE`` of the catalogue module, :attr:`pipeline.catalogue.
Catalogue.headline`), a callable from the stages' hashed configs to flat params. Here it is
applied and its values made MLflow params (strings, clipped to MLflow's length limit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from pipeline.tracking.runs import _clip

#: A headline declaration: ``{stage: hashed config}`` -> ``{param: value}``; it may carry
#: ``names`` (the params it can give, which ``zeroseg compare`` always shows).
HeadlineFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def headline_params(hashed: Mapping[str, Any], headline: HeadlineFn | None = None) -> dict[str, str]:
    """The invocation's headline as flat MLflow params.

    Args:
        hashed: ``{stage: hashed config}`` (a plan's ``components["config"]`` per node).
        headline: the catalogue's declaration (:attr:`pipeline.catalogue.Catalogue.headline`);
            None: the project catalogue's (:func:`pipeline.catalogue.load_catalogue`).

    Returns:
        ``{param: value as a string}`` (clipped to MLflow's param length).
    """
    if headline is None:
        from pipeline.catalogue import load_catalogue

        headline = load_catalogue().headline
    return {k: _clip(v) for k, v in headline(hashed).items()}


def headline_names(headline: Any) -> tuple[str, ...]:
    """The params a headline declaration can give (its ``names``; none declared: ``()``)."""
    return tuple(getattr(headline, "names", ()))


__all__ = ["HeadlineFn", "headline_names", "headline_params"]
