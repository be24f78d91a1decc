"""Class vocabularies and seen/unseen splits for zero-shot segmentation.

A *vocabulary* is a dataset's class names in label-id order (id ``i`` = ``names[i]``, 255 =
ignore; a vocabulary of more than 255 classes uses 16-bit labels with 65535 = ignore, see
:func:`label_ignore_index`). A *split* partitions a training vocabulary into *seen* classes
(their pixels supervise training) and *unseen* classes (never present in an inductive training target; evaluated as the
zero-shot part of GZS3). Evaluation vocabularies (the held-out ``val`` part of the training
dataset, or another dataset for cross-dataset evaluation) are resolved against the training
split through their *prompt names* (:func:`eval_vocabulary`).

Built-in splits (``BUILTIN_SPLITS``): the published benchmark class lists and their unseen
classes are in ``zeroseg.data.builtin_splits`` (data only).

Nothing here imports Ray or the pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from zeroseg.data.builtin_splits import BUILTIN_SPLITS
from zeroseg.errors import ConfigError

IGNORE_INDEX = 255
#: Ignore value of 16-bit label maps (vocabularies of more than 255 classes); detectron2's
#: ADE20k-Full labels use 65535 too (``register_ade20k_full``: ``ignore_label=65535``).
IGNORE_INDEX_16 = 65535
#: The most classes a uint8 label map can hold (0..254; 255 is ignore).
MAX_CLASSES_8BIT = 255
#: The most classes a uint16 label map can hold (0..65534; 65535 is ignore).
MAX_CLASSES = 65535


def label_ignore_index(num_classes: int) -> int:
    """The ignore value of a vocabulary's label maps: 255 (uint8 labels) for at most 255 classes,
    else 65535 (uint16 labels).

    Raises:
        ValueError: more than 65535 classes.
    """
    if num_classes > MAX_CLASSES:
        raise ValueError(f"{num_classes} classes; uint16 labels hold at most {MAX_CLASSES}")
    return IGNORE_INDEX if num_classes <= MAX_CLASSES_8BIT else IGNORE_INDEX_16


def label_dtype_name(num_classes: int) -> str:
    """``"uint8"`` for at most 255 classes, else ``"uint16"`` (the dtype of the label maps and
    PNGs of a vocabulary with ``num_classes`` classes; :func:`label_ignore_index` is its ignore)."""
    return "uint8" if label_ignore_index(num_classes) == IGNORE_INDEX else "uint16"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """One dataset's classes and their zero-shot role (``classes.json`` entry).

    Attributes:
        dataset: the dataset name (``train.name`` or an eval entry's ``name``).
        names: class names in label-id order; label id ``i`` means ``names[i]``.
        prompt_names: the names given to the text encoder, same order as ``names`` (a
            ``class_map`` target for cross-dataset evaluation, else the name itself).
        seen: sorted ids of seen classes.
        unseen: sorted ids of unseen classes (disjoint from ``seen``).
        ignore_index: the ignore label value in label PNGs: 255 (uint8 PNGs) for at most 255
            classes, 65535 (16-bit PNGs) for more (:func:`label_ignore_index`).
    """

    dataset: str
    names: tuple[str, ...]
    prompt_names: tuple[str, ...]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        n = len(self.names)
        if len(self.prompt_names) != n:
            raise ValueError(f"{self.dataset}: {len(self.prompt_names)} prompt names for {n} classes")
        if set(self.seen) & set(self.unseen):
            raise ValueError(
                f"{self.dataset}: classes both seen and unseen: {sorted(set(self.seen) & set(self.unseen))}"
            )
        bad = [i for i in (*self.seen, *self.unseen) if not 0 <= i < n]
        if bad:
            raise ValueError(f"{self.dataset}: class ids {bad} outside [0, {n})")

    @property
    def seen_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.seen)

    @property
    def unseen_names(self) -> tuple[str, ...]:
        return tuple(self.names[i] for i in self.unseen)

    def to_json(self) -> dict[str, Any]:
        """The ``classes.json`` form (docs/architecture.md)."""
        return {
            "dataset": self.dataset,
            "names": list(self.names),
            "prompt_names": list(self.prompt_names),
            "seen": list(self.seen),
            "unseen": list(self.unseen),
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Vocabulary:
        """Inverse of :meth:`to_json`."""
        return cls(
            dataset=d["dataset"],
            names=tuple(d["names"]),
            prompt_names=tuple(d["prompt_names"]),
            seen=tuple(int(i) for i in d["seen"]),
            unseen=tuple(int(i) for i in d["unseen"]),
            ignore_index=int(d.get("ignore_index", IGNORE_INDEX)),
        )


def nearest_names(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates closest to ``name`` (difflib ratio >= 0.5, then case-insensitive
    substring matches)."""
    cands = list(candidates)
    near = difflib.get_close_matches(name, cands, n=n, cutoff=0.5)
    if len(near) < n:
        low = name.lower().replace(" ", "").replace("-", "")
        for c in cands:
            cl = c.lower().replace(" ", "").replace("-", "")
            if c not in near and (low in cl or cl in low):
                near.append(c)
            if len(near) >= n:
                break
    return near


def _unknown(kind: str, name: str, dataset: str, names: Sequence[str]) -> ConfigError:
    near = nearest_names(name, names)
    hint = f"; nearest: {', '.join(repr(x) for x in near)}" if near else ""
    return ConfigError(
        f"{kind} {name!r} is not a class of dataset {dataset!r}{hint} "
        f"({len(names)} classes: {', '.join(names[:12])}{', ...' if len(names) > 12 else ''})"
    )


def _ids(kind: str, wanted: Sequence[str], dataset: str, names: Sequence[str]) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for w in wanted:
        if w not in index:
            raise _unknown(kind, w, dataset, names)
        out.append(index[w])
    dup = sorted({w for w in wanted if list(wanted).count(w) > 1})
    if dup:
        raise ConfigError(f"{kind} list names {dup} more than once")
    return sorted(out)


def resolve_split(
    names: Sequence[str],
    *,
    dataset: str,
    builtin: str | None = None,
    unseen: Sequence[str] | None = None,
    seen: Sequence[str] | None = None,
) -> Vocabulary:
    """The training vocabulary of ``dataset`` with its seen/unseen split.

    Exactly one way of giving the split:

    * ``builtin``: a key of ``BUILTIN_SPLITS``; the dataset must have every class of the
      benchmark; its unseen classes are unseen, every other class of the dataset is seen;
    * ``unseen`` (and optionally ``seen``): class names; default ``seen`` = all other classes.
      When both are given they must cover every class (a class in neither would have no role);
    * ``seen`` only: ``unseen`` = all other classes.

    ``unseen: []`` is a fully supervised split (every class seen).

    Args:
        names: the dataset's class names in label-id order.
        dataset: the dataset name, for messages.

    Returns:
        a :class:`Vocabulary` with ``prompt_names == names``.

    Raises:
        ConfigError: an unknown class name (naming the class, the dataset and the nearest names),
            an unknown builtin split, a builtin split whose classes the dataset lacks, a class both
            seen and unseen, classes in neither list, duplicate or more than 65535 names.

    Warns:
        UserWarning: a builtin split on a dataset with classes outside the benchmark's (naming
            them; they are counted as seen).
    """
    names = tuple(names)
    if len(names) > MAX_CLASSES:
        raise ConfigError(
            f"dataset {dataset!r} has {len(names)} classes; label PNGs are at most 16-bit with 65535 = "
            f"ignore, so at most {MAX_CLASSES} classes are supported"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"dataset {dataset!r} lists class name(s) {dup} more than once; names must be unique")
    if builtin is not None:
        if unseen is not None or seen is not None:
            raise ConfigError("split: give either builtin or unseen/seen, not both")
        if builtin not in BUILTIN_SPLITS:
            near = difflib.get_close_matches(builtin, list(BUILTIN_SPLITS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(
                f"split.builtin {builtin!r} is unknown{hint} (builtin splits: {', '.join(BUILTIN_SPLITS)})"
            )
        b = BUILTIN_SPLITS[builtin]
        missing = [n for n in b.names if n not in names]
        if missing:
            hints = "; ".join(f"{m!r} (nearest: {', '.join(nearest_names(m, names)) or 'none'})" for m in missing[:5])
            raise ConfigError(
                f"split.builtin {builtin!r} needs all {len(b.names)} classes of its benchmark, but dataset "
                f"{dataset!r} lacks {len(missing)}: {hints}{' ...' if len(missing) > 5 else ''}. Use a dataset with "
                f"that vocabulary, or give split.unseen explicitly"
            )
        unseen_ids = _ids("unseen class", b.unseen, dataset, names)
        seen_ids = [i for i in range(len(names)) if i not in unseen_ids]
        extra = [n for n in names if n not in b.names]
        if extra:  # allowed (e.g. VOC with background), but the run is no longer the benchmark's
            warnings.warn(
                f"split.builtin {builtin!r}: dataset {dataset!r} has {len(extra)} class(es) outside the "
                f"benchmark's {len(b.names)}, counted as seen: {extra[:10]}{' ...' if len(extra) > 10 else ''}. "
                "Metrics are then not comparable with the benchmark's; drop them (ignore, "
                "reduce_zero_label) or give split.unseen explicitly",
                UserWarning,
                stacklevel=2,
            )
    elif unseen is None and seen is None:
        raise ConfigError(
            f"split: give builtin ({', '.join(BUILTIN_SPLITS)}) or a list of unseen class names "
            "(unseen: [] for a fully supervised run)"
        )
    else:
        unseen_ids = _ids("unseen class", unseen, dataset, names) if unseen is not None else None
        seen_ids = _ids("seen class", seen, dataset, names) if seen is not None else None
        if unseen_ids is None:
            unseen_ids = [i for i in range(len(names)) if i not in seen_ids]
        if seen_ids is None:
            seen_ids = [i for i in range(len(names)) if i not in unseen_ids]
        both = sorted(set(seen_ids) & set(unseen_ids))
        if both:
            raise ConfigError(f"split: class(es) {[names[i] for i in both]} are both seen and unseen")
        neither = [i for i in range(len(names)) if i not in seen_ids and i not in unseen_ids]
        if neither:
            raise ConfigError(
                f"split: class(es) {[names[i] for i in neither]} of dataset {dataset!r} are neither "
                "seen nor unseen; list them in one of split.seen / split.unseen (or omit split.seen)"
            )
    return Vocabulary(
        dataset=dataset,
        names=names,
        prompt_names=names,
        seen=tuple(sorted(seen_ids)),
        unseen=tuple(sorted(unseen_ids)),
        ignore_index=label_ignore_index(len(names)),
    )


def eval_vocabulary(
    names: Sequence[str],
    *,
    dataset: str,
    train: Vocabulary,
    class_map: Mapping[str, str] | None = None,
) -> Vocabulary:
    """An evaluation dataset's vocabulary, resolved against the training split.

    ``prompt_names[i] = class_map.get(names[i], names[i])``; class ``i`` is *seen* exactly when
    ``prompt_names[i]`` is a seen training class name, otherwise *unseen* (this includes classes
    the training vocabulary does not have at all, e.g. CamVid "sky" against COCO things).

    Args:
        names: the eval dataset's class names in label-id order.
        dataset: the eval set's name, for messages.
        train: the training vocabulary (:func:`resolve_split`).
        class_map: ``{eval_name: train_vocab_name}`` for cross-dataset evaluation.

    Raises:
        ConfigError: a ``class_map`` key that is not a class of the eval dataset, or a value that
            is not a class of the training vocabulary (each naming the nearest names); more than
            65535 or duplicate names.
    """
    names = tuple(names)
    class_map = dict(class_map or {})
    if len(names) > MAX_CLASSES:
        raise ConfigError(
            f"dataset {dataset!r} has {len(names)} classes; at most {MAX_CLASSES} are supported (16-bit labels)"
        )
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"dataset {dataset!r} lists class name(s) {dup} more than once; names must be unique")
    for k, v in class_map.items():
        if k not in names:
            raise _unknown(f"class_map key (eval dataset {dataset!r} class)", k, dataset, names)
        if v not in train.names:
            near = nearest_names(v, train.names)
            hint = f"; nearest: {', '.join(repr(x) for x in near)}" if near else ""
            raise ConfigError(f"class_map {k!r}: {v!r} is not a class of the training dataset {train.dataset!r}{hint}")
    prompts = tuple(class_map.get(n, n) for n in names)
    seen_train = set(train.seen_names)
    seen = tuple(i for i, p in enumerate(prompts) if p in seen_train)
    unseen = tuple(i for i, p in enumerate(prompts) if p not in seen_train)
    return Vocabulary(
        dataset=dataset,
        names=names,
        prompt_names=prompts,
        seen=seen,
        unseen=unseen,
        ignore_index=label_ignore_index(len(names)),
    )
