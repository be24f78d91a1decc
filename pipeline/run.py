"""The entry point for ``ray job submit``: ``python pipeline/run.py --config configs/<x>.yaml``.

The same as ``zeroseg run --config ...`` (see ``pipeline/cli.py`` for the options)::

    python pipeline/run.py --config configs/sample.yaml
    python pipeline/run.py --config configs/sample.yaml --dry-run
    python pipeline/run.py --config configs/sample.yaml --set evaluate.gamma=0.1
    python pipeline/run.py --config configs/sample.yaml --stages evaluate --force
    python pipeline/run.py --config configs/sample.yaml --from train_classifier
    python pipeline/run.py --config configs/sample.yaml --store s3://bucket/zeroseg
    python pipeline/run.py gc --config configs/sample.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # executed as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
