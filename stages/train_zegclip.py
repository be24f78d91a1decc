"""``train_classifier.method: zegclip``: inductive ZegCLIP training as a Ray Train job.

Wires the build_splits manifest (Ray Data feed, ``pipeline/datasets.py``), the seen-class text
embeddings (embed_text) and the ZegCLIP model (``zeroseg/models/zegclip.py``) into the one
training wrapper (``pipeline/training.py``). Training sees seen classes only: labels are
remapped to seen-class training ids (every other id, unseen included, becomes 255) and the
decoder's class queries are the seen-class text embeddings (ZegCLIP Sec. 3.1); inference
(evaluate) scores seen + unseen classes with the same weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.training import ScalingSection, TrainSection, fit
from zeroseg.data.transforms import AugmentConfig, Size, make_lut
from zeroseg.errors import DataError


class ZegCLIPTrainConfig(BaseModel):
    """The ``train_classifier`` keys that ZegCLIP training reads (unknown keys are errors).

    ``model`` holds ZegCLIP's own keys (``zeroseg.models.zegclip.ZEGCLIP_DEFAULT_CONFIG``:
    backbone dpt/ft/fix, prompt_tokens, rd, decoder_*, loss, loss_alpha, loss_beta, ...).
    Paper settings (ZegCLIP Sec. 4.2, released configs): ViT-B/16, 512x512 crops, global batch 16,
    AdamW lr 2e-5 (x10 for prompts and head), weight decay 0.01, poly schedule (power 0.9) with
    linear warm-up, 20k (VOC) / 40k (Context) / 80k (COCO-Stuff) iterations.

    ``warmup_steps``: optimizer steps of linear warm-up (lr factor ``(s + 1) / warmup_steps``;
    0: none). ``poly_power``: exponent ``p`` of the poly decay ``(1 - s / max_steps) ** p``
    (``s``: optimizer steps done). ``head_lr_mult``: lr multiplier for every trained parameter.

    ``block_rows``: images per Ray Data decode task. 32 keeps the per-task overhead small enough
    for the feed to keep up with a PyTorch DataLoader (``benchmarks/bench_train_feed.py``: 8 rows
    per task gave 0.81-0.83 of the DataLoader's images/s on 2 CPUs, 32 rows 0.94-0.97).
    """

    model_config = ConfigDict(extra="forbid")
    model: dict[str, Any] = Field(default_factory=dict)
    train: TrainSection = TrainSection(max_steps=20000, batch_size=4, lr=2e-5, reference_batch_size=16)
    scaling: ScalingSection = ScalingSection()
    augment: AugmentConfig = AugmentConfig()
    weight_decay: float = Field(0.01, ge=0)
    head_lr_mult: float = Field(10.0, gt=0)
    warmup_steps: int = Field(1500, ge=0)
    poly_power: float = Field(0.9, ge=0)
    block_rows: int = Field(32, gt=0)


def seen_text_embeddings(vocab: Mapping[str, Any], emb: np.ndarray) -> np.ndarray:
    """The ``[S, D]`` rows of ``emb`` (embed_text's ``embeddings/train.npy``) for the seen classes
    of ``vocab`` (the ``train`` entry of build_splits' ``classes.json``), in ``seen`` order.

    Raises:
        DataError: ``emb`` is not one row per training class, a seen id has no row, or no class
            is seen (ZegCLIP's class queries are the seen-class embeddings: nothing to train).
    """
    names = list(vocab["names"])
    if emb.ndim != 2 or emb.shape[0] != len(names):
        raise DataError(f"embeddings/train.npy has shape {emb.shape} for {len(names)} training classes "
                        "(classes.json); re-run embed_text")
    seen = [int(c) for c in vocab.get("seen") or []]
    bad = [c for c in seen if not 0 <= c < len(names)]
    if bad:
        raise DataError(f"classes.json: seen class ids {bad} of the training vocabulary are outside "
                        f"[0, {len(names)}): no text embedding row; re-run build_splits and embed_text")
    if not seen:
        raise DataError(f"classes.json: the training vocabulary ({vocab.get('dataset', '?')!r}, {len(names)} classes) "
                        "has no seen class, so ZegCLIP has no class to train on; make build_splits.split leave "
                        "some classes seen (split.unseen / split.seen) and re-run build_splits")
    return emb[seen]


class _LossModule:
    """Factory for a DDP-friendly module whose ``forward`` returns ZegCLIP's training loss
    (DDP synchronises gradients only through ``forward``)."""

    @staticmethod
    def build(segmenter: Any, text: Any) -> Any:
        import torch

        class ZegCLIPLoss(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = segmenter
                self.register_buffer("text", text, persistent=False)

            def forward(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
                return self.model.loss(images, target, self.text)

        return ZegCLIPLoss()


def build_model(clip_spec: dict[str, Any], model_cfg: dict[str, Any]) -> Any:
    """ZegCLIP on a freshly loaded CLIP (``zeroseg.models.clip.load_clip``)."""
    from zeroseg.models.clip import ClipSpec, load_clip
    from zeroseg.models.zegclip import ZegCLIP

    return ZegCLIP(load_clip(ClipSpec.model_validate(clip_spec)), model_cfg)


def zegclip_train_loop(loop: Any) -> None:
    """Per-worker loop (see ``pipeline/training.py``): AdamW, poly LR with linear warm-up.

    Schedule from ZegCLIP's released mmseg config (``configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py``:
    ``lr_config`` poly, power 0.9, linear warm-up 1500 iters; its ``min_lr`` 1e-6 is 0 here), as a
    ``LambdaLR`` factor applied per optimizer step.

    ``loop.config``: ``clip`` (ClipSpec dict), ``model`` (ZegCLIP cfg), ``seen_text``
    (``[S, D]`` seen-class text embeddings, L2-normalised), ``weight_decay``, ``head_lr_mult``,
    ``warmup_steps``, ``poly_power``. Batches: ``image`` float32 ``[B, 3, H, W]``, ``label``
    uint8 ``[B, H, W]`` in seen training ids with 255 ignore.
    """
    import torch

    cfg = loop.config
    seg = build_model(cfg["clip"], cfg["model"])
    text = torch.tensor(np.asarray(cfg["seen_text"], dtype=np.float32))
    # the last decoder layer's FFN feeds no mask (masks are its attention logits, Eq. 2)
    model = loop.prepare(_LossModule.build(seg, text), find_unused_parameters=True)
    groups = seg.optimizer_param_groups(cfg["weight_decay"])
    for g in groups:  # ZegCLIP's released config: lr_mult 10 for the prompts and the head
        g["lr"] = loop.lr * cfg["head_lr_mult"]
    opt = torch.optim.AdamW(groups, weight_decay=cfg["weight_decay"])  # every group sets its lr
    max_steps, warm, power = loop.train.max_steps, cfg["warmup_steps"], cfg["poly_power"]

    def factor(step: int) -> float:
        poly = max(0.0, 1.0 - step / max_steps) ** power
        return poly * (min(1.0, (step + 1) / warm) if warm else 1.0)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loop.restore(model, opt, sched)
    model.train()
    for batch in loop.batches("train"):  # tensors already on loop.device
        images = batch["image"]
        target = batch["label"].long()
        out = model(images, target)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        sched.step()
        loop.step_done(out["loss"], images=len(images),
                       **{k: float(v.detach()) for k, v in out.items() if k != "loss"})


def train_zegclip(ctx: Any, clip_spec: Any, cfg: ZegCLIPTrainConfig, input_size: Size | None) -> dict[str, Any]:
    """Run ZegCLIP training for ``ctx`` and save the segmenter artifact into ``ctx.output_dir``.

    Args:
        ctx: the train_classifier ``StageContext`` (inputs ``build_splits`` and ``embed_text``,
            ``output_dir``, ``train_storage`` / ``train_name`` for checkpoints, MLflow run, ``log``).
        clip_spec: the ``ClipSpec`` the model starts from (rebuilt in every worker).
        cfg: the ``train_classifier.zegclip`` section.
        input_size: ``[H, W]`` the segmenter runs at; ``None``: ``cfg.model["input_size"]``,
            else ``cfg.augment.crop_size``.

    Returns:
        metrics: steps, global batch, effective lr, final loss, trainable parameter count.

    Raises:
        DataError: no seen class has a text embedding row (:func:`seen_text_embeddings`), or the
            training feed gives a worker no full batch.
        NonFiniteLossError: the loss became NaN/inf (step and last good checkpoint named).
        CheckpointMismatchError: the checkpoint being resumed was written for another model config.
        ConfigError: the scaling section leaves no CPU for the data feed (see ``fit``).
    """
    import torch

    from pipeline.datasets import train_dataset
    from zeroseg.models import save_segmenter

    splits = ctx.inputs["build_splits"]
    vocab = json.loads(splits.file("classes.json").read_text())["train"]
    seen = [int(c) for c in vocab.get("seen") or []]
    emb = np.load(ctx.inputs["embed_text"].file("embeddings/train.npy")).astype(np.float32)
    seen_text = seen_text_embeddings(vocab, emb)  # before fit: a worker would retry the error
    model_cfg = dict(cfg.model)
    size = list(input_size or model_cfg.get("input_size") or cfg.augment.crop_size)
    model_cfg["input_size"] = size
    lut = make_lut({int(c): i for i, c in enumerate(seen)})
    ds = train_dataset(splits.file("manifests/train.parquet"), lut, cfg.augment, cfg.train.seed,
                       block_rows=cfg.block_rows)
    spec = clip_spec.model_dump(mode="json")
    loop_config = {"clip": spec, "model": model_cfg, "seen_text": seen_text.tolist(),
                   "weight_decay": cfg.weight_decay, "head_lr_mult": cfg.head_lr_mult,
                   "warmup_steps": cfg.warmup_steps, "poly_power": cfg.poly_power}
    result = fit(zegclip_train_loop, loop_config, {"train": ds}, cfg.scaling, cfg.train,
                 ctx.train_storage, ctx.train_name,
                 {"tracking_uri": ctx.tracking_uri, "run_id": ctx.mlflow_run_id}, log=ctx.log)
    state = result.model_state()
    seg = build_model(spec, model_cfg)
    prefix = "model."
    names = set(seg.trainable_names())
    seg.load_trainable_state_dict({k[len(prefix):]: v for k, v in state.items()
                                   if k.startswith(prefix) and k[len(prefix):] in names})
    trainable = seg.trainable_state_dict()
    save_segmenter(Path(ctx.output_dir), "zegclip", clip_spec, seg.cfg,
                   {"size": size, "mean": list(seg.mean), "std": list(seg.std)}, trainable)
    (Path(ctx.output_dir) / "training.json").write_text(json.dumps({
        "steps": result.steps, "global_batch_size": result.global_batch_size, "effective_lr": result.effective_lr,
        "resumed_from_step": result.resumed_from_step, "checkpoint_uri": result.checkpoint_uri,
        "final_metrics": result.metrics}, indent=2, default=str))
    return {"steps": result.steps, "global_batch_size": result.global_batch_size,
            "effective_lr": result.effective_lr, "resumed_from_step": result.resumed_from_step,
            "trainable_params": int(sum(v.numel() for v in trainable.values() if torch.is_tensor(v))),
            **{f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
