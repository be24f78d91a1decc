"""The learning-rate schedule of the proposal model's solver (and DeOP's, PADing's generator's).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations


def poly_lr_factor(
    step: int, max_steps: int, power: float = 0.9, warmup_steps: int = 0, warmup_factor: float = 1.0
) -> float:
    """detectron2's ``WarmupPolyLR`` (``projects/deeplab/lr_scheduler.py``: linear warm-up,
    constant ending 0) as a unitless multiplier of the base lr at optimisation step ``step``:
    ``w(step) * max(0, 1 - step / max_steps) ** power`` with ``w = warmup_factor * (1 - a) + a``,
    ``a = step / warmup_steps`` during the warm-up and 1 after it (0 at and after ``max_steps``).
    The proposal model's solver (ZegFormer / MaskFormer released) and DeOP's (``WARMUP_ITERS 0``,
    power 0.9) both use it."""
    warm = 1.0
    if step < warmup_steps:
        a = step / warmup_steps
        warm = warmup_factor * (1.0 - a) + a
    return warm * max(0.0, 1.0 - step / max_steps) ** power


__all__ = ["poly_lr_factor"]
