"""The shuffled row loader: exactly-once epochs, determinism, trainable and layer selection, resumable cursor."""

from __future__ import annotations

from itertools import islice

import numpy as np
import pytest

from mlsae_cache.errors import InputError
from mlsae_cache.importer import ImportConfig, import_array
from mlsae_cache.store import Cache
from mlsae_train.loader import LoaderConfig, RowLoader

N_TOKENS, N_LAYERS, D = 1000, 4, 8


@pytest.fixture(scope="module")
def id_cache(tmp_path_factory: pytest.TempPathFactory) -> Cache:
    """Rows that name themselves: x[t, l] = (t, l, noise...); tokens t % 7 == 0 made untrainable."""
    root = tmp_path_factory.mktemp("ids")
    x = np.random.default_rng(0).normal(size=(N_TOKENS, N_LAYERS, D)).astype(np.float32)
    x[:, :, 0] = np.arange(N_TOKENS)[:, None]
    x[:, :, 1] = np.arange(N_LAYERS)[None, :]
    np.save(root / "x.npy", x)
    import_array(ImportConfig(out=root / "c", activations=root / "x.npy", chunk_tokens=64, context_length=100))
    import zarr

    trainable = zarr.open_group(str(root / "c"), mode="r+")["trainable"]
    mask = np.arange(N_TOKENS) % 7 != 0
    trainable[:] = mask
    return Cache(root / "c")


def ids(batch_x: np.ndarray) -> list[tuple[int, int]]:
    return [(int(t), int(layer)) for t, layer in batch_x[:, :2]]


def take(loader: RowLoader, n_batches: int, start: int = 0) -> list:
    return list(islice(loader.batches(start), n_batches))


@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (1, 3)], ids=["all", "subset"])
def test_an_epoch_visits_every_trainable_row_once(id_cache: Cache, layers: tuple[int, ...]) -> None:
    loader = RowLoader(id_cache, layers, LoaderConfig(batch_rows=50, block_units=3, seed=1))
    want = {(t, layer) for t in range(N_TOKENS) if t % 7 for layer in layers}
    assert loader.rows_per_epoch == len(want)
    n_batches = len(want) // 50
    seen = [r for b, _ in take(loader, n_batches) for r in ids(b.x.numpy())]
    assert len(seen) == len(set(seen)) == n_batches * 50
    assert set(seen) <= want and len(want - set(seen)) < 50
    batch, _ = take(loader, 1)[0]
    np.testing.assert_array_equal(batch.layer.numpy(), [layers.index(layer) for _, layer in ids(batch.x.numpy())])
    np.testing.assert_array_equal(batch.token.numpy(), [t for t, _ in ids(batch.x.numpy())])


def test_the_order_follows_the_seed(id_cache: Cache) -> None:
    a = [ids(b.x.numpy()) for b, _ in take(RowLoader(id_cache, (0, 1), LoaderConfig(batch_rows=64, seed=3)), 5)]
    b = [ids(b.x.numpy()) for b, _ in take(RowLoader(id_cache, (0, 1), LoaderConfig(batch_rows=64, seed=3)), 5)]
    c = [ids(b.x.numpy()) for b, _ in take(RowLoader(id_cache, (0, 1), LoaderConfig(batch_rows=64, seed=4)), 5)]
    assert a == b and a != c


def test_rows_are_mixed_across_layers_and_sequences(id_cache: Cache) -> None:
    loader = RowLoader(id_cache, (0, 1, 2, 3), LoaderConfig(batch_rows=200, block_units=8, seed=0))
    for batch, _ in take(loader, 10):
        rows = ids(batch.x.numpy())
        assert len({layer for _, layer in rows}) == 4  # stratified: every block holds every layer
        assert len({t // 100 for t, _ in rows}) >= 4  # context windows of 100 tokens


@pytest.mark.parametrize("stop", [1, 7, 30], ids=["first-batch", "mid-epoch", "next-epoch"])
def test_the_cursor_resumes_the_same_stream(id_cache: Cache, stop: int) -> None:
    cfg = LoaderConfig(batch_rows=90, block_units=5, seed=2)
    full = [b.x.numpy() for b, _ in take(RowLoader(id_cache, (0, 2, 3), cfg), stop + 5)]
    cursor = take(RowLoader(id_cache, (0, 2, 3), cfg), stop)[-1][1]
    assert cursor == stop * 90
    resumed = [b.x.numpy() for b, _ in take(RowLoader(id_cache, (0, 2, 3), cfg), 5, start=cursor)]
    for a, b in zip(full[stop:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_layers_not_in_the_cache_are_refused(id_cache: Cache) -> None:
    with pytest.raises(InputError, match=r"blocks \[9\] are not in the cache"):
        RowLoader(id_cache, (0, 9), LoaderConfig())


def test_stop_token_holds_out_the_rest(id_cache: Cache) -> None:
    loader = RowLoader(id_cache, (0, 1), LoaderConfig(batch_rows=50, seed=0), stop_token=500)
    assert loader.rows_per_epoch == 2 * sum(1 for t in range(500) if t % 7)
    seen = [t for b, _ in take(loader, loader.rows_per_epoch // 50) for t, _ in ids(b.x.numpy())]
    assert max(seen) < 500
    with pytest.raises(InputError, match="--train-tokens"):
        RowLoader(id_cache, (0,), LoaderConfig(), stop_token=N_TOKENS + 1)
