"""The build_splits stage's job (``stages.build_splits``: its config, the plan-time checks, the
fingerprint and the module docstring with the steps): list the datasets, resolve the splits, one
Ray Data pass over every image (``zeroseg.data.splits.process_batch``), then the label PNGs, the
manifests, ``classes.json`` and ``stats.json`` written on the driver.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ray

from pipeline.dag import StageContext
from pipeline.errors import carry_user_errors
from stages.build_splits import BuildSplitsConfig, image_roots, list_dataset, named_split, validation_split
from zeroseg.data.classes import Vocabulary, eval_vocabulary
from zeroseg.data.label_policy import EVAL_POLICY, UNLABELED_POLICY, check_transductive_vocabulary
from zeroseg.data.split_files import heldout_path, label_path, write_classes_json, write_manifest
from zeroseg.data.split_rules import frequency_record, frequency_split, images_per_class, pseudo_unseen_record
from zeroseg.data.splits import (
    TRAIN_SPLIT,
    VAL_SPLIT,
    assign_val,
    make_records,
    process_batch,
    summarize,
    truncate,
)
from zeroseg.errors import DataError

#: Rows per Ray Data ``map_batches`` call (each row is one image).
BATCH_SIZE = 8


def run(ctx: StageContext) -> dict[str, float]:
    """The stage's run (``stages.build_splits.BuildSplits``; the steps of its module docstring).

    Returns:
        ``{"<split>_images": kept images per split, "skipped_images", "dropped_images"}``.

    Raises:
        DataError: no training image left; ConfigError / DataError: as the readers and splits.
    """
    cfg: BuildSplitsConfig = ctx.config
    out = Path(ctx.output_dir)
    roots = {split: Path(r) for split, r in image_roots(cfg).items()}

    # 1. listings; 3. truncation and the held-out val set
    train_list = list_dataset(cfg.train)
    recs = truncate(train_list.records, cfg.train.max_images)
    val_ids = assign_val([r["image_id"] for r in recs], cfg.val_fraction, cfg.seed) if cfg.val_fraction else set()
    train_recs = [r for r in recs if r["image_id"] not in val_ids]

    # 2. the training vocabulary's split: named, or counted on the training images (frequency)
    n = len(train_list.names)
    if cfg.split.rule == "frequency":
        named_split(cfg, train_list.names)  # the vocabulary's own checks, before the counting pass
        count_recs = make_records(
            train_recs, split=TRAIN_SPLIT, dataset=cfg.train.name, policy=EVAL_POLICY, unseen=(), num_classes=n
        )
        ctx.log(f"split.rule frequency: counting classes in {len(count_recs)} training images")
        counted = [res for res, _, _ in _ray_pass(count_recs, cfg.on_bad_image, labels=False)]
        counts, n_counted = images_per_class(counted, n)
        train_vocab = frequency_split(
            train_list.names,
            counts,
            min_images=cfg.split.min_images,
            dataset=cfg.train.name,
            images=n_counted,
        )
        split_doc = frequency_record(train_vocab, counts, min_images=cfg.split.min_images, images=n_counted)
        ctx.log(
            f"split.rule frequency (more than {cfg.split.min_images} of {n_counted} images): "
            f"{len(train_vocab.seen)} seen, {len(train_vocab.unseen)} unseen"
        )
    else:
        train_vocab = named_split(cfg, train_list.names)
        split_doc = cfg.split.model_dump(mode="json", exclude_none=True)
    # seen-class validation: pseudo-unseen seen classes play unseen, the real unseen ones leave the run
    excluded: tuple[int, ...] = ()
    validation_doc = None
    if cfg.split.validation:
        benchmark = train_vocab
        train_vocab, excluded = validation_split(cfg, benchmark)
        validation_doc = pseudo_unseen_record(
            train_vocab,
            benchmark,
            {
                **cfg.split.model_dump(
                    mode="json", include={"pseudo_unseen", "pseudo_unseen_count"}, exclude_none=True
                ),
                "seed": cfg.seed,
            },
        )
        ctx.log(
            f"seen-class validation: pseudo-unseen {list(train_vocab.unseen_names)}; excluded (the benchmark's "
            f"unseen, ignore in every label) {list(benchmark.unseen_names)}"
        )
    evals: dict[str, Vocabulary] = {}
    split_records: dict[str, list[dict[str, Any]]] = {}
    train_policy = UNLABELED_POLICY if cfg.transductive else cfg.unseen_policy
    unlabeled = check_transductive_vocabulary(len(train_vocab.names), cfg.train.name) if cfg.transductive else None
    policies: dict[str, str] = {TRAIN_SPLIT: train_policy}
    split_records[TRAIN_SPLIT] = make_records(
        train_recs,
        split=TRAIN_SPLIT,
        dataset=cfg.train.name,
        policy=train_policy,
        unseen=train_vocab.unseen,
        num_classes=n,
        excluded=excluded,
    )
    if cfg.val_fraction > 0:
        evals[VAL_SPLIT] = eval_vocabulary(train_vocab.names, dataset=cfg.train.name, train=train_vocab)
        split_records[VAL_SPLIT] = make_records(
            [r for r in recs if r["image_id"] in val_ids],
            split=VAL_SPLIT,
            dataset=cfg.train.name,
            policy=EVAL_POLICY,
            unseen=evals[VAL_SPLIT].unseen,
            num_classes=n,
            excluded=excluded,
        )
        policies[VAL_SPLIT] = EVAL_POLICY
    for e in cfg.eval:
        lst = list_dataset(e)
        evals[e.name] = eval_vocabulary(lst.names, dataset=e.name, train=train_vocab, class_map=e.class_map)
        split_records[e.name] = make_records(
            truncate(lst.records, e.max_images),
            split=e.name,
            dataset=e.name,
            policy=EVAL_POLICY,
            unseen=evals[e.name].unseen,
            num_classes=len(lst.names),
        )
        policies[e.name] = EVAL_POLICY
    vocabs = {TRAIN_SPLIT: train_vocab, **evals}
    total = sum(len(v) for v in split_records.values())
    ctx.log(f"{total} images: " + ", ".join(f"{k} {len(v)}" for k, v in split_records.items()))

    # 4. the per-image pass (Ray Data); the driver writes the returned PNGs
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in split_records}
    progress = ctx.progress(total, "images")
    for res, png, held in _ray_pass([r for v in split_records.values() for r in v], cfg.on_bad_image):
        res["image_uri"] = os.path.relpath(res["image_uri"], roots[res["split"]])
        if res["status"] == "kept":
            for path, data in ((label_path, png), (heldout_path, held)):
                if path is heldout_path and not data:
                    continue
                p = path(out, res["split"], res["image_id"])
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
                if path is heldout_path:
                    res["heldout"] = path(Path(), res["split"], res["image_id"]).as_posix()
        results[res["split"]].append(res)
        progress.update(advance=1)

    # 5. manifests, classes.json, stats.json
    stats: dict[str, Any] = {
        "transductive": cfg.transductive,
        "unseen_policy": train_policy,  # the training split's: "unlabeled" when transductive
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "on_bad_image": cfg.on_bad_image,
        "split": split_doc,
        **({"pseudo_unseen": validation_doc} if validation_doc else {}),
        "splits": {},
    }
    metrics: dict[str, float] = {}
    for split, res_list in results.items():
        res_list.sort(key=lambda r: r["image_id"])
        rows = [
            {**r, "image": r["image_uri"], "label": label_path(Path(), split, r["image_id"]).as_posix()}
            for r in res_list
            if r["status"] == "kept"
        ]
        write_manifest(
            out / "manifests" / f"{split}.parquet", rows, vocabs[split], inductive_train=split == TRAIN_SPLIT
        )
        stats["splits"][split] = summarize(res_list, vocabs[split], policy=policies[split])
        metrics[f"{split}_images"] = len(rows)
    if cfg.transductive:
        stats["splits"][TRAIN_SPLIT]["unlabeled_pixels"] = sum(
            r.get("unlabeled_pixels", 0) for r in results[TRAIN_SPLIT] if r["status"] == "kept"
        )
    transductive = {"unlabeled_index": unlabeled, "heldout": f"heldout/{TRAIN_SPLIT}"} if cfg.transductive else None
    write_classes_json(
        out / "classes.json",
        train_vocab,
        evals,
        split=split_doc,
        transductive=transductive,
        pseudo_unseen=validation_doc,
    )
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    metrics["skipped_images"] = sum(s["skipped"] for s in stats["splits"].values())
    metrics["dropped_images"] = sum(s["dropped_total"] for s in stats["splits"].values())
    tr = stats["splits"][TRAIN_SPLIT]
    ctx.log(
        f"train: kept {tr['kept']}, dropped {tr['dropped']}, skipped {tr['skipped']}; unseen classes "
        f"{list(train_vocab.unseen_names)}"
    )
    if metrics[f"{TRAIN_SPLIT}_images"] == 0:
        raise DataError(
            f"build_splits: no training image left (stats: dropped {tr['dropped']}, skipped "
            f"{tr['skipped']}); check the split and unseen_policy"
        )
    return metrics


def _ray_pass(records: list[dict[str, Any]], on_bad_image: str, labels: bool = True):
    """Yield ``(result, png bytes, held-out png bytes)`` for every record, computed by Ray Data
    ``map_batches`` (``labels=False``: no label PNGs, ``b""``; held-out: ``b""`` unless the record's
    policy is ``unlabeled``)."""
    if not records:
        return
    if not ray.is_initialized():  # the driver (pipeline/run.py) normally initialises Ray
        raise RuntimeError("build_splits needs an initialised Ray (ray.init) before run()")
    ds = ray.data.from_items([{"record": json.dumps(r)} for r in records])
    ds = ds.map_batches(
        carry_user_errors(process_batch),
        fn_kwargs={"on_bad_image": on_bad_image, "labels": labels},
        batch_size=BATCH_SIZE,
        batch_format="numpy",
    )
    for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
        for raw, png, held in zip(batch["result"], batch["png"], batch["heldout"]):
            yield json.loads(raw), bytes(png), bytes(held)


__all__ = ["BATCH_SIZE", "run"]
