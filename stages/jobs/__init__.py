"""The stages' jobs: what a stage's ``run(ctx)`` does, with torch and Ray imported at the top.

``stages/<stage>.py`` (and ``stages/methods/<m>.py``) is the torch-free spec: the config schema
and the Stage / Method contract, imported at plan time. Its ``run`` imports ``stages.jobs.<stage>``
(``stages.jobs.methods.<m>``), which defines the stage's modules, train loops and actors at module
level (Ray Train pickles a train loop by reference: a module-level function of an importable
module). ``pipeline.codehash`` follows that import, so editing a job re-keys its stage.
"""
