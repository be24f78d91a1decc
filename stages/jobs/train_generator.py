"""Job of stage ``train_generator`` (spec: ``stages.train_generator``): PADing's generator and
retrained class head as a Ray Train job on the feature artifact.

The per-worker loop (:func:`generator_train_loop`: a generator step with Adam + WarmupPolyLR and
a classifier step with SGD per iteration, gradients averaged by hand) and the driver side
(:func:`train_generator`: checks, fit, the segmenter artifact and ``generator.pt``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from pipeline.dag import StageContext
from pipeline.training import fit_stage
from pipeline.uri import local_copy
from stages.common import TRAIN_VOCAB, text_embeddings, vocabularies
from stages.extract_features import read_features_json
from stages.jobs._training import fit_metrics
from stages.jobs.methods._proposals import bound_proposals, check_seen
from stages.train_generator import GENERATOR_PT, TrainGeneratorConfig
from zeroseg.config.pading import GeneratorConfig
from zeroseg.errors import DataError
from zeroseg.models import WEIGHTS_PT, load_strict, save_segmenter
from zeroseg.models.maskformer import read_proposal_weights
from zeroseg.models.pading import FeatureGenerator, PADing, extend_head
from zeroseg.optim import pading_optimizers


def _sync_grads(params: list[Any], world: int) -> None:
    """Average gradients over workers (the same collectives on every rank: a missing gradient
    counts as zeros). No DDP wrapper: each step runs two backward passes on two parameter sets."""
    if world <= 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def generator_train_loop(loop: Any) -> None:
    """Per-worker loop (``pipeline.training``).

    ``loop.config``: ``features_uri`` (the feature artifact), ``class_text`` ``[C, D]``, ``seen``,
    ``unseen``, ``model`` / ``classifier`` (the validated ``GeneratorConfig`` / ``RetrainConfig``), ``head_weight`` ``[C + 1, d]`` /
    ``head_bias`` (the extended pretrained head), ``generator_phase``, ``schedule``,
    ``generator_lr_ratio`` (generator lr / head lr), ``poly_power``, ``warmup_steps``,
    ``warmup_factor``. Batches: ``id`` (image rows of the feature arrays). Checkpoints hold the
    whole :class:`FeatureGenerator`, the generator's Adam + schedule and the head's SGD.
    """
    cfg = loop.config
    # Memory-mapped (the COCO-Stuff artifact is ~12 GB): each step reads only its batch's rows; the
    # files stay available (a remote artifact's local copy too) for the loop's lifetime.
    with local_copy(cfg["features_uri"]) as d:
        emb = np.load(Path(d) / "features/embeddings.npy", mmap_mode="r")  # [N, Q, d]
        lab = np.load(Path(d) / "features/labels.npy", mmap_mode="r")  # [N, Q]
        _generator_steps(loop, emb, lab)


def _generator_steps(loop: Any, emb: np.ndarray, lab: np.ndarray) -> None:
    """The body of :func:`generator_train_loop` over the (memory-mapped) feature arrays
    ``emb [N, Q, d]`` and ``lab [N, Q]``."""
    cfg = loop.config
    text = torch.tensor(np.asarray(cfg["class_text"], np.float32))
    c = len(text)
    model = FeatureGenerator(cfg["model"], c, cfg["seen"], cfg["unseen"], text)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(cfg["head_weight"]))
        model.head.bias.copy_(torch.tensor(cfg["head_bias"]))
    model.to(loop.device)
    phase = int(cfg["generator_phase"])
    gen_params = model.generator_parameters()
    r = cfg["classifier"]
    gen_opt, sched, head_opt = pading_optimizers(
        gen_params,
        model.head.parameters(),
        loop.lr,
        generator_lr=loop.lr * cfg["generator_lr_ratio"],
        generator_steps=phase,
        power=cfg["poly_power"],
        warmup_steps=cfg["warmup_steps"],
        warmup_factor=cfg["warmup_factor"],
        momentum=r.momentum,
        weight_decay=r.weight_decay,
    )
    loop.restore(model, gen_opt, sched, head_optimizer=head_opt)
    model.train()
    for batch in loop.batches("train"):
        rows = batch["id"].cpu().numpy()
        e = torch.from_numpy(np.ascontiguousarray(emb[rows])).to(loop.device)  # [B, Q, d]
        y = torch.from_numpy(np.ascontiguousarray(lab[rows])).long().to(loop.device)  # [B, Q], -1 no-object
        step = loop.global_step
        metrics: dict[str, float] = {}
        loss = 0.0
        if step < phase:
            matched = y >= 0
            gen_opt.zero_grad(set_to_none=True)
            if bool(matched.any()):
                parts = model.generator_losses(e[matched], y[matched])
                parts["loss"].backward()
                metrics.update({f"gen_{k}": float(v.detach()) for k, v in parts.items()})
                loss += float(parts["loss"].detach())
            _sync_grads(gen_params, loop.world_size)
            gen_opt.step()
            sched.step()
        if cfg["schedule"] == "joint" or step >= phase:
            head_opt.zero_grad(set_to_none=True)
            targets = torch.where(y >= 0, y, torch.full_like(y, c))
            cls = model.classifier_loss(e.flatten(0, 1), targets.flatten(), r)
            cls.backward()
            _sync_grads(list(model.head.parameters()), loop.world_size)
            head_opt.step()
            metrics["cls_loss"] = float(cls.detach())
            loss += float(cls.detach())
        loop.step_done(loss, images=len(rows), **metrics)


def train_generator(ctx: StageContext, cfg: TrainGeneratorConfig) -> dict[str, float]:
    """Train PADing's generator and retrained head on the feature artifact and write the segmenter
    artifact plus ``generator.pt`` (see ``stages.train_generator``).

    Returns:
        metrics (``stages.jobs._training.fit_metrics``): steps, global batch, ``base_lr`` (the
        head's SGD lr) and ``generator_lr`` (the generator's Adam lr), generator steps, final loss
        terms, the synthetic check (:func:`synthetic_check`); floats, non-finite values left out.

    Raises:
        DataError: classes.json without seen or unseen training classes; unseen classes without an
            embedding; features of other proposals or another size; proposals without the linear head
            or trained on other seen classes.
    """
    m = cfg.model
    vocabs = vocabularies(ctx.inputs["splits"])
    train = vocabs[TRAIN_VOCAB]
    text_art = ctx.inputs["text"]
    emb = text_embeddings(text_art, vocabs, [TRAIN_VOCAB], dim=m.text_dim, clip_model=cfg.clip.model)[TRAIN_VOCAB]
    if not train.seen or not train.unseen:
        raise DataError(
            f"classes.json: PADing needs seen and unseen training classes, got {len(train.seen)} seen and "
            f"{len(train.unseen)} unseen; set build_splits.split"
        )
    norms = np.linalg.norm(emb, axis=1)
    bad = [train.names[u] for u in train.unseen if not (np.isfinite(emb[u]).all() and norms[u] > 1e-6)]
    if bad:
        raise DataError(
            f"text artifact {text_art.stage}/{text_art.key[:12]}: unseen classes {bad[:10]} have no embedding "
            "(zero or non-finite rows of embeddings/train.npy): the generator cannot synthesise them; re-run embed_text"
        )
    fdoc, fwhere = read_features_json(ctx.inputs["features"])
    prop = ctx.inputs["proposals"]
    pdoc, pwhere = bound_proposals(prop)
    if fdoc["proposals_key"] != prop.key:
        raise DataError(
            f"{fwhere} was extracted with proposals {fdoc['proposals_key'][:12]}, but train_generator binds "
            f"{pwhere}: its features come from another backbone; bind extract_features of the same pretrain_proposals"
        )
    if fdoc["hidden_dim"] != m.feature_dim:
        raise DataError(
            f"{fwhere} holds {fdoc['hidden_dim']}-d query embeddings but train_generator.model.feature_dim is "
            f"{m.feature_dim}: set it to {fdoc['hidden_dim']} (the proposal model's hidden_dim)"
        )
    if int(fdoc["matched"]) == 0:
        raise DataError(f"{fwhere} has no matched seen feature: the generator has nothing to learn from")
    if pdoc.get("class_head") != "linear":
        raise DataError(f"{pwhere}: class head {pdoc.get('class_head')!r}; PADing needs model.class_head: linear")
    check_seen(pdoc, train.seen, pwhere)
    sd = read_proposal_weights(prop.file(WEIGHTS_PT))
    hw, hb = extend_head(
        sd["class_embed.weight"],
        sd["class_embed.bias"],
        train.seen,
        train.unseen,
        len(train.names),
        cfg.classifier.head_init,
    )
    phase = cfg.generator_phase()
    loop_config = {
        "features_uri": ctx.inputs["features"].uri,
        "class_text": emb.tolist(),
        "seen": list(train.seen),
        "unseen": list(train.unseen),
        "model": m,
        "classifier": cfg.classifier,
        "head_weight": hw.tolist(),
        "head_bias": hb.tolist(),
        "generator_phase": phase,
        "schedule": cfg.schedule,
        "generator_lr_ratio": cfg.generator_lr / cfg.train.lr,
        "poly_power": cfg.poly_power,
        "warmup_steps": cfg.warmup_steps,
        "warmup_factor": cfg.warmup_factor,
    }
    n = int(fdoc["images"])
    ctx.log(
        f"train_generator: {m.generator} generator (align {m.align}, disentangle {m.disentangle}), schedule "
        f"{cfg.schedule} ({phase} generator steps of {cfg.train.max_steps}); {n} images x {fdoc['num_queries']} "
        f"queries from {fwhere}; {len(train.seen)} seen / {len(train.unseen)} unseen classes"
    )
    ds = ray.data.range(n)
    result = fit_stage(ctx, generator_train_loop, loop_config, {"train": ds}, cfg.scaling, cfg.train)
    state = result.model_state()
    seg = PADing(None, {"proposals": pdoc, "classes": len(train.names), "text_dim": m.text_dim})
    load_strict(seg.proposals, sd, f"{pwhere} {WEIGHTS_PT}", "the proposal model")
    with torch.no_grad():
        seg.head.weight.copy_(state["head.weight"])
        seg.head.bias.copy_(state["head.bias"])
        seg.class_text.copy_(torch.from_numpy(emb))
    out = Path(ctx.output_dir)
    save_segmenter(out, seg, cfg.clip, "pading", seg.trainable_state_dict())
    torch.save({k: v for k, v in state.items() if not k.startswith("head.")}, out / GENERATOR_PT)
    metrics = fit_metrics(result, {"generator": cfg.generator_lr / cfg.train.lr}, generator_steps=phase)
    metrics.update(synthetic_check(m, state, emb, train))
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def synthetic_check(m: GeneratorConfig, state: Mapping[str, Any], emb: np.ndarray, train: Any) -> dict[str, float]:
    """How the retrained head classifies fresh synthetic unseen features (10 per unseen class, eval
    mode): ``synthetic_unseen_acc`` (its own class), ``synthetic_unseen_as_seen`` (a seen class).
    Seeded (0) on a forked CPU RNG: the driver's global torch RNG is left as it was."""
    ids = torch.tensor(list(train.unseen)).repeat(10)
    # the module's initialisation and the generator's noise draw from the global RNG
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        g = FeatureGenerator(m, len(train.names), train.seen, train.unseen, torch.from_numpy(emb))
        load_strict(g, state, "the trained generator state")
        g.eval()
        pred = g.head(g.generate(ids)[0]).argmax(-1)
    seen = torch.tensor(list(train.seen))
    return {
        "synthetic_unseen_acc": float((pred == ids).float().mean()),
        "synthetic_unseen_as_seen": float(torch.isin(pred, seen).float().mean()),
    }


__all__ = ["generator_train_loop", "synthetic_check", "train_generator"]
