"""Mixed precision: which compute type ``TrainSection.precision`` means on a device."""

from __future__ import annotations

from typing import Any

from pipeline.errors import ConfigError

#: Resolved precisions and their autocast dtype names (None: no autocast).
AUTOCAST_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def resolve_precision(precision: str, device: Any) -> str:
    """The precision a worker uses: ``fp32``, ``bf16`` or ``fp16``.

    Args:
        precision: ``TrainSection.precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``).
        device: the worker's ``torch.device``.

    ``auto``: on CUDA ``bf16`` where the GPU supports it (compute capability 8.0+), else ``fp16``
    (with a gradient scaler); ``fp32`` on any other device. Explicit ``bf16``/``fp16`` are kept
    on a CPU too (torch 2.13 autocasts both on CPU; fp16 there is slow and meant for tests).

    Raises:
        ConfigError: ``bf16`` on a GPU without bfloat16 support, or an unknown value.
    """
    import torch

    if precision not in ("auto", *AUTOCAST_DTYPES):
        raise ConfigError(f"train.precision must be auto, fp32, bf16 or fp16; got {precision!r}")
    cuda = getattr(device, "type", str(device)) == "cuda"
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if _native_bf16() else "fp16"
    if precision == "bf16" and cuda and not _native_bf16():
        try:
            gpu = torch.cuda.get_device_name(device)
        except Exception:  # noqa: BLE001 - only for the message
            gpu = "this GPU"
        raise ConfigError(f"train.precision: bf16 is not supported by {gpu}; use fp16 (or auto)")
    return precision


def _native_bf16() -> bool:
    """bfloat16 in hardware (Ampere and later): torch's default check also accepts emulation,
    which is slow (e.g. on T4 / V100, where fp16 with a scaler is the right choice)."""
    import torch

    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def autocast_dtype(resolved: str) -> Any:
    """The ``torch.dtype`` autocast uses for a resolved precision, or None for ``fp32``."""
    import torch

    name = AUTOCAST_DTYPES[resolved]
    return None if name is None else getattr(torch, name)
