"""The one wrapper around Ray Train: :func:`fit` on the driver, :class:`Loop` in every worker.

A training stage hands :func:`fit` a per-worker loop, its config, the Ray Data datasets and two
config sections (:class:`ScalingSection`, :class:`TrainSection`). ``fit`` runs a
``ray.train.torch.TorchTrainer`` (DDP; gloo on CPU, nccl on GPU), or the loop in-process with
``num_workers: 0``, and returns the final checkpoint as a local directory (:class:`FitResult`);
the stage exports what it needs from it into its artifact. Nothing here knows segmentation.

Layout (recipe, checkpointing and metric logging apart, as torchtune and detectron2 do):

* ``config.py``: the sections, the global batch / lr rule, the CPU check;
* ``fit.py``: the driver (trainer, resume decision, result, sweeping unrecorded checkpoints);
* ``loop.py``: the worker's :class:`Loop` (see its docstring for a method's loop);
* ``worker.py``: what every worker runs (the loop, the final checkpoint, the status it returns);
* ``checkpoint.py``: checkpoint files and the records (Ray Train's, in-process) that list them;
* ``in_process.py``: the in-process record (``num_workers=0``, where Ray persists nothing);
* ``layout.py``: a checkpoint's directory names and record entry (:class:`CheckpointInfo`), shared
  by the two above (which import it, not each other);
* ``precision.py``: what ``precision: auto | fp32 | bf16 | fp16`` means on a device;
* ``metrics.py``: the loss reduced over workers, curves, MLflow logging, :class:`Progress`;
* ``progress.py``: how rank 0's progress reaches the driver (an actor, or directly);
* ``pipeline/raycompat.py`` (beside the package, used by the data feeds too): Ray Data's private
  pass counter, read and written only there.

Resume. ``RunConfig(storage_path, name)`` comes from the artifact key (``StageContext.train_storage``
/ ``train_name``), so re-running an interrupted stage finds its checkpoints:

* worker failure: ``FailureConfig(max_failures)`` restarts the worker group, which resumes from
  the last registered checkpoint (``ray.train.get_checkpoint()``);
* driver killed: re-running the same command starts a new ``TorchTrainer`` with the same run
  config; Ray Train V2 reloads its checkpoint record (its run snapshot) and ``get_checkpoint()``
  returns the latest (``TorchTrainer.restore`` is deprecated in V2). Directories Ray never
  registered are deleted, not resumed from.
* in-process (``num_workers=0``): the in-process record (``in_process.py``) plays Ray's part.

What a resumed run restores exactly: the optimisation steps done, the model state, optimiser,
scheduler, gradient scaler (fp16) and any ``extra`` object with ``state_dict``, the data position
(epoch and micro-batches consumed in it: the resumed worker skips those, which still decodes
them: at most one epoch's worth), and the torch/numpy/python RNG streams (re-seeded from
``(seed, rank, step)`` after every step, so an uninterrupted and a resumed run draw the same
numbers after step ``s``). With ``deterministic_data`` the rows a worker gets per epoch and
their order are a function of ``(seed, epoch, world size)``, and the per-sample augmentation of
``(seed, image id, epoch)``: a resumed run (in-process, measured bitwise, with fp32 and with
bf16 + accumulation + clipping) makes the same steps as an uninterrupted one. Not exact: GPU
kernels are not bitwise deterministic; Ray Data's split of an epoch between several workers is
deterministic only with ``deterministic_data``; changing the number of workers between attempts
maps the position by samples consumed; Ray Data's pass counter that seeds the per-epoch
randomness is a private field (``raycompat.py``).
"""

from pipeline.errors import CheckpointMismatchError, NonFiniteLossError, TrainingDataError, TrainingError

from .checkpoint import CheckpointInfo, latest_checkpoint, list_checkpoints, load_model_state
from .config import MlflowTarget, ScalingSection, TrainSection, check_cpus_left_for_data, global_batch_and_lr
from .fit import FitResult, fit, fit_stage
from .loop import Loop, unwrap
from .metrics import Progress
from .precision import resolve_precision

__all__ = [
    "CheckpointInfo",
    "CheckpointMismatchError",
    "FitResult",
    "Loop",
    "MlflowTarget",
    "NonFiniteLossError",
    "Progress",
    "ScalingSection",
    "TrainSection",
    "TrainingDataError",
    "TrainingError",
    "check_cpus_left_for_data",
    "fit",
    "fit_stage",
    "global_batch_and_lr",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_state",
    "resolve_precision",
    "unwrap",
]
