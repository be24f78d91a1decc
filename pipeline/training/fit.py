"""The driver side: :func:`fit` runs a train loop with Ray Train and returns the final checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import uri as uri_
from pipeline.errors import ConfigError, NonFiniteLossError, RemoteUserError, carrier_key, find_user_error
from pipeline.raycompat import set_pass_index

from . import in_process
from .checkpoint import CheckpointInfo, latest_checkpoint, load_model_state, sweep_unrecorded
from .config import MlflowTarget, ScalingSection, TrainSection, check_cpus_left_for_data, global_batch_and_lr
from .loop import Loop
from .metrics import Progress
from .progress import relay, with_listeners
from .worker import worker_main

if TYPE_CHECKING:
    from pipeline.dag import StageContext


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
        checkpoint_dir: local directory of the final checkpoint (``model.pt``,
            ``train_state.pt``, ``train_state.json``); for remote storage a downloaded copy.
        checkpoint_uri: where that checkpoint lives in storage.
        steps: optimisation steps done (== ``TrainSection.max_steps``).
        metrics: rank 0's last curves without the ``train/`` prefix (``loss``: mean over the
            last logging interval, ``lr``, ``throughput_img_s``, ...) and ``epoch``.
        global_batch_size: workers x per-worker batch x accumulation steps.
        effective_lr: the learning rate used (after ``lr_scaling``).
        resumed_from_step: the step the final attempt started from (0: from scratch).
        world_size: DDP processes (1 for ``num_workers=0``).
        precision: the precision the workers resolved (``fp32``, ``bf16``, ``fp16``).
    """

    checkpoint_dir: Path
    checkpoint_uri: str
    steps: int
    metrics: dict[str, Any]
    global_batch_size: int
    effective_lr: float
    resumed_from_step: int
    world_size: int
    precision: str = "fp32"

    def model_state(self) -> dict[str, Any]:
        """The saved model state (what the loop's ``model_state`` getter returned; by default the
        whole unwrapped model's state dict), CPU tensors."""
        return load_model_state(self.checkpoint_dir)


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
    progress: Callable[[Progress], None] | None = None,
) -> FitResult:
    """Train with Ray Train and return the final checkpoint.

    Runs ``train_loop`` in ``scaling.num_workers`` Ray Train workers (``TorchTrainer``, DDP; gloo
    on CPU, nccl on GPU) with ``RunConfig(storage_path, name)``, ``FailureConfig(max_failures)``
    and ``CheckpointConfig(num_to_keep=keep_checkpoints)``, or in this process with
    ``num_workers=0``. Re-running with the same ``storage_path`` and ``name`` resumes from the
    newest recorded checkpoint (Ray Train's record for worker runs, the in-process record
    otherwise; see ``checkpoint.py``); a run already at ``max_steps`` is not trained again.
    Checkpoint directories no record lists (left by a killed driver or worker) are deleted
    before and after training, so a run ends with at most ``keep_checkpoints`` of them (plus, after
    a switch from workers to in-process, Ray's older ones until the next worker fit).

    Args:
        train_loop: ``train_loop(loop: Loop) -> None``, run once per worker (must be picklable:
            a module-level function). See ``pipeline.training.loop``.
        loop_config: the loop's own settings (``loop.config``); JSON-like, picklable.
        datasets: Ray Data datasets (or factories) by name (``"train"`` at least); split across
            workers.
        scaling: workers, GPUs, resources.
        train: steps, batch, accumulation, precision, clipping, lr, checkpointing, logging.
        storage_path: ``RunConfig.storage_path``: local path, NFS mount or ``s3://``/``gs://`` URI.
        name: ``RunConfig.name`` (from the artifact key: the same name resumes).
        mlflow: the stage's MLflow run for rank 0's curves (``tracking_uri``, ``run_id``); None
            logs nothing to MLflow.
        local_dir: where a remote final checkpoint is downloaded (default: a temp directory).
        log: the driver's line printer: the plan, notes from rank 0 (resumed from ...) and, when
            ``progress`` is None, one line per progress report.
        progress: called on the driver with each :class:`~.metrics.Progress` record (every
            ``log_every`` steps and at the last), from a helper thread while workers train
            (never two calls at a time), directly in-process. Listeners of
            ``progress.forward_progress`` get each record too (with ``name``).

    Returns:
        The :class:`FitResult`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (step and last good checkpoint named).
        CheckpointMismatchError, TrainingDataError, ConfigError, or a registered user error
            (``pipeline.errors``) raised by a worker: the original error, unwrapped from Ray's (in
            a multi-worker run Ray Train counts it as a worker failure first and retries up to
            ``max_failures`` times).
        ray.train.TrainingFailedError: any other failure once ``max_failures`` is used up.
        OSError: the storage cannot be listed (a resume must not silently restart from 0).
    """
    setup = _setup(datasets, scaling, train, storage_path, name, mlflow, log)
    storage = setup.storage
    _sweep(storage, name, log)
    latest = latest_checkpoint(storage, name)
    if latest is not None:
        log(f"found checkpoint at step {latest.step}: {latest.uri}")
        if latest.step >= train.max_steps:
            log(f"training already finished ({latest.step}/{train.max_steps} steps); not re-running it")
            world = int(latest.state.get("world_size", setup.world))
            return _result_from(latest, {}, setup.global_batch, setup.lr, latest.step, world, local_dir)
    t0 = time.perf_counter()
    status = _train(train_loop, loop_config, datasets, setup, latest, log, progress)
    return _final_result(status, setup, t0, log, local_dir)


@dataclasses.dataclass
class _Setup:
    """What :func:`fit` was given and derived from its arguments: the sections, the run name, the
    storage path (absolute when local), the MLflow target (a sqlite path made absolute), the
    global batch, the learning rate and the world size."""

    scaling: ScalingSection
    train: TrainSection
    name: str
    storage: str
    target: MlflowTarget | None
    global_batch: int
    lr: float
    world: int


def _setup(
    datasets: Mapping[str, Any],
    scaling: ScalingSection,
    train: TrainSection,
    storage_path: str,
    name: str,
    mlflow: MlflowTarget | Mapping[str, Any] | None,
    log: Callable[[str], None],
) -> _Setup:
    """Check the arguments, derive :class:`_Setup` and print the training plan.

    Raises:
        ConfigError: no ``train`` dataset (and what :func:`.config.global_batch_and_lr` raises).
    """
    if "train" not in datasets:
        raise ConfigError(f"fit needs a 'train' dataset; got {sorted(datasets)}")
    if scaling.use_gpu and scaling.num_workers == 0:
        log("note: num_workers=0 trains in this process; use_gpu uses its GPU if it has one")
    target = MlflowTarget.model_validate(dict(mlflow)) if isinstance(mlflow, Mapping) else mlflow
    if (
        target is not None
        and (target.tracking_uri or "").startswith("sqlite:///")
        and not target.tracking_uri.startswith("sqlite:////")
    ):  # workers run elsewhere: make it absolute
        target = target.model_copy(
            update={"tracking_uri": "sqlite:///" + str(Path(target.tracking_uri[10:]).resolve())}
        )
    storage = uri_.join(storage_path)  # local: absolute (workers run in other directories)
    global_batch, lr, note = global_batch_and_lr(scaling, train)
    if note:
        log(note)
    world = max(1, scaling.num_workers)
    accum = f" x {train.grad_accum_steps} accumulation steps" if train.grad_accum_steps > 1 else ""
    clip = f", clip grad norm {train.clip_grad_norm:g}" if train.clip_grad_norm is not None else ""
    log(
        f"training: {world} worker(s) x batch {train.batch_size}{accum} = global batch {global_batch}, lr {lr:g}, "
        f"precision {train.precision}{clip}, {train.max_steps} steps, checkpoint every {train.checkpoint_every} "
        f"(keep {train.keep_checkpoints}) under {uri_.join(storage, name)}"
    )
    return _Setup(scaling, train, name, storage, target, global_batch, lr, world)


def _train(
    train_loop: Callable[[Loop], Any],
    loop_config: dict[str, Any],
    datasets: Mapping[str, Any],
    setup: _Setup,
    latest: CheckpointInfo | None,
    log: Callable[[str], None],
    progress: Callable[[Progress], None] | None,
) -> dict[str, Any]:
    """Run the ``TorchTrainer`` (workers, or in this process) from ``latest``, progress relayed
    to the driver. Returns the workers' status (:func:`.worker.worker_main`).

    Raises:
        a user error a worker raised (unwrapped), or Ray Train's error.
    """
    scaling, train, name, storage = setup.scaling, setup.train, setup.name, setup.storage
    prepared = {k: _DatasetAtResume(v, train.deterministic_data, storage, name) for k, v in datasets.items()}
    meta = {
        "train": train.model_dump(),
        "lr": setup.lr,
        "global_batch_size": setup.global_batch,
        "local_mode": scaling.num_workers == 0,
        "use_gpu": scaling.use_gpu,
        "storage_path": storage,
        "name": name,
        "mlflow": setup.target.model_dump() if setup.target and setup.target.run_id else None,
        "start_from": {"uri": latest.uri, "step": latest.step} if latest else None,
        "error_key": carrier_key(),  # how a user error raised in a worker is signed for this driver
    }
    if scaling.num_workers > 0:
        import ray

        check_cpus_left_for_data(scaling, ray.cluster_resources().get("CPU", 0.0))
    show = with_listeners(progress if progress is not None else (lambda p: log(p.line())), name)
    with relay(scaling.num_workers > 0, show, log) as channel:

        def train_fn(config: dict[str, Any]) -> dict[str, Any]:
            return worker_main(config, train_loop, meta, channel)

        trainer = _trainer(train_fn, loop_config, scaling, train, storage, name, prepared)
        try:
            result = trainer.fit()
        except Exception as e:  # TrainingFailedError, or the loop's own error in-process
            user = find_user_error(e)
            if user is not None:
                raise user from None
            raise
    return result.return_value or {}


def _trainer(
    train_fn: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    scaling: ScalingSection,
    train: TrainSection,
    storage: str,
    name: str,
    prepared: dict[str, Any],
) -> Any:
    """The ``TorchTrainer``: DDP (nccl on GPU, gloo on CPU), the run's name and storage, its
    failure and checkpoint policy, the datasets with the driver's Ray Data execution options."""
    from ray.data import DataContext
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    exec_opts = copy.deepcopy(DataContext.get_current().execution_options)  # resource limits etc.
    exec_opts.preserve_order = train.deterministic_data
    return TorchTrainer(
        train_fn,
        train_loop_config=dict(loop_config),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
        datasets=prepared,
        dataset_config=DataConfig(execution_options=exec_opts),
    )


def _final_result(
    status: dict[str, Any],
    setup: _Setup,
    t0: float,
    log: Callable[[str], None],
    local_dir: str | Path | None,
) -> FitResult:
    """The :class:`FitResult` of a finished fit: its final checkpoint (superseded in-process and
    unrecorded checkpoints removed), rank 0's last metrics.

    Raises:
        NonFiniteLossError, a worker's user error (from ``status``), RuntimeError: no final
            checkpoint at ``max_steps``.
    """
    scaling, train, name, storage = setup.scaling, setup.train, setup.name, setup.storage
    if status.get("status") == "error":
        raise find_user_error(RemoteUserError(status["error"])) or RuntimeError(status["error"])
    if status.get("status") == "nonfinite":
        raise NonFiniteLossError(status["step"], status["loss"], status.get("last_checkpoint"))
    final = latest_checkpoint(storage, name)
    if final is None or final.step < train.max_steps:
        raise RuntimeError(
            f"training ended without a final checkpoint under {uri_.join(storage, name)} "
            f"(newest: {final.uri if final else None})"
        )
    if scaling.num_workers > 0:  # the run went on with workers: older in-process checkpoints are superseded
        dropped = in_process.clear(storage, name, before_step=final.step)
        if dropped:
            log(f"removed {len(dropped)} in-process checkpoint(s) superseded by this run: {', '.join(dropped)}")
    _sweep(storage, name, log)
    metrics = {k.split("/", 1)[-1]: v for k, v in (status.get("metrics") or {}).items()}
    log(
        f"training finished: {final.step} steps in {time.perf_counter() - t0:.1f} s "
        f"(this attempt started at step {status.get('resumed_from', 0)}); checkpoint {final.uri}"
    )
    resumed, world = int(status.get("resumed_from", 0)), int(status.get("world_size", setup.world))
    res = _result_from(final, metrics, setup.global_batch, setup.lr, resumed, world, local_dir)
    res.precision = str(status.get("precision", res.precision))
    return res


def _sweep(storage: str, name: str, log: Callable[[str], None]) -> None:
    gone = sweep_unrecorded(storage, name)
    if gone:
        log(
            f"removed {len(gone)} checkpoint director{'y' if len(gone) == 1 else 'ies'} no record lists "
            f"(left by an interrupted run): {', '.join(gone)}"
        )


def _result_from(
    ckpt: CheckpointInfo,
    metrics: dict[str, Any],
    global_batch: int,
    lr: float,
    resumed: int,
    world: int,
    local_dir: str | Path | None,
) -> FitResult:
    if uri_.is_local(ckpt.uri):
        path = uri_.local_path(ckpt.uri)
    else:
        base = Path(local_dir) if local_dir else Path(tempfile.mkdtemp(prefix="zeroseg-ckpt-"))
        path = uri_.copy_dir_to_local(ckpt.uri, base / ckpt.dir_name)
    kept = {k: ckpt.state[k] for k in ("loss", "epoch") if ckpt.state.get(k) is not None}
    return FitResult(
        checkpoint_dir=path,
        checkpoint_uri=ckpt.uri,
        steps=ckpt.step,
        metrics={**kept, **metrics},
        global_batch_size=global_batch,
        effective_lr=lr,
        resumed_from_step=resumed,
        world_size=world,
        precision=str(ckpt.state.get("precision", "fp32")),
    )


class _DatasetAtResume:
    """A dataset factory Ray Train calls at every worker-group start (first start and each
    restart; in the controller, or in this process for an in-process fit): the dataset with
    ``preserve_order`` set and Ray Data's pass counter (which seeds per-epoch shuffling and
    augmentation) at the epoch of the newest recorded checkpoint, the one the workers resume
    from (see ``Loop._resume_source``)."""

    def __init__(self, ds: Any, deterministic: bool, storage_path: str, name: str):
        self.ds, self.deterministic, self.storage_path, self.name = ds, deterministic, storage_path, name

    def __call__(self) -> Any:
        ds = self.ds() if callable(self.ds) else self.ds
        latest = latest_checkpoint(self.storage_path, self.name)
        return prepare_dataset(ds, self.deterministic, int(latest.state.get("epoch", 0)) if latest else 0)


def prepare_dataset(ds: Any, deterministic: bool, start_epoch: int) -> Any:
    """A copy of ``ds`` with its own ``DataContext``: ``preserve_order = deterministic`` and Ray
    Data's pass counter at ``start_epoch`` (the caller's dataset is untouched). Anything that is
    not a ``ray.data.Dataset`` is returned as is."""
    from ray.data import Dataset

    if not isinstance(ds, Dataset):
        return ds
    try:
        ds = Dataset.copy(ds, _deep_copy=True)
    except TypeError:
        ds = Dataset.copy(ds)
    ds.context.execution_options.preserve_order = deterministic
    set_pass_index(ds.context, start_epoch)
    return ds


def fit_stage(
    ctx: StageContext,
    train_loop: Callable[[Loop], Any],
    loop_config: dict[str, Any],
    datasets: Mapping[str, Any],
    scaling: ScalingSection,
    train: TrainSection,
) -> FitResult:
    """:func:`fit` for a pipeline stage: Ray Train's storage and run name (the artifact key's:
    the same key resumes), the MLflow run and the output from the stage's context, and one
    progress display of ``train.max_steps`` steps showing the loss and learning rate.

    Raises:
        what :func:`fit` raises.
    """
    bar = ctx.progress(train.max_steps, "steps")
    return fit(
        train_loop,
        loop_config,
        datasets,
        scaling,
        train,
        ctx.train_storage,
        ctx.train_name,
        ctx.tracking,
        log=ctx.log,
        progress=lambda p: bar.update(completed=p.step, loss=f"{p.loss:.4f}", lr=f"{p.lr:.2e}"),
    )
