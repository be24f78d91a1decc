"""Ray Tune sweeps: ``zeroseg sweep --config configs/X.yaml --sweep configs/sweeps/Y.yaml``.

A sweep file (:class:`SweepFile`, :mod:`.spec`) names a search space over any config keys
(``grid``, ``choice``, ``uniform``, ``loguniform``), the metric and mode (default: the stage
catalogue's ``SWEEP_DEFAULTS``, :class:`pipeline.catalogue.SweepDefaults`), the scheduler (ASHA,
or none), samples, seeds, the resources of a trial and ``max_concurrent_trials``.

How a sweep runs (:func:`run_sweep`, :mod:`.run`):

1. *The shared upstream, once* (:mod:`.prefix`). The base config is planned with every searched key set to each
   of its values (grid/choice) or bounds (uniform/loguniform), and every seed; a node whose key
   is the same in all these plans does not depend on what is searched. Those nodes are the shared
   prefix of every trial: they run (or are read) once, on the driver, before any trial starts.
   Only the suffix is tuned: a trial finds the prefix cached and runs its own nodes. (A sampled
   value between the bounds cannot re-key a node that neither bound re-keys: keys depend on the
   value only through the stage's config.) The store's per-key lease still guards the rest:
   two trials that happen to share a suffix node compute it once.
2. *Trials* (:mod:`.trainable`; resources and ASHA: :mod:`.resources`). A Tune function
   trainable (:func:`trial`) plans and executes the trial's config
   (the base config + ``--set key=value`` per sampled value) inside the trial's actor, on
   whichever node Tune placed it, against the same store, and reports the evaluate metrics with
   ``ray.tune.report``. A training stage inside a trial is a TorchTrainer whose Ray Train run
   name is derived from its artifact key (``ArtifactStore.checkpoint_dir``): deterministic per
   trial, so a retried or resumed trial continues from its checkpoints. While a training stage
   runs, each of its progress reports (every ``log_every`` steps) is forwarded to Tune as an
   intermediate result ``{<stage>/step, <stage>/loss, <stage>/lr}`` (:func:`training_reports`),
   so ASHA can stop a trial mid-training: with ``asha_metric: train_classifier/loss`` ASHA's
   rungs are in that stage's steps (``time_attr`` ``train_classifier/step``). The final result
   (the evaluate metrics) is what the sweep ranks trials on (``metric``), by our own code.
3. *Resume.* The Tune experiment lives in the store (``<store>/_sweeps/<name>-<id>``; the id
   digests the resolved base config and the sweep file): re-running the same command restores it
   (``Tuner.restore``); finished trials are not re-run, unfinished and errored ones are.
4. *Tracking.* One MLflow run for the sweep; the shared-upstream invocation and every trial's
   invocation are nested runs under it (their stage runs nested under them), each carrying the
   headline params (method, CLIP, split, seed: ``pipeline.tracking.headline_params``) and tags
   ``zeroseg.sweep_id``, ``zeroseg.trial_id``, ``zeroseg.trial_params``, ``zeroseg.seed``.
   With seeds, configurations are aggregated into mean and standard deviation over seeds
   (:func:`aggregate`, :mod:`.results`), printed and logged to the sweep run
   (``sweep_summary.json``).
"""

from .prefix import experiment_id, probe_overrides, shared_nodes
from .resources import asha_scheduler, stage_cpus, start_ray_data_services, trial_concurrency
from .results import ConfigResult, SweepOutcome, aggregate, format_results, print_outcome
from .run import SWEEPS, run_sweep, sweep_storage
from .spec import AshaSection, Dist, SweepFile, load_sweep
from .trainable import training_reports, trial

__all__ = [
    "SWEEPS",
    "AshaSection",
    "ConfigResult",
    "Dist",
    "SweepFile",
    "SweepOutcome",
    "aggregate",
    "asha_scheduler",
    "experiment_id",
    "format_results",
    "load_sweep",
    "print_outcome",
    "probe_overrides",
    "run_sweep",
    "shared_nodes",
    "stage_cpus",
    "start_ray_data_services",
    "sweep_storage",
    "training_reports",
    "trial",
    "trial_concurrency",
]
