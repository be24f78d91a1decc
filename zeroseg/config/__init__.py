"""Torch-free configuration schemas of the science: the CLIP spec and each method's model
hyperparameters, as pydantic models.

Everything here imports neither torch nor Ray nor open_clip, so that a pipeline can validate a
config and compute artifact keys without loading a deep-learning stack (``zeroseg run
--dry-run`` and a fully cached run import neither). The models in ``zeroseg.models`` take these
configs (or their ``model_dump()``) and build the networks.

Adding a method adds a module here (its model hyperparameters), one in ``zeroseg.models`` (the
network) and one in ``stages.methods`` (how it is trained); nothing is edited.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, ValidationError

from zeroseg.errors import ConfigError

#: ``(height, width)`` in pixels, both positive (a single int means a square).
Size = tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]

M = TypeVar("M", bound=BaseModel)


def square(v: Any) -> Any:
    """``512`` -> ``(512, 512)`` (a ``mode="before"`` validator for :data:`Size` fields)."""
    return (v, v) if isinstance(v, int) and not isinstance(v, bool) else v


def validated(model: type[M], data: Any, where: str) -> M:
    """``model.model_validate(data)`` with errors as one :class:`ConfigError` naming each key
    (``<where>.<key>``) and, for an unknown key, the nearest valid one. What the models in
    ``zeroseg.models`` use when built from a dict (a segmenter artifact, a notebook).

    Raises:
        ConfigError: the data does not validate.
    """
    if isinstance(data, model):
        return data
    try:
        return model.model_validate(dict(data or {}))
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                near = difflib.get_close_matches(loc, list(model.model_fields), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {sorted(model.model_fields)}"
                lines.append(f"unknown {where} key {loc!r}{hint}")
            else:
                msg = str(err["msg"]).removeprefix("Value error, ")
                own = msg.startswith((f"{where}.", "model.", "MaskCLIP model."))  # a validator's own message
                lines.append(msg if own else f"{where}.{loc}: {msg} (got {err.get('input')!r})")
        raise ConfigError("; ".join(lines)) from None
