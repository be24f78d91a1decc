"""Training metrics: the loss reduced over workers, per-interval curves, MLflow and progress records.

Every ``log_every`` steps rank 0 turns the interval's accumulated values into one set of curves
(``train/loss``, ``train/lr``, ``train/throughput_img_s``, ``train/step_time_s``,
``train/data_wait_s``, ``train/epoch``, ``train/grad_norm`` with clipping, ``train/loss_scale``
with fp16, and the loop's own extras), logs them to the stage's MLflow run through
``pipeline.tracking.log_metrics`` (:class:`MetricsLogger`) and sends a :class:`Progress` record to
the driver (``progress.py``).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any


def reduce_loss(
    loss_x_images: float, images: int, all_reduce_sum: Callable[[Any], None] | None = None, device: Any = None
) -> tuple[float, int]:
    """The step's loss over all workers, each worker weighted by the images it processed.

    Args:
        loss_x_images: this worker's ``sum over its micro-batches of (micro-batch loss x images
            in it)``: with one micro-batch of ``n`` images and mean loss ``l``, ``l * n``.
        images: this worker's images in the step (> 0).
        all_reduce_sum: in-place sum of a 1-D float64 tensor over the workers
            (``torch.distributed.all_reduce``); None: a single worker.
        device: where the tensor is made (the worker's device: nccl needs CUDA tensors).

    Returns:
        ``(sum_w loss_x_images_w / sum_w images_w, sum_w images_w)``: with equal batches on every
        worker, the plain mean of the workers' mean losses. NaN/inf in any worker's loss makes
        the result NaN/inf on every worker (so all stop together).
    """
    import torch

    t = torch.tensor([float(loss_x_images), float(images)], dtype=torch.float64, device=device)
    if all_reduce_sum is not None:
        all_reduce_sum(t)
    total = float(t[1])
    return float(t[0]) / total, int(round(total))


@dataclasses.dataclass
class Progress:
    """One progress report, sent by rank 0 every ``log_every`` steps (and at the last step).

    Attributes:
        step: optimisation steps done; ``max_steps``: the run's total.
        epoch: epoch of the last batch.
        loss: mean loss over the interval's steps (each step's loss averaged over workers).
        lr: the first parameter group's learning rate after the step.
        images_per_s: images over all workers per second of the interval (wall clock).
        step_time_s: seconds per optimisation step; ``data_wait_s``: of which waiting for data.
        eta_s: seconds to ``max_steps`` at this attempt's average pace.
        resumed_from_step: the step this attempt started from.
        metrics: every curve logged at this step (``train/...`` names, as in MLflow).
    """

    step: int
    max_steps: int
    epoch: int
    loss: float
    lr: float
    images_per_s: float
    step_time_s: float
    data_wait_s: float
    eta_s: float
    resumed_from_step: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    def line(self) -> str:
        """One human line: ``step 30/100 (30%) epoch 1 loss 0.4321 lr 0.001 12.3 img/s ...``."""
        return (
            f"step {self.step}/{self.max_steps} ({100 * self.step / self.max_steps:.0f}%) epoch {self.epoch} "
            f"loss {self.loss:.4f} lr {self.lr:.3g} {self.images_per_s:.1f} img/s {self.step_time_s:.3f} s/step "
            f"(data wait {self.data_wait_s:.3f}) eta {hms(self.eta_s)}"
        )


@dataclasses.dataclass
class Interval:
    """Sums over the optimisation steps since the last report."""

    steps: int = 0
    loss: float = 0.0
    images: int = 0
    time: float = 0.0
    data_wait: float = 0.0
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, loss: float, images: int, seconds: float, extra: Mapping[str, float]) -> None:
        self.steps += 1
        self.loss += loss
        self.images += images
        self.time += seconds
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)

    def curves(self, lr: float, epoch: int) -> dict[str, float]:
        """The interval's curves (``train/...``); extras are averaged per step."""
        n = max(self.steps, 1)
        m = {
            "train/loss": self.loss / n,
            "train/lr": lr,
            "train/throughput_img_s": self.images / max(self.time, 1e-9),
            "train/step_time_s": self.time / n,
            "train/data_wait_s": self.data_wait / n,
            "train/epoch": float(epoch),
        }
        for k, v in self.extra.items():
            m[f"train/{k}"] = v / n
        return m


class MetricsLogger:
    """Rank 0's MLflow curves, through ``pipeline.tracking.log_metrics`` to the stage's run (any
    tracking URI the worker can reach; a sqlite file works on one machine). A failure warns once
    (stderr) and disables logging: tracking never stops training."""

    def __init__(self, target: Mapping[str, Any] | None):
        target = dict(target or {})
        self.run_id: str | None = target.get("run_id")
        self.tracking_uri: str | None = target.get("tracking_uri")
        self.enabled = bool(self.run_id)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; never raises."""
        if not self.enabled:
            return
        try:
            from pipeline.tracking import log_metrics

            log_metrics(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                run_id=self.run_id,
                step=int(step),
                tracking_uri=self.tracking_uri,
            )
        except Exception as e:  # noqa: BLE001 - tracking must not stop training
            self.enabled = False
            print(
                f"warning: MLflow logging of the training curves disabled: {type(e).__name__}: {e}",
                file=sys.stderr,
                flush=True,
            )


def hms(seconds: float) -> str:
    """``1h05m`` / ``4m07s``."""
    s = int(max(seconds, 0)) if math.isfinite(seconds) else 0
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
