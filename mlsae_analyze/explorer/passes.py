"""The streaming passes of the index job over a latents store, one block of rows at a time.

With a[l, t, j] >= 0 latent j's activation at layer position l and token t (rows left out of the statistics, as
the variance output leaves them out, count as 0): tab 1 + l describes the (t, j) with a[l, t, j] > 0; tab 0 (all
layers) describes each token where j fires at some layer by its largest activation max_l a[l, t, j] and that
layer (the lowest on ties). Per (tab, latent):

- pass 1: rows where it fires, sum, sum of squares and maximum of the activations; the `top` strongest rows (ties:
  the earlier row first); `random` rows drawn uniformly without replacement (the rows with the largest `priority`,
  a hash of (token, latent, seed)); and, per latent, sum_t (sum_l l^2 a - (sum_l l a)^2 / sum_l a), whose ratio
  to the latent's mass is E_T[Var(L|T, j)], the spread over layers inside a single token;
- pass 2: a histogram of `bins` equal bins of [0, m_j], m_j the latent's maximum over all layers (one scale for
  all tabs, so that layers compare);
- pass 3: for `quantiles` groups whose edges are the histogram's quantiles (linear inside a bin), `per_quantile`
  rows drawn within each group as pass 1 draws.

An example row is coded token * L + layer. Nothing here holds anything of size tokens x latents; what is kept
is of size latents x tabs x (top + random + quantiles x per_quantile), plus a block's entries and the top-n
buffers (`topn.TopN`, at most topn.BUFFER entries each). Every result is the same whatever the chunking of the
store or the block size (sums up to float rounding): orders and draws depend on rows only. Each block is handled
with a few array operations over all tabs at once (keys tab * N + latent).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import numpy as np

from mlsae_analyze.latents import LatentChunk, check_rows
from mlsae_analyze.topn import TopN
from mlsae_cache.core.errors import StoreError

T = TypeVar("T")
ROWS_PER_BLOCK = 1024
"""Token rows handled at once: bounds the scratch memory whatever the store's chunking."""
_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class PassParams:
    """The sizes of what the passes keep (see the module docstring)."""

    n_latents: int
    n_layers: int
    top: int = 20
    random: int = 20
    quantiles: int = 5
    per_quantile: int = 4
    bins: int = 32
    seed: int = 0
    include_untrainable: bool = False

    @property
    def n_tabs(self) -> int:
        return self.n_layers + 1


def priority(rows: np.ndarray, latents: np.ndarray, n_latents: int, seed: int, stream: int) -> np.ndarray:
    """A number uniform in [0, 1) for each (token row, latent) pair, fixed by `seed` and `stream` (splitmix64 of
    the pair's index): keeping the pairs with the n largest draws n of them uniformly without replacement."""
    salt = np.uint64(((seed * 2 + 1) * _GOLDEN + stream * 0xD1B54A32D192ED03) & _MASK)
    x = rows.astype(np.uint64) * np.uint64(n_latents) + latents.astype(np.uint64)
    x = (x ^ salt) + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class Entries(NamedTuple):
    """The active (row, layer, latent, activation) entries of a block, each [E], by row, then layer, then slot."""

    rows: np.ndarray
    layer: np.ndarray
    latent: np.ndarray
    value: np.ndarray


class Groups(NamedTuple):
    """The (row, latent) pairs of a block, each [G]: the activation's sum, first and second moments over layers
    (sum_l a, sum_l l a, sum_l l^2 a), its maximum and the lowest layer holding it."""

    rows: np.ndarray
    latent: np.ndarray
    mass: np.ndarray
    first: np.ndarray
    second: np.ndarray
    peak: np.ndarray
    peak_layer: np.ndarray


def entries(chunk: LatentChunk, start: int, stop: int, params: PassParams) -> Entries:
    """The entries of rows [start, stop) of `chunk` (absolute rows), untrainable rows left out unless asked."""
    a, b = start - chunk.start, stop - chunk.start
    values = chunk.values[a:b]
    check_rows(chunk.indices[a:b], values, params.n_latents)
    active = values > 0
    if not params.include_untrainable:
        active &= chunk.tokens.trainable[a:b][:, None, None]
    flat = np.flatnonzero(active)  # one gather per array: the rows' [L, k] blocks are contiguous
    latent = chunk.indices[a:b].reshape(-1)[flat].astype(np.int64)
    k = values.shape[2]
    row, layer = np.divmod(flat // k, params.n_layers)
    return Entries(row + start, layer, latent, values.reshape(-1)[flat].astype(np.float64))


def groups(e: Entries, n_latents: int, n_layers: int) -> Groups:
    """The (row, latent) pairs of the entries of one block (the sort key ends with the layer, so it is unique and
    any sort orders each pair's layers the same way)."""
    if not len(e.rows):
        empty_f, empty_i = np.zeros(0), np.zeros(0, dtype=np.int64)
        return Groups(empty_i, empty_i, empty_f, empty_f, empty_f, empty_f, empty_i)
    pair = (e.rows - e.rows.min()) * n_latents + e.latent
    order = np.argsort(pair * n_layers + e.layer)
    pair = pair[order]
    starts = np.flatnonzero(np.concatenate([[True], pair[1:] != pair[:-1]]))
    value, layer = e.value[order], e.layer[order]
    at = layer.astype(np.float64)
    peak = np.maximum.reduceat(value, starts)
    group_of = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(pair))))
    peak_layer = np.minimum.reduceat(np.where(value == peak[group_of], layer, n_layers), starts)
    return Groups(
        rows=e.rows[order][starts],
        latent=e.latent[order][starts],
        mass=np.add.reduceat(value, starts),
        first=np.add.reduceat(at * value, starts),
        second=np.add.reduceat(at * at * value, starts),
        peak=peak,
        peak_layer=peak_layer.astype(np.int64),
    )


class TabEntries(NamedTuple):
    """What the tabs see of a block, each [M]: `key` = tab * N + latent, the activation, row and example code."""

    key: np.ndarray
    latent: np.ndarray
    value: np.ndarray
    rows: np.ndarray
    code: np.ndarray


def tab_entries(e: Entries, g: Groups, p: PassParams) -> tuple[TabEntries, TabEntries]:
    """Tab 0's pairs (each one's largest activation and its layer), then every layer's entries (tab 1 + layer); in
    each, a (tab, latent)'s entries come in row order."""
    pairs = TabEntries(g.latent, g.latent, g.peak, g.rows, g.rows * p.n_layers + g.peak_layer)
    key = (e.layer + 1) * p.n_latents + e.latent
    layers = TabEntries(key, e.latent, e.value, e.rows, e.rows * p.n_layers + e.layer)
    return pairs, layers


def blocks(chunks: Iterator[LatentChunk], params: PassParams) -> Iterator[tuple[LatentChunk, Entries, Groups]]:
    """Every block of at most ROWS_PER_BLOCK rows of the chunks, with its entries and pairs."""
    for chunk in chunks:
        n = len(chunk.indices)
        for a in range(chunk.start, chunk.start + n, ROWS_PER_BLOCK):
            e = entries(chunk, a, min(a + ROWS_PER_BLOCK, chunk.start + n), params)
            yield chunk, e, groups(e, params.n_latents, params.n_layers)


def ahead(items: Iterator[T]) -> Iterator[T]:
    """The items of `items` (none of them None), the next one computed on another thread meanwhile (numpy and
    zarr release the GIL in their heavy parts, so reading and sorting a block overlaps with accumulating the one
    before)."""
    with ThreadPoolExecutor(1, thread_name_prefix="index-ahead") as pool:
        upcoming = pool.submit(next, items, None)
        while (item := upcoming.result()) is not None:
            upcoming = pool.submit(next, items, None)
            yield item


class FirstPass:
    """Pass 1: per (tab, latent) fired, total, total_sq, peak [T, N]; within [N]; top and random draws; the
    windows' first rows, the rows seen and the rows kept."""

    def __init__(self, p: PassParams) -> None:
        self.p = p
        shape = (p.n_tabs, p.n_latents)
        self.fired = np.zeros(shape, dtype=np.int64)
        self.total, self.total_sq, self.peak = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self.within = np.zeros(p.n_latents)
        self.top = TopN(p.n_tabs * p.n_latents, p.top)
        self.random = TopN(p.n_tabs * p.n_latents, p.random)
        self.docs = DocStarts()
        self.n_rows = self.n_tokens = 0
        self._chunk = -1

    def add(self, chunk: LatentChunk, e: Entries, g: Groups) -> None:
        if chunk.start != self._chunk:  # the chunk's first block: its windows and kept rows
            self._chunk = chunk.start
            self.docs.add(chunk.start, chunk.tokens.sequence)
            kept = chunk.tokens.trainable if not self.p.include_untrainable else np.ones(len(chunk.indices), bool)
            self.n_rows += int(kept.sum())
            self.n_tokens += len(chunk.indices)
        size, shape = self.p.n_tabs * self.p.n_latents, self.fired.shape
        for t in tab_entries(e, g, self.p):
            self.fired += np.bincount(t.key, minlength=size).reshape(shape)
            self.total += np.bincount(t.key, weights=t.value, minlength=size).reshape(shape)
            self.total_sq += np.bincount(t.key, weights=t.value * t.value, minlength=size).reshape(shape)
            np.maximum.at(self.peak.reshape(-1), t.key, t.value)
            self.top.offer(t.key, t.value, t.code)
            self.random.offer(t.key, priority(t.rows, t.latent, self.p.n_latents, self.p.seed, stream=0), t.code)
        spread = np.maximum(g.second - g.first * g.first / np.where(g.mass > 0, g.mass, 1.0), 0.0)
        self.within += np.bincount(g.latent, weights=spread, minlength=self.p.n_latents)


class SecondPass:
    """Pass 2: histograms [T, N, bins] of each tab's activations on [0, scale_max[j]]."""

    def __init__(self, p: PassParams, scale_max: np.ndarray) -> None:
        self.p = p
        self.scale = np.divide(p.bins, scale_max, out=np.zeros_like(scale_max), where=scale_max > 0)
        self.histogram = np.zeros((p.n_tabs, p.n_latents, p.bins), dtype=np.int64)

    def add(self, chunk: LatentChunk, e: Entries, g: Groups) -> None:
        for t in tab_entries(e, g, self.p):
            b = histogram_bin(t.value, self.scale[t.latent], self.p.bins)
            counts = np.bincount(t.key * self.p.bins + b, minlength=self.histogram.size)
            self.histogram += counts.reshape(self.histogram.shape)


def histogram_bin(value: np.ndarray, scale: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each activation: floor(value * bins / m_j), the maximum itself in the last bin."""
    return np.minimum((value * scale).astype(np.int64), bins - 1)


def quantile_edges(histogram: np.ndarray, scale_max: np.ndarray, tab_max: np.ndarray, quantiles: int) -> np.ndarray:
    """Edges [T, N, quantiles + 1] float32 of the quantile groups of each tab: 0, the histogram's quantiles at
    q / quantiles (linear inside a bin; bins of width scale_max[j] / bins), then the tab's maximum."""
    n_tabs, n_latents, bins = histogram.shape
    total = histogram.sum(-1, keepdims=True)
    cdf = np.cumsum(histogram, -1) / np.maximum(total, 1)
    width = (scale_max / bins)[None, :]
    edges = np.zeros((n_tabs, n_latents, quantiles + 1))
    for q in range(1, quantiles):
        level = q / quantiles
        b = np.argmax(cdf >= level - 1e-12, axis=-1)
        below = np.where(b > 0, np.take_along_axis(cdf, np.maximum(b - 1, 0)[..., None], -1)[..., 0], 0.0)
        share = np.take_along_axis(histogram, b[..., None], -1)[..., 0] / np.maximum(total[..., 0], 1)
        frac = np.clip(np.divide(level - below, share, out=np.zeros_like(below), where=share > 0), 0.0, 1.0)
        edges[..., q] = (b + frac) * width
    edges[..., quantiles] = tab_max
    edges = np.minimum(np.maximum.accumulate(edges, axis=-1), tab_max[..., None])
    return np.where(total > 0, edges, 0.0).astype(np.float32)


class ThirdPass:
    """Pass 3: `per_quantile` rows drawn in each quantile group of each (tab, latent); group (tab * Q + q) * N + j."""

    def __init__(self, p: PassParams, edges: np.ndarray) -> None:
        self.p = p
        self.inner = edges[..., 1 : p.quantiles].astype(np.float64)  # [T, N, Q - 1]
        self.samples = TopN(p.n_tabs * p.quantiles * p.n_latents, p.per_quantile)

    def add(self, chunk: LatentChunk, e: Entries, g: Groups) -> None:
        n, quantiles = self.p.n_latents, self.p.quantiles
        for t in tab_entries(e, g, self.p):
            tab = t.key // n
            q = quantile_group(t.value, self.inner.reshape(-1, quantiles - 1)[t.key])
            draw = priority(t.rows, t.latent, n, self.p.seed, stream=1)
            self.samples.offer((tab * quantiles + q) * n + t.latent, draw, t.code)


def quantile_group(value: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """The group of each activation: how many inner edges [E, Q - 1] lie strictly below it."""
    return (value[:, None] > inner).sum(-1)


class DocStarts:
    """The first row of each context window, from the `sequence` of the rows in order; windows must be stored
    one after another, numbered from 0 (as a harvest or an import writes them)."""

    def __init__(self) -> None:
        self.starts: list[np.ndarray] = []
        self.last = -1

    def add(self, start: int, sequence: np.ndarray) -> None:
        step = np.diff(sequence, prepend=self.last)
        if ((step != 0) & (step != 1)).any():
            row = start + int(np.flatnonzero((step != 0) & (step != 1))[0])
            raise StoreError(
                f"the latents' context windows are not stored in order (row {row}); the explorer needs windows "
                "numbered from 0, one after another, as `mlsae-cache harvest` and `import` write them"
            )
        self.starts.append(start + np.flatnonzero(step == 1))
        if len(sequence):
            self.last = int(sequence[-1])

    def finish(self, n_tokens: int) -> np.ndarray:
        """[n_windows + 1]: the first row of each window, then n_tokens."""
        return np.concatenate([*self.starts, [n_tokens]]).astype(np.int64)
