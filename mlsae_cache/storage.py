"""Storage dtypes of cached activations, and every conversion to and from them (one place for all of it).

`float16` and `float32` are stored as themselves; `bfloat16`, which Zarr has no dtype for, is stored as its uint16
bit patterns and viewed back. A value beyond the storage dtype's range is refused (never a silent inf).
"""

from __future__ import annotations

import numpy as np
import torch

from mlsae_cache.core.errors import InputError, RuntimeFailure

STORAGE_DTYPES: dict[str, type[np.generic]] = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}
"""Storage dtype name -> the numpy dtype of the stored array."""

STORAGE_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
"""Storage dtype name -> the torch dtype of the values it holds."""

STORAGE_LIMITS = {
    "float16": float(np.finfo(np.float16).max),
    "bfloat16": float(torch.finfo(torch.bfloat16).max),
    "float32": float(np.finfo(np.float32).max),
}


def to_float32(stored: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Stored activations as float32 (bfloat16 bit patterns are widened exactly)."""
    if storage_dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


def stored_to_torch(stored: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Stored activations as a torch tensor of their real dtype (bfloat16 bit patterns are viewed, not copied)."""
    tensor = torch.from_numpy(stored)
    return tensor.view(torch.bfloat16) if storage_dtype == "bfloat16" else tensor


def to_storage(acts: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """Activations as the stored numpy array (cast first if needed; bfloat16 as its uint16 bit patterns)."""
    acts = acts.to(STORAGE_TORCH[storage_dtype]).cpu()
    if storage_dtype == "bfloat16":
        return acts.view(torch.int16).numpy().view(np.uint16)
    return acts.numpy()


def check_range(peaks: torch.Tensor, storage_dtype: str, layers: tuple[int, ...]) -> None:
    """Refuse values the storage dtype cannot hold (never a silent inf). shape: peaks [n_layers], max |x| per layer."""
    peaks = peaks.float().cpu()
    if not torch.isfinite(peaks).all():
        bad = [layers[i] for i in torch.nonzero(~torch.isfinite(peaks)).flatten().tolist()]
        raise RuntimeFailure(f"the model produced non-finite activations at blocks {bad} (try --compute-dtype float32)")
    limit = STORAGE_LIMITS[storage_dtype]
    over = torch.nonzero(peaks > limit).flatten().tolist()
    if over:
        raise InputError(
            f"activations at blocks {[layers[i] for i in over]} reach {peaks.max().item():.4g}, beyond the "
            f"{storage_dtype} range {limit:.4g} (use --dtype float32 or --dtype bfloat16)"
        )
