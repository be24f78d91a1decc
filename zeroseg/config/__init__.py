"""Torch-free configuration schemas of the science: the CLIP spec and each method's model
hyperparameters, as pydantic models.

Everything here imports neither torch nor Ray nor open_clip, so that a pipeline can validate a
config and compute artifact keys without loading a deep-learning stack (``zeroseg run
--dry-run`` and a fully cached run import neither). The models in ``zeroseg.models`` take these
configs (or their ``model_dump()``) and build the networks.

Adding a method adds a module here (its model hyperparameters), one in ``zeroseg.models`` (the
network) and one in ``stages.methods`` (how it is trained); nothing is edited.
"""
