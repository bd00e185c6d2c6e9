"""The cache's statistics (part of the cache format owner, store.py): the per-token-chunk partial sums behind
`layer_mean` and `layer_sq_norm`, the arrays that hold them, and their totals. store.py creates the arrays and
commits each chunk's partials with its data; nothing else spells these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from mlsae_cache.core.zarrstore import get_array, read_array, writable
from mlsae_cache.storage import stored_to_torch

LAYER_MEAN = "layer_mean"
LAYER_SQ_NORM = "layer_sq_norm"
CHUNK_SUM, CHUNK_SQ, CHUNK_COUNT = "chunk_sum", "chunk_sq_norm_sum", "chunk_count"

Partials = tuple[np.ndarray, np.ndarray, int]
"""One chunk's float64 sum x [n_layers, d_model], sum ||x||^2 [n_layers] and count of trainable rows."""

PARTIAL_ROWS = 64
"""Rows summed in float32 before their sums are added in float64 by `chunk_partials`."""


def chunk_partials(activations: np.ndarray, trainable: np.ndarray, storage_dtype: str) -> Partials:
    """Float64 sums over the trainable rows of one chunk's activations [n_layers, n, d_model] (stored dtype;
    trainable [n] bool): sum x [n_layers, d_model], sum ||x||^2 [n_layers], count.

    Layer by layer in one reused float32 buffer, with torch (vectorised, on the calling thread's intra-op
    threads: call it from the thread that runs the model, not beside it, or the two thread teams share the
    cores): each block of PARTIAL_ROWS rows is summed in float32, and the blocks' sums in float64 by numpy. A
    block's sum (of values, or of their squares, which are exact in float32 for float16 and bfloat16 values) is at
    worst PARTIAL_ROWS float32 roundings off the exact one (4e-6 of its sum of |x|; 2e-9 measured on normal data).
    Excluded rows are zeroed rather than selected out. Each output is reduced by one thread in a fixed order, so
    the bits do not depend on the thread count (shards and resumed runs write the same partials). Widening to
    float64 and summing with numpy took 77 ms of one core per SmolLM2 chunk of 4,096 tokens; this, 10 ms on 2.
    """
    n_layers, n, d_model = activations.shape
    blocks = -(-n // PARTIAL_ROWS)
    stored = stored_to_torch(activations, storage_dtype)
    excluded = torch.from_numpy(np.flatnonzero(~trainable))
    x = torch.zeros(blocks * PARTIAL_ROWS, d_model)  # the rows past n stay zero
    by_block = x.view(blocks, PARTIAL_ROWS, d_model)
    sums, sq = np.empty((n_layers, d_model)), np.empty(n_layers)
    for i in range(n_layers):
        x[:n].copy_(stored[i])
        x.index_fill_(0, excluded, 0.0)
        sums[i] = by_block.sum(dim=1).numpy().sum(axis=0, dtype=np.float64)
        sq[i] = by_block.square_().sum(dim=1).numpy().sum(dtype=np.float64)
    return sums, sq, int(trainable.sum())


PARTIAL_BLOCK = 1024
"""Chunks' partial sums read at a time when they are totalled (memory bounded however many chunks a cache has)."""


def read_partials(group: zarr.Group, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored partial sums of token chunks [start, stop)."""
    chunks = slice(start, stop)
    return (
        read_array(group, CHUNK_SUM, chunks),
        read_array(group, CHUNK_SQ, chunks),
        read_array(group, CHUNK_COUNT, chunks),
    )


@dataclass(frozen=True)
class Totals:
    """Sums of per-chunk partial sums, added one chunk after another in chunk order, so that a cache written in
    one run, several, or shards gets the same bits; O(n_layers x d_model) memory however many chunks."""

    sums: np.ndarray
    sq: np.ndarray
    count: int

    def add(self, sums: np.ndarray, sq: np.ndarray, count: int) -> Totals:
        """These totals plus one more chunk's partials."""
        return Totals(self.sums + sums, self.sq + sq, self.count + int(count))

    @classmethod
    def read(cls, group: zarr.Group, n_chunks: int, n_layers: int, d_model: int) -> Totals:
        """Totals of the stored partial sums of the first `n_chunks` token chunks."""
        totals = cls(np.zeros((n_layers, d_model)), np.zeros(n_layers), 0)
        for start in range(0, n_chunks, PARTIAL_BLOCK):
            for s, q, c in zip(*read_partials(group, start, min(start + PARTIAL_BLOCK, n_chunks)), strict=True):
                totals = totals.add(s, q, c)
        return totals


def write_statistics(group: zarr.Group, totals: Totals) -> None:
    """layer_mean and layer_sq_norm from the totals of the chunks' partial sums."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = totals.sums / totals.count if totals.count else np.full(totals.sums.shape, np.nan)
        sq_norm = totals.sq / totals.count if totals.count else np.full(totals.sq.shape, np.nan)
    writable(get_array(group, LAYER_MEAN))[:] = mean
    writable(get_array(group, LAYER_SQ_NORM))[:] = sq_norm


def finish_statistics(group: zarr.Group, n_tokens: int, chunk_tokens: int) -> None:
    """Statistics from the stored partial sums of the chunks holding the first `n_tokens` rows."""
    n_layers, d_model = get_array(group, CHUNK_SUM).shape[1:]
    write_statistics(group, Totals.read(group, math.ceil(n_tokens / chunk_tokens), n_layers, d_model))
