"""The training config sections a stage embeds (``scaling``, ``train``) and what follows from them:
the global batch and learning rate, and the check that workers leave CPUs for the data feed."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.config import Runtime
from pipeline.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ScalingSection(BaseModel):
    """Where training runs (a stage config section; unknown keys are errors).

    Attributes:
        num_workers: DDP worker processes (Ray actors). 0 runs the loop in the calling process
            (no DDP, no worker restarts; for tests and small runs); the global batch counts it as 1.
        use_gpu: one GPU per worker and the nccl backend (gloo otherwise).
        resources_per_worker: Ray resources per worker, e.g. ``{"CPU": 4, "GPU": 1}``; ``None``:
            1 CPU, or with ``use_gpu`` 1 GPU and no CPU (Ray's default). Leave CPUs for the Ray
            Data decode tasks: on a 2-CPU machine, 2 workers x ``{"CPU": 0.5}``.
    """

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(0, ge=0)  # hashed: the world size shapes the data each worker sees
    # hashed: with precision auto it decides the numerics (fp32 on CPU, bf16 / fp16 autocast on GPU)
    use_gpu: bool = False
    resources_per_worker: Annotated[dict[str, float] | None, Runtime(why="resources")] = None


class TrainSection(BaseModel):
    """How long and how to train (a stage config section; unknown keys are errors).

    Attributes:
        max_steps: optimisation (optimizer) steps in total; a resumed run ends at the same count.
        batch_size: samples per worker per micro-batch (what ``Loop.batches`` yields).
        grad_accum_steps: micro-batches whose gradients are summed into one optimisation step
            (the loss of each is divided by this number; DDP synchronises only on the last).
            The global batch is ``max(num_workers, 1) * batch_size * grad_accum_steps``: reach a
            paper's batch on fewer GPUs with more accumulation.
        lr: base learning rate, for ``reference_batch_size`` when that is set.
        reference_batch_size: the global batch size ``lr`` was tuned for (the paper's); ``None``
            skips the check.
        lr_scaling: when the global batch differs from the reference: ``linear`` (lr x
            global/reference), ``sqrt`` (lr x sqrt(global/reference)) or ``warn`` (a warning;
            lr kept).
        precision: ``loop.autocast()``'s compute type. ``fp32``: no autocast. ``bf16``: bfloat16
            autocast (CPU and GPUs that support it). ``fp16``: float16 autocast with a
            ``torch.amp.GradScaler`` (its state is checkpointed). ``auto``: on a GPU ``bf16``
            where supported, else ``fp16``; ``fp32`` on a CPU.
        clip_grad_norm: clip the gradients' total L2 norm over every trainable parameter of the
            model to this value before each optimizer step (after unscaling); ``None``: no clip.
            (ZegFormer / DeOP: 0.01.)
        checkpoint_every: steps between checkpoints (the last step is always checkpointed).
        keep_checkpoints: checkpoints kept in storage (the newest ones).
        max_failures: worker-group restarts allowed (-1: unlimited); in-process runs have none.
        log_every: steps between progress reports / MLflow points (rank 0).
        seed: torch/numpy/python seed (mixed with rank and step) and iteration-shuffle seed.
        deterministic_data: Ray Data ``preserve_order`` for the training feed: per-worker rows and
            their order are reproducible (may cost some throughput).
        prefetch_batches: batches ``iter_torch_batches`` prepares ahead.
        shuffle_buffer: rows of the per-worker local shuffle buffer (0: none).
    """

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    grad_accum_steps: int = Field(1, ge=1)
    lr: float = Field(gt=0)
    reference_batch_size: int | None = Field(None, gt=0)
    lr_scaling: Literal["linear", "sqrt", "warn"] = "warn"
    precision: Precision = "auto"
    clip_grad_norm: float | None = Field(None, gt=0)
    # runtime (not in the key): the RNG streams are reseeded from (seed, rank, step) every step, so
    # neither when checkpoints are written nor how often progress is logged changes the result
    checkpoint_every: Annotated[int, Runtime(why="checkpoints")] = Field(500, gt=0)
    keep_checkpoints: Annotated[int, Runtime(why="checkpoints")] = Field(2, ge=1)
    max_failures: Annotated[int, Runtime(why="retries")] = Field(1, ge=-1)
    log_every: Annotated[int, Runtime(why="logging")] = Field(50, gt=0)
    seed: int = 0
    deterministic_data: bool = True
    prefetch_batches: Annotated[int, Runtime(why="throughput")] = Field(2, ge=0)
    shuffle_buffer: int = Field(0, ge=0)


class MlflowTarget(BaseModel):
    """The stage's MLflow run that rank 0 logs training curves to (``tracking_uri``: where that
    run lives, reachable from the workers; ``run_id``: None logs nothing)."""

    tracking_uri: str | None = None
    run_id: str | None = None


def global_batch_and_lr(scaling: ScalingSection, train: TrainSection) -> tuple[int, float, str | None]:
    """``(global batch size, effective lr, message or None)``.

    The global batch is ``max(num_workers, 1) * batch_size * grad_accum_steps`` samples per
    optimisation step. The message says how the lr was scaled, or warns that it was not, when
    the global batch differs from ``train.reference_batch_size``.
    """
    world = max(1, scaling.num_workers)
    accum = train.grad_accum_steps
    g = world * train.batch_size * accum
    ref = train.reference_batch_size
    if ref is None or ref == g:
        return g, train.lr, None
    parts = f"{world} worker(s) x {train.batch_size}" + (f" x {accum} accumulation steps" if accum > 1 else "")
    desc = f"global batch size {g} (= {parts}) differs from reference_batch_size {ref}"
    if train.lr_scaling == "linear":
        lr = train.lr * g / ref
        return g, lr, f"{desc}: learning rate scaled linearly {train.lr:g} -> {lr:g}"
    if train.lr_scaling == "sqrt":
        lr = train.lr * math.sqrt(g / ref)
        return g, lr, f"{desc}: learning rate scaled by sqrt {train.lr:g} -> {lr:g}"
    fixes = []
    if ref % (world * accum) == 0:
        fixes.append(f"batch_size: {ref // (world * accum)} per worker")
    if ref % (world * train.batch_size) == 0 and ref // (world * train.batch_size) != accum:
        fixes.append(f"grad_accum_steps: {ref // (world * train.batch_size)}")
    fix = " or ".join(fixes) if fixes else f"{ref} samples per optimisation step"
    return (
        g,
        train.lr,
        (
            f"WARNING: {desc}; the learning rate {train.lr:g} is NOT scaled (lr_scaling: warn). "
            f"Results may differ from the reference setup: use {fix}, or lr_scaling: linear"
        ),
    )


def check_cpus_left_for_data(scaling: ScalingSection, cluster_cpus: float, data_cpus: float = 1.0) -> None:
    """Refuse a fit whose workers would hold every CPU: the Ray Data tasks that decode the
    training feed would never be scheduled and the fit would wait forever.

    CPUs per worker are Ray's (``ScalingConfig.num_cpus_per_worker``): 1 by default, none with
    ``use_gpu`` and no ``resources_per_worker``, 0 when ``resources_per_worker`` names no CPU.

    Args:
        cluster_cpus: logical CPUs of the Ray cluster (``ray.cluster_resources()["CPU"]``).
        data_cpus: CPUs one decode task needs (``train_dataset(num_cpus=...)``, default 1).

    Raises:
        ConfigError: naming the CPUs asked for and how to leave room, or a scaling section Ray
            rejects (e.g. ``GPU`` in ``resources_per_worker`` without ``use_gpu``).
    """
    from ray.train import ScalingConfig

    try:
        per = float(
            ScalingConfig(
                num_workers=scaling.num_workers,
                use_gpu=scaling.use_gpu,
                resources_per_worker=scaling.resources_per_worker,
            ).num_cpus_per_worker
        )
    except ValueError as e:
        raise ConfigError(f"scaling section rejected by Ray Train: {e}") from None
    held = scaling.num_workers * per
    if cluster_cpus - held < data_cpus:
        raise ConfigError(
            f"{scaling.num_workers} training workers x {per:g} CPU hold {held:g} of the cluster's {cluster_cpus:g} "
            f"CPUs, leaving less than {data_cpus:g} for the Ray Data feed, which would never run; lower "
            "scaling.num_workers or set scaling.resources_per_worker: {CPU: 0.5} (or add CPUs)"
        )
