"""The store's fast paths against zarr's own writes: the same bytes on disk."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr

import mlsae_cache.cachestats as cachestats
import mlsae_cache.rawchunks as rawchunks
import mlsae_cache.store as store
from mlsae_cache.core.errors import CorruptError
from mlsae_cache.core.zarrstore import StoreTransaction
from mlsae_cache.storage import STORAGE_DTYPES, to_float32
from mlsae_cache.store import Cache, CacheMeta, CacheWriter, Rows, TokenRows, create_store, verify
from tests.cache.test_resume import assert_same_store
from tests.helpers import assert_statistics_close, per_thread_count


def rows(n: int, n_layers: int, d: int, dtype: str, seed: int) -> Rows:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n_layers, n, d)) * 5).astype(np.float32)
    x[1] = 0.0  # an all-zero chunk, which zarr skips unless told to store it
    raw = (x.view(np.uint32) >> 16).astype(np.uint16) if dtype == "bfloat16" else x.astype(STORAGE_DTYPES[dtype])
    trainable = rng.random(n) > 0.2
    tokens = TokenRows(
        rng.integers(0, 99, n).astype(np.int32), np.arange(n) // 8, np.arange(n, dtype=np.int32) % 8, trainable
    )
    return Rows(raw, tokens)


def write(path: Path, dtype: str) -> None:
    meta = CacheMeta(
        d_model=24, layers=(0, 1, 2), model={}, dataset={}, context_length=8, storage_dtype=dtype, fingerprint="f",
        chunk_tokens=64,
    )  # fmt: skip
    create_store(path, meta)
    writer = CacheWriter(path)
    for i, n in enumerate((64, 64, 40)):  # two full chunks and a partial last one
        writer.commit(64 * i, rows(n, 3, 24, dtype, i))


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_raw_chunk_writes_equal_zarr_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    write(tmp_path / "fast", dtype)
    with monkeypatch.context() as m:
        m.setattr(store, "write_raw_chunks", lambda arr, chunk, layer_major, direct=True: False)
        write(tmp_path / "zarr", dtype)
    assert_same_store(tmp_path / "fast", tmp_path / "zarr")
    assert (tmp_path / "fast" / "activations" / "c" / "0" / "1" / "0").exists()  # the all-zero layer
    assert verify(tmp_path / "fast") > 0
    want = np.concatenate(
        [to_float32(rows(n, 3, 24, dtype, i).token_major(), dtype) for i, n in enumerate((64, 64, 40))]
    )
    np.testing.assert_array_equal(Cache(tmp_path / "fast").activations(0, 168), want)


def test_direct_chunk_writes_equal_zarr_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aligned slabs of a whole number of 4 KiB blocks (64 tokens x 32 float16) take the O_DIRECT path where the
    file system has it, and give the bytes zarr writes; elsewhere the buffered path does."""
    meta = CacheMeta(
        d_model=32, layers=(0, 1), model={}, dataset={}, context_length=8, storage_dtype="float16", fingerprint="f",
        chunk_tokens=64,
    )  # fmt: skip
    direct = []
    write_direct = rawchunks._write_direct

    def spy(path: Path, data: np.ndarray, checksum: bytes) -> bool:
        direct.append(write_direct(path, data, checksum))
        return direct[-1]

    monkeypatch.setattr(rawchunks, "_write_direct", spy)
    for name, raw in (("fast", True), ("zarr", False)):
        create_store(tmp_path / name, meta)
        writer = CacheWriter(tmp_path / name)
        for i in range(2):
            r = rows(64, 2, 32, "float16", i)
            aligned = rawchunks.aligned_empty(r.activations.shape, np.float16)
            aligned[:] = r.activations
            if not raw:
                monkeypatch.setattr(store, "write_raw_chunks", lambda arr, chunk, layer_major, direct=True: False)
            writer.commit(64 * i, replace(r, activations=aligned))
    assert len(direct) == 4 and len(set(direct)) == 1  # every chunk file alike
    probe = tmp_path / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
        supported = True
    except OSError:
        supported = False
    assert direct[0] == supported
    assert_same_store(tmp_path / "fast", tmp_path / "zarr")
    assert verify(tmp_path / "fast") > 0


@pytest.mark.parametrize("n", [64, cachestats.PARTIAL_ROWS * 2 + 44])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_partials_equal_a_float64_reference(n: int, dtype: str) -> None:
    """Sums over several blocks of PARTIAL_ROWS rows, and a last block that is not full."""
    r = rows(n, 3, 24, dtype, 7)
    sums, sq, count = cachestats.chunk_partials(r.activations, r.tokens.trainable, dtype)
    x = to_float32(r.activations, dtype)[:, r.tokens.trainable].transpose(1, 0, 2)
    assert count == r.tokens.trainable.sum()
    assert_statistics_close(sums / count, sq / count, x)


def test_partials_do_not_depend_on_the_thread_count() -> None:
    """Shards and resumed runs may run with other thread counts than the run they continue: the same bits."""
    r = rows(4000, 3, 512, "float16", 3)  # over torch's grain, so that its intra-op threads do split the work
    got = per_thread_count(lambda: cachestats.chunk_partials(r.activations, r.tokens.trainable, "float16"))
    for other in got[1:]:
        np.testing.assert_array_equal(other[0], got[0][0])
        np.testing.assert_array_equal(other[1], got[0][1])


def test_verify_accepts_chunks_of_zeros(tmp_path: Path) -> None:
    """Chunks equal to the fill value (`layer` of block 0 alone, `sequence` of a first window, a chunk with no
    trainable token) are stored, so `verify` does not take them for missing ones."""
    meta = CacheMeta(
        d_model=4, layers=(0,), model={}, dataset={}, context_length=8, storage_dtype="float32", fingerprint="f",
        chunk_tokens=4,
    )  # fmt: skip
    create_store(tmp_path, meta)
    zeros = np.zeros(4, dtype=np.int32)
    CacheWriter(tmp_path).commit(
        0, Rows(np.ones((1, 4, 4), np.float32), TokenRows(zeros, zeros.astype(np.int64), zeros, np.zeros(4, bool)))
    )
    assert verify(tmp_path) == 11  # one chunk of each array


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_raw_chunk_reads_equal_zarr_reads(tmp_path: Path, dtype: str) -> None:
    write(tmp_path, dtype)  # bfloat16 chunks are compressed: they take zarr's path
    cache = Cache(tmp_path)
    arr = zarr.open_group(str(tmp_path), mode="r")["activations"]
    for chunk in range(cache.n_chunks):
        for layer in range(3):
            got = cache.stored_chunk(chunk, layer)
            np.testing.assert_array_equal(got, arr[64 * chunk : min(64 * chunk + 64, 168), layer])
            assert got.dtype == arr.dtype and got.shape == (64 if chunk < 2 else 40, 24)
    assert (store.read_raw_chunk(arr, (0, 0, 0)) is None) == (dtype == "bfloat16")


def test_raw_chunk_read_refuses_a_truncated_file_and_hands_out_read_only_rows(tmp_path: Path) -> None:
    """A mapped chunk is checked for its size before any access (a short file would otherwise fault), and its
    rows cannot be written through."""
    write(tmp_path, "float16")
    rows = Cache(tmp_path).stored_chunk(0, 1)
    assert not rows.flags.writeable
    chunk = tmp_path / "activations" / "c" / "1" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(CorruptError, match="activations/c/1/2/0 is corrupted"):
        Cache(tmp_path).stored_chunk(1, 2)


def test_raw_chunk_read_detects_a_flipped_byte(tmp_path: Path) -> None:
    write(tmp_path, "float16")
    chunk = tmp_path / "activations" / "c" / "1" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptError, match="activations/c/1/2/0 is corrupted"):
        Cache(tmp_path).stored_chunk(1, 2)


def test_a_writers_transaction_removes_the_partial_files_of_killed_writes(tmp_path: Path) -> None:
    """A kill during a chunk write leaves `<chunk>.<id>.partial` beside the chunk; the next writer deletes it, so
    a resumed store holds the same files as an uninterrupted one."""
    write(tmp_path, "float16")
    stray = tmp_path / "activations" / "c" / "1" / "0" / "0.0123abcd.partial"
    stray.write_bytes(b"cut short")
    before = sorted(p for p in tmp_path.rglob("*") if p != stray)
    with StoreTransaction(tmp_path):
        pass
    assert not stray.exists() and sorted(tmp_path.rglob("*")) == before


def test_buffered_writes_equal_direct_writes(tmp_path: Path) -> None:
    """The direct-I/O switch changes how chunk files are written, never their bytes."""
    meta = CacheMeta(
        d_model=32, layers=(0, 1), model={}, dataset={}, context_length=8, storage_dtype="float16", fingerprint="f",
        chunk_tokens=64,
    )  # fmt: skip
    for name, direct in (("direct", True), ("buffered", False)):
        create_store(tmp_path / name, meta)
        writer = CacheWriter(tmp_path / name, direct_io=direct)
        for i in range(2):
            r = rows(64, 2, 32, "float16", i)
            aligned = rawchunks.aligned_empty(r.activations.shape, np.float16)
            aligned[:] = r.activations
            writer.commit(64 * i, replace(r, activations=aligned))
    assert_same_store(tmp_path / "direct", tmp_path / "buffered")


def test_statistics_are_chunk_order_totals_however_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer keeps totals, not every chunk's partials: one run, a run resumed at each chunk (its last, partial
    chunk rewritten), and finish_statistics (shards; partials read PARTIAL_BLOCK chunks at a time) give the same
    bits as the partials summed in chunk order."""
    monkeypatch.setattr(cachestats, "PARTIAL_BLOCK", 2)
    meta = CacheMeta(
        d_model=24, layers=(0, 1, 2), model={}, dataset={}, context_length=8, storage_dtype="float32",
        fingerprint="f", chunk_tokens=64,
    )  # fmt: skip
    sizes = (64, 64, 30, 64, 64, 40)  # the third commit is a partial chunk that the fourth rewrites whole
    starts = (0, 64, 128, 128, 192, 256)
    written = [rows(n, 3, 24, "float32", i) for i, n in enumerate(sizes)]
    partials = [cachestats.chunk_partials(r.activations, r.tokens.trainable, "float32") for r in written]
    kept = [partials[i] for i in (0, 1, 3, 4, 5)]
    want = (sum((p[0] for p in kept), np.zeros((3, 24))), sum((p[1] for p in kept), np.zeros(3)))
    for name, reopen in (("one", False), ("resumed", True)):
        create_store(tmp_path / name, meta)
        writer = CacheWriter(tmp_path / name)
        for i, (start, n) in enumerate(zip(starts, sizes, strict=True)):
            writer = CacheWriter(tmp_path / name) if reopen else writer
            writer.commit(start, rows(n, 3, 24, "float32", i))
        cache = Cache(tmp_path / name)
        count = sum(p[2] for p in kept)
        np.testing.assert_array_equal(cache.layer_mean(), want[0] / count)
        np.testing.assert_array_equal(cache.layer_sq_norm(), want[1] / count)
    cachestats.finish_statistics(zarr.open_group(str(tmp_path / "one"), mode="r+"), 296, 64)
    np.testing.assert_array_equal(Cache(tmp_path / "one").layer_mean(), want[0] / count)


def test_arrays_grow_ahead_and_a_run_ends_trimmed(tmp_path: Path) -> None:
    """A writer grows its arrays to twice their length when a chunk does not fit, so they may hold more rows than
    are committed while it runs: readers and verify then see the committed rows only. `trim` sets every growing
    array to the committed rows (tokens along `token`, the chunks they fill along `token_chunk`)."""
    path = tmp_path / "c"
    meta = CacheMeta(
        d_model=24, layers=(0, 1, 2), model={}, dataset={}, context_length=8, storage_dtype="float16", fingerprint="f",
        chunk_tokens=64,
    )  # fmt: skip
    create_store(path, meta)
    writer = CacheWriter(path)
    for i, n in enumerate((64, 64, 40)):
        writer.commit(64 * i, rows(n, 3, 24, "float16", i))
    per_chunk = (cachestats.CHUNK_SUM, cachestats.CHUNK_SQ, cachestats.CHUNK_COUNT)
    group = zarr.open_group(str(path), mode="r")
    for name in store._GROWING:  # 64 -> 128 -> 256 rows, 1 -> 2 -> 4 chunks
        assert group[name].shape[0] == (4 if name in per_chunk else 256), name
    want = np.concatenate([rows(n, 3, 24, "float16", i).token_major() for i, n in enumerate((64, 64, 40))])
    np.testing.assert_array_equal(Cache(path).activations(0, 168), want.astype(np.float32))
    assert verify(path) > 0
    writer.trim()
    group = zarr.open_group(str(path), mode="r")
    for name in store._GROWING:
        assert group[name].shape[0] == (3 if name in per_chunk else 168), name
    np.testing.assert_array_equal(Cache(path).activations(0, 168), want.astype(np.float32))
