from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mlsae_cache.importer import ImportConfig, import_array


def import_npy(root: Path, x: np.ndarray, name: str = "cache", chunk_tokens: int = 256) -> Path:
    np.save(root / f"{name}.npy", x)
    import_array(ImportConfig(out=root / name, activations=root / f"{name}.npy", chunk_tokens=chunk_tokens))
    return root / name


@pytest.fixture(scope="module")
def random_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2,000 tokens x 3 layers x 16 of Gaussian rows with layer scales 1, 3, 10."""
    x = np.random.default_rng(0).normal(size=(2000, 3, 16)) * np.array([1.0, 3.0, 10.0])[None, :, None]
    return import_npy(tmp_path_factory.mktemp("random"), x.astype(np.float32))
