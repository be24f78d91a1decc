"""What the training jobs share: the supervised step loop of a loss module, and a fit result
turned into the stage's training metrics with one meaning per name.

Metric names (every training stage):

* ``steps``, ``global_batch_size``, ``resumed_from_step``: from ``pipeline.training.FitResult``;
* ``base_lr``: ``train.lr`` after the global-batch scaling (``lr_scaling``), the lr a parameter
  group without a multiplier gets (``FitResult.effective_lr``);
* ``<name>_lr``: ``base_lr`` x a recipe's multiplier (``head_lr``: ZegCLIP's ``head_lr_mult``,
  the lr of every trained ZegCLIP parameter; ``backbone_lr``: the proposal model's
  ``backbone_lr_mult``; ``generator_lr``: PADing's generator Adam lr);
* ``final_<curve>``: rank 0's last logged curves (``loss``, the loss terms, ``lr``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from pipeline.training import FitResult


def supervised_steps(loop: Any, model: torch.nn.Module) -> None:
    """The train loop of a loss module ``model(images, target) -> {"loss", <terms>}`` (prepared by
    ``loop.prepare``, restored): train mode, then per micro-batch (``image`` float ``[B, 3, H, W]``,
    ``label`` ``[B, H, W]``, on ``loop.device``) the forward under ``loop.autocast`` and
    ``loop.step`` with the loss and every other term as a curve."""
    model.train()
    for batch in loop.batches("train"):  # micro-batches, tensors already on loop.device
        images = batch["image"]
        target = batch["label"].long()
        with loop.autocast():
            out = model(images, target)
        loop.step(out["loss"], images=len(images), **{k: float(v.detach()) for k, v in out.items() if k != "loss"})


def tensor_count(state: Mapping[str, Any] | Iterable[torch.Tensor]) -> int:
    """Elements in the tensors of a state dict (its values) or of an iterable of tensors."""
    values = state.values() if isinstance(state, Mapping) else state
    return int(sum(v.numel() for v in values if torch.is_tensor(v)))


def fit_metrics(result: FitResult, lr_mults: Mapping[str, float] | None = None, **extra: Any) -> dict[str, Any]:
    """A training stage's metrics from its fit result (names: module docstring).

    Args:
        result: what ``pipeline.training.fit_stage`` returned.
        lr_mults: ``{name: multiplier}``: one ``<name>_lr`` = ``base_lr`` x multiplier each.
        extra: the stage's own metrics, placed after ``resumed_from_step`` (before ``final_*``).

    Returns:
        ``{"steps", "global_batch_size", "base_lr", *<name>_lr, "resumed_from_step", *extra,
        *final_<curve>}`` (numeric curves only).
    """
    lr = result.effective_lr
    return {
        "steps": result.steps,
        "global_batch_size": result.global_batch_size,
        "base_lr": lr,
        **{f"{name}_lr": lr * mult for name, mult in (lr_mults or {}).items()},
        "resumed_from_step": result.resumed_from_step,
        **extra,
        **{f"final_{k}": v for k, v in result.metrics.items() if isinstance(v, (int, float))},
    }


__all__ = ["fit_metrics", "supervised_steps", "tensor_count"]
