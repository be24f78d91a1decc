"""Stage ``build_splits``: dataset files -> manifests, label PNGs, classes.json, stats.json.

Wiring only: the readers, class splits and the per-image function live in ``zeroseg.data``.

1. list the training dataset and every eval dataset (driver: json / directory listing);
2. resolve the seen/unseen split of the training vocabulary and each eval vocabulary
   (``class_map`` for cross-dataset evaluation); with ``split.rule: frequency`` the split is
   counted on the training images first (an extra Ray Data pass, see :class:`SplitConfig`); with
   ``split.pseudo_unseen`` / ``pseudo_unseen_count`` (seen-class validation, ZegFormer Sec. 4.1)
   the split becomes the validation split: pseudo-unseen seen classes play unseen, the real
   unseen classes leave the vocabulary (``zeroseg.data.splits.pseudo_unseen_split``);
3. truncate to ``max_images`` (first N by sorted image id), hold out ``val_fraction`` of the
   training images as eval set ``val`` (hash of image id + seed; done before step 2 so that the
   frequency rule counts exactly the ``train`` images);
4. one Ray Data pass over all images: ``from_items(records).map_batches(process_batch)``
   decode-checks each image, rasterises its label and applies the unseen policy; workers return
   the label PNG bytes and the driver writes them into the output directory (so workers need no
   access to it: the stage works on a multi-node cluster without a shared file system);
5. write ``manifests/<split>.parquet``, ``classes.json``, ``stats.json``.

The artifact holds no absolute path: a manifest row names its image relative to its dataset's
image folder (``image``) and its label relative to the artifact (``label``). Where the images are
is a runtime setting (``runtime_outputs``: ``image_roots``), so the same data mounted elsewhere,
or spelled differently, gives the same key and reuses the artifact; its content enters the key
through :meth:`BuildSplits.fingerprint`. ``stages.feeds.manifest_table`` turns a manifest back
into absolute URIs for the current invocation.

This module is the stage's spec (config, plan-time checks, fingerprint; torch- and Ray-free); the
run is its job, ``stages.jobs.build_splits``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Runtime
from pipeline.dag import StageConfig
from stages.common import JobStage
from zeroseg.data.builtin_splits import BUILTIN_SPLITS
from zeroseg.data.classes import Vocabulary, eval_vocabulary, resolve_split
from zeroseg.data.coco import read_coco
from zeroseg.data.label_policy import check_transductive_vocabulary
from zeroseg.data.mask_folder import read_mask_folder
from zeroseg.data.readers import (
    DatasetListing,
    dataset_fingerprint,
    load_json,
    read_class_file,
)
from zeroseg.data.split_rules import pseudo_unseen_split
from zeroseg.data.splits import (
    TRAIN_SPLIT,
    VAL_SPLIT,
)
from zeroseg.errors import ConfigError, DataError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_COCO_KEYS = ("annotations", "coco_kind", "panoptic_masks")
_MASK_KEYS = ("labels", "classes", "ignore_index", "reduce_zero_label", "label_suffix", "ids_file")

#: Data paths: runtime (their content enters the key through the stage's fingerprint).
DataPath = Annotated[str, Runtime(why="data path (content fingerprinted)")]


class DatasetConfig(BaseModel):
    """One dataset (``train`` or an ``eval`` entry). Paths are relative to the working directory.

    ``format: coco`` uses ``images`` + ``annotations`` (+ ``coco_kind``, ``panoptic_masks``);
    ``format: mask_folder`` uses ``images`` + ``labels`` + ``classes`` (+ ``ignore_index``,
    ``reduce_zero_label``, ``label_suffix``, ``ids_file``).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=_NAME, description="dataset / eval set name (file names, metric keys)")
    format: Literal["coco", "mask_folder"]
    images: DataPath
    annotations: Annotated[str | list[str] | None, Runtime(why="data path (content fingerprinted)")] = Field(
        None, description="COCO json file(s); several: categories united"
    )
    coco_kind: Literal["instances", "stuff", "panoptic"] = "instances"
    panoptic_masks: DataPath | None = Field(None, description="panoptic PNG folder (default: json path without .json)")
    labels: DataPath | None = None
    classes: Annotated[str | list[str] | None, Runtime(when=lambda v: isinstance(v, str), why="data path")] = Field(
        None, description='class names, or a json {"classes", "ignore_index"} (a file: fingerprinted)'
    )
    ignore_index: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="the label files' ignore value; overrides the class file's (default 255, 65535 above 255 classes)",
    )
    reduce_zero_label: bool = False
    label_suffix: str = ".png"
    ids_file: DataPath | None = None
    max_images: int | None = Field(None, ge=1, description="first N images by sorted image id")
    class_map: dict[str, str] = Field(default_factory=dict, description="eval only: {eval_name: train_vocab_name}")

    @model_validator(mode="after")
    def _by_format(self) -> DatasetConfig:
        given = self.model_fields_set
        if self.format == "coco":
            if self.annotations is None:
                raise ValueError(f"dataset {self.name!r} (format coco) needs 'annotations' (the COCO json)")
            wrong = [k for k in _MASK_KEYS if k in given]
        else:
            missing = [k for k in ("labels", "classes") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"dataset {self.name!r} (format mask_folder) needs {missing}")
            wrong = [k for k in _COCO_KEYS if k in given]
        if wrong:
            raise ValueError(f"dataset {self.name!r}: key(s) {wrong} do not apply to format {self.format!r}")
        return self


class SplitConfig(BaseModel):
    """The seen/unseen split of the training vocabulary.

    ``rule: names`` (default): the classes are named, by ``builtin`` or by ``unseen`` / ``seen``
    lists (``zeroseg.data.classes.resolve_split``). ``rule: frequency`` (ZegFormer's ADE20k-Full
    benchmark, Sec. 4.1): seen = the classes present in more than ``min_images`` training images,
    unseen = the others (``zeroseg.data.splits.frequency_split``). Presence is counted on the
    training images' full labels *before* the unseen-pixel policy (a class counts once per image
    whose rasterised label holds at least one of its pixels; crowd regions are ignore and do not
    count), over the images that end up in the ``train`` split: after ``max_images``, without the
    held-out ``val`` images and without images skipped as unreadable. The count costs one more
    Ray Data pass over the training images (decode-check + rasterise, no label written).

    Seen-class validation (ZegFormer Sec. 4.1: hyperparameters tuned on "a subset of the training
    classes as a validation set", SPNet's cross-validation procedure): ``pseudo_unseen`` (seen
    class names) or ``pseudo_unseen_count`` (that many seen classes drawn from
    ``build_splits.seed``, ``zeroseg.data.splits.draw_pseudo_unseen``) play unseen, and the split's
    real unseen classes are excluded from the run: no vocabulary holds them and every label has
    their pixels as ignore (``zeroseg.data.splits.pseudo_unseen_split``). Training then sees the
    other seen classes only; the held-out set ``val`` (``val_fraction`` > 0) is scored with
    unseen = the pseudo-unseen classes. Eval datasets are refused (their GZS3 numbers would be
    neither the benchmark's protocol nor the validation's).
    """

    model_config = ConfigDict(extra="forbid")

    rule: Literal["names", "frequency"] = "names"
    builtin: Literal[tuple(BUILTIN_SPLITS)] | None = None  # type: ignore[valid-type]
    unseen: list[str] | None = None
    seen: list[str] | None = None
    min_images: int | None = Field(
        None, ge=0, description="rule frequency: seen = classes present in more than min_images training images"
    )
    pseudo_unseen: list[str] | None = Field(
        None, description="seen-class validation: these seen classes play unseen; the real unseen ones are excluded"
    )
    pseudo_unseen_count: int | None = Field(
        None,
        ge=1,
        description="seen-class validation: this many seen classes, drawn from build_splits.seed, play unseen",
    )

    @property
    def validation(self) -> bool:
        """A seen-class validation split (``pseudo_unseen`` or ``pseudo_unseen_count`` set)."""
        return self.pseudo_unseen is not None or self.pseudo_unseen_count is not None

    @model_validator(mode="after")
    def _one_way(self) -> SplitConfig:
        if self.pseudo_unseen is not None and self.pseudo_unseen_count is not None:
            raise ValueError(
                "give either split.pseudo_unseen (seen class names) or split.pseudo_unseen_count (how many seen "
                "classes to draw), not both"
            )
        if self.pseudo_unseen == []:
            raise ValueError(
                "split.pseudo_unseen: [] makes no seen-class validation split (no class would play unseen); name "
                "seen classes, or remove the key"
            )
        named = [k for k in ("builtin", "unseen", "seen") if getattr(self, k) is not None]
        if self.rule == "frequency":
            if named:
                raise ValueError(
                    f"split.rule frequency derives the seen/unseen classes from the training images; remove "
                    f"split.{', split.'.join(named)} (or use rule: names)"
                )
            if self.min_images is None:
                raise ValueError(
                    "split.rule frequency needs split.min_images: seen = classes present in more than "
                    "min_images training images (ZegFormer's ADE20k-Full benchmark: 10)"
                )
            return self
        if self.min_images is not None:
            raise ValueError("split.min_images applies to split.rule: frequency only; remove it or set the rule")
        if self.builtin is not None and (self.unseen is not None or self.seen is not None):
            raise ValueError("give either split.builtin or split.unseen/seen, not both")
        if not named:
            raise ValueError(
                f"give split.builtin ({', '.join(BUILTIN_SPLITS)}), split.unseen (a list of class names; [] for "
                "none), or split.rule: frequency with split.min_images"
            )
        return self


class BuildSplitsConfig(StageConfig):
    """``build_splits`` config section.

    ``transductive``: the transductive zero-shot setting (ZegCLIP Sec. 4.3): the unseen class
    names are known at training time, their pixels stay unlabelled. The training labels mark
    unseen pixels with the unlabelled-unseen value (``zeroseg.data.splits.unlabeled_index``: 254,
    or 65534 for 16-bit labels) instead of ignore, so self_train knows which pixels carry no seen
    label; their classes are written only to held-out labels (``heldout/train/<id>.png``, the
    manifest's ``heldout`` column) that self_train's pseudo-label diagnostic reads and no loss
    does. Needs ``unseen_policy: ignore``. Inductive stages (train_classifier, pretrain_proposals)
    train on such a split exactly as on an inductive one: their lookup table maps the marker to
    ignore.

    ``split.pseudo_unseen`` / ``split.pseudo_unseen_count``: a seen-class validation run
    (:class:`SplitConfig`); it needs ``val_fraction`` > 0 (the held-out training images it is
    scored on) and no ``eval`` datasets.
    """

    train: DatasetConfig
    split: SplitConfig
    transductive: bool = False
    unseen_policy: Literal["ignore", "drop"] = "ignore"
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="held-out share of train -> eval set 'val'")
    seed: int = 0
    on_bad_image: Literal["error", "skip"] = "error"
    eval: list[DatasetConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names(self) -> BuildSplitsConfig:
        if self.train.class_map:
            raise ValueError(
                "train.class_map: class_map applies to eval datasets only (it maps an eval class "
                "to a training class name)"
            )
        if self.transductive and self.unseen_policy != "ignore":
            raise ValueError(
                "transductive: true keeps the training images with unseen pixels (marked unlabelled, for "
                f"self-training); unseen_policy {self.unseen_policy!r} contradicts it: set unseen_policy: ignore"
            )
        if self.split.validation:
            key = "split.pseudo_unseen" if self.split.pseudo_unseen is not None else "split.pseudo_unseen_count"
            if self.val_fraction <= 0:
                raise ValueError(
                    f"{key}: a seen-class validation split is scored on held-out training images (eval set "
                    "'val'), but val_fraction is 0; set val_fraction > 0 (e.g. 0.1)"
                )
            if self.eval:
                raise ValueError(
                    f"{key}: a seen-class validation run scores the held-out set 'val' only; eval dataset(s) "
                    f"{[e.name for e in self.eval]} would be scored without the benchmark's unseen classes and with "
                    "seen classes counted as unseen, which is not the benchmark's protocol. Remove them "
                    "(--set build_splits.eval=[]); evaluate the test set in a run without the pseudo-unseen keys"
                )
        taken = {TRAIN_SPLIT} | ({VAL_SPLIT} if self.val_fraction > 0 else set())
        for e in self.eval:
            if e.name in taken:
                raise ValueError(
                    f"eval set name {e.name!r} is already used (train, val with val_fraction > 0, "
                    "or another eval entry); rename it"
                )
            taken.add(e.name)
        return self


def _path(p: str) -> Path:
    return Path(p).expanduser().resolve()


def list_dataset(d: DatasetConfig) -> DatasetListing:
    """List one configured dataset (``zeroseg.data.readers``)."""
    if d.format == "coco":
        ann = [_path(a) for a in d.annotations] if isinstance(d.annotations, list) else _path(d.annotations)
        return read_coco(
            ann,
            _path(d.images),
            kind=d.coco_kind,
            panoptic_masks=_path(d.panoptic_masks) if d.panoptic_masks else None,
            dataset=d.name,
        )
    classes = d.classes if isinstance(d.classes, list) else _path(d.classes)
    return read_mask_folder(
        _path(d.images),
        _path(d.labels),
        classes,
        ignore_index=d.ignore_index,
        reduce_zero_label=d.reduce_zero_label,
        label_suffix=d.label_suffix,
        ids_file=_path(d.ids_file) if d.ids_file else None,
        dataset=d.name,
    )


def class_names(d: DatasetConfig) -> list[str]:
    """The class names of a configured dataset, read without listing its images (plan time).

    Raises:
        DataError: an unreadable annotation or class file (named).
    """
    if d.format == "mask_folder":
        return list(d.classes) if isinstance(d.classes, list) else read_class_file(_path(d.classes))[0]
    anns = d.annotations if isinstance(d.annotations, list) else [d.annotations]
    names: dict[int, str] = {}
    for a in anns:
        doc = load_json(_path(a), f"dataset {d.name!r} annotations")
        try:
            for c in doc["categories"]:
                names.setdefault(int(c["id"]), str(c["name"]))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"dataset {d.name!r}: annotations {_path(a)} have no valid 'categories' ({e})") from None
    return [names[i] for i in sorted(names)]


def check_paths(d: DatasetConfig) -> None:
    """The files and folders of a configured dataset exist, and its image folder is not empty.

    Raises:
        ConfigError: naming the dataset, the config key and the path.
    """
    files, dirs = _fingerprint_inputs(d)
    for f in files:
        if not f.is_file():
            raise ConfigError(f"dataset {d.name!r}: {f} does not exist (check annotations / classes / ids_file)")
    for k, p in (("images", _path(d.images)), *((("labels", _path(d.labels)),) if d.labels else ())):
        if not p.is_dir():
            raise ConfigError(f"dataset {d.name!r}: {k} folder {p} does not exist")
        if not any(True for _ in os.scandir(p)):
            raise ConfigError(f"dataset {d.name!r}: {k} folder {p} is empty")


def _fingerprint_inputs(d: DatasetConfig) -> tuple[list[Path], list[Path]]:
    files: list[Path] = []
    dirs: list[Path] = [_path(d.images)]
    if d.format == "coco":
        anns = d.annotations if isinstance(d.annotations, list) else [d.annotations]
        files += [_path(a) for a in anns]
        if d.coco_kind == "panoptic":
            dirs.append(_path(d.panoptic_masks) if d.panoptic_masks else _path(anns[0]).with_suffix(""))
    else:
        dirs.append(_path(d.labels))
        if isinstance(d.classes, str):
            files.append(_path(d.classes))
        if d.ids_file:
            files.append(_path(d.ids_file))
    return files, dirs


class BuildSplits(JobStage):
    """Class splits, label maps and manifests for one training dataset and its eval sets (the run:
    ``stages.jobs.build_splits``)."""

    name = "build_splits"
    job = "stages.jobs.build_splits"
    Config = BuildSplitsConfig

    def check(self, config: BuildSplitsConfig) -> None:
        """Every dataset's files exist and its image folder is not empty; the split's and every
        ``class_map``'s class names exist (naming the nearest), before anything starts."""
        for d in [config.train, *config.eval]:
            check_paths(d)
        names = class_names(config.train)
        train = named_split(config, names)
        if config.split.validation:  # with rule frequency: the names exist (seen is known after counting)
            train = validation_split(config, train)[0]
        if config.transductive:
            check_transductive_vocabulary(len(train.names), config.train.name)
        for e in config.eval:
            eval_vocabulary(class_names(e), dataset=e.name, train=train, class_map=e.class_map)

    def facts(self, config: BuildSplitsConfig) -> dict[str, Any]:
        """``{"transductive": bool}``: what the stages reading this split may know at plan time
        (self_train needs a transductive split; the leakage guard)."""
        return {"transductive": bool(config.transductive)}

    def runtime_outputs(self, config: BuildSplitsConfig) -> dict[str, Any]:
        """``{"image_roots": {split: absolute image folder}}`` in this invocation (``train`` and
        ``val`` are the training dataset's; each eval set its own)."""
        return {"image_roots": image_roots(config)}

    def fingerprint(self, config: BuildSplitsConfig) -> str:
        """sha256 of the dataset files: annotation / class / id files by content, image and label
        directories by their sorted ``(relative name, size)`` listing (see
        ``zeroseg.data.readers.dataset_fingerprint`` for why not by content)."""
        files: list[Path] = []
        dirs: list[Path] = []
        for d in [config.train, *config.eval]:
            f, ds = _fingerprint_inputs(d)
            files += f
            dirs += ds
        return dataset_fingerprint(files, dirs)


def image_roots(config: BuildSplitsConfig) -> dict[str, str]:
    """``{split: absolute image folder}`` in this invocation (``train`` and ``val``: the training
    dataset's; each eval set its own)."""
    roots = {TRAIN_SPLIT: str(_path(config.train.images)), VAL_SPLIT: str(_path(config.train.images))}
    return {**roots, **{e.name: str(_path(e.images)) for e in config.eval}}


def named_split(config: BuildSplitsConfig, names: list[str]) -> Vocabulary:
    """The training vocabulary of a named split (``rule: names``); for ``rule: frequency`` the
    vocabulary with every class seen (the class-list checks only: the split itself needs the
    counting pass of :meth:`BuildSplits.run`).

    Raises:
        ConfigError: as ``zeroseg.data.classes.resolve_split`` (unknown names, more than 65535 classes).
    """
    s = config.split
    if s.rule == "frequency":
        return resolve_split(names, dataset=config.train.name, unseen=[])
    return resolve_split(names, dataset=config.train.name, builtin=s.builtin, unseen=s.unseen, seen=s.seen)


def validation_split(config: BuildSplitsConfig, benchmark: Vocabulary) -> tuple[Vocabulary, tuple[int, ...]]:
    """The seen-class validation vocabulary of ``config`` over the benchmark split ``benchmark``
    and the excluded class ids (``zeroseg.data.splits.pseudo_unseen_split``, seeded by
    ``build_splits.seed``).

    Raises:
        ConfigError: as ``pseudo_unseen_split``, naming ``build_splits.split``.
    """
    s = config.split
    return pseudo_unseen_split(
        benchmark,
        pseudo_unseen=s.pseudo_unseen,
        count=s.pseudo_unseen_count,
        seed=config.seed,
        key="build_splits.split",
    )
