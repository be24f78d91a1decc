"""A toy method that brings its own stage, as PADing brings train_generator: ``toy_fit`` writes a
segmenter (the training-free MaskCLIP on the config's CLIP) that the project's evaluate scores.

Its catalogue (:mod:`toymethod.catalog`) lists the project's stages plus ``toy_fit`` and declares
its own headline (the method label ``toy``) and report; nothing in ``pipeline/`` or ``stages/``
names it (tests/test_toy_method.py).
"""
