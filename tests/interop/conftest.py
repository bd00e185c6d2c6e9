"""Fixtures of the interop tests: a small cache of random rows with token ids, and SAEs saved in our format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mlsae_cache.importer import ImportConfig, import_array
from mlsae_cache.store import Cache
from mlsae_train.checkpoint import save_sae
from mlsae_train.sae import SaeConfig, TopKSAE

D, N, K, CONTEXT = 16, 64, 4, 50


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 tokens (40 windows of 50) x 3 layers x 16 of Gaussian rows with a mean and layer scales; token ids."""
    root = tmp_path_factory.mktemp("interop-cache")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 3, D)) * np.array([1.0, 3.0, 10.0])[None, :, None] + 0.5
    np.save(root / "x.npy", x.astype(np.float32))
    np.save(root / "ids.npy", rng.integers(0, 300, size=2000).astype(np.int32))
    out = root / "cache"
    import_array(ImportConfig(out, root / "x.npy", root / "ids.npy", context_length=CONTEXT, chunk_tokens=256))
    return out


def random_sae(standardize: bool, seed: int = 0) -> TopKSAE:
    """A TopK SAE with unit-norm decoder rows and nonzero biases, as a trained one has."""
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(SaeConfig(D, N, K, standardize), generator=gen)
    with torch.no_grad():
        sae.encoder.bias.copy_(0.3 * torch.randn(N, generator=gen))
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=gen))
    return sae


def saved_sae(path: Path, cache: Path, standardize: bool) -> Path:
    """A random SAE saved as if trained on every layer of `cache`."""
    meta = Cache(cache).meta
    record = {"layers": [0, 1, 2], "cache_fingerprint": meta.fingerprint, "cache_path": str(cache), "model": "tiny"}
    return save_sae(random_sae(standardize), path, record)


def dense(values: torch.Tensor, indices: torch.Tensor, n: int = N) -> np.ndarray:
    """[B, n] latents from top-k values and indices."""
    out = torch.zeros(values.shape[0], n, dtype=values.dtype)
    out.scatter_(1, indices.long(), values)
    return out.numpy()
