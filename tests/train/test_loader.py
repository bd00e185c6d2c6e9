"""The shuffled row loader: exactly-once epochs, determinism, trainable and layer selection, resumable cursor."""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch

from mlsae_cache.core.errors import InputError
from mlsae_cache.importer import ImportConfig, import_array
from mlsae_cache.store import Cache
from mlsae_train.loader import LoaderConfig, RowLoader, _Buffers

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


def rank_batches(
    cache: Cache, layers: tuple[int, ...], cfg: LoaderConfig, world_size: int, n: int, start: int = 0
) -> list[list]:
    """n batches of each rank of `world_size`, from cursor `start`: [rank][batch] -> (Batch, cursor)."""
    ranks = [RowLoader(cache, layers, replace(cfg, rank=r, world_size=world_size)) for r in range(world_size)]
    return [take(loader, n, start) for loader in ranks]


@pytest.mark.parametrize(
    ("layers", "world_size", "batch_rows", "block_units", "start"),
    [
        ((0, 1, 2, 3), 2, 50, 3, 0),
        ((1, 3), 3, 90, 5, 270),
        ((0, 2), 2, 64, 1, 1664),  # blocks of one unit, cursor past the first epoch (1714 rows)
        ((0, 1, 2, 3), 4, 400, 2, 20),  # batches longer than blocks; cursor inside the first batch's grid
    ],
    ids=["2-ranks", "3-ranks-resumed", "next-epoch", "4-ranks-long-batches"],
)
def test_rank_slices_laid_end_to_end_are_the_single_process_batch(
    id_cache: Cache, layers: tuple[int, ...], world_size: int, batch_rows: int, block_units: int, start: int
) -> None:
    cfg = LoaderConfig(batch_rows=batch_rows, block_units=block_units, seed=5)
    single = take(RowLoader(id_cache, layers, cfg), 12, start)
    ranks = rank_batches(id_cache, layers, cfg, world_size, 12, start)
    for b, (whole, cursor) in enumerate(single):
        parts = [ranks[r][b][0] for r in range(world_size)]
        assert all(ranks[r][b][1] == cursor for r in range(world_size))  # the global cursor on every rank
        assert all(len(p.x) == batch_rows // world_size for p in parts)
        for field in ("x", "layer", "token"):
            laid = np.concatenate([getattr(p, field).numpy() for p in parts])
            np.testing.assert_array_equal(laid, getattr(whole, field))
        rows = [set(ids(p.x.numpy())) for p in parts]
        assert sum(map(len, rows)) == len(set().union(*rows)) == batch_rows  # disjoint


def test_each_rank_reads_only_the_units_its_slices_touch(id_cache: Cache, monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch of 24 batches (tokens < 700 of 1,000: units past them have no trainable row and are never read):
    the ranks between them read every unit that the single process reads, and each rank fewer. (Not half: the rows
    that a batch takes from the end of a block are spread over all its units, and one rank takes them all.)"""
    cfg = LoaderConfig(batch_rows=100, block_units=8, seed=0, prefetch_blocks=0)
    reads: list[tuple[int, int]] = []
    stored_chunk = Cache.stored_chunk

    def counting(self: Cache, chunk: int, layer: int) -> np.ndarray:
        reads.append((chunk, layer))
        return stored_chunk(self, chunk, layer)

    monkeypatch.setattr(Cache, "stored_chunk", counting)

    def units_read(loader: RowLoader) -> set[tuple[int, int]]:
        reads.clear()
        batches = loader.batches()
        assert len(list(islice(batches, loader.rows_per_epoch // 100))) == 24
        batches.close()  # waits for reads in flight
        assert len(reads) == len(set(reads))  # no unit read twice
        return set(reads)

    single = units_read(RowLoader(id_cache, (0, 1, 2, 3), cfg, stop_token=700))
    per_rank = [
        units_read(RowLoader(id_cache, (0, 1, 2, 3), replace(cfg, rank=r, world_size=2), stop_token=700))
        for r in range(2)
    ]
    assert single == {(c, layer) for c in range(11) for layer in range(4)}  # chunks of 64 tokens holding t < 700
    assert per_rank[0] | per_rank[1] == single
    assert all(len(units) < len(single) for units in per_rank), [len(u) for u in per_rank]


@pytest.mark.parametrize(
    ("batch_rows", "world_size", "fix"),
    [(129, 2, "--batch-rows 128 or 130"), (1, 2, "--batch-rows 2"), (100, 3, "--batch-rows 99 or 102")],
)
def test_a_batch_not_divisible_by_the_ranks_is_refused(batch_rows: int, world_size: int, fix: str) -> None:
    with pytest.raises(InputError, match=f"--batch-rows {batch_rows} is not divisible by the {world_size} processes"):
        LoaderConfig(batch_rows=batch_rows, world_size=world_size)
    with pytest.raises(InputError) as info:
        LoaderConfig(batch_rows=batch_rows, world_size=world_size)
    assert fix in str(info.value)


def test_a_block_buffer_is_reused_only_once_its_leases_are_released() -> None:
    """A buffer comes back only when every holder (the block, each batch cut from it) has let it go."""
    buffers = _Buffers(rows=10, d_model=3, dtype=np.dtype(np.float16), keep=3)
    first, lease = buffers.take(10)
    part = lease.acquire()  # a batch cut from the block, still held
    lease.release()  # the block is done with it
    second, _ = buffers.take(8)
    assert not np.shares_memory(first, second)
    part.release()
    again, _ = buffers.take(7)
    assert again.shape == (7, 3) and np.shares_memory(again, first)
    fresh = _Buffers(rows=10, d_model=3, dtype=np.dtype(np.float16), reuse=False)
    one, held = fresh.take(10)
    held.release()
    assert not np.shares_memory(one, fresh.take(10)[0])


def _stream(cache: Cache, n: int, release: bool, **cfg: object) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """n batches of a small-block loader, each copied (and released at once when `release`)."""
    config = LoaderConfig(batch_rows=40, block_units=2, seed=5, **cfg)  # type: ignore[arg-type]
    out = []
    for batch, cursor in islice(RowLoader(cache, (0, 1, 2, 3), config).batches(), n):
        out.append((batch.x.clone(), batch.token.clone(), cursor))
        if release:
            batch.release()
            batch.release()  # twice is harmless
    return out


@pytest.mark.parametrize("release", [True, False], ids=["released", "collected"])
def test_buffer_reuse_does_not_change_the_batches(id_cache: Cache, release: bool) -> None:
    """Reused buffers (released by the consumer, or when a batch is garbage-collected) and fresh ones give the
    same stream, over about 30 blocks."""
    reused, fresh = _stream(id_cache, 150, release), _stream(id_cache, 150, release, reuse_buffers=False)
    for (x, token, cursor), (x2, token2, cursor2) in zip(reused, fresh, strict=True):
        assert torch.equal(x, x2) and torch.equal(token, token2) and cursor == cursor2


def test_held_batches_stay_intact_while_the_loader_runs_on(id_cache: Cache) -> None:
    """Batches kept by the consumer are never written over by later blocks (tiny blocks: buffers turn over fast)."""
    stream = RowLoader(id_cache, (0, 1, 2, 3), LoaderConfig(batch_rows=40, block_units=2, seed=5)).batches()
    held = [next(stream)[0] for _ in range(6)]
    copies = [b.x.clone() for b in held]
    for _ in range(150):  # about 30 blocks, each batch dropped at once
        next(stream)
    for batch, copy in zip(held, copies, strict=True):
        assert torch.equal(batch.x, copy)
