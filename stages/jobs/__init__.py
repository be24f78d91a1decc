"""The stages' jobs: what a stage computes when it runs, with torch, Ray and numpy imported at the
top of each module.

``stages/<stage>.py`` (and ``stages/methods/<m>.py``) is the torch-free spec: the config schema
and the Stage / Method contract, imported at plan time. Running the stage imports its job,
``stages.jobs.<stage>`` (``stages.jobs.methods.<m>``), which defines the stage's modules, train
loops and actors at module level (Ray Train pickles a train loop by reference: a module-level
function of an importable module). The job enters its stage's key (``Stage.code``), so editing
a job re-keys its stage; planning never imports it.
"""
