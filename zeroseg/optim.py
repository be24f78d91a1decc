"""Parameter groups, optimisers and learning-rate schedules of every training recipe, in one place
(detectron2's ``solver/build.py`` is the model: the groups from the model and the recipe's
multipliers, then the optimiser, then a schedule stepped once per optimisation step).

Torch only, no Ray: a notebook or a benchmark builds the same optimiser as the training stage.

Schedules are unitless factors of each group's initial lr (``torch.optim.lr_scheduler.LambdaLR``),
evaluated at the number of optimisation steps done:

* :func:`poly_lr_factor`: detectron2's ``WarmupPolyLR`` (MaskFormer / ZegFormer's proposal model,
  DeOP, PADing's generator);
* :func:`zegclip_lr_factor`: mmcv's poly schedule with an absolute ``min_lr`` and a linear warm-up
  (ZegCLIP, ZegCLIP+ST).

Recipes (each returns the optimiser(s) and the scheduler):

=========================  ==================================================================
:func:`zegclip_optimizer`  AdamW, every trained parameter at ``lr x head_lr_mult``, no decay on
                           norm layers; mmcv poly + warm-up (ZegCLIP released config)
:func:`deop_optimizer`     AdamW, no decay on norm layers and embeddings; WarmupPolyLR without
                           warm-up (DeOP released config)
:func:`maskformer_optimizer`  AdamW, backbone lr x ``backbone_lr_mult``, ``weight_decay_norm``
                           on norm layers and embeddings; WarmupPolyLR (ZegFormer released)
:func:`pading_optimizers`  Adam for the generator with WarmupPolyLR, SGD for the class head
                           (PADing released)
=========================  ==================================================================
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

#: Normalisation layers and embeddings: what detectron2's ``WEIGHT_DECAY_NORM`` /
#: ``WEIGHT_DECAY_EMBED`` cover (``solver/build.py`` ``get_default_optimizer_params``).
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.Embedding)
#: The norm layers DeOP's released ``build_optimizer`` exempts from weight decay (with embeddings).
DEOP_NORM_TYPES = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.Embedding)


# --------------------------------------------------------------------------------------------- schedules
def poly_lr_factor(
    step: int, max_steps: int, power: float = 0.9, warmup_steps: int = 0, warmup_factor: float = 1.0
) -> float:
    """detectron2's ``WarmupPolyLR`` (``projects/deeplab/lr_scheduler.py``: linear warm-up,
    constant ending 0) as a unitless multiplier of the base lr at optimisation step ``step``:
    ``w(step) * max(0, 1 - step / max_steps) ** power`` with ``w = warmup_factor * (1 - a) + a``,
    ``a = step / warmup_steps`` during the warm-up and 1 after it (0 at and after ``max_steps``).
    The proposal model's solver (ZegFormer / MaskFormer released), DeOP's (``WARMUP_ITERS 0``,
    power 0.9) and PADing's generator (10 warm-up iterations) use it."""
    warm = 1.0
    if step < warmup_steps:
        a = step / warmup_steps
        warm = warmup_factor * (1.0 - a) + a
    return warm * max(0.0, 1.0 - step / max_steps) ** power


def zegclip_lr_factor(
    step: int,
    max_steps: int,
    base_lr: float,
    *,
    min_lr: float = 1e-6,
    power: float = 0.9,
    warmup_steps: int = 1500,
    warmup_ratio: float = 1e-6,
) -> float:
    """The learning-rate factor of ZegCLIP's released schedule at optimizer step ``step``
    (0-based): poly decay to an absolute ``min_lr`` with a linear warm-up, as mmcv's
    ``PolyLrUpdaterHook`` and ``LrUpdaterHook.get_warmup_lr`` compute it for the released
    configs (``lr_config=dict(policy="poly", power=0.9, min_lr=1e-6, by_epoch=False, warmup="linear",
    warmup_iters=1500, warmup_ratio=1e-6)``; released-code.md section 4; the paper only says
    "the MMSeg default schedule")::

        poly(s) = (base_lr - min_lr) * (1 - s / max_steps) ** power + min_lr
        warm(s) = 1 - (1 - s / warmup_steps) * (1 - warmup_ratio)     for s < warmup_steps, else 1
        factor  = poly(s) * warm(s) / base_lr

    Args:
        step: optimizer steps done; max_steps: the total (the decay reaches ``min_lr`` there).
        base_lr: the parameter group's learning rate (after ``lr_mult``; ``min_lr`` is absolute,
            as in mmcv); min_lr: 0 decays to zero.
        warmup_steps: 0 disables the warm-up.

    Returns:
        the factor (unitless) that multiplies ``base_lr``.
    """
    s = min(max(step, 0), max_steps)
    poly = (base_lr - min_lr) * (1.0 - s / max_steps) ** power + min_lr
    warm = 1.0 - (1.0 - s / warmup_steps) * (1.0 - warmup_ratio) if warmup_steps and s < warmup_steps else 1.0
    return poly * warm / base_lr


def lambda_schedule(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> Any:
    """``LambdaLR(optimizer, factor)``: every group's lr is its initial lr x ``factor(steps done)``;
    step it once per optimisation step (the training loop's ``loop.step`` does)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------- groups
def decay_groups(
    params: Iterable[tuple[nn.Parameter, bool]], weight_decay: float, lr: float | None = None
) -> list[dict[str, Any]]:
    """Two groups from ``(parameter, exempt)`` pairs in order: the others with ``weight_decay``,
    then (when any) the exempt ones with none. ``lr``: set on both groups (None: left to the
    optimiser's default).

    Returns:
        ``[{"params", "weight_decay"[, "lr"]}, ...]`` (one or two groups).
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p, exempt in params:
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if lr is not None:
        for g in groups:
            g["lr"] = lr
    return groups


def zegclip_param_groups(seg: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict[str, Any]]:
    """ZegCLIP's groups over its trained parameters (``seg.trainable_names()``, in
    ``named_parameters`` order): norm layers (a name component starting with ``norm`` or ``ln``)
    without weight decay, the rest with ``weight_decay`` (released config's ``decay_mult=0`` for
    ``norm`` / ``ln``). ``lr``: every group's (None: left to the caller)."""
    names = set(seg.trainable_names())
    pairs = (
        (p, any(s.startswith("norm") or s.startswith("ln") for s in n.split(".")))
        for n, p in seg.named_parameters()
        if n in names
    )
    return decay_groups(pairs, weight_decay, lr)


def deop_param_groups(seg: nn.Module, weight_decay: float, lr: float | None = None) -> list[dict[str, Any]]:
    """DeOP's groups over its learned tensors (``seg.learned_names()``, in ``named_modules`` order)
    as the released ``build_optimizer``: LayerNorm / BatchNorm / GroupNorm and ``nn.Embedding``
    parameters without weight decay (``WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED`` 0), the rest
    with ``weight_decay``. ``lr``: every group's (None: left to the caller)."""
    names = set(seg.learned_names())
    pairs = (
        (p, isinstance(mod, DEOP_NORM_TYPES))
        for mname, mod in seg.named_modules()
        for pname, p in mod.named_parameters(recurse=False)
        if (f"{mname}.{pname}" if mname else pname) in names
    )
    return decay_groups(pairs, weight_decay, lr)


def maskformer_param_groups(
    model: nn.Module, lr: float, backbone_lr_mult: float, weight_decay: float, weight_decay_norm: float
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
                weight_decay_norm if isinstance(module, NORM_TYPES) else weight_decay,
            )
            groups.setdefault(g, []).append(p)
    return [{"params": ps, "lr": g[0], "weight_decay": g[1]} for g, ps in groups.items()]


# --------------------------------------------------------------------------------------------- recipes
def zegclip_optimizer(
    seg: nn.Module,
    lr: float,
    *,
    head_lr_mult: float,
    weight_decay: float,
    max_steps: int,
    min_lr: float,
    power: float,
    warmup_steps: int,
    warmup_ratio: float,
) -> tuple[torch.optim.AdamW, Any]:
    """ZegCLIP's released optimiser and schedule (``configs/voc12/vpt_seg_zero_vit-b_512x512_20k_12_10.py``;
    released-code.md section 4): AdamW over :func:`zegclip_param_groups` with every group at
    ``lr x head_lr_mult`` (the released ``lr_mult`` 10 for the prompts and the head), and
    :func:`zegclip_lr_factor` over ``max_steps`` (the schedule's horizon) with that lr as
    ``base_lr``. ``lr``: the base lr after the global-batch scaling.

    Returns:
        ``(optimizer, scheduler)``.
    """
    base = lr * head_lr_mult
    opt = torch.optim.AdamW(zegclip_param_groups(seg, weight_decay, base), weight_decay=weight_decay)
    factor = functools.partial(
        zegclip_lr_factor,
        max_steps=max_steps,
        base_lr=base,
        min_lr=min_lr,
        power=power,
        warmup_steps=warmup_steps,
        warmup_ratio=warmup_ratio,
    )
    return opt, lambda_schedule(opt, factor)


def deop_optimizer(
    seg: nn.Module, lr: float, *, weight_decay: float, max_steps: int, power: float
) -> tuple[torch.optim.AdamW, Any]:
    """DeOP's released optimiser and schedule (CongHan0808/DeOP ``scripts/deop_train.sh`` and the
    base config; released-code.md section 2.1): AdamW over :func:`deop_param_groups` at ``lr``,
    detectron2's ``WarmupPolyLR`` without warm-up (:func:`poly_lr_factor`, ``power``) over
    ``max_steps``.

    Returns:
        ``(optimizer, scheduler)``.
    """
    opt = torch.optim.AdamW(deop_param_groups(seg, weight_decay, lr), weight_decay=weight_decay)
    return opt, lambda_schedule(opt, functools.partial(poly_lr_factor, max_steps=max_steps, power=power))


def maskformer_optimizer(
    model: nn.Module,
    lr: float,
    *,
    backbone_lr_mult: float,
    weight_decay: float,
    weight_decay_norm: float,
    max_steps: int,
    power: float,
    warmup_steps: int,
    warmup_factor: float,
) -> tuple[torch.optim.AdamW, Any]:
    """The proposal model's (MaskFormer's) released solver (dingjiansw101/ZegFormer ``train_net.py``,
    ``configs/coco-stuff/Base-COCOStuff-171.yaml``; released-code.md 1.1): AdamW over
    :func:`maskformer_param_groups` and detectron2's ``WarmupPolyLR`` (:func:`poly_lr_factor`)
    over ``max_steps``.

    Returns:
        ``(optimizer, scheduler)``.
    """
    opt = torch.optim.AdamW(maskformer_param_groups(model, lr, backbone_lr_mult, weight_decay, weight_decay_norm))
    factor = functools.partial(
        poly_lr_factor, max_steps=max_steps, power=power, warmup_steps=warmup_steps, warmup_factor=warmup_factor
    )
    return opt, lambda_schedule(opt, factor)


def pading_optimizers(
    generator_params: list[nn.Parameter],
    head_params: Iterable[nn.Parameter],
    lr: float,
    *,
    generator_lr: float,
    generator_steps: int,
    power: float,
    warmup_steps: int,
    warmup_factor: float,
    momentum: float,
    weight_decay: float,
) -> tuple[torch.optim.Adam, Any, torch.optim.SGD]:
    """PADing's released optimisers (heshuting555/PADing ``SimpleMULTISTEPTrainer``; released-code.md
    3.4): Adam for the generator's parameters at ``generator_lr`` with detectron2's ``WarmupPolyLR``
    (:func:`poly_lr_factor`) over the ``generator_steps`` that have a generator step, and SGD for the
    class head at ``lr`` with ``momentum`` and ``weight_decay`` (no schedule).

    Returns:
        ``(generator optimizer, its scheduler, head optimizer)``.
    """
    gen_opt = torch.optim.Adam(generator_params, lr=generator_lr)
    factor = functools.partial(
        poly_lr_factor, max_steps=generator_steps, power=power, warmup_steps=warmup_steps, warmup_factor=warmup_factor
    )
    sched = lambda_schedule(gen_opt, factor)
    head_opt = torch.optim.SGD(head_params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return gen_opt, sched, head_opt


__all__ = [
    "DEOP_NORM_TYPES",
    "NORM_TYPES",
    "decay_groups",
    "deop_optimizer",
    "deop_param_groups",
    "lambda_schedule",
    "maskformer_optimizer",
    "maskformer_param_groups",
    "pading_optimizers",
    "poly_lr_factor",
    "zegclip_lr_factor",
    "zegclip_optimizer",
    "zegclip_param_groups",
]
