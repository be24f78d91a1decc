"""The extract_features stage's job (``stages.extract_features``: its config, inputs, the
artifact's layout and the module docstring with the released-code departures): the frozen
proposal model over the training images, each query matched to the seen ground-truth segments,
written into the memory-mapped feature arrays on the driver.

::

    manifests/train.parquet (+ row column) -> ray.data.from_arrow
      -> actor pool of FeaturePredictor (decode + leakage guard; zeroseg.inference.prepare_images;
         the frozen MaskFormer; Hungarian matching, zeroseg.models.pading.query_labels)
      -> FeatureWriter partial states written into features/*.npy on the driver
      -> features/images.parquet, features.json
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from pipeline.dag import StageContext
from pipeline.inference import reduce
from pipeline.uri import local_copy
from stages.common import TRAIN_VOCAB, vocabularies
from stages.extract_features import (
    EMBEDDINGS,
    FEATURES_JSON,
    IMAGES,
    LABELS,
    NO_OBJECT,
    ROW_COLUMN,
    ExtractFeaturesConfig,
)
from stages.feeds import URI_COLUMNS, check_leakage, decode_pair, leakage_guard, manifest_table
from stages.jobs.device import actor_device, resolve_device
from stages.jobs.methods._proposals import bound_proposals, check_seen
from zeroseg.data.transforms import make_lut
from zeroseg.errors import DataError
from zeroseg.inference import prepare_images
from zeroseg.losses import semantic_to_targets
from zeroseg.models.maskformer import HungarianMatcher, load_proposal_model, read_proposals_json
from zeroseg.models.pading import query_labels


def decode_feature_batch(batch: Mapping[str, np.ndarray], forbidden: np.ndarray | None) -> dict[str, list[Any]]:
    """Decode a batch of training manifest rows for :class:`FeaturePredictor` and run the leakage
    guard on each label (``stages.feeds.check_leakage``) before anything reads it.

    Args:
        batch: columns ``row`` (artifact row), ``image_id``, ``image_uri``, ``label_uri``.
        forbidden: ``stages.feeds.leakage_guard``'s table (None: no check).

    Returns:
        ``{"images": [uint8 [H, W, 3]], "labels": [uint8 or uint16 [H, W]] (vocabulary ids),
        "rows": [int]}``, in order.

    Raises:
        LeakageError: a training label holds an unseen class id (naming the image and file).
        DataError: an image or label cannot be read or decoded (naming the file).
    """
    out: dict[str, list[Any]] = {"images": [], "labels": [], "rows": []}
    for row, image_id, img_uri, lbl_uri in zip(
        batch[ROW_COLUMN], batch["image_id"], batch["image_uri"], batch["label_uri"]
    ):
        image, label = decode_pair(str(img_uri), str(lbl_uri))
        check_leakage(label, forbidden, str(image_id), str(lbl_uri))
        out["images"].append(image)
        out["labels"].append(label)
        out["rows"].append(int(row))
    return out


class FeaturePredictor:
    """Inference-actor model (``pipeline.inference``): decoded images and labels -> every query's
    embedding and label.

    Args:
        cfg: the validated extract_features config (its matching costs).
        artifact_uri: the pretrain_proposals artifact (local path or store URI).
        ignore_index: the label PNGs' ignore value (classes.json ``train.ignore_index``).
        device: the resolved torch device string (:func:`stages.jobs.device.resolve_device`).
        forbidden: the leakage guard's table (``stages.feeds.leakage_guard``, built on the driver;
            None: no check).

    ``load(batch)``: ``{"images", "labels", "rows"}`` (:func:`decode_feature_batch`);
    ``__call__(inputs)``: ``{"embeddings": float32 [B, Q, d], "labels": int32 [B, Q]}``
    (training-vocabulary class ids, -1 = no-object).

    Raises:
        ConfigError: a CUDA device on an actor without one.
        DataError: an unreadable artifact, image or label.
        LeakageError: a training label holds an unseen class id.
    """

    def __init__(
        self,
        cfg: ExtractFeaturesConfig,
        artifact_uri: str,
        ignore_index: int,
        device: str = "cpu",
        forbidden: np.ndarray | None = None,
    ):
        self.device, self.device_name = actor_device(device, "extract_features.device")
        with local_copy(artifact_uri) as d:
            self.doc = read_proposals_json(d)
            self.model = load_proposal_model(d, device=self.device).eval()
        self.matcher = HungarianMatcher(cfg.cost_class, cfg.cost_mask, cfg.cost_dice)
        self.ignore = int(ignore_index)
        lut = np.full(max(self.doc["seen"]) + 1, -1, np.int64)
        lut[self.doc["seen"]] = np.arange(len(self.doc["seen"]))
        self.head_index, self.seen = lut, np.asarray(self.doc["seen"], np.int64)
        self.size = tuple(int(s) for s in self.doc["input"]["size"])
        self.mean = torch.tensor(self.doc["input"]["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.doc["input"]["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.info = {"input_size": list(self.size)}
        self.forbidden = None if forbidden is None else np.asarray(forbidden, dtype=bool)

    def load(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        return decode_feature_batch(batch, self.forbidden)

    def targets(self, label: np.ndarray) -> dict[str, Any]:
        """One target per seen class present, labelled with its head index (unseen / other ids are
        not targets: they are ignore under every unseen-pixel policy of PADing's semantic setting)."""
        t = semantic_to_targets(label.astype(np.int64), self.ignore)
        ids = t["labels"].numpy()
        keep = (ids < len(self.head_index)) & (self.head_index[np.minimum(ids, len(self.head_index) - 1)] >= 0)
        k = torch.from_numpy(keep)
        return {"labels": torch.from_numpy(self.head_index[ids[keep]]), "masks": t["masks"][k]}

    def __call__(self, inputs: Mapping[str, list[Any]]) -> dict[str, Any]:
        with torch.inference_mode():
            out = self.model(prepare_images(inputs["images"], self.size, self.mean, self.std))
        targets = [self.targets(lab) for lab in inputs["labels"]]
        head = query_labels(out["pred_logits"], out["pred_masks"], targets, self.matcher).numpy()
        labels = np.where(head >= 0, self.seen[np.maximum(head, 0)], NO_OBJECT).astype(np.int32)
        return {"embeddings": out["query_embed"].float().cpu().numpy(), "labels": labels}


class FeatureWriter:
    """Evaluator (``pipeline.inference``) that writes each batch's rows into the artifact's
    memory-mapped arrays on the driver as its partial state arrives (nothing accumulates).

    Args:
        directory: the artifact directory (written on the driver).
        rows / queries / dim: ``N`` images, ``Q`` queries, ``d`` embedding size.

    ``finalize() -> {"images", "written", "matched", "matched_per_class": {id: n},
    "images_without_match"}``.
    """

    def __init__(self, directory: str, rows: int, queries: int, dim: int) -> None:
        self.directory, self.rows, self.queries, self.dim = str(directory), int(rows), int(queries), int(dim)
        self.parts: list[tuple[list[int], np.ndarray, np.ndarray]] = []
        self._emb = self._lab = self._written = None

    def reset(self) -> None:
        self.parts = []

    def process(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        self.parts.append((list(inputs["rows"]), outputs["embeddings"], outputs["labels"]))

    def _open(self) -> None:
        d = Path(self.directory)
        (d / EMBEDDINGS).parent.mkdir(parents=True, exist_ok=True)
        shape = (self.rows, self.queries)
        self._emb = np.lib.format.open_memmap(d / EMBEDDINGS, mode="w+", dtype=np.float32, shape=(*shape, self.dim))
        self._lab = np.lib.format.open_memmap(d / LABELS, mode="w+", dtype=np.int32, shape=shape)
        self._written = np.zeros(self.rows, bool)

    def merge(self, other: FeatureWriter) -> None:
        if self._emb is None:
            self._open()
        for rows, emb, lab in other.parts:
            if emb.shape[1:] != (self.queries, self.dim):
                raise DataError(
                    f"extract_features: embeddings {emb.shape[1:]} but the model has {self.queries} x {self.dim}"
                )
            self._emb[rows] = emb
            self._lab[rows] = lab
            self._written[rows] = True

    def finalize(self) -> dict[str, Any]:
        if self._emb is None:
            self._open()
        self._emb.flush()
        self._lab.flush()
        lab = np.asarray(self._lab)
        ids, counts = np.unique(lab[lab >= 0], return_counts=True)
        out = {
            "images": self.rows,
            "written": int(self._written.sum()),
            "matched": int((lab >= 0).sum()),
            "matched_per_class": {int(i): int(n) for i, n in zip(ids, counts)},
            "images_without_match": int(((lab >= 0).sum(1) == 0).sum()),
        }
        self._emb = self._lab = None
        return out


def run(ctx: StageContext) -> dict[str, float]:
    """The stage's run (``stages.extract_features.ExtractFeatures``): the pass, then
    ``features/images.parquet`` and ``features.json``.

    Returns:
        ``{"images", "matched", "matched_classes", "images_without_match", "images_per_second"}``.

    Raises:
        DataError: a proposal model without the linear class head, of other seen classes, no
            training image, no matched query; ConfigError: see :func:`stages.jobs.device.resolve_device`.
    """
    cfg: ExtractFeaturesConfig = ctx.config
    train = vocabularies(ctx.inputs["splits"])[TRAIN_VOCAB]
    prop = ctx.inputs["proposals"]
    doc, where = bound_proposals(prop)
    head = doc.get("class_head", (doc.get("model") or {}).get("class_head"))
    if head != "linear":
        raise DataError(
            f"{where}: the proposal model has class head {head!r}; PADing's backbone classifies query "
            "embeddings with a linear head: train pretrain_proposals with model.class_head: linear"
        )
    check_seen(doc, train.seen, where)
    # the leakage guard of every training feed: no training label may hold an unseen class id
    lut = make_lut({int(c): i for i, c in enumerate(train.seen)}, source_classes=len(train.names))
    forbidden = leakage_guard(ctx.inputs["splits"], lut)
    table = manifest_table(ctx.inputs["splits"], TRAIN_VOCAB).select(list(URI_COLUMNS))
    if cfg.max_images is not None:
        table = table.slice(0, cfg.max_images)
    if table.num_rows == 0:
        raise DataError("extract_features: the training manifest has no images")
    table = table.append_column(ROW_COLUMN, pa.array(np.arange(table.num_rows), pa.int64()))
    out = Path(ctx.output_dir)
    q, d = int(doc["num_queries"]), int(doc["hidden_dim"])
    device, gpus = resolve_device(cfg.device, "extract_features.device")
    ctx.log(f"extract_features: {table.num_rows} training images x {q} queries ({d}-d) from {where} on {device}")
    bar = ctx.progress(table.num_rows, "images")
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        bar.update(completed=done[0])

    t0 = time.perf_counter()
    merged, timing = reduce(
        ray.data.from_arrow(table),
        FeaturePredictor,
        {
            "cfg": cfg,
            "artifact_uri": prop.uri,
            "ignore_index": train.ignore_index,
            "device": device,
            "forbidden": forbidden,
        },
        {"features": FeatureWriter(str(out), table.num_rows, q, d)},
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_gpus=gpus,
        progress=advance,
    )
    res = merged["features"].finalize()
    seconds = time.perf_counter() - t0
    if res["written"] != table.num_rows:
        raise DataError(f"extract_features: {res['written']} of {table.num_rows} images came back from the pass")
    if res["matched"] == 0:
        raise DataError(
            f"extract_features: no query of {where} matched a seen segment in {table.num_rows} training images "
            "(no seen class in the labels?); the generator has no real feature to learn from"
        )
    ids = pa.array(table.column("image_id").to_pylist(), pa.string())
    lab = np.load(out / LABELS, mmap_mode="r")
    pa_table = pa.table(
        {ROW_COLUMN: table.column(ROW_COLUMN), "image_id": ids, "matched": pa.array((lab >= 0).sum(1), pa.int32())}
    )
    pq.write_table(pa_table, out / IMAGES)
    names = train.names
    record = {
        "proposals_key": prop.key,
        "proposals_class_head": head,
        "hidden_dim": d,
        "num_queries": q,
        "seen": [int(s) for s in doc["seen"]],
        "input_size": doc["input"]["size"],
        "costs": {"class": cfg.cost_class, "mask": cfg.cost_mask, "dice": cfg.cost_dice},
        "images": res["images"],
        "matched": res["matched"],
        "images_without_match": res["images_without_match"],
        "matched_per_class": {names[i]: n for i, n in res["matched_per_class"].items()},
        "no_object_label": NO_OBJECT,
        "files": {"embeddings": EMBEDDINGS, "labels": LABELS, "images": IMAGES},
    }
    (out / FEATURES_JSON).write_text(json.dumps(record, indent=1) + "\n")
    ctx.log(
        f"extract_features: {res['matched']} matched seen queries in {res['images']} images "
        f"({len(res['matched_per_class'])} classes) in {seconds:.1f} s"
    )
    return {
        "images": float(res["images"]),
        "matched": float(res["matched"]),
        "matched_classes": float(len(res["matched_per_class"])),
        "images_without_match": float(res["images_without_match"]),
        "images_per_second": float(timing.rows_per_second or 0.0),
    }


__all__ = ["FeaturePredictor", "FeatureWriter", "decode_feature_batch", "run"]
