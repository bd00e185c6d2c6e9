"""import_array: a .npy file and an array-like that makes its rows on demand give the same cache; the stored values
are the given ones in every input dtype; values the storage dtype cannot hold are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mlsae_cache.core.errors import InputError
from mlsae_cache.importer import ImportConfig, import_array
from mlsae_cache.store import Cache
from tests.helpers import assert_statistics_close

SHAPE = (700, 3, 8)  # not a multiple of the chunk: the last chunk is partial


class OnDemand:
    """Rows [start, stop) of `x`, each slice a fresh copy, counting the tokens read (never the whole array at once)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.shape, self.dtype, self.largest = x, x.shape, x.dtype, 0

    def __getitem__(self, key: slice) -> np.ndarray:
        rows = self.x[key].copy()
        self.largest = max(self.largest, rows.shape[0])
        return rows


def _reference_fingerprint(x: np.ndarray, chunk_tokens: int) -> str:
    """sha256 of (shape, dtype), then every chunk's token-major bytes in order; its first 16 hex digits."""
    h = hashlib.sha256(str((x.shape, x.dtype.str)).encode())
    for start in range(0, x.shape[0], chunk_tokens):
        h.update(x[start : start + chunk_tokens].tobytes())
    return h.hexdigest()[:16]


def _stored(path: Path) -> np.ndarray:
    cache = Cache(path)
    return np.asarray(cache.to_xarray()["activations"].values)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int16"])
def test_array_like_equals_npy(tmp_path: Path, dtype: str) -> None:
    x = (np.random.default_rng(0).normal(size=SHAPE) * 50).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    from_file = import_array(ImportConfig(tmp_path / "a", tmp_path / "x.npy", chunk_tokens=256, dtype="float32"))
    given = OnDemand(x)
    cfg = ImportConfig(tmp_path / "b", tmp_path / "x.npy", chunk_tokens=256, dtype="float32")
    from_array = import_array(cfg, activations=given)
    assert given.largest == 256
    assert from_array.fingerprint == from_file.fingerprint == _reference_fingerprint(x, 256)
    np.testing.assert_array_equal(_stored(tmp_path / "a"), _stored(tmp_path / "b"))
    np.testing.assert_array_equal(_stored(tmp_path / "b"), x.astype(np.float32))
    b = Cache(tmp_path / "b")
    assert_statistics_close(b.layer_mean(), b.layer_sq_norm(), x.astype(np.float32))


def test_float16_is_stored_as_given(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=SHAPE).astype(np.float16)
    x[0, 0, 0] = np.finfo(np.float16).max
    import_array(ImportConfig(tmp_path / "c", tmp_path / "x.npy", chunk_tokens=256), activations=OnDemand(x))
    stored = _stored(tmp_path / "c")
    assert stored.dtype == np.float16
    np.testing.assert_array_equal(stored, x)


@pytest.mark.parametrize(
    ("bad", "message"), [(np.inf, "NaN or infinite"), (np.nan, "NaN or infinite"), (1e6, "beyond the float16")]
)
def test_refused_values(tmp_path: Path, bad: float, message: str) -> None:
    x = np.zeros(SHAPE, np.float32)
    x[600, 2, 3] = bad
    cfg = ImportConfig(tmp_path / "d", tmp_path / "x.npy", chunk_tokens=256, dtype="float16")
    with pytest.raises(InputError, match=message):
        import_array(cfg, activations=OnDemand(x))
    assert not (tmp_path / "d").exists()
