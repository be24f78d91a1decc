"""Pipeline stages: one module per stage (wiring of config and inputs to ``zeroseg``).

The stage list is ``stages.catalog.STAGES`` (what ``pipeline.cli`` loads). Importing this package
imports no stage, so that a stage's code dependencies (``pipeline.codehash``) are its own imports,
not every stage's. It makes the science's errors (``zeroseg.errors``) user errors of the pipeline:
printed as one line, carried back from Ray workers as themselves.
"""

from pipeline.errors import register_user_errors
from zeroseg.errors import ZerosegError

register_user_errors(ZerosegError)
