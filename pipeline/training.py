"""The one wrapper around Ray Train: ``fit`` on the driver, ``Loop`` in every training worker.

A training stage hands :func:`fit` a per-worker loop, its config, the Ray Data datasets and two
config sections (:class:`ScalingSection`, :class:`TrainSection`). ``fit`` runs a
``ray.train.torch.TorchTrainer`` (DDP; gloo on CPU, nccl on GPU) and returns the final checkpoint
as a local directory (:class:`FitResult`); the stage exports what it needs from it into its
artifact. This module knows nothing about segmentation.

Per-worker loop (a stage's whole training code)::

    def train_loop(loop: Loop) -> None:
        model = loop.prepare(build_model(loop.config))           # device + DDP
        opt = torch.optim.AdamW(model.parameters(), lr=loop.lr)  # lr: scaled to the global batch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (1 - s / loop.train.max_steps) ** 0.9)
        loop.restore(model, opt, sched)        # model/optimiser/scheduler/step/data position
        for batch in loop.batches("train"):    # Ray Data shard; resumes mid-epoch; ends at max_steps
            images, labels = batch["image"], batch["label"].long()
            loss = criterion(model(images), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loop.step_done(loss, images=len(images))  # NaN check, log, checkpoint every N

Resume. ``RunConfig(storage_path, name)`` comes from the artifact key (``StageContext.train_storage``
/ ``train_name``), so re-running an interrupted stage finds its checkpoints:

* worker failure: ``FailureConfig(max_failures)`` restarts the worker group, which resumes from
  the last reported checkpoint (``ray.train.get_checkpoint()``);
* driver killed: re-running the same command starts a new ``TorchTrainer`` with the same run
  config; Ray Train V2 reloads its checkpoint list from storage and ``get_checkpoint()`` returns
  the latest (``TorchTrainer.restore`` is deprecated in V2). With ``num_workers=0`` (in-process,
  where Ray persists nothing), this module writes the same ``<storage>/<name>/checkpoint_<step>``
  layout itself and resumes from the newest complete one.

What a resumed run restores exactly: the number of optimisation steps done, model, optimiser,
scheduler (and any ``extra`` object with ``state_dict``), the data position (epoch and batches
consumed in it: the resumed worker skips those batches, which still decodes them: at most one
epoch's worth), and the torch/numpy/python RNG streams
(re-seeded from ``(seed, rank, step)`` at every checkpoint, so an uninterrupted and a resumed run
draw the same numbers after step ``s``). With ``deterministic_data`` the rows a worker gets per
epoch and their order are a function of ``(seed, epoch, world size)``, and the per-sample
augmentation of ``(seed, image id, epoch)``: a resumed run (in-process, measured bitwise) sees
the samples an uninterrupted one would. Not exact: GPU kernels are not bitwise deterministic;
Ray Data's split of an epoch between several workers is deterministic only with
``deterministic_data``; changing the number of workers between attempts maps the position by
samples consumed; Ray Data's pass counter that seeds the per-epoch randomness is a private field
(``DataContext._execution_idx``, read with a fallback to 0 if a Ray upgrade removes it).

Checkpoint layout (a directory): ``model.pt`` (state dict of the unwrapped model),
``train_state.pt`` (optimiser, scheduler, extra, position) and ``train_state.json`` (step,
epoch, position, world size, global batch, the other files' sizes; written last: a directory
without it, or whose files differ from the sizes it lists, is incomplete and ignored).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from zeroseg.errors import ConfigError, DataError, ZerosegError

CHECKPOINT_PREFIX = "checkpoint_"
STATE_JSON = "train_state.json"
STATE_PT = "train_state.pt"
MODEL_PT = "model.pt"


# =============================================================================================
# Config sections
# =============================================================================================
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

    num_workers: int = Field(0, ge=0)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None


class TrainSection(BaseModel):
    """How long and how to train (a stage config section; unknown keys are errors).

    Attributes:
        max_steps: optimisation steps in total (a resumed run ends at the same count).
        batch_size: samples per worker per step; the global batch is
            ``max(num_workers, 1) * batch_size``.
        lr: base learning rate, for ``reference_batch_size`` when that is set.
        reference_batch_size: the global batch size ``lr`` was tuned for (the paper's); ``None``
            skips the check.
        lr_scaling: when the global batch differs from the reference: ``linear`` (lr x
            global/reference), ``sqrt`` (lr x sqrt(global/reference)) or ``warn`` (print a
            warning, keep lr).
        checkpoint_every: steps between checkpoints (the last step is always checkpointed).
        keep_checkpoints: checkpoints kept in storage (the newest ones).
        max_failures: worker-group restarts allowed (-1: unlimited); in-process runs have none.
        log_every: steps between progress lines / MLflow points (rank 0).
        seed: torch/numpy/python seed (offset by rank) and iteration-shuffle seed.
        deterministic_data: Ray Data ``preserve_order`` for the training feed: per-worker rows and
            their order are reproducible (may cost some throughput).
        prefetch_batches: batches ``iter_torch_batches`` prepares ahead.
        shuffle_buffer: rows of the per-worker local shuffle buffer (0: none).
    """

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    reference_batch_size: int | None = Field(None, gt=0)
    lr_scaling: Literal["linear", "sqrt", "warn"] = "warn"
    checkpoint_every: int = Field(500, gt=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)
    log_every: int = Field(50, gt=0)
    seed: int = 0
    deterministic_data: bool = True
    prefetch_batches: int = Field(2, ge=0)
    shuffle_buffer: int = Field(0, ge=0)


class MlflowTarget(BaseModel):
    """The stage's MLflow run that rank 0 logs training curves to."""

    tracking_uri: str | None = None
    run_id: str | None = None


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        checkpoint_dir: local directory of the final checkpoint (``model.pt``,
            ``train_state.pt``, ``train_state.json``); for remote storage a downloaded copy.
        checkpoint_uri: where that checkpoint lives in storage.
        steps: optimisation steps done (== ``TrainSection.max_steps``).
        metrics: last reported metrics (``loss``: mean over the last logging interval, ...).
        global_batch_size: workers x per-worker batch.
        effective_lr: the learning rate used (after ``lr_scaling``).
        resumed_from_step: the step the final attempt started from (0: from scratch).
        world_size: DDP processes (1 for ``num_workers=0``).
    """

    checkpoint_dir: Path
    checkpoint_uri: str
    steps: int
    metrics: dict[str, Any]
    global_batch_size: int
    effective_lr: float
    resumed_from_step: int
    world_size: int

    def model_state(self) -> dict[str, Any]:
        """The trained model's state dict (CPU tensors)."""
        return load_model_state(self.checkpoint_dir)


# =============================================================================================
# Errors
# =============================================================================================
class CheckpointMismatchError(ZerosegError, ValueError):
    """A state dict does not match the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], source: str = "checkpoint"):
        self.missing, self.unexpected, self.mismatched, self.source = missing, unexpected, mismatched, source

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "") if keys else "none"

        super().__init__(
            f"{source} does not match the model: missing keys ({len(missing)}): {show(missing)}; "
            f"unexpected keys ({len(unexpected)}): {show(unexpected)}"
            + (f"; shape mismatches ({len(mismatched)}): {show(mismatched)}" if mismatched else "")
            + ". Was it written for another model config?"
        )

    def __reduce__(self):
        return (self.__class__, (self.missing, self.unexpected, self.mismatched, self.source))


class NonFiniteLossError(ZerosegError, RuntimeError):
    """The loss became NaN/inf: training stopped; names the step and the last good checkpoint."""

    def __init__(self, step: int, loss: float, last_checkpoint: str | None):
        self.step, self.loss, self.last_checkpoint = step, loss, last_checkpoint
        where = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written before it"
        super().__init__(
            f"non-finite loss ({loss}) at step {step}; training stopped ({where}). Lower the learning "
            "rate or check the inputs; re-running unchanged resumes from that checkpoint."
        )

    def __reduce__(self):
        return (self.__class__, (self.step, self.loss, self.last_checkpoint))


# =============================================================================================
# Small public helpers
# =============================================================================================
def global_batch_and_lr(scaling: ScalingSection, train: TrainSection) -> tuple[int, float, str | None]:
    """``(global batch size, effective lr, message or None)``.

    The message says how the lr was scaled, or warns that it was not, when the global batch
    differs from ``train.reference_batch_size``.
    """
    world = max(1, scaling.num_workers)
    g = world * train.batch_size
    ref = train.reference_batch_size
    if ref is None or ref == g:
        return g, train.lr, None
    desc = f"global batch size {g} (= {world} worker(s) x {train.batch_size}) differs from reference_batch_size {ref}"
    if train.lr_scaling == "linear":
        lr = train.lr * g / ref
        return g, lr, f"{desc}: learning rate scaled linearly {train.lr:g} -> {lr:g}"
    if train.lr_scaling == "sqrt":
        lr = train.lr * math.sqrt(g / ref)
        return g, lr, f"{desc}: learning rate scaled by sqrt {train.lr:g} -> {lr:g}"
    fix = f"batch_size: {ref // world} per worker" if ref % world == 0 else f"{ref} samples per step"
    return g, train.lr, (f"WARNING: {desc}; the learning rate {train.lr:g} is NOT scaled (lr_scaling: warn). "
                         f"Results may differ from the reference setup: use {fix}, or lr_scaling: linear")


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
        per = float(ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                  resources_per_worker=scaling.resources_per_worker).num_cpus_per_worker)
    except ValueError as e:
        raise ConfigError(f"scaling section rejected by Ray Train: {e}") from None
    held = scaling.num_workers * per
    if cluster_cpus - held < data_cpus:
        raise ConfigError(
            f"{scaling.num_workers} training workers x {per:g} CPU hold {held:g} of the cluster's {cluster_cpus:g} "
            f"CPUs, leaving less than {data_cpus:g} for the Ray Data feed, which would never run; lower "
            "scaling.num_workers or set scaling.resources_per_worker: {CPU: 0.5} (or add CPUs)"
        )


def strict_load(model: Any, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict)`` that fails with every difference listed.

    Args:
        model: a ``torch.nn.Module`` (DDP/compiled wrappers are unwrapped).
        state_dict: parameter/buffer name -> tensor.
        source: what the state dict is, for the message (e.g. a path).

    Raises:
        CheckpointMismatchError: missing keys, unexpected keys or shape mismatches (all listed).
    """
    model = unwrap(model)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state_dict and hasattr(state_dict[k], "shape")
        and tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, source)
    model.load_state_dict(state_dict, strict=True)


def unwrap(model: Any) -> Any:
    """The module inside DDP / ``torch.compile`` wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def load_model_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The model state dict saved in a local checkpoint directory (CPU tensors)."""
    import torch

    return torch.load(Path(checkpoint_dir) / MODEL_PT, map_location="cpu", weights_only=True)


@dataclasses.dataclass
class CheckpointInfo:
    """A complete checkpoint found in storage (``train_state.json`` present)."""

    uri: str
    step: int
    state: dict[str, Any]


def list_checkpoints(storage_path: str, name: str) -> list[CheckpointInfo]:
    """Complete checkpoints under ``<storage_path>/<name>/``, oldest first.

    ``storage_path`` is a local path or a pyarrow URI (``s3://``, ``gs://``, ...). A run
    directory that does not exist yet has none.

    Raises:
        OSError: the storage cannot be listed (credentials, network, permissions), naming the
            path: resuming must not silently start over from step 0.
    """
    import pyarrow.fs as pafs

    fs, base = _fs(storage_path)
    run_dir = f"{base}/{name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True))
    except OSError as e:
        raise OSError(f"cannot list the checkpoints under {storage_path.rstrip('/')}/{name} "
                      f"({type(e).__name__}: {e}); check the storage path, credentials and network") from e
    out = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{STATE_JSON}") as f:
                state = json.loads(f.read().decode())
            files = state.get("files", {})
            got = fs.get_file_info([f"{info.path}/{f}" for f in files])
            if any(g.type != pafs.FileType.File or g.size != files[g.base_name] for g in got):
                continue  # an upload cut short
        except (OSError, ValueError, KeyError):
            continue  # incomplete (interrupted while writing) or foreign
        out.append(CheckpointInfo(uri=_join_uri(storage_path, name, info.base_name), step=int(state["step"]), state=state))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(storage_path: str, name: str) -> CheckpointInfo | None:
    """The newest complete checkpoint of run ``name``, or None."""
    cps = list_checkpoints(storage_path, name)
    return cps[-1] if cps else None


# =============================================================================================
# Driver side
# =============================================================================================
def fit(
    train_loop: Callable[[Loop], Any],
    loop_config: dict[str, Any],
    datasets: Mapping[str, Any],
    scaling: ScalingSection,
    train: TrainSection,
    storage_path: str,
    name: str,
    mlflow: MlflowTarget | Mapping[str, Any] | None = None,
    *,
    local_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> FitResult:
    """Train with Ray Train and return the final checkpoint.

    Args:
        train_loop: ``train_loop(loop: Loop) -> None``, run once per worker (must be picklable:
            a module-level function). See the module docstring for its shape.
        loop_config: the loop's own settings (``loop.config``); JSON-like, picklable.
        datasets: Ray Data datasets by name (``"train"`` at least); split across workers.
        scaling: workers, GPUs, resources.
        train: steps, batch, lr, checkpointing, logging.
        storage_path: ``RunConfig.storage_path``: local path, NFS mount or ``s3://``/``gs://`` URI.
        name: ``RunConfig.name`` (from the artifact key: the same name resumes).
        mlflow: the stage's MLflow run for rank 0's curves (``tracking_uri``, ``run_id``); None
            logs nothing to MLflow.
        local_dir: where a remote final checkpoint is downloaded (default: a temp directory).
        log: progress callable on the driver.

    Returns:
        The :class:`FitResult`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (step and last good checkpoint named).
        CheckpointMismatchError, DataError, ConfigError: bad input found by a worker (the
            original error, unwrapped from Ray's; in a multi-worker run Ray Train counts it as a
            worker failure first and retries up to ``max_failures`` times).
        ray.train.TrainingFailedError: any other failure once ``max_failures`` is used up.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if "train" not in datasets:
        raise ConfigError(f"fit needs a 'train' dataset; got {sorted(datasets)}")
    if scaling.use_gpu and scaling.num_workers == 0:
        log("note: num_workers=0 trains in this process; use_gpu uses its GPU if it has one")
    target = MlflowTarget.model_validate(mlflow) if isinstance(mlflow, Mapping) else mlflow
    if target is not None and (target.tracking_uri or "").startswith("sqlite:///") \
            and not target.tracking_uri.startswith("sqlite:////"):  # workers run elsewhere: make it absolute
        target = target.model_copy(update={"tracking_uri": "sqlite:///" + str(Path(target.tracking_uri[10:]).resolve())})
    global_batch, lr, note = global_batch_and_lr(scaling, train)
    if note:
        log(note)
    world = max(1, scaling.num_workers)
    log(f"training: {world} worker(s) x batch {train.batch_size} = global batch {global_batch}, lr {lr:g}, "
        f"{train.max_steps} steps, checkpoint every {train.checkpoint_every} (keep {train.keep_checkpoints}) "
        f"under {storage_path.rstrip('/')}/{name}")
    _log_params(target, {"train.global_batch_size": global_batch, "train.effective_lr": lr, "train.world_size": world,
                         **({"train.lr_scaling_note": note} if note else {})})

    latest = latest_checkpoint(storage_path, name)
    if latest is not None:
        log(f"found checkpoint at step {latest.step}: {latest.uri}")
        if latest.step >= train.max_steps:
            log(f"training already finished ({latest.step}/{train.max_steps} steps); not re-running it")
            return _result_from(latest, {}, global_batch, lr, latest.step, int(latest.state.get("world_size", world)),
                                storage_path, local_dir)

    prepared = {k: _DatasetAtResume(v, train.deterministic_data, storage_path, name) for k, v in datasets.items()}
    meta = {
        "train": train.model_dump(), "lr": lr, "global_batch_size": global_batch,
        "local_mode": scaling.num_workers == 0, "use_gpu": scaling.use_gpu,
        "storage_path": storage_path, "name": name,
        "mlflow": target.model_dump() if target and target.run_id else None,
    }

    def train_fn(config: dict[str, Any]) -> dict[str, Any]:
        return _worker_main(config, train_loop, meta)

    if scaling.num_workers > 0:
        import ray

        check_cpus_left_for_data(scaling, ray.cluster_resources().get("CPU", 0.0))

    from ray.data import DataContext

    exec_opts = copy.deepcopy(DataContext.get_current().execution_options)  # resource limits etc.
    exec_opts.preserve_order = train.deterministic_data
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=dict(loop_config),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker=scaling.resources_per_worker),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
        datasets=prepared,
        dataset_config=DataConfig(execution_options=exec_opts),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError, or the loop's own error in-process
        user = _find_user_error(e)
        if user is not None:
            raise user from None
        raise
    status = result.return_value or {}
    if status.get("status") == "nonfinite":
        raise NonFiniteLossError(status["step"], status["loss"], status.get("last_checkpoint"))
    ckpt = latest_checkpoint(storage_path, name)
    if ckpt is None or ckpt.step < train.max_steps:
        raise RuntimeError(f"training ended without a final checkpoint under {storage_path}/{name} "
                           f"(newest: {ckpt.uri if ckpt else None})")
    metrics = dict(result.metrics or {})
    log(f"training finished: {ckpt.step} steps in {time.perf_counter() - t0:.1f} s "
        f"(this attempt started at step {status.get('resumed_from', 0)}); checkpoint {ckpt.uri}")
    return _result_from(ckpt, metrics, global_batch, lr, int(status.get("resumed_from", 0)),
                        int(status.get("world_size", world)), storage_path, local_dir)


def _result_from(ckpt: CheckpointInfo, metrics: dict[str, Any], global_batch: int, lr: float, resumed: int,
                 world: int, storage_path: str, local_dir: str | Path | None) -> FitResult:
    if _is_local(storage_path):
        path = Path(ckpt.uri)
    else:
        import pyarrow.fs as pafs

        dest = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="zeroseg-ckpt-"))
        dest = dest / ckpt.uri.rstrip("/").rsplit("/", 1)[1]
        if dest.exists():
            shutil.rmtree(dest)
        dest.mkdir(parents=True)
        fs, path_in_fs = pafs.FileSystem.from_uri(ckpt.uri)
        pafs.copy_files(path_in_fs, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        path = dest
    return FitResult(checkpoint_dir=path, checkpoint_uri=ckpt.uri, steps=ckpt.step,
                     metrics={**{k: v for k, v in ckpt.state.items() if k in ("loss", "epoch")}, **metrics},
                     global_batch_size=global_batch, effective_lr=lr, resumed_from_step=resumed, world_size=world)


class _DatasetAtResume:
    """A dataset factory Ray Train calls at every worker-group start (first start and each
    restart): the dataset with ``preserve_order`` set and Ray Data's pass counter (which seeds
    per-epoch shuffling and augmentation) at the epoch of the newest complete checkpoint: the
    epoch the workers resume in (see ``Loop._resume_source``)."""

    def __init__(self, ds: Any, deterministic: bool, storage_path: str, name: str):
        self.ds, self.deterministic, self.storage_path, self.name = ds, deterministic, storage_path, name

    def __call__(self) -> Any:
        ds = self.ds() if callable(self.ds) else self.ds
        latest = latest_checkpoint(self.storage_path, self.name)
        return _prepare_dataset(ds, self.deterministic, int(latest.state.get("epoch", 0)) if latest else 0)


def _prepare_dataset(ds: Any, deterministic: bool, start_epoch: int) -> Any:
    """Set ``preserve_order`` and start Ray Data's pass counter at the resumed epoch."""
    from ray.data import Dataset

    if not isinstance(ds, Dataset):
        return ds
    try:
        ds = Dataset.copy(ds, _deep_copy=True)  # own DataContext: the caller's dataset is untouched
    except TypeError:
        ds = Dataset.copy(ds)
    ds.context.execution_options.preserve_order = deterministic
    if hasattr(ds.context, "_execution_idx"):  # seeds per-epoch randomness (see pipeline/datasets.py)
        ds.context._execution_idx = start_epoch
    return ds


def _find_user_error(e: BaseException) -> ZerosegError | None:
    """The first ZerosegError inside a Ray Train failure (worker errors, task errors, causes).

    Ray Data re-raises a UDF's exception as a ``UserCodeException`` that keeps only its
    traceback text; a ``zeroseg.errors.<Class>: message`` line there is rebuilt as that class.
    """
    import re

    from zeroseg import errors

    seen: set[int] = set()
    stack: list[Any] = [e]
    texts: list[str] = []
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, ZerosegError):
            return x
        if isinstance(x, BaseException):
            texts.append(str(x))
            stack.extend([getattr(x, "_base_exc", None), getattr(x, "cause", None), x.__cause__, x.__context__])
            failures = getattr(x, "worker_failures", None)
            if isinstance(failures, dict):
                stack.extend(failures.values())
    for text in texts:
        m = re.search(r"^zeroseg\.errors\.(\w+): (.+)$", text, flags=re.M)
        cls = getattr(errors, m.group(1), None) if m else None
        if isinstance(cls, type) and issubclass(cls, ZerosegError):
            return cls(m.group(2))
    return None


def _log_params(target: MlflowTarget | None, params: dict[str, Any]) -> None:
    if target is None or not target.run_id:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(target.tracking_uri)
        run = client.get_run(target.run_id)
        for k, v in params.items():
            if k in run.data.params:
                continue  # a resumed run: params are immutable; the key guarantees the same value
            client.log_param(target.run_id, k, v)
    except Exception as ex:  # noqa: BLE001 - tracking must not stop training
        print(f"warning: could not log training params to MLflow: {type(ex).__name__}: {ex}", file=sys.stderr)


# =============================================================================================
# Worker side
# =============================================================================================
def _worker_main(config: dict[str, Any], train_loop: Callable[[Loop], Any], meta: dict[str, Any]) -> dict[str, Any]:
    loop = Loop(config, meta)
    try:
        train_loop(loop)
        loop._finish()
    except NonFiniteLossError as e:
        # Every rank sees the same all-reduced loss, so all return here together; returning
        # (instead of raising) keeps Ray Train from restarting a run that would diverge again.
        return {"status": "nonfinite", "step": e.step, "loss": e.loss, "last_checkpoint": e.last_checkpoint}
    finally:
        loop._close()
    return {"status": "ok", "steps": loop.step, "resumed_from": loop.resumed_from_step,
            "world_size": loop.world_size}


class Loop:
    """Per-worker training helper: device/DDP, restore, the data feed, logging, checkpoints.

    Attributes:
        config: the stage's ``loop_config`` dict.
        train: the :class:`TrainSection`.
        lr: the effective learning rate (after ``lr_scaling``).
        global_batch_size: workers x ``train.batch_size``.
        rank, world_size: DDP rank and size (0 and 1 in-process).
        device: ``torch.device`` of this worker.
        step: optimisation steps completed (restored on resume).
        epoch: the epoch of the current batch; ``batch_in_epoch``: its index in that epoch.
        resumed_from_step: the step this attempt started from (0: fresh).
        last_checkpoint: URI of the newest checkpoint written or restored (None: none yet).
    """

    def __init__(self, config: dict[str, Any], meta: dict[str, Any]):
        import ray.train
        import torch

        self.config = config
        self.train = TrainSection.model_validate(meta["train"])
        self.lr: float = meta["lr"]
        self.global_batch_size: int = meta["global_batch_size"]
        self._meta = meta
        self._local = bool(meta["local_mode"])
        ctx = ray.train.get_context()
        self.rank: int = ctx.get_world_rank()
        self.world_size: int = ctx.get_world_size()
        if self._local:
            self.device = torch.device("cuda" if meta["use_gpu"] and torch.cuda.is_available() else "cpu")
        else:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.resumed_from_step = 0
        self.last_checkpoint: str | None = None
        self._next_pos = (0, 0)
        self._epoch_len: int | None = None
        self._objects: dict[str, Any] | None = None
        self._saved_step = -1
        self._reseed(0)
        self._logger = _RankZeroLogger(meta.get("mlflow")) if self.rank == 0 else None
        self._interval = _Interval()
        self._t_last = time.perf_counter()
        self._t_start = self._t_last
        self._data_wait = 0.0
        self._last_metrics: dict[str, float] = {}

    # -- model ---------------------------------------------------------------------------
    def prepare(self, model: Any, find_unused_parameters: bool = False) -> Any:
        """Move ``model`` to this worker's device and wrap it in DDP when ``world_size > 1``.

        ``find_unused_parameters``: DDP's flag, for models with trainable parameters that do not
        reach the loss every step (e.g. ZegCLIP's last decoder FFN, whose output no mask uses).
        """
        import torch
        import torch.distributed as dist

        model = model.to(self.device)
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=ids, find_unused_parameters=find_unused_parameters)
        return model

    def restore(self, model: Any, optimizer: Any = None, scheduler: Any = None, **extra: Any) -> int:
        """Register what a checkpoint holds and load it from the last checkpoint, if any.

        Args:
            model: the (prepared) model; its unwrapped state dict is checkpointed.
            optimizer, scheduler: optional; checkpointed with ``state_dict``.
            **extra: more objects with ``state_dict``/``load_state_dict`` (e.g. a GradScaler).

        Returns:
            The step training continues from (0 when starting fresh).

        Raises:
            CheckpointMismatchError: the checkpoint's model keys/shapes differ from ``model``.
        """
        import torch

        self._objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, **extra}
        src = self._resume_source()
        if src is None:
            return 0
        with src as d:
            d = Path(d)
            strict_load(model, torch.load(d / MODEL_PT, map_location="cpu", weights_only=True),
                        source=f"checkpoint {self.last_checkpoint}")
            state = torch.load(d / STATE_PT, map_location="cpu", weights_only=False)
        for key in ("optimizer", "scheduler", *extra):
            obj = self._objects.get(key)
            if obj is None:
                continue
            if key not in state["objects"]:
                raise CheckpointMismatchError([key], [], [], f"checkpoint {self.last_checkpoint} (training state)")
            obj.load_state_dict(state["objects"][key])
        self.step = self.resumed_from_step = int(state["step"])
        self._saved_step = self.step
        self._epoch_len = state.get("epoch_len")
        epoch, pos = int(state["epoch"]), int(state["batch_in_epoch"])
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:  # keep the samples consumed in the epoch
            pos = pos * old_world // self.world_size
            self._epoch_len = None
            self._print(f"note: world size changed {old_world} -> {self.world_size}; the data position is "
                        f"mapped by samples consumed (epoch {epoch}, batch {pos})")
        self._next_pos = (epoch, pos)
        self._reseed(self.step)
        self._print(f"resumed from step {self.step} (epoch {epoch}, batch {pos}): {self.last_checkpoint}")
        return self.step

    def _resume_source(self) -> Any:
        import ray.train

        ckpt = None if self._local else ray.train.get_checkpoint()
        newest = latest_checkpoint(self._meta["storage_path"], self._meta["name"])
        if ckpt is not None and (newest is None or _step_of(str(ckpt.path)) >= newest.step):
            self.last_checkpoint = _checkpoint_uri(ckpt)
            return ckpt.as_directory()
        # In-process runs (Ray persists nothing there), or a complete checkpoint newer than the
        # last one Ray registered (a process died between upload and registration). The same
        # choice as _DatasetAtResume's, so the data's pass counter matches the resumed epoch.
        if newest is None:
            return None
        self.last_checkpoint = newest.uri
        return _as_local_dir(newest.uri)

    # -- data ----------------------------------------------------------------------------
    def batches(self, name: str = "train", **iter_kwargs: Any) -> Iterator[dict[str, Any]]:
        """Batches of this worker's shard of dataset ``name`` until ``train.max_steps``.

        Epoch after epoch of ``get_dataset_shard(name).iter_torch_batches(batch_size=
        train.batch_size, drop_last=True, ...)``, starting at the restored position. Call
        :meth:`step_done` once per batch. Tensors are on :attr:`device`.

        Args:
            name: the dataset name given to :func:`fit`.
            **iter_kwargs: more ``iter_torch_batches`` arguments (``dtypes``, ``collate_fn``).

        Raises:
            DataError: the shard yields no full batch (fewer rows per worker than batch_size).
        """
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        epoch, skip = self._next_pos
        t = self.train
        while self.step < t.max_steps:
            if self._epoch_len is not None and skip >= self._epoch_len:
                epoch, skip = epoch + 1, 0
                continue
            kwargs = dict(batch_size=t.batch_size, drop_last=True, prefetch_batches=t.prefetch_batches,
                          device=self.device)
            if t.shuffle_buffer:
                kwargs.update(local_shuffle_buffer_size=t.shuffle_buffer,
                              local_shuffle_seed=_mix(t.seed, epoch, self.rank))
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
                    self._data_wait += time.perf_counter() - t_wait
                    yield batch
                    n += 1
                    if self.step >= t.max_steps:
                        return
                    t_wait = time.perf_counter()
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
            if n == 0:
                raise DataError(
                    f"dataset {name!r} gave worker {self.rank} no full batch of {t.batch_size} in epoch {epoch}: "
                    f"it needs at least {self.global_batch_size} rows ({self.world_size} worker(s) x {t.batch_size})"
                )
            self._epoch_len = n
            epoch, skip = epoch + 1, 0
            self._next_pos = (epoch, 0)

    # -- per step ------------------------------------------------------------------------
    def step_done(self, loss: Any, images: int | None = None, **metrics: float) -> None:
        """Count one optimisation step: NaN check, logging, periodic checkpoint.

        Args:
            loss: this worker's loss (tensor or float); averaged over workers for the log.
            images: samples this worker processed in the step (default ``train.batch_size``).
            **metrics: extra scalars for the log (rank 0's values).

        Raises:
            NonFiniteLossError: the (all-reduced) loss is NaN/inf.
            RuntimeError: :meth:`restore` was not called (nothing to checkpoint).
        """
        if self._objects is None:
            raise RuntimeError("call loop.restore(model, optimizer, scheduler) before training: "
                               "it registers what checkpoints hold and resumes from the last one")
        self.step += 1
        now = time.perf_counter()
        loss_mean, n_images = self._reduce(loss, self.train.batch_size if images is None else images)
        if not math.isfinite(loss_mean):
            raise NonFiniteLossError(self.step, loss_mean, self.last_checkpoint)
        self._interval.add(loss_mean, n_images, now - self._t_last, metrics)
        self._t_last = now
        if self.step % self.train.log_every == 0 or self.step == self.train.max_steps:
            self._log_interval()
        if self.step % self.train.checkpoint_every == 0 or self.step == self.train.max_steps:
            self.save()

    def _reduce(self, loss: Any, images: int) -> tuple[float, int]:
        import torch
        import torch.distributed as dist

        v = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            t = torch.stack([v.to(self.device).reshape(()), torch.tensor(float(images), device=self.device)])
            dist.all_reduce(t)
            return float(t[0]) / self.world_size, int(t[1])
        return float(v), int(images)

    def _log_interval(self) -> None:
        iv = self._interval
        if iv.steps == 0:
            return
        lr = self._current_lr()
        m = {"train/loss": iv.loss / iv.steps, "train/lr": lr, "train/throughput_img_s": iv.images / max(iv.time, 1e-9),
             "train/step_time_s": iv.time / iv.steps, "train/data_wait_s": self._data_wait / iv.steps,
             "train/epoch": float(self.epoch)}
        for k, v in iv.extra.items():
            m[f"train/{k}"] = v / iv.steps
        self._last_metrics = m
        if self.rank == 0:
            t = self.train
            elapsed = time.perf_counter() - self._t_start
            done = self.step - self.resumed_from_step
            eta = elapsed / max(done, 1) * (t.max_steps - self.step)
            self._print(f"step {self.step}/{t.max_steps} ({100 * self.step / t.max_steps:.0f}%) epoch {self.epoch} "
                        f"loss {m['train/loss']:.4f} lr {lr:.3g} {m['train/throughput_img_s']:.1f} img/s "
                        f"{m['train/step_time_s']:.3f} s/step (data wait {m['train/data_wait_s']:.3f}) "
                        f"eta {_hms(eta)}")
            if self._logger is not None:
                self._logger.log(m, self.step)
        self._interval = _Interval()
        self._data_wait = 0.0

    def _current_lr(self) -> float:
        opt = (self._objects or {}).get("optimizer")
        try:
            return float(opt.param_groups[0]["lr"])
        except Exception:  # noqa: BLE001 - no optimiser registered
            return self.lr

    def log(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log extra scalars to the stage's MLflow run (rank 0 only; others ignore)."""
        if self.rank == 0 and self._logger is not None:
            self._logger.log(dict(metrics), self.step if step is None else step)

    # -- checkpoints ---------------------------------------------------------------------
    def save(self) -> str:
        """Write a checkpoint now (every rank must call it at the same step). Returns its URI."""
        import ray.train
        import torch

        if self._objects is None:
            raise RuntimeError("call loop.restore(...) before saving")
        if self._saved_step == self.step:
            return self.last_checkpoint or ""
        dir_name = f"{CHECKPOINT_PREFIX}{self.step:08d}"
        epoch, pos = self._next_pos
        if self._epoch_len is not None and pos >= self._epoch_len:  # at an epoch's end: the next one
            epoch, pos = epoch + 1, 0
        info = {"step": self.step, "epoch": epoch, "batch_in_epoch": pos, "epoch_len": self._epoch_len,
                "world_size": self.world_size, "global_batch_size": self.global_batch_size,
                "loss": self._last_metrics.get("train/loss"), "time": time.time()}
        metrics = {"step": self.step, "epoch": epoch, **{k.split("/", 1)[1]: v for k, v in self._last_metrics.items()}}
        uri = _join_uri(self._meta["storage_path"], self._meta["name"], dir_name)
        tmp = None
        if self.rank == 0:
            tmp = Path(tempfile.mkdtemp(prefix="zeroseg-ckpt-"))
            objs = self._objects
            torch.save(unwrap(objs["model"]).state_dict(), tmp / MODEL_PT)
            torch.save({**info, "objects": {k: v.state_dict() for k, v in objs.items() if k != "model" and v is not None}},
                       tmp / STATE_PT)
            sizes = {f: (tmp / f).stat().st_size for f in (MODEL_PT, STATE_PT)}
            (tmp / STATE_JSON).write_text(json.dumps({**info, "files": sizes}, indent=1))
        try:
            if self._local:
                _persist(tmp, self._meta["storage_path"], self._meta["name"], dir_name)
                _prune(self._meta["storage_path"], self._meta["name"], self.train.keep_checkpoints)
                fs, path = _fs(uri)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint(path, filesystem=fs))
            else:
                ckpt = ray.train.Checkpoint.from_directory(str(tmp)) if tmp is not None else None
                ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=dir_name)
                # Block until the controller has registered it: a report still queued in a worker
                # that dies right after is lost, and the restart would begin from an older one.
                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self._saved_step = self.step
        self.last_checkpoint = uri
        self._reseed(self.step)
        return uri

    def _finish(self) -> None:
        if self._objects is None:
            raise RuntimeError("the train loop returned without calling loop.restore(...): nothing to checkpoint")
        if self.step < self.train.max_steps:
            raise RuntimeError(f"the train loop returned at step {self.step} of {self.train.max_steps}; "
                               "iterate loop.batches() to the end and call loop.step_done() once per batch")
        if self._interval.steps:
            self._log_interval()
        self.save()

    def _close(self) -> None:
        if self._logger is not None:
            self._logger.close()

    # -- misc ----------------------------------------------------------------------------
    def _reseed(self, step: int) -> None:
        import torch

        s = _mix(self.train.seed, self.rank, step)
        torch.manual_seed(s)
        np.random.seed(s % 2**32)
        random.seed(s)

    def _print(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[train] {msg}", flush=True)


@dataclasses.dataclass
class _Interval:
    steps: int = 0
    loss: float = 0.0
    images: int = 0
    time: float = 0.0
    extra: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, loss: float, images: int, seconds: float, extra: Mapping[str, float]) -> None:
        self.steps += 1
        self.loss += loss
        self.images += images
        self.time += seconds
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0.0) + float(v)


class _RankZeroLogger:
    """Logs metric batches to an existing MLflow run from a worker process (any tracking URI
    the worker can reach; a sqlite file works on one machine). Failures warn once and disable
    logging rather than stop training."""

    def __init__(self, target: dict[str, Any] | None):
        self._client = None
        self._run_id = None
        if not target or not target.get("run_id"):
            return
        try:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(target.get("tracking_uri"))
            self._run_id = target["run_id"]
        except Exception as e:  # noqa: BLE001
            self._warn(e)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        try:
            from mlflow.entities import Metric

            ts = int(time.time() * 1000)
            items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items()
                     if isinstance(v, (int, float)) and math.isfinite(v)]
            self._client.log_batch(self._run_id, metrics=items)
        except Exception as e:  # noqa: BLE001 - tracking must not stop training
            self._warn(e)
            self._client = None

    def close(self) -> None:
        self._client = None

    @staticmethod
    def _warn(e: BaseException) -> None:
        print(f"[train] warning: MLflow logging from the worker disabled: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)


# =============================================================================================
# Storage helpers (local path, NFS mount, s3://, gs://)
# =============================================================================================
def _is_local(storage_path: str) -> bool:
    return "://" not in storage_path or storage_path.startswith("file://")


def _fs(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if _is_local(uri):
        return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def _join_uri(storage_path: str, name: str, leaf: str) -> str:
    if _is_local(storage_path):
        return str(Path(storage_path.removeprefix("file://")).resolve() / name / leaf)
    return f"{storage_path.rstrip('/')}/{name}/{leaf}"


def _persist(src: Path | None, storage_path: str, name: str, dir_name: str) -> None:
    """Copy a local checkpoint directory to ``<storage>/<name>/<dir_name>``, state JSON last."""
    import pyarrow.fs as pafs

    assert src is not None
    fs, base = _fs(storage_path)
    dest = f"{base}/{name}/{dir_name}"
    if fs.get_file_info(dest).type != pafs.FileType.NotFound:
        fs.delete_dir(dest)
    fs.create_dir(dest, recursive=True)
    local = pafs.LocalFileSystem()
    for p in sorted(src.iterdir(), key=lambda p: p.name == STATE_JSON):  # the marker last
        pafs.copy_files(str(p), f"{dest}/{p.name}", source_filesystem=local, destination_filesystem=fs)


def _prune(storage_path: str, name: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and stale incomplete ones)."""
    import pyarrow.fs as pafs

    fs, base = _fs(storage_path)
    complete = list_checkpoints(storage_path, name)
    newest = complete[-1].step if complete else -1
    keep_names = {c.uri.rstrip("/").rsplit("/", 1)[1] for c in complete[-keep:]}
    for info in fs.get_file_info(pafs.FileSelector(f"{base}/{name}", allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(CHECKPOINT_PREFIX):
            continue
        step = info.base_name[len(CHECKPOINT_PREFIX):]
        if info.base_name in keep_names or (step.isdigit() and int(step) > newest):
            continue
        fs.delete_dir(info.path)


def _checkpoint_uri(ckpt: Any) -> str:
    fs = getattr(ckpt, "filesystem", None)
    path = str(ckpt.path)
    if fs is None or getattr(fs, "type_name", "local") == "local":
        return path
    return f"{fs.type_name}://{path}"


class _as_local_dir:
    """Context manager: a local directory with a checkpoint's files (downloads remote ones)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._tmp: str | None = None

    def __enter__(self) -> str:
        if _is_local(self.uri):
            return self.uri.removeprefix("file://")
        import pyarrow.fs as pafs

        self._tmp = tempfile.mkdtemp(prefix="zeroseg-resume-")
        fs, path = pafs.FileSystem.from_uri(self.uri)
        pafs.copy_files(path, self._tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        return self._tmp

    def __exit__(self, *exc: Any) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _step_of(path: str) -> int:
    leaf = path.rstrip("/").rsplit("/", 1)[-1]
    tail = leaf[len(CHECKPOINT_PREFIX):] if leaf.startswith(CHECKPOINT_PREFIX) else ""
    return int(tail) if tail.isdigit() else -1


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = [
    "CheckpointInfo", "CheckpointMismatchError", "FitResult", "Loop", "MlflowTarget", "NonFiniteLossError",
    "ScalingSection", "TrainSection", "fit", "global_batch_and_lr", "latest_checkpoint", "list_checkpoints",
    "load_model_state", "strict_load", "unwrap",
]
