"""Seen/unseen split rules beyond a list of names: the frequency rule (ZegFormer's ADE20k-Full
benchmark: seen = classes present in more than ``min_images`` training images) and seen-class
validation (ZegFormer Sec. 4.1, SPNet's cross-validation: pseudo-unseen seen classes, the
benchmark's unseen classes excluded), with the ``split`` / ``pseudo_unseen`` records of
``classes.json`` / ``stats.json``.

The named rule (``builtin`` / ``unseen`` / ``seen``) is ``zeroseg.data.classes.resolve_split``;
how the rules enter the build_splits pass is in the ``zeroseg.data.splits`` module docstring.
Nothing here imports Ray or the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from zeroseg.data.classes import Vocabulary, label_ignore_index, nearest_names, resolve_split
from zeroseg.data.splits import split_unit
from zeroseg.errors import ConfigError


# -- the frequency rule ----------------------------------------------------------------------
def images_per_class(results: Iterable[Mapping[str, Any]], num_classes: int) -> tuple[list[int], int]:
    """How many images each class is present in.

    Args:
        results: :func:`process_record` results; skipped (unreadable) images are not counted.
        num_classes: the vocabulary size C.

    Returns:
        ``(counts, images)``: ``counts[c]`` = number of counted images whose ``classes`` hold
        ``c`` (an image counts once per class, whatever its pixel count), ``images`` = number
        of counted images.
    """
    counts = [0] * int(num_classes)
    images = 0
    for r in results:
        if r["status"] == "skipped":
            continue
        images += 1
        for c in set(r["classes"]):
            counts[int(c)] += 1
    return counts, images


def frequency_split(
    names: Sequence[str],
    counts: Sequence[int],
    *,
    min_images: int,
    dataset: str,
    images: int,
    key: str = "build_splits.split.min_images",
) -> Vocabulary:
    """The seen/unseen split by class frequency: ZegFormer's ADE20k-Full benchmark.

    A class is *seen* when it is present in more than ``min_images`` training images
    (``counts[c] > min_images``), else *unseen* (absent classes included).

    Source: ZegFormer Sec. 4.1 ("The seen classes are present in more than 10 images, while the
    unseen classes are present in less than 10 images", 572 seen / 275 unseen of ADE20k-Full's 847).
    The paper leaves a class in exactly 10 images unassigned; the released code
    (dingjiansw101/ZegFormer, datasets/ade20k-full-frequency-split/prepare_ade20k_full_frequency_seen.py)
    takes as unseen the classes whose LVIS-style ``frequency`` tag is ``rare`` (1-10 images) and
    as seen the others (more than 10): ``counts > min_images`` is that rule.

    Args:
        names: the training vocabulary in label-id order.
        counts: ``counts[c]`` = training images class ``c`` is present in (:func:`images_per_class`).
        min_images: the threshold (ZegFormer: 10).
        dataset: the dataset name, for messages.
        images: how many images were counted, for messages.
        key: the config key named by the errors.

    Returns:
        a :class:`Vocabulary` (``zeroseg.data.classes.resolve_split`` with the derived unseen list).

    Raises:
        ConfigError: no class or every class is present in more than ``min_images`` images (no
            seen / no unseen class: naming ``key``, the counts and the value that would split);
            ``counts`` not one per class; names as :func:`zeroseg.data.classes.resolve_split`.
    """
    if len(counts) != len(names):
        raise ConfigError(f"dataset {dataset!r}: {len(counts)} class counts for {len(names)} classes")
    seen = [i for i, c in enumerate(counts) if c > min_images]
    unseen = [i for i, c in enumerate(counts) if c <= min_images]
    top = max(counts, default=0)
    if not seen:
        raise ConfigError(
            f"{key} = {min_images}: no class of dataset {dataset!r} is present in more than {min_images} of "
            f"its {images} training images (the most frequent class is in {top}), so no class would be "
            f"seen; set {key} below {top}"
        )
    if not unseen:
        low = min(counts)
        raise ConfigError(
            f"{key} = {min_images}: every class of dataset {dataset!r} is present in more than {min_images} of "
            f"its {images} training images (the rarest class is in {low}), so no class would be unseen; "
            f"set {key} to at least {low}"
        )
    return resolve_split(names, dataset=dataset, unseen=[names[i] for i in unseen])


def frequency_record(vocab: Vocabulary, counts: Sequence[int], *, min_images: int, images: int) -> dict[str, Any]:
    """The ``split`` entry of ``classes.json`` / ``stats.json`` for the frequency rule:
    ``{"rule": "frequency", "min_images", "counted_images", "counted": what was counted,
    "images_per_class": {name: images}}`` (names in label-id order)."""
    return {
        "rule": "frequency",
        "min_images": int(min_images),
        "counted_images": int(images),
        "counted": "training images (held-out val excluded, skipped images excluded) whose label holds at "
        "least one pixel of the class, before the unseen-pixel policy",
        "images_per_class": {n: int(c) for n, c in zip(vocab.names, counts)},
    }


# -- seen-class validation -------------------------------------------------------------------
#: What a seen-class validation run is, for ``classes.json`` / ``stats.json`` and messages.
PSEUDO_UNSEEN_PROTOCOL = (
    "seen-class validation (ZegFormer Sec. 4.1, SPNet's cross-validation): pseudo-unseen seen classes play "
    "unseen; the benchmark's unseen classes are excluded (not in any vocabulary, their pixels ignore); not the "
    "benchmark's test protocol"
)


def draw_pseudo_unseen(names: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` of ``names`` drawn deterministically: those with the smallest
    :func:`split_unit` ``(name, seed)`` (a hash of the class name and the seed), in ``names`` order.

    Depends only on the names, ``count`` and ``seed``, not on their order or the rest of the vocabulary.
    """
    drawn = set(sorted(names, key=lambda n: (split_unit(n, seed), n))[: int(count)])
    return [n for n in names if n in drawn]


def pseudo_unseen_split(
    train: Vocabulary,
    *,
    pseudo_unseen: Sequence[str] | None = None,
    count: int | None = None,
    seed: int = 0,
    key: str = "build_splits.split",
) -> tuple[Vocabulary, tuple[int, ...]]:
    """The vocabulary of a seen-class validation run of the benchmark split ``train``.

    ZegFormer Sec. 4.1 tunes its hyperparameters on "a subset of the training classes as a
    validation set, following the cross-validation procedure" of SPNet (Xian et al., CVPR 2019,
    whose released split holds out 12 of the seen COCO-Stuff classes and 2000 training images;
    ``zeroseg.data.builtin_splits.COCO_STUFF_SPNET_VAL``): some seen classes play unseen, and the real
    unseen classes are never looked at. Here:

    * the *pseudo-unseen* classes are the seen classes named in ``pseudo_unseen``, or ``count``
      seen classes drawn with :func:`draw_pseudo_unseen` (``seed``: ``build_splits.seed``);
    * the benchmark's unseen classes are *excluded*: the returned vocabulary is ``train``'s
      without them (the other classes in their order, ids renumbered; labels are rewritten by
      :func:`exclude_classes`), so no stage sees their names or their pixels;
    * seen = the other seen classes, unseen = the pseudo-unseen ones.

    Args:
        train: the benchmark's training vocabulary (``resolve_split`` / ``frequency_split``).
        pseudo_unseen: seen class names; or ``count``: how many to draw (exactly one of both).
        seed: the draw's seed.
        key: the config key named by the errors.

    Returns:
        ``(vocabulary, excluded)``: the run's training vocabulary (``ignore_index`` by its size) and
        the excluded class ids of ``train`` (its unseen ids).

    Raises:
        ConfigError: naming ``key``: an unknown or repeated name (with the nearest names), a name
            that is an unseen class of the benchmark split, every seen class pseudo-unseen (or
            ``count`` not below the number of seen classes), both or neither of the two ways.
    """
    if (pseudo_unseen is None) == (count is None):
        raise ConfigError(f"{key}: give either pseudo_unseen (class names) or pseudo_unseen_count, exactly one")
    seen_names = train.seen_names
    if pseudo_unseen is not None:
        index = {n: i for i, n in enumerate(train.names)}
        for n in pseudo_unseen:
            if n not in index:
                near = nearest_names(n, train.names)
                hint = f"; nearest: {', '.join(repr(x) for x in near)}" if near else ""
                raise ConfigError(
                    f"{key}.pseudo_unseen: {n!r} is not a class of dataset {train.dataset!r}{hint}; name seen classes "
                    "of its vocabulary"
                )
        dup = sorted({n for n in pseudo_unseen if list(pseudo_unseen).count(n) > 1})
        if dup:
            raise ConfigError(f"{key}.pseudo_unseen names {dup} more than once; list each class once")
        real = [n for n in pseudo_unseen if index[n] in set(train.unseen)]
        if real:
            raise ConfigError(
                f"{key}.pseudo_unseen: {real} {'is an unseen class' if len(real) == 1 else 'are unseen classes'} of "
                f"the benchmark split of {train.dataset!r}; a seen-class validation never looks at the unseen "
                "classes (they are excluded from the run), so pseudo-unseen classes must be seen ones: remove "
                f"{'it' if len(real) == 1 else 'them'} (seen classes: {', '.join(seen_names[:8])}"
                f"{', ...' if len(seen_names) > 8 else ''})"
            )
        if len(set(pseudo_unseen)) >= len(seen_names):
            raise ConfigError(
                f"{key}.pseudo_unseen names all {len(seen_names)} seen classes of {train.dataset!r}: no class would "
                "be left to train on; leave at least one seen class out of the list"
            )
        chosen = set(pseudo_unseen)
    else:
        if int(count) >= len(seen_names):
            raise ConfigError(
                f"{key}.pseudo_unseen_count = {count}, but the benchmark split of {train.dataset!r} has "
                f"{len(seen_names)} seen classes: no class would be left to train on; set it below {len(seen_names)}"
            )
        chosen = set(draw_pseudo_unseen(seen_names, int(count), seed))
    excluded = tuple(train.unseen)
    keep = [i for i in range(len(train.names)) if i not in set(excluded)]
    names = tuple(train.names[i] for i in keep)
    vocab = Vocabulary(
        dataset=train.dataset,
        names=names,
        prompt_names=tuple(train.prompt_names[i] for i in keep),
        seen=tuple(k for k, i in enumerate(keep) if i in set(train.seen) and train.names[i] not in chosen),
        unseen=tuple(k for k, i in enumerate(keep) if train.names[i] in chosen),
        ignore_index=label_ignore_index(len(names)),
    )
    return vocab, excluded


def pseudo_unseen_record(vocab: Vocabulary, benchmark: Vocabulary, how: Mapping[str, Any]) -> dict[str, Any]:
    """The ``pseudo_unseen`` entry of ``classes.json`` / ``stats.json``: ``{"protocol", "how"
    (the config's pseudo_unseen / pseudo_unseen_count and seed), "pseudo_unseen": [names],
    "excluded": [the benchmark's unseen names], "benchmark_classes": n}``."""
    return {
        "protocol": PSEUDO_UNSEEN_PROTOCOL,
        "how": dict(how),
        "pseudo_unseen": list(vocab.unseen_names),
        "excluded": list(benchmark.unseen_names),
        "benchmark_classes": len(benchmark.names),
    }
