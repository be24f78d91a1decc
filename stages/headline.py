"""The headline of an invocation: the params every one of its MLflow runs carries, so MLflow's
compare view and ``zeroseg compare`` line a stage's metrics up with what produced them.

Declared here for the project's stages and exported by the catalogue (``stages.catalog.HEADLINE``,
read by ``pipeline.catalogue``); ``pipeline`` applies it to the stages' hashed configs
(``pipeline.tracking.headline_params``) without knowing what a method or a split is.

A method that brings its own stage (as PADing brings train_generator) names the method label that
stage's presence gives (:meth:`Headline.with_method`) in its own catalogue; nothing in
``pipeline`` changes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

#: ``(method named so far or None) -> the method label`` when a stage is planned.
MethodRule = Callable[[str | None], str | None]


class Headline:
    """``{stage: hashed config}`` -> ``{"method", "clip_model", "clip_weights", "split", "seed"}``
    (the entries the config has).

    * ``method``: from the first stage whose config names one; then the first stage of
      ``methods`` that is planned relabels it (the method of the model evaluate scores: a later
      training stage names it over train_classifier; a rule returning None leaves it unset);
    * ``clip_model`` (the architecture without its config digest) and ``clip_weights``: from the
      first stage that takes ``clip``;
    * ``split``: compact JSON of the set fields of the first ``split`` section (build_splits');
    * ``seed``: the one value when every ``seed`` / ``train.seed`` agrees, else ``stage.seed=v``
      pairs.

    Args:
        methods: ``{stage: rule}`` in priority order (the first planned stage's rule applies).
    """

    #: The params it can give (``zeroseg compare`` always shows them).
    names = ("method", "clip_model", "clip_weights", "split", "seed")

    def __init__(self, methods: Mapping[str, MethodRule] | None = None):
        self.methods: dict[str, MethodRule] = dict(methods or {})

    def with_method(self, stage: str, rule: MethodRule) -> Headline:
        """A copy whose first method rule is ``rule`` for ``stage`` (a method bringing its stage)."""
        return Headline({stage: rule, **{k: v for k, v in self.methods.items() if k != stage}})

    def __call__(self, hashed: Mapping[str, Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        seeds: dict[str, Any] = {}
        for stage, cfg in hashed.items():
            if not isinstance(cfg, Mapping):
                continue
            if "method" in cfg and "method" not in out:
                out["method"] = str(cfg["method"])
            clip = cfg.get("clip")
            if isinstance(clip, Mapping) and "clip_model" not in out and "model" in clip:
                out["clip_model"] = str(clip["model"]).split(";", 1)[0]
                out["clip_weights"] = str(clip.get("weights"))
            split = cfg.get("split")
            if isinstance(split, Mapping) and "split" not in out:
                out["split"] = json.dumps({k: v for k, v in split.items() if v is not None}, separators=(",", ":"))
            if "seed" in cfg:
                seeds[f"{stage}.seed"] = cfg["seed"]
            train = cfg.get("train")
            if isinstance(train, Mapping) and "seed" in train:
                seeds[f"{stage}.train.seed"] = train["seed"]
        for stage, rule in self.methods.items():
            if stage in hashed:
                method = rule(out.get("method"))
                if method is None:
                    out.pop("method", None)
                else:
                    out["method"] = method
                break
        if seeds:
            values = set(map(str, seeds.values()))
            out["seed"] = values.pop() if len(values) == 1 else ",".join(f"{k}={v}" for k, v in seeds.items())
        return out


def _self_trained(method: str | None) -> str | None:
    """ZegCLIP+ST: the inductive method, self-trained (unset stays unset)."""
    return None if method is None else f"{method}+st"


#: The project's headline: PADing's retrained head (train_generator) is the method ``pading``; a
#: self-trained model (self_train) is its inductive method + ``+st``.
HEADLINE = Headline({"train_generator": lambda _method: "pading", "self_train": _self_trained})

__all__ = ["HEADLINE", "Headline", "MethodRule"]
