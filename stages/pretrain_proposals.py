"""Stage ``pretrain_proposals``: the mask proposal model of the decoupled methods (ZegFormer,
DeOP), a MaskFormer trained on the seen classes as a Ray Train job, written as the *proposals
artifact* (``proposals.json``, ``weights.pt``, ``metrics.json``; ``zeroseg.models.proposals``).

Reads build_splits (``splits``: manifests, ``classes.json``) and, for the ``text`` class head,
embed_text (``text``: the seen-class rows of ``embeddings/train.npy``)::

    manifests/train.parquet -> stages.feeds.train_dataset (Ray Data: decode, remap to seen
      training ids with every other id -> 255, augment, normalise with the backbone's mean/std)
      -> Ray Train workers (pipeline.training.fit): MaskFormer forward (deep supervision) ->
         per image semantic_to_targets (one binary mask per seen class present) -> Hungarian
         matching + SetCriterion (CE with no-object weight, focal, dice; zeroseg.losses)
      -> proposals artifact (zeroseg.models.proposals.save_proposals)
    manifests/<recall set>.parquet -> pipeline.inference.reduce(ProposalPredictor,
      ProposalRecallEvaluator) -> recall at IoU 0.3 / 0.5 of seen, unseen and all segments

Training follows the released ZegFormer solver (dingjiansw101/ZegFormer ``train_net.py`` and
``configs/coco-stuff/Base-COCOStuff-171.yaml``; ``../shared/papers/released-code.md`` 1.1):
AdamW, lr 1e-4 at batch 32, weight decay 1e-4 (none on normalisation layers and embeddings:
``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` 0), lr x 0.1 for every parameter of a module whose
name contains ``backbone``, detectron2's ``WarmupPolyLR`` (power 0.9, no warm-up), the gradients'
total norm over the whole model clipped to 0.01 (``CLIP_TYPE: full_model``; here
``train.clip_grad_norm``, over every trained parameter), 60k iterations for COCO-Stuff (10k VOC).
Unseen pixels are 255 (ignored: no target mask covers them) and images are kept, as the
released ``prepare_coco_stuff_sem_seg_seen.py``. With ``class_head: objectness`` every seen
segment has class 0 (one "object" class plus no-object: the papers' class-agnostic grouping).

Wiring only; the network is ``zeroseg.models.proposals``, the losses ``zeroseg.losses``, the
recall ``zeroseg.evaluation.ProposalRecallEvaluator``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import Field, field_validator, model_validator

from pipeline.config import Runtime
from pipeline.dag import Input, Stage, StageConfig, StageContext
from pipeline.training import ScalingSection, TrainSection
from stages.common import TRAIN_VOCAB, random_weights_notice, seen_rows, text_embeddings, vocabularies
from zeroseg.config.clip import ClipSpec, model_embed_dim
from zeroseg.config.proposals import ProposalConfig
from zeroseg.data.transforms import CLIP_MEAN, CLIP_STD, AugmentConfig
from zeroseg.errors import ConfigError, DataError

#: ImageNet pixel statistics for images in [0, 1] (torchvision; MaskFormer's PIXEL_MEAN/STD
#: 123.675, 116.28, 103.53 / 58.395, 57.12, 57.375 divided by 255): the ResNet backbones' input.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SET_COLUMN = "eval_set"
#: The held-out set of the training dataset (build_splits ``val_fraction``): the default recall set.
HELD_OUT = "val"


def backbone_normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` in ``[0, 1]`` pixel units that the backbone expects: ImageNet's for the
    ResNets, OpenAI CLIP's for ``clip`` (a CLIP model with other statistics: set
    ``augment.mean`` / ``std`` to them; the stage checks them against the built model)."""
    return (CLIP_MEAN, CLIP_STD) if backbone == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def _recall_cells(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{set: {group: {threshold percent: value}}}`` of the recall metrics in ``metrics``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for k, v in metrics.items():
        m = re.fullmatch(r"(.+)/recall(\d+)_(seen|unseen|all)", k)
        if m:
            out.setdefault(m.group(1), {}).setdefault(m.group(3), {})[m.group(2)] = v
    return out


def recall_key(threshold: float, group: str) -> str:
    """The metric name of one recall value: ``recall30_seen`` for IoU 0.3 (MLflow names allow no ``@``)."""
    return f"recall{round(threshold * 100):d}_{group}"


class PretrainProposalsConfig(StageConfig):
    """``pretrain_proposals`` config section.

    ``clip``: the shared CLIP spec (injected from the top-level ``clip:``): the text embeddings'
    dimension for ``model.class_head: text`` and the image tower for ``model.backbone: clip``;
    otherwise unused and dropped (None), so that it stays out of the key. A missing backbone
    weights file fails at plan time (``ProposalConfig.key_payload``). ``model``: :class:`zeroseg.config.proposals.ProposalConfig`. ``train`` /
    ``scaling``: the training package's sections (defaults: the released COCO-Stuff schedule,
    60k steps at batch 32, lr 1e-4, clip 0.01). ``augment``: the training crops; its ``mean`` /
    ``std`` default to the backbone's (ImageNet for ResNets, CLIP's for ``clip``) and may not
    differ from them (the model normalises with them at inference). ``backbone_lr_mult``: lr
    multiplier of the backbone's parameters (released 0.1). ``weight_decay`` (released 1e-4) and
    ``weight_decay_norm`` (normalisation layers and embeddings; released 0). ``poly_power``,
    ``warmup_steps``, ``warmup_factor``: detectron2's ``WarmupPolyLR`` (released 0.9, 0, 1.0).

    Recall pass (after training): ``recall_sets`` (eval sets of ``classes.json``; default the
    held-out set ``val`` when build_splits made one, else every eval set; ``[]`` skips the pass),
    ``recall_max_images`` (first N images per set), ``recall_ious`` (IoU thresholds, DeOP's 0.3 and
    0.5). Runtime (not in the key): ``block_rows`` (images per Ray Data decode task),
    ``recall_batch_size``, ``recall_device`` (``auto``: cuda when the cluster has GPUs),
    ``recall_concurrency`` (inference actors).
    """

    clip: ClipSpec | None = None
    model: ProposalConfig = ProposalConfig()
    train: TrainSection = TrainSection(
        max_steps=60000, batch_size=32, lr=1e-4, reference_batch_size=32, clip_grad_norm=0.01
    )
    scaling: ScalingSection = ScalingSection()
    # released COCO-Stuff: short side drawn from 0.5..1.5 x 640 (max 2560), 640 x 640 crops, flip
    augment: AugmentConfig = AugmentConfig(crop_size=(640, 640), scale=(2560, 640), ratio_range=(0.5, 1.5))
    backbone_lr_mult: float = Field(0.1, ge=0)
    weight_decay: float = Field(1e-4, ge=0)
    weight_decay_norm: float = Field(0.0, ge=0)
    poly_power: float = Field(0.9, ge=0)
    warmup_steps: int = Field(0, ge=0)
    warmup_factor: float = Field(1.0, gt=0, le=1)
    recall_sets: list[str] | None = None
    recall_max_images: int | None = Field(None, ge=1)
    recall_ious: list[float] = [0.3, 0.5]
    block_rows: Annotated[int, Runtime(why="decode task size")] = Field(32, gt=0)
    recall_batch_size: Annotated[int, Runtime(why="inference batch size")] = Field(4, ge=1)
    recall_device: Annotated[str, Runtime(why="device")] = "auto"
    recall_concurrency: Annotated[int, Runtime(why="concurrency")] = Field(1, ge=1)

    @field_validator("recall_device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"recall_device must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v

    @field_validator("recall_ious")
    @classmethod
    def _ious(cls, v: list[float]) -> list[float]:
        if not v or any(not 0.0 < t <= 1.0 for t in v) or len(set(v)) != len(v):
            raise ValueError(f"recall_ious must be distinct IoU thresholds in (0, 1], got {v}")
        if len({round(t * 100) for t in v}) != len(v):
            raise ValueError(f"recall_ious {v}: two thresholds share a percent (metric names use whole percents)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PretrainProposalsConfig:
        m = self.model
        if not uses_clip(m):
            self.clip = None  # injected from the shared section but unused: it stays out of the key
        elif self.clip is None:
            need = (
                "model.class_head text (the text embeddings' size)" if m.class_head == "text" else "model.backbone clip"
            )
            raise ValueError(
                f"pretrain_proposals: {need} needs a CLIP spec: add the top-level clip: section "
                "(or pretrain_proposals.clip)"
            )
        bad = [s for s in self.augment.crop_size if s % m.size_divisibility]
        if bad:
            raise ValueError(
                f"pretrain_proposals: augment.crop_size {list(self.augment.crop_size)} must be a multiple of "
                f"model.size_divisibility {m.size_divisibility} (the crop is the model's input size)"
            )
        mean, std = backbone_normalisation(m.backbone)
        given = {k for k in ("mean", "std") if k in self.augment.model_fields_set}
        if not given:
            self.augment = self.augment.model_copy(update={"mean": mean, "std": std})
        elif m.backbone != "clip" and not (np.allclose(self.augment.mean, mean) and np.allclose(self.augment.std, std)):
            raise ValueError(
                f"pretrain_proposals: augment.mean/std {list(self.augment.mean)} / {list(self.augment.std)} differ "
                f"from the {m.backbone} backbone's normalisation {list(mean)} / {list(std)} (ImageNet), which the "
                "model uses at inference; remove augment.mean and augment.std"
            )
        return self


def uses_clip(model: ProposalConfig) -> bool:
    """Whether the proposal model needs the CLIP spec: the text head (its embedding size) or the
    CLIP backbone."""
    return model.class_head == "text" or model.backbone == "clip"


# =============================================================================================
# training (runs in Ray Train workers)
# =============================================================================================
def param_groups(
    model: Any, lr: float, backbone_lr_mult: float, weight_decay: float, weight_decay_norm: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups as the released ZegFormer ``Trainer.build_optimizer``: lr x
    ``backbone_lr_mult`` for the parameters of modules whose name contains ``backbone``, except the
    backbone's own new, randomly initialised layers (a module's ``RANDOM_INIT`` submodule names:
    the CLIP pyramid's ``norms`` / ``resample``, our departure; they train at the full lr);
    ``weight_decay_norm`` for normalisation layers and ``nn.Embedding`` (released
    ``WEIGHT_DECAY_NORM`` = ``WEIGHT_DECAY_EMBED`` = 0), ``weight_decay`` for the rest. Frozen
    parameters are left out; each parameter appears once.

    Returns:
        groups ``{"params", "lr", "weight_decay"}``, in the order of first appearance.
    """
    import torch.nn as nn

    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.Embedding)
    fresh = tuple(  # module-name prefixes of randomly initialised layers inside a backbone
        f"{mname}.{sub}" if mname else sub
        for mname, module in model.named_modules()
        for sub in getattr(module, "RANDOM_INIT", ())
    )
    groups: dict[tuple[float, float], list[Any]] = {}
    memo: set[int] = set()
    for mname, module in model.named_modules():
        pretrained = "backbone" in mname and not any(mname == f or mname.startswith(f + ".") for f in fresh)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in memo:
                continue
            memo.add(id(p))
            g = (
                lr * (backbone_lr_mult if pretrained else 1.0),
                weight_decay_norm if isinstance(module, norm_types) else weight_decay,
            )
            groups.setdefault(g, []).append(p)
    return [{"params": ps, "lr": g[0], "weight_decay": g[1]} for g, ps in groups.items()]


def build_model(cfg: Mapping[str, Any], device: Any = "cpu", load_backbone_weights: bool = True) -> Any:
    """The MaskFormer of a loop config (``model``, ``num_classes``, ``text_dim``, ``clip``: the
    CLIP visual tower is loaded only for ``backbone: clip``). ``load_backbone_weights``: False
    skips reading ``model.backbone_weights`` (the driver's copy, whose weights come from the final
    checkpoint; the workers load them for a fresh run).

    Raises:
        ConfigError: a bad model config or CLIP spec.
    """
    from zeroseg.models.maskformer import MaskFormer

    clip_visual = None
    if cfg["model"]["backbone"] == "clip":
        from zeroseg.models.clip import as_spec, load_clip

        clip_visual = load_clip(as_spec(cfg["clip"])).visual
    return MaskFormer(
        cfg["model"],
        cfg["num_classes"],
        text_dim=cfg["text_dim"],
        clip_visual=clip_visual,
        load_backbone_weights=load_backbone_weights,
    ).to(device)


def _forward_module(model: Any, text: Any) -> Any:
    """``forward(images) -> outputs`` of ``model`` with the seen-class text embeddings held as a
    non-persistent buffer (DDP wraps this module; checkpoints hold ``model``'s state only)."""
    import torch

    class ProposalForward(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.register_buffer("text", text, persistent=False)

        def forward(self, images: torch.Tensor) -> dict[str, Any]:
            return self.model(images, self.text)

    return ProposalForward()


def proposals_train_loop(loop: Any) -> None:
    """Per-worker loop (``pipeline.training``).

    ``loop.config``: ``model`` (ProposalConfig dump), ``num_classes`` (K: seen classes, 1 for
    objectness), ``text_dim``, ``clip`` (spec dict or None), ``seen_text`` (``[K, D]`` seen-class
    rows, L2-normalised; None unless ``class_head: text``), ``backbone_lr_mult``,
    ``weight_decay``, ``weight_decay_norm``, ``poly_power``, ``warmup_steps``, ``warmup_factor``.
    Batches: ``image`` float32 ``[B, 3, H, W]`` (normalised), ``label`` uint8 ``[B, H, W]`` in seen
    training ids, 255 ignore (int32 with ``ignore_index`` 65535 above 255 seen classes;
    ``loop.config["ignore_index"]``, default 255). Checkpoints hold the whole MaskFormer state
    dict, loaded strictly.
    """
    import torch

    from zeroseg.losses import semantic_to_targets
    from zeroseg.models.maskformer import poly_lr_factor

    cfg = loop.config
    mcfg = cfg["model"]
    model = build_model(cfg)
    text = torch.tensor(np.asarray(cfg["seen_text"], dtype=np.float32)) if cfg["seen_text"] is not None else None
    # the CLIP tower's last block / projection and a ResNet's unused stages feed no output
    ddp = loop.prepare(_forward_module(model, text), find_unused_parameters=mcfg["backbone"] == "clip")
    opt = torch.optim.AdamW(
        param_groups(model, loop.lr, cfg["backbone_lr_mult"], cfg["weight_decay"], cfg["weight_decay_norm"])
    )
    sched = torch.optim.lr_scheduler.LambdaLR(  # stepped once per optimisation step by loop.step
        opt,
        functools.partial(
            poly_lr_factor,
            max_steps=loop.train.max_steps,
            power=cfg["poly_power"],
            warmup_steps=cfg["warmup_steps"],
            warmup_factor=cfg["warmup_factor"],
        ),
    )
    # SetCriterion with the config's weights; class_agnostic for objectness (every seen segment is class 0)
    criterion = model.criterion()
    loop.restore(ddp, opt, sched, model_state=(model.state_dict, lambda sd: model.load_state_dict(sd, strict=True)))
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


# =============================================================================================
# the recall pass (runs in inference actors)
# =============================================================================================
def model_input(images: list[np.ndarray], size: tuple[int, int], mean: Any, std: Any) -> Any:
    """uint8 ``[H, W, 3]`` RGB images -> the proposal model's input ``float [B, 3, *size]`` on the
    device of ``mean``: scaled to [0, 1], resized bilinearly with antialiasing when the size
    differs (the recall protocol squashes to the training crop), normalised by ``mean`` / ``std``
    (``[1, 3, 1, 1]``)."""
    import torch
    import torch.nn.functional as F

    xs = []
    for image in images:
        a = image if image.flags.writeable and image.flags.c_contiguous else np.array(image, order="C")
        x = torch.from_numpy(a).to(mean.device).permute(2, 0, 1)[None].float().div_(255.0)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
        xs.append((x - mean) / std)
    return torch.cat(xs)


class ProposalPredictor:
    """Inference-actor model (``pipeline.inference``): decoded images -> mask logits of every query.

    The model is loaded once per actor with ``zeroseg.models.proposals.load_proposal_model``, from
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
        import io

        import torch

        from pipeline.uri import local_copy, read_bytes
        from zeroseg.models.maskformer import PROPOSALS_JSON, WEIGHTS_PT, load_proposal_model, read_proposals_json

        if (artifact_uri is None) == (proposals is None or weights_uri is None):
            raise ConfigError("ProposalPredictor needs artifact_uri, or proposals and weights_uri (not both)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"pretrain_proposals.recall_device {device!r}: this worker has no CUDA device "
                "(set recall_device: cpu, or give the workers GPUs)"
            )
        self.device = torch.device(device)
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
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.info = {"input_size": list(self.size)}

    def load(self, batch: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        from stages.feeds import decode_set_batch

        return decode_set_batch(batch, SET_COLUMN, "recall set")

    def __call__(self, inputs: Mapping[str, list[Any]]) -> dict[str, Any]:
        import torch

        with torch.inference_mode():
            out = self.model(model_input(inputs["images"], self.size, self.mean, self.std), self.text)
        return {"mask_logits": out["pred_masks"]}


# =============================================================================================
# driver side
# =============================================================================================
def recall_rows(ctx: StageContext, sets: list[str], max_images: int | None) -> Any:
    """One pyarrow table of the recall sets' manifest rows (URIs resolved) with the set column.

    Raises:
        DataError: a set whose manifest has no images.
    """
    import pyarrow as pa

    from stages.feeds import URI_COLUMNS, manifest_table

    parts = []
    for name in sets:
        t = manifest_table(ctx.inputs["splits"], name).select(list(URI_COLUMNS))
        if max_images is not None:
            t = t.slice(0, max_images)
        if t.num_rows == 0:
            raise DataError(f"recall set {name!r}: its manifest has no images")
        parts.append(t.append_column(SET_COLUMN, pa.array([name] * t.num_rows, pa.string())))
    return pa.concat_tables(parts)


def resolve_recall_device(device: str) -> tuple[str, float]:
    """``(torch device, GPUs per actor)`` of the recall pass (``auto``: cuda when the Ray cluster
    has GPUs).

    Raises:
        ConfigError: cuda asked for on a cluster without GPUs.
    """
    import ray

    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    dev = device if device != "auto" else ("cuda" if cluster_gpus > 0 else "cpu")
    if dev.startswith("cuda") and cluster_gpus == 0:
        raise ConfigError(
            f"pretrain_proposals.recall_device is {device!r} but the Ray cluster has no GPUs; set recall_device: cpu"
        )
    return dev, (1.0 if dev.startswith("cuda") else 0.0)


class PretrainProposals(Stage):
    """The MaskFormer proposal model of the decoupled methods (see module docstring)."""

    name = "pretrain_proposals"
    Config = PretrainProposalsConfig
    TEXT = Input(
        ("embed_text",),
        doc="seen-class text embeddings for model.class_head text (the linear and objectness heads need none)",
    )
    INPUTS = {
        "splits": Input(("build_splits",), doc="manifests and classes.json"),
        "text": TEXT,
    }
    shared = ("clip",)

    def inputs(self, config: PretrainProposalsConfig) -> dict[str, Input]:
        """``splits``, plus ``text`` (required) for the text head only: a head that reads no
        embeddings does not depend on them (their key stays out of this stage's)."""
        out = {"splits": self.INPUTS["splits"]}
        if config.model.class_head == "text":
            out["text"] = self.TEXT
        return out

    def terminal(self, config: PretrainProposalsConfig) -> bool:
        """With a recall pass (``recall_sets`` not ``[]``) the proposal model's recall is a result
        of its own (``configs/sample_proposals.yaml``); without one only a reader makes it useful."""
        return config.recall_sets != []

    def notices(self, config: PretrainProposalsConfig) -> list[str]:
        m = config.model
        out = random_weights_notice(config.clip) if uses_clip(m) else []
        if m.backbone != "clip" and m.backbone_weights is None:
            out.append(
                f"pretrain_proposals: the {m.backbone} backbone starts from random weights; set "
                "pretrain_proposals.model.backbone_weights (IMAGENET1K_V1, as the papers, or a .pth file) for real results"
            )
        return out

    def run(self, ctx: StageContext) -> dict[str, float]:
        import ray

        from pipeline.inference import reduce
        from pipeline.training import fit_stage
        from pipeline.uri import join
        from stages.feeds import leakage_guard, train_dataset
        from zeroseg.data.transforms import lut_ignore_index, make_lut
        from zeroseg.evaluation import RECALL_GROUPS, ProposalRecallEvaluator
        from zeroseg.metrics import json_safe
        from zeroseg.models.maskformer import METRICS_JSON, read_proposals_json, save_proposals

        cfg: PretrainProposalsConfig = ctx.config
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
        sets = self._recall_sets(cfg, evals)
        if not sets:
            ctx.log(
                "pretrain_proposals: no recall set (classes.json has no eval set, or recall_sets is []): "
                "proposal recall is not measured"
            )

        loop_config = {
            "model": m.model_dump(mode="json"),
            "num_classes": 1 if m.class_head == "objectness" else len(seen),
            "text_dim": text_dim,
            "clip": cfg.clip.model_dump(mode="json") if cfg.clip is not None else None,
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
        # every other id (unseen included) -> ignore: 255, or 65535 above 255 seen classes
        lut = make_lut({c: i for i, c in enumerate(seen)}, source_classes=len(train_vocab.names))
        loop_config["ignore_index"] = lut_ignore_index(lut)
        ds = train_dataset(
            splits, lut, cfg.augment, cfg.train.seed, block_rows=cfg.block_rows, guard=leakage_guard(splits, lut)
        )
        result = fit_stage(ctx, proposals_train_loop, loop_config, {"train": ds}, cfg.scaling, cfg.train)
        model.load_state_dict(result.model_state(), strict=True)
        out = Path(ctx.output_dir)
        save_proposals(
            out, model, m, seen=seen, input_size=tuple(cfg.augment.crop_size), clip_spec=cfg.clip
        )  # metrics.json is written below, after the recall pass
        metrics: dict[str, float] = {
            "steps": result.steps,
            "global_batch_size": result.global_batch_size,
            "base_lr": result.effective_lr,
            "backbone_lr": result.effective_lr * cfg.backbone_lr_mult,
            "resumed_from_step": result.resumed_from_step,
            "params": int(sum(p.numel() for p in model.parameters())),
            **{f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        }
        doc: dict[str, Any] = {"train": dict(metrics), "precision": result.precision, "recall": {}}

        if sets:
            if not ray.is_initialized():  # the driver initialises Ray before a stage runs
                raise RuntimeError("pretrain_proposals needs an initialised Ray (ray.init) for its recall pass")
            device, gpus = resolve_recall_device(cfg.recall_device)
            table = recall_rows(ctx, sets, cfg.recall_max_images)
            evaluator = ProposalRecallEvaluator(
                {
                    n: {
                        "num_classes": len(vocabs[n].names),
                        "seen": vocabs[n].seen,
                        "unseen": vocabs[n].unseen,
                        "ignore_index": vocabs[n].ignore_index,
                    }
                    for n in sets
                },
                thresholds=cfg.recall_ious,
            )
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

    @staticmethod
    def _recall_sets(cfg: PretrainProposalsConfig, evals: list[str]) -> list[str]:
        """The eval sets the recall pass reads (see the config docstring).

        Raises:
            ConfigError: a recall set that ``classes.json`` does not have.
        """
        if cfg.recall_sets is None:
            return [HELD_OUT] if HELD_OUT in evals else evals
        from pipeline.dag import nearest

        for n in cfg.recall_sets:
            if n not in evals:
                raise ConfigError(
                    f"pretrain_proposals.recall_sets: unknown eval set {n!r}{nearest(n, evals)} "
                    f"(eval sets of classes.json: {', '.join(evals) or 'none'})"
                )
        return list(cfg.recall_sets)

    def note(self, metrics: Mapping[str, Any]) -> str:
        """``steps=N, <set> R30/50 seen a/b unseen c/d`` (recall at each threshold)."""
        parts = [f"steps={int(metrics['steps'])}"] if "steps" in metrics else []
        cells = _recall_cells(metrics)
        for name, by in cells.items():
            ts = sorted({t for g in by.values() for t in g}, key=int)
            vals = {g: "/".join(f"{by[g][t]:.2f}" if t in by[g] else "-" for t in ts) for g in ("seen", "unseen")}
            parts.append(f"{name} R{'/'.join(ts)} seen {vals['seen']} unseen {vals['unseen']}")
        return ", ".join(parts)

    def summary(self, metrics: Mapping[str, Any]) -> list[Any]:
        """The recall table: rows ``recall<IoU%>``, columns ``<set> seen / unseen / all``."""
        from rich.table import Table

        rc = _recall_cells(metrics)
        if not rc:
            return []
        cols = [(name, g) for name, by in rc.items() for g in by]
        ts = sorted({t for by in rc.values() for d in by.values() for t in d}, key=int)
        table = Table(title="proposal recall (GT segments matched at IoU >= t)", title_justify="left")
        table.add_column("metric", no_wrap=True)
        for name, g in cols:
            table.add_column(f"{name} {g}", justify="right", no_wrap=True)
        for t in ts:
            table.add_row(f"recall{t}", *[f"{rc[n][g][t]:.3f}" if t in rc[n][g] else "-" for n, g in cols])
        return [table]


__all__ = [
    "PretrainProposals",
    "PretrainProposalsConfig",
    "ProposalPredictor",
    "backbone_normalisation",
    "param_groups",
    "proposals_train_loop",
    "recall_key",
]
