"""The latents store's format versions: version 2 (sharded chunks) and version 1 (one block per chunk) written from
the same rows read the same through `Latents`, whole, by chunk, by scattered rows and as dask arrays; a
corrupted inner chunk of version 2 is found by `verify`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mlsae_analyze import latents as latents_format
from mlsae_analyze.latents import Latents
from mlsae_cache.core.errors import CorruptError
from tests.explorer.stores import N_TOKENS, Stores, write_latents


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory, stores: Stores) -> tuple[Latents, Latents]:
    """The planted store (version 2) and a version 1 copy of the same rows."""
    v2 = Latents(stores.latents)
    meta = replace(v2.meta, version=1, n_tokens=0, complete=False)
    v1 = write_latents(tmp_path_factory.mktemp("v1") / "latents", stores.planted, meta)
    return v2, v1


def test_the_versions_are_laid_out_as_documented(both: tuple[Latents, Latents]) -> None:
    v2, v1 = both
    assert (v2.meta.version, v1.meta.version) == (latents_format.VERSION, 1) == (2, 1)
    assert v2.read_tokens == latents_format.INNER_TOKENS < v2.chunk_tokens
    assert v1.read_tokens == v1.chunk_tokens


def test_both_versions_read_the_same(both: tuple[Latents, Latents]) -> None:
    v2, v1 = both
    for a, b in zip(v2.chunks(), v1.chunks(), strict=True):
        assert a.start == b.start
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.values, b.values)
        for x, y in zip(a.tokens, b.tokens, strict=True):
            np.testing.assert_array_equal(x, y)
    for name in ("indices", "values", "trainable", "sequence"):
        x, y = getattr(v2.arrays(), name), getattr(v1.arrays(), name)
        assert (
            x.chunks[0]
            == y.chunks[0]
            == tuple(min(v2.chunk_tokens, N_TOKENS - s) for s in range(0, N_TOKENS, v2.chunk_tokens))
        )
        np.testing.assert_array_equal(x.compute(), y.compute())


def test_take_equals_slices(both: tuple[Latents, Latents]) -> None:
    rows = np.unique(np.random.default_rng(0).integers(0, N_TOKENS, 50))
    for store in both:
        indices, values, tokens = store.take(rows)
        whole = store.chunk(0, N_TOKENS)
        np.testing.assert_array_equal(indices, whole.indices[rows])
        np.testing.assert_array_equal(values, whole.values[rows])
        for x, y in zip(tokens, whole.tokens, strict=True):
            np.testing.assert_array_equal(x, y[rows])
        with pytest.raises(IndexError):
            store.take(np.array([N_TOKENS]))


def test_verify_finds_a_corrupted_inner_chunk(tmp_path: Path, both: tuple[Latents, Latents]) -> None:
    import shutil

    v2, _ = both
    copy = tmp_path / "latents"
    shutil.copytree(v2.path, copy)
    assert Latents(copy).verify() > 0
    shard = copy / "values" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the first inner chunk's bytes, before the shard's index
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptError, match="values"):
        Latents(copy).verify()
