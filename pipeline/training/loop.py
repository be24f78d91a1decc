"""The worker side: :class:`Loop`, what a method's per-worker train loop is written against.

A method's loop (the whole of a recipe's training code)::

    def train_loop(loop: Loop) -> None:
        model = loop.prepare(build_model(loop.config))            # device + DDP
        opt = torch.optim.AdamW(trainable(model), lr=loop.lr)     # lr: scaled to the global batch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, poly)      # stepped once per optimisation step
        loop.restore(model, opt, sched,                           # resume (model, optimiser, scheduler,
                     model_state=(seg.trainable_state_dict,       #   scaler, position, RNG); optionally
                                  seg.load_trainable_state_dict)) #   only the trainable weights
        for batch in loop.batches("train"):                       # micro-batches, resumed mid-epoch
            with loop.autocast():                                 # bf16 / fp16 / fp32
                loss = criterion(model(batch["image"]), batch["label"].long())
            loop.step(loss, images=len(batch["image"]))           # backward; every grad_accum_steps
                                                                  # micro-batches: unscale, clip,
                                                                  # optimizer/scheduler step, zero_grad,
                                                                  # NaN check, log, checkpoint

A loop that steps its optimiser itself (several optimisers, ...) calls :meth:`Loop.step_done`
once per optimisation step instead of :meth:`Loop.step` (fp32/bf16, no accumulation or clipping).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import uri as uri_
from pipeline.errors import ConfigError, NonFiniteLossError, TrainingDataError

from . import in_process
from .checkpoint import dir_name, restore_checkpoint, resume_source, write_checkpoint
from .config import TrainSection
from .metrics import Interval, MetricsLogger, Progress, reduce_loss
from .precision import autocast_dtype, resolve_precision

ModelState = tuple[Callable[[], Mapping[str, Any]], Callable[[Mapping[str, Any]], Any]]


def unwrap(model: Any) -> Any:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def mix_seed(*xs: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class Loop:
    """Per-worker training helper: device/DDP, resume, the data feed, mixed precision, gradient
    accumulation and clipping, the optimisation step, logging and checkpoints.

    Attributes:
        config: the stage's ``loop_config`` dict.
        train: the :class:`~.config.TrainSection`.
        lr: the effective learning rate (after ``lr_scaling``).
        global_batch_size: workers x ``train.batch_size`` x ``train.grad_accum_steps``.
        rank, world_size: DDP rank and size (0 and 1 in-process).
        device: ``torch.device`` of this worker.
        precision: the resolved precision (``fp32``, ``bf16``, ``fp16``).
        grad_scaler: the ``torch.amp.GradScaler`` with ``fp16`` (None otherwise).
        global_step: optimisation steps completed (restored on resume; :meth:`step` counts them).
        epoch: the epoch of the current micro-batch; ``batch_in_epoch``: its index in that epoch.
        resumed_from_step: the step this attempt started from (0: fresh).
        last_checkpoint: URI of the newest checkpoint written or restored (None: none yet).

    RNG: torch/numpy/python are seeded from ``(train.seed, rank, step)`` at start (step 0), after
    every optimisation step and on resume, so the random numbers drawn after step ``s`` are the
    same in an uninterrupted and a resumed run.
    """

    def __init__(self, config: dict[str, Any], meta: dict[str, Any], channel: Any):
        import ray.train
        import torch

        self.config = config
        self.train = TrainSection.model_validate(meta["train"])
        self.lr: float = meta["lr"]
        self.global_batch_size: int = meta["global_batch_size"]
        self._meta = meta
        self._local = bool(meta["local_mode"])
        self._channel = channel
        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world_size: int = ctx.get_world_size()
        if self._local:
            self.device = torch.device("cuda" if meta["use_gpu"] and torch.cuda.is_available() else "cpu")
        else:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        self.precision = resolve_precision(self.train.precision, self.device)
        self._amp_dtype = autocast_dtype(self.precision)
        self.grad_scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.global_step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed_from_step = 0
        self.last_checkpoint: str | None = None
        self._next_pos = (0, 0)  # (epoch, micro-batch index) of the next micro-batch
        self._epoch_len: int | None = None  # micro-batches per epoch per worker, once known
        self._objects: dict[str, Any] | None = None
        self._model: Any = None
        self._model_state: ModelState | None = None
        self._clip_params: list[Any] = []
        self._saved_step = -1
        self._micro = 0  # micro-batches accumulated toward the next optimisation step
        self._autocast_used = False
        self._acc_loss: Any = 0.0  # sum of micro-batch loss x images (a tensor once a step began)
        self._acc_images = 0
        self._acc_extra: dict[str, float] = {}
        self._reseed(0)
        self._logger = MetricsLogger(meta.get("mlflow")) if self.rank == 0 else None
        self._interval = Interval()
        self._t_last = time.perf_counter()
        self._t_start = self._t_last
        self._last_metrics: dict[str, float] = {}

    # -- model ---------------------------------------------------------------------------
    def prepare(self, model: Any, find_unused_parameters: bool = False) -> Any:
        """Move ``model`` to this worker's device and wrap it in DDP when ``world_size > 1``.

        ``find_unused_parameters``: DDP's flag, for models with trainable parameters that do not
        reach the loss every step (e.g. a decoder's last feed-forward layer whose output no
        prediction uses).
        """
        import torch
        import torch.distributed as dist

        model = model.to(self.device)
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        return model

    def autocast(self) -> Any:
        """The forward pass's context: ``torch.autocast`` at :attr:`precision` (nothing for
        ``fp32``). Compute the loss inside it; :meth:`step` does the backward outside."""
        import torch

        if self._amp_dtype is None:
            return contextlib.nullcontext()
        self._autocast_used = True
        return torch.autocast(device_type=self.device.type, dtype=self._amp_dtype)

    def restore(
        self,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        model_state: ModelState | None = None,
        **extra: Any,
    ) -> int:
        """Register what checkpoints hold and load the checkpoint to resume from, if any.

        Args:
            model: the (prepared) model; :meth:`step` clips over its trainable parameters.
            optimizer, scheduler: stepped by :meth:`step`; their ``state_dict`` is checkpointed.
            model_state: ``(get, set)``: ``get() -> state dict`` is what ``model.pt`` holds and
                ``set(state dict)`` loads it, strictly, raising on any mismatch (e.g. a method's
                ``trainable_state_dict`` / ``load_trainable_state_dict``: checkpoints without a
                frozen backbone). Default: the unwrapped model's whole ``state_dict()`` and
                ``load_state_dict(strict=True)``.
            **extra: more objects with ``state_dict``/``load_state_dict`` (an EMA, ...). With
                ``fp16`` the loop's own gradient scaler is registered as ``grad_scaler``.

        Returns:
            The step training continues from (0 when starting fresh).

        Raises:
            CheckpointMismatchError: the checkpoint does not fit (model keys or shapes, a
                missing optimiser/scheduler/extra state, an optimiser of another shape): names
                the checkpoint and the loader's message.
        """
        self._model = model
        self._objects = {"optimizer": optimizer, "scheduler": scheduler, **extra}
        if self.grad_scaler is not None:
            self._objects["grad_scaler"] = self.grad_scaler
        self._model_state = model_state or (
            lambda: unwrap(model).state_dict(),
            lambda sd: unwrap(model).load_state_dict(sd, strict=True),
        )
        # what the optimizer updates (and the scaler unscales): the parameters clipping may look at
        self._clip_params = (
            [q for g in optimizer.param_groups for q in g["params"]]
            if optimizer is not None
            else [q for q in unwrap(model).parameters() if q.requires_grad]
        )
        src = self._resume_source()
        if src is None:
            self._log_setup()
            return 0
        where, copy = src
        self.last_checkpoint = where
        with copy as d:
            state = restore_checkpoint(Path(d), where, self._model_state[1], self._objects, self.note)
        self._restore_position(state, where)
        self._log_setup()
        return self.global_step

    def _restore_position(self, state: Mapping[str, Any], where: str) -> None:
        """Continue from a checkpoint's train state: its step, the data position (mapped by the
        samples consumed when the world size changed) and the RNG seeded for that step."""
        self.global_step = self.resumed_from_step = int(state["step"])
        self._saved_step = self.global_step
        self._epoch_len = state.get("epoch_len")
        epoch, pos = int(state["epoch"]), int(state["batch_in_epoch"])
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:  # keep the samples consumed in the epoch
            pos = pos * old_world // self.world_size
            self._epoch_len = None
            self.note(
                f"note: world size changed {old_world} -> {self.world_size}; the data position is "
                f"mapped by samples consumed (epoch {epoch}, batch {pos})"
            )
        self._next_pos = (epoch, pos)
        self._reseed(self.global_step)
        self.note(f"resumed from step {self.global_step} (epoch {epoch}, batch {pos}): {where}")

    def _log_setup(self) -> None:
        """The batch / lr setup as curves at the attempt's first step (it may change between
        attempts, e.g. the world size; MLflow params could not)."""
        self.log(
            {
                "train/global_batch_size": self.global_batch_size,
                "train/effective_lr": self.lr,
                "train/world_size": self.world_size,
                "train/grad_accum_steps": self.train.grad_accum_steps,
            }
        )

    def _resume_source(self) -> tuple[str, Any] | None:
        """``(uri, context manager giving a local directory)`` of the checkpoint to resume from:
        the newer of Ray's (``ray.train.get_checkpoint()``, workers only) and the one the driver
        chose from the records (``start_from``: the in-process record's, or any record's for an
        in-process fit)."""
        import ray.train

        ckpt = None if self._local else ray.train.get_checkpoint()
        return resume_source(self._meta["storage_path"], self._meta["name"], ckpt, self._meta.get("start_from"))

    # -- data ----------------------------------------------------------------------------
    def batches(self, name: str = "train", **iter_kwargs: Any) -> Iterator[dict[str, Any]]:
        """Micro-batches of this worker's shard of dataset ``name`` until ``train.max_steps``
        optimisation steps are done.

        Epoch after epoch of ``get_dataset_shard(name).iter_torch_batches(batch_size=
        train.batch_size, drop_last=True, ...)``, starting at the restored position; tensors are
        on :attr:`device`. Call :meth:`step` once per micro-batch (or :meth:`step_done` once
        per batch). With DDP and ``grad_accum_steps > 1``, every micro-batch but the last of a
        step is yielded inside ``model.no_sync()`` (forward and backward: no gradient all-reduce).

        Args:
            name: the dataset name given to ``fit``.
            **iter_kwargs: more ``iter_torch_batches`` arguments (``dtypes``, ``collate_fn``).

        Raises:
            TrainingDataError: the shard yields no full batch (fewer rows per worker than batch_size).
        """
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        epoch, skip = self._next_pos
        t = self.train
        while self.global_step < t.max_steps:
            if self._epoch_len is not None and skip >= self._epoch_len:
                epoch, skip = epoch + 1, 0
                continue
            kwargs = dict(
                batch_size=t.batch_size, drop_last=True, prefetch_batches=t.prefetch_batches, device=self.device
            )
            if t.shuffle_buffer:
                kwargs.update(
                    local_shuffle_buffer_size=t.shuffle_buffer, local_shuffle_seed=mix_seed(t.seed, epoch, self.rank)
                )
            kwargs.update(iter_kwargs)
            n = 0
            t_wait = time.perf_counter()
            it = iter(shard.iter_torch_batches(**kwargs))
            try:
                for batch in it:
                    if n < skip:
                        n += 1
                        continue
                    self.epoch, self.batch_in_epoch = epoch, n
                    self._next_pos = (epoch, n + 1)
                    self._interval.data_wait += time.perf_counter() - t_wait
                    with self._sync_context():
                        yield batch
                    n += 1
                    if self.global_step >= t.max_steps:
                        return
                    t_wait = time.perf_counter()
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            if n == 0:
                raise TrainingDataError(
                    f"dataset {name!r} gave worker {self.rank} no full batch of {t.batch_size} in epoch {epoch}: "
                    f"it needs at least {self.world_size * t.batch_size} rows "
                    f"({self.world_size} worker(s) x {t.batch_size})"
                )
            self._epoch_len = n
            epoch, skip = epoch + 1, 0
            self._next_pos = (epoch, 0)

    def _sync_context(self) -> Any:
        last = self._micro + 1 >= self.train.grad_accum_steps
        no_sync = getattr(self._model, "no_sync", None)
        return no_sync() if (not last and no_sync is not None) else contextlib.nullcontext()

    # -- per micro-batch / per step ----------------------------------------------------------------
    def step(self, loss: Any, images: int | None = None, **metrics: float) -> bool:
        """Backward of one micro-batch's loss; at every ``grad_accum_steps``-th call, one
        optimisation step.

        The backward is of ``loss / grad_accum_steps`` (scaled by the gradient scaler with
        ``fp16``). At the step: the loss (image-weighted mean over micro-batches and workers,
        see :func:`~.metrics.reduce_loss`) is checked, gradients are unscaled, clipped to
        ``train.clip_grad_norm`` (total norm), the optimiser and scheduler stepped, gradients
        zeroed (``set_to_none``); then the step is counted, logged every ``log_every`` steps and
        checkpointed every ``checkpoint_every``.

        Args:
            loss: this micro-batch's mean loss, a scalar tensor with a graph.
            images: samples in this micro-batch (default ``train.batch_size``; > 0).
            **metrics: extra scalars for the curves (rank 0's, averaged over the micro-batches
                and the logging interval).

        Returns:
            True when this call completed an optimisation step.

        Raises:
            NonFiniteLossError: the step's loss is NaN/inf (before the optimiser is stepped).
            RuntimeError: :meth:`restore` was not called with an optimizer.
            ValueError: ``images`` <= 0.
        """
        if self._objects is None or self._objects.get("optimizer") is None:
            raise RuntimeError(
                "call loop.restore(model, optimizer, scheduler) before loop.step(): it registers "
                "what loop.step steps and what checkpoints hold, and resumes from the last one"
            )
        n = self.train.batch_size if images is None else int(images)
        if n <= 0:
            raise ValueError(f"loop.step(images={n}): a micro-batch has at least one sample")
        accum = self.train.grad_accum_steps
        scaled = loss / accum if accum > 1 else loss
        if self.grad_scaler is not None:
            scaled = self.grad_scaler.scale(scaled)
        scaled.backward()
        self._acc_loss = self._acc_loss + loss.detach().float() * n
        self._acc_images += n
        for k, v in metrics.items():
            self._acc_extra[k] = self._acc_extra.get(k, 0.0) + float(v)
        self._micro += 1
        if self._micro < accum:
            return False
        loss_x_images, images_here = self._acc_loss, self._acc_images
        extra = {k: v / accum for k, v in self._acc_extra.items()}
        self._micro, self._acc_loss, self._acc_images, self._acc_extra = 0, 0.0, 0, {}
        loss_mean, n_images = self._reduce(float(loss_x_images), images_here)
        if not np.isfinite(loss_mean):
            raise NonFiniteLossError(self.global_step + 1, loss_mean, self.last_checkpoint)
        opt, sched = self._objects["optimizer"], self._objects.get("scheduler")
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(opt)
        if self.train.clip_grad_norm is not None:
            import torch

            norm = torch.nn.utils.clip_grad_norm_(self._clip_params, self.train.clip_grad_norm)
            extra["grad_norm"] = float(norm)
            if self.grad_scaler is None and not bool(torch.isfinite(norm)):  # the loss was finite, a gradient not:
                # stop before the optimizer writes NaN into the weights (and a checkpoint saves them);
                # every rank sees the same norm (gradients are synchronised). fp16's scaler skips such steps.
                raise NonFiniteLossError(self.global_step + 1, float(norm), self.last_checkpoint)
        if self.grad_scaler is not None:
            extra["loss_scale"] = float(self.grad_scaler.get_scale())
            self.grad_scaler.step(opt)
            self.grad_scaler.update()
        else:
            opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        self._count_step(loss_mean, n_images, extra)
        return True

    def step_done(self, loss: Any, images: int | None = None, **metrics: float) -> None:
        """Count one optimisation step the loop did itself (backward, optimiser and scheduler
        steps): NaN check, logging, periodic checkpoint.

        Args:
            loss: this worker's loss (tensor or float); averaged over workers for the log.
            images: samples this worker processed in the step (default ``train.batch_size``).
            **metrics: extra scalars for the log (rank 0's values).

        Raises:
            NonFiniteLossError: the (all-reduced) loss is NaN/inf.
            RuntimeError: :meth:`restore` was not called (nothing to checkpoint).
            ConfigError: ``grad_accum_steps > 1`` or ``clip_grad_norm`` is set, or the loop ran
                :meth:`autocast` in ``fp16`` (which needs the gradient scaler): those need :meth:`step`.
        """
        if self._objects is None:
            raise RuntimeError(
                "call loop.restore(model, optimizer, scheduler) before training: "
                "it registers what checkpoints hold and resumes from the last one"
            )
        t = self.train
        if (
            t.grad_accum_steps > 1
            or t.clip_grad_norm is not None
            or (self.grad_scaler is not None and self._autocast_used)
        ):
            raise ConfigError(
                "train.grad_accum_steps > 1, train.clip_grad_norm and fp16 autocast (its gradient "
                "scaler) are applied by loop.step(loss); a loop that calls loop.step_done() steps its "
                "optimiser itself: use loop.step(), or precision: fp32 / bf16"
            )
        n = t.batch_size if images is None else int(images)
        value = float(loss.detach().float()) if hasattr(loss, "detach") else float(loss)
        loss_mean, n_images = self._reduce(value * n, n)
        if not np.isfinite(loss_mean):
            raise NonFiniteLossError(self.global_step + 1, loss_mean, self.last_checkpoint)
        self._count_step(loss_mean, n_images, metrics)

    def _reduce(self, loss_x_images: float, images: int) -> tuple[float, int]:
        import torch.distributed as dist

        all_reduce = None
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            all_reduce = dist.all_reduce
        return reduce_loss(loss_x_images, images, all_reduce, device=self.device)

    def _count_step(self, loss_mean: float, n_images: int, extra: Mapping[str, float]) -> None:
        self.global_step += 1
        now = time.perf_counter()
        self._interval.add(loss_mean, n_images, now - self._t_last, extra)
        self._t_last = now
        t = self.train
        if self.global_step % t.log_every == 0 or self.global_step == t.max_steps:
            self._log_interval()
        if self.global_step % t.checkpoint_every == 0 or self.global_step == t.max_steps:
            self.save()
        self._reseed(self.global_step)

    def _log_interval(self) -> None:
        iv = self._interval
        if iv.steps == 0:
            return
        m = iv.curves(self._current_lr(), self.epoch)
        self._last_metrics = m
        if self.rank == 0:
            done = self.global_step - self.resumed_from_step
            eta = (time.perf_counter() - self._t_start) / max(done, 1) * (self.train.max_steps - self.global_step)
            if self._logger is not None:
                self._logger.log(m, self.global_step)
            self._channel.progress(
                Progress(
                    step=self.global_step,
                    max_steps=self.train.max_steps,
                    epoch=self.epoch,
                    loss=m["train/loss"],
                    lr=m["train/lr"],
                    images_per_s=m["train/throughput_img_s"],
                    step_time_s=m["train/step_time_s"],
                    data_wait_s=m["train/data_wait_s"],
                    eta_s=eta,
                    resumed_from_step=self.resumed_from_step,
                    metrics=dict(m),
                )
            )
        self._interval = Interval()

    def _current_lr(self) -> float:
        opt = (self._objects or {}).get("optimizer")
        try:
            return float(opt.param_groups[0]["lr"])
        except Exception:  # noqa: BLE001 - no optimiser registered
            return self.lr

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log extra scalars to the stage's MLflow run (rank 0 only; others ignore)."""
        if self.rank == 0 and self._logger is not None:
            self._logger.log(dict(metrics), self.global_step if step is None else step)

    def note(self, text: str) -> None:
        """A line for the driver's log (rank 0 only; others ignore)."""
        if self.rank == 0:
            self._channel.note(text)

    # -- checkpoints ---------------------------------------------------------------------
    def save(self) -> str:
        """Write a checkpoint now (every rank must call it at the same step). Returns its URI.

        With workers, rank 0's files go to Ray Train (``ray.train.report``), which persists and
        registers them; the call returns once the controller has registered them (a report still
        queued in a worker that dies would be lost). In-process, :mod:`.in_process` stores them.
        """
        import ray.train

        if self._objects is None:
            raise RuntimeError("call loop.restore(...) before saving")
        if self._micro:
            raise RuntimeError(
                f"loop.save() in the middle of an accumulated step ({self._micro} of "
                f"{self.train.grad_accum_steps} micro-batches): a resume would lose them"
            )
        if self._saved_step == self.global_step:
            return self.last_checkpoint or ""
        leaf = dir_name(self.global_step)
        epoch, pos = self._next_pos
        if self._epoch_len is not None and pos >= self._epoch_len:  # at an epoch's end: the next one
            epoch, pos = epoch + 1, 0
        info = {
            "step": self.global_step,
            "epoch": epoch,
            "batch_in_epoch": pos,
            "epoch_len": self._epoch_len,
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "grad_accum_steps": self.train.grad_accum_steps,
            "precision": self.precision,
            "loss": self._last_metrics.get("train/loss"),
            "time": time.time(),
        }
        storage, name = self._meta["storage_path"], self._meta["name"]
        tmp = None
        if self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="zeroseg-ckpt-"))
            objects = {k: v.state_dict() for k, v in self._objects.items() if v is not None}
            write_checkpoint(tmp, self._model_state[0](), objects, info)
        try:
            if self._local:
                where = in_process.persist(tmp, storage, name, leaf, info, self.train.keep_checkpoints)
            else:
                metrics = {**{k.split("/", 1)[1]: v for k, v in self._last_metrics.items()}, **info}
                ckpt = ray.train.Checkpoint.from_directory(str(tmp)) if tmp is not None else None
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=leaf)
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
                where = uri_.join(storage, name, leaf)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self._saved_step = self.global_step
        self.last_checkpoint = where
        return where

    def _finish(self) -> None:
        if self._objects is None:
            raise RuntimeError("the train loop returned without calling loop.restore(...): nothing to checkpoint")
        if self.global_step < self.train.max_steps:
            raise RuntimeError(
                f"the train loop returned at step {self.global_step} of {self.train.max_steps}; "
                "iterate loop.batches() to the end and call loop.step() once per batch"
            )
        if self._interval.steps:
            self._log_interval()
        self.save()

    def _reseed(self, step: int) -> None:
        import torch

        s = mix_seed(self.train.seed, self.rank, step)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)
