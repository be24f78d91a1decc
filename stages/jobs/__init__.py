"""The stages' jobs: what a stage computes when it runs (``stages/jobs/<stage>.py``, imported by
name from the stage's ``run``: ``stages.common.JobStage``). A job imports torch, Ray and numpy at
its top and defines its actors and modules at module level; planning never imports it.
"""
