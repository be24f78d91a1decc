"""Pipeline stages: each module registers one stage with ``pipeline.dag.register``.

Importing this package registers them all, in DAG order.
"""

from stages import build_splits, embed_text, train_classifier, evaluate  # noqa: F401
