"""Shuffled (token, layer) rows from a cache, read chunk by chunk.

Random row gathers through Zarr decode a whole chunk per row (measured: a few thousand rows/s), so the loader
shuffles at two levels instead:
1. the units of an epoch, one stored chunk each (a token chunk at one layer), are put in a random order,
   stratified so that every run of n_layers units holds each layer once;
2. consecutive units are grouped into blocks of `block_units`, and the rows of a block (all trainable tokens of
   its units) are permuted together.
The epoch's row stream is the concatenation of the permuted blocks and batches are consecutive slices of it, so
an epoch visits every selected row exactly once, the whole order follows from (seed, epoch), and one number,
the count of rows handed out, is enough to resume the same stream. Background threads read the units of the next
blocks (each a mapping of its chunk file, checked against its crc32c) and gather each block's rows into one
reused buffer in the order they are handed out (each batch's rows sorted), two runs of batches side by side, while
the current block is consumed; a batch is then a slice of a gathered block.

Data parallelism (distributed.py): rank r of W takes the r-th of W equal contiguous slices of every global batch,
as the single-process loader lays the batch out, so the ranks' batches laid end to end in rank order are exactly
the single-process batch. A block's row order follows from the masks and the seed alone, so each rank plans a block
before reading it and reads only the units that its slices touch. A batch's rows are gathered in index order, so
rank r's slices mostly fall in the r-th part of a block's units; but the rows that the batch straddling two blocks
takes from the older one are spread over all its units and go to the first ranks. Measured with 32-unit blocks and
batches of 4,096 rows: each rank reads 64-85% of the units at W = 2, ~57% at W = 4, ~36% at W = 8.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mlsae_cache.core.errors import InputError
from mlsae_cache.storage import STORAGE_DTYPES, stored_to_torch
from mlsae_cache.store import Cache


class _Block(NamedTuple):
    """The units of one block as stored (never concatenated: rows are gathered straight from them; None for a
    unit this process does not need) and the order in which its trainable rows are handed out, as indices into
    the units laid end to end."""

    units: list[np.ndarray | None]
    slots: np.ndarray
    first_tokens: np.ndarray
    offsets: np.ndarray
    order: np.ndarray
    pieces: np.ndarray  # bounds in `order` of the parts of successive batches: [n_pieces + 1]

    def unit_of(self, idx: np.ndarray) -> np.ndarray:
        """Position in `units` of each row index."""
        return np.searchsorted(self.offsets, idx, side="right") - 1

    def gather(self, idx: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `idx` (not empty; fastest when runs of it are sorted) as (x [n, d_model] stored dtype, filled in
        place, layer slot [n], token [n])."""
        unit_of = self.unit_of(idx)
        local = idx - self.offsets[unit_of]
        assert self.units[unit_of[0]] is not None, "a row of a unit that was not read"
        bounds = np.flatnonzero(np.diff(unit_of)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(idx)], strict=True):
            np.take(self.units[unit_of[a]], local[a:b], axis=0, out=x[a:b], mode="clip")  # in range: unbuffered
        return x, self.slots[unit_of], self.first_tokens[unit_of] + local


class _GatheredBlock(NamedTuple):
    """A block being gathered: tasks that each return the parts of a run of its batches, and the block's own
    hold on its buffer."""

    tasks: list[Future]
    lease: _Lease


class _Lease:
    """Who still uses a block buffer: a count of holders (the block being gathered, each batch part cut from it).
    The buffer may be filled again once the count is back at 0."""

    def __init__(self) -> None:
        self._holders = 0
        self._lock = threading.Lock()

    def acquire(self) -> _Lease:
        with self._lock:
            self._holders += 1
        return self

    def release(self) -> None:
        with self._lock:
            assert self._holders > 0, "a block buffer released more often than it was acquired"
            self._holders -= 1

    @property
    def free(self) -> bool:
        return self._holders == 0


class _Rows(NamedTuple):
    """The rows of one batch that one block holds (for one rank of several: its share of them), gathered in the
    order they are handed out: x [n, d_model] stored dtype, layer slot [n], token [n]; `lease`: the hold this
    part has on its block's buffer (x is a view of it). Most batches are one of these as it is (one copy per row in
    all); the batch that straddles two blocks joins two."""

    x: np.ndarray
    layer: np.ndarray
    token: np.ndarray
    lease: _Lease


GATHER_TASKS = 2
"""Gather tasks per block, each for a run of its batches: two let both cores of a small machine gather at once
(README "Performance" has the loader's measurements)."""


class _Buffers:
    """Block buffers, reused once no lease on them is held, or always fresh (`reuse` off).

    Why by hand: a fresh buffer's pages are zeroed and mapped by the kernel as they are first written, and unmapped
    when it is freed; for the loader that cost as much CPU as gathering the rows into it. Reuse is safe because
    every view handed out holds a lease (`_Lease`): the block while it is gathered, each batch part until it is
    copied or, once it is a batch, until the batch is released or garbage-collected (`Batch.release`).
    """

    def __init__(self, rows: int, d_model: int, dtype: np.dtype, keep: int = 4, reuse: bool = True) -> None:
        """`rows`: the most rows any block takes (each buffer has room for them); `keep`: buffers kept for reuse
        (the loader holds three blocks at most: one handed out, one being gathered, and the last one's final
        rows); `reuse` False: a fresh buffer every time."""
        self.rows, self.d_model, self.dtype, self.keep, self.reuse = rows, d_model, dtype, keep, reuse
        self._pool: list[tuple[np.ndarray, _Lease]] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> tuple[np.ndarray, _Lease]:
        """A [n, d_model] buffer that no lease holds (its contents are arbitrary), and its lease, held once."""
        with self._lock:
            for buf, lease in self._pool if self.reuse else []:
                if lease.free and len(buf) >= n:
                    return buf[:n], lease.acquire()
            buf, lease = np.empty((max(n, self.rows), self.d_model), self.dtype), _Lease()
            if self.reuse:
                self._pool = [*self._pool, (buf, lease)][-self.keep :]
            return buf[:n], lease.acquire()


def _nothing() -> None:
    pass


class Batch(NamedTuple):
    """x: [batch_rows, d_model] in the cache's storage dtype (float16, bfloat16 or float32: the SAE casts it,
    on the device, which halves host work and transfers); layer: [batch_rows] int64, position of the row's
    layer in `layers`; token: [batch_rows] int64 cache row of each row (kept on the CPU: for bookkeeping).

    On the CPU, x may be a view of a reused block buffer: `release()` says the consumer is done with it (the
    trainer calls it after each step), and a batch that is never released holds the buffer until x is
    garbage-collected. Calling it more than once is harmless.
    """

    x: torch.Tensor
    layer: torch.Tensor
    token: torch.Tensor
    release: Callable[[], None] = _nothing


@dataclass(frozen=True)
class LoaderConfig:
    batch_rows: int = 4096
    block_units: int = 32
    seed: int = 0
    read_threads: int = 2  # a read maps the chunk's file and checks its crc32c (the GIL released): measured on the
    # demo cache, 2.0-2.2 M rows/s with 1 or 2 threads, 1.8-2.0 M with 8
    prefetch_blocks: int = 1
    rank: int = 0
    world_size: int = 1
    reuse_buffers: bool = True  # off: a fresh block buffer every block (the same batches; see _Buffers)

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise InputError(f"--batch-rows must be at least 1, got {self.batch_rows}")
        if self.block_units < 1 or self.read_threads < 1 or self.prefetch_blocks < 0:
            raise InputError("block_units and read_threads must be at least 1, prefetch_blocks at least 0")
        if not 0 <= self.rank < self.world_size:
            raise InputError(f"rank {self.rank} is not in 0..{self.world_size - 1} (world_size {self.world_size})")
        if self.batch_rows % self.world_size:
            w, low = self.world_size, self.batch_rows // self.world_size * self.world_size
            fix = f"{low} or {low + w}" if low else f"{w}"
            raise InputError(
                f"--batch-rows {self.batch_rows} is not divisible by the {w} processes of this run, which each take "
                f"an equal slice of every batch (pass --batch-rows {fix})"
            )

    @property
    def rows_per_rank(self) -> int:
        """Rows of each global batch that this rank takes."""
        return self.batch_rows // self.world_size


def rank_parts(order: np.ndarray, offset: int, batch_rows: int, rank: int, world_size: int) -> list[np.ndarray]:
    """The rows of a run of the row stream that rank `rank` of `world_size` takes, one array per batch that the run
    overlaps (empty ones left out), in the order it takes them.

    `order` holds consecutive rows of the stream, the first of them `offset` rows after the start of some batch
    (any multiple of batch_rows may be added). Each batch's part of the run is sorted, as the single-process loader
    gathers it, and the rank keeps positions [rank * m, (rank + 1) * m) of every batch, m = batch_rows / world_size.
    Shapes: order [R] -> arrays of at most m rows.
    """
    m, first = batch_rows // world_size, offset % batch_rows
    lo, hi = rank * m, (rank + 1) * m
    starts = [0, *range(batch_rows - first, len(order), batch_rows)] if first else range(0, len(order), batch_rows)
    bounds = [*starts, len(order)]
    kept = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        at = first if i == 0 else 0  # position of this part's first row in its batch
        part = np.sort(order[a:b])[max(lo - at, 0) : max(hi - at, 0)]
        if len(part):
            kept.append(part)
    return kept


class RowLoader:
    """Iterates Batches of shuffled rows of `layers` (block indices present in the cache) from `cursor` on."""

    def __init__(
        self,
        cache: Cache,
        layers: tuple[int, ...],
        cfg: LoaderConfig,
        device: torch.device | str = "cpu",
        stop_token: int | None = None,
    ) -> None:
        """`stop_token`: use only tokens [0, stop_token) of the cache (the rest stays held out)."""
        missing = [layer for layer in layers if layer not in cache.layers]
        if missing:
            raise InputError(
                f"--layers {','.join(map(str, layers))}: blocks {missing} are not in the cache "
                f"{cache.path} (it holds {list(cache.layers)})"
            )
        self.cache, self.cfg, self.layers = cache, cfg, tuple(layers)
        dtype = np.dtype(STORAGE_DTYPES[cache.meta.storage_dtype])
        self._buffers = _Buffers(cfg.block_units * cache.chunk_tokens, cache.d_model, dtype, reuse=cfg.reuse_buffers)
        self.device = torch.device(device)
        self._layer_pos = [cache.layers.index(layer) for layer in layers]
        trainable = cache.trainable().copy()
        if stop_token is not None:
            if not 0 < stop_token <= cache.n_tokens:
                raise InputError(f"--train-tokens {stop_token} must be in 1..{cache.n_tokens} (the cache's tokens)")
            trainable[stop_token:] = False
        ct = cache.chunk_tokens
        self._masks = [trainable[c * ct : (c + 1) * ct] for c in range(cache.n_chunks)]
        self._unit_rows = np.array([int(m.sum()) for m in self._masks], dtype=np.int64)
        self.rows_per_epoch = int(self._unit_rows.sum()) * len(layers)
        if self.rows_per_epoch == 0:
            raise InputError(f"cache {cache.path} has no trainable token (harvest more text)")

    @property
    def n_units(self) -> int:
        return len(self._masks) * len(self.layers)

    def _unit_order(self, epoch: int) -> np.ndarray:
        """Every unit (chunk * n_layers + layer slot) once, stratified by layer: round r takes, for each layer
        in a random order, the r-th chunk of that layer's own random chunk order. Any run of n_layers units then
        holds every layer once, from as many different token chunks, so each block mixes all layers."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        n_chunks, n_slots = len(self._masks), len(self.layers)
        chunk_of = np.stack([rng.permutation(n_chunks) for _ in range(n_slots)], axis=1)  # [round, slot]
        slot_order = np.argsort(rng.random((n_chunks, n_slots)), axis=1)
        return (np.take_along_axis(chunk_of, slot_order, axis=1) * n_slots + slot_order).reshape(-1)

    def _epoch_blocks(self, epoch: int) -> tuple[list[np.ndarray], list[int]]:
        """The units of each block in order (unit = chunk * n_layers + layer slot), and block start offsets."""
        order = self._unit_order(epoch)
        blocks = [order[i : i + self.cfg.block_units] for i in range(0, len(order), self.cfg.block_units)]
        sizes = [int(self._unit_rows[b // len(self.layers)].sum()) for b in blocks]
        return blocks, list(np.cumsum([0, *sizes])[:-1])

    def _read_unit(self, unit: int) -> np.ndarray:
        """Raw stored rows of one unit (no float conversion here: it is done on whole batches)."""
        chunk, slot = divmod(int(unit), len(self.layers))
        return self.cache.stored_chunk(chunk, self._layer_pos[slot])

    def _plan_block(self, units: np.ndarray, rng_key: list[int], skip: int, offset: int) -> _Block:
        """A block without its data: the order of its rows from the masks and the seed alone, less the first
        `skip` rows; for one rank of several, only the rows that it takes (`rank_rows`; the block's first kept
        row is `offset` rows into the batch grid)."""
        chunks, slots = np.divmod(np.asarray(units, dtype=np.int64), len(self.layers))
        masks = [self._masks[c] for c in chunks]
        kept = np.flatnonzero(np.concatenate(masks))
        order = kept[np.random.default_rng(rng_key).permutation(len(kept))][skip:]
        # each batch's rows sorted (a batch is a set, and in-order gathers run about twice as fast); for one rank
        # of several, only the rows that it takes
        parts = rank_parts(order, offset, self.cfg.batch_rows, self.cfg.rank, self.cfg.world_size)
        return _Block(
            units=[None] * len(masks),
            slots=slots,
            first_tokens=chunks * self.cache.chunk_tokens,
            offsets=np.cumsum([0] + [len(m) for m in masks[:-1]]).astype(np.int64),
            order=np.concatenate(parts) if parts else order[:0],
            pieces=np.cumsum([0] + [len(p) for p in parts]),
        )

    def _read_block(self, pool: ThreadPoolExecutor, units: np.ndarray, plan: _Block) -> _GatheredBlock:
        """Read, in the background, the units that the plan's rows touch (a unit without one is never read), and
        gather the rows of each batch in the order they are handed out, batches side by side, off the thread that
        hands them out. Every gather is queued after the reads it waits for, so none can hold up a read."""
        needed = np.unique(plan.unit_of(plan.order))
        reads = {int(i): pool.submit(self._read_unit, units[i]) for i in needed}

        # one reused buffer for the whole block (_Buffers), filled by GATHER_TASKS tasks side by side: measured
        # faster than a fresh buffer per batch, whose allocations and releases contend. The block's own hold on
        # it ends in `_rows`, once every part (each holding the buffer itself) has been cut.
        x, lease = self._buffers.take(len(plan.order))

        def gather(bounds: np.ndarray) -> list[_Rows]:
            block = plan._replace(units=[reads[i].result() if i in reads else None for i in range(len(units))])
            return [
                _Rows(*block.gather(block.order[a:b], x[a:b]), lease.acquire()) for a, b in itertools.pairwise(bounds)
            ]

        n_pieces = len(plan.pieces) - 1
        step = -(-n_pieces // GATHER_TASKS) if n_pieces else 1
        tasks = [pool.submit(gather, plan.pieces[i : i + step + 1]) for i in range(0, n_pieces, step)]
        return _GatheredBlock(tasks, lease)

    def _epoch_rows(self, pool: ThreadPoolExecutor, epoch: int, start: int, origin: int) -> Iterator[_GatheredBlock]:
        """The blocks of `epoch` from row offset `start` on, each as its batches' rows to come (earlier blocks are
        not read; a partly used block comes with its first rows dropped from `order`). Batches start at global
        row `origin`."""
        blocks, starts = self._epoch_blocks(epoch)

        def submit(i: int) -> _GatheredBlock:
            skip = max(0, start - starts[i])
            offset = epoch * self.rows_per_epoch + starts[i] + skip - origin
            plan = self._plan_block(blocks[i], [self.cfg.seed, epoch, i], skip, offset)
            return self._read_block(pool, blocks[i], plan)

        first = bisect.bisect_right(starts, start) - 1
        pending = [submit(i) for i in range(first, min(first + 1 + self.cfg.prefetch_blocks, len(blocks)))]
        for i in range(first, len(blocks)):
            nxt = i + 1 + self.cfg.prefetch_blocks
            if nxt < len(blocks):
                pending.append(submit(nxt))
            yield pending.pop(0)

    def _rows(self, pool: ThreadPoolExecutor, start: int) -> Iterator[_Rows]:
        """The endless stream of gathered batch parts from global row `start` on; epoch e holds rows
        [e * R, (e + 1) * R)."""
        epoch, offset = divmod(start, self.rows_per_epoch)
        while True:
            for block in self._epoch_rows(pool, epoch, offset, start):
                parts = [part for task in block.tasks for part in task.result()]
                block.lease.release()  # every part holds the buffer itself from here on
                yield from parts
            epoch, offset = epoch + 1, 0

    def batches(self, start: int = 0) -> Iterator[tuple[Batch, int]]:
        """Endless batches of exactly batch_rows rows from global row `start`, each with the row count after it
        (for one rank of several: its batch_rows / world_size rows of each, with the global count).

        That count is the whole cursor: `batches(count)` continues the same stream.
        """
        n, position = self.cfg.rows_per_rank, start
        with ThreadPoolExecutor(self.cfg.read_threads + 1) as pool:
            parts: list[_Rows] = []
            held = 0
            for rows in self._rows(pool, start):
                parts.append(rows)
                held += len(rows.x)
                if held < n:
                    continue
                assert held == n, "a gathered part crosses a batch boundary"
                position += self.cfg.batch_rows
                yield self._to_batch(parts), position
                parts, held = [], 0

    def _to_batch(self, parts: list[_Rows]) -> Batch:
        """One batch from its parts: a view of one part (holding that part's lease until released), or a copy
        of two joined (their leases released at once)."""
        if len(parts) == 1:
            x, layer, token, lease = parts[0]
        else:
            x, layer, token = (np.concatenate(arrays) for arrays in list(zip(*parts, strict=True))[:3])
            lease = _Lease().acquire()
            for part in parts:
                part.lease.release()
        xt = stored_to_torch(x, self.cache.meta.storage_dtype)
        lt, tt = torch.from_numpy(layer), torch.from_numpy(token)
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            xt = xt.pin_memory().to(self.device, non_blocking=True)
            lt = lt.pin_memory().to(self.device, non_blocking=True)
            lease.release()  # the pinned copy is the batch's own
            return Batch(xt, lt, tt)
        return Batch(xt, lt, tt, weakref.finalize(xt, lease.release))
