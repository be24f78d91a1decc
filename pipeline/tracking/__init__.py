"""MLflow tracking: one parent run per invocation, one nested run per stage.

Params are the hashed part of each stage's config (flattened to dotted keys; what the artifact
key covers), tags carry the artifact key, the stage status (``ran``/``cached``/``failed``), the
runtime settings (``runtime.<key>``: they may differ between attempts, params may not) and, for
cached stages, the MLflow run that produced the artifact. The parent run carries every stage's
params (``<stage>.<key>``) and the evaluation metrics, so MLflow's compare view lines runs up.

Nothing is lost:

* artifacts (manifests, plots, tables) go to the location that belongs to the tracking store
  (``<work_dir>/mlartifacts`` beside a sqlite file, or what an ``mlflow server`` serves), never to
  ``./mlruns`` of whatever directory the command runs in;
* a stage that fails or is killed and then re-run continues in *its* MLflow run (same artifact
  key): training curves go on from the step they reached;
* runs left ``RUNNING`` by a process that was killed (SIGKILL, a lost node) are marked ``KILLED``
  by the next invocation on the same host (:func:`reap_dead_runs`).

MLflow is opened lazily (:class:`Invocation`, :mod:`pipeline.tracking.invocation`): importing it
and its sqlite store costs about 3 s, more than everything else a fully cached invocation does. An
invocation in which no stage runs writes its records (the parent run, a ``cached`` run per stage,
with their times) to a journal in the work directory and a detached process logs them (``python -m
pipeline.tracking flush``, :mod:`pipeline.tracking.journal`); the next invocation that opens MLflow
logs any journal left first. As soon as a stage has to run, the invocation opens MLflow and logs
what it recorded so far.

The default tracking URI is a sqlite file in the work directory, so nothing has to be started;
``mlflow ui --backend-store-uri <uri>`` shows the runs.

The package, by concern: :mod:`~pipeline.tracking.runs` (the store, the experiment, parent and
stage runs, params, metrics, tags, artifacts, reaping killed runs), :mod:`~pipeline.tracking.headline`
 (the params every run carries, as the stage catalogue declares them),
:mod:`~pipeline.tracking.invocation`, :mod:`~pipeline.tracking.journal` and
:mod:`~pipeline.tracking.server` (a local ``mlflow server``, ``run.tracking_server``).
"""

from pipeline.tracking import runs
from pipeline.tracking.headline import headline_names, headline_params
from pipeline.tracking.invocation import Invocation
from pipeline.tracking.journal import flush_journal
from pipeline.tracking.runs import (  # noqa: F401 - sweep and the tests use them
    HOST_TAG,
    PID_START_TAG,
    PID_TAG,
    _mlflow,
    _process_tags,
    artifact_root_for,
    log_artifact,
    log_artifacts,
    log_metrics,
    log_params,
    parent_run,
    reap_dead_runs,
    set_tags,
    setup,
    stage_run,
    ui_command,
)
from pipeline.tracking.server import TrackingServer, local_server

__all__ = [
    "Invocation",
    "TrackingServer",
    "flush_journal",
    "headline_names",
    "headline_params",
    "local_server",
    *runs.__all__,
]
