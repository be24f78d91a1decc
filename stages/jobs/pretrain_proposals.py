"""Job of stage ``pretrain_proposals`` (spec: ``stages.pretrain_proposals``): the MaskFormer
proposal model trained as a Ray Train job, then its recall pass.

Training (runs in Ray Train workers): :func:`build_model`, the forward
module and :func:`proposals_train_loop`. The recall pass (inference actors):
:class:`ProposalPredictor`. The driver side: :func:`pretrain_proposals`.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from pipeline.dag import StageContext
from pipeline.inference import reduce
from pipeline.training import fit_stage
from pipeline.uri import join, local_copy, read_bytes
from stages.common import TRAIN_VOCAB, seen_rows, text_embeddings, vocabularies
from stages.feeds import SET_COLUMN, decode_set_batch, set_rows, set_specs, training_feed
from stages.jobs._training import fit_metrics, tensor_count
from stages.jobs.device import actor_device, resolve_device
from stages.pretrain_proposals import PretrainProposals, PretrainProposalsConfig, recall_key
from zeroseg.config import validated
from zeroseg.config.clip import model_embed_dim
from zeroseg.config.proposals import ProposalConfig
from zeroseg.errors import ConfigError, DataError
from zeroseg.evaluation import RECALL_GROUPS, ProposalRecallEvaluator
from zeroseg.inference import prepare_images
from zeroseg.losses import semantic_to_targets
from zeroseg.metrics import json_safe
from zeroseg.models import load_strict
from zeroseg.models.clip import as_spec, load_clip
from zeroseg.models.maskformer import (
    METRICS_JSON,
    PROPOSALS_JSON,
    WEIGHTS_PT,
    MaskFormer,
    load_proposal_model,
    read_proposals_json,
    save_proposals,
)
from zeroseg.optim import maskformer_optimizer


def build_model(cfg: Mapping[str, Any], device: Any = "cpu", load_backbone_weights: bool = True) -> Any:
    """The MaskFormer of a loop config (``model``: a :class:`ProposalConfig` or its dict form,
    ``num_classes``, ``text_dim``, ``clip``: a ``ClipSpec`` or its dict form, or None; the CLIP
    visual tower is loaded only for ``backbone: clip``). ``load_backbone_weights``: False
    skips reading ``model.backbone_weights`` (the driver's copy, whose weights come from the final
    checkpoint; the workers load them for a fresh run).

    Raises:
        ConfigError: a bad model config or CLIP spec.
    """
    model_cfg = validated(ProposalConfig, cfg["model"], "model")
    clip_visual = None
    if model_cfg.backbone == "clip":
        clip_visual = load_clip(as_spec(cfg["clip"])).visual
    return MaskFormer(
        model_cfg,
        cfg["num_classes"],
        text_dim=cfg["text_dim"],
        clip_visual=clip_visual,
        load_backbone_weights=load_backbone_weights,
    ).to(device)


class ProposalForward(torch.nn.Module):
    """``forward(images) -> outputs`` of ``model`` with the seen-class text embeddings ``text``
    (``[K, D]`` or None) held as a non-persistent buffer (DDP wraps this module; checkpoints hold
    ``model``'s state only)."""

    def __init__(self, model: MaskFormer, text: torch.Tensor | None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("text", text, persistent=False)

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images, self.text)


def proposals_train_loop(loop: Any) -> None:
    """Per-worker loop (``pipeline.training``).

    ``loop.config``: ``model`` (:class:`ProposalConfig`), ``num_classes`` (K: seen classes, 1 for
    objectness), ``text_dim``, ``clip`` (``ClipSpec`` or None), ``seen_text`` (``[K, D]`` seen-class
    rows, L2-normalised; None unless ``class_head: text``), ``backbone_lr_mult``,
    ``weight_decay``, ``weight_decay_norm``, ``poly_power``, ``warmup_steps``, ``warmup_factor``.
    Batches: ``image`` float32 ``[B, 3, H, W]`` (normalised), ``label`` uint8 ``[B, H, W]`` in seen
    training ids, 255 ignore (int32 with ``ignore_index`` 65535 above 255 seen classes;
    ``loop.config["ignore_index"]``, default 255). Checkpoints hold the whole MaskFormer state
    dict, loaded strictly.
    """
    cfg = loop.config
    model = build_model(cfg)
    text = torch.tensor(np.asarray(cfg["seen_text"], dtype=np.float32)) if cfg["seen_text"] is not None else None
    # the CLIP tower's last block / projection and a ResNet's unused stages feed no output
    ddp = loop.prepare(ProposalForward(model, text), find_unused_parameters=model.cfg.backbone == "clip")
    opt, sched = maskformer_optimizer(  # the scheduler is stepped once per optimisation step by loop.step
        model,
        loop.lr,
        backbone_lr_mult=cfg["backbone_lr_mult"],
        weight_decay=cfg["weight_decay"],
        weight_decay_norm=cfg["weight_decay_norm"],
        max_steps=loop.train.max_steps,
        power=cfg["poly_power"],
        warmup_steps=cfg["warmup_steps"],
        warmup_factor=cfg["warmup_factor"],
    )
    # SetCriterion with the config's weights; class_agnostic for objectness (every seen segment is class 0)
    criterion = model.criterion()
    loop.restore(ddp, opt, sched, model_state=(model.state_dict, lambda sd: load_strict(model, sd, "the checkpoint")))
    ddp.train()
    for batch in loop.batches("train"):
        images, labels = batch["image"], batch["label"]
        # one mask per seen class present
        targets = [semantic_to_targets(lab, cfg.get("ignore_index", 255)) for lab in labels]
        with loop.autocast():
            out = ddp(images)
            losses = criterion(out, targets)
        loop.step(
            losses["loss"], images=len(images), **{k: float(v.detach()) for k, v in losses.items() if k != "loss"}
        )


class ProposalPredictor:
    """Inference-actor model (``pipeline.inference``): decoded images -> mask logits of every query.

    The model is loaded once per actor with ``zeroseg.models.maskformer.load_proposal_model``, from
    a proposals artifact (``artifact_uri``), or from the artifact's ``proposals.json`` content
    (``proposals``) and a weights file anywhere the actor can read (``weights_uri``: the stage's
    final training checkpoint, written to shared storage, while the artifact is still being
    written on the driver).

    Args:
        artifact_uri: a proposals artifact (local path or store URI), or None.
        proposals: ``proposals.json`` content (with ``weights_uri``), or None.
        weights_uri: the full MaskFormer state dict (``weights.pt`` layout).
        text_uri: ``embeddings/train.npy`` of embed_text for the ``text`` head (its seen rows,
            ``proposals["seen"]``, are the classes the head scores; the class scores do not
            enter the recall), or None.
        device: torch device string.

    ``load(batch)``: ``{"images": [uint8 [H, W, 3]], "labels": [uint8 [H, W]], "label_uris", "sets"}``.
    ``__call__(inputs)``: ``{"mask_logits": float [B, Q, h/4, w/4]}`` with each image resized to
    the artifact's ``input.size`` (bilinear, antialiased) and normalised with its mean / std.

    Raises:
        ConfigError: a CUDA device on an actor without one; neither source or both given.
        DataError: an unreadable artifact, weights or embeddings file, an undecodable image or label.
    """

    def __init__(
        self,
        artifact_uri: str | None = None,
        proposals: Mapping[str, Any] | None = None,
        weights_uri: str | None = None,
        text_uri: str | None = None,
        device: str = "cpu",
    ) -> None:
        if (artifact_uri is None) == (proposals is None or weights_uri is None):
            raise ConfigError("ProposalPredictor needs artifact_uri, or proposals and weights_uri (not both)")
        self.device, self.device_name = actor_device(device, "pretrain_proposals.recall_device")
        if artifact_uri is not None:
            with local_copy(artifact_uri) as d:
                self.doc = read_proposals_json(d)
                self.model = load_proposal_model(d, device=self.device)
        else:
            with tempfile.TemporaryDirectory(prefix="zeroseg-proposals-") as d:
                Path(d, PROPOSALS_JSON).write_text(json.dumps(dict(proposals)))
                try:
                    Path(d, WEIGHTS_PT).write_bytes(read_bytes(weights_uri))
                except OSError as e:
                    raise DataError(f"cannot read the proposal model's weights {weights_uri}: {e}") from None
                self.doc = read_proposals_json(d)
                self.model = load_proposal_model(d, device=self.device)
        self.model.eval()
        self.text = None
        if self.model.class_head == "text":
            if text_uri is None:
                raise ConfigError("the proposal model's text head needs the seen-class text embeddings (text_uri)")
            try:
                arr = np.load(io.BytesIO(read_bytes(text_uri)), allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"cannot read text embeddings {text_uri}: {e}") from None
            rows = np.asarray(arr, dtype=np.float32)[list(self.doc["seen"])]
            self.text = torch.from_numpy(rows).to(self.device)
        self.size = tuple(int(s) for s in self.doc["input"]["size"])
        self.mean = torch.tensor(self.doc["input"]["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.doc["input"]["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.info = {"input_size": list(self.size)}

    def load(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        return decode_set_batch(batch, SET_COLUMN, "recall set")

    def __call__(self, inputs: Mapping[str, list[Any]]) -> dict[str, Any]:
        with torch.inference_mode():
            out = self.model(prepare_images(inputs["images"], self.size, self.mean, self.std), self.text)
        return {"mask_logits": out["pred_masks"]}


def pretrain_proposals(ctx: StageContext, cfg: PretrainProposalsConfig) -> dict[str, float]:
    """Train the proposal model, write the proposals artifact, then measure its recall (see
    ``stages.pretrain_proposals``).

    Returns:
        metrics: steps, global batch, base and backbone lr, parameter count, final loss terms, and
        ``<set>/recall<IoU%>_<group>`` per recall set (finite values only).

    Raises:
        DataError: no seen class; a recall set whose manifest has no images.
        ConfigError: an unknown recall set; augment.mean/std other than the built model's; cuda
            recall on a cluster without GPUs.
    """
    m = cfg.model
    splits = ctx.inputs["splits"]
    vocabs = vocabularies(splits)
    train_vocab = vocabs[TRAIN_VOCAB]
    seen = [int(c) for c in train_vocab.seen]
    # before fit (a worker would retry the error): the seen classes, their text rows, the recall sets
    seen_text = text_dim = None
    if m.class_head == "text":
        dim = model_embed_dim(cfg.clip)
        emb = text_embeddings(ctx.inputs["text"], vocabs, [TRAIN_VOCAB], dim=dim, clip_model=cfg.clip.model)
        seen_text, text_dim = seen_rows(train_vocab, emb[TRAIN_VOCAB]), dim
    else:
        seen_rows(train_vocab, np.zeros((len(train_vocab.names), 0), np.float32))  # no seen class: DataError
    evals = [n for n in vocabs if n != TRAIN_VOCAB]
    sets = PretrainProposals._recall_sets(cfg, evals)
    if not sets:
        ctx.log(
            "pretrain_proposals: no recall set (classes.json has no eval set, or recall_sets is []): "
            "proposal recall is not measured"
        )

    loop_config = {
        "model": m,
        "num_classes": 1 if m.class_head == "objectness" else len(seen),
        "text_dim": text_dim,
        "clip": cfg.clip,
        "seen_text": seen_text.tolist() if seen_text is not None else None,
        "backbone_lr_mult": cfg.backbone_lr_mult,
        "weight_decay": cfg.weight_decay,
        "weight_decay_norm": cfg.weight_decay_norm,
        "poly_power": cfg.poly_power,
        "warmup_steps": cfg.warmup_steps,
        "warmup_factor": cfg.warmup_factor,
    }
    # on the driver: a bad config fails before any worker starts; its weights come from the
    # final checkpoint, so the backbone's pretrained weights are not read here
    model = build_model(loop_config, load_backbone_weights=False)
    mean, std = cfg.augment.mean, cfg.augment.std
    if not (np.allclose(model.mean, mean, atol=1e-6) and np.allclose(model.std, std, atol=1e-6)):
        raise ConfigError(
            f"the {m.backbone} proposal model expects images normalised with mean {list(model.mean)} / std "
            f"{list(model.std)}, but pretrain_proposals.augment.mean/std are {list(mean)} / {list(std)}: set "
            "them to the model's"
        )
    feed = training_feed(splits, cfg.augment, cfg.train.seed, block_rows=cfg.block_rows)  # seen classes only
    loop_config["ignore_index"] = feed.ignore_index
    result = fit_stage(ctx, proposals_train_loop, loop_config, {"train": feed.dataset}, cfg.scaling, cfg.train)
    load_strict(model, result.model_state(), "the trained model state", "the MaskFormer proposal model")
    out = Path(ctx.output_dir)
    save_proposals(
        out, model, m, seen=seen, input_size=tuple(cfg.augment.crop_size), clip_spec=cfg.clip
    )  # metrics.json is written below, after the recall pass
    metrics = fit_metrics(result, {"backbone": cfg.backbone_lr_mult}, params=tensor_count(model.parameters()))
    doc: dict[str, Any] = {"train": dict(metrics), "precision": result.precision, "recall": {}}

    if sets:
        if not ray.is_initialized():  # the driver initialises Ray before a stage runs
            raise RuntimeError("pretrain_proposals needs an initialised Ray (ray.init) for its recall pass")
        device, gpus = resolve_device(cfg.recall_device, "pretrain_proposals.recall_device")
        table = set_rows(splits, sets, cfg.recall_max_images, what="recall set")
        evaluator = ProposalRecallEvaluator(set_specs(vocabs, sets), thresholds=cfg.recall_ious)
        ctx.log(f"recall pass: {table.num_rows} images of {', '.join(sets)} on {device}")
        t0 = time.perf_counter()
        merged, _ = reduce(
            ray.data.from_arrow(table),
            ProposalPredictor,
            {
                "proposals": read_proposals_json(out),
                "weights_uri": join(result.checkpoint_uri, "model.pt"),
                "text_uri": ctx.inputs["text"].file_uri(f"embeddings/{TRAIN_VOCAB}.npy")
                if seen_text is not None
                else None,
                "device": device,
            },
            {"recall": evaluator},
            batch_size=cfg.recall_batch_size,
            concurrency=cfg.recall_concurrency,
            num_gpus=gpus,
        )
        ctx.log(f"recall pass: done in {time.perf_counter() - t0:.1f} s")
        for name, r in merged["recall"].finalize().items():
            doc["recall"][name] = {
                "images": r["images"],
                "segments": r["segments"],
                "recalled": {g: dict(zip(map(str, cfg.recall_ious), r["recalled"][g])) for g in RECALL_GROUPS},
                "recall": {g: {str(t): v for t, v in r["recall"][g].items()} for g in RECALL_GROUPS},
            }
            for g in RECALL_GROUPS:
                for t, v in r["recall"][g].items():
                    metrics[f"{name}/{recall_key(t, g)}"] = v
        doc["recall_protocol"] = {
            "sets": sets,
            "max_images": cfg.recall_max_images,
            "ious": cfg.recall_ious,
            "input_size": list(cfg.augment.crop_size),
            "proposal": "sigmoid(mask logit) > 0.5 after bilinear upsampling to the label's size; every query",
            "segment": "the pixels of one class in an image's label; ignored pixels excluded from the IoU",
            "recalled": "best IoU over the proposals >= threshold",
        }
    (out / METRICS_JSON).write_text(json.dumps(json_safe(doc), indent=1) + "\n")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


__all__ = [
    "ProposalForward",
    "ProposalPredictor",
    "build_model",
    "pretrain_proposals",
    "proposals_train_loop",
]
