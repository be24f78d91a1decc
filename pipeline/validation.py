"""Validation errors as a user reads them: a pydantic ``ValidationError`` of a config section as
lines naming ``section.key`` (union tags left out), an unknown key with the nearest valid one and
the keys valid there, an unknown union tag (e.g. a method) with the nearest valid tag.
(``pipeline.config.validate_section`` raises them as ``ConfigError``.)
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError


def explain(err: ValidationError, schema: Any, section: str, path: Path | str) -> str:
    """A pydantic ``ValidationError`` as lines naming ``section.key`` and the nearest valid key."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        dotted = ".".join(str(x) for x in (section, *_user_loc(schema, loc)))
        if e["type"] == "extra_forbidden":
            valid = fields_at(schema, loc[:-1])
            near = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            parent = dotted.rsplit(".", 1)[0]
            hint = f"; did you mean {parent}.{near[0]}?" if near else ""
            lines.append(f"unknown key {dotted!r}{hint} (valid keys here: {', '.join(valid)})")
        elif e["type"] in ("union_tag_invalid", "union_tag_not_found"):
            ctx = e.get("ctx") or {}
            key = str(ctx.get("discriminator", "")).strip("'") or "method"
            tags = re.findall(r"'([^']+)'", str(ctx.get("expected_tags", ""))) or _tags(schema, key)
            got = str(ctx.get("tag", ""))
            near = difflib.get_close_matches(got, tags, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            if e["type"] == "union_tag_not_found":
                lines.append(f"{dotted}.{key} is required (one of: {', '.join(tags) or '?'})")
            else:
                lines.append(f"{dotted}.{key}: unknown value {got!r}{hint} (one of: {', '.join(tags)})")
        else:
            lines.append(f"{dotted}: {e['msg']} (got {e.get('input')!r})")
    return f"{path}: invalid config:\n  " + "\n  ".join(lines)


def _union_members(ann: Any) -> list[type[BaseModel]]:
    """The pydantic models in an annotation (itself, the members of a union, ``Annotated``'s type)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    out: list[type[BaseModel]] = []
    for a in typing.get_args(ann):
        out += _union_members(a)
    return out


def _tags(schema: Any, discriminator: str) -> list[str]:
    """The values of a discriminated union's tag field, member by member."""
    out = []
    for m in _union_members(schema):
        f = m.model_fields.get(discriminator)
        if f is not None and typing.get_origin(f.annotation) is typing.Literal:
            out += [str(a) for a in typing.get_args(f.annotation)]
    return out


def _tag_member(schema: Any, tag: Any) -> type[BaseModel] | None:
    """The member of a discriminated union whose ``method``-like literal equals ``tag``."""
    for m in _union_members(schema):
        for f in m.model_fields.values():
            if typing.get_origin(f.annotation) is typing.Literal and tag in typing.get_args(f.annotation):
                return m
    return None


def _walk(schema: Any, loc: tuple) -> tuple[Any, tuple]:
    """Follow a pydantic error location through ``schema``: the type reached (None if unknown),
    and ``loc`` without the union tags pydantic inserts (``('zegclip', 'model', 'x')`` ->
    ``('model', 'x')`` for a union discriminated on ``method``)."""
    out, cur = [], schema
    for part in loc:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            member = _tag_member(cur, part) if isinstance(part, str) else None
            if member is not None:
                cur = member
                continue
        out.append(part)
        cur = _descend(cur, part)
    return cur, tuple(out)


def _user_loc(schema: Any, loc: tuple) -> tuple:
    """``loc`` as the user wrote it: without union tags (:func:`_walk`)."""
    return _walk(schema, loc)[1]


def _descend(cur: Any, part: Any) -> Any:
    if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
        return cur
    f = cur.model_fields.get(part)
    if f is None:
        return None
    members = _union_members(f.annotation)
    return members[0] if len(members) == 1 else (f.annotation if members else None)


def fields_at(schema: Any, loc: tuple) -> list[str]:
    """Field names of the (nested) model reached by ``loc`` (union tags resolved); [] if unknown."""
    cur = _walk(schema, loc)[0]
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    members = _union_members(cur) if cur is not None else []
    return list(members[0].model_fields) if len(members) == 1 else []


__all__ = ["explain", "fields_at"]
