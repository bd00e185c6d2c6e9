"""Device choice for every command: `auto` (CUDA when available, else the CPU), `cpu`, `cuda` or `cuda:N`."""

from __future__ import annotations

import re

import torch

from mlsae_cache.core.errors import InputError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def resolve_device(device: str) -> torch.device:
    """The torch device for a --device value; InputError naming the choices for anything else."""
    if not _DEVICE.match(device):
        raise InputError(f"--device {device!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for but CUDA is not available (use --device cpu)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps was asked for but MPS is not available (use --device cpu)")
    return torch.device(device)
