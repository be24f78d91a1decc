"""The inference stages' device, resolved one way: ``auto`` -> cuda / cpu from the Ray cluster's
GPUs on the driver (:func:`resolve_device`), and the CUDA check in each actor
(:func:`actor_device`). The setting itself is ``stages.common.Device`` (validated torch-free).
"""

from __future__ import annotations

import ray
import torch

from zeroseg.errors import ConfigError


def resolve_device(device: str, key: str, num_gpus: float | None = None, gpus_key: str = "") -> tuple[str, float]:
    """``(torch device string, GPUs per actor)`` of a device setting on this Ray cluster.

    Args:
        device: the setting (``auto``: cuda when the cluster has GPUs, else cpu; ``cpu``, ``cuda``,
            ``cuda:N``).
        key: its config key, for messages (``evaluate.device``).
        num_gpus: GPUs per actor when the config sets them (default: 1 on cuda, 0 on cpu);
            ``gpus_key`` its config key.

    Raises:
        ConfigError: GPUs asked for on a cluster without any (the actors would never start), or a
            cuda device with 0 GPUs per actor (Ray would hide the GPUs from them).
    """
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    dev = device if device != "auto" else ("cuda" if cluster_gpus > 0 else "cpu")
    gpus = num_gpus if num_gpus is not None else (1.0 if dev.startswith("cuda") else 0.0)
    if gpus > 0 and cluster_gpus == 0:
        raise ConfigError(
            f"{key} is {device!r}: it asks for {gpus:g} GPU(s) per worker but the Ray cluster has no GPUs; "
            f"set {key}: cpu"
        )
    if dev.startswith("cuda") and gpus == 0:
        raise ConfigError(
            f"{key} is cuda but {gpus_key or 'the GPUs per worker'} is 0: Ray would hide the GPUs from the "
            "workers; set it > 0"
        )
    return dev, float(gpus)


def actor_device(device: str, key: str) -> tuple[torch.device, str]:
    """``(torch.device, its name for the timing record)`` of a resolved device string in an
    actor (the name: the GPU's, or ``cpu``).

    Raises:
        ConfigError: a CUDA device on a worker without one.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"{key} {device!r}: this worker has no CUDA device (set {key}: cpu, or give the workers GPUs)"
        )
    dev = torch.device(device)
    return dev, (torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")


__all__ = ["actor_device", "resolve_device"]
