"""Shuffled (token, layer) rows from a cache, read chunk by chunk.

Random row gathers through Zarr decode a whole chunk per row (FACTS.md: a few thousand rows/s), so the loader
shuffles at two levels instead:
1. the units of an epoch, one stored chunk each (a token chunk at one layer), are put in a random order,
   stratified so that every run of n_layers units holds each layer once;
2. consecutive units are grouped into blocks of `block_units`, and the rows of a block (all trainable tokens of
   its units) are permuted together.
The epoch's row stream is the concatenation of the permuted blocks and batches are consecutive slices of it, so
an epoch visits every selected row exactly once, the whole order follows from (seed, epoch), and one number,
the count of rows handed out, is enough to resume the same stream. Background threads read and decode the units of the
next blocks while the current one is consumed.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mlsae_cache.errors import InputError
from mlsae_cache.store import Cache, stored_to_torch


class _Block(NamedTuple):
    """The units of one block as stored (never concatenated: rows are gathered straight from them) and the
    order in which its trainable rows are handed out, as indices into the units laid end to end."""

    units: list[np.ndarray]
    slots: np.ndarray
    first_tokens: np.ndarray
    offsets: np.ndarray
    order: np.ndarray

    def gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows `idx` (sorted) as (x [n, d_model] stored dtype, layer slot [n], token [n])."""
        unit_of = np.searchsorted(self.offsets, idx, side="right") - 1
        local = idx - self.offsets[unit_of]
        x = np.empty((len(idx), self.units[0].shape[1]), dtype=self.units[0].dtype)
        bounds = np.flatnonzero(np.diff(unit_of)) + 1
        for a, b in zip(np.r_[0, bounds], np.r_[bounds, len(idx)], strict=True):
            np.take(self.units[unit_of[a]], local[a:b], axis=0, out=x[a:b])
        return x, self.slots[unit_of], self.first_tokens[unit_of] + local


class Batch(NamedTuple):
    """x: [batch_rows, d_model] in the cache's storage dtype (float16, bfloat16 or float32: the SAE casts it,
    on the device, which halves host work and transfers); layer: [batch_rows] int64, position of the row's
    layer in `layers`; token: [batch_rows] int64 cache row of each row (kept on the CPU: for bookkeeping).
    """

    x: torch.Tensor
    layer: torch.Tensor
    token: torch.Tensor


@dataclass(frozen=True)
class LoaderConfig:
    batch_rows: int = 4096
    block_units: int = 32
    seed: int = 0
    read_threads: int = 2
    prefetch_blocks: int = 1

    def __post_init__(self) -> None:
        if self.batch_rows < 1:
            raise InputError(f"--batch-rows must be at least 1, got {self.batch_rows}")
        if self.block_units < 1 or self.read_threads < 1 or self.prefetch_blocks < 0:
            raise InputError("block_units and read_threads must be at least 1, prefetch_blocks at least 0")


class RowLoader:
    """Iterates Batches of shuffled rows of `layers` (block indices present in the cache) from `cursor` on."""

    def __init__(
        self,
        cache: Cache,
        layers: tuple[int, ...],
        cfg: LoaderConfig,
        device: torch.device | str = "cpu",
        stop_token: int | None = None,
    ):
        """`stop_token`: use only tokens [0, stop_token) of the cache (the rest stays held out)."""
        missing = [layer for layer in layers if layer not in cache.layers]
        if missing:
            raise InputError(
                f"--layers {','.join(map(str, layers))}: blocks {missing} are not in the cache "
                f"{cache.path} (it holds {list(cache.layers)})"
            )
        self.cache, self.cfg, self.layers = cache, cfg, tuple(layers)
        self.device = torch.device(device)
        self._layer_pos = [cache.layers.index(layer) for layer in layers]
        trainable = cache.token_array("trainable").copy()
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

    def _read_unit(self, unit: int) -> tuple[np.ndarray, int, int]:
        """Raw stored rows of one unit (no float conversion here: it is done on whole batches)."""
        chunk, slot = divmod(int(unit), len(self.layers))
        return self.cache.stored_chunk(chunk, self._layer_pos[slot]), slot, chunk

    def _read_block(self, pool: ThreadPoolExecutor, units: np.ndarray, rng_key: list[int]) -> Future:
        reads = [pool.submit(self._read_unit, u) for u in units]
        ct = self.cache.chunk_tokens

        def assemble() -> _Block:
            parts = [f.result() for f in reads]
            keep = np.concatenate([self._masks[c][: len(x)] for x, _, c in parts])
            kept = np.flatnonzero(keep)
            return _Block(
                units=[x for x, _, _ in parts],
                slots=np.array([s for _, s, _ in parts], dtype=np.int64),
                first_tokens=np.array([c * ct for _, _, c in parts], dtype=np.int64),
                offsets=np.cumsum([0] + [len(x) for x, _, _ in parts[:-1]]).astype(np.int64),
                order=kept[np.random.default_rng(rng_key).permutation(len(kept))],
            )

        return pool.submit(assemble)

    def _epoch_rows(self, pool: ThreadPoolExecutor, epoch: int, start: int) -> Iterator[_Block]:
        """The blocks of `epoch` from row offset `start` on (earlier blocks are not read; a partly used block
        comes with its first rows dropped from `order`)."""
        blocks, starts = self._epoch_blocks(epoch)
        first = bisect.bisect_right(starts, start) - 1
        pending = [
            self._read_block(pool, blocks[i], [self.cfg.seed, epoch, i])
            for i in range(first, min(first + 1 + self.cfg.prefetch_blocks, len(blocks)))
        ]
        for i in range(first, len(blocks)):
            nxt = i + 1 + self.cfg.prefetch_blocks
            if nxt < len(blocks):
                pending.append(self._read_block(pool, blocks[nxt], [self.cfg.seed, epoch, nxt]))
            block = pending.pop(0).result()
            skip = max(0, start - starts[i])
            yield block._replace(order=block.order[skip:]) if skip else block

    def _rows(self, pool: ThreadPoolExecutor, start: int) -> Iterator[_Block]:
        """The endless row stream from global row `start` on; epoch e holds rows [e * R, (e + 1) * R)."""
        epoch, offset = divmod(start, self.rows_per_epoch)
        while True:
            yield from self._epoch_rows(pool, epoch, offset)
            epoch, offset = epoch + 1, 0

    def batches(self, start: int = 0) -> Iterator[tuple[Batch, int]]:
        """Endless batches of exactly batch_rows rows from global row `start`, each with the row count after it.

        That count is the whole cursor: `batches(count)` continues the same stream.
        """
        n, position = self.cfg.batch_rows, start
        with ThreadPoolExecutor(self.cfg.read_threads + 1) as pool:
            pending: deque[_Block] = deque()
            head = held = 0  # rows of pending[0] already handed out; rows held in total
            for block in self._rows(pool, start):
                pending.append(block)
                held += len(block.order)
                while held - head >= n:
                    parts, need = [], n
                    while need:  # gather each batch's rows straight from the blocks: one copy per row
                        front = pending[0]
                        take = min(need, len(front.order) - head)
                        # sorted: a batch is a set, and in-order gathers run about twice as fast
                        parts.append(front.gather(np.sort(front.order[head : head + take])))
                        head, need = head + take, need - take
                        if head == len(front.order):
                            pending.popleft()
                            held, head = held - len(front.order), 0
                    position += n
                    arrays = parts[0] if len(parts) == 1 else [np.concatenate(p) for p in zip(*parts, strict=True)]
                    yield self._to_batch(*arrays), position

    def _to_batch(self, x: np.ndarray, layer: np.ndarray, token: np.ndarray) -> Batch:
        xt = stored_to_torch(x, self.cache.meta.storage_dtype)
        lt, tt = torch.from_numpy(layer), torch.from_numpy(token)
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            xt = xt.pin_memory().to(self.device, non_blocking=True)
            lt = lt.pin_memory().to(self.device, non_blocking=True)
        return Batch(xt, lt, tt)
